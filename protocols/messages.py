"""Command and response messages carried inside the AEAD session, and their policy.

A request is the CBOR map ``{0: op, 1: cmd_id, 2: args}`` and a response
``{0: op, 1: cmd_id, 2: status, 3: result}``. ``cmd_id`` is 16 random bytes chosen by the
gateway: the lock remembers the result of recent ids, so a retried command (same id after a
lost response or a dropped link) returns the first result and never actuates twice.

:data:`LINK_POLICY` is the role × command table: every ``(LinkRole, Op)`` pair has an explicit
entry, and anything not allowed is refused with ``Status.DENIED``. A test fails when a new
``Op`` lacks an entry.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, TypeVar

from protocols import cbor
from protocols.errors import CborError, RemoteProtocolError
from protocols.limits import (
    COMMAND_ID_LEN,
    LOG_BATCH_MAX,
    MAX_ID_LEN,
    MAX_INT64,
    MAX_LOCK_TEXT_LEN,
    MAX_LOG_DATA_ITEMS,
    MAX_LOG_DATA_KEY_LEN,
    MIN_INT64,
)

__all__ = [
    "LINK_POLICY",
    "SMP_WINDOW_MAX_S",
    "DoorState",
    "ErrorCode",
    "LinkRole",
    "LockState",
    "LockStatus",
    "LogEntry",
    "LogKind",
    "Op",
    "Request",
    "Response",
    "Status",
    "check_result",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "is_allowed",
    "parse_ack",
    "parse_actuation",
    "parse_log",
    "parse_set_time",
    "parse_smp_open",
    "parse_status",
    "validate_id",
]


class Op(enum.IntEnum):
    UNLOCK = 1
    LOCK = 2
    STATUS = 3
    READ_LOG = 4
    ACK_LOG = 5
    SET_TIME = 6
    UNPAIR = 7
    SMP_OPEN = 8  # open the lock's SMP (firmware update) service to this link for "secs"


#: Longest SMP window one SMP_OPEN grants (docs/protocol.md §5, docs/firmware.md): an upload of
#: a few hundred KiB at BLE speeds plus test and reset; the gateway renews it per step.
SMP_WINDOW_MAX_S: Final = 600


class Status(enum.IntEnum):
    OK = 0
    JAMMED = 1
    BAD_REQUEST = 2
    DENIED = 3
    BUSY = 4
    FAILED = 5


class ErrorCode(enum.IntEnum):
    """Codes of plaintext ``ERROR`` frames; each ends the link."""

    NOT_PAIRED = 1
    NOT_IN_PAIRING_MODE = 2
    PAIRING_FAILED = 3
    RATE_LIMITED = 4
    BAD_STATE = 5
    ALREADY_PAIRED = 6
    BAD_FRAME = 7


class LinkRole(enum.Enum):
    """Who is on the other end of a lock link, as the lock sees it."""

    UNAUTHENTICATED = "unauthenticated"
    GATEWAY = "gateway"


class LockState(enum.StrEnum):
    LOCKED = "locked"
    UNLOCKED = "unlocked"
    JAMMED = "jammed"
    UNKNOWN = "unknown"


class DoorState(enum.StrEnum):
    OPEN = "open"
    CLOSED = "closed"
    UNKNOWN = "unknown"


class LogKind(enum.StrEnum):
    """What a lock writes to its own log (forwarded as ``lock.*`` events)."""

    UNLOCKED = "unlocked"
    LOCKED = "locked"
    JAMMED = "jammed"
    DOOR_OPENED = "door_opened"
    DOOR_CLOSED = "door_closed"
    BATTERY_LOW = "battery_low"
    MANUAL = "manual"
    PAIRED = "paired"
    UNPAIRED = "unpaired"
    TIME_SET = "time_set"
    LOG_OVERFLOW = "log_overflow"


#: Role × command: True allows. Deny by default; every pair is listed on purpose.
LINK_POLICY: Final[Mapping[tuple[LinkRole, Op], bool]] = {
    **{(LinkRole.UNAUTHENTICATED, op): False for op in Op},
    (LinkRole.GATEWAY, Op.UNLOCK): True,
    (LinkRole.GATEWAY, Op.LOCK): True,
    (LinkRole.GATEWAY, Op.STATUS): True,
    (LinkRole.GATEWAY, Op.READ_LOG): True,
    (LinkRole.GATEWAY, Op.ACK_LOG): True,
    (LinkRole.GATEWAY, Op.SET_TIME): True,
    (LinkRole.GATEWAY, Op.UNPAIR): True,
    (LinkRole.GATEWAY, Op.SMP_OPEN): True,
}


def is_allowed(role: LinkRole, op: Op) -> bool:
    """Look ``(role, op)`` up in :data:`LINK_POLICY`; a missing pair is a denial."""
    return LINK_POLICY.get((role, op), False)


_ID_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")


def validate_id(value: object, what: str) -> str:
    """Gateway and lock ids use the contract's alphabet ``[a-z0-9][a-z0-9-]{0,63}``."""
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= MAX_ID_LEN
        or not set(value) <= _ID_CHARS
        or value[0] == "-"
    ):
        raise RemoteProtocolError(f"{what} is not a valid id", code="bad_message")
    return value


def _is_int(v: object) -> bool:
    """A signed 64-bit integer (never a bool)."""
    return isinstance(v, int) and not isinstance(v, bool) and MIN_INT64 <= v <= MAX_INT64


def _is_uint(v: object) -> bool:
    """An integer in 0..2**63 - 1 (CONTRACT §8.13)."""
    return _is_int(v) and isinstance(v, int) and v >= 0


def _is_text(v: object, max_len: int) -> bool:
    """Valid Unicode (no lone surrogates) of at most ``max_len`` characters."""
    if not isinstance(v, str) or len(v) > max_len:
        return False
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One entry of a lock's own log; :meth:`from_cbor` range-checks every field."""

    lock_seq: int
    t: int
    kind: LogKind
    cmd_id: bytes | None = None
    data: Mapping[str, int | str] = field(default_factory=dict)

    def to_cbor(self) -> cbor.CborValue:
        return [self.lock_seq, self.t, str(self.kind), self.cmd_id, dict(self.data)]

    def event_data(self) -> dict[str, object]:
        """The ``data`` of the event this entry becomes. The gateway's fields come from the
        checked entry; the lock's own map is kept apart under ``lock_data``, so a lock can never
        set ``lock_seq``, ``kind``, ``cmd_id``, ``source``, ``lock_time`` (or ``flags``,
        ``alarm``, ...) of an event."""
        return {
            "lock_seq": self.lock_seq,
            "lock_time": self.t,
            "kind": str(self.kind),
            "cmd_id": self.cmd_id.hex() if self.cmd_id is not None else None,
            "lock_data": dict(self.data),
        }

    @classmethod
    def from_cbor(cls, value: cbor.CborValue) -> LogEntry:
        if not isinstance(value, list) or len(value) != 5:
            raise RemoteProtocolError("log entry is not a 5-element array", code="bad_message")
        seq, t, kind, cmd_id, data = value
        if not _is_uint(seq) or not isinstance(seq, int) or seq < 1:
            raise RemoteProtocolError(f"log entry lock_seq out of range: {_short(seq)}", code="bad_message")
        if not _is_int(t) or not isinstance(t, int):
            raise RemoteProtocolError(f"log entry time out of range: {_short(t)}", code="bad_message")
        if not _is_text(kind, MAX_LOCK_TEXT_LEN) or kind not in LogKind._value2member_map_:
            raise RemoteProtocolError(f"unknown log kind {_short(kind)}", code="bad_message")
        if cmd_id is not None and (not isinstance(cmd_id, bytes) or len(cmd_id) != COMMAND_ID_LEN):
            raise RemoteProtocolError("log entry cmd_id malformed", code="bad_message")
        if (
            not isinstance(data, dict)
            or len(data) > MAX_LOG_DATA_ITEMS
            or not all(
                _is_text(k, MAX_LOG_DATA_KEY_LEN) and k and (_is_int(v) or _is_text(v, MAX_LOCK_TEXT_LEN))
                for k, v in data.items()
            )
        ):
            raise RemoteProtocolError(
                f"log entry data must be a flat map of ≤ {MAX_LOG_DATA_ITEMS} short items",
                code="bad_message",
            )
        clean = {str(k): v for k, v in data.items() if isinstance(v, int | str)}
        return cls(seq, t, LogKind(str(kind)), cmd_id, clean)


def _short(v: object) -> str:
    """A bounded rendering of a hostile value for an error message."""
    text = ascii(v)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True, slots=True)
class Request:
    op: Op
    cmd_id: bytes
    args: Mapping[str, cbor.CborValue] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Response:
    op: Op
    cmd_id: bytes
    status: Status
    result: Mapping[str, cbor.CborValue] = field(default_factory=dict)


# Argument schema per op: name -> validator. Unknown or missing names are a BAD_REQUEST.
_ARGS: Final[Mapping[Op, Mapping[str, object]]] = {
    Op.UNLOCK: {},
    Op.LOCK: {},
    Op.STATUS: {},
    Op.READ_LOG: {"from": _is_uint, "max": lambda v: _is_uint(v) and 1 <= v <= LOG_BATCH_MAX},
    Op.ACK_LOG: {"upto": _is_uint},
    Op.SET_TIME: {"t": _is_int},
    Op.UNPAIR: {},
    Op.SMP_OPEN: {"secs": lambda v: _is_uint(v) and 1 <= v <= SMP_WINDOW_MAX_S},
}


def encode_request(request: Request) -> bytes:
    return cbor.dumps({0: int(request.op), 1: request.cmd_id, 2: dict(request.args)})


def decode_request(data: bytes) -> Request:
    """Parse and validate a request; any defect is a RemoteProtocolError(code=bad_message)."""
    try:
        value = cbor.loads(data)
    except CborError as exc:
        raise RemoteProtocolError(f"request is not CBOR: {exc}", code="bad_message") from exc
    if not isinstance(value, dict) or set(value) != {0, 1, 2}:
        raise RemoteProtocolError("request must be {0: op, 1: cmd_id, 2: args}", code="bad_message")
    op_raw, cmd_id, args = value[0], value[1], value[2]
    if not isinstance(cmd_id, bytes) or len(cmd_id) != COMMAND_ID_LEN:
        raise RemoteProtocolError("cmd_id must be 16 bytes", code="bad_message")
    if not _is_uint(op_raw) or op_raw not in Op._value2member_map_:
        raise RemoteProtocolError(f"unknown op {op_raw!r}", code="unknown_op")
    op = Op(op_raw)
    if not isinstance(args, dict):
        raise RemoteProtocolError("args must be a map", code="bad_message")
    schema = _ARGS[op]
    if set(args) != set(schema):
        raise RemoteProtocolError(f"{op.name} takes args {sorted(schema)}", code="bad_message")
    for name, check in schema.items():
        if not callable(check) or not check(args[name]):
            raise RemoteProtocolError(f"{op.name} arg {name!r} out of range", code="bad_message")
    return Request(op, cmd_id, {str(k): v for k, v in args.items()})


def encode_response(response: Response) -> bytes:
    return cbor.dumps(
        {0: int(response.op), 1: response.cmd_id, 2: int(response.status), 3: dict(response.result)}
    )


def decode_response(data: bytes) -> Response:
    try:
        value = cbor.loads(data)
    except CborError as exc:
        raise RemoteProtocolError(f"response is not CBOR: {exc}", code="bad_message") from exc
    if not isinstance(value, dict) or set(value) != {0, 1, 2, 3}:
        raise RemoteProtocolError("response must be {0, 1, 2, 3}", code="bad_message")
    op_raw, cmd_id, status_raw, result = value[0], value[1], value[2], value[3]
    if not _is_uint(op_raw) or op_raw not in Op._value2member_map_:
        raise RemoteProtocolError(f"unknown op {op_raw!r} in response", code="bad_message")
    if not _is_uint(status_raw) or status_raw not in Status._value2member_map_:
        raise RemoteProtocolError(f"unknown status {status_raw!r}", code="bad_message")
    if not isinstance(cmd_id, bytes) or len(cmd_id) != COMMAND_ID_LEN:
        raise RemoteProtocolError("cmd_id must be 16 bytes", code="bad_message")
    if not isinstance(result, dict) or not all(isinstance(k, str) for k in result):
        raise RemoteProtocolError("result must be a map with text keys", code="bad_message")
    return Response(Op(op_raw), cmd_id, Status(status_raw), {str(k): v for k, v in result.items()})


# --- typed views of lock results (a hostile lock's result is refused, never trusted) ---------
#
# Every value a lock sends is range-checked here (CONTRACT §8.13, THREATS B7): integers fit
# 0..2**63 - 1 (lock_seq ≥ 1; the clock is any signed 64-bit value), battery 0..100, text is
# valid Unicode of bounded length. A defect is a RemoteProtocolError(code="bad_message"); the
# gateway's session raises it on receipt (:func:`check_result`), which ends that link.


@dataclass(frozen=True, slots=True)
class LockStatus:
    state: LockState
    door: DoorState
    battery_pct: int
    firmware: str
    clock: int
    log_first: int
    log_next: int
    name: str


_E = TypeVar("_E", bound=enum.StrEnum)


def _bad(name: str, value: object) -> RemoteProtocolError:
    return RemoteProtocolError(
        f"lock result field {name!r} missing, malformed or out of range: {_short(value)}",
        code="bad_message",
    )


def _int_field(result: Mapping[str, cbor.CborValue], name: str, lo: int, hi: int) -> int:
    value = result.get(name)
    if not _is_int(value) or not isinstance(value, int) or not lo <= value <= hi:
        raise _bad(name, value)
    return value


def _text_field(result: Mapping[str, cbor.CborValue], name: str) -> str:
    value = result.get(name)
    if not _is_text(value, MAX_LOCK_TEXT_LEN) or not isinstance(value, str):
        raise _bad(name, value)
    return value


def _enum_field(result: Mapping[str, cbor.CborValue], name: str, kind: type[_E]) -> _E:
    value = result.get(name)
    if not isinstance(value, str) or value not in kind._value2member_map_:
        raise RemoteProtocolError(f"lock reported an unknown {name}: {_short(value)}", code="bad_message")
    return kind(value)


def parse_status(result: Mapping[str, cbor.CborValue]) -> LockStatus:
    return LockStatus(
        _enum_field(result, "state", LockState),
        _enum_field(result, "door", DoorState),
        _int_field(result, "battery_pct", 0, 100),
        _text_field(result, "firmware"),
        _int_field(result, "clock", MIN_INT64, MAX_INT64),
        _int_field(result, "log_first", 0, MAX_INT64),
        _int_field(result, "log_next", 0, MAX_INT64),
        _text_field(result, "name"),
    )


def parse_actuation(result: Mapping[str, cbor.CborValue]) -> tuple[LockState, int]:
    """``(state, lock_seq)`` of an UNLOCK/LOCK result."""
    return _enum_field(result, "state", LockState), _int_field(result, "lock_seq", 1, MAX_INT64)


def parse_log(result: Mapping[str, cbor.CborValue]) -> tuple[list[LogEntry], int]:
    """``(entries, next_seq)`` of a READ_LOG result; entries must ascend strictly."""
    raw = result.get("entries")
    if not isinstance(raw, list):
        raise _bad("entries", raw)
    if len(raw) > LOG_BATCH_MAX:
        raise RemoteProtocolError("lock returned more log entries than asked", code="bad_message")
    entries = [LogEntry.from_cbor(item) for item in raw]
    seqs = [e.lock_seq for e in entries]
    if seqs != sorted(set(seqs)):
        raise RemoteProtocolError("lock log entries out of order", code="bad_message")
    return entries, _int_field(result, "next", 0, MAX_INT64)


def parse_ack(result: Mapping[str, cbor.CborValue]) -> int:
    """``first`` (the lowest lock_seq the lock still keeps) of an ACK_LOG result."""
    return _int_field(result, "first", 0, MAX_INT64)


def parse_set_time(result: Mapping[str, cbor.CborValue]) -> int:
    """``clock`` (the lock's clock after setting it) of a SET_TIME result."""
    return _int_field(result, "clock", MIN_INT64, MAX_INT64)


def parse_smp_open(result: Mapping[str, cbor.CborValue]) -> int:
    """``secs`` (how long the lock keeps SMP open to this link) of an SMP_OPEN result."""
    return _int_field(result, "secs", 1, SMP_WINDOW_MAX_S)


def check_result(response: Response) -> None:
    """Range-check a response's result as its op defines it (raises RemoteProtocolError).

    Results of OK answers are checked for every op, and actuation results of JAMMED answers
    too (they carry the jam's lock_seq); other statuses carry no values the gateway uses.
    """
    op, status = response.op, response.status
    if op in (Op.UNLOCK, Op.LOCK):
        if status in (Status.OK, Status.JAMMED):
            parse_actuation(response.result)
    elif status is not Status.OK or op is Op.UNPAIR:
        return
    elif op is Op.STATUS:
        parse_status(response.result)
    elif op is Op.READ_LOG:
        parse_log(response.result)
    elif op is Op.ACK_LOG:
        parse_ack(response.result)
    elif op is Op.SMP_OPEN:
        parse_smp_open(response.result)
    else:  # Op.SET_TIME
        parse_set_time(response.result)
