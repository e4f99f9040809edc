from gateway.receiver.main import main

main()
