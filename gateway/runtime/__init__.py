"""The runtime: the daemon's use cases and the things that run them.

``app`` (the ``Gateway``: components started in order, stopped in reverse), ``supervisor`` (every
long-running task in one TaskGroup, each with its failure policy), ``service`` (the use cases:
unlock, lock, status, locks, replay, challenge, trust install — the command pipeline), ``control``
(the control socket the CLI talks to), ``systemd`` (sd_notify). May import ``ble``, ``mqtt``,
``store``, ``authz`` and the shared modules at the top of ``gateway`` (errors, log, tasks, backoff,
wire, config); never ``cli``.
"""

__all__: list[str] = []
