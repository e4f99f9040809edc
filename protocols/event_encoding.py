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
    "canonical_json",
    "event_hash",
    "format_ts",
    "seal_event",
    "seal_event_json",
    "verify_chain",
]

GENESIS: Final = "0" * 64
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
    }
)


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
