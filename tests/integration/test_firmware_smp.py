"""SMP end to end: bleak → our Bumble backend → Bumble → simulated lock's SMP server + MCUboot,
with smpclient over the lock link's own connection (gateway/ble/smp_transport.py)."""

from __future__ import annotations

import asyncio

import pytest
from airfix import Air
from fwfix import firmware_key, signed_image
from smpclient import SMPClient
from smpclient.exceptions import SMPUploadError
from smpclient.generics import success
from smpclient.requests.image_management import ImageStatesRead, ImageStatesWrite
from smpclient.requests.os_management import ResetWrite
from smpclient.transport import SMPTransportDisconnected

from firmware_sim.bumble_peripheral import SimLock
from firmware_sim.smp_gatt import imgtool_verifier
from gateway.ble.lock_client import LockClient
from gateway.ble.smp_transport import LinkSmpTransport
from gateway.errors import BleError
from protocols.messages import Op, Status

pytestmark = pytest.mark.ble
GW = "gw-test-1"
KEY = firmware_key()


async def paired(air: Air, sim: SimLock) -> bytes:
    async with LockClient(str(sim.address), gw_id=GW, backend=air.host.client_backend()) as client:
        return (await client.pair(sim.model.setup_code)).ltk


async def wait_for(predicate, what: str) -> None:
    async with asyncio.timeout(20):  # generous: a loaded 2-core machine
        while not predicate():  # noqa: ASYNC110 - the simulator keeps no event for it
            await asyncio.sleep(0.02)


async def test_smp_needs_an_authenticated_window(air: Air) -> None:
    sim = air.locks[0]
    smp = air.radio.enable_firmware(sim.model.lock_id, imgtool_verifier([KEY.imgtool_key]))
    ltk = await paired(air, sim)
    async with LockClient(str(sim.address), gw_id=GW, backend=air.host.client_backend()) as client:
        await client.open_session(lock_id=sim.model.lock_id, ltk=ltk)
        smpc = SMPClient(LinkSmpTransport(client.bleak_client), str(sim.address), timeout_s=1.0)
        await smpc.connect()  # its parameter read times out unanswered; smpclient goes on
        with pytest.raises(TimeoutError):  # no SMP_OPEN yet: the lock drops the writes
            await smpc.request(ImageStatesRead())
        assert smp.refused >= 1 and not smp.server.handled
        opened = await client.request(Op.SMP_OPEN, {"secs": 60})
        assert opened.status is Status.OK and opened.result == {"secs": 60}
        smpc = SMPClient(LinkSmpTransport(client.bleak_client), str(sim.address), timeout_s=5.0)
        await smpc.connect()
        states = await smpc.request(ImageStatesRead())
        assert success(states) and states.images[0].version == "1.0.0"


async def test_upload_test_reset_confirm_over_the_air(air: Air) -> None:
    sim = air.locks[0]
    smp = air.radio.enable_firmware(sim.model.lock_id, imgtool_verifier([KEY.imgtool_key]))
    image = signed_image(KEY, "1.1.0", security_counter=2, size=6000)
    ltk = await paired(air, sim)
    async with LockClient(str(sim.address), gw_id=GW, backend=air.host.client_backend()) as client:
        await client.open_session(lock_id=sim.model.lock_id, ltk=ltk)
        await client.request(Op.SMP_OPEN, {"secs": 60})
        smpc = SMPClient(LinkSmpTransport(client.bleak_client), str(sim.address), timeout_s=5.0)
        await smpc.connect()
        offsets = [off async for off in smpc.upload(image)]
        assert offsets[-1] == len(image) and len(offsets) > 5
        states = await smpc.request(ImageStatesRead())
        digest = states.images[1].hash
        written = await smpc.request(ImageStatesWrite(hash=digest))
        assert success(written) and written.images[1].pending
        reset = await smpc.request(ResetWrite())
        assert success(reset)
    await wait_for(lambda: smp.boots, "the lock rebooted")
    assert smp.boots[-1].kind == "swapped_test"
    await wait_for(lambda: not sim.drivers and sim.device.is_advertising, "advertising again")
    async with LockClient(str(sim.address), gw_id=GW, backend=air.host.client_backend()) as client:
        await client.open_session(lock_id=sim.model.lock_id, ltk=ltk)
        status = await client.request(Op.STATUS)
        assert status.result["firmware"] == "sim-1.1.0"
        await client.request(Op.SMP_OPEN, {"secs": 60})
        smpc = SMPClient(LinkSmpTransport(client.bleak_client), str(sim.address), timeout_s=5.0)
        await smpc.connect()
        states = await smpc.request(ImageStatesRead())
        assert (
            states.images[0].version == "1.1.0" and states.images[0].active and not states.images[0].confirmed
        )
        confirmed = await smpc.request(ImageStatesWrite(confirm=True))
        assert success(confirmed) and confirmed.images[0].confirmed
    assert smp.boot.security_counter == 2


async def test_link_drop_mid_upload_resumes_from_the_locks_offset(air: Air) -> None:
    sim = air.locks[0]
    smp = air.radio.enable_firmware(sim.model.lock_id, imgtool_verifier([KEY.imgtool_key]))
    image = signed_image(KEY, "1.1.0", security_counter=2, size=8000)
    ltk = await paired(air, sim)
    await air.radio.apply_fault(sim.model.lock_id, "fw_drop_after", 12)
    async with LockClient(str(sim.address), gw_id=GW, backend=air.host.client_backend()) as client:
        await client.open_session(lock_id=sim.model.lock_id, ltk=ltk)
        await client.request(Op.SMP_OPEN, {"secs": 60})
        smpc = SMPClient(LinkSmpTransport(client.bleak_client), str(sim.address), timeout_s=5.0)
        await smpc.connect()
        reached = 0
        with pytest.raises((SMPTransportDisconnected, TimeoutError)):
            async for off in smpc.upload(image):
                reached = off
    assert 0 < reached < len(image)
    await wait_for(lambda: not sim.drivers, "link gone")
    upload_requests = smp.server.handled["upload"]
    async with LockClient(str(sim.address), gw_id=GW, backend=air.host.client_backend()) as client:
        await client.open_session(lock_id=sim.model.lock_id, ltk=ltk)
        await client.request(Op.SMP_OPEN, {"secs": 60})
        smpc = SMPClient(LinkSmpTransport(client.bleak_client), str(sim.address), timeout_s=5.0)
        await smpc.connect()
        offsets = [off async for off in smpc.upload(image)]
    assert offsets[0] >= reached  # the lock answered where it stopped: nothing sent twice
    assert offsets[-1] == len(image)
    full = smp.server.handled["upload"] - upload_requests
    assert smp.boot.secondary == image
    assert full < len(offsets) + 2


@pytest.mark.parametrize(
    ("case", "outcome"),
    [
        ("wrong-key", "refused"),
        ("unsigned", "refused"),
        ("lower-counter", "refused"),
        ("downgrade", "upgrade-refused"),
    ],
)
async def test_the_bootloader_refuses_what_gets_past_the_gateway(air: Air, case: str, outcome: str) -> None:
    """smpclient straight to the lock, no gateway checks: the simulated MCUboot (imgtool's
    verifier, a security counter that only rises) and img_mgmt's upgrade rule still refuse."""
    sim = air.locks[0]
    smp = air.radio.enable_firmware(sim.model.lock_id, imgtool_verifier([KEY.imgtool_key]))
    smp.boot.security_counter = 3
    image = {
        "wrong-key": signed_image(firmware_key(), "1.1.0", security_counter=5),
        "unsigned": signed_image(None, "1.1.0"),
        "lower-counter": signed_image(KEY, "1.1.0", security_counter=2),
        "downgrade": signed_image(KEY, "0.9.0", security_counter=5),
    }[case]
    ltk = await paired(air, sim)
    async with LockClient(str(sim.address), gw_id=GW, backend=air.host.client_backend()) as client:
        await client.open_session(lock_id=sim.model.lock_id, ltk=ltk)
        await client.request(Op.SMP_OPEN, {"secs": 60})
        smpc = SMPClient(LinkSmpTransport(client.bleak_client), str(sim.address), timeout_s=5.0)
        await smpc.connect()
        if outcome == "upgrade-refused":
            with pytest.raises(SMPUploadError):
                async for _ in smpc.upload(image, upgrade=True):
                    pass
            assert smp.boot.secondary == b""
            return
        [_ async for _ in smpc.upload(image)]
        states = await smpc.request(ImageStatesRead())
        assert success(await smpc.request(ImageStatesWrite(hash=states.images[1].hash)))
        await smpc.request(ResetWrite())
    await wait_for(lambda: smp.boots, "the lock rebooted")
    assert smp.boots[-1].kind == "refused"
    assert str(smp.boot.primary.version) == "1.0.0" and smp.boot.security_counter == 3
    assert sim.model.firmware == "sim-1.0.0"


async def test_the_smp_window_closes_when_its_time_is_up(air: Air) -> None:
    sim = air.locks[1]
    smp = air.radio.enable_firmware(sim.model.lock_id, imgtool_verifier([KEY.imgtool_key]))
    ltk = await paired(air, sim)
    async with LockClient(str(sim.address), gw_id=GW, backend=air.host.client_backend()) as client:
        await client.open_session(lock_id=sim.model.lock_id, ltk=ltk)
        assert (await client.request(Op.SMP_OPEN, {"secs": 1})).status is Status.OK
        smpc = SMPClient(LinkSmpTransport(client.bleak_client), str(sim.address), timeout_s=5.0)
        await smpc.connect()
        assert success(await smpc.request(ImageStatesRead()))
        until = air.radio.now() + 1.2
        while air.radio.now() < until:  # noqa: ASYNC110 - the window is wall-clock time
            await asyncio.sleep(0.1)
        refused = smp.refused
        with pytest.raises(TimeoutError):
            await smpc.request(ImageStatesRead(), timeout_s=1.0)
        assert smp.refused > refused
        with pytest.raises(BleError):  # a window beyond 600 s is malformed: the lock ends the link
            await client.request(Op.SMP_OPEN, {"secs": 601})
