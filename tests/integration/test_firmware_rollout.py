"""Rollouts end to end: gateway/firmware (state machine, sqlite) → LinkManager → bleak → our
Bumble backend → Bumble → simulated locks with SMP servers and MCUboot (imgtool's verifier)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fwfix import firmware_key, manifest_key, signed_image, signed_manifest

from firmware_sim.bumble_peripheral import SimLock, SimRadio
from firmware_sim.smp_gatt import SmpService, imgtool_verifier
from gateway.ble.bumble_backend import BumbleHost
from gateway.ble.links import LinkManager, Priority
from gateway.ble.registry import LockRecord
from gateway.events import Event, Stamp, event_fields
from gateway.firmware.rollout import FirmwareRefused, Rollouts
from gateway.firmware.store import FirmwareStore
from protocols.messages import LockState, Op, Status

pytestmark = pytest.mark.ble
GW = "gw-test-1"
KEY = firmware_key()
MKEY = manifest_key()


@dataclass
class Site:
    radio: SimRadio
    links: LinkManager
    locks: list[SimLock]
    smp: dict[str, SmpService]
    records: dict[str, LockRecord]
    store: FirmwareStore
    rollouts: Rollouts
    events: list[dict[str, Any]] = field(default_factory=list)

    def ids(self) -> list[str]:
        return [s.model.lock_id for s in self.locks]

    def of(self, type_: str, lock: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == type_ and (lock is None or e.get("lock") == lock)]


def flat(event: Event) -> dict[str, Any]:
    """An event as the outbox would seal it, its ``data`` lifted beside the envelope."""
    fields = event_fields(event, Stamp("synced", "ok"))
    data = fields["data"]
    assert isinstance(data, dict)
    return {**fields, **data}


def keys() -> dict[bytes, Any]:
    return {b"image-key": KEY.cose, MKEY.public.kid: MKEY.public}


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    async with SimRadio() as radio:
        sims = await radio.add_locks(5, seed=11)
        smp = {
            s.model.lock_id: radio.enable_firmware(s.model.lock_id, imgtool_verifier([KEY.imgtool_key]))
            for s in sims
        }
        async with (
            BumbleHost(controller=radio.open_gateway_controller()) as host,
            LinkManager(gw_id=GW, backend=host.client_backend(), max_connections=2) as links,
        ):
            records = {}
            for s in sims:
                done = await links.pair(str(s.address), s.model.setup_code)
                records[done.lock_id] = LockRecord(done.lock_id, str(s.address), s.model.name, done.ltk)
            events: list[dict[str, Any]] = []

            async def emit(event: Event) -> None:
                events.append(flat(event))

            async with (
                FirmwareStore(tmp_path / "firmware.sqlite") as store,
                Rollouts(
                    store,
                    links,
                    site="site-test",
                    lookup=records.get,
                    keys=keys,
                    emit=emit,
                    health_timeout_s=30,
                ) as rollouts,
            ):
                yield Site(radio, links, sims, smp, records, store, rollouts, events)


async def test_a_signed_image_rolls_out_in_rings(site: Site) -> None:
    image = signed_image(KEY, "1.1.0", security_counter=2, size=4000)
    ids = site.ids()
    manifest = signed_manifest(MKEY, image, ids, canary=1, fraction=50)
    plan = await site.rollouts.apply(manifest, image)
    assert plan["rings"] == [ids[:1], ids[1:3], ids[3:]]
    await asyncio.wait_for(site.rollouts.wait("ro-1"), 120)
    [status] = await site.rollouts.status()
    assert status["state"] == "done", status
    assert {lk["state"] for lk in status["locks"]} == {"confirmed"}
    for lock_id, smp in site.smp.items():
        assert str(smp.boot.primary.version) == "1.1.0" and smp.boot.confirmed, lock_id
        assert smp.boot.security_counter == 2
        assert [b.kind for b in smp.boots] == ["swapped_test"]
        assert site.of("firmware.confirmed", lock_id)
        progress = [e["progress"] for e in site.of("firmware.uploading", lock_id)]
        assert progress == sorted(progress) and progress[-1] == 100
    # Ring order: the canary was confirmed before any lock of ring 2 started uploading.
    order = [(e["type"], e.get("lock")) for e in site.events]
    canary_done = order.index(("firmware.confirmed", ids[0]))
    assert all(order.index(("firmware.uploading", lock)) > canary_done for lock in ids[1:])


async def test_a_failing_health_check_is_reverted_and_the_ring_stops(site: Site) -> None:
    image = signed_image(KEY, "1.1.0", security_counter=2, size=3000)
    ids = site.ids()
    for lock_id in ids:
        await site.radio.apply_fault(lock_id, "fw_unhealthy", "1.1.0")
    await site.rollouts.apply(signed_manifest(MKEY, image, ids, canary=1), image)
    await asyncio.wait_for(site.rollouts.wait("ro-1"), 120)
    [status] = await site.rollouts.status()
    assert status["state"] == "halted" and "ring 0" in status["reason"]
    states = {lk["lock"]: lk["state"] for lk in status["locks"]}
    assert states[ids[0]] == "reverted" and all(states[i] == "halted" for i in ids[1:])
    canary = site.smp[ids[0]]
    assert [b.kind for b in canary.boots] == ["swapped_test", "reverted"]
    assert str(canary.boot.primary.version) == "1.0.0" and canary.boot.security_counter == 1
    assert all(not site.smp[i].server.handled.get("upload") for i in ids[1:])
    assert site.of("firmware.reverted", ids[0])[0]["reason"].startswith("status failed")
    assert site.of("firmware.halted")


@pytest.mark.parametrize("case", ["wrong-key", "unsigned", "tampered", "downgrade", "not-the-manifests"])
async def test_bad_images_are_refused_before_any_radio_work(site: Site, case: str) -> None:
    good = signed_image(KEY, "1.1.0", security_counter=2)
    image = {
        "wrong-key": signed_image(firmware_key(), "1.1.0"),
        "unsigned": signed_image(None, "1.1.0"),
        "tampered": good[:100] + bytes([good[100] ^ 1]) + good[101:],
        "downgrade": signed_image(KEY, "0.9.0"),
        "not-the-manifests": good,
    }[case]
    manifest = signed_manifest(
        MKEY, signed_image(KEY, "1.2.0") if case == "not-the-manifests" else image, site.ids()
    )
    if case == "downgrade":
        # The gateway has no record of this lock yet: the refusal comes from the lock's running
        # version, read over SMP before any upload.
        await site.rollouts.apply(manifest, image)
        await asyncio.wait_for(site.rollouts.wait("ro-1"), 120)
        [status] = await site.rollouts.status()
        assert {lk["reason"] for lk in status["locks"]} == {"downgrade"}
    else:
        with pytest.raises(FirmwareRefused) as err:
            await site.rollouts.apply(manifest, image)
        assert err.value.code in {"bad_signature", "unsigned", "bad_hash", "image_mismatch"}
        assert site.of("firmware.refused")[0]["reason"] == err.value.code
    assert all(not smp.server.handled.get("upload") for smp in site.smp.values())


async def test_a_lower_security_counter_than_one_confirmed_is_refused(site: Site) -> None:
    await site.store.confirmed(site.ids()[0], "1.1.0", 5)
    image = signed_image(KEY, "1.2.0", security_counter=4)
    with pytest.raises(FirmwareRefused) as err:
        await site.rollouts.apply(signed_manifest(MKEY, image, site.ids()), image)
    assert err.value.code == "counter_rollback"


async def test_unlocks_during_an_upload_are_served_first(site: Site) -> None:
    lock_id = site.ids()[0]
    smp = site.smp[lock_id]
    await site.radio.apply_fault(lock_id, "fw_flash_delay", 0.05)
    image = signed_image(KEY, "1.1.0", security_counter=2, size=20000)
    await site.rollouts.apply(signed_manifest(MKEY, image, [lock_id]), image)
    async with asyncio.timeout(60):
        while site.rollouts.progress.get(("ro-1", lock_id), 0) < 10:  # noqa: ASYNC110 - polling the runner's view
            await asyncio.sleep(0.01)
    record = site.records[lock_id]
    for _ in range(3):
        before = smp.server.handled["upload"]
        answer = await site.links.command(record, Op.UNLOCK, priority=Priority.ACCESS)
        assert answer.status is Status.OK
        # At most the chunk in flight (and one queued behind the gate) ran before the unlock.
        assert smp.server.handled["upload"] - before <= 2
        await site.links.command(record, Op.LOCK, priority=Priority.ACCESS)
    assert site.locks[0].model.state is LockState.LOCKED
    await asyncio.wait_for(site.rollouts.wait("ro-1"), 120)
    [status] = await site.rollouts.status()
    assert status["locks"][0]["state"] == "confirmed"


async def test_a_stopped_gateway_resumes_the_upload_from_the_locks_offset(site: Site) -> None:
    """The runner is torn down mid-upload (as a kill leaves it: the last persisted step), and a
    new one over the same store resumes; the lock answers its offset, so nothing is sent twice."""
    lock_id = site.ids()[0]
    smp = site.smp[lock_id]
    await site.radio.apply_fault(lock_id, "fw_flash_delay", 0.02)
    image = signed_image(KEY, "1.1.0", security_counter=2, size=20000)
    await site.rollouts.apply(signed_manifest(MKEY, image, [lock_id]), image)
    async with asyncio.timeout(60):
        while site.rollouts.progress.get(("ro-1", lock_id), 0) < 40:  # noqa: ASYNC110 - polling the runner's view
            await asyncio.sleep(0.01)
    await site.rollouts.__aexit__(None, None, None)  # gone, whatever it was doing
    [before] = await site.store.locks("ro-1")
    assert before.state == "uploading" and 0 < before.offset < len(image)
    reached = smp.server.upload.off
    sent_before = smp.server.handled["upload"]

    async def emit(event: Event) -> None:
        site.events.append(flat(event))

    async with Rollouts(
        site.store,
        site.links,
        site="site-test",
        lookup=site.records.get,
        keys=keys,
        emit=emit,
        health_timeout_s=30,
    ) as again:
        assert await again.resume() == ["ro-1"]
        await asyncio.wait_for(again.wait("ro-1"), 120)
        [status] = await again.status()
    assert status["state"] == "done" and status["locks"][0]["state"] == "confirmed"
    chunks_after = smp.server.handled["upload"] - sent_before
    chunk = 1024 - 40
    assert chunks_after <= (len(image) - reached) // chunk + 3  # the rest only, from the lock's offset
    assert smp.boot.primary.version.minor == 1


async def test_a_reboot_mid_upload_restarts_it_cleanly(site: Site) -> None:
    lock_id = site.ids()[0]
    smp = site.smp[lock_id]
    await site.radio.apply_fault(lock_id, "fw_flash_delay", 0.02)
    image = signed_image(KEY, "1.1.0", security_counter=2, size=12000)
    await site.rollouts.apply(signed_manifest(MKEY, image, [lock_id]), image)
    async with asyncio.timeout(60):
        while site.rollouts.progress.get(("ro-1", lock_id), 0) < 30:  # noqa: ASYNC110 - polling the runner's view
            await asyncio.sleep(0.01)
    await site.radio.apply_fault(lock_id, "fw_reboot")  # the upload state in the lock's RAM is gone
    await asyncio.wait_for(site.rollouts.wait("ro-1"), 120)
    [status] = await site.rollouts.status()
    assert status["locks"][0]["state"] == "confirmed", status["locks"][0]["reason"]
    assert [b.kind for b in smp.boots] == ["normal", "swapped_test"]
    assert smp.boot.primary.data == image  # started again from 0: the whole image, intact


async def test_a_direct_command_records_the_rollout_and_the_daemon_runs_it(site: Site) -> None:
    lock_id = site.ids()[0]
    image = signed_image(KEY, "1.1.0", security_counter=2)

    async def emit(event: Event) -> None:
        site.events.append(flat(event))

    async with Rollouts(
        site.store,
        site.links,
        site="site-test",
        lookup=site.records.get,
        keys=keys,
        emit=emit,
        autostart=False,
    ) as direct:
        await direct.apply(signed_manifest(MKEY, image, [lock_id]), image)
    [status] = await site.rollouts.status()
    assert status["state"] == "running" and status["locks"][0]["state"] == "pending"
    assert not site.smp[lock_id].server.handled  # nothing went over the air
    assert await site.rollouts.resume() == ["ro-1"]  # what `lockgw run` does at start
    await asyncio.wait_for(site.rollouts.wait("ro-1"), 120)
    [status] = await site.rollouts.status()
    assert status["locks"][0]["state"] == "confirmed"


@pytest.mark.parametrize("offset", [0, 2000, 10**6])
async def test_a_lock_lying_about_its_upload_offset_fails_alone_and_bounded(site: Site, offset: int) -> None:
    """A hostile lock answers every upload write with one offset: stuck at the start, stuck
    midway, or beyond the image. The gateway gives up on that lock with the reason (it looped
    forever, holding the lock's link and radio time) and the rollout halts."""
    image = signed_image(KEY, "1.1.0", security_counter=2, size=3000)
    liar = site.ids()[0]
    await site.radio.apply_fault(liar, "fw_lie_offset", offset)
    await site.rollouts.apply(signed_manifest(MKEY, image, [liar]), image)
    await asyncio.wait_for(site.rollouts.wait("ro-1"), 120)
    [status] = await site.rollouts.status()
    assert status["state"] == "halted", status
    [lk] = status["locks"]
    assert lk["state"] == "failed" and "offset" in lk["reason"], lk
    assert not site.smp[liar].boot.testing and site.smp[liar].boot.pending is None


async def test_a_lock_answering_smp_with_garbage_cbor_fails_with_the_reason(site: Site) -> None:
    """cbor2's decode errors are not ValueErrors: they went past the SMP boundary unmapped and
    the lock failed as an "internal error" of ours. Now the lock misbehaved (its reason)."""
    image = signed_image(KEY, "1.1.0", security_counter=2, size=3000)
    liar = site.ids()[0]
    await site.radio.apply_fault(liar, "fw_bad_cbor", True)
    await site.rollouts.apply(signed_manifest(MKEY, image, [liar]), image)
    await asyncio.wait_for(site.rollouts.wait("ro-1"), 120)
    [status] = await site.rollouts.status()
    [lk] = status["locks"]
    assert lk["state"] == "failed" and "internal error" not in lk["reason"], lk
    assert "lock_error" in lk["reason"], lk
    # The gateway still serves that lock's ordinary commands.
    answer = await site.links.command(site.records[liar], Op.STATUS, priority=Priority.ACCESS)
    assert answer.status is Status.OK
