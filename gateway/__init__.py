"""lockgw gateway: everything that awaits.

Layers, top to bottom (enforced by import-linter, ``[tool.importlinter]`` in pyproject.toml):
``cli`` → ``runtime`` → ``mqtt`` | ``ble`` → ``store`` | ``authz`` → the shared modules here
(``config``, ``wire``, ``errors``, ``log``, ``tasks``, ``backoff``) → ``protocols`` (pure).
"""

__all__: list[str] = []
