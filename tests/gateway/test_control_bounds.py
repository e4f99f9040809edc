"""The control socket is bounded (found by attack: idle half-lines held for ever used up the
daemon's file descriptors; a CLI facing a silent daemon said nothing and exited 1)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import AdapterUnavailable
from gateway.runtime.control import ControlServer, call

BOUND_S = 10.0  # hang guard


async def echo(cmd: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, "exit": 0, "data": {"cmd": cmd, "args": args}}


async def test_F5_connections_beyond_the_cap_are_refused_with_a_line_and_the_rest_serve(
    tmp_path: Path,
) -> None:
    sock = tmp_path / "ctl.sock"
    async with ControlServer(sock, echo, max_clients=4):
        held = [await asyncio.open_unix_connection(str(sock)) for _ in range(4)]
        for _, w in held:
            w.write(b'{"cmd": "pi')  # half a line, held open
            await w.drain()
        reader, writer = await asyncio.open_unix_connection(str(sock))
        async with asyncio.timeout(BOUND_S):
            refused = json.loads(await reader.readline())
        writer.close()
        await writer.wait_closed()
        assert refused["ok"] is False and refused["exit"] == 3 and "too many" in refused["error"]
        for _, w in held:
            w.close()
            await w.wait_closed()
        async with asyncio.timeout(BOUND_S):
            while True:  # the held connections end as the server notices they closed
                answer = await call(sock, "ping", {}, timeout_s=5)
                if answer["ok"]:
                    break
                await asyncio.sleep(0.05)
        assert answer["data"] == {"cmd": "ping", "args": {}}


async def test_F5_an_idle_connection_is_closed(tmp_path: Path) -> None:
    sock = tmp_path / "ctl.sock"
    async with ControlServer(sock, echo, idle_s=0.2):
        reader, writer = await asyncio.open_unix_connection(str(sock))
        writer.write(b'{"cmd": "pi')
        await writer.drain()
        async with asyncio.timeout(BOUND_S):
            assert await reader.read() == b""  # closed by the server
        writer.close()
        await writer.wait_closed()


async def test_F5_a_daemon_that_never_answers_is_exit_3_with_a_message(tmp_path: Path) -> None:
    sock = tmp_path / "silent.sock"

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()
        finally:
            writer.close()

    server = await asyncio.start_unix_server(silent, path=str(sock))
    async with server:
        with pytest.raises(AdapterUnavailable, match="did not answer within 0 s"):
            await call(sock, "ping", {}, timeout_s=0.3)


async def test_F5_a_client_that_never_reads_its_answers_is_closed_not_held_for_ever(
    tmp_path: Path,
) -> None:
    """Found by attack (round 2): the idle bound covered reading a line, not writing the
    answer; a client sending requests and never reading blocked its connection in drain() for
    ever, and 64 of them shut every CLI out of the daemon."""
    sock = tmp_path / "ctl.sock"
    server = ControlServer(sock, echo, idle_s=0.2)
    async with server:
        reader, writer = await asyncio.open_unix_connection(str(sock))
        line = json.dumps({"cmd": "ping", "args": {"pad": "x" * 60_000}}).encode() + b"\n"
        for _ in range(100):  # ~6 MB of answers: far more than the socket buffers hold
            writer.write(line)
        async with asyncio.timeout(BOUND_S):
            # the server's own set of connections: nothing else shows it stopped writing
            while not server._clients:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            while server._clients:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            answers = 0
            with contextlib.suppress(ConnectionError):
                while await reader.readline():
                    answers += 1
        writer.transport.abort()
        assert answers < 100  # closed, not served to the end once the client read again


async def test_F5_a_client_over_the_cap_that_sent_its_request_reads_the_refusal(tmp_path: Path) -> None:
    """Attack (round 2), held: the CLI sends its line before reading; the refused connection
    is closed with that line unread (the peer sees ECONNRESET after the data, not before),
    so the CLI still reads 'too many connections' (exit 3)."""
    sock = tmp_path / "ctl.sock"
    async with ControlServer(sock, echo, max_clients=1):
        _held_reader, held = await asyncio.open_unix_connection(str(sock))
        held.write(b'{"cmd": "pi')
        await held.drain()
        for _ in range(20):  # each try races the server's close against the client's read
            answer = await call(sock, "ping", {}, timeout_s=BOUND_S)
            assert answer["ok"] is False and answer["exit"] == 3, answer
        held.close()
        await held.wait_closed()
