"""gateway/events.py: every event type of CONTRACT §5 built by one frozen type and serialised by
one function, to exactly the fields the service wrote by hand before (issue 11)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from gateway.events import (
    AccessDenied,
    AccessFailed,
    AccessGranted,
    ActuationReported,
    Event,
    FirmwareConfirmed,
    FirmwareDone,
    FirmwareFailed,
    FirmwareHalted,
    FirmwareRefused,
    FirmwareReverted,
    FirmwareStaged,
    FirmwareTesting,
    FirmwareUploading,
    GatewayStarted,
    GatewayStopping,
    LockLogForwarded,
    LockPaired,
    LockReachable,
    LockUnpaired,
    LockUnreachable,
    Requester,
    Stamp,
    TimeAlarm,
    TimeStateChanged,
    TrustExpired,
    TrustExpiring,
    TrustInstalled,
    TrustRejected,
    event_fields,
)
from protocols.event_encoding import EVENT_TYPES, seal_event_json
from protocols.messages import LogEntry, LogKind

ROOT = Path(__file__).resolve().parents[2]
STAMP = Stamp("synced", "ok")
WHO = Requester("lk-1", "staff-17", "c0ffee", "staff", "t-1")
ENVELOPE = {"lock": "lk-1", "sub": "staff-17", "cti": "c0ffee", "role": "staff", "transaction": "t-1"}
NOBODY = {"lock": None, "sub": None, "cti": None, "role": None, "transaction": None, "reason": None}


def fields(type_: str, outcome: str = "ok", **rest: object) -> dict[str, object]:
    """What the service wrote by hand before gateway/events.py (the envelope's defaults made explicit)."""
    return {"type": type_, "time_state": "synced", "trust_state": "ok", "outcome": outcome, **NOBODY, **rest}


CASES: list[tuple[Event, dict[str, object]]] = [
    (
        GatewayStarted(version="0.1.0", alarms=("trust_none",)),
        fields("gateway.started", data={"version": "0.1.0", "alarms": ["trust_none"]}),
    ),
    (GatewayStopping(interrupted_commands=2), fields("gateway.stopping", data={"interrupted_commands": 2})),
    (
        AccessGranted(
            requester=WHO,
            action="unlock",
            kid="ab",
            iss="central",
            exp=9,
            flags=("emergency",),
            alarm=None,
            priority="normal",
            cmd_id="0011",
        ),
        fields(
            "access.granted",
            **ENVELOPE,
            data={
                "action": "unlock",
                "kid": "ab",
                "iss": "central",
                "exp": 9,
                "flags": ["emergency"],
                "alarm": None,
                "priority": "normal",
                "cmd_id": "0011",
            },
        ),
    ),
    (
        AccessDenied(
            requester=Requester("lk-1", transaction="t-1"), reason="token_expired", action="lock", message="m"
        ),
        fields(
            "access.denied",
            "denied",
            lock="lk-1",
            transaction="t-1",
            reason="token_expired",
            data={"action": "lock", "message": "m"},
        ),
    ),
    (
        AccessFailed(
            requester=WHO, reason="lock_unreachable", action="unlock", cmd_id="0011", message="gone"
        ),
        fields(
            "access.failed",
            "failed",
            **ENVELOPE,
            reason="lock_unreachable",
            data={"action": "unlock", "cmd_id": "0011", "message": "gone"},
        ),
    ),
    (
        AccessFailed(requester=WHO, reason="lock_jammed", action="unlock", cmd_id="0011", lock_seq=7),
        fields(
            "access.failed",
            "failed",
            **ENVELOPE,
            reason="lock_jammed",
            data={"action": "unlock", "cmd_id": "0011", "lock_seq": 7},
        ),
    ),
    (
        AccessFailed(requester=WHO, reason="lock_error", action="lock", cmd_id="0011", status="BUSY"),
        fields(
            "access.failed",
            "failed",
            **ENVELOPE,
            reason="lock_error",
            data={"action": "lock", "cmd_id": "0011", "status": "BUSY"},
        ),
    ),
    (
        ActuationReported.done("unlock", WHO, 7, "0011"),
        fields("lock.unlocked", **ENVELOPE, data={"lock_seq": 7, "cmd_id": "0011", "source": "gateway"}),
    ),
    (
        LockLogForwarded(lock="lk-1", entry=LogEntry(3, 100, LogKind.MANUAL, None, {"x": 1})),
        fields(
            "lock.manual",
            lock="lk-1",
            data={"lock_seq": 3, "lock_time": 100, "kind": "manual", "cmd_id": None, "lock_data": {"x": 1}},
        ),
    ),
    (
        LockLogForwarded(lock="lk-1", entry=LogEntry(4, 100, LogKind.TIME_SET, None, {})),
        fields(
            "lock.log",
            lock="lk-1",
            data={"lock_seq": 4, "lock_time": 100, "kind": "time_set", "cmd_id": None, "lock_data": {}},
        ),
    ),
    (
        LockPaired(lock="lk-1", address="AA:BB:CC:DD:EE:FF", name="Front"),
        fields("lock.paired", lock="lk-1", data={"address": "AA:BB:CC:DD:EE:FF", "name": "Front"}),
    ),
    (
        LockUnpaired(lock="lk-1", forced=True, wiped_on_lock=False),
        fields("lock.unpaired", lock="lk-1", data={"forced": True, "wiped_on_lock": False}),
    ),
    (
        LockUnreachable(lock="lk-1", reason="lock_unreachable", message="no answer"),
        fields(
            "lock.unreachable",
            "failed",
            lock="lk-1",
            reason="lock_unreachable",
            data={"message": "no answer"},
        ),
    ),
    (
        ActuationReported.jammed(WHO, 8, "0011"),
        fields("lock.jammed", **ENVELOPE, data={"lock_seq": 8, "cmd_id": "0011", "source": "gateway"}),
    ),
    (LockReachable(lock="lk-1"), fields("lock.reachable", lock="lk-1", data={})),
    (
        TrustInstalled(kind="keyring", version=2, exp=9, transaction="t-1"),
        fields("trust.installed", transaction="t-1", data={"kind": "keyring", "version": 2, "exp": 9}),
    ),
    (
        TrustRejected(reason="rollback", kind="keyring", message="older"),
        fields("trust.rejected", "rejected", reason="rollback", data={"kind": "keyring", "message": "older"}),
    ),
    (
        TrustExpiring(what="key", ident="ab", exp=9, days_left=1.5),
        fields("trust.expiring", "warning", data={"what": "key", "id": "ab", "exp": 9, "days_left": 1.5}),
    ),
    (
        TrustExpired(what="keyring", ident="2", exp=9, days_left=-1.0),
        fields("trust.expired", "warning", data={"what": "keyring", "id": "2", "exp": 9, "days_left": -1.0}),
    ),
    (
        TimeStateChanged(before="synced", after="unknown"),
        fields("time.state_changed", data={"from": "synced", "to": "unknown"}),
    ),
    (
        TimeAlarm(reason="signed_time_far_ahead", kind="time"),
        fields("time.state_changed", "alarm", reason="signed_time_far_ahead", data={"kind": "time"}),
    ),
]

#: The firmware events as ``Service.firmware_event`` wrote them by hand before their types
#: (docs/contract-additions-firmware.md §5): lock and reason at the top, the rest in data; since
#: then a refusal, failure, revert or halt says so in ``outcome`` too.
FW = {"rollout": "ro-1", "version": "1.1.0"}
CASES += [
    (
        FirmwareStaged("ro-1", "1.1.0", (("lk-1",), ("lk-2", "lk-3"))),
        fields("firmware.staged", data={**FW, "rings": [["lk-1"], ["lk-2", "lk-3"]]}),
    ),
    (
        FirmwareUploading("lk-1", "ro-1", 25, 4096),
        fields("firmware.uploading", lock="lk-1", data={"rollout": "ro-1", "progress": 25, "offset": 4096}),
    ),
    (FirmwareTesting("lk-1", "ro-1", "1.1.0"), fields("firmware.testing", lock="lk-1", data=FW)),
    (FirmwareConfirmed("lk-1", "ro-1", "1.1.0"), fields("firmware.confirmed", lock="lk-1", data=FW)),
    (
        FirmwareReverted("lk-1", "status failed", "ro-1", "1.1.0"),
        fields("firmware.reverted", "failed", lock="lk-1", reason="status failed", data=FW),
    ),
    (
        FirmwareFailed("lk-1", "upload: timeout", "ro-1", "1.1.0"),
        fields("firmware.failed", "failed", lock="lk-1", reason="upload: timeout", data=FW),
    ),
    (
        FirmwareRefused(lock="lk-1", reason="battery_low", rollout="ro-1", version="1.1.0"),
        fields("firmware.refused", "rejected", lock="lk-1", reason="battery_low", data=FW),
    ),
    (
        FirmwareRefused(lock=None, reason="bad_signature", detail="no firmware key signed it"),
        fields(
            "firmware.refused",
            "rejected",
            reason="bad_signature",
            data={"detail": "no firmware key signed it"},
        ),
    ),
    (
        FirmwareHalted(reason="ring 0 failed on lk-1", rollout="ro-1", ring=0),
        fields(
            "firmware.halted", "alarm", reason="ring 0 failed on lk-1", data={"rollout": "ro-1", "ring": 0}
        ),
    ),
    (
        FirmwareHalted(reason="expired", rollout="ro-1", detail="manifest expired"),
        fields(
            "firmware.halted",
            "alarm",
            reason="expired",
            data={"rollout": "ro-1", "detail": "manifest expired"},
        ),
    ),
    (FirmwareDone("ro-1", "1.1.0"), fields("firmware.done", data=FW)),
]


def sealed(f: dict[str, object]) -> str:
    return seal_event_json(f, gw="gw-1", site="s", epoch="e", seq=1, prev="0" * 64, wall=1.0)[1]


@pytest.mark.parametrize(
    ("event", "expected"), CASES, ids=lambda c: type(c).__name__ if isinstance(c, Event) else ""
)
def test_each_event_type_seals_to_the_same_json_as_before(event: Event, expected: dict[str, object]) -> None:
    got = event_fields(event, STAMP)
    assert sealed(got) == sealed(expected)
    assert got["data"] == expected["data"]  # and in the same key order
    assert list(got["data"]) == list(expected["data"])  # type: ignore[call-overload]


def test_every_contract_event_type_has_a_constructor_and_events_are_frozen() -> None:
    built = {event_fields(e, STAMP)["type"] for e, _ in CASES}
    assert (
        built | {f"lock.{k}" for k in ("locked", "jammed", "door_opened", "door_closed", "battery_low")}
        >= EVENT_TYPES
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        LockReachable(lock="lk-1").lock = "other"  # type: ignore[misc]


#: Event types named in gateway/ outside gateway/events.py: the CLI's colours only.
_TYPE_LITERAL = re.compile(r"""["'](?:access|lock|trust|gateway|time|firmware)\.[a-z_]+["']""")


def test_no_module_but_events_writes_an_event_type_by_hand() -> None:
    allowed = {ROOT / "gateway/events.py", ROOT / "gateway/cli/ui.py"}
    offenders = {
        str(p.relative_to(ROOT)): found
        for p in (ROOT / "gateway").rglob("*.py")
        if p not in allowed
        and (found := [t for t in _TYPE_LITERAL.findall(p.read_text()) if t[1:-1] in EVENT_TYPES])
    }
    assert offenders == {}
