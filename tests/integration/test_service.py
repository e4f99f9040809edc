"""The command pipeline end to end: requests → authorization → events → BLE → simulated lock."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from credfix import SITE, World

from firmware_sim.bumble_peripheral import SimLock, SimRadio
from gateway.authz.clock import ManualClock
from gateway.ble.bumble_backend import BumbleHost
from gateway.ble.links import LinkManager
from gateway.ble.registry import LockRecord, Registry
from gateway.runtime.service import Service
from gateway.store.outbox import Outbox
from gateway.tasks import cancel_and_wait
from protocols import issuer
from protocols.event_encoding import verify_chain

pytestmark = pytest.mark.ble
GW = "gw-test-1"


def b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


@dataclass
class Rig:
    w: World
    svc: Service
    radio: SimRadio
    locks: list[SimLock]
    clock: ManualClock

    async def req(self, action: str, body: dict) -> dict:
        return await self.svc.handle(action, json.dumps(body).encode())

    async def unlock(self, lock: str, *, act: str = "unlock", token: bytes | None = None, **extra) -> dict:
        tok = token or self.w.token(locks=[lock], iat=int(self.clock.wall()) - 30)
        ch = await self.req("challenge", {"lock": lock, "act": act})
        nonce = base64.urlsafe_b64decode(ch["data"]["nonce"] + "==")
        proof = issuer.proof(self.w.holder, token_bytes=tok, nonce=nonce, gw=GW, lock=lock, act=act)
        return await self.req(
            act, {"lock": lock, "token": b64(tok), "proof": b64(proof), "transaction": "t-1", **extra}
        )

    async def events(self) -> list[dict]:
        return await self.svc.outbox.read(1, limit=10_000)


@contextlib.asynccontextmanager
async def build_rig(
    tmp_path: Path,
    *,
    locks: int = 2,
    seed: int = 11,
    slots: int = 2,
    links_kw: dict[str, Any] | None = None,
    **outbox_kw: Any,
) -> AsyncIterator[Rig]:
    """Simulated locks paired to a gateway service (no broker), keyring installed;
    ``links_kw``: more LinkManager arguments (connect on challenge, warm sessions)."""
    from credfix import T0

    w = World()
    clock = ManualClock(T0)
    async with SimRadio(clock=clock.wall) as radio:
        sims = await radio.add_locks(locks, seed=seed)
        async with BumbleHost(controller=radio.open_gateway_controller()) as host:
            authz = w.authorizer(tmp_path, clock, gw_id=GW)
            registry = Registry(tmp_path / "locks.sqlite3")
            async with (
                Outbox(tmp_path / "events.sqlite3", gw=GW, site=SITE, wall=clock.wall, **outbox_kw) as outbox,
                LinkManager(
                    gw_id=GW, backend=host.client_backend(), max_connections=slots, **(links_kw or {})
                ) as links,
            ):
                for sim in sims:
                    done = await links.pair(str(sim.address), sim.model.setup_code)
                    registry.put(LockRecord(done.lock_id, str(sim.address), sim.model.name, done.ltk))
                svc = Service(GW, SITE, authz, outbox, registry, links)
                assert authz.install(w.keyring()).installed
                yield Rig(w, svc, radio, sims, clock)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    async with build_rig(tmp_path) as r:
        yield r


async def test_unlock_grants_commits_and_actuates(rig: Rig) -> None:
    lock = rig.locks[0].model.lock_id
    resp = await rig.unlock(lock)
    assert resp["status"] == "ok", resp
    assert resp["transaction"] == "t-1" and resp["data"]["state"] == "unlocked"
    events = await rig.events()
    types = [e["type"] for e in events]
    assert types == ["access.granted", "lock.unlocked"]
    assert resp["data"]["seq"] == events[-1]["seq"]
    granted = events[0]
    assert (granted["sub"], granted["role"], granted["lock"], granted["transaction"]) == (
        "staff-17",
        "staff",
        lock,
        "t-1",
    )
    assert events[1]["data"]["cmd_id"] == granted["data"]["cmd_id"]
    verify_chain(events)
    assert rig.locks[0].model.state.value == "unlocked"


async def test_refusals_are_events_with_codes(rig: Rig) -> None:
    lock = rig.locks[0].model.lock_id
    resp = await rig.req("unlock", {"lock": lock, "token": b64(rig.w.token(locks=[lock]))})
    assert resp["error"]["code"] == "proof_required"
    resp = await rig.unlock(lock, token=rig.w.token(locks=["lk-elsewhere"]))
    assert resp["error"]["code"] == "wrong_lock"
    resp = await rig.req("unlock", {"lock": lock, "token": "!!!"})
    assert resp["error"]["code"] == "token_invalid"
    events = await rig.events()
    assert [(e["type"], e["reason"]) for e in events] == [
        ("access.denied", "proof_required"),
        ("access.denied", "wrong_lock"),
        ("access.denied", "token_invalid"),
    ]
    assert events[0]["sub"] == "staff-17" and events[0]["cti"]
    assert rig.locks[0].model.state.value == "locked"


@pytest.mark.parametrize(
    ("action", "payload", "code", "tx"),
    [
        ("unlock", b"not json", "invalid_request", None),
        ("unlock", b"[1,2]", "invalid_request", None),
        ("unlock", json.dumps({"transaction": 5, "lock": "x"}).encode(), "invalid_request", None),
        ("unlock", json.dumps({"transaction": "x" * 129}).encode(), "invalid_request", None),
        ("unlock", b"{" + b" " * 70000 + b"}", "invalid_request", None),
        (
            "unlock",
            json.dumps({"transaction": "t", "lock": "lk-nope", "token": "AA"}).encode(),
            "unknown_lock",
            "t",
        ),
        ("unlock", json.dumps({"transaction": "t", "lock": 5}).encode(), "invalid_request", "t"),
        ("open-sesame", b"{}", "unknown_action", None),
        ("replay", json.dumps({"from_seq": 0}).encode(), "invalid_request", None),
        ("challenge", json.dumps({"lock": "lk-nope"}).encode(), "unknown_lock", None),
    ],
)
async def test_malformed_requests_get_errors_and_change_nothing(
    rig: Rig, action: str, payload: bytes, code: str, tx: str | None
) -> None:
    resp = await rig.svc.handle(action, payload)
    assert resp["status"] == "error" and resp["error"]["code"] == code and resp["transaction"] == tx
    assert await rig.events() == []


async def test_jammed_lock_is_access_failed(rig: Rig) -> None:
    lock = rig.locks[0].model.lock_id
    await rig.radio.apply_fault(lock, "jam")
    resp = await rig.unlock(lock)
    assert resp["error"]["code"] == "lock_jammed"
    assert [e["type"] for e in await rig.events()] == ["access.granted", "lock.jammed", "access.failed"]


async def test_lock_log_forwarded_exactly_once_and_acknowledged_after_commit(rig: Rig) -> None:
    sim = rig.locks[0]
    lock = sim.model.lock_id
    await rig.unlock(lock)
    await rig.radio.apply_fault(lock, "manual")
    await rig.radio.apply_fault(lock, "door", "open")
    record = rig.svc.registry.get(lock)
    assert record is not None
    await rig.svc.refresh(record)
    await rig.svc.refresh(record)  # again: nothing new
    events = await rig.events()
    log_events = [(e["type"], e["data"]["lock_seq"]) for e in events if e["type"].startswith("lock.")]
    # lock_seq 1 (paired) is a lock.log; 2 is the unlock already reported by the command.
    assert log_events == [("lock.unlocked", 2), ("lock.log", 1), ("lock.manual", 3), ("lock.door_opened", 4)]
    assert sim.model.first_seq() == 5  # everything acknowledged
    view = rig.svc.views[lock]
    assert view.door == "open" and view.available and view.firmware == "sim-1.0.0"


async def test_carried_keyring_is_installed_before_the_token_check(rig: Rig) -> None:
    lock = rig.locks[0].model.lock_id
    resp = await rig.unlock(lock, keyring=b64(rig.w.keyring(2)))
    assert resp["status"] == "ok"
    types = [e["type"] for e in await rig.events()]
    assert types[:2] == ["trust.installed", "access.granted"]
    assert rig.svc.authz.trust_summary()["keyring"]["version"] == 2  # type: ignore[index]


async def test_unreachable_lock_is_access_failed(rig: Rig) -> None:
    sim = rig.locks[1]
    await rig.radio.apply_fault(sim.model.lock_id, "hostile", "truncated")
    resp = await rig.unlock(sim.model.lock_id)
    assert resp["error"]["code"] in {"lock_unreachable", "lock_error"}
    types = [e["type"] for e in await rig.events()]
    assert types == ["access.granted", "access.failed"]
    assert sim.model.state.value == "locked"


async def test_replay_and_locks(rig: Rig) -> None:
    lock = rig.locks[0].model.lock_id
    await rig.unlock(lock)
    sunk: list[dict] = []

    async def sink(e: dict) -> None:
        sunk.append(e)

    rig.svc.replay_sink = sink
    resp = await rig.req("replay", {"from_seq": 1})
    assert resp["data"]["count"] == 2 and all(e["replayed"] for e in sunk)
    locks = (await rig.req("locks", {}))["data"]["locks"]
    assert {entry["lock"] for entry in locks} == {s.model.lock_id for s in rig.locks}
    assert set(locks[0]) == {
        "lock",
        "name",
        "state",
        "door",
        "battery_pct",
        "available",
        "last_contact",
        "rssi",
        "firmware",
    }
    status = await rig.req("status", {"lock": lock})
    assert status["data"]["state"] == "unlocked" and status["data"]["available"] is True


async def test_fifty_simultaneous_unlocks_across_twenty_locks_with_four_slots(tmp_path: Path) -> None:
    """All served, access before housekeeping, no starvation (issue 4 concurrency test)."""
    import asyncio

    async with build_rig(tmp_path, locks=20, seed=12, slots=4) as rig:
        svc = rig.svc
        # Housekeeping competes for the same slots at low priority.
        housekeeping = [asyncio.create_task(svc.refresh(r)) for r in svc.registry.all()]
        targets = [rig.locks[i % 20].model.lock_id for i in range(50)]
        results = await asyncio.gather(*(rig.unlock(lock) for lock in targets))
        await asyncio.gather(*housekeeping)
        assert [r["status"] for r in results] == ["ok"] * 50
        assert svc.links.stats.by_priority["ACCESS"] >= 50


async def test_link_dropped_mid_command_actuates_once_with_a_clear_outcome(rig: Rig) -> None:
    sim = rig.locks[0]
    lock = sim.model.lock_id
    # Warm a link, then make the lock drop it right after executing the next command.
    await rig.req("status", {"lock": lock})
    await rig.radio.apply_fault(lock, "drop_after_write")
    resp = await rig.unlock(lock)
    assert resp["status"] == "ok" and resp["data"]["state"] == "unlocked"
    events = await rig.events()
    granted = [e for e in events if e["type"] == "access.granted"]
    cmd = granted[-1]["data"]["cmd_id"]
    actuations = [e for e in sim.model.log if e.cmd_id is not None and e.cmd_id.hex() == cmd]
    assert len(actuations) == 1  # the retry with the same cmd_id was answered from the cache
    assert rig.svc.links.stats.retries >= 1


async def test_low_battery_and_door_are_forwarded_as_events(rig: Rig) -> None:
    sim = rig.locks[1]
    await rig.radio.apply_fault(sim.model.lock_id, "battery", 12)
    record = rig.svc.registry.get(sim.model.lock_id)
    assert record is not None
    await rig.svc.refresh(record)
    types = [e["type"] for e in await rig.events()]
    assert "lock.battery_low" in types
    assert rig.svc.views[sim.model.lock_id].battery_pct == 12


async def test_A5_a_flooding_lock_does_not_hold_up_the_others(tmp_path: Path) -> None:
    async with build_rig(tmp_path, slots=2) as rig:
        bad, good = rig.locks
        await rig.radio.apply_fault(bad.model.lock_id, "hostile", "flood")
        # Liveness bound only (speed is bench/'s): nothing here may hang.
        async with asyncio.timeout(60):
            failing = asyncio.create_task(rig.unlock(bad.model.lock_id))
            served = [await rig.unlock(good.model.lock_id) for _ in range(5)]
            refused = await failing
        assert [r["status"] for r in served] == ["ok"] * 5
        assert refused["error"]["code"] in {"lock_unreachable", "lock_error"}
        assert bad.model.state.value == "locked" and good.model.state.value == "unlocked"
        failed = [e for e in await rig.events() if e["type"] == "access.failed"]
        assert [e["lock"] for e in failed] == [bad.model.lock_id]


async def granted(rig: Rig, n: int) -> None:
    async with asyncio.timeout(30):  # liveness bound only
        while sum(e["type"] == "access.granted" for e in await rig.events()) < n:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_stopping_lets_a_command_in_flight_finish_and_refuses_new_ones(rig: Rig) -> None:
    lock = rig.locks[0].model.lock_id
    running = asyncio.create_task(rig.unlock(lock))
    await granted(rig, 1)
    assert await rig.svc.quiesce(grace_s=30) == 0  # returned as soon as the command was done
    assert (await running)["status"] == "ok"
    refused = await rig.unlock(lock)
    assert refused["error"]["code"] == "busy" and "stopping" in refused["error"]["message"]
    assert [e["type"] for e in await rig.events()] == ["access.granted", "lock.unlocked"]


async def test_stopping_records_a_command_it_had_to_interrupt(rig: Rig) -> None:
    stuck = rig.locks[1]
    await rig.radio.apply_fault(stuck.model.lock_id, "hostile", "truncated")  # never answers whole
    hanging = asyncio.create_task(rig.unlock(stuck.model.lock_id))
    await granted(rig, 1)
    assert await rig.svc.quiesce(grace_s=0.2) == 1
    async with asyncio.timeout(30):
        await cancel_and_wait([hanging])  # what the MQTT bridge and the control socket do
    assert hanging.cancelled()
    events = await rig.events()
    verify_chain(events)
    assert [e["type"] for e in events] == ["access.granted", "access.failed"]
    assert "interrupted" in events[1]["data"]["message"]
    assert events[1]["data"]["cmd_id"] == events[0]["data"]["cmd_id"]
    assert stuck.model.state.value == "locked"
