"""The lock firmware model and its simulated radio (lockgw-sim)."""

__all__: list[str] = []
