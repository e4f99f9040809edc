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

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PG_BIN", "Postgres", "RabbitNode", "free_port", "rabbit_node", "wait_port"]

PG_BIN = Path("/usr/lib/postgresql/15/bin")
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
        self.stop()
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
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

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
        self.stop()
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
