"""End to end through bleak's public API → our Bumble backend → Bumble → simulated lock."""

from __future__ import annotations

import asyncio

import pytest
from airfix import Air
from bleak import BleakScanner

from firmware_sim.bumble_peripheral import SimLock
from gateway.ble.lock_client import LockClient
from gateway.errors import BleError, LinkLost, LinkTimeout, LockMisbehaved, PairingFailed
from protocols.gatt import COMPANY_ID, decode_advert
from protocols.messages import LockState, LogEntry, LogKind, Op, Status

pytestmark = pytest.mark.ble
GW = "gw-test-1"


async def wait_links_gone(sim: SimLock) -> None:
    """Until the simulated lock has seen every link to it end: it processes nothing more after
    that (a write still queued is dropped with its link) and advertises as connectable again."""
    async with asyncio.timeout(15):
        while sim.drivers:  # noqa: ASYNC110 - the simulator keeps no event for it
            await asyncio.sleep(0.01)


async def pair(air: Air, index: int = 0) -> bytes:
    sim = air.locks[index]
    async with LockClient(str(sim.address), gw_id=GW, backend=air.host.client_backend()) as client:
        done = await client.pair(sim.model.setup_code)
    assert done.lock_id == sim.model.lock_id
    return done.ltk


async def test_scan_finds_locks_with_ids_and_pairing_flags(air: Air) -> None:
    found: dict[str, object] = {}
    async with BleakScanner(backend=air.host.scanner_backend()) as scanner:
        async with asyncio.timeout(5):
            async for _device, adv in scanner.advertisement_data():
                advert = decode_advert(adv.manufacturer_data.get(COMPANY_ID, b""))
                if advert is not None:
                    found[advert.lock_id] = advert
                if len(found) == 2:
                    break
    assert set(found) == {s.model.lock_id for s in air.locks}
    assert all(a.pairing_mode and not a.paired for a in found.values())  # type: ignore[attr-defined]


async def test_pair_then_unlock_lock_status_and_log(air: Air) -> None:
    sim = air.locks[0]
    ltk = await pair(air)
    assert sim.model.ltk == ltk and sim.model.paired_gw == GW
    async with LockClient(str(sim.address), gw_id=GW, backend=air.host.client_backend()) as client:
        await client.open_session(lock_id=sim.model.lock_id, ltk=ltk)
        assert client.mtu == 247
        r = await client.request(Op.UNLOCK)
        assert r.status is Status.OK and r.result["state"] == "unlocked"
        assert sim.model.state is LockState.UNLOCKED
        r = await client.request(Op.LOCK)
        assert r.result["state"] == "locked"
        status = await client.request(Op.STATUS)
        assert status.result["firmware"] == "sim-1.0.0" and status.result["door"] == "closed"
        logr = await client.request(Op.READ_LOG, {"from": 1, "max": 16})
        kinds = [LogEntry.from_cbor(e).kind for e in logr.result["entries"]]  # type: ignore[union-attr]
        assert kinds == [LogKind.PAIRED, LogKind.UNLOCKED, LogKind.LOCKED]
        await client.request(Op.ACK_LOG, {"upto": 2})
        logr = await client.request(Op.READ_LOG, {"from": 1, "max": 16})
        assert [e[0] for e in logr.result["entries"]] == [3]  # type: ignore[union-attr, index]


async def test_wrong_code_is_refused_and_rate_limited(air: Air) -> None:
    sim = air.locks[1]
    backend = air.host.client_backend()
    lefts = []
    for _ in range(5):
        async with LockClient(str(sim.address), gw_id=GW, backend=backend) as client:
            with pytest.raises(PairingFailed) as info:
                await client.pair("000-000-000")
            lefts.append((info.value.reason, info.value.attempts_left))
    assert lefts == [("pairing_failed", n) for n in (4, 3, 2, 1)] + [("pairing_failed", 0)]
    # Locked out now: even the right code is refused without a guess being spent.
    async with LockClient(str(sim.address), gw_id=GW, backend=backend) as client:
        with pytest.raises(PairingFailed) as info:
            await client.pair(sim.model.setup_code)
    assert info.value.reason == "rate_limited"
    assert sim.model.paired_gw is None


async def test_retried_unlock_after_link_drop_actuates_once(air: Air) -> None:
    sim = air.locks[0]
    ltk = await pair(air)
    backend = air.host.client_backend()
    cmd = bytes(range(16))
    async with LockClient(str(sim.address), gw_id=GW, backend=backend, request_timeout_s=2) as client:
        await client.open_session(lock_id=sim.model.lock_id, ltk=ltk)
        await air.radio.apply_fault(sim.model.lock_id, "drop_after_write")
        with pytest.raises(LinkLost):
            await client.request(Op.UNLOCK, cmd_id=cmd)
    seq_after_first = sim.model.next_seq
    assert sim.model.state is LockState.UNLOCKED  # actuated, but the response was lost
    await wait_links_gone(sim)
    async with LockClient(str(sim.address), gw_id=GW, backend=backend) as client:
        await client.open_session(lock_id=sim.model.lock_id, ltk=ltk)
        r = await client.request(Op.UNLOCK, cmd_id=cmd)
    assert r.status is Status.OK and r.result["state"] == "unlocked"
    assert sim.model.next_seq == seq_after_first  # no second actuation, no new log entry


@pytest.mark.parametrize("mode", ["garbage", "oversized", "truncated", "flood"])
async def test_hostile_lock_never_crashes_the_client(air: Air, mode: str) -> None:
    sim = air.locks[0]
    ltk = await pair(air)
    await air.radio.apply_fault(sim.model.lock_id, "hostile", mode)
    async with LockClient(
        str(sim.address), gw_id=GW, backend=air.host.client_backend(), request_timeout_s=1
    ) as client:
        with pytest.raises(BleError) as info:
            await client.open_session(lock_id=sim.model.lock_id, ltk=ltk)
    # Garbage and absurd lengths are protocol violations; a frame that never completes is a
    # timeout. Either way the link is closed and the lock is reported, never a crash.
    expected = LinkTimeout if mode in {"truncated", "flood"} else LockMisbehaved
    assert isinstance(info.value, expected | LinkLost)
    # The other lock is unaffected.
    await air.radio.apply_fault(sim.model.lock_id, "hostile", None)
    ltk2 = await pair(air, 1)
    other = air.locks[1]
    async with LockClient(str(other.address), gw_id=GW, backend=air.host.client_backend()) as client:
        await client.open_session(lock_id=other.model.lock_id, ltk=ltk2)
        assert (await client.request(Op.STATUS)).status is Status.OK


async def test_jammed_lock_reports_jammed(air: Air) -> None:
    sim = air.locks[0]
    ltk = await pair(air)
    await air.radio.apply_fault(sim.model.lock_id, "jam")
    async with LockClient(str(sim.address), gw_id=GW, backend=air.host.client_backend()) as client:
        await client.open_session(lock_id=sim.model.lock_id, ltk=ltk)
        r = await client.request(Op.UNLOCK)
    assert r.status is Status.JAMMED and r.result["state"] == "jammed"


async def test_unpair_wipes_the_lock_key_and_the_old_key_is_refused(air: Air) -> None:
    sim = air.locks[0]
    ltk = await pair(air)
    backend = air.host.client_backend()
    async with LockClient(str(sim.address), gw_id=GW, backend=backend) as client:
        await client.open_session(lock_id=sim.model.lock_id, ltk=ltk)
        assert (await client.request(Op.UNPAIR)).status is Status.OK
    assert sim.model.ltk is None and sim.model.paired_gw is None
    async with LockClient(str(sim.address), gw_id=GW, backend=backend) as client:
        with pytest.raises(LockMisbehaved, match="not paired"):
            await client.open_session(lock_id=sim.model.lock_id, ltk=ltk)


async def test_B2_replayed_recording_over_ble_is_refused(air: Air) -> None:
    """Record every byte a real session wrote, replay it on a new connection: nothing moves."""
    from bleak import BleakClient

    from protocols.gatt import RX_CHAR_UUID, TX_CHAR_UUID

    sim = air.locks[0]
    ltk = await pair(air)
    backend = air.host.client_backend()
    recorded: list[bytes] = []
    async with LockClient(str(sim.address), gw_id=GW, backend=backend) as client:
        original = client._client.write_gatt_char  # type: ignore[union-attr]

        async def tap(char, data, response=None):  # type: ignore[no-untyped-def]
            recorded.append(bytes(data))
            await original(char, data, response=response)

        client._client.write_gatt_char = tap  # type: ignore[union-attr, method-assign]
        await client.open_session(lock_id=sim.model.lock_id, ltk=ltk)
        await client.request(Op.UNLOCK)
        await client.request(Op.LOCK)
    assert sim.model.state is LockState.LOCKED
    seq = sim.model.next_seq
    notified: list[bytes] = []
    async with BleakClient(str(sim.address), backend=backend, timeout=5) as raw:
        await raw.start_notify(TX_CHAR_UUID, lambda _c, d: notified.append(bytes(d)))
        for piece in recorded:
            try:
                await raw.write_gatt_char(RX_CHAR_UUID, piece, response=True)
            except Exception:  # the lock drops the link once the replay fails
                break
    await wait_links_gone(sim)  # every replayed piece the lock took has been processed
    assert sim.model.state is LockState.LOCKED
    assert sim.model.next_seq == seq  # no actuation, no log entry
