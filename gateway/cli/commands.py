"""The daemon's side of the CLI commands (dispatched from the control socket, or run directly).

A thin adapter: :func:`dispatch` parses a command's arguments once into its strict model
(``PairArgs``, ``EventsArgs``, …; the command table ``_COMMANDS``), the command calls one typed
use case of the service (gateway/runtime/service.py) and answers a :class:`ControlAnswer`
(gateway/wire.py), encoded once as ``{"ok", "exit", "data"}`` or ``{"ok": false, "exit",
"error"}`` with the contract's exit codes: 0 done, 1 refused or failed, 2 usage, 3 busy or
unreachable. It sees the gateway only through :class:`Operations`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Final, Generic, Protocol, TypeVar, cast

import structlog
from bleak import BleakScanner
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from gateway.cli.doctor import HealthSnapshot, as_json, run_checks
from gateway.errors import AdapterUnavailable, BleError, PairingFailed
from gateway.runtime.service import RequestError, refusal_of
from gateway.wire import (
    MAX_EVENTS_PAGE,
    SCAN_S_MAX,
    SCAN_S_MIN,
    ControlAnswer,
    JsonObject,
    LockId,
    LockRequest,
    first_error,
)
from protocols.event_encoding import INT64_MAX
from protocols.gatt import COMPANY_ID, decode_advert

if TYPE_CHECKING:
    from bleak.backends.scanner import BaseBleakScanner

    from gateway.runtime.service import Service

__all__ = [
    "EventsArgs",
    "NoArgs",
    "Operations",
    "PairArgs",
    "RequestArgs",
    "ScanArgs",
    "StatusArgs",
    "TrustInstallArgs",
    "UnpairArgs",
    "dispatch",
    "doctor_report",
]

#: Filter strings longer than this are not lock ids, types or subjects (bounds the query).
MAX_FILTER_LEN: Final = 256
_ADDRESS: Final = r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$"
_TYPE_FILTER: Final = r"^[a-z_]+(\.[a-z_]+)*(\.\*)?$"


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


def _ble_exit(exc: BleError) -> int:
    """The adapter itself missing is exit 3 (CONTRACT §6); a lock that does not answer, 1."""
    return 3 if isinstance(exc, AdapterUnavailable) else 1


# --- each command's arguments, parsed once (dispatch) --------------------------------------------


class _Args(BaseModel):
    """A command's ``args`` (strict; unknown keys ignored). Arguments that do not parse are
    answered by :meth:`refusal` — a usage error (exit 2) with ``USAGE`` unless a command says
    more precisely what is wrong."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)
    USAGE: ClassVar[str] = "malformed arguments"

    @classmethod
    def refusal(cls, _exc: ValidationError) -> ControlAnswer:
        return ControlAnswer.refused(cls.USAGE, exit_code=2)


class NoArgs(_Args):
    pass


def _or_empty(value: object) -> object:
    return value or ""


def _base64(value: object) -> bytes:
    if not isinstance(value, str) or not value:
        raise ValueError("not base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise ValueError("not base64 text") from exc


_Filter = Annotated[str, Field(min_length=1, max_length=MAX_FILTER_LEN)]


class StatusArgs(_Args):
    """``status``: one lock, or (no ``lock``) every paired lock."""

    lock: LockId | None = None

    @classmethod
    def refusal(cls, exc: ValidationError) -> ControlAnswer:
        # A malformed lock id is refused as the service refuses it (CONTRACT §4: invalid_request).
        return ControlAnswer.refused(first_error(exc), code="invalid_request")


class RequestArgs(_Args):
    """``request``: a contract request (CONTRACT §4), answered as MQTT answers it."""

    USAGE: ClassVar[str] = "request needs an action and a payload object"
    action: str
    payload: JsonObject


class EventsArgs(_Args):
    """``events``: ``since``, ``limit``, and the filters ``lock``, ``type`` (exact, or a prefix
    such as ``access.*``), ``sub``, ``from``/``until`` (event ``ts`` strings, until exclusive)."""

    FILTERS: ClassVar[tuple[str, ...]] = ("lock", "type", "sub", "from", "until")
    since: Annotated[int, Field(ge=1, le=INT64_MAX)] = 1
    limit: Annotated[int, Field(ge=1, le=MAX_EVENTS_PAGE)] = 100
    lock: _Filter | None = None
    type: Annotated[_Filter | None, Field(pattern=_TYPE_FILTER)] = None
    sub: _Filter | None = None
    ts_from: Annotated[_Filter | None, Field(alias="from")] = None
    ts_until: Annotated[_Filter | None, Field(alias="until")] = None

    @classmethod
    def refusal(cls, exc: ValidationError) -> ControlAnswer:
        errors = exc.errors(include_url=False, include_input=False)
        where = {str(e["loc"][0]): e["type"] for e in errors if e["loc"]}
        if "since" in where or "limit" in where:
            message = f"events takes 1 ≤ since ≤ 2^63-1 and 1 ≤ limit ≤ {MAX_EVENTS_PAGE}"
        else:
            bad = next(
                (
                    k
                    for k in cls.FILTERS
                    if where.get(k, "string_pattern_mismatch") != "string_pattern_mismatch"
                ),
                None,
            )
            message = (
                f"events: {bad} must be a non-empty string"
                if bad is not None
                else "events: type is an event type (access.granted) or a prefix (access.*)"
            )
        return ControlAnswer.refused(message, exit_code=2)

    def type_glob(self) -> str | None:
        """``type`` as the outbox's glob: ``access.*`` → ``access.*`` prefix match."""
        if self.type is None:
            return None
        return self.type[:-1] + "*" if self.type.endswith(".*") else self.type


class TrustInstallArgs(_Args):
    USAGE: ClassVar[str] = "document must be base64 text"
    document: Annotated[bytes, BeforeValidator(_base64)]


class PairArgs(_Args):
    address: Annotated[str, Field(pattern=_ADDRESS)]
    code: Annotated[str, Field(min_length=1, max_length=MAX_FILTER_LEN)]
    name: Annotated[str, BeforeValidator(_or_empty), Field(max_length=MAX_FILTER_LEN)] = ""

    @classmethod
    def refusal(cls, exc: ValidationError) -> ControlAnswer:
        errors = exc.errors(include_url=False)
        if any(e["type"] in ("string_type", "missing") for e in errors):
            message = "pair needs an address and a setup code"
        elif address := next((e for e in errors if e["loc"] == ("address",)), None):
            message = f"ADDRESS {str(address['input'])[:40]!r} is not a BLE address (AA:BB:CC:DD:EE:FF)"
        else:
            message = "pair: the setup code and the name are short, non-empty texts"
        return ControlAnswer.refused(message, exit_code=2)


def _flag(value: object) -> object:
    """A JSON flag: true/false, 1/0 or null (absent). Not any truthy value: ``"false"``
    forcing an unpair would be a state change made by bad input."""
    if value is None:
        return False
    if type(value) is int and value in (0, 1):
        return bool(value)
    return value  # a bool passes; anything else is refused by the strict bool


class UnpairArgs(_Args):
    USAGE: ClassVar[str] = "unpair needs a lock id"
    lock: str
    force: Annotated[bool, BeforeValidator(_flag)] = False

    @classmethod
    def refusal(cls, exc: ValidationError) -> ControlAnswer:
        if all(e["loc"] == ("force",) for e in exc.errors(include_url=False)):
            return ControlAnswer.refused("unpair: force is true or false", exit_code=2)
        return ControlAnswer.refused(cls.USAGE, exit_code=2)


class ScanArgs(_Args):
    USAGE: ClassVar[str] = f"scan timeout must be {SCAN_S_MIN:g}..{SCAN_S_MAX:g} s"
    timeout: Annotated[float, Field(ge=SCAN_S_MIN, le=SCAN_S_MAX)] = 5.0


# --- the commands -------------------------------------------------------------------------------


_A = TypeVar("_A", bound=_Args)


@dataclass(frozen=True, slots=True)
class _Command(Generic[_A]):
    """One row of the command table: parse ``args`` into ``model``, then ``run``."""

    model: type[_A]
    run: Callable[[Operations, _A], Awaitable[ControlAnswer]]

    async def answer(self, gw: Operations, args: JsonObject) -> ControlAnswer:
        try:
            parsed = self.model.model_validate(args)
        except ValidationError as exc:
            return self.model.refusal(exc)
        return await self.run(gw, parsed)


class _AnyCommand(Protocol):
    async def answer(self, gw: Operations, args: JsonObject) -> ControlAnswer: ...


async def dispatch(gw: Operations, cmd: str, args: JsonObject) -> JsonObject:
    """Answer one control command: the edge (JSON args in, the JSON answer out)."""
    command = _COMMANDS.get(cmd)
    if command is None:
        return ControlAnswer.refused(f"unknown control command {cmd!r}", exit_code=2).as_json()
    return (await command.answer(gw, args)).as_json()


async def _ping(gw: Operations, _args: NoArgs) -> ControlAnswer:
    # links: the link manager's counters and each lock's connected seconds in the last hour
    # (connect on challenge, warm sessions, battery budget; docs/architecture.md).
    links = gw.service.links.report()
    return ControlAnswer.done(
        {"gw": gw.config.gateway.id, "pid": os.getpid(), "alarms": gw.alarms(), "links": links}
    )


async def _locks(gw: Operations, _args: NoArgs) -> ControlAnswer:
    return ControlAnswer.done({"locks": [view.as_json() for view in await gw.service.locks()]})


async def _status_of(gw: Operations, lock: str) -> ControlAnswer:
    with structlog.contextvars.bound_contextvars(action="status", lock=None):
        try:
            view = await gw.service.status(LockRequest(lock=lock))
        except Exception as exc:  # noqa: BLE001 - every refusal, and a bug of ours, is an answer
            code, message = refusal_of(exc)
            return ControlAnswer.refused(message, exit_code=2 if code == "unknown_lock" else 1, code=code)
    return ControlAnswer.done(view.as_json())


async def _status(gw: Operations, args: StatusArgs) -> ControlAnswer:
    if args.lock is not None:
        return await _status_of(gw, args.lock)
    # Every paired lock asked now (the link manager's slots bound how many at once); the
    # table shows them all, and the exit code says whether any could not be reached.
    answers = await asyncio.gather(*(_status_of(gw, r.lock) for r in gw.service.paired()))
    listed = await _locks(gw, NoArgs())
    assert listed.data is not None
    return ControlAnswer.done(listed.data, exit_code=1 if any(not a.ok for a in answers) else 0)


async def _request(gw: Operations, args: RequestArgs) -> ControlAnswer:
    """A contract request (challenge, unlock, lock, …) answered as MQTT answers it (CONTRACT §4)."""
    resp = await gw.service.answer(args.action, args.payload)
    if resp["status"] == "ok":
        return ControlAnswer.done(dict(resp))
    code = resp["error"]["code"]
    # A lock id that names no paired lock is a usage error (2), like a malformed request.
    exit_code = (
        3 if code == "busy" else 2 if code in ("invalid_request", "unknown_action", "unknown_lock") else 1
    )
    return ControlAnswer.refused(resp["error"]["message"], exit_code=exit_code, code=code, data=dict(resp))


async def _events(gw: Operations, args: EventsArgs) -> ControlAnswer:
    """Filtered history. The answer carries ``next`` (where a follower continues) and
    ``receipt_seq`` (central has everything up to there)."""
    events, nxt = await gw.service.history(
        args.since,
        limit=args.limit,
        lock=args.lock,
        type_glob=args.type_glob(),
        sub=args.sub,
        ts_from=args.ts_from,
        ts_until=args.ts_until,
    )
    stats = gw.outbox_stats()
    return ControlAnswer.done(
        {"events": events, "next": nxt, "last_seq": stats.last_seq, "receipt_seq": stats.receipt_seq}
    )


async def _trust_show(gw: Operations, _args: NoArgs) -> ControlAnswer:
    return ControlAnswer.done(gw.service.trust_summary())


async def _trust_install(gw: Operations, args: TrustInstallArgs) -> ControlAnswer:
    outcome = await gw.service.install_trust(args.document)
    if outcome.rejected:
        return ControlAnswer.refused(
            f"{outcome.kind} refused ({outcome.code}): {outcome.message}", code=outcome.code
        )
    return ControlAnswer.done(
        {"kind": outcome.kind, "installed": outcome.installed, "version": outcome.version, "exp": outcome.exp}
    )


async def _pair(gw: Operations, args: PairArgs) -> ControlAnswer:
    try:
        record = await gw.service.pair(args.address, args.code, args.name)
    except PairingFailed as exc:
        left = f" ({exc.attempts_left} attempts left)" if exc.attempts_left is not None else ""
        return ControlAnswer.refused(f"pairing refused: {exc}{left}", code=exc.reason)
    except BleError as exc:
        return ControlAnswer.refused(f"{args.address}: {exc}", exit_code=_ble_exit(exc), code=exc.code)
    return ControlAnswer.done({"lock": record.lock, "address": args.address, "name": record.name})


async def _unpair(gw: Operations, args: UnpairArgs) -> ControlAnswer:
    try:
        wiped_on_lock = await gw.service.unpair(args.lock, force=args.force)
    except RequestError as exc:
        return ControlAnswer.refused(str(exc), exit_code=2, code=exc.code)
    except BleError as exc:
        return ControlAnswer.refused(
            f"cannot reach {args.lock} to wipe its key ({exc}); use --force only if the unit is gone for good",
            exit_code=_ble_exit(exc),
            code=exc.code,
        )
    return ControlAnswer.done({"lock": args.lock, "wiped_on_lock": wiped_on_lock})


async def _scan(gw: Operations, args: ScanArgs) -> ControlAnswer:
    found: dict[str, JsonObject] = {}

    def seen(device: BLEDevice, adv: AdvertisementData) -> None:
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
            await asyncio.sleep(args.timeout)
    except Exception as exc:  # noqa: BLE001 - adapter errors of any backend end up here
        return ControlAnswer.refused(f"scanning failed: {exc}", exit_code=3)
    return ControlAnswer.done(
        {"locks": sorted(found.values(), key=lambda d: -int(cast("int", d["rssi"]) or -999))}
    )


async def doctor_report(gw: Operations) -> dict[str, Any]:
    """``lockgw doctor``'s report, ``{"ok", "checks"}``: also the daemon's MQTT ``doctor``
    action (injected into the runtime, which never imports this layer)."""
    return as_json(await run_checks(gw, daemon=not gw.direct))


async def _doctor(gw: Operations, _args: NoArgs) -> ControlAnswer:
    report = await doctor_report(gw)
    if report["ok"]:
        return ControlAnswer.done(report)
    return ControlAnswer.refused("some checks failed", data=report)


#: The control commands: each name, its arguments' model, and the adapter that answers it.
_COMMANDS: Final[dict[str, _AnyCommand]] = {
    "ping": _Command(NoArgs, _ping),
    "locks": _Command(NoArgs, _locks),
    "status": _Command(StatusArgs, _status),
    "request": _Command(RequestArgs, _request),
    "events": _Command(EventsArgs, _events),
    "trust_show": _Command(NoArgs, _trust_show),
    "trust_install": _Command(TrustInstallArgs, _trust_install),
    "pair": _Command(PairArgs, _pair),
    "unpair": _Command(UnpairArgs, _unpair),
    "scan": _Command(ScanArgs, _scan),
    "doctor": _Command(NoArgs, _doctor),
}
