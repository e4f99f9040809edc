"""The gateway's events (CONTRACT §5), built in one place.

One frozen type per kind of event, and one function, :func:`event_fields`, that turns any of
them (with the time and trust state of the moment, :class:`Stamp`) into the fields the outbox
seals (gateway/store/outbox.py: envelope, seq, hash chain). Nothing else in the gateway writes
an event's fields by hand.

================================  ===========================================================
type                              built from
================================  ===========================================================
``gateway.started``               :class:`GatewayStarted`
``gateway.stopping``              :class:`GatewayStopping`
``access.granted``                :class:`AccessGranted`
``access.denied``                 :class:`AccessDenied`
``access.failed``                 :class:`AccessFailed` (the one constructor: every way a
                                  granted command can fail)
``lock.unlocked|locked|jammed``   :class:`ActuationReported` (the lock's answer to our command)
``lock.*`` (its own log)          :class:`LockLogForwarded` (one entry of the lock's log)
``lock.paired``, ``lock.unpaired`` :class:`LockPaired`, :class:`LockUnpaired`
``lock.unreachable|reachable``    :class:`LockUnreachable`, :class:`LockReachable`
``trust.installed|rejected``      :class:`TrustInstalled`, :class:`TrustRejected`
``trust.expiring|expired``        :class:`TrustExpiring`, :class:`TrustExpired`
``time.state_changed``            :class:`TimeStateChanged` (the clock's state moved) and
                                  :class:`TimeAlarm` (a document raised a time alarm)
``firmware.staged|uploading|``    :class:`FirmwareStaged`, :class:`FirmwareUploading`,
``testing|confirmed|reverted|``   :class:`FirmwareTesting`, :class:`FirmwareConfirmed`,
``refused|failed|halted|done``    :class:`FirmwareReverted`, :class:`FirmwareRefused`,
                                  :class:`FirmwareFailed`, :class:`FirmwareHalted`,
                                  :class:`FirmwareDone` (docs/contract-additions-firmware.md)
================================  ===========================================================

Envelope fields (``lock``, ``reason``, ``sub``, ``cti``, ``role``, ``transaction``) are the
event's attributes of those names, or come from its :class:`Requester`; ``outcome`` is the
type's; everything else is the event's ``data``, in the order declared.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar, Final, Literal, NotRequired, TypedDict

from protocols.messages import LogEntry, LogKind

__all__ = [
    "ENVELOPE_FIELDS",
    "AccessDenied",
    "AccessFailed",
    "AccessGranted",
    "ActuationReported",
    "Event",
    "FirmwareConfirmed",
    "FirmwareDone",
    "FirmwareFailed",
    "FirmwareHalted",
    "FirmwareRefused",
    "FirmwareReverted",
    "FirmwareStaged",
    "FirmwareTesting",
    "FirmwareUploading",
    "GatewayStarted",
    "GatewayStopping",
    "LockLogForwarded",
    "LockPaired",
    "LockReachable",
    "LockUnpaired",
    "LockUnreachable",
    "Outcome",
    "Requester",
    "SealedEvent",
    "Stamp",
    "TimeAlarm",
    "TimeStateChanged",
    "TrustExpired",
    "TrustExpiring",
    "TrustInstalled",
    "TrustRejected",
    "event_fields",
]

#: The envelope fields an event sets itself (the outbox sets v, gw, site, epoch, seq, id, ts,
#: prev and hash).
ENVELOPE_FIELDS: Final = ("lock", "reason", "sub", "cti", "role", "transaction")


class Outcome(StrEnum):
    """An event's ``outcome`` (CONTRACT §5)."""

    OK = "ok"
    DENIED = "denied"
    FAILED = "failed"
    REJECTED = "rejected"
    WARNING = "warning"
    ALARM = "alarm"


class SealedEvent(TypedDict):
    """An event as committed, stored and published (CONTRACT §5): the outbox's answer to an
    append and what it reads back. ``replayed`` only on a re-publication."""

    v: int
    gw: str
    site: str
    epoch: str
    seq: int
    id: str
    ts: str
    time_state: str
    trust_state: str
    type: str
    lock: str | None
    outcome: str
    reason: str | None
    sub: str | None
    cti: str | None
    role: str | None
    transaction: str | None
    data: dict[str, object]
    prev: str
    hash: str
    replayed: NotRequired[bool]


@dataclass(frozen=True, slots=True)
class Stamp:
    """The time and trust state an event carries (one time view per event)."""

    time_state: str
    trust_state: str


@dataclass(frozen=True, slots=True)
class Requester:
    """Who asked, for which lock, in which request: the envelope of every event one granted
    command produces (its grant, its outcome, its failure)."""

    lock: str
    sub: str | None = None
    cti: str | None = None
    role: str | None = None
    transaction: str | None = None


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every event type: ``TYPE`` and ``OUTCOME`` are the type's."""

    TYPE: ClassVar[str]
    OUTCOME: ClassVar[Outcome] = Outcome.OK

    def event_type(self) -> str:
        return self.TYPE

    def data(self) -> dict[str, object]:
        """The event's ``data``: its fields that are not envelope fields, in declared order
        (tuples as JSON arrays)."""
        out: dict[str, object] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name not in ENVELOPE_FIELDS and not isinstance(value, Requester):
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def event_fields(event: Event, stamp: Stamp) -> dict[str, object]:
    """The one serialiser: ``event`` as the fields the outbox seals (CONTRACT §5's JSON shape
    without the envelope the outbox adds)."""
    out: dict[str, object] = {
        "type": event.event_type(),
        "time_state": stamp.time_state,
        "trust_state": stamp.trust_state,
        "outcome": str(event.OUTCOME),
    }
    for f in dataclasses.fields(event):
        value = getattr(event, f.name)
        if isinstance(value, Requester):
            out.update(dataclasses.asdict(value))
        elif f.name in ENVELOPE_FIELDS:
            out[f.name] = value
    out["data"] = event.data()
    return out


# --- the gateway ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GatewayStarted(Event):
    TYPE: ClassVar[str] = "gateway.started"
    version: str
    alarms: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class GatewayStopping(Event):
    TYPE: ClassVar[str] = "gateway.stopping"
    interrupted_commands: int


# --- access -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AccessGranted(Event):
    """Committed before the command goes to the lock (CONTRACT §5)."""

    TYPE: ClassVar[str] = "access.granted"
    requester: Requester
    action: str
    kid: str
    iss: str
    exp: int
    flags: tuple[str, ...]
    alarm: str | None
    priority: str
    cmd_id: str


@dataclass(frozen=True, slots=True)
class AccessDenied(Event):
    """A refusal that names a known lock (CONTRACT §8.4)."""

    TYPE: ClassVar[str] = "access.denied"
    OUTCOME: ClassVar[Outcome] = Outcome.DENIED
    requester: Requester
    reason: str
    action: str
    message: str


@dataclass(frozen=True, slots=True)
class AccessFailed(Event):
    """A grant whose command did not complete (same ``cmd_id`` as its ``access.granted``), with
    what is known of why: a ``message``, the ``lock_seq`` of the jam, or the lock's ``status``."""

    TYPE: ClassVar[str] = "access.failed"
    OUTCOME: ClassVar[Outcome] = Outcome.FAILED
    requester: Requester
    reason: str
    action: str
    cmd_id: str
    message: str | None = None
    lock_seq: int | None = None
    status: str | None = None

    def data(self) -> dict[str, object]:
        known = {"message": self.message, "lock_seq": self.lock_seq, "status": self.status}
        return {
            "action": self.action,
            "cmd_id": self.cmd_id,
            **{k: v for k, v in known.items() if v is not None},
        }


# --- locks ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ActuationReported(Event):
    """The lock's answer to a command of ours: it unlocked, locked or jammed (the entry of its
    log at ``lock_seq``, which the log fetch then skips)."""

    type: Literal["lock.unlocked", "lock.locked", "lock.jammed"]
    requester: Requester
    lock_seq: int
    cmd_id: str
    source: Literal["gateway"] = "gateway"

    @classmethod
    def done(cls, action: str, requester: Requester, lock_seq: int, cmd_id: str) -> ActuationReported:
        """The lock did what ``action`` (``unlock`` or ``lock``) asked."""
        return cls("lock.unlocked" if action == "unlock" else "lock.locked", requester, lock_seq, cmd_id)

    @classmethod
    def jammed(cls, requester: Requester, lock_seq: int, cmd_id: str) -> ActuationReported:
        return cls("lock.jammed", requester, lock_seq, cmd_id)

    def event_type(self) -> str:
        return self.type

    def data(self) -> dict[str, object]:
        return {"lock_seq": self.lock_seq, "cmd_id": self.cmd_id, "source": self.source}


#: Which event an entry of a lock's own log becomes (anything else: ``lock.log``).
LOG_EVENT_TYPES: Final = {
    LogKind.UNLOCKED: "lock.unlocked",
    LogKind.LOCKED: "lock.locked",
    LogKind.JAMMED: "lock.jammed",
    LogKind.DOOR_OPENED: "lock.door_opened",
    LogKind.DOOR_CLOSED: "lock.door_closed",
    LogKind.BATTERY_LOW: "lock.battery_low",
    LogKind.MANUAL: "lock.manual",
}


@dataclass(frozen=True, slots=True)
class LockLogForwarded(Event):
    """One entry of a lock's own log (CONTRACT §5: forwarded once per lock and lock_seq); the
    lock's own map stays under ``lock_data`` (THREATS B7)."""

    lock: str
    entry: LogEntry

    def event_type(self) -> str:
        return LOG_EVENT_TYPES.get(self.entry.kind, "lock.log")

    def data(self) -> dict[str, object]:
        return self.entry.event_data()


@dataclass(frozen=True, slots=True)
class LockPaired(Event):
    TYPE: ClassVar[str] = "lock.paired"
    lock: str
    address: str
    name: str


@dataclass(frozen=True, slots=True)
class LockUnpaired(Event):
    TYPE: ClassVar[str] = "lock.unpaired"
    lock: str
    forced: bool
    wiped_on_lock: bool


@dataclass(frozen=True, slots=True)
class LockUnreachable(Event):
    TYPE: ClassVar[str] = "lock.unreachable"
    OUTCOME: ClassVar[Outcome] = Outcome.FAILED
    lock: str
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class LockReachable(Event):
    TYPE: ClassVar[str] = "lock.reachable"
    lock: str


# --- trust and time ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrustInstalled(Event):
    TYPE: ClassVar[str] = "trust.installed"
    kind: str
    version: int | None
    exp: int | None
    transaction: str | None = None


@dataclass(frozen=True, slots=True)
class TrustRejected(Event):
    TYPE: ClassVar[str] = "trust.rejected"
    OUTCOME: ClassVar[Outcome] = Outcome.REJECTED
    reason: str | None
    kind: str
    message: str
    transaction: str | None = None


@dataclass(frozen=True, slots=True)
class TrustExpiring(Event):
    """A document or key expires within ``expiry_warning_days`` (CONTRACT §8.5)."""

    TYPE: ClassVar[str] = "trust.expiring"
    OUTCOME: ClassVar[Outcome] = Outcome.WARNING
    what: str
    ident: str
    exp: int
    days_left: float

    def data(self) -> dict[str, object]:
        return {"what": self.what, "id": self.ident, "exp": self.exp, "days_left": self.days_left}


@dataclass(frozen=True, slots=True)
class TrustExpired(TrustExpiring):
    """As :class:`TrustExpiring`, past its exp."""

    TYPE: ClassVar[str] = "trust.expired"


@dataclass(frozen=True, slots=True)
class TimeStateChanged(Event):
    """The time state moved (``synced``, ``holdover``, ``unknown``)."""

    TYPE: ClassVar[str] = "time.state_changed"
    before: str
    after: str

    def data(self) -> dict[str, object]:
        return {"from": self.before, "to": self.after}


@dataclass(frozen=True, slots=True)
class TimeAlarm(Event):
    """A trust document raised a time alarm (``reason``), e.g. a signed time far ahead."""

    TYPE: ClassVar[str] = "time.state_changed"
    OUTCOME: ClassVar[Outcome] = Outcome.ALARM
    reason: str
    kind: str


# --- firmware (docs/contract-additions-firmware.md §5) ----------------------------------------
#
# ``outcome`` says how it went, as for the contract's own types: ``rejected`` for a refusal,
# ``failed`` for a lock whose update failed or was reverted, ``alarm`` for a halted rollout,
# ``ok`` for progress; what went wrong is the ``reason`` (docs/contract-additions-firmware.md).


@dataclass(frozen=True, slots=True)
class FirmwareStaged(Event):
    """A rollout was checked and recorded (lock null)."""

    TYPE: ClassVar[str] = "firmware.staged"
    rollout: str
    version: str
    rings: tuple[tuple[str, ...], ...]

    def data(self) -> dict[str, object]:
        return {"rollout": self.rollout, "version": self.version, "rings": [list(r) for r in self.rings]}


@dataclass(frozen=True, slots=True)
class FirmwareUploading(Event):
    """A lock's upload reached ``progress`` % (at each 25 % step and at 100)."""

    TYPE: ClassVar[str] = "firmware.uploading"
    lock: str
    rollout: str
    progress: int
    offset: int


@dataclass(frozen=True, slots=True)
class FirmwareTesting(Event):
    """The lock was marked for test and reset: the new image boots for its health check."""

    TYPE: ClassVar[str] = "firmware.testing"
    lock: str
    rollout: str
    version: str


@dataclass(frozen=True, slots=True)
class FirmwareConfirmed(Event):
    TYPE: ClassVar[str] = "firmware.confirmed"
    lock: str
    rollout: str
    version: str


@dataclass(frozen=True, slots=True)
class FirmwareReverted(Event):
    """The health check failed (``reason``): reset without confirm, MCUboot swapped back."""

    TYPE: ClassVar[str] = "firmware.reverted"
    OUTCOME: ClassVar[Outcome] = Outcome.FAILED
    lock: str
    reason: str
    rollout: str
    version: str


@dataclass(frozen=True, slots=True)
class FirmwareFailed(Event):
    """A step failed after its retries (``reason``)."""

    TYPE: ClassVar[str] = "firmware.failed"
    OUTCOME: ClassVar[Outcome] = Outcome.FAILED
    lock: str
    reason: str
    rollout: str
    version: str


@dataclass(frozen=True, slots=True)
class FirmwareRefused(Event):
    """Refused before any upload: one lock of a rollout (``lock``, with ``rollout`` and
    ``version``: ``battery_low``, ``downgrade``, …) or a whole rollout (lock null, with
    ``detail``: ``bad_signature``, ``image_mismatch``, …). ``data`` holds the fields given."""

    TYPE: ClassVar[str] = "firmware.refused"
    OUTCOME: ClassVar[Outcome] = Outcome.REJECTED
    lock: str | None
    reason: str
    rollout: str | None = None
    version: str | None = None
    detail: str | None = None

    def data(self) -> dict[str, object]:
        given = {"rollout": self.rollout, "version": self.version, "detail": self.detail}
        return {k: v for k, v in given.items() if v is not None}


@dataclass(frozen=True, slots=True)
class FirmwareHalted(Event):
    """A rollout stopped (lock null): ring ``ring`` failed, or (``detail``) its manifest or key
    no longer holds when it was resumed."""

    TYPE: ClassVar[str] = "firmware.halted"
    OUTCOME: ClassVar[Outcome] = Outcome.ALARM
    reason: str
    rollout: str
    ring: int | None = None
    detail: str | None = None

    def data(self) -> dict[str, object]:
        given = {"ring": self.ring, "detail": self.detail}
        return {"rollout": self.rollout, **{k: v for k, v in given.items() if v is not None}}


@dataclass(frozen=True, slots=True)
class FirmwareDone(Event):
    """Every ring of a rollout ran (lock null)."""

    TYPE: ClassVar[str] = "firmware.done"
    rollout: str
    version: str
