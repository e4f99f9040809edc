"""BLE: the link manager (slots, priorities, per-lock gates, deadlines), the lock client (one
authenticated session over GATT), advert watching, the registry of paired locks, and the bleak
backend over Bumble. May import only ``protocols`` and the shared modules at the top of
``gateway`` (errors, log, tasks, backoff); never ``store``, ``mqtt``, ``runtime`` or ``cli``.
"""

__all__: list[str] = []
