"""Pure, sans-I/O protocol code for lockgw.

Nothing in this package reads a clock, draws randomness, opens a file or a socket, or
imports an async framework: time (``now=``) and randomness (``rng=``) are arguments, bytes go
in and events plus bytes come out. ``tests/test_architecture.py`` enforces that.
"""

__all__: list[str] = []
