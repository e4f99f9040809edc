"""MQTT (CONTRACT §4): the bridge — one persistent session, requests in, events, state and
responses out. May import ``store`` (the outbox it drains) and the shared modules at the top of
``gateway``; never ``runtime``, ``ble`` or ``cli`` (requests reach the service through an injected
handler).
"""

__all__: list[str] = []
