"""Simulated lock units on a real BLE host stack (Bumble), plus the gateway's controller.

:class:`SimRadio` owns one Bumble ``LocalLink`` (the "air") and, per lock, a virtual
controller, a host and a GATT server with the lockgw service. Each lock advertises its id, its
pairing flags and a state counter. The gateway side is either another virtual controller in the
same process (:meth:`SimRadio.open_gateway_controller`, for tests) or a controller bridged to a
TCP HCI transport (``tcp-server:HOST:PORT``) so a gateway in another process attaches with the
Bumble transport ``tcp-client:HOST:PORT``.

Radio timing is configurable: a :class:`~firmware_sim.radio.RadioProfile` (``flat``, the
default, runs flat out as the simulator always did; ``typical`` and ``slow`` model advertising
events, connection set-up, one ATT PDU per connection event, the ATT_MTU and the motor — see
firmware_sim/radio.py and docs/simulator.md), plus :class:`RadioTiming`'s flat knobs (the
advertising interval, a delay before the lock answers each exchange) and extra latency injected
by faults.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Self

from bumble import gatt, hci, ll
from bumble.controller import Connection as ControllerConnection
from bumble.controller import Controller, LegacyAdvertiser
from bumble.core import UUID, AdvertisingData, InvalidPacketError, PhysicalTransport
from bumble.device import Connection, Device
from bumble.hci import Address
from bumble.host import Host
from bumble.link import LocalLink
from bumble.transport import open_transport
from bumble.transport.common import AsyncPipeSink, PacketParser, Transport

from firmware_sim.lock_model import LockModel, make_setup_code, off_curve_pair_response
from firmware_sim.peripheral import LinkDriver
from firmware_sim.persist import BootStore, LockStore
from firmware_sim.radio import PROFILES, LinkClock, LockRadio, RadioProfile
from firmware_sim.smp_gatt import SmpService
from firmware_sim.smp_server import Verifier
from protocols.framing import fragment
from protocols.gatt import (
    COMPANY_ID,
    RX_CHAR_UUID,
    SERVICE_UUID,
    TX_CHAR_UUID,
    Advert,
    encode_advert,
)
from protocols.limits import MAX_FRAME_BODY

__all__ = [
    "GatewayController",
    "HciTcpServer",
    "ModelledAdvertiser",
    "RadioTiming",
    "SimAir",
    "SimLock",
    "SimRadio",
    "SupervisedController",
]

log = logging.getLogger("lockgw.sim")


@dataclass
class RadioTiming:
    """Per-radio timing. Zero everywhere is "flat out" (CI); see docs/simulator.md."""

    advertising_interval_ms: float = 20.0
    response_delay_s: float = 0.0


@dataclass
class SimLock:
    model: LockModel
    device: Device
    address: Address
    tx: gatt.Characteristic[bytes]
    store: LockStore | None = None  # the state file (``--state``); None: in memory only
    radio: LockRadio | None = None  # its timing under a modelled profile; None: flat
    controller: Controller | None = None  # its virtual controller on the air
    extra_latency_s: float = 0.0
    hostile: str | None = None  # None | "garbage" | "oversized" | "truncated" | "flood" | "spake2"
    drop_next_after_write: bool = False
    out_of_range: bool = False  # neither advertises nor accepts connections (the `range` fault)
    # Keyed by the Connection object, not its handle: the controller reuses handles, and a
    # late disconnection callback of an old link must not tear down a new one.
    drivers: dict[Connection, LinkDriver] = field(default_factory=dict)
    queues: dict[Connection, asyncio.Queue[bytes]] = field(default_factory=dict)
    # Advert updates run one at a time: two interleaved ones (a link's end, then a fault) could
    # each find advertising off and the first restart it after the second decided it must stop.
    advert_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    smp: SmpService | None = None  # the firmware-update service (enable_firmware)


def _boot_path(lock_state: Path) -> Path:
    """``lock-N.json`` → ``lock-N.mcuboot.cbor``: the bootloader's state beside the lock's."""
    return lock_state.with_name(f"{lock_state.stem}.mcuboot.cbor")


def _address(index: int, base: int) -> str:
    n = base + index
    # Static random addresses: the two top bits set (Core Spec Vol 6 Part B §1.3.2.1).
    raw = bytes([0xC0 | ((n >> 40) & 0x3F)]) + (n & 0xFFFFFFFFFF).to_bytes(5, "big")
    return ":".join(f"{b:02X}" for b in raw)


class SimRadio:
    """The simulated air with its locks. An async context manager owning its tasks."""

    def __init__(
        self,
        *,
        timing: RadioTiming | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        profile: RadioProfile | None = None,
        seed: int | None = None,
    ) -> None:
        """``profile``: the radio model (default ``flat``); ``seed``: its per-lock draws
        (advert phase, transmit window offsets, jitter) are then the same on every run."""
        self.profile = profile or PROFILES["flat"]
        self.profile.check()
        self.link = SimAir(self.profile)
        self.timing = timing or RadioTiming()
        self._radio_seed = seed if seed is not None else random.SystemRandom().getrandbits(64)
        self.locks: dict[str, SimLock] = {}
        self._rng = rng or random.Random()  # noqa: S311 - simulation noise only, not keys
        self._clock = clock
        self._tasks: set[asyncio.Task[None]] = set()
        self._transports: list[Transport | HciTcpServer] = []
        self._controllers: list[Controller] = []

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Let advertising updates finish (cancelling one mid-HCI-command leaves Bumble's host
        # with a dangling command future), then cancel the per-connection servers.
        adverts = [t for t in self._tasks if t.get_name().startswith("advert-")]
        if adverts:
            await asyncio.wait(adverts, timeout=2)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for lock in self.locks.values():
            with contextlib.suppress(Exception):
                await lock.device.stop_advertising()
        for transport in self._transports:
            with contextlib.suppress(Exception):
                await transport.close()

    def now(self) -> float:
        return self._clock()

    def link_clock(self, sim: SimLock) -> LinkClock | None:
        """The clock of the lock's latest link (modelled profiles only)."""
        clocks = [c for (_, lock), c in self.link.links.items() if lock is sim.controller]
        return max(clocks, key=lambda c: c.created) if clocks else None

    def connections_to(self, sim: SimLock) -> int:
        """How many connections the lock has accepted (CONNECT_INDs it received)."""
        return self.link.connections.get(sim.controller, 0) if sim.controller is not None else 0

    # --- locks -------------------------------------------------------------------------

    async def add_lock(self, model: LockModel, store: LockStore | None = None) -> SimLock:
        index = len(self.locks)
        # Stable across restarts (str hash() is salted per process): a gateway stores addresses.
        digest = int.from_bytes(hashlib.sha256(model.lock_id.encode()).digest()[:4], "big")
        address = Address(_address(index, 0x1000 + digest % 0x100000))
        controller = SupervisedController(f"lock{index}", link=self.link, public_address=str(address))
        lock_radio = None
        if not self.profile.flat:
            # One rng per lock, from the seed and the lock's id: the same draws however many
            # locks there are and in whatever order they act.
            lock_radio = LockRadio(self.profile, random.Random(f"{self._radio_seed}:{model.lock_id}"))  # noqa: S311 - simulation noise only
            controller.le_legacy_advertiser = ModelledAdvertiser(controller, lock_radio)
            self.link.radios[controller] = lock_radio
        device = Device(address=address, host=Host(controller, AsyncPipeSink(controller)))
        device.name = model.lock_id
        if self.profile.mtu:
            device.gatt_server.max_mtu = self.profile.mtu
        holder: dict[str, SimLock] = {}

        def on_write(connection: Connection, value: bytes) -> None:
            sim = holder["lock"]
            queue = sim.queues.get(connection)
            if queue is not None:
                queue.put_nowait(bytes(value))

        rx: gatt.Characteristic[bytes] = gatt.Characteristic(
            UUID(RX_CHAR_UUID),
            gatt.Characteristic.Properties.WRITE,
            gatt.Characteristic.WRITEABLE,
            gatt.CharacteristicValue(write=on_write),
        )
        tx: gatt.Characteristic[bytes] = gatt.Characteristic(
            UUID(TX_CHAR_UUID),
            gatt.Characteristic.Properties.NOTIFY,
            gatt.Characteristic.READABLE,
            b"",
        )
        device.add_service(gatt.Service(UUID(SERVICE_UUID), [rx, tx]))
        await device.power_on()
        sim = SimLock(
            model=model,
            device=device,
            address=address,
            tx=tx,
            store=store,
            radio=lock_radio,
            controller=controller,
        )
        holder["lock"] = sim
        device.on("connection", lambda conn: self._on_connection(sim, conn))
        self.locks[model.lock_id] = sim
        await self._advertise(sim)
        return sim

    async def add_locks(
        self, count: int, *, seed: int | None = None, state_dir: Path | None = None
    ) -> list[SimLock]:
        rng = random.Random(seed) if seed is not None else random.SystemRandom()  # noqa: S311
        out = []
        for i in range(count):
            lock_id = f"lk-{rng.getrandbits(32):08x}"
            code = make_setup_code(_RandBelow(rng))
            store = None
            if state_dir is not None:
                state_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, at start-up
                store = LockStore(state_dir / f"lock-{i}.json")
                model = store.load_or_create(lock_id, code, name=f"Door {i + 1}")
            else:
                model = LockModel(lock_id=lock_id, setup_code=code, name=f"Door {i + 1}")
            out.append(await self.add_lock(model, store))
        return out

    async def _advertise(self, sim: SimLock) -> None:
        async with sim.advert_lock:
            await self._advertise_now(sim)

    async def _advertise_now(self, sim: SimLock) -> None:
        model = sim.model
        advert = Advert(
            model.lock_id,
            model.paired_gw is not None,
            model.pairing_code(self.now()) is not None,
            model.state_counter,
        )
        manufacturer = COMPANY_ID.to_bytes(2, "little") + encode_advert(advert)
        sim.device.advertising_data = bytes(
            AdvertisingData(
                [
                    (AdvertisingData.FLAGS, bytes([0x06])),
                    (AdvertisingData.MANUFACTURER_SPECIFIC_DATA, manufacturer),
                ]
            )
        )
        sim.device.scan_response_data = bytes(
            AdvertisingData(
                [
                    (
                        AdvertisingData.COMPLETE_LIST_OF_128_BIT_SERVICE_CLASS_UUIDS,
                        bytes(UUID(SERVICE_UUID)),
                    ),
                ]
            )
        )
        if sim.device.is_advertising:
            await sim.device.stop_advertising()
        if not sim.drivers and not sim.out_of_range:
            interval_ms = (
                self.timing.advertising_interval_ms if sim.radio is None else sim.radio.adv_interval_s * 1000
            )
            await sim.device.start_advertising(
                auto_restart=False,
                advertising_interval_min=interval_ms,
                advertising_interval_max=interval_ms,
            )

    def refresh_advert(self, sim: SimLock) -> None:
        self._spawn(self._advertise(sim), f"advert-{sim.model.lock_id}")

    def _spawn(self, coro: Any, name: str) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_connection(self, sim: SimLock, connection: Connection) -> None:
        sim.queues[connection] = asyncio.Queue()
        sim.drivers[connection] = LinkDriver(sim.model, rng=os.urandom, now=self.now(), store=sim.store)

        def on_disconnection(_reason: int) -> None:
            sim.drivers.pop(connection, None)
            queue = sim.queues.pop(connection, None)
            if queue is not None:
                queue.put_nowait(b"")  # wake the serving task so it ends
            self.refresh_advert(sim)

        connection.on("disconnection", on_disconnection)
        self._spawn(self._serve(sim, connection), f"serve-{sim.model.lock_id}-{connection.handle}")

    async def _serve(self, sim: SimLock, connection: Connection) -> None:
        queue = sim.queues[connection]
        while True:
            data = await queue.get()
            driver = sim.drivers.get(connection)
            if not data or driver is None:
                return
            delay = self.timing.response_delay_s + sim.extra_latency_s
            if delay:
                await asyncio.sleep(delay)
            if sim.hostile:
                await self._hostile_reply(sim, connection)
                continue
            before = sim.model.state_counter, sim.model.paired_gw
            driver.receive(data, self.now())
            out = driver.data_to_send()
            if sim.drop_next_after_write and out:
                sim.drop_next_after_write = False
                await self._disconnect(sim, connection)
                return
            await self._motor(sim, moved=sim.model.state_counter != before[0] and bool(out))
            mtu = connection.att_mtu
            for piece in fragment(out, mtu) if out else []:
                await sim.device.notify_subscriber(connection, sim.tx, piece)
            if (sim.model.state_counter, sim.model.paired_gw) != before:
                self.refresh_advert(sim)
            if driver.closed:
                if driver.error is not None:  # a protocol error, or an OSError of the state file
                    log.info("lock %s closes link: %s", sim.model.lock_id, driver.error)
                await asyncio.sleep(0.05)  # let the ERROR notification leave first
                await self._disconnect(sim, connection)
                return

    @staticmethod
    async def _motor(sim: SimLock, *, moved: bool) -> None:
        """Under a modelled profile the bolt moves before the lock answers an actuation."""
        if moved and sim.radio is not None:
            await asyncio.sleep(sim.radio.motor_s())

    @staticmethod
    async def _disconnect(sim: SimLock, connection: Connection) -> None:
        if connection in sim.drivers:  # still this link, not a successor on the same handle
            with contextlib.suppress(Exception):
                await connection.disconnect()

    async def _hostile_reply(self, sim: SimLock, connection: Connection) -> None:
        mtu_payload = connection.att_mtu - 3
        mode = sim.hostile
        notify = sim.device.notify_subscriber
        if mode == "garbage":
            await notify(connection, sim.tx, self._rng.randbytes(mtu_payload))
        elif mode == "oversized":
            await notify(connection, sim.tx, bytes([1, 0x20, 0xFF, 0xFF]) + bytes(mtu_payload - 4))
        elif mode == "truncated":
            await notify(connection, sim.tx, bytes([1, 0x20, 0x01, 0x00]) + bytes(8))
        elif mode == "flood":
            for _ in range(200):
                await notify(connection, sim.tx, bytes([1, 0x20]) + (MAX_FRAME_BODY).to_bytes(2, "big"))
        elif mode == "spake2":  # a hostile pairing peer: an off-curve SPAKE2 point
            await notify(connection, sim.tx, off_curve_pair_response(sim.model.lock_id))

    def enable_firmware(self, lock_id: str, verifier: Verifier) -> SmpService:
        """Give a lock the SMP service and an MCUboot that trusts what ``verifier`` accepts."""
        sim = self.locks[lock_id]

        async def disconnect_all() -> None:
            for connection in list(sim.drivers):
                await self._disconnect(sim, connection)

        sim.smp = SmpService(
            sim.device,
            sim.model,
            verifier=verifier,
            now=self.now,
            driver_for=sim.drivers.get,
            disconnect_all=disconnect_all,
            spawn=self._spawn,
            store=BootStore(_boot_path(sim.store.path)) if sim.store is not None else None,
        )
        return sim.smp

    # --- faults (see docs/simulator.md) ------------------------------------------------

    async def apply_fault(self, lock_id: str, fault: str, value: Any = None) -> dict[str, Any]:  # noqa: C901, PLR0912 - a dispatcher: one branch per fault command of docs/simulator.md
        sim = self.locks.get(lock_id)
        if sim is None:
            raise KeyError(f"no simulated lock {lock_id!r}")
        model, now = sim.model, self.now()
        if fault == "jam":
            model.arm_jam()
        elif fault in {"unjam", "manual"}:
            model.manual_turn(now)
        elif fault == "battery":
            model.set_battery(float(value), now)
        elif fault == "door":
            from protocols.messages import DoorState  # noqa: PLC0415 - keeps the import local to the fault

            model.set_door(DoorState(value), now)
        elif fault == "drop":
            for connection in list(sim.drivers):
                await self._disconnect(sim, connection)
        elif fault == "range":
            if value not in ("out", "in"):
                raise ValueError('range takes "out" or "in"')
            sim.out_of_range = value == "out"
            for connection in list(sim.drivers):
                await self._disconnect(sim, connection)
        elif fault == "drop_after_write":
            sim.drop_next_after_write = True
        elif fault == "latency":
            sim.extra_latency_s = float(value)
        elif fault == "clock_offset":
            model.set_clock_offset(float(value))
        elif fault == "hostile":
            sim.hostile = value or None
        elif fault == "lie":
            model.set_lie(value or None)
        elif fault == "pairing_mode":
            model.press_pairing_button(now)
        elif fault == "factory_reset":
            model.factory_reset()
        elif fault == "fw_stats" and sim.smp is not None:
            return {"lock": lock_id, "fault": fault, "ok": True, **sim.smp.stats()}
        elif fault.startswith("fw_") and sim.smp is not None:
            pending = sim.smp.apply_fault(fault, value)
            if pending is not None:
                await pending
        else:
            raise ValueError(f"unknown fault {fault!r}")
        if sim.store is not None:
            sim.store.sync(model)  # before the answer: a fault's change is on disk once confirmed
        # In effect when the answer goes out: a lock sent out of range is silent from then on.
        await self._advertise(sim)
        return {"lock": lock_id, "fault": fault, "ok": True}

    # --- the gateway's controller ------------------------------------------------------

    def open_gateway_controller(self, address: str = "F0:F0:F0:F0:F0:01") -> Controller:
        """A virtual controller on this link for an in-process gateway host."""
        controller = GatewayController("gateway", link=self.link, public_address=address)
        self.link.centrals.add(controller)
        self._controllers.append(controller)
        return controller

    async def serve_hci(self, transport_name: str, address: str = "F0:F0:F0:F0:F0:01") -> None:
        """Expose a controller on this link over an HCI transport (e.g. ``tcp-server:...``).

        ``tcp-server:HOST:PORT`` is served by :class:`HciTcpServer` (one host at a time, each
        new one starting from a clean packet parser); other Bumble transport names are opened
        with Bumble's ``open_transport``."""
        if transport_name.startswith("tcp-server:"):
            host, _, port = transport_name.removeprefix("tcp-server:").rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"expected tcp-server:HOST:PORT, got {transport_name!r}")
            controller = GatewayController("gateway", link=self.link, public_address=address)
            server = HciTcpServer(controller)
            await server.start(host, int(port))
            self._transports.append(server)
        else:
            transport = await open_transport(transport_name)
            self._transports.append(transport)
            controller = GatewayController(
                "gateway",
                host_source=transport.source,
                host_sink=transport.sink,
                link=self.link,
                public_address=address,
            )
        self.link.centrals.add(controller)
        self._controllers.append(controller)


class SimAir(LocalLink):
    """Bumble's LocalLink, with advertising PDUs delivered only where a radio would act on them.

    LocalLink hands every advertising PDU to every controller on the link, in Python: with N
    locks advertising every 20 ms that is N² callbacks per interval, and 200 locks saturate a
    core doing nothing (locks never scan). Here an ADV_IND goes to the central controllers (the
    gateways' — the only ones that scan) and a CONNECT_IND only to the controller that owns the
    advertiser's address. What reaches those controllers is unchanged.

    Under a modelled radio profile (not ``flat``) each link gets a
    :class:`~firmware_sim.radio.LinkClock` at its CONNECT_IND, and every data PDU (one L2CAP
    PDU: one ATT PDU) and LL control PDU is delivered at the link's next free connection event
    in its direction instead of at once; PDUs of one direction keep their order.
    """

    def __init__(self, profile: RadioProfile | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.centrals: set[Controller] = set()
        self.profile = profile or PROFILES["flat"]
        #: Each lock controller's radio (modelled profiles only).
        self.radios: dict[Controller, LockRadio] = {}
        #: The clock of each (central, peripheral) link, replaced at each CONNECT_IND.
        self.links: dict[tuple[Controller, Controller], LinkClock] = {}
        #: Connections made, by peripheral (lock) controller: what a test counts.
        self.connections: dict[Controller, int] = {}

    def send_advertising_pdu(self, sender_controller: Controller, packet: ll.AdvertisingPdu) -> None:
        loop = asyncio.get_running_loop()
        if isinstance(packet, ll.ConnectInd):
            owner = self.find_le_controller(packet.advertiser_address)
            targets = [owner] if owner is not None else []
            if owner is not None:
                self.connections[owner] = self.connections.get(owner, 0) + 1
                radio = self.radios.get(owner)
                if radio is not None:
                    self.links[(sender_controller, owner)] = radio.new_link(loop.time())
        else:
            targets = [c for c in self.centrals if c is not sender_controller]
        for c in targets:
            loop.call_soon(c.on_ll_advertising_pdu, packet)

    def _clock(self, sender: Controller, receiver: Controller | None) -> tuple[LinkClock | None, int]:
        if receiver is None or self.profile.flat:
            return None, 0
        if sender in self.centrals:
            return self.links.get((sender, receiver)), 0
        return self.links.get((receiver, sender)), 1

    def send_acl_data(
        self,
        sender_controller: Controller,
        destination_address: hci.Address,
        transport: PhysicalTransport,
        data: bytes,
    ) -> None:
        modelled = not self.profile.flat and transport == PhysicalTransport.LE
        destination = self.find_le_controller(destination_address) if modelled else None
        clock, direction = self._clock(sender_controller, destination)
        if clock is None or destination is None:
            super().send_acl_data(sender_controller, destination_address, transport, data)
            return
        loop = asyncio.get_running_loop()
        source = sender_controller.random_address
        loop.call_at(
            clock.deliver_at(direction, loop.time()),
            lambda: destination.on_link_acl_data(source, transport, data),
        )

    def send_ll_control_pdu(
        self, sender_address: hci.Address, receiver_address: hci.Address, packet: ll.ControlPdu
    ) -> None:
        if self.profile.flat:
            super().send_ll_control_pdu(sender_address, receiver_address, packet)
            return
        sender = self.find_le_controller(sender_address)
        receiver = self.find_le_controller(receiver_address)
        clock, direction = self._clock(sender, receiver) if sender is not None else (None, 0)
        if clock is None or receiver is None:
            super().send_ll_control_pdu(sender_address, receiver_address, packet)
            return
        loop = asyncio.get_running_loop()
        loop.call_at(
            clock.deliver_at(direction, loop.time()),
            lambda: receiver.on_ll_control_pdu(sender_address, packet),
        )


class ModelledAdvertiser(LegacyAdvertiser):
    """Bumble's legacy advertiser, with the gap between advertising events from the lock's
    :class:`~firmware_sim.radio.LockRadio` (advInterval + advDelay, in seconds) rather than the
    HCI interval read as milliseconds."""

    def __init__(self, controller: Controller, radio: LockRadio) -> None:
        super().__init__(controller)
        self.radio = radio

    def _on_timer_fired(self) -> None:
        self.send_advertising_data()
        self.timer_handle = asyncio.get_running_loop().call_later(
            self.radio.next_advert_gap_s(), self._on_timer_fired
        )


#: A link whose peer went silent is dropped after the supervision timeout the central chose;
#: this floor stands in for a CONNECT_IND that carries none (Core Vol 6 Part B 4.5.2: 100 ms).
MIN_SUPERVISION_TIMEOUT_S: Final = 0.1
#: Supervision checks per timeout: a silent peer is noticed between 1 and 1.25 timeouts.
_CHECKS_PER_TIMEOUT: Final = 4


#: The LE ACL buffer a controller reports to its host (HCI LE Read Buffer Size): 251 bytes, the
#: LE Data Length Extension's, as Bluetooth 4.2+ controllers (nRF52, CYW43455 on a Raspberry Pi)
#: do. Bumble's default is 27 (Bluetooth 4.0): a host then cut every 247-byte ATT PDU into ten
#: HCI packets, each answered by its own Number Of Completed Packets event — ten times the
#: HCI traffic, over TCP to a gateway in another process, for the same air time in the model
#: (SimAir carries whole L2CAP PDUs, whatever the fragments).
LE_ACL_DATA_PACKET_LENGTH = 251


class SupervisedController(Controller):
    """Bumble's Controller with two behaviours of a real one that the simulation needs.

    **Link supervision** (Core Vol 6 Part B 4.5.2). Bumble's LE links end only by an
    LL_TERMINATE_IND; a peer that goes silent — a central whose controller was reset when its
    gateway restarted — leaves the link up for ever, and a lock on it never advertises again.
    Here each end of a link checks that the other end still holds that same link, and after the
    supervision timeout without it reports Disconnection Complete with CONNECTION_TIMEOUT to its
    own host, as a radio that stopped hearing its peer does.

    **HCI Reset** (Core Vol 4 Part E 7.3.2) returns the controller to its state after power-on:
    no links (dropped silently: the radio just stops, each peer notices by its supervision
    timeout), no pending connection, no scanning, no advertising. Bumble's answers SUCCESS and
    changes nothing, so a host that restarts finds the previous host's links and pending
    connection still there.

    A link the controller no longer holds hears nothing: late data and control PDUs for it are
    dropped without a log line (Bumble logs each as an error).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._supervised: dict[int, asyncio.TimerHandle] = {}
        self.le_acl_data_packet_length = LE_ACL_DATA_PACKET_LENGTH

    # --- link supervision -----------------------------------------------------------------

    def on_le_connect_ind(self, packet: ll.ConnectInd) -> None:
        super().on_le_connect_ind(packet)
        connection = self.le_connections.get(packet.initiator_address)
        if connection is not None:
            self._supervise(connection, packet.timeout)

    def create_le_connection(self, peer_address: hci.Address) -> None:
        pending = self.pending_le_connection
        super().create_le_connection(peer_address)
        if pending is None or self.pending_le_connection is not None:
            return  # not made (Bumble keeps it pending)
        timeout = (
            pending.supervision_timeouts[0]
            if isinstance(pending, hci.HCI_LE_Extended_Create_Connection_Command)
            else pending.supervision_timeout
        )
        connection = self.le_connections.get(pending.peer_address)
        if connection is not None:
            self._supervise(connection, timeout)

    def _supervise(self, connection: ControllerConnection, timeout_10ms: int) -> None:
        timeout_s = max(MIN_SUPERVISION_TIMEOUT_S, timeout_10ms / 100)
        profile = getattr(self.link, "profile", None)
        if isinstance(profile, RadioProfile) and profile.supervision_timeout_ms:
            timeout_s = profile.supervision_timeout_ms / 1000  # the profile's, not the central's
        loop = asyncio.get_running_loop()
        state: dict[str, Any] = {"peer": None, "heard": loop.time()}

        def check() -> None:
            self._supervised.pop(id(connection), None)
            if self.le_connections.get(connection.peer_address) is not connection:
                return  # ended the ordinary way
            peer = self._peer_connection(connection)
            if peer is not None and (state["peer"] is None or state["peer"] is peer):
                state["peer"], state["heard"] = peer, loop.time()
            elif loop.time() - state["heard"] >= timeout_s:
                log.info("%s: link to %s timed out (peer silent)", self.name, connection.peer_address)
                self.on_le_disconnected(connection, hci.HCI_ErrorCode.CONNECTION_TIMEOUT_ERROR)
                return
            self._supervised[id(connection)] = loop.call_later(timeout_s / _CHECKS_PER_TIMEOUT, check)

        self._supervised[id(connection)] = loop.call_later(timeout_s / _CHECKS_PER_TIMEOUT, check)

    def _peer_connection(self, connection: ControllerConnection) -> ControllerConnection | None:
        """The other end's record of this link, if the other end still holds it."""
        for other in self.link.controllers:
            if other is self:
                continue
            theirs = other.le_connections.get(connection.self_address)
            if theirs is not None and theirs.self_address == connection.peer_address:
                return theirs
        return None

    # --- reset ------------------------------------------------------------------------------

    def on_hci_reset_command(self, command: hci.HCI_Reset_Command) -> hci.HCI_StatusReturnParameters:
        for handle in self._supervised.values():
            handle.cancel()
        self._supervised.clear()
        self.le_connections.clear()
        self.pending_le_connection = None
        self.le_scan_enable = False
        self.filter_duplicates = False
        self.le_legacy_advertiser.stop()
        for advertising_set in self.advertising_sets.values():
            advertising_set.stop()
        self.advertising_sets.clear()
        return super().on_hci_reset_command(command)

    # --- a link no longer held hears nothing ------------------------------------------------

    def on_link_acl_data(
        self, sender_address: hci.Address, transport: PhysicalTransport, data: bytes
    ) -> None:
        if transport == PhysicalTransport.LE and sender_address not in self.le_connections:
            return
        super().on_link_acl_data(sender_address, transport, data)

    def on_ll_control_pdu(self, sender_address: hci.Address, packet: ll.ControlPdu) -> None:
        if sender_address not in self.le_connections:
            return
        super().on_ll_control_pdu(sender_address, packet)


class GatewayController(SupervisedController):
    """A central's virtual controller that really cancels a pending LE connection.

    Bumble's Controller acknowledges LE Create Connection Cancel and keeps the attempt pending
    for ever, so after one connect to a lock out of range every later connect fails with
    COMMAND_DISALLOWED. A real controller ends the attempt with an LE Connection Complete event
    of status UNKNOWN_CONNECTION_IDENTIFIER (Core Vol 4 Part E 7.8.13); so does this one — after
    the command's own Command Complete, as the spec orders them.
    """

    def on_hci_le_create_connection_cancel_command(
        self, _command: hci.HCI_LE_Create_Connection_Cancel_Command
    ) -> hci.HCI_StatusReturnParameters:
        pending = self.pending_le_connection
        if pending is None:
            return hci.HCI_StatusReturnParameters(hci.HCI_ErrorCode.COMMAND_DISALLOWED_ERROR)
        self.pending_le_connection = None
        peer = pending.peer_address
        event = hci.HCI_LE_Connection_Complete_Event(
            status=hci.HCI_ErrorCode.UNKNOWN_CONNECTION_IDENTIFIER_ERROR,
            connection_handle=0,
            role=hci.Role.CENTRAL,
            peer_address_type=peer.address_type,
            peer_address=peer,
            connection_interval=0,
            peripheral_latency=0,
            supervision_timeout=0,
            central_clock_accuracy=0,
        )
        asyncio.get_running_loop().call_soon(self.send_hci_packet, event)
        return hci.HCI_StatusReturnParameters(hci.HCI_ErrorCode.SUCCESS)


class HciTcpServer:
    """HCI over TCP for one host at a time, the way a controller on a UART or USB is owned.

    Bumble's ``tcp-server`` transport shares one packet parser across every client, so a host
    killed in the middle of a packet leaves half of it to be glued to the next host's first
    command (its HCI Reset is then never answered); and a second client silently takes the
    event stream from the first. Here each connection starts from a clean parser, and a new
    host takes the controller over from the previous one (whose socket is closed: after a
    kill -9 it is usually gone already). What the controller sends with no host is dropped, as a
    UART drops it. The host's HCI Reset (Bumble's ``power_on`` sends one) then drops the links
    and pending connection the previous host left (:class:`SupervisedController`).
    """

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self._parser = PacketParser(controller)
        self._server: asyncio.Server | None = None
        self._host: asyncio.Transport | None = None
        self.hosts_seen = 0
        controller.host = self

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _HciTcpPort(self), host=None if host == "_" else host, port=port
        )

    # Controller -> host.
    def on_packet(self, packet: bytes) -> None:
        if self._host is not None and not self._host.is_closing():
            self._host.write(packet)

    # Host -> controller, from one connection at a time.
    def attach(self, transport: asyncio.Transport) -> None:
        previous, self._host = self._host, transport
        self.hosts_seen += 1
        if previous is not None:
            log.info("a new HCI host takes the controller over; closing the previous one")
            previous.close()
        self._parser.reset()

    def received(self, transport: asyncio.Transport, data: bytes) -> None:
        if transport is not self._host:
            return
        try:
            self._parser.feed_data(data)
        except InvalidPacketError as exc:
            log.warning("HCI host sent an invalid packet (%s); closing its connection", exc)
            self.detach(transport)
            transport.close()

    def detach(self, transport: asyncio.Transport) -> None:
        if transport is self._host:
            self._host = None
            self._parser.reset()

    async def close(self) -> None:
        if self._host is not None:
            self._host.close()
            self._host = None
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class _HciTcpPort(asyncio.Protocol):
    def __init__(self, server: HciTcpServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._server.attach(transport)

    def data_received(self, data: bytes) -> None:
        if self._transport is not None:
            self._server.received(self._transport, data)

    def connection_lost(self, _exc: Exception | None) -> None:
        if self._transport is not None:
            self._server.detach(self._transport)
            self._transport = None


class _RandBelow:
    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def randbelow(self, n: int) -> int:
        return self._rng.randrange(n)
