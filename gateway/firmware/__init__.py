"""Firmware rollouts (docs/firmware.md): the durable per-lock state machine over the link
manager's lowest priority. Between the runtime and the transports: may import ``ble``, ``store``,
``authz``, ``protocols`` and the shared modules; never ``runtime``, ``mqtt`` or ``cli``.
"""

__all__: list[str] = []
