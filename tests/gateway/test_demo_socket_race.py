"""The broker dies while paho's thread asks the loop to watch the MQTT socket (THREATS A4):
asyncio's "Exception in callback ... Bad file descriptor" traceback becomes one log line."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest
from structlog.testing import capture_logs

from gateway.mqtt.bridge import quiet_closed_socket_callbacks


def _fail() -> None:
    raise ValueError("not the socket race")


async def test_A4_socket_closed_before_the_loop_registers_it_is_one_log_line_other_errors_still_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    before = loop.get_exception_handler()
    seen: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    quiet_closed_socket_callbacks(loop)
    try:
        with capture_logs() as lines:
            a, b = socket.socketpair()
            # What aiomqtt's paho callbacks do from paho's thread, then paho closes the socket
            # (the broker is gone) before the loop gets to the registration.
            loop.call_soon_threadsafe(loop.add_writer, a.fileno(), lambda: None)
            a.close()
            b.close()
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        assert [line["event"] for line in lines] == ["socket_closed_before_registered"]
        assert "Bad file descriptor" in str(lines[0]["reason"])
        assert seen == []  # nothing reached the handler before ours
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        loop.call_soon(_fail)
        await asyncio.sleep(0)
        assert [type(c["exception"]) for c in seen] == [ValueError]  # any other error: as before
    finally:
        loop.set_exception_handler(before)
