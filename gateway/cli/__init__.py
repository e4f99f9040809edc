"""The command line: ``lockgw`` (``main``), its terminal output (``ui``), the daemon's side of its
commands (``commands``, dispatched from the control socket), ``doctor``, the scripted ``demo`` and
``lockgw-issuer`` (``issuer``: the reference issuer central integrators copy). The top layer: it
may import everything in ``gateway``; nothing imports it.
"""

__all__: list[str] = []
