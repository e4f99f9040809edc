"""Durable storage: the outbox (events committed before anything depends on them, one writer
thread, gapless seq, hash chain). Imports nothing of the gateway but the shared modules (errors,
log) and ``protocols``; never a transport or the runtime.
"""

__all__: list[str] = []
