"""The gateway's request handling and command pipeline, independent of transport.

A request (from MQTT or, later, the control socket) is handled in CONTRACT §8.4's order:
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
import json
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

from gateway.authz import Authorizer, InstallOutcome
from gateway.errors import BleError, LockgwError, OutboxError
from gateway.links import LinkManager, Priority
from gateway.outbox import Outbox
from gateway.registry import LockRecord, Registry
from protocols.credentials import Decision
from protocols.errors import ProtocolError, TokenError
from protocols.limits import CHALLENGE_TTL_S, COMMAND_ID_LEN
from protocols.messages import (
    LockState,
    LogEntry,
    LogKind,
    Op,
    Status,
    parse_actuation,
    parse_log,
    parse_status,
)

__all__ = ["ACTIONS", "MAX_REQUEST_BYTES", "LockView", "RequestError", "Service"]

#: Requests larger than this are refused unread (CONTRACT §8.4).
MAX_REQUEST_BYTES: Final = 64 * 1024
MAX_TRANSACTION_LEN: Final = 128
ACTIONS: Final = frozenset({"challenge", "unlock", "lock", "status", "locks", "replay"})
_LOG_EVENT: Final = {
    LogKind.UNLOCKED: "lock.unlocked",
    LogKind.LOCKED: "lock.locked",
    LogKind.JAMMED: "lock.jammed",
    LogKind.DOOR_OPENED: "lock.door_opened",
    LogKind.DOOR_CLOSED: "lock.door_closed",
    LogKind.BATTERY_LOW: "lock.battery_low",
    LogKind.MANUAL: "lock.manual",
    LogKind.PAIRED: "lock.log",
    LogKind.UNPAIRED: "lock.log",
    LogKind.TIME_SET: "lock.log",
    LogKind.LOG_OVERFLOW: "lock.log",
}


class RequestError(LockgwError):
    """A refusal that becomes an error response."""


@dataclass
class LockView:
    """The retained lock state object (CONTRACT §4)."""

    lock: str
    name: str
    state: str = "unknown"
    door: str = "unknown"
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

    def as_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.FIELDS}


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
    replay_sink: Callable[[dict[str, Any]], Awaitable[None]] | None = None
    views: dict[str, LockView] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    #: When a list, every actuation appends (t_request, t_command_start, t_command_end, t_response)
    #: from time.perf_counter(): the gateway-added time is everything outside the command.
    trace: list[tuple[float, float, float, float]] | None = None

    #: Set by :meth:`quiesce`: new unlock/lock requests get ``busy`` while the gateway stops.
    stopping: bool = field(init=False, default=False)
    _inflight: int = field(init=False, default=0)
    _idle: asyncio.Event = field(init=False, default_factory=asyncio.Event)

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

    def _stamp(self) -> dict[str, str]:
        """The time and trust state every event carries (one time view per event)."""
        view = self.authz.time_view()
        return {"time_state": str(view.state), "trust_state": self.authz.core.trust_state(view.now)}

    async def event(self, type_: str, **fields: Any) -> dict[str, Any]:
        return await self.outbox.append({"type": type_, **self._stamp(), **fields})

    async def trust_event(self, outcome: InstallOutcome, *, transaction: str | None = None) -> None:
        if outcome.rejected:
            await self.event(
                "trust.rejected",
                outcome="rejected",
                reason=outcome.code,
                transaction=transaction,
                data={"kind": outcome.kind, "message": outcome.message},
            )
        elif outcome.installed:
            await self.event(
                "trust.installed",
                transaction=transaction,
                data={"kind": outcome.kind, "version": outcome.version, "exp": outcome.exp},
            )
            for exp in outcome.expiring:
                await self.event(
                    "trust.expiring",
                    outcome="warning",
                    data={"what": exp.what, "id": exp.ident, "exp": exp.exp, "days_left": exp.days_left},
                )
            self.on_info_changed()
        if outcome.alarm:
            await self.event(
                "time.state_changed", outcome="alarm", reason=outcome.alarm, data={"kind": outcome.kind}
            )

    async def install(self, raw: bytes, *, transaction: str | None = None) -> InstallOutcome:
        outcome = self.authz.install(raw)
        await self.trust_event(outcome, transaction=transaction)
        return outcome

    # --- requests ----------------------------------------------------------------------------

    async def handle(self, action: str, payload: bytes) -> dict[str, Any]:
        """Answer one request; never raises for bad input (CONTRACT §4: errors are responses)."""
        transaction: str | None = None
        try:
            if len(payload) > MAX_REQUEST_BYTES:
                raise RequestError(
                    f"request of {len(payload)} bytes exceeds {MAX_REQUEST_BYTES}", code="invalid_request"
                )
            try:
                body = json.loads(payload)
            except (ValueError, UnicodeDecodeError) as exc:
                raise RequestError("request is not valid JSON", code="invalid_request") from exc
            if not isinstance(body, dict):
                raise RequestError("request must be a JSON object", code="invalid_request")
            raw_tx = body.get("transaction")
            if raw_tx is not None and (not isinstance(raw_tx, str) or len(raw_tx) > MAX_TRANSACTION_LEN):
                raise RequestError(
                    "transaction must be a string of at most 128 characters", code="invalid_request"
                )
            transaction = raw_tx
            if action not in ACTIONS:
                raise RequestError(
                    f"unknown action {action[:64]!r}; use one of {sorted(ACTIONS)}", code="unknown_action"
                )
            data = await getattr(self, f"_do_{action}")(body, transaction)
        except RequestError as exc:
            return {
                "transaction": transaction,
                "status": "error",
                "error": {"code": exc.code, "message": str(exc)},
            }
        except OutboxError as exc:
            return {
                "transaction": transaction,
                "status": "error",
                "error": {"code": "internal_error", "message": f"event store failure: {exc}"},
            }
        return {"transaction": transaction, "status": "ok", "data": data}

    def _record(self, body: dict[str, Any]) -> LockRecord:
        lock = body.get("lock")
        if not isinstance(lock, str) or not lock:
            raise RequestError("field 'lock' (a lock id) is required", code="invalid_request")
        record = self.registry.get(lock)
        if record is None:
            raise RequestError(f"lock {lock[:64]!r} is not paired with this gateway", code="unknown_lock")
        return record

    async def _do_challenge(self, body: dict[str, Any], _tx: str | None) -> dict[str, Any]:
        act = body.get("act", "unlock")
        if act not in ("unlock", "lock"):
            raise RequestError("field 'act' must be 'unlock' or 'lock'", code="invalid_request")
        record = self._record(body)
        nonce = self.authz.challenge(lock=record.lock, action=act)
        return {"nonce": _b64(nonce), "expires_in": int(CHALLENGE_TTL_S), "gw": self.gw_id}

    async def _do_lock(self, body: dict[str, Any], tx: str | None) -> dict[str, Any]:
        return await self._actuate("lock", body, tx)

    async def _do_unlock(self, body: dict[str, Any], tx: str | None) -> dict[str, Any]:
        return await self._actuate("unlock", body, tx)

    async def _actuate(self, action: str, body: dict[str, Any], tx: str | None) -> dict[str, Any]:
        t0 = time.perf_counter()
        if self.stopping:
            raise RequestError("the gateway is stopping; try again in a few seconds", code="busy")
        token_b64, proof_b64 = body.get("token"), body.get("proof")
        if not isinstance(token_b64, str):
            raise RequestError("field 'token' (base64url) is required", code="invalid_request")
        for name in ("proof", "keyring", "revocations"):
            if body.get(name) is not None and not isinstance(body[name], str):
                raise RequestError(f"field {name!r} must be base64url text", code="invalid_request")
        record = self._record(body)
        for name in ("keyring", "revocations"):
            if body.get(name):
                try:
                    raw = _unb64(body[name])
                except ValueError:
                    await self.trust_event(
                        InstallOutcome(
                            name, installed=False, rejected=True, code="malformed", message="not base64url"
                        ),
                        transaction=tx,
                    )
                    continue
                await self.install(raw, transaction=tx)
        try:
            token = _unb64(token_b64)
        except ValueError:
            return await self._deny(
                record, action, tx, TokenError("token is not base64url", code="token_invalid")
            )
        try:
            proof = _unb64(proof_b64) if isinstance(proof_b64, str) else None
        except ValueError:
            proof = b"\x00"  # undecodable: the proof check reports proof_invalid in its place in the order
        try:
            decision = self.authz.decide(token, proof, lock=record.lock, action=action)
        except TokenError as exc:
            return await self._deny(record, action, tx, exc)
        return await self._grant_and_run(record, action, decision, tx, t0)

    async def _deny(self, record: LockRecord, action: str, tx: str | None, exc: TokenError) -> dict[str, Any]:
        ctx: dict[str, Any] = getattr(exc, "context", {})
        await self.event(
            "access.denied",
            lock=record.lock,
            outcome="denied",
            reason=exc.code,
            sub=ctx.get("sub"),
            cti=ctx.get("cti"),
            role=ctx.get("role"),
            transaction=tx,
            data={"action": action, "message": str(exc)},
        )
        raise RequestError(str(exc), code=exc.code)

    async def _grant_and_run(
        self, record: LockRecord, action: str, d: Decision, tx: str | None, t0: float
    ) -> dict[str, Any]:
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
    ) -> dict[str, Any]:
        cmd_id = os.urandom(COMMAND_ID_LEN)
        common = {"lock": record.lock, "sub": d.sub, "cti": d.cti, "role": d.role, "transaction": tx}
        await self.event(
            "access.granted",
            **common,
            data={
                "action": action,
                "kid": d.kid,
                "iss": d.iss,
                "exp": d.exp,
                "flags": list(d.flags),
                "alarm": d.alarm,
                "priority": d.priority,
                "cmd_id": cmd_id.hex(),
            },
        )
        op = Op.UNLOCK if action == "unlock" else Op.LOCK
        t_cmd = time.perf_counter()
        try:
            response = await self.links.command(record, op, cmd_id=cmd_id, priority=Priority.ACCESS)
            t_reply = time.perf_counter()
            state, lock_seq = parse_actuation(response.result)
        except asyncio.CancelledError:
            # Stopped mid-command: the grant must not stand without an outcome. Whether the bolt
            # moved is unknown here; the lock's own log, fetched on the next contact, tells.
            await _uncancellable(
                self.event(
                    "access.failed",
                    **common,
                    outcome="failed",
                    reason="lock_error",
                    data={
                        "action": action,
                        "cmd_id": cmd_id.hex(),
                        "message": "interrupted: the gateway stopped during the command; "
                        "the lock's log shows whether it actuated",
                    },
                )
            )
            raise
        except (BleError, ProtocolError) as exc:
            code = exc.code if isinstance(exc, BleError) else "lock_error"
            code = code if code in ("lock_unreachable", "lock_error") else "lock_unreachable"
            await self.event(
                "access.failed",
                **common,
                outcome="failed",
                reason=code,
                data={"action": action, "message": str(exc), "cmd_id": cmd_id.hex()},
            )
            raise RequestError(f"{action} was authorised but failed: {exc}", code=code) from exc
        view = self.views.setdefault(record.lock, LockView(record.lock, record.name))
        view.state, view.available, view.last_contact = str(state), True, int(self.authz.clock.wall())
        if response.status is Status.JAMMED or state is LockState.JAMMED:
            await self.outbox.append_many(
                [self._fields("lock.jammed", common, lock_seq, cmd_id)], forwarded=[(record.lock, lock_seq)]
            )
            await self.event(
                "access.failed",
                **common,
                outcome="failed",
                reason="lock_jammed",
                data={"action": action, "cmd_id": cmd_id.hex(), "lock_seq": lock_seq},
            )
            self.on_lock_state(view)
            raise RequestError("the lock jammed; check the door and the bolt", code="lock_jammed")
        if response.status is not Status.OK:
            await self.event(
                "access.failed",
                **common,
                outcome="failed",
                reason="lock_error",
                data={"action": action, "cmd_id": cmd_id.hex(), "status": response.status.name},
            )
            raise RequestError(f"the lock answered {response.status.name}", code="lock_error")
        type_ = "lock.unlocked" if action == "unlock" else "lock.locked"
        (done,) = await self.outbox.append_many(
            [self._fields(type_, common, lock_seq, cmd_id)], forwarded=[(record.lock, lock_seq)]
        )
        self.on_lock_state(view)
        t_out = time.perf_counter()
        self.latencies_ms.append((t_out - t0) * 1000)
        if self.trace is not None:
            self.trace.append((t0, t_cmd, t_reply, t_out))
        return {"lock": record.lock, "state": str(state), "seq": done["seq"]}

    def _fields(self, type_: str, common: dict[str, Any], lock_seq: int, cmd_id: bytes) -> dict[str, Any]:
        return {
            "type": type_,
            **self._stamp(),
            **common,
            "data": {"lock_seq": lock_seq, "cmd_id": cmd_id.hex(), "source": "gateway"},
        }

    async def _do_status(self, body: dict[str, Any], _tx: str | None) -> dict[str, Any]:
        record = self._record(body)
        await self.refresh(record, priority=Priority.INTERACTIVE)
        return self.views[record.lock].as_json()

    async def _do_locks(self, _body: dict[str, Any], _tx: str | None) -> dict[str, Any]:
        return {
            "locks": [
                self.views.setdefault(r.lock, LockView(r.lock, r.name)).as_json() for r in self.registry.all()
            ]
        }

    async def _do_replay(self, body: dict[str, Any], _tx: str | None) -> dict[str, Any]:
        lo, hi = _int_or_none(body.get("from_seq")), _int_or_none(body.get("to_seq"))
        if lo is None or lo < 1 or (body.get("to_seq") is not None and (hi is None or hi < lo)):
            raise RequestError(
                "replay takes from_seq ≥ 1 and optional to_seq ≥ from_seq", code="invalid_request"
            )
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
        return {"count": count}

    # --- housekeeping: status and lock logs ---------------------------------------------------

    async def refresh(self, record: LockRecord, *, priority: Priority = Priority.HOUSEKEEPING) -> None:
        """STATUS, then forward the lock's new log entries (exactly once) and acknowledge them."""
        view = self.views.setdefault(record.lock, LockView(record.lock, record.name))
        try:
            status = parse_status((await self.links.command(record, Op.STATUS, priority=priority)).result)
        except (BleError, ProtocolError) as exc:
            if view.available:
                view.available = False
                await self.event(
                    "lock.unreachable",
                    lock=record.lock,
                    outcome="failed",
                    reason=getattr(exc, "code", "lock_error"),
                    data={"message": str(exc)},
                )
                self.on_lock_state(view)
            if priority is not Priority.HOUSEKEEPING:
                raise RequestError(
                    f"lock {record.lock} is unreachable: {exc}", code="lock_unreachable"
                ) from exc
            return
        was_available = view.available
        view.state, view.door, view.battery_pct = str(status.state), str(status.door), status.battery_pct
        view.firmware, view.available, view.last_contact = status.firmware, True, int(self.authz.clock.wall())
        if not was_available:
            await self.event("lock.reachable", lock=record.lock)
        await self.fetch_log(record, priority=priority)
        self.on_lock_state(view)

    async def fetch_log(self, record: LockRecord, *, priority: Priority = Priority.HOUSEKEEPING) -> int:
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
            fresh = [self._log_fields(record, e) for e in entries if e.lock_seq not in known]
            top = entries[-1].lock_seq
            await self.outbox.append_many(
                fresh, cursor=(record.lock, top), forwarded=[(record.lock, e.lock_seq) for e in entries]
            )
            forwarded += len(fresh)
            await self.links.command(
                record, Op.ACK_LOG, {"upto": top}, priority=priority
            )  # only after commit

    def _log_fields(self, record: LockRecord, entry: LogEntry) -> dict[str, Any]:
        return {
            "type": _LOG_EVENT.get(entry.kind, "lock.log"),
            "lock": record.lock,
            **self._stamp(),
            "data": {
                "lock_seq": entry.lock_seq,
                "lock_time": entry.t,
                "kind": str(entry.kind),
                "cmd_id": entry.cmd_id.hex() if entry.cmd_id else None,
                **dict(entry.data),
            },
        }


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    t = text.strip()
    if len(t) > MAX_REQUEST_BYTES or not t or any(c not in _B64 for c in t):
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(t + "=" * (-len(t) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64url") from exc


_B64: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=")


def _int_or_none(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


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
