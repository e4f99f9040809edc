"""The lock unit's firmware, modelled: bolt, door sensor, battery, clock, log, pairing.

Pure logic with ``now`` passed in (wall-clock seconds as a float), and no I/O: each change to
the durable state raises :attr:`LockModel.revision`, and the caller writes the snapshot
(:meth:`LockModel.to_json`) through :class:`firmware_sim.persist.LockStore` before it answers, so
a restarted simulator is the same lock. The model never touches the radio either: the driver in
:mod:`firmware_sim.peripheral` feeds it requests and faults.
"""

from __future__ import annotations

import base64
import secrets
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Final

from protocols import cbor
from protocols.framing import FrameType, encode_frame
from protocols.limits import COMMAND_CACHE, LOG_BATCH_MAX, NONCE_LEN
from protocols.messages import (
    DoorState,
    LockState,
    LogEntry,
    LogKind,
    Op,
    Request,
    Response,
    Status,
)

__all__ = ["FIRMWARE_VERSION", "LIE_MODES", "LockModel", "PairingPolicy", "off_curve_pair_response"]

FIRMWARE_VERSION: Final = "sim-1.0.0"

#: Ring buffer of the lock's own log. Real units keep a few hundred entries in flash.
LOG_CAPACITY: Final = 512
#: Battery drain per actuation (percent): ~2000 actuations from full, like a CR123A pack.
DRAIN_PER_ACTUATION: Final = 0.05
BATTERY_LOW_PCT: Final = 20.0


class _RawText(str):
    """Text that encodes its lone surrogates anyway (``surrogatepass``): the bytes a broken or
    hostile lock puts on the wire, which no honest encoder produces. Only the ``lie`` fault
    makes these."""

    __slots__ = ()

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:  # noqa: ARG002 - always surrogatepass
        return str.encode(self, encoding, "surrogatepass")


_BIG: Final = 2**64 - 1  # the largest CBOR unsigned integer; past SQLite's INTEGER
_HUGE_TEXT: Final = "x" * 200  # far past the 64-character limit, yet one response fits a frame

#: The ``lie`` fault (docs/simulator.md): the lock executes each command as usual (the bolt
#: moves), then answers with values a gateway must refuse. Field name -> the lie told there.
_LIES: Final[dict[str, dict[str, cbor.CborValue]]] = {
    "lock_seq": dict.fromkeys(("lock_seq", "log_first", "log_next", "next", "first"), _BIG),
    "battery": {"battery_pct": 300},
    "time": {"clock": -(2**64)},
    "huge": {
        **dict.fromkeys(("state", "firmware", "name"), _HUGE_TEXT),
        **dict.fromkeys(("lock_seq", "first", "clock"), 2**63),
    },
    "types": {
        "state": 5,
        "door": None,
        "lock_seq": "7",
        "battery_pct": True,
        "clock": b"\x00\x01",
        "firmware": ["sim"],
        "name": cbor.Tag(0, "Door"),
        "log_first": -1,
        "log_next": {"n": 1},
        "entries": {"0": [1, 2, "manual", None, {}]},
        "next": None,
        "first": [1],
    },
    "surrogate": {n: _RawText("\ud800") for n in ("state", "door", "firmware", "name")},
}
#: Every mode of the ``lie`` fault: the value lies above, plus ``cmd_id`` (answers carry another
#: command's id) and ``op`` (answers name another command).
LIE_MODES: Final = frozenset({*_LIES, "cmd_id", "op"})


def off_curve_pair_response(lock_id: str) -> bytes:
    """A hostile pairing peer's PAIR_RESPONSE frame: its SPAKE2 message is a point that is not
    on Ed25519 (y = 2 has no x), for the ``hostile`` fault mode ``spake2``."""
    body = cbor.dumps([lock_id, b"B" + (2).to_bytes(32, "little"), bytes(NONCE_LEN)])
    return encode_frame(FrameType.PAIR_RESPONSE, body)


@dataclass(frozen=True, slots=True)
class PairingPolicy:
    """Pairing mode: open for ``window_s`` after a button press (or from the factory);
    ``max_failures`` wrong codes lock pairing out for ``lockout_s``, doubling each time."""

    window_s: float = 300.0
    max_failures: int = 5
    lockout_s: float = 60.0


def make_setup_code(rng: Any = secrets) -> str:
    """A 9-digit code printed on the unit: ~30 bits against one online guess per attempt."""
    digits = "".join(str(rng.randbelow(10)) for _ in range(9))
    return f"{digits[:3]}-{digits[3:6]}-{digits[6:]}"


@dataclass
class LockModel:
    lock_id: str
    setup_code: str
    name: str = ""
    state: LockState = LockState.LOCKED
    door: DoorState = DoorState.CLOSED
    battery_pct: float = 100.0
    clock_offset_s: float = 0.0
    drift_ppm: float = 0.0
    auto_relock_s: float | None = None
    jam_armed: bool = False
    paired_gw: str | None = None
    ltk: bytes | None = None
    pairing_open_until: float | None = 0.0  # 0.0: factory fresh (open until first pairing)
    failures: int = 0
    lockouts: int = 0
    locked_out_until: float = 0.0
    next_seq: int = 1
    log: deque[LogEntry] = field(default_factory=lambda: deque(maxlen=LOG_CAPACITY))
    results: OrderedDict[bytes, Response] = field(default_factory=OrderedDict)
    relock_at: float | None = None
    state_counter: int = 0
    #: Commands run by op (not those answered from the idempotency cache), for tests; not persisted.
    ran: dict[Op, int] = field(default_factory=dict)
    policy: PairingPolicy = field(default_factory=PairingPolicy)
    lie: str | None = None  # the `lie` fault: one of LIE_MODES, not persisted
    #: STATUS's "firmware": the running image (set by the SMP glue after each boot), not persisted.
    firmware: str = FIRMWARE_VERSION
    #: The `fw_unhealthy` fault: the running image answers every command FAILED (not persisted).
    unhealthy: bool = False
    #: Raised by every change to the persisted state (not itself persisted): the state file is
    #: behind while its revision differs (:class:`firmware_sim.persist.LockStore`).
    revision: int = 0

    # --- clock ---------------------------------------------------------------------------

    def clock(self, now: float) -> int:
        """The lock's own clock: wall time plus offset plus drift."""
        return int(now + self.clock_offset_s + now * self.drift_ppm / 1e6)

    # --- pairing -------------------------------------------------------------------------

    def pairing_code(self, now: float) -> str | None:
        """The setup code while pairing is open and not locked out, else None."""
        if now < self.locked_out_until:
            return None
        if self.pairing_open_until == 0.0 and self.paired_gw is None:
            return self.setup_code
        if self.pairing_open_until is not None and now < self.pairing_open_until:
            return self.setup_code
        return None

    def is_locked_out(self, now: float) -> bool:
        return now < self.locked_out_until

    def attempts_left(self) -> int:
        return max(0, self.policy.max_failures - self.failures)

    def press_pairing_button(self, now: float) -> None:
        self.pairing_open_until = now + self.policy.window_s
        self._changed()

    def pairing_attempted(self, now: float) -> None:
        """Count a run as a failure up front; a completed pairing refunds it."""
        self.failures += 1
        if self.failures >= self.policy.max_failures:
            self.locked_out_until = now + self.policy.lockout_s * (2**self.lockouts)
            self.lockouts += 1
            self.failures = 0
        self._changed()

    def paired(self, gw_id: str, ltk: bytes, now: float) -> None:
        self.paired_gw, self.ltk = gw_id, ltk
        self.failures = self.lockouts = 0
        self.locked_out_until = 0.0
        self.pairing_open_until = None
        self._log(now, LogKind.PAIRED, data={"gw": gw_id})
        self._changed()

    def keys(self) -> dict[str, bytes]:
        return {self.paired_gw: self.ltk} if self.paired_gw and self.ltk else {}

    def factory_reset(self) -> None:
        self.paired_gw = self.ltk = None
        self.pairing_open_until = 0.0
        self.results.clear()
        self._changed()

    # --- physical world (faults and timers) ----------------------------------------------

    def tick(self, now: float) -> None:
        if self.relock_at is not None and now >= self.relock_at:
            self.relock_at = None
            if self.state is LockState.UNLOCKED and self.door is DoorState.CLOSED:
                self._actuate(LockState.LOCKED, now, None, source="auto")

    def set_door(self, door: DoorState, now: float) -> None:
        if door is not self.door:
            self.door = door
            kind = LogKind.DOOR_OPENED if door is DoorState.OPEN else LogKind.DOOR_CLOSED
            self._log(now, kind)
            self._changed()

    def manual_turn(self, now: float) -> None:
        """Someone turned the thumb knob inside: toggles the bolt, clears a jam."""
        self.jam_armed = False
        target = LockState.LOCKED if self.state is not LockState.LOCKED else LockState.UNLOCKED
        self.state = target
        self.state_counter += 1
        self._log(now, LogKind.MANUAL, data={"state": str(target)})
        self._changed()

    def set_battery(self, pct: float, now: float) -> None:
        was_low = self.battery_pct < BATTERY_LOW_PCT
        self.battery_pct = max(0.0, min(100.0, pct))
        if self.battery_pct < BATTERY_LOW_PCT and not was_low:
            self._log(now, LogKind.BATTERY_LOW, data={"pct": int(self.battery_pct)})
        self._changed()

    def arm_jam(self) -> None:
        """The next actuation jams (the ``jam`` fault)."""
        self.jam_armed = True
        self._changed()

    def set_clock_offset(self, offset_s: float) -> None:
        """Set the lock's clock this far off wall time (the ``clock_offset`` fault)."""
        self.clock_offset_s = offset_s
        self._changed()

    def set_lie(self, mode: str | None) -> None:
        """Answer every command with hostile values from now on (``None`` ends it)."""
        if mode is not None and mode not in LIE_MODES:
            raise ValueError(f"lie takes one of {sorted(LIE_MODES)} or null")
        self.lie = mode

    # --- commands ------------------------------------------------------------------------

    def execute(self, request: Request, now: float) -> Response:
        """Run a command once: a repeated ``cmd_id`` returns the first result unchanged."""
        return self._told(self._execute(request, now))

    def _execute(self, request: Request, now: float) -> Response:
        cached = self.results.get(request.cmd_id)
        if cached is not None and cached.op is request.op:
            return cached
        if cached is not None:
            return Response(request.op, request.cmd_id, Status.BAD_REQUEST, {"error": "cmd_id reused"})
        response = self._run(request, now)
        if request.op in (Op.UNLOCK, Op.LOCK, Op.ACK_LOG, Op.SET_TIME, Op.UNPAIR):
            self.results[request.cmd_id] = response
            while len(self.results) > COMMAND_CACHE:
                self.results.popitem(last=False)
            self._changed()
        return response

    def _told(self, response: Response) -> Response:
        """The answer as the ``lie`` fault tells it (the command itself ran honestly)."""
        if self.lie is None:
            return response
        if self.lie == "cmd_id":
            return Response(
                response.op, bytes(b ^ 0xFF for b in response.cmd_id), response.status, response.result
            )
        if self.lie == "op":
            other = Op.STATUS if response.op is not Op.STATUS else Op.UNLOCK
            return Response(other, response.cmd_id, response.status, response.result)
        lies = _LIES[self.lie]
        result = {k: lies.get(k, v) for k, v in response.result.items()}
        entries = response.result.get("entries")
        if isinstance(entries, list) and self.lie in {"lock_seq", "time", "huge", "surrogate"}:
            result["entries"] = self._lie_entries(entries)
        return Response(response.op, response.cmd_id, response.status, result)

    def _lie_entries(self, entries: list[cbor.CborValue]) -> list[cbor.CborValue]:
        """A READ_LOG batch with the lie in every entry (one made up if the log is empty)."""
        if self.lie == "huge":  # more entries than asked, the first with a 40-item data map
            return [
                [i, 0, "manual", None, {f"k{j}": j for j in range(40)} if i == 1 else {}]
                for i in range(1, 18)
            ]
        out: list[cbor.CborValue] = []
        for entry in entries or [[1, 0, "manual", None, {}]]:
            assert isinstance(entry, list)
            seq, t, kind, cmd_id, data = entry
            if self.lie == "lock_seq":
                seq = _BIG
            elif self.lie == "time":
                t = -(2**64)
            elif self.lie == "surrogate":
                data = {"state": _RawText("\udfff")}
            out.append([seq, t, kind, cmd_id, data])
        return out

    def _run(self, request: Request, now: float) -> Response:
        op, cmd_id = request.op, request.cmd_id
        self.ran[op] = self.ran.get(op, 0) + 1
        if op in (Op.UNLOCK, Op.LOCK):
            target = LockState.UNLOCKED if op is Op.UNLOCK else LockState.LOCKED
            entry = self._actuate(target, now, cmd_id, source="gateway")
            status = Status.JAMMED if self.state is LockState.JAMMED else Status.OK
            return Response(op, cmd_id, status, {"state": str(self.state), "lock_seq": entry.lock_seq})
        if op is Op.STATUS:
            return Response(op, cmd_id, Status.OK, self.status(now))
        if op is Op.READ_LOG:
            start = int(str(request.args["from"]))
            limit = min(int(str(request.args["max"])), LOG_BATCH_MAX)
            entries = [e for e in self.log if e.lock_seq >= start][:limit]
            return Response(
                op,
                cmd_id,
                Status.OK,
                {"entries": [e.to_cbor() for e in entries], "next": self.next_seq},
            )
        if op is Op.ACK_LOG:
            upto = int(str(request.args["upto"]))
            while self.log and self.log[0].lock_seq <= upto:
                self.log.popleft()
            return Response(op, cmd_id, Status.OK, {"first": self.first_seq()})
        if op is Op.SET_TIME:
            t = int(str(request.args["t"]))
            self.clock_offset_s = t - now - now * self.drift_ppm / 1e6
            self._log(now, LogKind.TIME_SET, data={"t": t})
            return Response(op, cmd_id, Status.OK, {"clock": self.clock(now)})
        if op is Op.SMP_OPEN:
            # The window belongs to the link, so the link driver grants it; a model asked
            # directly has no link to open SMP on.
            return Response(op, cmd_id, Status.BAD_REQUEST, {"error": "no link"})
        # Op.UNPAIR: wipe the key; this session ends when the link drops.
        self._log(now, LogKind.UNPAIRED, data={"gw": self.paired_gw or ""})
        self.paired_gw = self.ltk = None
        self.pairing_open_until = None
        return Response(op, cmd_id, Status.OK, {})

    def first_seq(self) -> int:
        return self.log[0].lock_seq if self.log else self.next_seq

    def status(self, now: float) -> dict[str, cbor.CborValue]:
        return {
            "state": str(self.state),
            "door": str(self.door),
            "battery_pct": int(self.battery_pct),
            "firmware": self.firmware,
            "clock": self.clock(now),
            "log_first": self.first_seq(),
            "log_next": self.next_seq,
            "name": self.name,
        }

    def _actuate(self, target: LockState, now: float, cmd_id: bytes | None, *, source: str) -> LogEntry:
        self._changed()
        if self.jam_armed or self.state is LockState.JAMMED:
            self.jam_armed = False
            self.state = LockState.JAMMED
            self.state_counter += 1
            return self._log(now, LogKind.JAMMED, cmd_id, {"target": str(target), "source": source})
        self.state = target
        self.state_counter += 1
        self.set_battery(self.battery_pct - DRAIN_PER_ACTUATION, now)
        if target is LockState.UNLOCKED and self.auto_relock_s is not None:
            self.relock_at = now + self.auto_relock_s
        kind = LogKind.UNLOCKED if target is LockState.UNLOCKED else LogKind.LOCKED
        return self._log(now, kind, cmd_id, {"source": source})

    def _log(
        self,
        now: float,
        kind: LogKind,
        cmd_id: bytes | None = None,
        data: dict[str, int | str] | None = None,
    ) -> LogEntry:
        if len(self.log) == LOG_CAPACITY:
            # The ring is full of unacknowledged entries: the oldest is lost. The gateway sees
            # the gap in lock_seq and records it (it can only happen after long absences).
            self.log.popleft()
        entry = LogEntry(self.next_seq, self.clock(now), kind, cmd_id, data or {})
        self.next_seq += 1
        self.log.append(entry)
        return entry

    # --- persistence ---------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        b64 = base64.b64encode
        return {
            "lock_id": self.lock_id,
            "setup_code": self.setup_code,
            "name": self.name,
            "state": str(self.state),
            "door": str(self.door),
            "battery_pct": self.battery_pct,
            "clock_offset_s": self.clock_offset_s,
            "drift_ppm": self.drift_ppm,
            "auto_relock_s": self.auto_relock_s,
            "jam_armed": self.jam_armed,
            "paired_gw": self.paired_gw,
            "ltk": b64(self.ltk).decode() if self.ltk else None,
            "pairing_open_until": self.pairing_open_until,
            "failures": self.failures,
            "lockouts": self.lockouts,
            "locked_out_until": self.locked_out_until,
            "next_seq": self.next_seq,
            "state_counter": self.state_counter,
            "log": [b64(cbor.dumps(e.to_cbor())).decode() for e in self.log],
            "results": [
                b64(cbor.dumps([k, int(r.op), int(r.status), dict(r.result)])).decode()
                for k, r in self.results.items()
            ],
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> LockModel:
        b64d = base64.b64decode
        model = cls(lock_id=raw["lock_id"], setup_code=raw["setup_code"], name=raw["name"])
        model.state, model.door = LockState(raw["state"]), DoorState(raw["door"])
        model.battery_pct = float(raw["battery_pct"])
        model.clock_offset_s, model.drift_ppm = (
            float(raw["clock_offset_s"]),
            float(raw["drift_ppm"]),
        )
        model.auto_relock_s = raw["auto_relock_s"]
        model.jam_armed = bool(raw["jam_armed"])
        model.paired_gw = raw["paired_gw"]
        model.ltk = b64d(raw["ltk"]) if raw["ltk"] else None
        model.pairing_open_until = raw["pairing_open_until"]
        model.failures, model.lockouts = int(raw["failures"]), int(raw["lockouts"])
        model.locked_out_until = float(raw["locked_out_until"])
        model.next_seq, model.state_counter = int(raw["next_seq"]), int(raw["state_counter"])
        for item in raw["log"]:
            model.log.append(LogEntry.from_cbor(cbor.loads(b64d(item))))
        for item in raw["results"]:
            decoded = cbor.loads(b64d(item))
            if not isinstance(decoded, list) or len(decoded) != 4:
                raise TypeError("corrupt command cache entry in lock state file")
            key, op, status, result = decoded
            if not (isinstance(key, bytes) and isinstance(op, int) and isinstance(status, int)):
                raise TypeError("corrupt command cache entry in lock state file")
            if not isinstance(result, dict):
                raise TypeError("corrupt command cache entry in lock state file")
            model.results[key] = Response(Op(op), key, Status(status), {str(k): v for k, v in result.items()})
        return model

    def _changed(self) -> None:
        self.revision += 1
