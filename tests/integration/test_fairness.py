"""Fairness under request floods (CONTRACT §8.14, THREATS A7), on real simulated locks.

The simulator counts the commands each lock ran (``LockModel.ran``), so "one round trip" is
counted at the lock, not inferred from the gateway's side.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from test_mqtt_e2e import (  # noqa: F401 - the broker-backed gateway fixtures
    GW,
    B,
    Central,
    Setup,
    central,
    mqtt_broker,
    next_on,
    protocol,
    setup,
    unlock_via_mqtt,
)
from test_service import Rig, build_rig

from gateway.ble.links import Priority
from gateway.ble.registry import LockRecord
from gateway.mqtt.bridge import MAX_CONCURRENT_REQUESTS
from gateway.runtime.service import STATUS_FRESH_S, STATUS_WAITERS_MAX
from protocols.limits import COMMAND_ID_LEN
from protocols.messages import Op

pytestmark = pytest.mark.ble


def record(rig: Rig, index: int) -> LockRecord:
    rec = rig.svc.registry.get(rig.locks[index].model.lock_id)
    assert rec is not None
    return rec


def ran(rig: Rig, index: int, op: Op) -> int:
    return rig.locks[index].model.ran.get(op, 0)


async def test_A7_concurrent_status_requests_share_one_round_trip_and_the_rest_are_busy(
    tmp_path: Path,
) -> None:
    async with build_rig(tmp_path) as rig:
        lock = rig.locks[0].model.lock_id
        n = STATUS_WAITERS_MAX + 24
        # All created before any runs: they arrive together, as a burst from MQTT does.
        answers = await asyncio.gather(
            *(rig.req("status", {"lock": lock, "transaction": f"s{i}"}) for i in range(n))
        )
        assert len(answers) == n and [a["transaction"] for a in answers] == [f"s{i}" for i in range(n)]
        ok = [a for a in answers if a["status"] == "ok"]
        busy = [a for a in answers if a["status"] == "error"]
        assert len(ok) == STATUS_WAITERS_MAX and len(busy) == n - STATUS_WAITERS_MAX
        assert all(a["data"]["available"] is True and a["data"]["lock"] == lock for a in ok)
        assert {a["error"]["code"] for a in busy} == {"busy"}
        assert ran(rig, 0, Op.STATUS) == 1  # one STATUS at the lock for the whole burst
        # A state fresher than the window answers at once; an older one asks the lock again.
        again = await rig.req("status", {"lock": lock})
        assert again["status"] == "ok" and ran(rig, 0, Op.STATUS) == 1
        rig.clock.advance(STATUS_FRESH_S)
        assert (await rig.req("status", {"lock": lock}))["status"] == "ok"
        assert ran(rig, 0, Op.STATUS) == 2


async def test_A7_an_unlock_overtakes_status_commands_queued_on_its_lock(tmp_path: Path) -> None:
    async with build_rig(tmp_path) as rig:
        rec = record(rig, 0)
        done: list[str] = []

        async def status(i: int) -> None:
            await rig.svc.links.command(rec, Op.STATUS, priority=Priority.INTERACTIVE)
            done.append(f"s{i}")

        async def housekeeping(i: int) -> None:
            await rig.svc.links.command(rec, Op.STATUS, priority=Priority.HOUSEKEEPING)
            done.append(f"h{i}")

        queued = [asyncio.create_task(housekeeping(i)) for i in range(5)]
        queued += [asyncio.create_task(status(i)) for i in range(20)]
        await asyncio.sleep(0)  # all of them wait on the lock's gate (the first one runs)
        await rig.svc.links.command(
            rec, Op.UNLOCK, cmd_id=os.urandom(COMMAND_ID_LEN), priority=Priority.ACCESS
        )
        done.append("unlock")
        await asyncio.gather(*queued)
        # Only the command already running finished before the unlock (FIFO: all 25 did); then
        # status before housekeeping, each class in arrival order.
        assert done == ["h0", "unlock", *(f"s{i}" for i in range(20)), "h1", "h2", "h3", "h4"], done
        assert rig.locks[0].model.state.value == "unlocked"


async def test_A7_a_link_busy_with_a_status_flood_hands_its_slot_to_another_locks_unlock(
    tmp_path: Path,
) -> None:
    async with build_rig(tmp_path, slots=1) as rig:
        flooded, other = record(rig, 0), record(rig, 1)
        done: list[str] = []

        async def status(i: int) -> None:
            await rig.svc.links.command(flooded, Op.STATUS, priority=Priority.INTERACTIVE)
            done.append(f"s{i}")

        await rig.svc.links.command(flooded, Op.STATUS, priority=Priority.INTERACTIVE)  # A holds the slot
        queued = [asyncio.create_task(status(i)) for i in range(20)]
        await asyncio.sleep(0)
        await rig.svc.links.command(
            other, Op.UNLOCK, cmd_id=os.urandom(COMMAND_ID_LEN), priority=Priority.ACCESS
        )
        done.append("unlock")
        await asyncio.gather(*queued)
        assert done.index("unlock") <= 1, done
        assert rig.locks[1].model.state.value == "unlocked"


async def test_A7_thirty_status_requests_a_second_while_unlocks_on_both_locks_succeed(tmp_path: Path) -> None:
    async with build_rig(tmp_path) as rig:
        a, b = (s.model.lock_id for s in rig.locks)
        period = 1 / 40  # 40 a second
        stop = asyncio.Event()
        flood: list[asyncio.Task[dict]] = []

        async def flooding() -> None:
            # At least three seconds of flood on the gateway's clock, and on until the unlocks are done.
            while len(flood) < 120 or not stop.is_set():
                flood.append(asyncio.create_task(rig.req("status", {"lock": a})))
                await asyncio.sleep(period)
                rig.clock.advance(period)  # the gateway's clock keeps pace with the flood

        flooder = asyncio.create_task(flooding())
        async with asyncio.timeout(60):  # liveness bound only
            served = []
            for lock in (a, b, a, b, a, b):
                served.append(await rig.unlock(lock))
                served.append(await rig.unlock(lock, act="lock"))
            stop.set()
            await flooder
            answers = await asyncio.gather(*flood)
        assert [r["status"] for r in served] == ["ok"] * 12
        assert {r["status"] if r["status"] == "ok" else r["error"]["code"] for r in answers} <= {"ok", "busy"}
        assert any(r["status"] == "ok" for r in answers)
        # One STATUS per freshness window (plus the one running when the window closes).
        seconds = len(flood) * period
        assert ran(rig, 0, Op.STATUS) <= 2 * (seconds / STATUS_FRESH_S + 1), (
            ran(rig, 0, Op.STATUS),
            len(flood),
        )


async def test_A7_refreshes_of_one_lock_at_both_priorities_forward_each_log_entry_once(
    tmp_path: Path,
) -> None:
    async with build_rig(tmp_path) as rig:
        rec = record(rig, 0)
        for _ in range(3):
            await rig.radio.apply_fault(rec.lock, "manual")
        await asyncio.gather(
            *(rig.svc.refresh(rec, priority=p) for p in [Priority.HOUSEKEEPING, Priority.INTERACTIVE] * 4)
        )
        seqs = [e["data"]["lock_seq"] for e in await rig.events() if "lock_seq" in (e.get("data") or {})]
        assert sorted(seqs) == sorted(set(seqs)) and len(seqs) == 4  # paired + three manual turns
        assert ran(rig, 0, Op.STATUS) == 2  # one per priority class: each joined its own


async def test_A7_a_status_caller_that_goes_away_leaves_the_shared_refresh_to_the_others(
    tmp_path: Path,
) -> None:
    async with build_rig(tmp_path) as rig:
        lock = rig.locks[0].model.lock_id
        first = asyncio.create_task(rig.req("status", {"lock": lock}))
        others = [asyncio.create_task(rig.req("status", {"lock": lock})) for _ in range(3)]
        await asyncio.sleep(0)
        first.cancel()
        answers = await asyncio.gather(*others)
        assert [a["status"] for a in answers] == ["ok"] * 3
        assert first.cancelled() and ran(rig, 0, Op.STATUS) == 1


async def reply(c: Central, corr: bytes) -> dict:
    # liveness bound only: the slow lock takes a few exchanges of 1 s
    msg = await next_on(c, "phone/replies", within=90, pred=lambda m: m.properties.CorrelationData == corr)
    return json.loads(msg.payload)


@pytest.mark.slow
async def test_A7_a_status_flood_that_fills_the_request_budget_never_answers_a_phone_busy(
    setup: Setup,  # noqa: F811 - the fixture imported above
    central: Central,  # noqa: F811
) -> None:
    s = setup
    assert not s.gw.authz.install(s.w.keyring()).rejected  # may already be in, retained by the broker
    await central.subscribe("phone/replies")
    slow, other = (x.model.lock_id for x in s.locks)
    s.gw.service.status_waiters_max = 1000  # one lock's status requests may fill the bridge's budget
    await s.radio.apply_fault(slow, "latency", 1.0)  # each exchange waits: the refresh stays in flight
    n = MAX_CONCURRENT_REQUESTS + 8
    for i in range(n):
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "phone/replies"
        props.CorrelationData = f"s{i}".encode()
        await central.publish(f"{B}/{GW}/request/status", json.dumps({"lock": slow}), qos=1, properties=props)
    # The budget for status is full; the phone's challenge and unlock have their own.
    unlocked = await unlock_via_mqtt(s, central, other, b"u1")
    assert unlocked["status"] == "ok" and unlocked["data"]["state"] == "unlocked", unlocked
    answers = [await reply(central, f"s{i}".encode()) for i in range(n)]
    codes = [a["status"] if a["status"] == "ok" else a["error"]["code"] for a in answers]
    assert codes.count("ok") == MAX_CONCURRENT_REQUESTS and codes.count("busy") == n - MAX_CONCURRENT_REQUESTS
    assert s.locks[0].model.ran.get(Op.STATUS, 0) == 1


async def test_A7_a_status_backing_off_before_its_retry_lets_a_waiting_unlock_run(tmp_path: Path) -> None:
    async with build_rig(tmp_path) as rig:
        rec = record(rig, 0)
        done: list[str] = []
        await rig.svc.links.command(rec, Op.STATUS, priority=Priority.INTERACTIVE)  # a warm link
        await rig.radio.apply_fault(rec.lock, "drop_after_write")  # the next STATUS runs, the link drops

        async def status() -> None:
            await rig.svc.links.command(rec, Op.STATUS, priority=Priority.INTERACTIVE)
            done.append("status")

        retrying = asyncio.create_task(status())
        await asyncio.sleep(0)  # it holds the gate
        await rig.svc.links.command(
            rec, Op.UNLOCK, cmd_id=os.urandom(COMMAND_ID_LEN), priority=Priority.ACCESS
        )
        done.append("unlock")
        await retrying
        assert done == ["unlock", "status"]  # the unlock ran while the status backed off
        assert rig.svc.links.stats.retries == 1 and ran(rig, 0, Op.STATUS) == 3
