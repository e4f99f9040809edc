"""The daemon's side of the CLI commands (dispatched from the control socket).

Each answer is ``{"ok", "exit", "data"}`` or ``{"ok": false, "exit", "error"}`` with the
contract's exit codes: 0 done, 1 refused or failed, 2 usage, 3 busy or unreachable.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import re
from typing import TYPE_CHECKING, Any, Final

from bleak import BleakScanner

from gateway.ble.links import Priority
from gateway.ble.registry import LockRecord
from gateway.errors import AdapterUnavailable, BleError, PairingFailed
from protocols.event_encoding import INT64_MAX
from protocols.gatt import COMPANY_ID, decode_advert
from protocols.messages import Op, Status

if TYPE_CHECKING:
    from gateway.runtime.app import Gateway

__all__ = ["dispatch"]

MAX_EVENTS: Final = 10_000
MAX_SCAN_S: Final = 60.0
#: Filter strings longer than this are not lock ids, types or subjects (bounds the query).
MAX_FILTER_LEN: Final = 256
_ADDRESS: Final = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")
_TYPE_FILTER: Final = re.compile(r"[a-z_]+(\.[a-z_]+)*(\.\*)?")


def ok(data: Any) -> dict[str, Any]:
    return {"ok": True, "exit": 0, "data": data}


def fail(message: str, *, exit_code: int = 1, code: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"ok": False, "exit": exit_code, "error": message}
    if code:
        out["code"] = code
    return out


def _ble_exit(exc: BleError) -> int:
    """The adapter itself missing is exit 3 (CONTRACT §6); a lock that does not answer, 1."""
    return 3 if isinstance(exc, AdapterUnavailable) else 1


async def dispatch(gw: Gateway, cmd: str, args: dict[str, Any]) -> dict[str, Any]:
    handler = _COMMANDS.get(cmd)
    if handler is None:
        return fail(f"unknown control command {cmd!r}", exit_code=2)
    return await handler(gw, args)


async def _ping(gw: Gateway, _args: dict[str, Any]) -> dict[str, Any]:
    return ok({"gw": gw.config.gateway.id, "pid": os.getpid(), "alarms": gw.alarms()})


async def _locks(gw: Gateway, _args: dict[str, Any]) -> dict[str, Any]:
    return ok((await gw.service.handle("locks", b"{}"))["data"])


async def _status(gw: Gateway, args: dict[str, Any]) -> dict[str, Any]:
    lock = args.get("lock")
    if lock is None:
        # Every paired lock asked now (the link manager's slots bound how many at once); the
        # table shows them all, and the exit code says whether any could not be reached.
        answers = await asyncio.gather(
            *(gw.service.handle("status", json.dumps({"lock": r.lock}).encode()) for r in gw.registry.all())
        )
        listed = await _locks(gw, args)
        unreachable = sum(a["status"] != "ok" for a in answers)
        return {**listed, "exit": 1 if unreachable else 0}
    resp = await gw.service.handle("status", json.dumps({"lock": lock}).encode())
    if resp["status"] == "ok":
        return ok(resp["data"])
    err = resp["error"]
    return fail(err["message"], exit_code=2 if err["code"] == "unknown_lock" else 1, code=err["code"])


async def _request(gw: Gateway, args: dict[str, Any]) -> dict[str, Any]:
    """A contract request (challenge, unlock, lock, …) exactly as MQTT would carry it."""
    action, payload = args.get("action"), args.get("payload")
    if not isinstance(action, str) or not isinstance(payload, dict):
        return fail("request needs an action and a payload object", exit_code=2)
    resp = await gw.service.handle(action, json.dumps(payload).encode())
    if resp["status"] == "ok":
        return {"ok": True, "exit": 0, "data": resp}
    code = resp["error"]["code"]
    # A lock id that names no paired lock is a usage error (2), like a malformed request.
    exit_code = (
        3 if code == "busy" else 2 if code in ("invalid_request", "unknown_action", "unknown_lock") else 1
    )
    return {"ok": False, "exit": exit_code, "error": resp["error"]["message"], "code": code, "data": resp}


async def _events(gw: Gateway, args: dict[str, Any]) -> dict[str, Any]:
    """Filtered history: ``since``, ``limit``, ``lock``, ``type`` (exact, or a prefix such as
    ``access.*``), ``sub``, ``from``/``until`` (event ``ts`` strings, until exclusive). The answer
    carries ``next`` (where a follower continues) and ``receipt_seq`` (central has everything up
    to there)."""
    since = args.get("since", 1)
    limit = args.get("limit", 100)
    if (
        not isinstance(since, int)
        or isinstance(since, bool)
        or not isinstance(limit, int)
        or not 1 <= since <= INT64_MAX
        or not 1 <= limit <= MAX_EVENTS
    ):
        return fail("events takes 1 ≤ since ≤ 2^63-1 and 1 ≤ limit ≤ 10000", exit_code=2)
    filters: dict[str, str | None] = {}
    for key in ("lock", "type", "sub", "from", "until"):
        value = args.get(key)
        if value is not None and (not isinstance(value, str) or not value or len(value) > MAX_FILTER_LEN):
            return fail(f"events: {key} must be a non-empty string", exit_code=2)
        filters[key] = value
    type_glob = filters["type"]
    if type_glob is not None:
        if not _TYPE_FILTER.fullmatch(type_glob):
            return fail("events: type is an event type (access.granted) or a prefix (access.*)", exit_code=2)
        type_glob = type_glob[:-1] + "*" if type_glob.endswith(".*") else type_glob
    events, nxt = await gw.outbox.query(
        since,
        limit=limit,
        lock=filters["lock"],
        type_glob=type_glob,
        sub=filters["sub"],
        ts_from=filters["from"],
        ts_until=filters["until"],
    )
    stats = gw.outbox.stats()
    return ok({"events": events, "next": nxt, "last_seq": stats.last_seq, "receipt_seq": stats.receipt_seq})


async def _trust_show(gw: Gateway, _args: dict[str, Any]) -> dict[str, Any]:
    summary = gw.authz.trust_summary()
    now = gw.authz.time_view().now
    for name in ("keyring", "revocations"):
        doc = summary[name]
        if isinstance(doc, dict):
            doc["days_left"] = round((int(doc["exp"]) - now) / 86400, 1)
    return ok(summary)


async def _trust_install(gw: Gateway, args: dict[str, Any]) -> dict[str, Any]:
    document = args.get("document")
    try:
        if not isinstance(document, str) or not document:
            raise ValueError(document)
        raw = base64.b64decode(document, validate=True)
    except (binascii.Error, ValueError):
        return fail("document must be base64 text", exit_code=2)
    outcome = await gw.service.install(raw)
    data = {
        "kind": outcome.kind,
        "installed": outcome.installed,
        "version": outcome.version,
        "exp": outcome.exp,
    }
    if outcome.rejected:
        return fail(f"{outcome.kind} refused ({outcome.code}): {outcome.message}", code=outcome.code)
    return ok(data)


async def _pair(gw: Gateway, args: dict[str, Any]) -> dict[str, Any]:
    address, code, name = args.get("address"), args.get("code"), args.get("name") or ""
    if not isinstance(address, str) or not isinstance(code, str) or not isinstance(name, str):
        return fail("pair needs an address and a setup code", exit_code=2)
    if not _ADDRESS.fullmatch(address):
        return fail(f"ADDRESS {address[:40]!r} is not a BLE address (AA:BB:CC:DD:EE:FF)", exit_code=2)
    if not code or len(code) > MAX_FILTER_LEN or len(name) > MAX_FILTER_LEN:
        return fail("pair: the setup code and the name are short, non-empty texts", exit_code=2)
    try:
        done = await gw.links.pair(address, code)
    except PairingFailed as exc:
        left = f" ({exc.attempts_left} attempts left)" if exc.attempts_left is not None else ""
        return fail(f"pairing refused: {exc}{left}", code=exc.reason)
    except BleError as exc:
        return fail(f"{address}: {exc}", exit_code=_ble_exit(exc), code=exc.code)
    record = LockRecord(done.lock_id, address, name or done.lock_id, done.ltk)
    gw.registry.put(record)
    await gw.service.event("lock.paired", lock=done.lock_id, data={"address": address, "name": record.name})
    gw._info_changed()  # noqa: SLF001 - the app's own publisher hook
    return ok({"lock": done.lock_id, "address": address, "name": record.name})


async def _unpair(gw: Gateway, args: dict[str, Any]) -> dict[str, Any]:
    lock, force = args.get("lock"), bool(args.get("force", False))
    if not isinstance(lock, str):
        return fail("unpair needs a lock id", exit_code=2)
    record = gw.registry.get(lock)
    if record is None:
        return fail(f"lock {lock} is not paired with this gateway", exit_code=2, code="unknown_lock")
    wiped_on_lock = False
    try:
        # With --force the technician has said the unit is gone: one try, not the full retry run.
        resp = await gw.links.command(
            record, Op.UNPAIR, priority=Priority.INTERACTIVE, attempts=1 if force else None
        )
        wiped_on_lock = resp.status is Status.OK
    except BleError as exc:
        if not force:
            return fail(
                f"cannot reach {lock} to wipe its key ({exc}); use --force only if the unit is gone for good",
                exit_code=_ble_exit(exc),
                code=exc.code,
            )
    gw.registry.remove(lock)
    gw.service.views.pop(lock, None)
    await gw.service.event(
        "lock.unpaired",
        lock=lock,
        data={"forced": force and not wiped_on_lock, "wiped_on_lock": wiped_on_lock},
    )
    gw._info_changed()  # noqa: SLF001
    return ok({"lock": lock, "wiped_on_lock": wiped_on_lock})


async def _scan(gw: Gateway, args: dict[str, Any]) -> dict[str, Any]:
    timeout = args.get("timeout", 5.0)
    if not isinstance(timeout, int | float) or not 0.5 <= timeout <= MAX_SCAN_S:
        return fail("scan timeout must be 0.5..60 s", exit_code=2)
    found: dict[str, dict[str, Any]] = {}

    def seen(device: Any, adv: Any) -> None:
        advert = decode_advert(adv.manufacturer_data.get(COMPANY_ID, b""))
        if advert is None:
            return
        found[advert.lock_id] = {
            "lock": advert.lock_id,
            "address": device.address,
            "rssi": adv.rssi,
            "paired": advert.paired,
            "pairing_mode": advert.pairing_mode,
            "paired_here": gw.registry.get(advert.lock_id) is not None,
        }

    try:
        async with BleakScanner(detection_callback=seen, backend=gw.scanner_backend):
            await asyncio.sleep(float(timeout))
    except Exception as exc:  # noqa: BLE001 - adapter errors of any backend end up here
        return fail(f"scanning failed: {exc}", exit_code=3)
    return ok({"locks": sorted(found.values(), key=lambda d: -int(d["rssi"] or -999))})


async def _doctor(gw: Gateway, _args: dict[str, Any]) -> dict[str, Any]:
    from gateway.cli.doctor import as_json, run_checks  # noqa: PLC0415

    report = as_json(await run_checks(gw, daemon=not gw.direct))
    return {
        "ok": report["ok"],
        "exit": 0 if report["ok"] else 1,
        "data": report,
        **({} if report["ok"] else {"error": "some checks failed"}),
    }


_COMMANDS = {
    "ping": _ping,
    "locks": _locks,
    "status": _status,
    "request": _request,
    "events": _events,
    "trust_show": _trust_show,
    "trust_install": _trust_install,
    "pair": _pair,
    "unpair": _unpair,
    "scan": _scan,
    "doctor": _doctor,
}
