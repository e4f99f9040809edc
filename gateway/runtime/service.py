"""The gateway's use cases and command pipeline, independent of transport.

The use cases are typed methods over the request models of gateway/wire.py: :meth:`Service.challenge`,
:meth:`~Service.unlock`, :meth:`~Service.lock`, :meth:`~Service.status`, :meth:`~Service.locks`,
:meth:`~Service.replay`, :meth:`~Service.pair`, :meth:`~Service.unpair`, :meth:`~Service.install_trust`.
Each raises :class:`RequestError` (with the contract's code) for a refusal. The adapters are thin:
MQTT calls :meth:`Service.handle` (bytes → bounded parse → the action table ``Service._ROUTES``
→ one method → the encoded answer); the control socket's ``request`` command calls
:meth:`Service.answer` (the same table, without the bytes); the other control commands
(gateway/cli/commands.py) call the methods directly and encode their own JSON.

An unlock or lock is handled in CONTRACT §8.4's order:
request shape → known lock → carried documents → token → … → proof, then::

    access.granted committed  →  idempotent command to the lock  →  lock.unlocked committed  →  response

Denials are ``access.denied`` events, lock failures ``access.failed``; every event is committed
before the response that reports it. Lock logs are fetched after contact and periodically,
forwarded exactly once per (lock, lock_seq) — entries the gateway already reported from a
command response are skipped — and acknowledged to the lock only after the commit.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import functools
import os
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Generic, Protocol, TypedDict, TypeVar

import structlog
from pydantic import BaseModel

from gateway import log
from gateway.authz.authorizer import Authorizer, DocumentKind, InstallOutcome
from gateway.ble.links import LinkManager, Priority
from gateway.ble.registry import LockRecord, Registry
from gateway.errors import BleError, LockgwError, OutboxError
from gateway.errors import LockUnreachable as LockUnreachableError
from gateway.events import (
    AccessDenied,
    AccessFailed,
    AccessGranted,
    ActuationReported,
    Event,
    LockLogForwarded,
    LockPaired,
    LockReachable,
    LockUnpaired,
    LockUnreachable,
    Requester,
    SealedEvent,
    Stamp,
    TimeAlarm,
    TrustExpiring,
    TrustInstalled,
    TrustRejected,
    event_fields,
)
from gateway.firmware.rollout import FirmwareRefused, Rollouts
from gateway.firmware.staging import Staging, StagingError
from gateway.runtime.metrics import Metrics
from gateway.store.outbox import Outbox
from gateway.wire import (
    ECHO_LEN,
    MAX_REQUEST_BYTES,
    MAX_STAGE_CHUNK_BYTES,
    ActuateRequest,
    ChallengeRequest,
    EmptyRequest,
    FirmwareApplyRequest,
    FirmwareStageRequest,
    JsonObject,
    LockRequest,
    ReplayRequest,
    Response,
    WireError,
    error_response,
    loads_bounded,
    ok_response,
    parse_model,
    transaction_of,
)
from protocols.credentials import Decision
from protocols.errors import ProtocolError, TokenError
from protocols.limits import CHALLENGE_TTL_S, COMMAND_ID_LEN
from protocols.messages import (
    DoorState,
    LockState,
    Op,
    Status,
    parse_actuation,
    parse_log,
    parse_status,
)

__all__ = [
    "ACTIONS",
    "MAX_REQUEST_BYTES",
    "Actuated",
    "Challenged",
    "LockView",
    "RequestError",
    "Service",
    "refusal_of",
]

#: A lock state refreshed from the lock less than this long ago answers a ``status`` request at
#: once, with no round trip (CONTRACT §8.14): a 30-a-second status flood costs the lock one
#: STATUS every 2 s, and a door's state is seldom worth more than that to a caller.
STATUS_FRESH_S: Final = 2.0
#: ``status`` requests waiting on one lock's refresh in flight at most; more get ``busy`` at once
#: (CONTRACT §8.14: refused work is ``busy``, never silence). Half the MQTT bridge's budget for
#: such requests, so one lock alone never fills it.
STATUS_WAITERS_MAX: Final = 16
#: A ``doctor`` report younger than this answers a ``doctor`` request at once; concurrent
#: requests share one run. The checks read every database (``PRAGMA quick_check``), so a flood
#: of them must never reach the outbox's writer more than once per this period.
DOCTOR_FRESH_S: Final = 10.0
ACTIONS: Final = frozenset(
    {
        "challenge",
        "unlock",
        "lock",
        "status",
        "locks",
        "replay",
        "doctor",
        "firmware_apply",
        "firmware_stage",
        "firmware_status",
    }
)


class RequestError(LockgwError):
    """A refusal that becomes an error response."""


class Challenged(TypedDict):
    """A ``challenge`` answer's data (CONTRACT §4)."""

    nonce: str
    expires_in: int
    gw: str


class Actuated(TypedDict):
    """An ``unlock`` or ``lock`` answer's data (CONTRACT §4): the state, and the seq of the
    committed ``lock.unlocked`` / ``lock.locked`` event."""

    lock: str
    state: str
    seq: int


_log = log.get("service")
_M = TypeVar("_M", bound=BaseModel)
_R = TypeVar("_R")


def refusal_of(exc: Exception) -> tuple[str, str]:
    """The contract's error code and message for what a use case raised (CONTRACT §4): its own
    code for a refusal or bad input; ``internal_error`` for an event store failure or a bug of
    ours, logged (with its traceback: a bug), never the end of the caller."""
    if isinstance(exc, RequestError | WireError):
        return exc.code, str(exc)
    if isinstance(exc, OutboxError):
        _log.error("request_failed", reason=f"event store failure: {exc}")
        return "internal_error", f"event store failure: {exc}"
    _log.error("request_crashed", exc_info=exc)
    return "internal_error", f"internal error ({type(exc).__name__})"


@dataclass
class LockView:
    """The retained lock state object (CONTRACT §4)."""

    lock: str
    name: str
    state: LockState = LockState.UNKNOWN
    door: DoorState = DoorState.UNKNOWN
    battery_pct: int | None = None
    available: bool = False
    last_contact: int | None = None
    rssi: int | None = None
    firmware: str | None = None

    #: The retained lock state object's fields, in the contract's order (CONTRACT §4).
    FIELDS: ClassVar[tuple[str, ...]] = (
        "lock",
        "name",
        "state",
        "door",
        "battery_pct",
        "available",
        "last_contact",
        "rssi",
        "firmware",
    )

    def as_json(self) -> JsonObject:
        return {name: getattr(self, name) for name in self.FIELDS}


class _AnyRoute(Protocol):
    async def answer(self, svc: Service, value: object, transaction: str | None) -> JsonObject: ...


@dataclass(frozen=True, slots=True)
class _Route(Generic[_M, _R]):
    """One row of the action table: parse into ``model``, ``call`` the use case, ``encode``."""

    model: type[_M]
    call: Callable[[Service, _M, str | None], Awaitable[_R]]
    encode: Callable[[_R], JsonObject]

    async def answer(self, svc: Service, value: object, transaction: str | None) -> JsonObject:
        return self.encode(await self.call(svc, parse_model(self.model, value), transaction))


def _locks_json(views: list[LockView]) -> JsonObject:
    return {"locks": [v.as_json() for v in views]}


def _count_json(count: int) -> JsonObject:
    return {"count": count}


@dataclass
class Service:
    gw_id: str
    site: str
    authz: Authorizer
    outbox: Outbox
    registry: Registry
    links: LinkManager
    on_lock_state: Callable[[LockView], None] = lambda _v: None
    on_info_changed: Callable[[], None] = lambda: None
    #: After every successful unlock or lock: (lock, action). Home Assistant's last access.
    on_access: Callable[[str, str], None] = lambda _lock, _action: None
    replay_sink: Callable[[SealedEvent], Awaitable[None]] | None = None
    #: Firmware rollouts (docs/firmware.md); set by the runtime once the service exists.
    firmware: Rollouts | None = None
    #: Images staged in chunks (``firmware_stage``), set with :attr:`firmware`.
    staging: Staging | None = None
    views: dict[str, LockView] = field(default_factory=dict)
    #: When a list, every actuation appends (t_request, t_command_start, t_command_end, t_response)
    #: from time.perf_counter(): the gateway-added time is everything outside the command.
    trace: list[tuple[float, float, float, float]] | None = None
    status_fresh_s: float = STATUS_FRESH_S
    status_waiters_max: int = STATUS_WAITERS_MAX
    #: The ``doctor`` checks (``lockgw doctor``'s, injected by the CLI layer, which this layer
    #: never imports): the report as ``{"ok", "checks"}``. None: no ``doctor`` action here.
    diagnose: Callable[[], Awaitable[dict[str, Any]]] | None = None
    #: Prometheus series (``[metrics] enabled``): request latency, lock round trips, decisions.
    metrics: Metrics | None = None

    #: Set by :meth:`quiesce`: new unlock/lock requests get ``busy`` while the gateway stops.
    stopping: bool = field(init=False, default=False)
    _inflight: int = field(init=False, default=0)
    _idle: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _replaying: asyncio.Lock = field(init=False, default_factory=asyncio.Lock)
    #: Refreshes in flight, by (lock, priority), shared by concurrent callers (see refresh).
    _refreshing: dict[tuple[str, Priority], _Refresh] = field(init=False, default_factory=dict)
    #: When each lock's state last came from the lock (clock.mono()).
    _fresh_at: dict[str, float] = field(init=False, default_factory=dict)
    #: One log fetch at a time per lock: forwarded exactly once however refreshes overlap.
    _log_mutex: dict[str, asyncio.Lock] = field(init=False, default_factory=dict)
    #: The doctor run in flight (shared), and the last report with its time (time.monotonic()).
    _doctor_run: asyncio.Future[dict[str, Any]] | None = field(init=False, default=None)
    _doctor_last: tuple[float, dict[str, Any]] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        for rec in self.registry.all():
            self.views.setdefault(rec.lock, LockView(rec.lock, rec.name))
        self._idle.set()

    async def quiesce(self, grace_s: float) -> int:
        """Stopping: refuse new actuations (``busy``) and give the ones in flight ``grace_s`` to
        finish. Returns how many are still running; cancelled, each records ``access.failed``."""
        self.stopping = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace_s):
                await self._idle.wait()
        return self._inflight

    # --- events ------------------------------------------------------------------------------

    def _stamp(self) -> Stamp:
        """The time and trust state every event carries (one time view per event)."""
        view = self.authz.time_view()
        return Stamp(str(view.state), self.authz.core.trust_state(view.now))

    def _fields(self, event: Event) -> dict[str, object]:
        return event_fields(event, self._stamp())

    async def event(self, event: Event) -> SealedEvent:
        """Commit ``event`` (gateway/events.py) durably; the sealed event."""
        return await self.outbox.append(self._fields(event))

    async def trust_event(self, outcome: InstallOutcome, *, transaction: str | None = None) -> None:
        if outcome.rejected:
            await self.event(
                TrustRejected(
                    reason=outcome.code, kind=outcome.kind, message=outcome.message, transaction=transaction
                )
            )
        elif outcome.installed:
            await self.event(
                TrustInstalled(
                    kind=outcome.kind, version=outcome.version, exp=outcome.exp, transaction=transaction
                )
            )
            for exp in outcome.expiring:
                await self.event(
                    TrustExpiring(what=exp.what, ident=exp.ident, exp=exp.exp, days_left=exp.days_left)
                )
            self.on_info_changed()
        if outcome.alarm:
            await self.event(TimeAlarm(reason=outcome.alarm, kind=outcome.kind))

    async def install(self, raw: bytes, *, transaction: str | None = None) -> InstallOutcome:
        """The same as :meth:`install_trust` (its name before the use cases were named)."""
        return await self.install_trust(raw, transaction=transaction)

    # --- requests ----------------------------------------------------------------------------

    async def handle(self, action: str, payload: bytes) -> Response:
        """Answer one MQTT request; never raises for bad input (CONTRACT §4: errors are responses).

        The payload is parsed once, bounded, into the action's typed model (gateway/wire.py);
        a bug of ours is logged with its traceback and answered ``internal_error``. One log line
        per request (action, transaction, lock, outcome, reason code; never a token or proof)."""
        return await self._logged(action, lambda: loads_bounded(payload))

    async def answer(self, action: str, value: object) -> Response:
        """As :meth:`handle`, for a request already parsed from bounded JSON (the control
        socket's ``request`` command): the same action table, answer and log line."""
        return await self._logged(action, lambda: value)

    async def _logged(self, action: str, parse: Callable[[], object]) -> Response:
        with structlog.contextvars.bound_contextvars(action=action[:ECHO_LEN], transaction=None, lock=None):
            t0 = time.perf_counter()
            answer = await self._answer(action, parse)
            if self.metrics is not None:
                self.metrics.request_done(
                    action if action in ACTIONS else "other",
                    answer["error"]["code"] if answer["status"] == "error" else None,
                    time.perf_counter() - t0,
                )
            _log.info(
                "request",
                transaction=answer["transaction"],
                outcome=answer["status"],
                reason=answer["error"]["code"] if answer["status"] == "error" else None,
            )
            return answer

    async def _answer(self, action: str, parse: Callable[[], object]) -> Response:
        transaction: str | None = None
        try:
            value = parse()
            transaction = transaction_of(value)
            route = self._ROUTES.get(action)
            if route is None:
                raise RequestError(
                    f"unknown action {action[:ECHO_LEN]!r}; use one of {sorted(ACTIONS)}",
                    code="unknown_action",
                )
            data = await route.answer(self, value, transaction)
        except Exception as exc:  # noqa: BLE001 - refusals, bad input and bugs alike become answers
            return error_response(transaction, *refusal_of(exc))
        return ok_response(transaction, data)

    def _record(self, request: LockRequest) -> LockRecord:
        structlog.contextvars.bind_contextvars(lock=request.lock[:ECHO_LEN])
        record = self.registry.get(request.lock)
        if record is None:
            raise RequestError(
                f"lock {request.lock[:ECHO_LEN]!r} is not paired with this gateway", code="unknown_lock"
            )
        return record

    # --- the use cases ------------------------------------------------------------------------

    async def doctor(self) -> dict[str, Any]:
        """The ``doctor`` action (docs/contract-additions.md): the same checks as ``lockgw
        doctor``, read-only. A report under ``DOCTOR_FRESH_S`` old answers at once; concurrent
        callers share one run; a caller that goes away leaves it to the others."""
        if self.diagnose is None:
            raise RequestError("this gateway process runs no diagnostics", code="unknown_action")
        now = time.monotonic()
        if self._doctor_last is not None and now - self._doctor_last[0] < DOCTOR_FRESH_S:
            return self._doctor_last[1]
        run = self._doctor_run
        if run is None or run.done():
            run = self._doctor_run = asyncio.ensure_future(self.diagnose())
            run.add_done_callback(self._doctor_done)
        return await asyncio.shield(run)

    def _doctor_done(self, run: asyncio.Future[dict[str, Any]]) -> None:
        if not run.cancelled() and run.exception() is None:
            self._doctor_last = (time.monotonic(), run.result())

    async def challenge(self, req: ChallengeRequest) -> Challenged:
        """A fresh nonce for a proof of possession (CONTRACT §8.5); the lock's link is opened
        meanwhile (connect on challenge, gateway/ble/links.py) unless the gateway is stopping."""
        record = self._record(req)
        nonce = self.authz.challenge(lock=record.lock, action=req.act)
        if not self.stopping:
            self.links.prepare(record)
        return {"nonce": _b64(nonce), "expires_in": int(CHALLENGE_TTL_S), "gw": self.gw_id}

    async def unlock(self, req: ActuateRequest, transaction: str | None = None) -> Actuated:
        """Authorize (CONTRACT §8.4), then unlock; every outcome is an event committed first."""
        return await self._actuate("unlock", req, transaction)

    async def lock(self, req: ActuateRequest, transaction: str | None = None) -> Actuated:
        """As :meth:`unlock`, to lock."""
        return await self._actuate("lock", req, transaction)

    async def _actuate(self, action: str, body: ActuateRequest, tx: str | None) -> Actuated:
        t0 = time.perf_counter()
        if self.stopping:
            raise RequestError("the gateway is stopping; try again in a few seconds", code="busy")
        record = self._record(body)
        for name, carried in (
            (DocumentKind.KEYRING, body.keyring),
            (DocumentKind.REVOCATIONS, body.revocations),
            (DocumentKind.TIME, body.time),
        ):
            if carried:
                try:
                    raw = _unb64(carried)
                except ValueError:
                    await self.trust_event(
                        InstallOutcome(
                            name, installed=False, rejected=True, code="malformed", message="not base64url"
                        ),
                        transaction=tx,
                    )
                    continue
                await self.install_trust(raw, transaction=tx)
        try:
            token = _unb64(body.token)
        except ValueError:
            return await self._deny(
                record, action, tx, TokenError("token is not base64url", code="token_invalid")
            )
        try:
            proof = _unb64(body.proof) if body.proof is not None else None
        except ValueError:
            proof = b"\x00"  # undecodable: the proof check reports proof_invalid in its place in the order
        try:
            decision = self.authz.decide(token, proof, lock=record.lock, action=action)
        except TokenError as exc:
            return await self._deny(record, action, tx, exc)
        return await self._grant_and_run(record, action, decision, tx, t0)

    async def _deny(self, record: LockRecord, action: str, tx: str | None, exc: TokenError) -> Actuated:
        ctx: Mapping[str, str | None] = getattr(exc, "context", {})  # protocols.credentials sets it
        requester = Requester(record.lock, ctx.get("sub"), ctx.get("cti"), ctx.get("role"), tx)
        await self.event(AccessDenied(requester=requester, reason=exc.code, action=action, message=str(exc)))
        raise RequestError(str(exc), code=exc.code)

    async def _grant_and_run(
        self, record: LockRecord, action: str, d: Decision, tx: str | None, t0: float
    ) -> Actuated:
        self._inflight += 1
        self._idle.clear()
        try:
            return await self._run_granted(record, action, d, tx, t0)
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()

    async def _run_granted(
        self, record: LockRecord, action: str, d: Decision, tx: str | None, t0: float
    ) -> Actuated:
        cmd_id = os.urandom(COMMAND_ID_LEN)
        requester = Requester(record.lock, d.sub, d.cti, d.role, tx)
        await self.event(
            AccessGranted(
                requester=requester,
                action=action,
                kid=d.kid,
                iss=d.iss,
                exp=d.exp,
                flags=d.flags,
                alarm=d.alarm,
                priority=d.priority,
                cmd_id=cmd_id.hex(),
            )
        )
        failed = functools.partial(AccessFailed, requester=requester, action=action, cmd_id=cmd_id.hex())
        op = Op.UNLOCK if action == "unlock" else Op.LOCK
        t_cmd = time.perf_counter()
        try:
            response = await self.links.command(record, op, cmd_id=cmd_id, priority=Priority.ACCESS)
            t_reply = time.perf_counter()
            if self.metrics is not None:
                self.metrics.lock_round_trip(action, t_reply - t_cmd)
            state, lock_seq = parse_actuation(response.result)
        except asyncio.CancelledError:
            # Stopped mid-command: the grant must not stand without an outcome. Whether the bolt
            # moved is unknown here; the lock's own log, fetched on the next contact, tells.
            await _uncancellable(
                self.event(
                    failed(
                        reason="lock_error",
                        message="interrupted: the gateway stopped during the command; "
                        "the lock's log shows whether it actuated",
                    )
                )
            )
            raise
        except (BleError, ProtocolError) as exc:
            code = exc.code if isinstance(exc, BleError) else "lock_error"
            code = code if code in ("lock_unreachable", "lock_error") else "lock_unreachable"
            await self.event(failed(reason=code, message=str(exc)))
            raise RequestError(f"{action} was authorised but failed: {exc}", code=code) from exc
        view = self.views.setdefault(record.lock, LockView(record.lock, record.name))
        view.state, view.available, view.last_contact = state, True, int(self.authz.clock.wall())
        if response.status is Status.JAMMED or state is LockState.JAMMED:
            jammed = ActuationReported.jammed(requester, lock_seq, cmd_id.hex())
            await self.outbox.append_many([self._fields(jammed)], forwarded=[(record.lock, lock_seq)])
            await self.event(failed(reason="lock_jammed", lock_seq=lock_seq))
            self.on_lock_state(view)
            raise RequestError("the lock jammed; check the door and the bolt", code="lock_jammed")
        if response.status is not Status.OK:
            await self.event(failed(reason="lock_error", status=response.status.name))
            raise RequestError(f"the lock answered {response.status.name}", code="lock_error")
        moved = ActuationReported.done(action, requester, lock_seq, cmd_id.hex())
        (done,) = await self.outbox.append_many([self._fields(moved)], forwarded=[(record.lock, lock_seq)])
        self.on_lock_state(view)
        self.on_access(record.lock, action)
        t_out = time.perf_counter()
        if self.trace is not None:
            self.trace.append((t0, t_cmd, t_reply, t_out))
        return {"lock": record.lock, "state": str(state), "seq": done["seq"]}

    async def status(self, req: LockRequest) -> LockView:
        """The lock's state, asked of the lock unless it is fresh (CONTRACT §8.14): a copy."""
        record = self._record(req)
        fresh_at = self._fresh_at.get(record.lock)
        if fresh_at is None or self.authz.clock.mono() - fresh_at >= self.status_fresh_s:
            await self.refresh(record, priority=Priority.INTERACTIVE)
        return dataclasses.replace(self._view(record))

    async def locks(self) -> list[LockView]:
        """Every paired lock's last known state (copies), in the registry's order; no round trip."""
        return [dataclasses.replace(self._view(r)) for r in self.registry.all()]

    async def firmware_apply(self, req: FirmwareApplyRequest) -> dict[str, Any]:
        """Check and start a rollout (docs/firmware.md): refusals need no radio work. The image
        inline, or staged before (``image_sha256``: removed once the rollout is recorded, which
        keeps its own copy; kept when refused, for another manifest)."""
        rollouts = self._rollouts()
        try:
            manifest = _unb64(req.manifest)
            image = _unb64(req.image) if req.image is not None else None
        except ValueError as exc:
            raise RequestError("manifest and image must be base64url", code="invalid_request") from exc
        if image is None:
            assert req.image_sha256 is not None  # the request model wants one of the two
            try:
                image = await self._staging().image(req.image_sha256)
            except StagingError as exc:
                raise RequestError(str(exc), code=exc.code) from exc
        try:
            plan = await rollouts.apply(manifest, image)
        except FirmwareRefused as exc:
            raise RequestError(str(exc), code="firmware_refused") from exc
        if req.image_sha256 is not None:
            with contextlib.suppress(
                StagingError
            ):  # the rollout holds its image: a leftover is evicted later
                await self._staging().discard(req.image_sha256)
        return plan

    async def firmware_stage(self, req: FirmwareStageRequest) -> dict[str, Any]:
        """One chunk of an image staged for ``firmware_apply`` (gateway/firmware/staging.py):
        where the staging stands after it, or the refusal's code."""
        staging = self._staging()
        try:
            data = _unb64(req.data) if req.data else b""
        except ValueError as exc:
            raise RequestError("data must be base64url", code="invalid_request") from exc
        if len(data) > MAX_STAGE_CHUNK_BYTES:
            raise RequestError(
                f"a chunk of {len(data)} bytes exceeds {MAX_STAGE_CHUNK_BYTES}", code="invalid_request"
            )
        try:
            staged = await staging.stage(req.sha256, req.size, req.offset, data)
        except StagingError as exc:
            raise RequestError(str(exc), code=exc.code) from exc
        return staged.as_json()

    async def firmware_status(self) -> dict[str, Any]:
        return {"rollouts": await self._rollouts().status()}

    async def firmware_changed(self, lock: str, _version: str) -> None:
        """A lock confirmed a new image: its state (``firmware`` as the lock reports it) is
        asked again at once, so the retained lock state follows."""
        record = self.registry.get(lock)
        if record is not None:
            with contextlib.suppress(BleError):
                await self.refresh(record, priority=Priority.HOUSEKEEPING)

    def _staging(self) -> Staging:
        if self.staging is None:
            raise RequestError("firmware staging is not available on this gateway", code="unavailable")
        return self.staging

    def _rollouts(self) -> Rollouts:
        if self.firmware is None:
            raise RequestError("firmware updates are not available on this gateway", code="unavailable")
        return self.firmware

    def paired(self) -> list[LockRecord]:
        """The locks paired with this gateway."""
        return self.registry.all()

    def is_paired(self, lock: str) -> bool:
        return self.registry.get(lock) is not None

    async def history(
        self,
        since: int,
        *,
        limit: int,
        lock: str | None = None,
        type_glob: str | None = None,
        sub: str | None = None,
        ts_from: str | None = None,
        ts_until: str | None = None,
    ) -> tuple[list[SealedEvent], int]:
        """Stored events from ``since`` matching every filter given, and where to continue
        (gateway/store/outbox.py, ``Outbox.query``)."""
        return await self.outbox.query(
            since, limit=limit, lock=lock, type_glob=type_glob, sub=sub, ts_from=ts_from, ts_until=ts_until
        )

    async def replay(self, req: ReplayRequest) -> int:
        """Re-publish the stored events from_seq..to_seq through ``replay_sink``; how many."""
        lo, hi = req.from_seq, req.to_seq
        if hi is not None and hi < lo:
            raise RequestError(
                "replay takes from_seq ≥ 1 and optional to_seq ≥ from_seq", code="invalid_request"
            )
        if self._replaying.locked():
            # One replay at a time: each can re-publish the whole store (found by attack: 40 at
            # once re-published 33 000 events and held every request slot).
            raise RequestError("a replay is already running; ask again when it ends", code="busy")
        async with self._replaying:
            count = 0
            cursor = lo
            while True:
                batch = await self.outbox.read(cursor, hi, limit=500)
                for event in batch:
                    if self.replay_sink is not None:
                        await self.replay_sink({**event, "replayed": True})
                    count += 1
                if len(batch) < 500:
                    break
                cursor = batch[-1]["seq"] + 1
            return count

    async def pair(self, address: str, code: str, name: str = "") -> LockRecord:
        """Pair the lock in pairing mode at ``address`` with its setup code, keep its record,
        commit ``lock.paired`` and re-publish the gateway's info. Raises :class:`PairingFailed`
        (the lock refused: its reason) or :class:`BleError` (not reached)."""
        done = await self.links.pair(address, code)
        record = LockRecord(done.lock_id, address, name or done.lock_id, done.ltk)
        self.registry.put(record)
        self._forget(record.lock)
        self._view(record)
        await self.event(LockPaired(lock=record.lock, address=address, name=record.name))
        self.on_info_changed()
        return record

    async def unpair(self, lock: str, *, force: bool = False) -> bool:
        """Wipe the pairing key on the lock, then forget the lock here; ``lock.unpaired`` is
        committed and the info re-published. With ``force`` (the unit is gone for good) one
        connection attempt, and the lock is forgotten even if it was not reached. Returns whether
        the lock itself wiped its key. Raises :class:`RequestError` ``unknown_lock`` or, without
        ``force``, the :class:`BleError` that kept the lock from being reached."""
        record = self.registry.get(lock)
        if record is None:
            raise RequestError(f"lock {lock} is not paired with this gateway", code="unknown_lock")
        wiped_on_lock = False
        try:
            resp = await self.links.command(
                record, Op.UNPAIR, priority=Priority.INTERACTIVE, attempts=1 if force else None
            )
            wiped_on_lock = resp.status is Status.OK
        except BleError:
            if not force:
                raise
        self.registry.remove(lock)
        self._forget(lock)
        await self.event(
            LockUnpaired(lock=lock, forced=force and not wiped_on_lock, wiped_on_lock=wiped_on_lock)
        )
        self.on_info_changed()
        return wiped_on_lock

    async def install_trust(self, raw: bytes, *, transaction: str | None = None) -> InstallOutcome:
        """Install a signed keyring, revocation list or time statement if valid and newer
        (CONTRACT §8.7); the outcome is committed as ``trust.*`` events."""
        outcome = self.authz.install(raw)
        await self.trust_event(outcome, transaction=transaction)
        return outcome

    def trust_summary(self) -> dict[str, object]:
        """The ``trust show`` object (CONTRACT §8.3), each document with its days left."""
        summary = self.authz.trust_summary()
        now = self.authz.time_view().now
        for name in ("keyring", "revocations"):
            doc = summary[name]
            if isinstance(doc, dict):
                doc["days_left"] = round((int(doc["exp"]) - now) / 86400, 1)
        return summary

    def _view(self, record: LockRecord) -> LockView:
        return self.views.setdefault(record.lock, LockView(record.lock, record.name))

    def _forget(self, lock: str) -> None:
        """Drop what is known of a lock's state: a lock paired (again) starts from unknown, asked."""
        self.views.pop(lock, None)
        self._fresh_at.pop(lock, None)

    # --- housekeeping: status and lock logs ---------------------------------------------------

    async def refresh(self, record: LockRecord, *, priority: Priority = Priority.HOUSEKEEPING) -> None:
        """STATUS, then forward the lock's new log entries (exactly once) and acknowledge them.

        Concurrent refreshes of one lock share one round trip (CONTRACT §8.14): a caller joins a
        refresh in flight at its own priority or a higher one, else starts one. A refresh for a
        request (not housekeeping) takes at most ``status_waiters_max`` callers; one more is
        ``busy``. It runs in its own task so a caller that goes away (cancelled) leaves it to
        the others; the last one to go cancels it."""
        flight = next(
            (
                f
                for p in Priority
                if p <= priority and (f := self._refreshing.get((record.lock, p))) is not None
            ),
            None,
        )
        if flight is None:
            flight = _Refresh(
                (record.lock, priority), asyncio.ensure_future(self._refresh_once(record, priority))
            )
            self._refreshing[flight.key] = flight
            flight.task.add_done_callback(functools.partial(self._refresh_done, flight))
        elif priority is not Priority.HOUSEKEEPING and flight.waiters >= self.status_waiters_max:
            raise RequestError(
                f"{flight.waiters} status requests already wait for lock {record.lock}; try again",
                code="busy",
            )
        flight.waiters += 1
        try:
            await asyncio.shield(flight.task)
        except (BleError, ProtocolError) as exc:
            if priority is not Priority.HOUSEKEEPING:
                # The link manager's LockUnreachable already says what was tried and what to do.
                message = (
                    str(exc)
                    if isinstance(exc, LockUnreachableError)
                    else f"lock {record.lock} is unreachable: {exc}"
                )
                raise RequestError(message, code="lock_unreachable") from exc
        finally:
            flight.waiters -= 1
            if not flight.waiters and not flight.task.done():
                # Nobody wants it any more (all its callers were cancelled); nobody joins it now.
                flight.task.cancel()
                self._refresh_done(flight)

    def _refresh_done(self, flight: _Refresh, _task: object = None) -> None:
        if self._refreshing.get(flight.key) is flight:
            del self._refreshing[flight.key]
        if flight.task.done() and not flight.task.cancelled():
            flight.task.exception()  # retrieved: every caller got it, or none was left to

    async def _refresh_once(self, record: LockRecord, priority: Priority) -> None:
        view = self.views.setdefault(record.lock, LockView(record.lock, record.name))
        try:
            status = parse_status((await self.links.command(record, Op.STATUS, priority=priority)).result)
        except (BleError, ProtocolError) as exc:
            self._fresh_at.pop(record.lock, None)
            _log.warning(
                "link_failed",
                lock=record.lock,
                priority=priority.name.lower(),
                reason=f"{type(exc).__name__}: {exc}",
            )
            if view.available:
                view.available = False
                await self.event(
                    LockUnreachable(
                        lock=record.lock, reason=getattr(exc, "code", "lock_error"), message=str(exc)
                    )
                )
                self.on_lock_state(view)
            raise
        was_available = view.available
        view.state, view.door, view.battery_pct = status.state, status.door, status.battery_pct
        view.firmware, view.available, view.last_contact = status.firmware, True, int(self.authz.clock.wall())
        self._fresh_at[record.lock] = self.authz.clock.mono()
        if not was_available:
            _log.info("link_restored", lock=record.lock)
            await self.event(LockReachable(lock=record.lock))
        await self.fetch_log(record, priority=priority)
        self.on_lock_state(view)

    async def fetch_log(self, record: LockRecord, *, priority: Priority = Priority.HOUSEKEEPING) -> int:
        async with self._log_mutex.setdefault(record.lock, asyncio.Lock()):
            return await self._fetch_log(record, priority)

    async def _fetch_log(self, record: LockRecord, priority: Priority) -> int:
        forwarded = 0
        while True:
            cursor = await self.outbox.lock_cursor(record.lock)
            resp = await self.links.command(
                record, Op.READ_LOG, {"from": cursor + 1, "max": 16}, priority=priority
            )
            entries, _next = parse_log(resp.result)
            entries = [e for e in entries if e.lock_seq > cursor]
            if not entries:
                return forwarded
            known = await self.outbox.forwarded(record.lock, [e.lock_seq for e in entries])
            fresh = [
                self._fields(LockLogForwarded(lock=record.lock, entry=e))
                for e in entries
                if e.lock_seq not in known
            ]
            top = entries[-1].lock_seq
            await self.outbox.append_many(
                fresh, cursor=(record.lock, top), forwarded=[(record.lock, e.lock_seq) for e in entries]
            )
            forwarded += len(fresh)
            await self.links.command(
                record, Op.ACK_LOG, {"upto": top}, priority=priority
            )  # only after commit

    #: The action table (MQTT's ``B/G/request/<action>``, CONTRACT §4): each action's request
    #: model, the one use case it calls, and how that answer is encoded as the response's data.
    _ROUTES: ClassVar[dict[str, _AnyRoute]] = {
        "challenge": _Route(ChallengeRequest, lambda svc, req, _tx: svc.challenge(req), dict),
        "unlock": _Route(ActuateRequest, lambda svc, req, tx: svc.unlock(req, tx), dict),
        "lock": _Route(ActuateRequest, lambda svc, req, tx: svc.lock(req, tx), dict),
        "status": _Route(LockRequest, lambda svc, req, _tx: svc.status(req), LockView.as_json),
        "locks": _Route(EmptyRequest, lambda svc, _req, _tx: svc.locks(), _locks_json),
        "replay": _Route(ReplayRequest, lambda svc, req, _tx: svc.replay(req), _count_json),
        "doctor": _Route(EmptyRequest, lambda svc, _req, _tx: svc.doctor(), dict),
        "firmware_apply": _Route(FirmwareApplyRequest, lambda svc, req, _tx: svc.firmware_apply(req), dict),
        "firmware_stage": _Route(FirmwareStageRequest, lambda svc, req, _tx: svc.firmware_stage(req), dict),
        "firmware_status": _Route(EmptyRequest, lambda svc, _req, _tx: svc.firmware_status(), dict),
    }


@dataclass
class _Refresh:
    """One refresh of one lock in flight, and how many callers wait for it."""

    key: tuple[str, Priority]
    task: asyncio.Future[None]
    waiters: int = 0


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    """base64url, padding optional but only at the end (``=`` inside, or more of it than the
    length needs, was skipped by the lenient decoder: ``AA==AAAA`` was one byte, the rest lost)."""
    t = text.strip()
    body = t.rstrip("=")
    if len(t) > MAX_REQUEST_BYTES or _B64.fullmatch(body) is None:
        raise ValueError("not base64url")
    if t != body and (len(t) % 4 or len(t) - len(body) > 2):
        raise ValueError("not base64url")
    try:  # C-speed throughout: a 32 KiB chunk's text is decoded on the event loop
        std = (body + "=" * (-len(body) % 4)).encode("ascii").translate(_TO_STD)
        return binascii.a2b_base64(std, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64url") from exc


_B64: Final = re.compile(r"[A-Za-z0-9_-]+")
_TO_STD: Final = bytes.maketrans(b"-_", b"+/")


async def _uncancellable(coro: Coroutine[Any, Any, Any]) -> None:
    """Run ``coro`` to the end although the caller is being cancelled (a bounded outbox commit:
    the record of an interrupted command). Further cancellations wait for it; the caller
    re-raises its own."""
    task = asyncio.ensure_future(coro)
    while not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(task)
    if not task.cancelled():
        task.exception()  # retrieved: an outbox failure has raised its own alarm
