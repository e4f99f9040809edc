"""A paired lock that lies, through the whole service (THREATS B7, CONTRACT §8.13).

The simulator's ``lie`` fault makes a lock execute commands honestly and then answer with values
out of range or addressed to another request. The gateway ends that link with ``lock_error``,
commits an ``access.failed``, and keeps going: the outbox stays healthy, other locks unlock, the
event chain is intact, and nothing out of range reaches the outbox.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from airfix import Air
from test_service import Rig, build_rig

from gateway.ble.lock_client import LockClient
from gateway.errors import LockMisbehaved
from protocols.event_encoding import verify_chain
from protocols.messages import LogEntry, LogKind

pytestmark = pytest.mark.ble


async def test_B7_a_lock_answering_lock_seq_2_64_minus_1_fails_alone_and_the_outbox_stays_healthy(
    tmp_path: Path,
) -> None:
    async with build_rig(tmp_path) as rig:
        liar, honest = (s.model.lock_id for s in rig.locks)
        await rig.radio.apply_fault(liar, "lie", "lock_seq")
        resp = await rig.unlock(liar)
        assert resp["error"]["code"] == "lock_error", resp
        events = await rig.events()
        assert [(e["type"], e["lock"], e["reason"]) for e in events] == [
            ("access.granted", liar, None),
            ("access.failed", liar, "lock_error"),
        ]
        assert events[1]["data"]["cmd_id"] == events[0]["data"]["cmd_id"]
        assert "lock_seq" in events[1]["data"]["message"]
        assert rig.locks[0].model.state.value == "unlocked"  # it moved, then lied: the log tells

        ok = await rig.unlock(honest)
        assert ok["status"] == "ok", ok
        events = await rig.events()
        assert [e["type"] for e in events[2:]] == ["access.granted", "lock.unlocked"]
        assert ok["data"]["seq"] == events[-1]["seq"] == 4
        verify_chain(events)

        # The liar reformed: its log entry of that unlock is forwarded with its real lock_seq.
        await rig.radio.apply_fault(liar, "lie", None)
        record = rig.svc.registry.get(liar)
        assert record is not None
        await rig.svc.refresh(record)
        events = await rig.events()
        forwarded = [e for e in events if e["lock"] == liar and e["type"] == "lock.unlocked"]
        assert [e["data"]["lock_seq"] for e in forwarded] == [2]
        assert forwarded[0]["data"]["cmd_id"] == events[0]["data"]["cmd_id"]
        verify_chain(events)


async def _assert_lie_fails_alone(rig: Rig, mode: str) -> None:
    liar, honest = (s.model.lock_id for s in rig.locks)
    await rig.radio.apply_fault(liar, "lie", mode)
    before = len(await rig.events())
    resp = await rig.unlock(liar)
    assert resp["error"]["code"] == "lock_error", (mode, resp)
    assert [(e["type"], e["reason"]) for e in (await rig.events())[before:]] == [
        ("access.granted", None),
        ("access.failed", "lock_error"),
    ]
    await rig.radio.apply_fault(liar, "lie", None)
    ok = await rig.unlock(honest, act="lock" if mode != "cmd_id" else "unlock")
    assert ok["status"] == "ok", (mode, ok)


@pytest.mark.parametrize("mode", ["cmd_id", "op", "types", "huge", "surrogate"])
async def test_B7_a_lying_answer_is_never_taken_as_the_answer(tmp_path: Path, mode: str) -> None:
    async with build_rig(tmp_path) as rig:
        await _assert_lie_fails_alone(rig, mode)
        verify_chain(await rig.events())


async def test_B7_lying_status_values_make_the_lock_unreachable_not_the_gateway_fail(tmp_path: Path) -> None:
    async with build_rig(tmp_path) as rig:
        sim = rig.locks[0]
        record = rig.svc.registry.get(sim.model.lock_id)
        assert record is not None
        await rig.svc.refresh(record)  # honest first: the lock is available
        before = len(await rig.events())
        for mode in ("battery", "time", "lock_seq"):
            await rig.radio.apply_fault(sim.model.lock_id, "lie", mode)
            await rig.svc.refresh(record)  # housekeeping: a lie never raises out of it
            status = await rig.req("status", {"lock": sim.model.lock_id})
            assert status["error"]["code"] == "lock_unreachable", (mode, status)
        view = rig.svc.views[sim.model.lock_id]
        assert not view.available and view.battery_pct != 300
        assert [e["type"] for e in (await rig.events())[before:]] == ["lock.unreachable"]
        verify_chain(await rig.events())


async def test_B7_lock_log_data_cannot_overwrite_the_gateways_fields(tmp_path: Path) -> None:
    async with build_rig(tmp_path) as rig:
        model = rig.locks[0].model
        hostile = {
            "lock_seq": 1,
            "kind": "unlocked",
            "cmd_id": "00" * 16,
            "source": "gateway",
            "lock_time": 0,
        }
        hostile |= {"alarm": 1, "flags": "emergency"}
        seq = model.next_seq  # the firmware writes an entry whose data claims the gateway's fields
        model.log.append(LogEntry(seq, 1_700_000_123, LogKind.MANUAL, None, hostile))
        model.next_seq += 1
        record = rig.svc.registry.get(model.lock_id)
        assert record is not None
        await rig.svc.refresh(record)
        events = await rig.events()
        (manual,) = [e for e in events if e["type"] == "lock.manual"]
        assert manual["data"] == {
            "lock_seq": seq,
            "lock_time": 1_700_000_123,
            "kind": "manual",
            "cmd_id": None,
            "lock_data": hostile,
        }
        verify_chain(events)


async def test_B7_an_off_curve_spake2_peer_fails_pair_at_once_with_a_clear_error(air: Air) -> None:
    sim, other = air.locks
    await air.radio.apply_fault(sim.model.lock_id, "hostile", "spake2")
    # Before, NotOnCurve escaped the notification callback and pair sat out its 20 s timeout
    # (LinkTimeout); now the link ends on the first frame with the reason.
    async with LockClient(str(sim.address), gw_id="gw-test-1", backend=air.host.client_backend()) as client:
        with pytest.raises(LockMisbehaved, match="invalid SPAKE2 message from lock") as info:
            await client.pair(sim.model.setup_code)
        assert info.value.code == "lock_error" and not client.is_connected
    async with LockClient(str(other.address), gw_id="gw-test-1", backend=air.host.client_backend()) as client:
        assert (await client.pair(other.model.setup_code)).lock_id == other.model.lock_id
