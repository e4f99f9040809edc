"""The edge: wire input parsed once, bounded, into typed models (CONTRACT §4, §8.4, §8.13).

Every surface that takes JSON from outside — MQTT requests and receipts, control-socket lines —
goes through :func:`loads_bounded` and then one pydantic v2 strict model. Past this module the
pipeline sees models, never a raw dict from the wire.

:func:`loads_bounded` refuses, before ``json.loads`` recurses or allocates much:

* a payload over its byte limit;
* nesting deeper than ``MAX_JSON_DEPTH`` (a cheap pre-scan of brackets outside strings, so a
  100 000-deep document costs a regex pass, not a RecursionError);
* invalid UTF-8, ``NaN``/``Infinity``, duplicate keys;
* any text, key or value, that is not valid Unicode (a lone surrogate escape such as
  ``"\\ud800"`` decodes to a Python str that cannot be encoded again: CONTRACT §8.13).

Integers are range-checked by the models (0..2^63−1 where the contract says so).
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Final, Literal, Self, TypedDict, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gateway.errors import LockgwError
from protocols.event_encoding import INT64_MAX

__all__ = [
    "ECHO_LEN",
    "MAX_EVENTS_PAGE",
    "MAX_JSON_DEPTH",
    "MAX_REQUEST_BYTES",
    "MAX_STAGE_CHUNK_BYTES",
    "MAX_TRANSACTION_LEN",
    "SCAN_S_MAX",
    "SCAN_S_MIN",
    "ActuateRequest",
    "ChallengeRequest",
    "ControlAnswer",
    "ControlLine",
    "EmptyRequest",
    "ErrorBody",
    "ErrorResponse",
    "FirmwareApplyRequest",
    "FirmwareStageRequest",
    "JsonObject",
    "LockId",
    "LockRequest",
    "OkResponse",
    "Receipt",
    "ReplayRequest",
    "Response",
    "WireError",
    "error_response",
    "first_error",
    "loads_bounded",
    "ok_response",
    "parse_model",
    "transaction_of",
]

#: Requests larger than this are refused unread (CONTRACT §8.4).
MAX_REQUEST_BYTES: Final = 64 * 1024
#: ``firmware_stage``: image bytes one request carries at most. Its base64url (43,692
#: characters) and the JSON around it fit ``MAX_REQUEST_BYTES`` on MQTT and the control socket.
MAX_STAGE_CHUNK_BYTES: Final = 32 * 1024
#: A request's ``transaction``: a string of at most this many characters (CONTRACT §4).
MAX_TRANSACTION_LEN: Final = 128
#: An identifier from outside (an action, a lock id) is cut to this many characters where a
#: message or a log line repeats it.
ECHO_LEN: Final = 64
#: ``lockgw events``: events per answer at most. ``lockgw scan``: seconds to listen, at least
#: and at most. (The CLI's options and the daemon's arguments check the same bounds.)
MAX_EVENTS_PAGE: Final = 10_000
SCAN_S_MIN: Final = 0.5
SCAN_S_MAX: Final = 60
#: No request, receipt or control line of the contract nests deeper than a few levels.
MAX_JSON_DEPTH: Final = 32
#: Identifiers (lock ids, epochs) are short; anything longer is not one.
MAX_ID_LEN: Final = 256

M = TypeVar("M", bound=BaseModel)

_TOKENS: Final = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


class WireError(LockgwError):
    """Input that is not what the contract allows; the message says what is wrong."""

    code = "invalid_request"


def _depth_ok(payload: bytes, limit: int) -> bool:
    depth = 0
    for m in _TOKENS.finditer(payload):
        c = m.group()
        if c in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return False
        elif c in (b"]", b"}"):
            depth -= 1
    return True


def _no_constants(name: str) -> Any:
    raise WireError(f"{name} is not a JSON number")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise WireError("duplicate key in a JSON object")
    return out


def _check_text(value: Any, depth: int = 0) -> None:
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise WireError("text is not valid Unicode (a lone surrogate escape)") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k, depth + 1)
            _check_text(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_text(v, depth + 1)


def loads_bounded(
    payload: bytes, *, max_bytes: int = MAX_REQUEST_BYTES, max_depth: int = MAX_JSON_DEPTH
) -> Any:
    """Parse JSON from the wire within bounds (module docstring), or raise :class:`WireError`."""
    if len(payload) > max_bytes:
        raise WireError(f"payload of {len(payload)} bytes exceeds {max_bytes}")
    if not _depth_ok(payload, max_depth):
        raise WireError(f"JSON nested deeper than {max_depth}")
    try:
        text = payload.decode("utf-8")
        value = json.loads(text, parse_constant=_no_constants, object_pairs_hook=_pairs)
    except WireError:
        raise
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise WireError("payload is not valid JSON") from exc
    _check_text(value)
    return value


def first_error(exc: ValidationError) -> str:
    """One readable line for the first problem pydantic found, naming the field."""
    err = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "request"
    return f"field {where!r}: {err.get('msg', 'invalid')}"


def parse_model(model: type[M], value: Any) -> M:
    """``value`` (from :func:`loads_bounded`) as ``model``, or :class:`WireError`."""
    if not isinstance(value, dict):
        raise WireError("must be a JSON object")
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise WireError(first_error(exc)) from None


def transaction_of(value: Any) -> str | None:
    """The request's ``transaction`` (CONTRACT §4: a string of at most ``MAX_TRANSACTION_LEN``), or
    :class:`WireError` if it is there and not one. Read first, so later errors can echo it."""
    if not isinstance(value, dict):
        raise WireError("request must be a JSON object")
    tx = value.get("transaction")
    if tx is not None and (not isinstance(tx, str) or len(tx) > MAX_TRANSACTION_LEN):
        raise WireError(f"transaction must be a string of at most {MAX_TRANSACTION_LEN} characters")
    return tx


#: A JSON object on its way out (an answer's ``data``): the last step before ``json.dumps``.
JsonObject = dict[str, object]


class ErrorBody(TypedDict):
    code: str
    message: str


class OkResponse(TypedDict):
    """A request's answer (CONTRACT §4)."""

    transaction: str | None
    status: Literal["ok"]
    data: JsonObject


class ErrorResponse(TypedDict):
    """A request's refusal (CONTRACT §4): the contract's code and a message."""

    transaction: str | None
    status: Literal["error"]
    error: ErrorBody


Response = OkResponse | ErrorResponse


def ok_response(transaction: str | None, data: JsonObject) -> OkResponse:
    return {"transaction": transaction, "status": "ok", "data": data}


def error_response(transaction: str | None, code: str, message: str) -> ErrorResponse:
    """The one error envelope, for every surface that answers a request (MQTT, control socket)."""
    return {"transaction": transaction, "status": "error", "error": {"code": code, "message": message}}


_Strict = ConfigDict(strict=True, extra="ignore", frozen=True)
Seq = Annotated[int, Field(ge=0, le=INT64_MAX)]
LockId = Annotated[str, Field(min_length=1, max_length=MAX_ID_LEN)]
B64 = Annotated[str, Field(max_length=MAX_REQUEST_BYTES)]


class EmptyRequest(BaseModel):
    """``locks``: no fields."""

    model_config = _Strict


class LockRequest(BaseModel):
    """``status``: one lock."""

    model_config = _Strict
    lock: LockId


class ChallengeRequest(LockRequest):
    act: Literal["unlock", "lock"] = "unlock"


class ActuateRequest(LockRequest):
    """``unlock`` / ``lock``: a token, an optional proof, and signed documents a phone may carry
    (installed if valid and newer, CONTRACT §4 and §8.7)."""

    token: B64
    proof: B64 | None = None
    keyring: B64 | None = None
    revocations: B64 | None = None
    time: B64 | None = None


#: An image's SHA-256 as the staging names it: 64 lower-case hex digits.
Sha256Hex = Annotated[str, Field(min_length=64, max_length=64, pattern=r"^[0-9a-f]{64}$")]


class FirmwareApplyRequest(BaseModel):
    """``firmware_apply``: a signed rollout manifest and the MCUboot image it names
    (docs/firmware.md): inline (``image``, base64url, so at most ~45 KiB in one request) or
    staged before with ``firmware_stage`` (``image_sha256``); exactly one of the two."""

    model_config = _Strict
    manifest: B64
    image: B64 | None = None
    image_sha256: Sha256Hex | None = None

    @model_validator(mode="after")
    def _one_image(self) -> Self:
        if (self.image is None) == (self.image_sha256 is None):
            raise ValueError("give exactly one of image (base64url) and image_sha256 (a staged image)")
        return self


class FirmwareStageRequest(BaseModel):
    """``firmware_stage``: ``data`` (base64url, at most ``MAX_STAGE_CHUNK_BYTES`` decoded; empty:
    only ask where the staging stands) at ``offset`` of the image ``sha256`` of ``size`` bytes
    (gateway/firmware/staging.py)."""

    model_config = _Strict
    sha256: Sha256Hex
    size: Annotated[int, Field(ge=1, le=INT64_MAX)]
    offset: Annotated[int, Field(ge=0, le=INT64_MAX)]
    data: Annotated[str, Field(max_length=-(-MAX_STAGE_CHUNK_BYTES // 3) * 4)]


class ReplayRequest(BaseModel):
    model_config = _Strict
    from_seq: Annotated[int, Field(ge=1, le=INT64_MAX)]
    to_seq: Seq | None = None


class Receipt(BaseModel):
    """``B/G/receipt``: central stored every event of ``epoch`` up to ``seq``."""

    model_config = _Strict
    epoch: Annotated[str, Field(max_length=MAX_ID_LEN)]
    seq: Seq


class ControlLine(BaseModel):
    """One control-socket request line: ``{"cmd": str, "args": {...}}``; each command parses
    its ``args`` into its own model (gateway/cli/commands.py)."""

    model_config = _Strict
    cmd: Annotated[str, Field(min_length=1, max_length=64)]
    args: JsonObject = Field(default_factory=dict)


class ControlAnswer(BaseModel):
    """A control command's answer (CONTRACT §6's exit codes): ``{"ok", "exit", "data"}``, or
    ``{"ok": false, "exit", "error", "code"?, "data"?}``. Built by the daemon's commands, encoded
    by :meth:`as_json` (the one encoder), and parsed back by the CLI with :meth:`parse`."""

    model_config = _Strict
    ok: bool
    exit: Annotated[int, Field(ge=0, le=255)]
    data: JsonObject | None = None
    error: str | None = None
    code: str | None = None

    @classmethod
    def done(cls, data: JsonObject, *, exit_code: int = 0) -> ControlAnswer:
        return cls(ok=True, exit=exit_code, data=data)

    @classmethod
    def refused(
        cls, message: str, *, exit_code: int = 1, code: str | None = None, data: JsonObject | None = None
    ) -> ControlAnswer:
        return cls(ok=False, exit=exit_code, error=message, code=code or None, data=data)

    @classmethod
    def parse(cls, value: object) -> ControlAnswer:
        """The daemon's answer line (already bounded JSON) as an answer, or :class:`WireError`."""
        return parse_model(cls, value)

    def as_json(self) -> JsonObject:
        out: JsonObject = {"ok": self.ok, "exit": self.exit}
        if self.error is not None:
            out["error"] = self.error
        if self.code is not None:
            out["code"] = self.code
        if self.data is not None:
            out["data"] = self.data
        return out
