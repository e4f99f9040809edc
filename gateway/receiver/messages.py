"""What arrives from the broker, parsed once and bounded, and the chain decisions. Pure.

:func:`parse` turns one broker message (its MQTT topic and raw bytes) into an
:class:`Event`, a :class:`Heartbeat`, an :class:`Availability`, a :class:`BridgeState` — or
raises :class:`Malformed`, whose reason goes with the raw bytes into the ``quarantine`` table. An
event is accepted for storage only if it is what CONTRACT §5 says: a JSON object within bounds
(:func:`_loads_event`, ``gateway.wire.loads_bounded``'s bounds on the hot path: size, depth,
duplicate keys, NaN, lone surrogates), ``v`` 1, ``gw``
equal to the topic's G, ``id`` = ``G/E/seq``, seq in 1..2^63−1, and ``hash`` equal to the
SHA-256 of its canonical JSON (a message whose own hash is wrong is forged or corrupt: it has
no place in any chain and is quarantined, not a conflict).

:func:`classify` decides, for a batch of well-formed events and what PostgreSQL already holds
around them (each event's seq−1, seq and seq+1), which are new, which are duplicates (same id,
same hash: dropped, the receipt is sent again), and which are **conflicts**: a seq reused with
other content (``seq_reuse``) or an event whose ``prev`` does not match the stored predecessor's
hash, or whose hash is not the stored successor's ``prev`` (``chain_break``). A conflict is kept
in the ``conflicts`` table and never stored over anything; the seq it claims stays a gap, so
receipts never pass a chain that does not verify and the gateway keeps those events.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.wire import WireError, loads_bounded, parse_model
from protocols.event_encoding import GENESIS, INT64_MAX, event_hash

__all__ = [
    "MAX_EVENT_BYTES",
    "Availability",
    "BridgeState",
    "Classified",
    "Conflict",
    "Event",
    "Heartbeat",
    "Malformed",
    "StreamKey",
    "classify",
    "parse",
    "split_topic",
]

#: An event is a few hundred bytes; the gateway bounds each text field to 16 Ki characters.
MAX_EVENT_BYTES: Final = 256 * 1024
#: The gateway's events nest at most 8 levels (protocols.event_encoding.MAX_FIELD_DEPTH).
MAX_EVENT_DEPTH: Final = 10
#: Heartbeats and availability are small and flat.
MAX_SMALL_BYTES: Final = 16 * 1024
_GW: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
_EPOCH: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_HEX64: Final = re.compile(r"[0-9a-f]{64}")
_SURROGATE_ESCAPE: Final = re.compile(rb"\\u[dD][89a-fA-F]")

StreamKey = tuple[str, str]  # (gw, epoch)


class Malformed(ValueError):
    """A message that is not what the contract allows (the reason is stored with its bytes)."""


@dataclass(frozen=True, slots=True)
class Event:
    gw: str
    epoch: str
    seq: int
    id: str
    site: str
    type: str
    ts: str
    hash: str
    prev: str
    replayed: bool
    #: The exact JSON received (UTF-8 text): what is stored, re-verifiable at any time.
    body: str

    @property
    def stream(self) -> StreamKey:
        return self.gw, self.epoch


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


Seq = Annotated[int, Field(ge=0, le=INT64_MAX)]


class Heartbeat(_Strict):
    """``B/G/heartbeat`` (CONTRACT §4)."""

    gw: str = ""
    epoch: Annotated[str, Field(pattern=_EPOCH.pattern)]
    last_seq: Seq
    receipt_seq: Seq
    backlog: Seq = 0
    ts: int | float = 0
    time_state: Annotated[str, Field(max_length=32)] = "unknown"
    #: Stored as text[] (joined with U+001F on the way in): neither NUL, which PostgreSQL text
    #: cannot hold (the batch would never commit), nor the separator.
    alarms: Annotated[
        list[Annotated[str, Field(max_length=128, pattern=r"^[^\x00\x1f]*$")]], Field(max_length=64)
    ] = Field(default_factory=list)


class Availability(_Strict):
    """``B/G/availability``: ``online``, or the will / stop message ``offline``."""

    gw: str = ""
    state: Literal["online", "offline"]


@dataclass(frozen=True, slots=True)
class BridgeState:
    """``B/G/bridge``: a site broker's bridge notification (mosquitto ``notification_topic``,
    payload ``1`` connected / ``0`` not, the latter also its will on the central broker)."""

    gw: str
    up: bool


Parsed = Event | Heartbeat | Availability | BridgeState


def split_topic(topic: str, base: str) -> tuple[str, str]:
    """``B/G/kind`` → (G, kind), or :class:`Malformed`."""
    parts = topic.split("/")
    if len(parts) != 3 or parts[0] != base or not _GW.fullmatch(parts[1]):
        raise Malformed(f"topic {topic[:200]!r} is not {base}/G/<kind>")
    return parts[1], parts[2]


def _text(obj: Mapping[str, Any], key: str, *, max_len: int = 256, nullable: bool = False) -> str:
    value = obj.get(key)
    if value is None and nullable:
        return ""
    if not isinstance(value, str) or len(value) > max_len:
        raise Malformed(f"field {key!r} must be text of at most {max_len} characters")
    if "\x00" in value:  # a PostgreSQL text column cannot hold it: the batch would never commit
        raise Malformed(f"field {key!r} holds a NUL character")
    return value


def parse(topic: str, payload: bytes, *, base: str) -> Parsed:
    """One broker message, typed (module docstring), or :class:`Malformed`."""
    gw, kind = split_topic(topic, base)
    try:
        if kind == "events":
            return _event(gw, payload)
        if kind == "heartbeat":
            hb = parse_model(Heartbeat, loads_bounded(payload, max_bytes=MAX_SMALL_BYTES, max_depth=4))
            return hb.model_copy(update={"gw": gw})
        if kind == "bridge":
            if payload not in (b"0", b"1"):
                raise Malformed("bridge: payload must be 0 or 1")
            return BridgeState(gw, payload == b"1")
        if kind == "availability":
            av = parse_model(Availability, loads_bounded(payload, max_bytes=MAX_SMALL_BYTES, max_depth=4))
            return av.model_copy(update={"gw": gw})
    except WireError as exc:
        raise Malformed(f"{kind}: {exc}") from None
    raise Malformed(f"topic kind {kind[:64]!r} is not consumed")


def _no_constants(name: str) -> Any:
    raise Malformed(f"{name} is not a JSON number")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise Malformed("duplicate key in a JSON object")
    return out


def _loads_event(payload: bytes) -> Any:
    """The event path's bounded JSON: the same bounds as :func:`gateway.wire.loads_bounded`
    (size, depth, UTF-8, NaN, duplicate keys) at a third of its cost — events are the receiver's
    hot path. Depth is counted over containers after the C parser (which stops a deeply nested
    document with RecursionError long before it costs much, within the size bound); lone
    surrogates are looked for only when the bytes hold a surrogate escape (valid UTF-8 cannot
    carry one otherwise)."""
    if len(payload) > MAX_EVENT_BYTES:
        raise Malformed(f"payload of {len(payload)} bytes exceeds {MAX_EVENT_BYTES}")
    try:
        value = json.loads(payload.decode("utf-8"), parse_constant=_no_constants, object_pairs_hook=_pairs)
    except Malformed:
        raise
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise Malformed("payload is not valid JSON (or nested too deeply)") from exc
    if _SURROGATE_ESCAPE.search(payload):  # only then can a decoded text hold a lone surrogate
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise Malformed("text is not valid Unicode (a lone surrogate escape)") from None
    stack: list[tuple[Any, int]] = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        item, depth = stack.pop()
        if depth > MAX_EVENT_DEPTH:
            raise Malformed(f"JSON nested deeper than {MAX_EVENT_DEPTH}")
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return value


def _event(gw: str, payload: bytes) -> Event:  # noqa: C901 - one check per field, in contract order
    obj = _loads_event(payload)
    if not isinstance(obj, dict):
        raise Malformed("an event must be a JSON object")
    if obj.get("v") != 1 or isinstance(obj.get("v"), bool):
        raise Malformed("field 'v' must be 1")
    if obj.get("gw") != gw:
        raise Malformed("field 'gw' does not name the gateway of the topic")
    epoch = _text(obj, "epoch")
    if not _EPOCH.fullmatch(epoch):
        raise Malformed("field 'epoch' is not an epoch id")
    seq = obj.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 1 <= seq <= INT64_MAX:
        raise Malformed("field 'seq' must be an integer in 1..2^63-1")
    if obj.get("id") != f"{gw}/{epoch}/{seq}":
        raise Malformed("field 'id' is not G/E/seq")
    digest, prev = _text(obj, "hash", max_len=64), _text(obj, "prev", max_len=64)
    if not _HEX64.fullmatch(digest) or not _HEX64.fullmatch(prev):
        raise Malformed("fields 'hash' and 'prev' must be 64 lowercase hex digits")
    replayed = obj.get("replayed", False)
    if not isinstance(replayed, bool):
        raise Malformed("field 'replayed' must be a boolean")
    try:
        computed = event_hash(obj)
    except UnicodeEncodeError:
        raise Malformed("text is not valid Unicode (a lone surrogate escape)") from None
    except (TypeError, ValueError) as exc:
        raise Malformed(f"event cannot be hashed: {exc}") from None
    if computed != digest:
        raise Malformed("hash does not match the event's canonical JSON (forged or corrupted)")
    if seq == 1 and prev != GENESIS:
        raise Malformed("seq 1 must have prev = 64 zeros")
    return Event(
        gw=gw,
        epoch=epoch,
        seq=seq,
        id=obj["id"],
        site=_text(obj, "site", max_len=64, nullable=True),
        type=_text(obj, "type", max_len=128, nullable=True),
        ts=_text(obj, "ts", max_len=64, nullable=True),
        hash=digest,
        prev=prev,
        replayed=replayed,
        body=payload.decode("utf-8"),
    )


@dataclass(frozen=True, slots=True)
class Conflict:
    kind: Literal["seq_reuse", "chain_break"]
    event: Event
    #: The stored hash it collides with (seq_reuse) or the neighbour's hash/prev it breaks.
    stored: str
    detail: str


@dataclass(frozen=True, slots=True)
class Classified:
    new: list[Event]
    duplicates: list[Event]
    conflicts: list[Conflict]
    #: (gw, epoch, seq) → (hash, prev) of everything known after the batch: stored and new.
    known: dict[tuple[str, str, int], tuple[str, str]]


def classify(events: Iterable[Event], stored: Mapping[tuple[str, str, int], tuple[str, str]]) -> Classified:
    """Split a batch (module docstring). ``stored`` maps (gw, epoch, seq) → (hash, prev) for
    what PostgreSQL holds at each event's seq−1, seq and seq+1."""
    known = dict(stored)
    new: list[Event] = []
    dups: list[Event] = []
    conflicts: list[Conflict] = []
    for ev in sorted(events, key=lambda e: (e.gw, e.epoch, e.seq)):
        here = known.get((ev.gw, ev.epoch, ev.seq))
        if here is not None:
            if here[0] == ev.hash:
                dups.append(ev)
            else:
                conflicts.append(Conflict("seq_reuse", ev, here[0], f"seq {ev.seq} stored with another hash"))
            continue
        before = known.get((ev.gw, ev.epoch, ev.seq - 1))
        if before is not None and before[0] != ev.prev:
            conflicts.append(
                Conflict("chain_break", ev, before[0], f"prev is not the hash of seq {ev.seq - 1}")
            )
            continue
        after = known.get((ev.gw, ev.epoch, ev.seq + 1))
        if after is not None and after[1] != ev.hash:
            conflicts.append(
                Conflict("chain_break", ev, after[1], f"hash is not the prev of seq {ev.seq + 1}")
            )
            continue
        known[(ev.gw, ev.epoch, ev.seq)] = (ev.hash, ev.prev)
        new.append(ev)
    return Classified(new, dups, conflicts, known)
