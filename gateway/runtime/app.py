"""The gateway runtime: every component an async context manager, started in order, stopped in
reverse, with the background loops owned by one TaskGroup.

Start-up: trust store and authorizer → lock registry → outbox (``gateway.started``) → BLE host
and link manager → service → MQTT bridge (when configured) → background loops → READY.
Shutdown (SIGTERM/SIGINT): background loops stopped, new unlocks refused (``busy``), commands
in flight given ``STOP_GRACE_S`` to finish, ``gateway.stopping`` committed, retained
``{"state": "offline"}`` published, MQTT closed (requests still running are cancelled and each
records ``access.failed`` first), control socket, links, outbox flushed and closed; within 10 s.

Background loops: heartbeat data, housekeeping (status and lock logs, one lock at a time at low
priority), daily ``trust.expiring`` checks, the saved wall clock, time-state changes, pruning and
the systemd watchdog — fed only while the event loop runs, the outbox writer is alive and the
BLE layer is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import os
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Any, Final, Self

from bleak.backends.client import BaseBleakClient
from bleak.backends.scanner import BaseBleakScanner

from gateway import log
from gateway.authz.authorizer import Authorizer, TrustStore, load_root_keys
from gateway.authz.clock import Clock, SystemClock
from gateway.ble.adverts import AdvertWatcher
from gateway.ble.bumble_backend import BumbleHost
from gateway.ble.links import LinkManager, Priority
from gateway.ble.registry import Registry
from gateway.config import Config
from gateway.errors import AdapterUnavailable
from gateway.events import GatewayStarted, GatewayStopping, TimeStateChanged, TrustExpired, TrustExpiring
from gateway.firmware.rollout import Rollouts
from gateway.firmware.staging import Staging
from gateway.firmware.store import FirmwareStore
from gateway.mqtt.bridge import GatewayInfo, Heartbeat, MqttBridge
from gateway.runtime.control import ControlServer
from gateway.runtime.homeassistant import Discovery, LockInfo
from gateway.runtime.metrics import Metrics, MetricsServer, Snapshot
from gateway.runtime.service import LockView, Service
from gateway.runtime.supervisor import Component, Failure, OnFailure, Supervisor
from gateway.runtime.systemd import notify, watchdog_interval_s
from gateway.store.outbox import Outbox, OutboxStats
from gateway.wire import ControlAnswer, JsonObject
from protocols.credentials import Policy, TimeView

__all__ = ["Gateway"]

HOUSEKEEPING_EVERY_S: Final = 300.0  # status + log fetch per lock; adverts trigger earlier refreshes
EXPIRY_CHECK_EVERY_S: Final = 86400.0
SAVE_WALL_EVERY_S: Final = 60.0
PRUNE_EVERY_S: Final = 3600.0
TIME_STATE_EVERY_S: Final = 10.0
ADAPTER_CHECK_S: Final = 10.0
ALARM_LOG_EVERY_S: Final = 5.0
#: On SIGTERM, commands in flight get this long to finish before they are cancelled (each then
#: records access.failed). Leaves room in systemd's and the contract's 10 s for the rest.
STOP_GRACE_S: Final = 3.0


_log = log.get("gateway")


def _exit_reason(exc: tuple[object, ...]) -> str:
    error = exc[1] if len(exc) > 1 else None
    return "signal" if error is None else f"{type(error).__name__}: {error}"


def _version() -> str:
    try:
        return pkg_version("lockgw")
    except Exception:  # noqa: BLE001 - running from a source tree
        return "0+unknown"


@dataclass
class Gateway:
    config: Config
    clock: Clock = field(default_factory=SystemClock)
    #: Injected BLE: bleak backend classes (tests) — else from ``[ble]`` (BlueZ or a Bumble transport).
    ble_backend: type[BaseBleakClient] | None = None
    scanner_backend: type[BaseBleakScanner] | None = None
    watch_adverts: bool = True
    #: A CLI command run without a daemon: no MQTT, no background loops, no control socket.
    direct: bool = False
    #: The Bumble host, when ``[ble] backend = "bumble"`` (doctor asks it whether it opens).
    ble_host: BumbleHost | None = field(init=False, default=None)
    heartbeat_s: float = 60.0
    republish_after_s: float = 60.0
    housekeeping_s: float = HOUSEKEEPING_EVERY_S
    started_at: int = 0
    authz: Authorizer = field(init=False)
    registry: Registry = field(init=False)
    outbox: Outbox = field(init=False)
    rollouts: Rollouts = field(init=False)
    links: LinkManager = field(init=False)
    service: Service = field(init=False)
    mqtt: MqttBridge | None = field(init=False, default=None)
    #: What answers the control socket (``gateway.cli.commands.dispatch``, injected by the
    #: CLI so that this layer never imports the one above it); None: no control socket.
    control_handler: Callable[[Gateway, str, JsonObject], Awaitable[JsonObject]] | None = None
    #: ``lockgw doctor``'s checks for the MQTT ``doctor`` action (``gateway.cli.commands.doctor_report``,
    #: injected by the CLI for the same reason); None: the action answers ``unknown_action``.
    diagnostics: Callable[[Gateway], Awaitable[dict[str, Any]]] | None = None
    #: Direct mode for a reader (``events``, ``locks``): no lock on the data directory at all, so
    #: a technician's ``events --follow`` never keeps the daemon from starting.
    readonly: bool = False
    supervisor: Supervisor | None = field(init=False, default=None)
    #: Prometheus series (``[metrics] enabled``; never in direct mode).
    metrics: Metrics | None = field(init=False, default=None)
    #: Home Assistant discovery (``[homeassistant] discovery``, with ``[mqtt]``).
    discovery: Discovery | None = field(init=False, default=None)
    _announced: set[str] = field(init=False, default_factory=set)
    _stack: contextlib.AsyncExitStack = field(init=False, default_factory=contextlib.AsyncExitStack)
    _adapter_error: str | None = field(init=False, default=None)
    _last_time_state: str = field(init=False, default="")
    _control_error: str | None = field(init=False, default=None)

    async def __aenter__(self) -> Self:
        cfg, gw = self.config, self.config.gateway
        data = gw.data_dir
        stack = self._stack
        await stack.__aenter__()
        try:
            if not self.direct:
                stack.enter_context(_exclusive(data / ".lock", "another lockgw daemon"))
            elif not self.readonly:
                # A direct command that drives the adapter or writes events: the data directory
                # for the length of the command (seconds). A daemon starting meanwhile exits and
                # systemd starts it again; readers take no lock at all.
                stack.enter_context(_exclusive(data / ".lock", "the daemon"))
            else:
                _daemon_absent(data / ".lock")
            policy = Policy(**cfg.policy.model_dump())
            self.authz = Authorizer(
                gw_id=gw.id,
                site=gw.site,
                roots=load_root_keys(cfg.trust.root_keys),
                policy=policy,
                store=TrustStore(data / "trust.sqlite3"),
                clock=self.clock,
            )
            stack.callback(self.authz.close)
            self.registry = Registry(data / "locks.sqlite3")
            stack.callback(self.registry.close)
            self.outbox = await stack.enter_async_context(
                Outbox(data / "events.sqlite3", gw=gw.id, site=gw.site, wall=self.clock.wall)
            )
            backend = self.ble_backend
            if backend is None and cfg.ble.backend == "bumble":
                assert cfg.ble.transport is not None
                # Lazy: the daemon and the CLI start without the dongle or simulator (events,
                # MQTT, doctor); connects and scans open it, and recover when it comes.
                host = await stack.enter_async_context(BumbleHost(transport=cfg.ble.transport, lazy=True))
                self.ble_host = host
                backend = host.client_backend()
                self.scanner_backend = self.scanner_backend or host.scanner_backend()
            self.links = await stack.enter_async_context(
                LinkManager(
                    gw_id=gw.id,
                    backend=backend,
                    max_connections=cfg.ble.max_connections,
                    hold_s=cfg.ble.connect_on_challenge_s,
                    warm_s=cfg.ble.warm_s,
                    budget_s_per_hour=cfg.ble.battery_budget_s_per_hour,
                )
            )
            self.service = Service(
                gw.id,
                gw.site,
                self.authz,
                self.outbox,
                self.registry,
                self.links,
                on_lock_state=self._lock_state_changed,
                on_info_changed=self._info_changed,
            )
            await self._firmware(data)
            self.started_at = int(self.clock.wall())
            if self.direct:
                return self
            await self.service.event(GatewayStarted(version=_version(), alarms=tuple(self.authz.alarms)))
            await self._announce_expiries()
            self._operations_features()
            if cfg.mqtt is not None:
                self.mqtt = MqttBridge(
                    cfg.mqtt,
                    gw_id=gw.id,
                    site=gw.site,
                    outbox=self.outbox,
                    handle_request=self.service.handle,
                    install=self.service.install_trust,
                    info=self.info,
                    heartbeat=self.heartbeat,
                    lock_states=lambda: [v.as_json() for v in self.service.views.values()],
                    retained=self._discovery_configs if self.discovery is not None else None,
                    heartbeat_s=self.heartbeat_s,
                    republish_after_s=self.republish_after_s,
                    mono=self.clock.mono,
                )
                self.service.replay_sink = self.mqtt.publish_replayed
            self.supervisor = await stack.enter_async_context(Supervisor(self._components()))
            try:
                if self.control_handler is not None:
                    await stack.enter_async_context(ControlServer(cfg.control.socket, self.control))
            except OSError as exc:
                # Doors keep opening without the CLI: run on, alarm.
                self._control_error = f"control socket {cfg.control.socket}: {exc.strerror or exc}"
            resumed = await self.rollouts.resume()  # a rollout the daemon was running goes on
            if resumed:
                _log.info("firmware_rollouts_resumed", rollouts=resumed)
        except BaseException:
            await stack.aclose()
            raise
        notify("READY=1", f"STATUS={self.status_line()}")
        return self

    async def _firmware(self, data: Path) -> None:
        """Rollouts (``DATA/firmware.sqlite3``) and the image staging (``DATA/firmware/staging``)."""
        stack, service = self._stack, self.service
        store = await stack.enter_async_context(FirmwareStore(data / "firmware.sqlite3"))
        self.rollouts = await stack.enter_async_context(
            Rollouts(
                store,
                self.links,
                site=self.config.gateway.site,
                lookup=self.registry.get,
                keys=lambda: self.authz.core.firmware_keys(int(self.clock.wall())),
                emit=service.event,
                clock=self.clock.wall,
                on_firmware=service.firmware_changed,
                autostart=not self.direct,
            )
        )
        service.firmware = self.rollouts
        service.staging = await stack.enter_async_context(Staging(data / "firmware" / "staging"))

    def _operations_features(self) -> None:
        """The daemon's optional extras: remote ``doctor``, metrics, Home Assistant discovery."""
        cfg = self.config
        if self.diagnostics is not None:
            self.service.diagnose = functools.partial(self.diagnostics, self)
        if cfg.metrics.enabled:
            self.metrics = self.service.metrics = Metrics()
        if cfg.mqtt is not None and cfg.homeassistant.discovery:
            self.discovery = Discovery(
                gw=cfg.gateway.id,
                base_topic=cfg.mqtt.base_topic,
                prefix=cfg.homeassistant.prefix,
                version=_version(),
            )
            self.service.on_access = self._accessed

    async def __aexit__(self, *exc: object) -> None:
        if self.direct:
            await self._stack.aclose()
            return
        notify("STOPPING=1", "STATUS=stopping")
        _log.info("stopping", reason=_exit_reason(exc))
        sup = self.supervisor
        if sup is not None:
            # Everything but the MQTT bridge, which still has the stopping event to publish.
            await sup.stop([name for name in sup.names() if name != "mqtt"])
        # Unlocks in flight get a grace period to finish; the rest are cancelled by their owners
        # (MQTT bridge, control socket) and each records access.failed before it ends.
        interrupted = await self.service.quiesce(STOP_GRACE_S)
        with contextlib.suppress(Exception):
            await self.service.event(GatewayStopping(interrupted_commands=interrupted))
        if self.mqtt is not None:
            # Give the drain a moment to publish the stopping event, then say offline.
            if self.mqtt.connected.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2):
                        await self.mqtt.wait_drained(self.outbox.stats().last_seq)
            await self.mqtt.close(graceful=True)
        await self._stack.aclose()
        _log.info("stopped")

    # --- published state --------------------------------------------------------------------

    def info(self) -> GatewayInfo:
        summary = self.authz.trust_summary()
        kr, rl = summary["keyring"], summary["revocations"]
        return {
            "gw": self.config.gateway.id,
            "site": self.config.gateway.site,
            "version": _version(),
            "started_at": self.started_at,
            "epoch": self.outbox.epoch,
            "locks": [r.lock for r in self.registry.all()],
            "keyring_version": kr["version"] if isinstance(kr, dict) else None,
            "keyring_exp": kr["exp"] if isinstance(kr, dict) else None,
            "revocations_version": rl["version"] if isinstance(rl, dict) else None,
            "revocations_exp": rl["exp"] if isinstance(rl, dict) else None,
            "time_state": str(self.authz.time_view().state),
        }

    def heartbeat(self) -> Heartbeat:
        stats = self.outbox.stats()
        return {
            "ts": int(self.clock.wall()),
            "epoch": stats.epoch,
            "last_seq": stats.last_seq,
            "receipt_seq": stats.receipt_seq,
            "backlog": stats.backlog,
            "time_state": str(self.authz.time_view().state),
            "alarms": self.alarms(),
        }

    def alarms(self) -> list[str]:
        out = set(self.authz.alarms) | set(self.outbox.alarms)
        if self._control_error:
            out.add("control_socket_unavailable")
        if self._adapter_error:
            out.add("ble_adapter_unavailable")
        if self.supervisor is not None:
            out.update(f"{name}_restarting" for name in self.supervisor.restarting())
        if self.mqtt is not None:
            if not self.mqtt.connected.is_set():
                out.add("mqtt_disconnected")
            if self.mqtt.receipts_stalled():
                out.add("receipts_stalled")
        return sorted(out)

    # --- health, for doctor and the control commands (their narrow Protocols) -----------------

    def restarting(self) -> list[str]:
        """Components restarting after a crash (none in direct mode: no supervisor)."""
        return self.supervisor.restarting() if self.supervisor is not None else []

    def time_view(self) -> TimeView:
        return self.authz.time_view()

    def trust_summary(self) -> dict[str, object]:
        return self.authz.trust_summary()

    def outbox_stats(self) -> OutboxStats:
        return self.outbox.stats()

    async def outbox_integrity(self) -> str:
        return await self.outbox.integrity_check()

    async def open_adapter(self) -> bool:
        """Open the Bumble host; False when there is none (an injected backend, or BlueZ)."""
        if self.ble_host is None:
            return False
        await self.ble_host.open()
        return True

    def _lock_state_changed(self, view: LockView) -> None:
        if self.mqtt is not None:
            self._spawn(self.mqtt.publish_lock_state(view.as_json()))

    def _info_changed(self) -> None:
        if self.mqtt is not None:
            self._spawn(self.mqtt.publish_info())
            if self.discovery is not None:
                self._spawn(self._sync_discovery())

    # --- Home Assistant discovery (gateway/runtime/homeassistant.py) ----------------------------

    def _discovery_configs(self) -> dict[str, str]:
        """Every paired lock's discovery configs; what was announced is remembered, so that an
        unpaired lock's entities are removed (:meth:`_sync_discovery`)."""
        assert self.discovery is not None
        records = self.registry.all()
        self._announced |= {r.lock for r in records}
        views = self.service.views
        return self.discovery.encoded(
            LockInfo(r.lock, r.name, views[r.lock].firmware if r.lock in views else None) for r in records
        )

    async def _sync_discovery(self) -> None:
        assert self.discovery is not None
        assert self.mqtt is not None
        gone = self._announced - {r.lock for r in self.registry.all()}
        for topic, payload in self._discovery_configs().items():
            await self.mqtt.publish_retained(topic, payload)
        for lock in sorted(gone):
            for topic in self.discovery.removals(lock):
                await self.mqtt.publish_retained(topic, "")
            await self.mqtt.publish_retained(self.discovery.last_access_topic(lock), "")
            self._announced.discard(lock)

    def _accessed(self, lock: str, action: str) -> None:
        if self.discovery is None or self.mqtt is None:
            return
        ts = datetime.fromtimestamp(self.clock.wall(), UTC).isoformat(timespec="seconds")
        body = json.dumps({"lock": lock, "action": action, "ts": ts}, sort_keys=True)
        self._spawn(self.mqtt.publish_retained(self.discovery.last_access_topic(lock), body))

    def _spawn(self, coro: Any) -> None:
        if self.supervisor is not None:
            self.supervisor.spawn(coro, "publish")
        else:
            coro.close()

    def _components(self) -> list[Component]:
        """What the supervisor runs, and what each one's failure means (gateway/runtime/supervisor.py)."""
        out = [
            Component("outbox", self._outbox_watch, OnFailure.STOP),
            Component("housekeeping", self._housekeeping),
            Component("expiry", self._expiry_loop),
            Component("wall-clock", self._wall_clock_loop),
            Component("prune", self._prune_loop),
            Component("time-state", self._time_state_loop),
            Component("adapter", self._adapter_loop),
            Component("alarms", self._alarm_log_loop),
            Component("watchdog", self._watchdog_loop),
        ]
        # Watch adverts with the configured stack; with an injected client backend (tests),
        # only when a matching scanner backend is injected too.
        if self.watch_adverts and (self.scanner_backend is not None or self.ble_backend is None):
            watcher = AdvertWatcher(
                known=lambda lock: self.registry.get(lock) is not None,
                refresh=self._refresh_lock,
                on_rssi=self._saw_rssi,
                backend=self.scanner_backend,
                clock=self.clock.mono,
            )
            out.append(Component("adverts", watcher.run))
        if self.mqtt is not None:
            out.append(Component("mqtt", self.mqtt.run))
        if self.metrics is not None:
            server = MetricsServer(self.config.metrics.listen, self.metrics, self.metrics_snapshot)
            out.append(Component("metrics", server.run))
        return out

    async def metrics_snapshot(self) -> Snapshot:
        """The state gauges' values now (gateway/runtime/metrics.py), read before each scrape."""
        stats = self.outbox.stats()
        view = self.authz.time_view()
        lag = 0.0
        if stats.backlog > 0:
            oldest = await self.outbox.read(stats.receipt_seq + 1, limit=1)
            if oldest:
                ts = datetime.fromisoformat(str(oldest[0]["ts"]))
                lag = max(0.0, self.clock.wall() - ts.timestamp())
        in_use, slots, waiting = self.links.occupancy()
        core = self.authz.core
        expiry: dict[str, float] = {}
        if core.keyring is not None:
            expiry["keyring"] = (core.keyring.exp - view.now) / 86400
            keys = [key.exp for key in core.keyring.keys.values()]
            if keys:
                expiry["key"] = (min(keys) - view.now) / 86400
        if core.revocations is not None:
            expiry["revocations"] = (core.revocations.exp - view.now) / 86400
        views = self.service.views.values()
        return Snapshot(
            last_seq=stats.last_seq,
            receipt_seq=stats.receipt_seq,
            receipt_lag_s=lag,
            slots_in_use=in_use,
            slots=slots,
            queue_depth=waiting,
            locks=len(self.registry.all()),
            locks_available=sum(1 for v in views if v.available),
            trust_expiry_days=expiry,
            time_state=str(view.state),
            alarms=tuple(self.alarms()),
            mqtt_connected=self.mqtt.connected.is_set() if self.mqtt is not None else None,
        )

    @property
    def failed(self) -> asyncio.Future[Failure]:
        """Resolves when a component whose failure stops the daemon failed (exit 1)."""
        assert self.supervisor is not None, "the daemon's supervisor runs only outside direct mode"
        return self.supervisor.failure

    def healthy(self) -> bool:
        """What the watchdog is fed on: the event loop runs (we are here), the outbox's writer is
        alive, the link manager is up and the BLE adapter is reachable."""
        return self.outbox.healthy and self.links.healthy and self._adapter_error is None

    async def _refresh_lock(self, lock: str) -> None:
        record = self.registry.get(lock)
        if record is not None:
            await self.service.refresh(record, priority=Priority.HOUSEKEEPING)

    def _saw_rssi(self, lock: str, rssi: int) -> None:
        view = self.service.views.get(lock)
        if view is not None:
            view.rssi = rssi

    # --- the control socket ---------------------------------------------------------------

    async def control(self, cmd: str, args: JsonObject) -> JsonObject:
        """Commands from ``lockgw`` while the daemon runs (gateway/runtime/control.py), answered by the
        injected ``control_handler`` (gateway/cli/commands.py: the CLI layer, above this one)."""
        if self.control_handler is None:
            return ControlAnswer.refused("this gateway serves no control commands", exit_code=2).as_json()
        return await self.control_handler(self, cmd, args)

    # --- loops ------------------------------------------------------------------------------

    async def _announce_expiries(self) -> None:
        for exp in self.authz.expiring():
            kind = TrustExpired if exp.days_left <= 0 else TrustExpiring
            await self.service.event(
                kind(what=exp.what, ident=exp.ident, exp=exp.exp, days_left=exp.days_left)
            )

    async def _expiry_loop(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_CHECK_EVERY_S)
            await self._announce_expiries()

    async def _housekeeping(self) -> None:
        while True:
            for record in self.registry.all():
                with contextlib.suppress(Exception):
                    await self.service.refresh(record, priority=Priority.HOUSEKEEPING)
            await asyncio.sleep(self.housekeeping_s)

    async def _wall_clock_loop(self) -> None:
        while True:
            self.authz.save_wall_clock()
            await asyncio.sleep(SAVE_WALL_EVERY_S)

    async def _prune_loop(self) -> None:
        while True:
            await self.outbox.prune()
            await asyncio.sleep(PRUNE_EVERY_S)

    async def _time_state_loop(self) -> None:
        while True:
            state = str(self.authz.time_view().state)
            if state != self._last_time_state:
                if self._last_time_state:
                    await self.service.event(TimeStateChanged(before=self._last_time_state, after=state))
                    self._info_changed()
                self._last_time_state = state
            await asyncio.sleep(TIME_STATE_EVERY_S)

    async def _alarm_log_loop(self) -> None:
        """One log line for every alarm raised and every alarm cleared (seen within
        ``ALARM_LOG_EVERY_S``), whichever component holds it."""
        active: set[str] = set()
        shown = ""
        while True:
            now = set(self.alarms())
            for alarm in sorted(now - active):
                _log.warning("alarm_raised", alarm=alarm)
            for alarm in sorted(active - now):
                _log.info("alarm_cleared", alarm=alarm)
            active = now
            if (status := self.status_line()) != shown:
                notify(f"STATUS={status}")  # `systemctl status lockgw` shows it
                shown = status
            await asyncio.sleep(ALARM_LOG_EVERY_S)

    def status_line(self) -> str:
        """One line for sd_notify's ``STATUS=``: locks, backlog, alarms (kept current every
        ``ALARM_LOG_EVERY_S``)."""
        stats = self.outbox.stats()
        alarms = self.alarms()
        return f"serving {len(self.registry.all())} locks; backlog {stats.backlog} of #{stats.last_seq}; " + (
            f"alarms: {', '.join(alarms)}" if alarms else "no alarms"
        )

    async def _outbox_watch(self) -> None:
        raise await self.outbox.wait_failed()

    async def _adapter_loop(self) -> None:
        """Is the BLE adapter there and answering? Tried every ``ADAPTER_CHECK_S`` (a lazy Bumble
        host opens now, so a missing dongle or simulator is seen before a door needs it), with
        a health probe (an HCI command bounded to 2 s), so a stalled controller raises
        ``ble_adapter_unavailable`` and starves the watchdog; the same check re-opens a host
        whose transport dropped or whose controller answers again after a stall."""
        host = self.ble_host
        if host is None:
            if self.ble_backend is None and self.config.ble.backend == "bluez":
                await self._bluez_adapter_loop()
            return  # an injected backend (tests): it reports its own failures per call
        while True:
            try:
                await host.check()
            except AdapterUnavailable as exc:
                if self._adapter_error is None:
                    _log.error("adapter_unavailable", reason=str(exc))
                self._adapter_error = str(exc)
            else:
                if self._adapter_error is not None:
                    _log.info("adapter_available_again")
                self._adapter_error = None
            # Early when an HCI command went unanswered (a stall seen by a request).
            await host.wait_suspect(ADAPTER_CHECK_S)

    async def _bluez_adapter_loop(self) -> None:
        """With BlueZ: the adapter is there while the kernel lists it (``/sys/class/bluetooth/hciN``;
        a USB dongle pulled, a UART adapter that failed to come up). Its loss is
        ``ble_adapter_unavailable`` and starves the watchdog, as with Bumble; bleak still
        reports per call whatever else goes wrong under BlueZ."""
        node = Path("/sys/class/bluetooth") / self.config.ble.adapter
        while True:
            present = await asyncio.to_thread(node.exists)
            if not present and self._adapter_error is None:
                self._adapter_error = f"{self.config.ble.adapter}: not present ({node} is missing)"
                _log.error("adapter_unavailable", reason=self._adapter_error)
            elif present and self._adapter_error is not None:
                _log.info("adapter_available_again")
                self._adapter_error = None
            await asyncio.sleep(ADAPTER_CHECK_S)

    async def _watchdog_loop(self) -> None:
        interval = watchdog_interval_s()
        if interval is None:
            return
        fed = True
        while True:
            if self.healthy():
                notify("WATCHDOG=1")
                if not fed:
                    _log.info("watchdog_fed_again")
                fed = True
            elif fed:
                _log.error("watchdog_starved", outbox=self.outbox.healthy, adapter=self._adapter_error)
                fed = False
            await asyncio.sleep(interval)


def _daemon_absent(path: Path) -> None:
    """A reader in direct mode: refuse (exit 3, use the socket) only while a daemon holds the
    directory; hold nothing, so a daemon that starts later wins at once."""
    if not path.exists():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        raise AdapterUnavailable(
            f"{path.parent} is in use by the daemon (pid {other}); run the command through it"
        ) from exc
    finally:
        os.close(fd)


@contextlib.contextmanager
def _exclusive(path: Path, holder: str) -> Iterator[None]:
    """One process drives the adapter and the databases: an exclusive lock on the data dir."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise AdapterUnavailable(
                f"{path.parent} is in use by {holder} (pid {other}); stop it or run the command through it"
            ) from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)
