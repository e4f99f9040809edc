"""A private RabbitMQ — one node or a cluster of N — under a temp directory, for tests and
benches. Never the machine's broker: every node has its own node name (``rfl<i>-<rand>@localhost``),
AMQP, MQTT and distribution ports, its own epmd port (``ERL_EPMD_PORT``), data and log dirs,
and a HOME holding the cluster's shared ``.erlang.cookie``.

Each node runs the ``rabbitmq_mqtt`` plugin (MQTT 3.1.1) with ``mqtt.durable_queue_type =
quorum`` — RabbitMQ 3.10's plugin keeps the queue of a persistent (clean session off) MQTT
session with QoS 1 subscriptions on a replicated quorum queue (the ``durable_queue_type`` enum
in ``rabbitmq_mqtt.schema`` of 3.10.8 is ``classic | quorum``) — and a DETS retained-message
store, which is per node: a retained message published on node 1 is not seen by a subscriber
on node 2 (docs/mqtt-3.1.1.md).

The events queue central reads is a quorum queue bound to ``amq.topic`` for
``<base>.*.events`` (RabbitMQ maps MQTT topic levels ``/`` to AMQP routing-key words ``.``);
:meth:`RabbitCluster.declare_events_queue` makes it.

RabbitMQ 3.10.8 and Erlang 25 are at /usr/lib/rabbitmq (Debian 12's ``rabbitmq-server``);
``./dev.sh test`` installs the package where it is missing.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
#: Startup of three nodes on a loaded 2-core machine takes tens of seconds; this bounds a hang.
START_WITHIN_S = 240.0


def rabbitmq_installed() -> bool:
    return (RABBIT_BIN / "rabbitmq-server").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class RabbitNode:
    index: int
    name: str
    amqp_port: int
    mqtt_port: int
    dist_port: int
    base: Path
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.base / "stdout.log"

    @property
    def amqp_url(self) -> str:
        """No credentials in the URL (the receiver refuses inline secrets): AMQP clients default
        to guest/guest, which ``loopback_users = none`` allows on 127.0.0.1."""
        return f"amqp://127.0.0.1:{self.amqp_port}/"

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    @property
    def short(self) -> str:
        return self.name.split("@")[0]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class RabbitCluster:
    """``nodes`` RabbitMQ nodes clustered on this machine (``nodes=1``: a single node).

    ``with RabbitCluster(tmp, nodes=3) as rc:`` starts all nodes at once, joins nodes 2..N to
    node 1 with ``rabbitmqctl join_cluster``, and on exit stops them and their epmd.
    :meth:`kill` SIGKILLs a node (a crash); :meth:`start_node` brings it back with its data.
    ``start_s`` is the measured wall time from launch to a formed cluster."""

    def __init__(self, workdir: Path, *, nodes: int = 3, mqtt: bool = True) -> None:
        if not rabbitmq_installed():
            raise RuntimeError("rabbitmq-server is not installed; ./dev.sh test installs it")
        self.dir = workdir
        self.mqtt = mqtt
        self.home = workdir / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20))
        cookie.chmod(0o400)
        self.epmd_port = _free_port()
        tag = secrets.token_hex(3)
        self.nodes = [
            RabbitNode(
                index=i,
                name=f"rfl{i + 1}-{tag}@localhost",
                amqp_port=_free_port(),
                mqtt_port=_free_port(),
                dist_port=_free_port(),
                base=workdir / f"node{i + 1}",
            )
            for i in range(nodes)
        ]
        self.start_s = 0.0

    # --- environment ----------------------------------------------------------------------

    def _env(self, node: RabbitNode) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RABBITMQ_", "ERL_")) and k not in ("NOTIFY_SOCKET", "HOME")
        }
        env.update(
            HOME=str(self.home),
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_NODENAME=node.name,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(node.amqp_port),
            RABBITMQ_DIST_PORT=str(node.dist_port),
            RABBITMQ_MNESIA_BASE=str(node.base / "mnesia"),
            RABBITMQ_LOG_BASE=str(node.base / "log"),
            RABBITMQ_PID_FILE=str(node.base / "rabbit.pid"),
            RABBITMQ_CONFIG_FILE=str(node.base / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(node.base / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(node.base / "enabled_plugins"),
            # Our own (empty) env file instead of /etc/rabbitmq/rabbitmq-env.conf, which names
            # the machine's node.
            RABBITMQ_CONF_ENV_FILE=str(node.base / "rabbitmq-env.conf"),
        )
        return env

    def _write_config(self, node: RabbitNode) -> None:
        node.base.mkdir(parents=True, exist_ok=True)
        (node.base / "log").mkdir(exist_ok=True)
        (node.base / "rabbitmq-env.conf").write_text("")
        conf = [
            f"listeners.tcp.default = 127.0.0.1:{node.amqp_port}",
            "loopback_users = none",
            "log.console = false",
            "log.file.level = warning",
            # A 2-core test machine shared by many: never block publishers on a full disk alarm
            # computed for the whole machine.
            "disk_free_limit.absolute = 50MB",
            "vm_memory_high_watermark.relative = 0.2",
            "cluster_partition_handling = pause_minority",
        ]
        if self.mqtt:
            conf += [
                f"mqtt.listeners.tcp.default = 127.0.0.1:{node.mqtt_port}",
                "mqtt.allow_anonymous = true",
                "mqtt.durable_queue_type = quorum",
                "mqtt.retained_message_store = rabbit_mqtt_retained_msg_store_dets",
                "mqtt.prefetch = 64",
            ]
        (node.base / "rabbitmq.conf").write_text("\n".join(conf) + "\n")
        (node.base / "advanced.config").write_text("[].\n")
        plugins = "[rabbitmq_mqtt]." if self.mqtt else "[]."
        (node.base / "enabled_plugins").write_text(plugins + "\n")

    def ctl(self, node: RabbitNode, *args: str, timeout: float = 120.0) -> str:
        """``rabbitmqctl -n NODE args`` against ``node``; raises with its output on failure."""
        proc = subprocess.run(
            [str(RABBIT_BIN / "rabbitmqctl"), "-n", node.name, *args],
            env=self._env(node),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl {' '.join(args)} on {node.name} failed ({proc.returncode}): "
                f"{proc.stdout.decode(errors='replace')[-2000:]}{proc.stderr.decode(errors='replace')[-2000:]}"
            )
        return proc.stdout.decode(errors="replace")

    # --- lifecycle ------------------------------------------------------------------------

    def _launch(self, node: RabbitNode) -> None:
        self._write_config(node)
        with node.log.open("ab") as out:
            node.proc = subprocess.Popen(
                [str(RABBIT_BIN / "rabbitmq-server")],
                env=self._env(node),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: kill() reaches erl's children
            )

    def _await_node(self, node: RabbitNode, deadline: float) -> None:
        while time.monotonic() < deadline:
            if not node.alive():
                raise RuntimeError(f"{node.name} exited during start-up:\n{self.tail(node)}")
            if _listening(node.amqp_port) and (not self.mqtt or _listening(node.mqtt_port)):
                # Listeners are up: the node finished booting (await_startup confirms).
                self.ctl(node, "await_startup", "--timeout", "120")
                return
            time.sleep(0.2)
        raise RuntimeError(f"{node.name} did not start within {START_WITHIN_S:.0f} s:\n{self.tail(node)}")

    def tail(self, node: RabbitNode, n: int = 4000) -> str:
        texts = []
        for p in [node.log, *sorted((node.base / "log").glob("*.log"))]:
            with contextlib.suppress(OSError):
                texts.append(f"--- {p.name} ---\n{p.read_text(errors='replace')[-n:]}")
        return "\n".join(texts)

    def start(self) -> None:
        t0 = time.monotonic()
        deadline = t0 + START_WITHIN_S
        for node in self.nodes:
            self._launch(node)
        for node in self.nodes:
            self._await_node(node, deadline)
        first = self.nodes[0]
        for node in self.nodes[1:]:
            self.ctl(node, "stop_app")
            self.ctl(node, "join_cluster", first.name)
            self.ctl(node, "start_app")
            self.ctl(node, "await_startup", "--timeout", "120")
        if len(self.nodes) > 1:
            status = self.ctl(first, "cluster_status", "--formatter", "json")
            for node in self.nodes:
                if node.name not in status:
                    raise RuntimeError(f"{node.name} missing from the cluster: {status}")
        self.start_s = time.monotonic() - t0

    def start_node(self, node: RabbitNode) -> None:
        """Start a node again after :meth:`kill` (its data dir keeps its cluster membership)."""
        self._launch(node)
        self._await_node(node, time.monotonic() + START_WITHIN_S)

    def kill(self, node: RabbitNode) -> None:
        """SIGKILL the node's whole process group (beam and its helpers): a crash."""
        if node.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.proc.pid, signal.SIGKILL)
            node.proc.wait(30)
            node.proc = None

    def stop(self) -> None:
        for node in self.nodes:
            if node.alive():
                assert node.proc is not None
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.proc.pid, signal.SIGTERM)
        for node in self.nodes:
            if node.proc is not None:
                try:
                    node.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.kill(node)
                node.proc = None
        # The epmd the first node started on our port, and only that one.
        epmd = shutil.which("epmd") or "/usr/lib/erlang/bin/epmd"
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(
                [epmd, "-port", str(self.epmd_port), "-kill"], capture_output=True, timeout=10, check=False
            )

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- queues ---------------------------------------------------------------------------

    def alive_nodes(self) -> list[RabbitNode]:
        return [n for n in self.nodes if n.alive()]

    def quorum_leader(self, queue: str) -> RabbitNode:
        """The node that leads quorum queue ``queue`` now, as a live node reports it."""
        errors = []
        for node in self.alive_nodes():
            try:
                out = self.ctl(node, "list_queues", "-q", "--no-table-headers", "name", "leader", timeout=60)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                errors.append(str(exc))
                continue
            for line in out.splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[0] == queue:
                    for n in self.nodes:
                        if n.name == parts[1]:
                            return n
        raise RuntimeError(f"no leader found for {queue}: {errors}")

    async def declare_events_queue(self, queue: str = "lockgw.events", *, base: str = "lockgw") -> None:
        """The quorum queue central consumes, bound to ``amq.topic`` for every gateway's
        ``B/G/events`` (routing key ``B.*.events``). Idempotent."""
        import aio_pika

        conn = await aio_pika.connect(self.alive_nodes()[0].amqp_url, timeout=30)
        async with conn:
            ch = await conn.channel()
            q = await ch.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
            await q.bind("amq.topic", routing_key=f"{base.replace('/', '.')}.*.events")
