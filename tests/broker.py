"""A real mosquitto per test session on a free port, which tests may kill and restart; and a
bridge that only drains an outbox into it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from gateway.config import MqttConfig
from gateway.mqtt import MqttBridge
from gateway.outbox import Outbox


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


def drain_only_bridge(url: str, outbox: Outbox, *, gw_id: str, site: str, **kw: Any) -> MqttBridge:
    """An MQTT bridge that only drains ``outbox`` (requests, trust documents and state are
    no-ops): the gateway's publishing path alone, for tests and benchmarks."""

    async def nothing(*_a: object) -> dict[str, object]:
        return {}

    return MqttBridge(
        MqttConfig(url=url),
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
