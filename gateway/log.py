"""Structured logging (structlog): one line per thing that happened, with its reason.

JSON lines on stderr when stderr is not a terminal (journald keeps them under systemd), a
readable coloured line on a terminal. Context is bound per lock and per request with
:func:`structlog.contextvars.bound_contextvars` (``transaction``, ``lock``, ``action``) and every
line of a request carries it; outcomes and reason codes are fields, never prose to parse.

What is logged: every component crash (with its traceback) and restart, every reconnect and
lost connection, every link failure, every alarm raised or cleared, start and stop. What is never
logged: token, proof, key, setup-code or password bytes — :func:`_redact` replaces the value of
any field named like one, wherever it is bound, and the end-to-end tests grep the logs for every
secret they used (``tests/integration/test_logging.py``).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Final, TextIO

import structlog

__all__ = ["SECRET_FIELDS", "configure", "get", "loop_exception_handler"]

#: Field names whose values are never written to a log line, at any depth of the line's fields.
SECRET_FIELDS: Final = frozenset(
    {
        "token",
        "proof",
        "key",
        "ltk",
        "secret",
        "setup_code",
        "password",
        "holder_key",
        "keyring",
        "revocations",
        "time_statement",
        "nonce",
    }
)
_REDACTED: Final = "[redacted]"

_configured: list[TextIO] = []
_loop_log = structlog.get_logger(component="asyncio")


def _redact(_logger: object, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for name in list(event):
        if name in SECRET_FIELDS:
            event[name] = _REDACTED
        elif isinstance(event[name], dict):
            event[name] = {k: (_REDACTED if k in SECRET_FIELDS else v) for k, v in event[name].items()}
    return event


def configure(
    stream: TextIO | None = None, *, json_lines: bool | None = None, level: int = logging.INFO
) -> None:
    """Set up structlog for the daemon or a CLI command (idempotent per stream).

    ``json_lines`` defaults to "stderr is not a terminal"."""
    out = stream if stream is not None else sys.stderr
    if _configured and _configured[0] is out and json_lines is None:
        return
    as_json = json_lines if json_lines is not None else not out.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer(sort_keys=True)
        if as_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
    ]
    if as_json:
        processors.append(structlog.processors.format_exc_info)  # no locals: they may hold secrets
    # Libraries log through the stdlib (aiomqtt, bumble): the same lines, the same format.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                *processors,
            ],
        )
    )
    logging.basicConfig(handlers=[handler], level=logging.WARNING, force=True)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    _configured[:] = [out]


def loop_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """asyncio's "Exception in callback …" as one structured line (with its traceback)."""
    del loop
    exc = context.get("exception")
    _loop_log.error(
        "asyncio_error",
        reason=str(context.get("message", "")),
        exc_info=exc if isinstance(exc, BaseException) else None,
    )


def get(component: str) -> Any:
    """A logger whose lines name the component (``"component": "outbox"``). Lines go to stderr
    even before :func:`configure` is called (structlog's default is stdout, where the CLI's
    ``--json`` output goes)."""
    if not _configured:
        configure()
    return structlog.get_logger(component=component)
