"""A gateway host that dies without a word (kill -9) and the next one on the same controller
(THREATS A8). The controller, the locks and their links live on in the simulator, as a dongle
and real locks do: the next host's HCI Reset drops what the dead one left, each lock drops its
orphaned link after its supervision timeout and advertises again, and the simulator's HCI
server gives each host a clean start. The 20-process version is tests/integration/test_gateway_kill9.py.
"""

from __future__ import annotations

import asyncio

import pytest
from broker import free_port
from simproc import start_sim

from firmware_sim.bumble_peripheral import SimRadio
from gateway.ble.bumble_backend import BumbleHost
from gateway.ble.lock_client import LockClient
from gateway.errors import BleError
from protocols.messages import Op, Status

pytestmark = pytest.mark.ble
GW = "gw-restart"
#: Hang guard only: a working simulator answers in well under a second.
HANG_GUARD_S = 20


async def test_A8_next_host_resets_the_controller_and_the_orphaned_lock_advertises_again() -> None:
    async with SimRadio() as radio:
        [sim] = await radio.add_locks(1, seed=8)
        controller = radio.open_gateway_controller()
        dead = BumbleHost(controller=controller)
        await dead.__aenter__()
        client = LockClient(str(sim.address), gw_id=GW, backend=dead.client_backend())
        await client.__aenter__()
        paired = await client.pair(sim.model.setup_code)
        # The gateway dies here: no disconnect, no close. Its link stays up in the controller
        # and in the lock, which does not advertise while connected.
        assert controller.le_connections and sim.drivers and not sim.device.is_advertising
        reasons: list[int] = []
        [connection] = sim.drivers
        connection.on("disconnection", reasons.append)
        async with asyncio.timeout(HANG_GUARD_S), BumbleHost(controller=controller) as host:
            assert not controller.le_connections  # the new host's HCI Reset dropped it, silently
            async with LockClient(str(sim.address), gw_id=GW, backend=host.client_backend()) as again:
                await again.open_session(lock_id=sim.model.lock_id, ltk=paired.ltk)
                assert (await again.request(Op.STATUS)).status is Status.OK
        assert reasons == [0x08]  # the lock saw its old link end by supervision timeout


async def test_A8_host_killed_in_the_middle_of_a_packet_leaves_nothing_for_the_next() -> None:
    async with SimRadio() as radio:
        [sim] = await radio.add_locks(1, seed=8)
        port = free_port()
        await radio.serve_hci(f"tcp-server:127.0.0.1:{port}")
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        # Read Local Version Information claiming 5 parameter bytes, 1 sent: glued to the next
        # host's first bytes, its HCI Reset would vanish into this packet and go unanswered.
        writer.write(bytes([0x01, 0x01, 0x10, 0x05, 0x00]))
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        async with (
            asyncio.timeout(HANG_GUARD_S),
            BumbleHost(transport=f"tcp-client:127.0.0.1:{port}") as host,
            LockClient(str(sim.address), gw_id=GW, backend=host.client_backend()) as client,
        ):
            assert (await client.pair(sim.model.setup_code)).lock_id == sim.model.lock_id


async def test_A8_a_new_host_takes_the_controller_over_and_the_old_connection_is_closed() -> None:
    async with SimRadio() as radio:
        [sim] = await radio.add_locks(1, seed=8)
        port = free_port()
        await radio.serve_hci(f"tcp-server:127.0.0.1:{port}")
        old_reader, old_writer = await asyncio.open_connection("127.0.0.1", port)
        async with (
            asyncio.timeout(HANG_GUARD_S),
            BumbleHost(transport=f"tcp-client:127.0.0.1:{port}") as host,
        ):
            assert await old_reader.read() == b""  # closed by the simulator: one host at a time
            async with LockClient(str(sim.address), gw_id=GW, backend=host.client_backend()) as client:
                assert (await client.pair(sim.model.setup_code)).lock_id == sim.model.lock_id
        old_writer.close()


async def test_A9_the_simulator_restarted_under_a_running_host_is_reached_again() -> None:
    """The HCI transport drops after the host opened it (the simulator restarted, a UART gone):
    the host re-opens it by itself on the next use; no gateway restart."""
    port = free_port()
    sim, [lock] = start_sim(port, seed=3, locks=1)
    try:
        async with (
            asyncio.timeout(HANG_GUARD_S * 3),
            BumbleHost(transport=f"tcp-client:127.0.0.1:{port}") as host,
        ):
            async with LockClient(lock["address"], gw_id=GW, backend=host.client_backend()) as client:
                assert (await client.pair(lock["setup_code"])).lock_id == lock["lock"]
            sim.terminate()
            sim.communicate(timeout=10)
            sim, [lock] = start_sim(port, seed=4, locks=1)  # a new simulator on the same port
            attempts = 0
            while True:  # the first use may still find the old transport; the next ones reopen it
                attempts += 1
                try:
                    async with LockClient(lock["address"], gw_id=GW, backend=host.client_backend()) as c:
                        assert (await c.pair(lock["setup_code"])).lock_id == lock["lock"]
                        break
                except BleError:
                    continue
            assert host.reopened == 1
            print(f"\nreached the restarted simulator after {attempts} attempt(s)")
    finally:
        sim.terminate()
        sim.communicate(timeout=10)
