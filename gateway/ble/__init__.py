"""BLE edge: bleak backends and the lock client."""

__all__: list[str] = []
