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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

from gateway.authz.keyfiles import check_secret_permissions
from gateway.cli import hostsetup
from gateway.errors import AdapterUnavailable, ConfigError
from gateway.store.outbox import LOW_SPACE_BYTES

if TYPE_CHECKING:
    from gateway.config import Config
    from gateway.store.outbox import OutboxStats
    from protocols.credentials import TimeView

__all__ = ["BrokerLink", "Check", "HealthSnapshot", "run_checks"]

BACKLOG_WARN: Final = 1000


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


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: str  # "pass" | "warn" | "fail"
    detail: str
    fix: str = ""


def _db_check(path: Path) -> str:
    if not path.exists():
        return "absent"
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return str(db.execute("PRAGMA quick_check").fetchone()[0])
    finally:
        db.close()


async def run_checks(gw: HealthSnapshot, *, daemon: bool) -> list[Check]:
    cfg = gw.config
    out: list[Check] = [Check("configuration", "pass", f"{cfg.source} is valid")]
    secrets = [
        (f"mqtt.{k}", getattr(cfg.mqtt, k))
        for k in ("password_file", "key_file")
        if cfg.mqtt and getattr(cfg.mqtt, k)
    ]
    bad = []
    for key, path in secrets:
        try:
            check_secret_permissions(path, key)
        except ConfigError as exc:
            bad.append(str(exc))
    out.append(
        Check(
            "secret file permissions",
            "fail" if bad else "pass",
            "; ".join(bad) or f"{len(secrets)} secret files, 0600",
            "chmod 600 the files named" if bad else "",
        )
    )
    data = cfg.gateway.data_dir
    writable = os.access(data, os.W_OK)
    free = shutil.disk_usage(data).free if data.exists() else 0
    out.append(
        Check(
            "data directory",
            "pass" if writable and free > LOW_SPACE_BYTES else "warn" if writable else "fail",
            f"{data}: {'writable' if writable else 'NOT writable'}, {free // 2**20} MiB free",
            "" if writable else f"chown lockgw {data}",
        )
    )
    results = await asyncio.to_thread(
        lambda: {p.name: _db_check(p) for p in (data / "trust.sqlite3", data / "locks.sqlite3")}
    )
    results["events.sqlite3"] = await gw.outbox_integrity()
    broken = {k: v for k, v in results.items() if v not in ("ok", "absent")}
    out.append(
        Check(
            "database integrity",
            "fail" if broken else "pass",
            ", ".join(f"{k}: {v}" for k, v in results.items()),
            "stop the daemon, keep a copy of the data directory, restore from backup" if broken else "",
        )
    )
    if cfg.ble.backend == "bumble":
        out.append(await _bumble_adapter(gw, cfg.ble.transport, daemon=daemon))
    else:
        present = os.path.exists(f"/sys/class/bluetooth/{cfg.ble.adapter}")  # noqa: PTH110, ASYNC240 - one stat
        out.append(
            Check(
                "BLE adapter",
                "pass" if present else "fail",
                f"{cfg.ble.adapter} {'present' if present else 'not found'}",
                "" if present else "check the dongle / `systemctl status bluetooth`; set [ble] adapter",
            )
        )
        out.append(_bluez_settings())
    if cfg.mqtt is None:
        out.append(Check("broker", "warn", "no [mqtt] section: running offline, events stay in the outbox"))
    elif gw.mqtt is not None:
        ok = gw.mqtt.connected.is_set()
        out.append(
            Check(
                "broker",
                "pass" if ok else "fail",
                f"{cfg.mqtt.url} {'connected' if ok else 'not connected: ' + (gw.mqtt.last_error or '?')}"
                + (" (TLS verified)" if ok and cfg.mqtt.tls else ""),
                "" if ok else "check the broker, the network and (mqtts) the CA file",
            )
        )
    else:
        out.append(await _probe_broker(cfg.mqtt.host_port))
    out += await _unit_network_check(cfg)
    view = gw.time_view()
    out.append(
        Check(
            "time",
            "pass" if str(view.state) == "synced" else "warn",
            f"state {view.state}, floor {view.floor}, clock {view.wall}",
            ""
            if str(view.state) == "synced"
            else "enable NTP (systemd-timesyncd or chrony); unlocks still work",
        )
    )
    summary = gw.trust_summary()
    warn_days = cfg.policy.expiry_warning_days
    for name in ("keyring", "revocations"):
        doc = summary[name]
        if not isinstance(doc, dict):
            out.append(
                Check(
                    name,
                    "fail" if name == "keyring" else "warn",
                    "none installed",
                    "central publishes it on B/S/" + name + " or: lockgw trust install FILE",
                )
            )
            continue
        days = (int(doc["exp"]) - view.now) / 86400
        status = "fail" if days < 0 and name == "keyring" else "warn" if days < warn_days else "pass"
        out.append(
            Check(
                name,
                status,
                f"v{doc['version']}, {days:.1f} days left",
                ""
                if status == "pass"
                else "ask central for a newer one (it keeps working while stale, flagged)",
            )
        )
    stats = gw.outbox_stats()
    out.append(
        Check(
            "outbox",
            "warn" if stats.backlog > BACKLOG_WARN else "pass",
            f"epoch {stats.epoch}: last #{stats.last_seq}, receipted #{stats.receipt_seq}, backlog {stats.backlog}",
            "central is not sending receipts: check its consumer" if stats.backlog > BACKLOG_WARN else "",
        )
    )
    restarting = gw.restarting()
    out.append(
        Check(
            "components",
            "fail" if restarting else "pass",
            f"restarting after a crash: {', '.join(restarting)}" if restarting else "all running",
            "the daemon's log has each crash with its traceback (journalctl -u lockgw)" if restarting else "",
        )
    )
    alarms = gw.alarms()
    out.append(
        Check(
            "alarms",
            "warn" if alarms else "pass",
            ", ".join(alarms) or "none",
            "what each means and what clears it: docs/architecture.md, Alarms" if alarms else "",
        )
    )
    watchdog = os.environ.get("WATCHDOG_USEC")
    out.append(
        Check(
            "systemd watchdog",
            "pass" if watchdog else "warn",
            f"WatchdogSec={int(watchdog) // 10**6} s" if watchdog else "not running under a systemd watchdog",
            "" if watchdog else "install config/lockgw.service (WatchdogSec=20)",
        )
    )
    return out


async def _bumble_adapter(gw: HealthSnapshot, transport: str | None, *, daemon: bool) -> Check:
    try:
        if not await gw.open_adapter():
            return Check("BLE adapter", "pass", "injected BLE backend")
    except AdapterUnavailable as exc:
        return Check(
            "BLE adapter",
            "fail",
            str(exc),
            "start the simulator (lockgw-sim serve) or plug in the dongle; check [ble] transport",
        )
    return Check(
        "BLE adapter",
        "pass",
        f"Bumble transport {transport} open" + (" (held by the daemon)" if daemon else ""),
    )


def _bluez_settings(path: Path = hostsetup.BLUEZ_MAIN_CONF) -> Check:
    """THREATS B8–B10 through the keys BlueZ 5.66 reads (:data:`hostsetup.BLUEZ_WANTED`)."""
    fix = (
        "run packaging/install.sh (or set " + hostsetup.bluez_wanted_text() + "), systemctl restart bluetooth"
    )
    if not path.exists():
        return Check("BlueZ settings", "warn", f"{path} not found", "install bluez; " + fix)
    try:
        wrong = hostsetup.bluez_problems(path.read_text(encoding="utf-8", errors="replace"))
    except configparser.Error as exc:
        return Check("BlueZ settings", "warn", f"{path}: {exc}", "fix the file")
    return Check(
        "BlueZ settings", "warn" if wrong else "pass", ", ".join(wrong) or "hardened", fix if wrong else ""
    )


#: Resolving the broker's name when DNS is down can take long; doctor says so instead of waiting.
RESOLVE_WITHIN_S: Final = 5.0


async def _unit_network_check(cfg: Config) -> list[Check]:
    try:
        async with asyncio.timeout(RESOLVE_WITHIN_S):
            return await asyncio.to_thread(_unit_network, cfg)
    except TimeoutError:
        host = cfg.mqtt.host_port[0] if cfg.mqtt else "?"
        return [
            Check("unit network", "warn", f"{host} did not resolve in {RESOLVE_WITHIN_S:.0f} s", "check DNS")
        ]


def _unit_network(cfg: Config) -> list[Check]:
    """The installed unit's IPAddressAllow= admits the configured broker (no line: no unit)."""
    texts = hostsetup.read_unit_texts()
    if texts is None:
        return []
    result = hostsetup.check_broker_allowed(cfg, texts)
    return [Check("unit network", result.status, result.detail, result.fix)]


async def _probe_broker(host_port: tuple[str, int]) -> Check:
    host, port = host_port
    try:
        async with asyncio.timeout(3):
            _, writer = await asyncio.open_connection(host, port)
        writer.close()
    except (OSError, TimeoutError) as exc:
        return Check(
            "broker", "fail", f"{host}:{port} unreachable ({exc})", "start the broker or fix [mqtt] url"
        )
    return Check("broker", "pass", f"{host}:{port} accepts connections (the daemon is not running)")


def as_json(checks: list[Check]) -> dict[str, Any]:
    return {"ok": not any(c.status == "fail" for c in checks), "checks": [asdict(c) for c in checks]}
