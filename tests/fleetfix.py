"""Private central-side parts for tests and benches: a PostgreSQL cluster and RabbitMQ nodes,
each in its own temp directory on free ports — never the machine-wide ones (5432, 5672, 1883).

* :class:`Postgres` — ``initdb`` into a fresh directory, ``postgres`` on 127.0.0.1:FREEPORT with
  ``trust`` auth for the test user ``lockgw``. PostgreSQL refuses to run as root, so under root
  the directory is chowned to ``postgres`` and the server runs via ``runuser -u postgres --``.
  ``dsn`` is what ``[postgres] dsn`` of the receiver takes. ``stop``/``start`` restart it on the
  same port and data (the fault tests restart PostgreSQL).
* :func:`rabbit_node` — a parameterised RabbitMQ node builder (own node name, AMQP, MQTT and
  distribution ports, own mnesia/log dirs, own HOME and ``.erlang.cookie``, own
  ``ERL_EPMD_PORT`` so the machine's epmd is untouched). Several nodes built with the same
  ``cookie`` and ``epmd_port`` can be clustered (tests/… of the fleet harness do).
  :class:`RabbitNode` starts, waits for AMQP and MQTT listeners, and kills (SIGKILL) or stops it.

Both raise :class:`RuntimeError` naming what is missing; ``./dev.sh test`` installs
``postgresql`` and ``rabbitmq-server`` where they are missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from protocols.event_encoding import GENESIS, seal_event

__all__ = [
    "PG_BIN",
    "RECEIVER_EXE",
    "Postgres",
    "RabbitNode",
    "ReceiverProc",
    "chain",
    "free_port",
    "new_database",
    "payload",
    "pg_fetch",
    "postgres",
    "rabbit_node",
    "receiver_config",
    "wait_port",
    "wait_until",
]


def _pg_bin() -> Path:
    """The newest installed PostgreSQL's bin directory (Debian: /usr/lib/postgresql/<major>/bin)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()
RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
#: Bounds each start: a hang guard on a loaded 2-core machine, not a speed requirement.
START_WITHIN_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(
    port: int, *, within_s: float = START_WITHIN_S, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {within_s} s")


def _as_pg_user() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


class Postgres:
    """A private PostgreSQL 15 cluster (module docstring)."""

    def __init__(self, *, port: int | None = None) -> None:
        if not (PG_BIN / "initdb").exists():
            raise RuntimeError(f"PostgreSQL is not installed ({PG_BIN}/initdb); ./dev.sh test installs it")
        self.dir = Path(tempfile.mkdtemp(prefix="lockgw-pg-"))
        self.data = self.dir / "data"
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "postgres.log"
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        subprocess.run(
            [*_as_pg_user(), str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "lockgw", "--auth=trust",
             "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"],
            check=True, capture_output=True,
        )  # fmt: skip

    @property
    def dsn(self) -> str:
        return f"postgresql://lockgw@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        log = self.log.open("ab")
        self.proc = subprocess.Popen(
            [*_as_pg_user(), str(PG_BIN / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-k", str(self.dir), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=on",
             "-c", "max_connections=200", "-c", "shared_buffers=64MB"],
            stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
        log.close()
        wait_port(self.port, proc=self.proc)
        deadline = time.monotonic() + START_WITHIN_S
        while time.monotonic() < deadline:  # the port opens before recovery has finished
            ok = subprocess.run(
                [str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "lockgw"],
                capture_output=True, check=False,
            )  # fmt: skip
            if ok.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"PostgreSQL did not become ready: {self.log.read_text()[-2000:]}")

    def stop(self, *, kill: bool = False) -> None:
        """Fast shutdown (SIGINT), or SIGKILL of the postmaster with ``kill``."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGINT)
        self.proc.wait(timeout=60)
        self.proc = None
        if kill:  # children may linger a moment after the postmaster
            time.sleep(0.5)

    def destroy(self) -> None:
        """Immediate shutdown (SIGQUIT: no checkpoint, the data goes anyway) and remove it all."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGQUIT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class RabbitNode:
    """One RabbitMQ node (see :func:`rabbit_node`)."""

    name: str
    dir: Path
    amqp_port: int
    mqtt_port: int
    dist_port: int
    epmd_port: int
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = field(default=None)

    @property
    def amqp_url(self) -> str:
        """No credentials in the URL (the receiver refuses inline secrets): AMQP clients default
        to guest/guest, which ``loopback_users = none`` allows on 127.0.0.1."""
        return f"amqp://127.0.0.1:{self.amqp_port}/"

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    def start(self) -> None:
        log = (self.dir / "stdout.log").open("ab")
        self.proc = subprocess.Popen(
            [str(RABBIT_BIN / "rabbitmq-server")],
            env=self.env, stdout=log, stderr=log, start_new_session=True, cwd=self.dir,
        )  # fmt: skip
        log.close()
        wait_port(self.amqp_port, proc=self.proc)
        wait_port(self.mqtt_port, proc=self.proc)

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl -n NODE ARGS`` with this node's environment."""
        return subprocess.run(
            [str(RABBIT_BIN / "rabbitmqctl"), "-n", self.name, *args],
            env=self.env, capture_output=True, text=True, check=check, timeout=START_WITHIN_S,
        )  # fmt: skip

    def kill(self) -> None:
        """SIGKILL the whole node (beam and its children)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        self.ctl("stop", check=False)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()
        self.proc = None

    def destroy(self) -> None:
        """SIGKILL (a test node keeps nothing) and remove it all, its private epmd included."""
        self.kill()
        epmd = shutil.which("epmd") or "/usr/lib/erlang/bin/epmd"
        # Only the private epmd on our own port: the machine's one (4369) is never touched.
        subprocess.run(
            [epmd, "-port", str(self.epmd_port), "-kill"], env=self.env, capture_output=True, check=False
        )
        shutil.rmtree(self.dir, ignore_errors=True)


def rabbit_node(
    *,
    base: Path | None = None,
    name: str | None = None,
    cookie: str | None = None,
    epmd_port: int | None = None,
    extra_config: str = "",
) -> RabbitNode:
    """Build (not start) a private RabbitMQ node with the MQTT plugin. Nodes meant to form one
    cluster share ``cookie`` and ``epmd_port``; each gets its own ports and directories.
    ``extra_config`` is appended to its rabbitmq.conf (new-style ``key = value`` lines)."""
    if not (RABBIT_BIN / "rabbitmq-server").exists():
        raise RuntimeError("rabbitmq-server is not installed; ./dev.sh test installs it")
    node_dir = Path(tempfile.mkdtemp(prefix="lockgw-rmq-", dir=base))
    name = name or f"rtest-{secrets.token_hex(4)}@localhost"
    cookie = cookie or secrets.token_hex(16)
    epmd_port = epmd_port or free_port()
    amqp, mqtt, dist = free_port(), free_port(), free_port()
    home = node_dir / "home"
    home.mkdir()
    (home / ".erlang.cookie").write_text(cookie)
    (home / ".erlang.cookie").chmod(0o400)
    conf = node_dir / "rabbitmq.conf"
    conf.write_text(
        f"listeners.tcp.default = 127.0.0.1:{amqp}\n"
        f"mqtt.listeners.tcp.default = 127.0.0.1:{mqtt}\n"
        "mqtt.allow_anonymous = true\n"
        "mqtt.durable_queue_type = quorum\n"
        "loopback_users = none\n"
        "management_agent.disable_metrics_collector = true\n"
        f"{extra_config}"
    )
    plugins = node_dir / "enabled_plugins"
    plugins.write_text("[rabbitmq_mqtt].\n")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "RABBITMQ_NODENAME": name,
        "RABBITMQ_NODE_PORT": str(amqp),
        "RABBITMQ_DIST_PORT": str(dist),
        "RABBITMQ_MNESIA_BASE": str(node_dir / "mnesia"),
        "RABBITMQ_LOG_BASE": str(node_dir / "log"),
        "RABBITMQ_CONFIG_FILE": str(conf),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins),
        "RABBITMQ_ENABLED_PLUGINS": "rabbitmq_mqtt",
        "RABBITMQ_PID_FILE": str(node_dir / "pid"),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(node_dir / "advanced.config"),
        "ERL_EPMD_PORT": str(epmd_port),
    }
    return RabbitNode(name, node_dir, amqp, mqtt, dist, epmd_port, env)


# --- the receiver as a process, and a contract-faithful event source ------------------------

RECEIVER_EXE = Path(sys.executable).with_name("lockgw-receiver")


def receiver_config(
    path: Path,
    *,
    dsn: str,
    instance: str,
    transport: str = "mqtt",
    mqtt_url: str | None = None,
    amqp_url: str | None = None,
    base: str = "lockgw",
    gap_replay_after_s: float = 2.0,
    replay_retry_s: float = 5.0,
    batch_max: int = 200,
    amqp_queue: str = "lockgw.central",
    extra: str = "",
    mqtt_extra: str = "",
) -> Path:
    """Write a receiver TOML file (docs/fleet.md) and return its path."""
    text = (
        f'[receiver]\ninstance = "{instance}"\nbase_topic = "{base}"\ntransport = "{transport}"\n'
        f"batch_max = {batch_max}\nbatch_linger_s = 0.02\ngap_replay_after_s = {gap_replay_after_s}\n"
        f'replay_retry_s = {replay_retry_s}\n{extra}\n[postgres]\ndsn = "{dsn}"\n'
    )
    if mqtt_url is not None:
        text += f'[mqtt]\nurl = "{mqtt_url}"\n{mqtt_extra}\n'
    if amqp_url is not None:
        text += f'[amqp]\nurl = "{amqp_url}"\nqueue = "{amqp_queue}"\nprefetch = {max(batch_max, 500)}\n'
    path.write_text(text)
    return path


@dataclass
class ReceiverProc:
    """``lockgw-receiver --config CONFIG run`` as a subprocess (its log in ``log``)."""

    config: Path
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ReceiverProc:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [str(RECEIVER_EXE), "--config", str(self.config), "run"],
            stdout=out, stderr=out, env={**os.environ, **self.env},
        )  # fmt: skip
        out.close()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_log(self, needle: str, *, within_s: float = START_WITHIN_S) -> None:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if needle in self.output():
                return
            if not self.alive():
                raise RuntimeError(f"receiver exited ({self.returncode()}): {self.output()[-3000:]}")
            time.sleep(0.05)
        raise RuntimeError(f"no {needle!r} in the receiver's log: {self.output()[-3000:]}")

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, *, within_s: float = 60) -> int:
        """SIGTERM, then wait: the exit code (0 expected: a clean drain)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=within_s)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def chain(
    gw: str, *, n: int, epoch: str | None = None, site: str = "site-1", start: int = 1, prev: str = GENESIS
) -> list[dict[str, Any]]:
    """``n`` sealed events of one gateway, exactly as the gateway's outbox makes them."""
    epoch = epoch or secrets.token_hex(8)
    out: list[dict[str, Any]] = []
    for seq in range(start, start + n):
        ev = seal_event(
            {"type": "lock.unlocked", "lock": "lock-1", "data": {"n": seq}},
            gw=gw, site=site, epoch=epoch, seq=seq, prev=prev, wall=1_780_000_000 + seq,
        )  # fmt: skip
        out.append(ev)
        prev = ev["hash"]
    return out


def payload(event: dict[str, Any], *, replayed: bool = False) -> bytes:
    body = dict(event)
    if replayed:
        body["replayed"] = True
    return json.dumps(body, separators=(",", ":")).encode()


async def pg_fetch(dsn: str, sql: str, *args: Any) -> list[Any]:
    """Rows of one query on the test PostgreSQL."""
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def wait_until(
    check: Any, *, within_s: float = 60.0, every_s: float = 0.2, what: str = "condition"
) -> Any:
    """Poll the async ``check`` until it returns something truthy (returned), or fail."""
    deadline = time.monotonic() + within_s
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(every_s)
    raise AssertionError(f"{what} not reached within {within_s} s (last: {last!r})")


async def new_database(pg: Postgres) -> str:
    """A fresh database in ``pg`` (one per test): its DSN."""
    name = f"t_{secrets.token_hex(6)}"
    conn = await asyncpg.connect(pg.dsn)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    return pg.dsn.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A private PostgreSQL per test module (import it into the module); each test makes its own
    database in it with :func:`new_database`."""
    pg = Postgres()
    pg.start()
    yield pg
    pg.destroy()
