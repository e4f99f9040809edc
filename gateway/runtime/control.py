"""The control socket: how the CLI talks to a running daemon (one JSON object per line).

While the daemon runs, it alone drives the adapter and the databases; ``lockgw`` commands send
``{"cmd": ..., "args": {...}}`` and get ``{"ok": bool, "exit": int, "data": ... | "error": str}``
back. The socket is created 0660 (group ``lockgw`` by the unit's ``Group=``), in the runtime
directory. Requests are bounded (64 KiB a line) and answered one per line; a malformed line gets
an error and the connection stays usable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final, Self

from gateway import log
from gateway.errors import AdapterUnavailable
from gateway.tasks import cancel_and_wait
from gateway.wire import ControlAnswer, ControlLine, JsonObject, WireError, loads_bounded, parse_model

__all__ = ["MAX_LINE", "ControlServer", "call"]

MAX_LINE: Final = 64 * 1024
#: Connections at once; one more is refused with an error line (exit 3: busy).
MAX_CLIENTS: Final = 64
#: A connection with no complete request line for this long is closed (the CLI sends its line at
#: once; a follower asks again every second), and so is one that reads no answer for this long.
IDLE_S: Final = 60.0

#: Answers one command: its name and JSON args in, the JSON answer out (gateway/cli/commands.py).
Handler = Callable[[str, JsonObject], Awaitable[JsonObject]]
_log = log.get("control")


class ControlServer:
    def __init__(
        self, path: Path, handler: Handler, *, max_clients: int = MAX_CLIENTS, idle_s: float = IDLE_S
    ) -> None:
        self.path = path
        self._handler = handler
        self._max_clients, self._idle_s = max_clients, idle_s
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a stale socket from a killed daemon
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=MAX_LINE)
        os.chmod(self.path, 0o660)  # noqa: PTH101 - the socket path, right after bind
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await cancel_and_wait(list(self._clients))  # an interrupted unlock records its outcome first
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._clients) >= self._max_clients:
            # Bounded: a client that opens connections without end cannot use up the daemon's
            # file descriptors (and with them the MQTT reconnect and the CLI's own connection).
            _log.warning("control_refused", reason=f"more than {self._max_clients} connections")
            writer.write(
                _line(ControlAnswer.refused("too many control connections; try again", exit_code=3).as_json())
            )
            writer.close()
            return
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        try:
            while True:
                try:
                    async with asyncio.timeout(self._idle_s):
                        line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(_line(ControlAnswer.refused("request line too long", exit_code=2).as_json()))
                    break
                except TimeoutError:
                    break  # idle (or a line that never ends): the connection is closed
                if not line:
                    break
                writer.write(_line(await self._answer(line)))
                # Bounded too: a client that sends requests and never reads its answers would
                # otherwise hold its connection (one of max_clients) in drain() for ever.
                async with asyncio.timeout(self._idle_s):
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except TimeoutError:
            _log.warning("control_closed", reason=f"answers not read for {self._idle_s:.0f} s")
            writer.transport.abort()  # close() would keep the socket until the client reads
        finally:
            writer.close()
            if task is not None:
                self._clients.discard(task)

    async def _answer(self, line: bytes) -> JsonObject:
        try:
            request = parse_model(ControlLine, loads_bounded(line, max_bytes=MAX_LINE))
        except WireError as exc:
            return ControlAnswer.refused(f"malformed control request: {exc}", exit_code=2).as_json()
        try:
            return await self._handler(request.cmd, request.args)
        except Exception as exc:  # noqa: BLE001 - the daemon answers, never dies, on a bad command
            _log.error("control_command_crashed", cmd=request.cmd, exc_info=exc)
            return ControlAnswer.refused(f"{type(exc).__name__}: {exc}").as_json()


def _line(obj: JsonObject) -> bytes:
    return json.dumps(obj, sort_keys=True).encode() + b"\n"


async def call(path: Path, cmd: str, args: JsonObject, *, timeout_s: float = 60.0) -> JsonObject:
    """One request to the daemon: its answer's JSON (the CLI reads it as a ``ControlAnswer``).
    Raises OSError when no daemon listens there."""
    reader, writer = await asyncio.open_unix_connection(str(path), limit=16 * 1024 * 1024)
    try:
        writer.write(_line({"cmd": cmd, "args": args}))
        await writer.drain()
        try:
            async with asyncio.timeout(timeout_s):
                line = await reader.readline()
        except TimeoutError:
            raise AdapterUnavailable(
                f"the daemon did not answer within {timeout_s:.0f} s on {path}; is it hung? "
                "(systemctl status lockgw)"
            ) from None
        if not line:
            raise ConnectionResetError("the daemon closed the control connection")
        answer = json.loads(line)
        if not isinstance(answer, dict):
            raise ConnectionResetError("the daemon sent a malformed answer")
        return answer
    finally:
        writer.close()
