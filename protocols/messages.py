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
from typing import Final

from protocols import cbor
from protocols.errors import CborError, RemoteProtocolError
from protocols.limits import COMMAND_ID_LEN, LOG_BATCH_MAX, MAX_ID_LEN

__all__ = [
    "LINK_POLICY",
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
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "is_allowed",
    "parse_actuation",
    "parse_log",
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


@dataclass(frozen=True, slots=True)
class LogEntry:
    lock_seq: int
    t: int
    kind: LogKind
    cmd_id: bytes | None = None
    data: Mapping[str, int | str] = field(default_factory=dict)

    def to_cbor(self) -> cbor.CborValue:
        return [self.lock_seq, self.t, str(self.kind), self.cmd_id, dict(self.data)]

    @classmethod
    def from_cbor(cls, value: cbor.CborValue) -> LogEntry:
        if not isinstance(value, list) or len(value) != 5:
            raise RemoteProtocolError("log entry is not a 5-element array", code="bad_message")
        seq, t, kind, cmd_id, data = value
        if not _is_uint(seq) or not _is_int(t) or not isinstance(kind, str):
            raise RemoteProtocolError("log entry fields have wrong types", code="bad_message")
        if cmd_id is not None and (not isinstance(cmd_id, bytes) or len(cmd_id) != COMMAND_ID_LEN):
            raise RemoteProtocolError("log entry cmd_id malformed", code="bad_message")
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and (_is_int(v) or isinstance(v, str)) for k, v in data.items()
        ):
            raise RemoteProtocolError("log entry data malformed", code="bad_message")
        try:
            log_kind = LogKind(kind)
        except ValueError as exc:
            raise RemoteProtocolError(f"unknown log kind {kind!r}", code="bad_message") from exc
        clean = {str(k): v for k, v in data.items() if isinstance(v, int | str)}
        return cls(seq, t, log_kind, cmd_id, clean)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**63


def _is_uint(v: object) -> bool:
    return _is_int(v) and isinstance(v, int) and v >= 0


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


def _field(result: Mapping[str, cbor.CborValue], name: str, kind: type) -> object:
    value = result.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RemoteProtocolError(f"lock result field {name!r} missing or malformed", code="bad_message")
    return value


def parse_status(result: Mapping[str, cbor.CborValue]) -> LockStatus:
    try:
        state = LockState(str(_field(result, "state", str)))
        door = DoorState(str(_field(result, "door", str)))
    except ValueError as exc:
        raise RemoteProtocolError(f"lock reported an unknown state: {exc}", code="bad_message") from exc
    battery = int(str(_field(result, "battery_pct", int)))
    firmware, name = str(_field(result, "firmware", str)), str(_field(result, "name", str))
    if not 0 <= battery <= 100 or len(firmware) > 64 or len(name) > 64:
        raise RemoteProtocolError("lock status out of range", code="bad_message")
    return LockStatus(
        state,
        door,
        battery,
        firmware,
        int(str(_field(result, "clock", int))),
        int(str(_field(result, "log_first", int))),
        int(str(_field(result, "log_next", int))),
        name,
    )


def parse_actuation(result: Mapping[str, cbor.CborValue]) -> tuple[LockState, int]:
    """``(state, lock_seq)`` of an UNLOCK/LOCK result."""
    try:
        state = LockState(str(_field(result, "state", str)))
    except ValueError as exc:
        raise RemoteProtocolError(f"lock reported an unknown state: {exc}", code="bad_message") from exc
    return state, int(str(_field(result, "lock_seq", int)))


def parse_log(result: Mapping[str, cbor.CborValue]) -> tuple[list[LogEntry], int]:
    """``(entries, next_seq)`` of a READ_LOG result; entries must ascend strictly."""
    raw = _field(result, "entries", list)
    assert isinstance(raw, list)
    if len(raw) > LOG_BATCH_MAX:
        raise RemoteProtocolError("lock returned more log entries than asked", code="bad_message")
    entries = [LogEntry.from_cbor(item) for item in raw]
    seqs = [e.lock_seq for e in entries]
    if seqs != sorted(set(seqs)):
        raise RemoteProtocolError("lock log entries out of order", code="bad_message")
    return entries, int(str(_field(result, "next", int)))
