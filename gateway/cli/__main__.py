"""``python -m gateway.cli``: the ``lockgw`` command."""

import sys

from gateway.cli.main import main

sys.exit(main())
