"""Events (CONTRACT §5): canonical JSON, hash chain and ids. Pure.

``hash`` is SHA-256 (hex) of the event's canonical JSON — sorted keys, no spaces, UTF-8 —
without the ``hash`` and ``replayed`` fields; ``prev`` is the previous event's hash, 64 zeros
for seq 1. Consumers deduplicate on ``id`` (``G/E/seq``) and detect gaps from ``seq``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping
from typing import Any, Final

__all__ = [
    "EVENT_TYPES",
    "GENESIS",
    "INT64_MAX",
    "INT64_MIN",
    "MAX_FIELD_DEPTH",
    "EventFieldError",
    "canonical_json",
    "check_fields",
    "event_hash",
    "format_ts",
    "seal_event",
    "seal_event_json",
    "verify_chain",
]

GENESIS: Final = "0" * 64
INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1
#: Nesting of an event's fields (the envelope is level 1, ``data`` level 2, …).
MAX_FIELD_DEPTH: Final = 8
#: One text value of an event at most (characters).
MAX_TEXT_LEN: Final = 16 * 1024
#: Set by the outbox, never by the caller's fields.
_ENVELOPE_KEYS: Final = frozenset({"v", "gw", "site", "epoch", "seq", "id", "prev", "hash", "replayed"})

EVENT_TYPES: Final = frozenset(
    {
        "gateway.started",
        "gateway.stopping",
        "access.granted",
        "access.denied",
        "access.failed",
        "lock.unlocked",
        "lock.locked",
        "lock.jammed",
        "lock.door_opened",
        "lock.door_closed",
        "lock.battery_low",
        "lock.manual",
        "lock.log",
        "lock.paired",
        "lock.unpaired",
        "lock.unreachable",
        "lock.reachable",
        "trust.installed",
        "trust.rejected",
        "trust.expiring",
        "trust.expired",
        "time.state_changed",
        # docs/contract-additions-firmware.md §5
        "firmware.staged",
        "firmware.uploading",
        "firmware.testing",
        "firmware.confirmed",
        "firmware.reverted",
        "firmware.refused",
        "firmware.failed",
        "firmware.halted",
        "firmware.done",
    }
)


class EventFieldError(ValueError):
    """An event field that cannot be stored and hashed as it is (the message names it)."""


def check_fields(fields: Mapping[str, Any]) -> None:
    """Raise ValueError, naming the field, unless every value of an event's fields can be stored
    and hashed as they are: JSON types only (``None``, bool, int, finite float, str, list, tuple,
    dict with text keys), ints within int64, text that is valid Unicode (no lone surrogates) and at
    most ``MAX_TEXT_LEN`` characters, nesting at most ``MAX_FIELD_DEPTH``; ``type`` is text and
    ``lock`` text or null. Run by the caller before an event is queued, so the one writer never
    meets a value it cannot encode (CONTRACT §8.13)."""
    if not isinstance(fields.get("type"), str):
        raise EventFieldError("event field 'type' must be text")
    if not isinstance(fields.get("lock"), str | None):
        raise EventFieldError("event field 'lock' must be text or null")
    _check_value(fields, "event", 1)


def _check_text(value: str, where: str) -> None:
    if len(value) > MAX_TEXT_LEN:
        raise EventFieldError(f"{where}: text longer than {MAX_TEXT_LEN} characters")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise EventFieldError(f"{where}: text is not valid Unicode (a lone surrogate)") from exc


def _check_value(value: object, where: str, depth: int) -> None:  # noqa: C901, PLR0912 - one branch per JSON type
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise EventFieldError(f"{where}: integer outside the int64 range")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise EventFieldError(f"{where}: number is not finite")
    elif isinstance(value, str):
        _check_text(value, where)
    elif isinstance(value, Mapping | list | tuple):
        if depth > MAX_FIELD_DEPTH:
            raise EventFieldError(f"{where}: nested deeper than {MAX_FIELD_DEPTH}")
        if isinstance(value, Mapping):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise EventFieldError(f"{where}: a key is not text")
                _check_text(key, where)
                _check_value(item, f"{where}.{key[:32]}", depth + 1)
        else:
            for item in value:
                _check_value(item, f"{where}[]", depth + 1)
    else:
        raise EventFieldError(f"{where}: {type(value).__name__} is not a JSON value")


def canonical_json(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def event_hash(event: Mapping[str, Any]) -> str:
    body = {k: v for k, v in event.items() if k not in ("hash", "replayed")}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def format_ts(wall: float) -> str:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-11-22T10:00:00.123Z`` (truncated, not rounded).

    Hand-formatted from ``gmtime``: it runs once per event on the outbox's commit path, where
    ``datetime.strftime`` cost four times as much."""
    secs, ms = divmod(math.floor(wall * 1000), 1000)
    t = time.gmtime(secs)
    return "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ" % (  # noqa: UP031 - fastest formatting here
        t.tm_year,
        t.tm_mon,
        t.tm_mday,
        t.tm_hour,
        t.tm_min,
        t.tm_sec,
        ms,
    )


def seal_event(
    fields: Mapping[str, Any], *, gw: str, site: str, epoch: str, seq: int, prev: str, wall: float
) -> dict[str, Any]:
    """Complete an event with its envelope, ``prev`` and ``hash``."""
    return seal_event_json(fields, gw=gw, site=site, epoch=epoch, seq=seq, prev=prev, wall=wall)[0]


def _envelope(
    fields: Mapping[str, Any], *, gw: str, site: str, epoch: str, seq: int, prev: str, wall: float
) -> dict[str, Any]:
    event: dict[str, Any] = {
        "v": 1,
        "gw": gw,
        "site": site,
        "epoch": epoch,
        "seq": seq,
        "id": f"{gw}/{epoch}/{seq}",
        "ts": format_ts(wall),
        "time_state": "unknown",
        "trust_state": "ok",
        "type": "",
        "lock": None,
        "outcome": "ok",
        "reason": None,
        "sub": None,
        "cti": None,
        "role": None,
        "transaction": None,
        "data": {},
    }
    event.update({k: v for k, v in fields.items() if k not in _ENVELOPE_KEYS})
    event["prev"] = prev
    return event


def seal_event_json(
    fields: Mapping[str, Any], *, gw: str, site: str, epoch: str, seq: int, prev: str, wall: float
) -> tuple[dict[str, Any], str]:
    """:func:`seal_event`, plus the event as JSON text made from the canonical body it hashed:
    one serialisation per event instead of two (the outbox stores this text). ``hash`` goes last,
    which is still valid JSON; consumers must not rely on key order (the hash is over the sorted
    form, recomputed by :func:`event_hash`)."""
    event = _envelope(fields, gw=gw, site=site, epoch=epoch, seq=seq, prev=prev, wall=wall)
    body = canonical_json(event)
    digest = hashlib.sha256(body).hexdigest()
    event["hash"] = digest
    return event, body[:-1].decode("utf-8") + f',"hash":"{digest}"}}'


def verify_chain(events: list[Mapping[str, Any]], *, prev: str = GENESIS) -> None:
    """Raise ValueError at the first gap, broken link or wrong hash."""
    expected_seq = events[0]["seq"] if events else 1
    for event in events:
        if event["seq"] != expected_seq:
            raise ValueError(f"gap: expected seq {expected_seq}, got {event['seq']}")
        if event["prev"] != prev:
            raise ValueError(f"seq {event['seq']}: prev does not match the previous hash")
        if event_hash(event) != event["hash"]:
            raise ValueError(f"seq {event['seq']}: hash mismatch")
        prev, expected_seq = event["hash"], expected_seq + 1
