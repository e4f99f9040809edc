"""The simulated bootloader's flash survives a simulator restart (``--state DIR``): both slots,
the image flags and the security counter are in ``lock-N.mcuboot.cbor``, and each start is a
power-on boot — a pending image is swapped in, an unconfirmed test image is reverted, a
confirmed one stays, and the security counter never goes down.

Each "restart" is a new SimRadio (new Bumble stacks, new gateway host) over the same state
directory; SMP goes over the air through the gateway's LinkManager, as a rollout's does."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fwfix import firmware_key, signed_image
from smp import image_management as smpimg
from smpclient.requests.image_management import ImageStatesRead, ImageStatesWrite
from smpclient.requests.os_management import ResetWrite

from firmware_sim.bumble_peripheral import SimLock, SimRadio
from firmware_sim.persist import BootStore
from firmware_sim.smp_gatt import SmpService, imgtool_verifier
from firmware_sim.smp_server import McuBoot, SlotImage
from gateway.ble.bumble_backend import BumbleHost
from gateway.ble.links import LinkManager
from gateway.ble.registry import LockRecord
from gateway.errors import BleError
from gateway.firmware.rollout import chunk_request
from protocols.firmware import verify_image

pytestmark = pytest.mark.ble
GW = "gw-test-1"
KEY = firmware_key()


@dataclass
class Booted:
    sim: SimLock
    smp: SmpService
    links: LinkManager
    record: LockRecord


@asynccontextmanager
async def power_on(state: Path, ltk: bytes | None = None) -> AsyncIterator[Booted]:
    """The simulator started over ``state`` (pairing the lock the first time)."""
    async with SimRadio() as radio:
        [sim] = await radio.add_locks(1, seed=5, state_dir=state)
        smp = radio.enable_firmware(sim.model.lock_id, imgtool_verifier([KEY.imgtool_key]))
        async with (
            BumbleHost(controller=radio.open_gateway_controller()) as host,
            LinkManager(gw_id=GW, backend=host.client_backend(), max_connections=1) as links,
        ):
            if ltk is None:
                ltk = (await links.pair(str(sim.address), sim.model.setup_code)).ltk
            yield Booted(sim, smp, links, LockRecord(sim.model.lock_id, str(sim.address), "", ltk))


async def upload_and_mark(b: Booted, image: bytes) -> None:
    sha, off = hashlib.sha256(image).digest(), 0
    while off < len(image):
        smp = b.links.smp_link(b.record)
        buf = smp.buf_size if smp is not None and smp.ready else 256
        answer = await b.links.smp(b.record, chunk_request(image, off, sha, buf))
        assert isinstance(answer, smpimg.ImageUploadWriteResponse) and answer.off is not None, answer
        off = answer.off
    digest = verify_image(image, [KEY.cose]).digest
    marked = await b.links.smp(b.record, ImageStatesWrite(hash=digest))
    assert isinstance(marked, smpimg.ImageStatesWriteResponse) and marked.images[1].pending, marked


async def states(b: Booted) -> list[Any]:
    answer = await b.links.smp(b.record, ImageStatesRead())
    assert isinstance(answer, smpimg.ImageStatesReadResponse), answer
    return list(answer.images)


async def test_a_pending_image_is_swapped_in_at_the_next_power_on_and_a_confirmed_one_stays(
    tmp_path: Path,
) -> None:
    image = signed_image(KEY, "1.1.0", security_counter=2, size=6000)
    async with power_on(tmp_path) as b:
        ltk = b.record.ltk
        await upload_and_mark(b, image)
        assert [o.kind for o in b.smp.boots] == []  # marked, never reset: the power goes
    assert (tmp_path / "lock-0.mcuboot.cbor").exists()
    async with power_on(tmp_path, ltk) as b:
        assert [o.kind for o in b.smp.boots] == ["swapped_test"]  # MCUboot swaps at boot
        running = (await states(b))[0]
        assert running.version == "1.1.0" and not running.confirmed
        assert b.sim.model.firmware == "sim-1.1.0"
        confirmed = await b.links.smp(b.record, ImageStatesWrite(confirm=True))
        assert confirmed.images[0].confirmed, confirmed
    async with power_on(tmp_path, ltk) as b:
        assert [o.kind for o in b.smp.boots] == ["normal"]  # confirmed: it stays
        running = (await states(b))[0]
        assert running.version == "1.1.0" and running.confirmed
        assert b.smp.boot.security_counter == 2 and b.smp.boot.primary.data == image


async def test_an_unconfirmed_test_image_reverts_across_a_restart(tmp_path: Path) -> None:
    image = signed_image(KEY, "1.1.0", security_counter=2, size=6000)
    async with power_on(tmp_path) as b:
        ltk = b.record.ltk
        await upload_and_mark(b, image)
        with contextlib.suppress(BleError):  # the answer may be lost with the reboot
            await b.links.smp(b.record, ResetWrite())
        async with asyncio.timeout(20):
            while not b.smp.boots:  # noqa: ASYNC110 - the simulator keeps no event for it
                await asyncio.sleep(0.02)
        assert [o.kind for o in b.smp.boots] == ["swapped_test"]
    async with power_on(tmp_path, ltk) as b:
        # Restarted while testing, not confirmed: as a power cut on a test image, it reverts.
        assert [o.kind for o in b.smp.boots] == ["reverted"]
        assert (await states(b))[0].version == "1.0.0"
        assert b.smp.boot.security_counter == 1


async def test_the_security_counter_never_goes_down_across_restarts(tmp_path: Path) -> None:
    async with power_on(tmp_path) as b:
        ltk = b.record.ltk
        await upload_and_mark(b, signed_image(KEY, "1.1.0", security_counter=5, size=4000))
    async with power_on(tmp_path, ltk) as b:
        await b.links.smp(b.record, ImageStatesWrite(confirm=True))
        assert b.smp.boot.security_counter == 5
    async with power_on(tmp_path, ltk) as b:
        # A newer version with a lower counter: uploaded and marked, refused at the next boot.
        await upload_and_mark(b, signed_image(KEY, "1.2.0", security_counter=4, size=4000))
    async with power_on(tmp_path, ltk) as b:
        [outcome] = b.smp.boots
        assert outcome.kind == "refused" and "counter" in outcome.reason
        running = (await states(b))[0]
        assert running.version == "1.1.0" and running.confirmed
        assert b.smp.boot.security_counter == 5


async def test_a_restart_mid_upload_starts_the_upload_again(tmp_path: Path) -> None:
    image = signed_image(KEY, "1.1.0", security_counter=2, size=8000)
    sha = hashlib.sha256(image).digest()
    async with power_on(tmp_path) as b:
        ltk = b.record.ltk
        answer = await b.links.smp(b.record, chunk_request(image, 0, sha, 1024))
        assert 0 < answer.off < len(image)
    async with power_on(tmp_path, ltk) as b:
        assert [o.kind for o in b.smp.boots] == ["normal"]
        assert len(await states(b)) == 1  # nothing half-written is listed
        # The upload was in RAM (Zephyr's): going on where it stopped is refused, and the
        # same image from 0 is a new upload.
        go_on = await b.links.smp(b.record, chunk_request(image, answer.off, sha, 1024))
        assert getattr(go_on, "off", None) is None and getattr(go_on, "rc", None) == 3, go_on  # EINVAL
        assert b.smp.server.upload is None
        again = await b.links.smp(b.record, chunk_request(image, 0, sha, 1024))
        assert again.off == answer.off and b.smp.server.upload is not None


def test_a_state_file_that_is_not_one_is_refused(tmp_path: Path) -> None:
    boot = McuBoot(verifier=lambda _d: pytest.fail("no verify"), primary=SlotImage.factory("lk-1"))
    path = tmp_path / "lock-0.mcuboot.cbor"
    for junk in (b"", b"\xff\xff", b"\xa1\x61v\x02", b"\xa1\x61v\x01"):
        path.write_bytes(junk)
        with pytest.raises(ValueError, match="mcuboot"):
            BootStore(path).load(boot)
    assert boot.primary == SlotImage.factory("lk-1")  # untouched
    store = BootStore(path)
    boot.security_counter = 7
    assert store.sync(boot) and not store.sync(boot)  # written once, then up to date
    again = McuBoot(verifier=boot.verifier, primary=SlotImage.factory("lk-2"))
    assert store.load(again) and again.durable() == boot.durable()
