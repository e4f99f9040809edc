"""lockgw gateway: the daemon, CLI, BLE link management, authorization, outbox, MQTT."""

__all__: list[str] = []
