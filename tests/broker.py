"""A real mosquitto per test session on a free port, which tests may kill and restart; a bridge
that only drains an outbox into it; and a proxy in front of it that can swallow what a client
sends, packet by packet."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from gateway.config import MqttConfig
from gateway.mqtt.bridge import MqttBridge
from gateway.store.outbox import Outbox


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )


class Broker:
    def __init__(
        self, workdir: Path, *, tls: tuple[Path, Path] | None = None, port: int | None = None
    ) -> None:
        exe = mosquitto_binary()
        if exe is None:
            raise RuntimeError("mosquitto is not installed; ./dev.sh test installs it")
        self.exe = exe
        self.port = port or free_port()
        self.conf = workdir / "mosquitto.conf"
        text = (
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "max_queued_messages 100000\n"
        )
        if tls is not None:
            text += f"certfile {tls[0]}\nkeyfile {tls[1]}\n"
        if os.geteuid() == 0:
            # As root, mosquitto would switch to its own user, who cannot read pytest's 0700
            # temp directories (the TLS key lives there).
            text += "user root\n"
        self.conf.write_text(text)
        self.tls = tls is not None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        self.kill()


def drain_only_bridge(
    url: str, outbox: Outbox, *, gw_id: str, site: str, protocol: str = "5", **kw: Any
) -> MqttBridge:
    """An MQTT bridge that only drains ``outbox`` (requests, trust documents and state are
    no-ops): the gateway's publishing path alone, for tests and benchmarks."""

    async def nothing(*_a: object) -> dict[str, object]:
        return {}

    return MqttBridge(
        MqttConfig(url=url, protocol=protocol),
        gw_id=gw_id,
        site=site,
        outbox=outbox,
        handle_request=nothing,
        install=nothing,
        info=dict,
        heartbeat=dict,
        lock_states=list,
        **kw,
    )


def mqtt_packets(buffer: bytearray) -> list[bytes]:
    """Whole MQTT control packets taken off the front of ``buffer`` (fixed header: one type
    byte and a variable-length remaining length, MQTT 5 §2.1); a partial packet stays."""
    packets = []
    while len(buffer) >= 2:
        length, shift, i = 0, 0, 1
        while True:
            if i >= len(buffer):
                return packets
            byte = buffer[i]
            length |= (byte & 0x7F) << shift
            shift += 7
            i += 1
            if not byte & 0x80:
                break
        if len(buffer) < i + length:
            return packets
        packets.append(bytes(buffer[: i + length]))
        del buffer[: i + length]
    return packets


#: MQTT control packet types (the high nibble of the first byte).
PUBLISH, DISCONNECT = 3, 14


class MqttProxy:
    """A TCP proxy in front of a broker. Broker to client passes as is; client to broker passes
    whole packets, except those ``swallow`` says to drop (a broker that never got them)."""

    def __init__(self, broker_port: int) -> None:
        self.broker_port = broker_port
        self.port = 0
        self.swallow: Callable[[bytes], bool] = lambda _packet: False
        self.swallowed: list[bytes] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        broker_r, broker_w = await asyncio.open_connection("127.0.0.1", self.broker_port)
        up = asyncio.create_task(self._upstream(client_r, broker_w))
        down = asyncio.create_task(self._pipe(broker_r, client_w))
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Closed first, before anything awaits: a proxy shut down meanwhile (its exit
            # cancels this task) still ends both TCP streams now, so the broker sees a client
            # whose stream ended at once — not when the garbage collector gets to the socket.
            for w in (client_w, broker_w):
                w.close()
            for t in (up, down):
                t.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            for w in (client_w, broker_w):
                with contextlib.suppress(OSError):
                    await w.wait_closed()
            self._tasks.discard(task)

    async def _upstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buffer = bytearray()
        while data := await reader.read(65536):
            buffer += data
            for packet in mqtt_packets(buffer):
                if self.swallow(packet):
                    self.swallowed.append(packet)
                else:
                    writer.write(packet)
            await writer.drain()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
