"""The daemon's side of the CLI commands (dispatched from the control socket, or run directly).

A thin adapter: each command checks its arguments, calls one typed use case of the service
(gateway/runtime/service.py) and encodes the answer as ``{"ok", "exit", "data"}`` or
``{"ok": false, "exit", "error"}`` with the contract's exit codes: 0 done, 1 refused or failed,
2 usage, 3 busy or unreachable. It sees the gateway only through :class:`Operations`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import re
from typing import TYPE_CHECKING, Any, Final, Protocol

import structlog
from bleak import BleakScanner

from gateway.cli.doctor import HealthSnapshot, as_json, run_checks
from gateway.errors import AdapterUnavailable, BleError, PairingFailed
from gateway.runtime.service import RequestError, refusal_of
from gateway.wire import LockRequest, parse_model
from protocols.event_encoding import INT64_MAX
from protocols.gatt import COMPANY_ID, decode_advert

if TYPE_CHECKING:
    from bleak.backends.scanner import BaseBleakScanner

    from gateway.runtime.service import Service

__all__ = ["Operations", "dispatch"]

MAX_EVENTS: Final = 10_000
MAX_SCAN_S: Final = 60.0
#: Filter strings longer than this are not lock ids, types or subjects (bounds the query).
MAX_FILTER_LEN: Final = 256
_ADDRESS: Final = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")
_TYPE_FILTER: Final = re.compile(r"[a-z_]+(\.[a-z_]+)*(\.\*)?")


class Operations(HealthSnapshot, Protocol):
    """What the control commands use of a gateway (the runtime's ``Gateway`` is one): its
    service's use cases, its health (for ``ping`` and ``doctor``) and the scanner."""

    @property
    def service(self) -> Service: ...
    @property
    def direct(self) -> bool:
        """A direct CLI command, no daemon."""

    @property
    def scanner_backend(self) -> type[BaseBleakScanner] | None: ...


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


async def dispatch(gw: Operations, cmd: str, args: dict[str, Any]) -> dict[str, Any]:
    handler = _COMMANDS.get(cmd)
    if handler is None:
        return fail(f"unknown control command {cmd!r}", exit_code=2)
    return await handler(gw, args)


async def _ping(gw: Operations, _args: dict[str, Any]) -> dict[str, Any]:
    # links: the link manager's counters and each lock's connected seconds in the last hour
    # (connect on challenge, warm sessions, battery budget; docs/architecture.md).
    links = gw.service.links.report()
    return ok({"gw": gw.config.gateway.id, "pid": os.getpid(), "alarms": gw.alarms(), "links": links})


async def _locks(gw: Operations, _args: dict[str, Any]) -> dict[str, Any]:
    return ok({"locks": [view.as_json() for view in await gw.service.locks()]})


async def _status_of(gw: Operations, lock: object) -> dict[str, Any]:
    with structlog.contextvars.bound_contextvars(action="status", lock=None):
        try:
            view = await gw.service.status(parse_model(LockRequest, {"lock": lock}))
        except Exception as exc:  # noqa: BLE001 - every refusal, and a bug of ours, is an answer
            code, message = refusal_of(exc)
            return fail(message, exit_code=2 if code == "unknown_lock" else 1, code=code)
    return ok(view.as_json())


async def _status(gw: Operations, args: dict[str, Any]) -> dict[str, Any]:
    lock = args.get("lock")
    if lock is not None:
        return await _status_of(gw, lock)
    # Every paired lock asked now (the link manager's slots bound how many at once); the
    # table shows them all, and the exit code says whether any could not be reached.
    answers = await asyncio.gather(*(_status_of(gw, r.lock) for r in gw.service.paired()))
    listed = await _locks(gw, args)
    unreachable = sum(not a["ok"] for a in answers)
    return {**listed, "exit": 1 if unreachable else 0}


async def _request(gw: Operations, args: dict[str, Any]) -> dict[str, Any]:
    """A contract request (challenge, unlock, lock, …) answered as MQTT answers it (CONTRACT §4)."""
    action, payload = args.get("action"), args.get("payload")
    if not isinstance(action, str) or not isinstance(payload, dict):
        return fail("request needs an action and a payload object", exit_code=2)
    resp = await gw.service.answer(action, payload)
    if resp["status"] == "ok":
        return {"ok": True, "exit": 0, "data": resp}
    code = resp["error"]["code"]
    # A lock id that names no paired lock is a usage error (2), like a malformed request.
    exit_code = (
        3 if code == "busy" else 2 if code in ("invalid_request", "unknown_action", "unknown_lock") else 1
    )
    return {"ok": False, "exit": exit_code, "error": resp["error"]["message"], "code": code, "data": resp}


async def _events(gw: Operations, args: dict[str, Any]) -> dict[str, Any]:
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
    events, nxt = await gw.service.history(
        since,
        limit=limit,
        lock=filters["lock"],
        type_glob=type_glob,
        sub=filters["sub"],
        ts_from=filters["from"],
        ts_until=filters["until"],
    )
    stats = gw.outbox_stats()
    return ok({"events": events, "next": nxt, "last_seq": stats.last_seq, "receipt_seq": stats.receipt_seq})


async def _trust_show(gw: Operations, _args: dict[str, Any]) -> dict[str, Any]:
    return ok(gw.service.trust_summary())


async def _trust_install(gw: Operations, args: dict[str, Any]) -> dict[str, Any]:
    document = args.get("document")
    try:
        if not isinstance(document, str) or not document:
            raise ValueError(document)
        raw = base64.b64decode(document, validate=True)
    except (binascii.Error, ValueError):
        return fail("document must be base64 text", exit_code=2)
    outcome = await gw.service.install_trust(raw)
    if outcome.rejected:
        return fail(f"{outcome.kind} refused ({outcome.code}): {outcome.message}", code=outcome.code)
    return ok(
        {"kind": outcome.kind, "installed": outcome.installed, "version": outcome.version, "exp": outcome.exp}
    )


async def _pair(gw: Operations, args: dict[str, Any]) -> dict[str, Any]:
    address, code, name = args.get("address"), args.get("code"), args.get("name") or ""
    if not isinstance(address, str) or not isinstance(code, str) or not isinstance(name, str):
        return fail("pair needs an address and a setup code", exit_code=2)
    if not _ADDRESS.fullmatch(address):
        return fail(f"ADDRESS {address[:40]!r} is not a BLE address (AA:BB:CC:DD:EE:FF)", exit_code=2)
    if not code or len(code) > MAX_FILTER_LEN or len(name) > MAX_FILTER_LEN:
        return fail("pair: the setup code and the name are short, non-empty texts", exit_code=2)
    try:
        record = await gw.service.pair(address, code, name)
    except PairingFailed as exc:
        left = f" ({exc.attempts_left} attempts left)" if exc.attempts_left is not None else ""
        return fail(f"pairing refused: {exc}{left}", code=exc.reason)
    except BleError as exc:
        return fail(f"{address}: {exc}", exit_code=_ble_exit(exc), code=exc.code)
    return ok({"lock": record.lock, "address": address, "name": record.name})


async def _unpair(gw: Operations, args: dict[str, Any]) -> dict[str, Any]:
    lock, force = args.get("lock"), bool(args.get("force", False))
    if not isinstance(lock, str):
        return fail("unpair needs a lock id", exit_code=2)
    try:
        wiped_on_lock = await gw.service.unpair(lock, force=force)
    except RequestError as exc:
        return fail(str(exc), exit_code=2, code=exc.code)
    except BleError as exc:
        return fail(
            f"cannot reach {lock} to wipe its key ({exc}); use --force only if the unit is gone for good",
            exit_code=_ble_exit(exc),
            code=exc.code,
        )
    return ok({"lock": lock, "wiped_on_lock": wiped_on_lock})


async def _scan(gw: Operations, args: dict[str, Any]) -> dict[str, Any]:
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
            "paired_here": gw.service.is_paired(advert.lock_id),
        }

    try:
        async with BleakScanner(detection_callback=seen, backend=gw.scanner_backend):
            await asyncio.sleep(float(timeout))
    except Exception as exc:  # noqa: BLE001 - adapter errors of any backend end up here
        return fail(f"scanning failed: {exc}", exit_code=3)
    return ok({"locks": sorted(found.values(), key=lambda d: -int(d["rssi"] or -999))})


async def _doctor(gw: Operations, _args: dict[str, Any]) -> dict[str, Any]:
    report = as_json(await run_checks(gw, daemon=not gw.direct))
    return {
        "ok": report["ok"],
        "exit": 0 if report["ok"] else 1,
        "data": report,
        **({} if report["ok"] else {"error": "some checks failed"}),
    }


#: The control commands: each name, and the adapter that answers it.
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
