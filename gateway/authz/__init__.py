"""Authorization on the device: the ``Authorizer`` and its ``TrustStore`` (the pure ``Authority``
of ``protocols.credentials`` with persistence), the clocks, and key files. Imports only
``protocols`` and the shared modules (errors, log); never a transport, the runtime or the CLI.
"""

__all__: list[str] = []
