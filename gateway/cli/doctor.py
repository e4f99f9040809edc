"""``lockgw doctor``: a checklist for a gateway that "seems fine" — pass / warn / fail per line,
with the fix for each failure. Any failure makes the command exit 1.

The checks read a :class:`HealthSnapshot`, the narrow view of a gateway they need (the
runtime's ``Gateway`` is one, in the daemon or in a direct command), never the gateway itself."""

from __future__ import annotations

import asyncio
import configparser
import os
import shutil
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

from gateway.authz.keyfiles import check_secret_permissions
from gateway.cli import hostsetup
from gateway.errors import AdapterUnavailable, ConfigError
from gateway.store.outbox import LOW_SPACE_BYTES
from gateway.wire import JsonObject
from protocols.credentials import TimeState

if TYPE_CHECKING:
    from gateway.config import Config
    from gateway.store.outbox import OutboxStats
    from protocols.credentials import TimeView

__all__ = ["CHECKS", "BrokerLink", "Check", "CheckFn", "CheckStatus", "HealthSnapshot", "run_checks"]

BACKLOG_WARN: Final = 1000
#: Resolving the broker's name when DNS is down can take long; doctor says so instead of waiting.
RESOLVE_WITHIN_S: Final = 5.0


class BrokerLink(Protocol):
    """The MQTT bridge as the broker check sees it."""

    @property
    def connected(self) -> asyncio.Event: ...
    @property
    def last_error(self) -> str | None: ...


class HealthSnapshot(Protocol):
    """What the checks read of a gateway."""

    @property
    def config(self) -> Config: ...
    @property
    def mqtt(self) -> BrokerLink | None:
        """The bridge this process runs, if any (None: direct mode, or no ``[mqtt]``)."""

    def alarms(self) -> list[str]: ...
    def restarting(self) -> list[str]:
        """Components restarting after a crash."""

    def time_view(self) -> TimeView: ...
    def trust_summary(self) -> dict[str, object]: ...
    def outbox_stats(self) -> OutboxStats: ...
    async def outbox_integrity(self) -> str: ...
    async def open_adapter(self) -> bool:
        """Open the Bumble host: False when there is none (an injected backend, or BlueZ);
        raises AdapterUnavailable when it does not open."""


class CheckStatus(StrEnum):
    PASS = "pass"  # noqa: S105 - a check outcome, not a password
    WARN = "warn"
    FAIL = "fail"


PASS: Final = CheckStatus.PASS
WARN: Final = CheckStatus.WARN
FAIL: Final = CheckStatus.FAIL


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: CheckStatus
    detail: str
    fix: str = ""


#: One doctor check: reads the snapshot, answers one line or several. ``daemon``: the adapter
#: is held by the daemon this command talks to.
CheckFn = Callable[[HealthSnapshot, bool], Awaitable[Sequence[Check]]]


def _db_check(path: Path) -> str:
    if not path.exists():
        return "absent"
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return str(db.execute("PRAGMA quick_check").fetchone()[0])
    finally:
        db.close()


async def _configuration(gw: HealthSnapshot, _daemon: bool) -> Sequence[Check]:
    return [Check("configuration", PASS, f"{gw.config.source} is valid")]


async def _secret_files(gw: HealthSnapshot, _daemon: bool) -> Sequence[Check]:
    mqtt = gw.config.mqtt
    secrets = [
        (f"mqtt.{k}", getattr(mqtt, k)) for k in ("password_file", "key_file") if mqtt and getattr(mqtt, k)
    ]
    bad = []
    for key, path in secrets:
        try:
            check_secret_permissions(path, key)
        except ConfigError as exc:
            bad.append(str(exc))
    return [
        Check(
            "secret file permissions",
            FAIL if bad else PASS,
            "; ".join(bad) or f"{len(secrets)} secret files, 0600",
            "chmod 600 the files named" if bad else "",
        )
    ]


async def _data_directory(gw: HealthSnapshot, _daemon: bool) -> Sequence[Check]:
    data = gw.config.gateway.data_dir
    writable = os.access(data, os.W_OK)
    free = shutil.disk_usage(data).free if data.exists() else 0
    return [
        Check(
            "data directory",
            PASS if writable and free > LOW_SPACE_BYTES else WARN if writable else FAIL,
            f"{data}: {'writable' if writable else 'NOT writable'}, {free // 2**20} MiB free",
            "" if writable else f"chown lockgw {data}",
        )
    ]


async def _database_integrity(gw: HealthSnapshot, _daemon: bool) -> Sequence[Check]:
    data = gw.config.gateway.data_dir
    results = await asyncio.to_thread(
        lambda: {p.name: _db_check(p) for p in (data / "trust.sqlite3", data / "locks.sqlite3")}
    )
    results["events.sqlite3"] = await gw.outbox_integrity()
    broken = {k: v for k, v in results.items() if v not in ("ok", "absent")}
    return [
        Check(
            "database integrity",
            FAIL if broken else PASS,
            ", ".join(f"{k}: {v}" for k, v in results.items()),
            "stop the daemon, keep a copy of the data directory, restore from backup" if broken else "",
        )
    ]


async def _ble(gw: HealthSnapshot, daemon: bool) -> Sequence[Check]:
    ble = gw.config.ble
    if ble.backend == "bumble":
        return [await _bumble_adapter(gw, ble.transport, daemon=daemon)]
    present = os.path.exists(f"/sys/class/bluetooth/{ble.adapter}")  # noqa: PTH110, ASYNC240 - one stat
    adapter = Check(
        "BLE adapter",
        PASS if present else FAIL,
        f"{ble.adapter} {'present' if present else 'not found'}",
        "" if present else "check the dongle / `systemctl status bluetooth`; set [ble] adapter",
    )
    return [adapter, _bluez_settings()]


async def _broker(gw: HealthSnapshot, _daemon: bool) -> Sequence[Check]:
    cfg = gw.config.mqtt
    if cfg is None:
        return [Check("broker", WARN, "no [mqtt] section: running offline, events stay in the outbox")]
    if gw.mqtt is None:
        return [await _probe_broker(cfg.host_port)]
    ok = gw.mqtt.connected.is_set()
    return [
        Check(
            "broker",
            PASS if ok else FAIL,
            f"{cfg.url} {'connected' if ok else 'not connected: ' + (gw.mqtt.last_error or '?')}"
            + (" (TLS verified)" if ok and cfg.tls else ""),
            "" if ok else "check the broker, the network and (mqtts) the CA file",
        )
    ]


async def _unit_network(gw: HealthSnapshot, _daemon: bool) -> Sequence[Check]:
    """The installed unit's IPAddressAllow= admits the configured broker (no line: no unit)."""
    cfg = gw.config
    try:
        async with asyncio.timeout(RESOLVE_WITHIN_S):
            return await asyncio.to_thread(_unit_network_sync, cfg)
    except TimeoutError:
        host = cfg.mqtt.host_port[0] if cfg.mqtt else "?"
        return [
            Check("unit network", WARN, f"{host} did not resolve in {RESOLVE_WITHIN_S:.0f} s", "check DNS")
        ]


def _unit_network_sync(cfg: Config) -> list[Check]:
    texts = hostsetup.read_unit_texts()
    if texts is None:
        return []
    result = hostsetup.check_broker_allowed(cfg, texts)
    return [Check("unit network", CheckStatus(result.status), result.detail, result.fix)]


async def _time(gw: HealthSnapshot, _daemon: bool) -> Sequence[Check]:
    view = gw.time_view()
    synced = view.state is TimeState.SYNCED
    return [
        Check(
            "time",
            PASS if synced else WARN,
            f"state {view.state}, floor {view.floor}, clock {view.wall}",
            "" if synced else "enable NTP (systemd-timesyncd or chrony); unlocks still work",
        )
    ]


async def _trust_documents(gw: HealthSnapshot, _daemon: bool) -> Sequence[Check]:
    summary = gw.trust_summary()
    now = gw.time_view().now
    warn_days = gw.config.policy.expiry_warning_days
    return [_trust_document(name, summary[name], now, warn_days) for name in ("keyring", "revocations")]


def _trust_document(name: str, doc: object, now: float, warn_days: float) -> Check:
    if not isinstance(doc, dict):
        return Check(
            name,
            FAIL if name == "keyring" else WARN,
            "none installed",
            "central publishes it on B/S/" + name + " or: lockgw trust install FILE",
        )
    days = (int(doc["exp"]) - now) / 86400
    status = FAIL if days < 0 and name == "keyring" else WARN if days < warn_days else PASS
    return Check(
        name,
        status,
        f"v{doc['version']}, {days:.1f} days left",
        "" if status == PASS else "ask central for a newer one (it keeps working while stale, flagged)",
    )


async def _outbox(gw: HealthSnapshot, _daemon: bool) -> Sequence[Check]:
    stats = gw.outbox_stats()
    behind = stats.backlog > BACKLOG_WARN
    return [
        Check(
            "outbox",
            WARN if behind else PASS,
            f"epoch {stats.epoch}: last #{stats.last_seq}, receipted #{stats.receipt_seq}, backlog {stats.backlog}",
            "central is not sending receipts: check its consumer" if behind else "",
        )
    ]


async def _components(gw: HealthSnapshot, _daemon: bool) -> Sequence[Check]:
    restarting = gw.restarting()
    return [
        Check(
            "components",
            FAIL if restarting else PASS,
            f"restarting after a crash: {', '.join(restarting)}" if restarting else "all running",
            "the daemon's log has each crash with its traceback (journalctl -u lockgw)" if restarting else "",
        )
    ]


async def _alarms(gw: HealthSnapshot, _daemon: bool) -> Sequence[Check]:
    alarms = gw.alarms()
    return [
        Check(
            "alarms",
            WARN if alarms else PASS,
            ", ".join(alarms) or "none",
            "what each means and what clears it: docs/architecture.md, Alarms" if alarms else "",
        )
    ]


async def _watchdog(_gw: HealthSnapshot, _daemon: bool) -> Sequence[Check]:
    watchdog = os.environ.get("WATCHDOG_USEC")
    return [
        Check(
            "systemd watchdog",
            PASS if watchdog else WARN,
            f"WatchdogSec={int(watchdog) // 10**6} s" if watchdog else "not running under a systemd watchdog",
            "" if watchdog else "install config/lockgw.service (WatchdogSec=20)",
        )
    ]


#: The checklist, in the order doctor prints it. A new check is one function added here.
CHECKS: Final[tuple[CheckFn, ...]] = (
    _configuration,
    _secret_files,
    _data_directory,
    _database_integrity,
    _ble,
    _broker,
    _unit_network,
    _time,
    _trust_documents,
    _outbox,
    _components,
    _alarms,
    _watchdog,
)


async def run_checks(gw: HealthSnapshot, *, daemon: bool) -> list[Check]:
    """Every check's lines; a check that raises is one failed line (its name, the error) and
    the rest still run: doctor is what a technician runs when something is already wrong."""
    lines: list[Check] = []
    for check in CHECKS:
        try:
            lines += await check(gw, daemon)
        except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
            name = getattr(check, "__name__", "check").strip("_").replace("_", " ")
            lines.append(Check(name, FAIL, f"the check itself failed: {type(exc).__name__}: {exc}"))
    return lines


async def _bumble_adapter(gw: HealthSnapshot, transport: str | None, *, daemon: bool) -> Check:
    try:
        if not await gw.open_adapter():
            return Check("BLE adapter", PASS, "injected BLE backend")
    except AdapterUnavailable as exc:
        return Check(
            "BLE adapter",
            FAIL,
            str(exc),
            "start the simulator (lockgw-sim serve) or plug in the dongle; check [ble] transport",
        )
    return Check(
        "BLE adapter",
        PASS,
        f"Bumble transport {transport} open" + (" (held by the daemon)" if daemon else ""),
    )


def _bluez_settings(path: Path = hostsetup.BLUEZ_MAIN_CONF) -> Check:
    """THREATS B8–B10 through the keys BlueZ 5.66 reads (:data:`hostsetup.BLUEZ_WANTED`)."""
    fix = (
        "run packaging/install.sh (or set " + hostsetup.bluez_wanted_text() + "), systemctl restart bluetooth"
    )
    if not path.exists():
        return Check("BlueZ settings", WARN, f"{path} not found", "install bluez; " + fix)
    try:
        wrong = hostsetup.bluez_problems(path.read_text(encoding="utf-8", errors="replace"))
    except OSError as exc:
        return Check("BlueZ settings", WARN, f"{path}: cannot read: {exc.strerror}", "fix the file")
    except configparser.Error as exc:
        return Check("BlueZ settings", WARN, f"{path}: {exc}", "fix the file")
    return Check(
        "BlueZ settings", WARN if wrong else PASS, ", ".join(wrong) or "hardened", fix if wrong else ""
    )


async def _probe_broker(host_port: tuple[str, int]) -> Check:
    host, port = host_port
    try:
        async with asyncio.timeout(3):
            _, writer = await asyncio.open_connection(host, port)
        writer.close()
    except (OSError, TimeoutError) as exc:
        return Check(
            "broker", FAIL, f"{host}:{port} unreachable ({exc})", "start the broker or fix [mqtt] url"
        )
    return Check("broker", PASS, f"{host}:{port} accepts connections (the daemon is not running)")


def as_json(checks: list[Check]) -> JsonObject:
    """The doctor report's JSON (CONTRACT §6): ``ok`` and one object per check."""
    return {"ok": not any(c.status == FAIL for c in checks), "checks": [asdict(c) for c in checks]}
