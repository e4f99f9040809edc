"""bleak backend classes over a Bumble host.

The gateway speaks only bleak's public API; the backend class is injected. In production it
is BlueZ (bleak's default on Linux). With ``[ble] backend = "bumble"`` — the simulator, or a USB
dongle driven without BlueZ — :class:`BumbleHost` opens a Bumble transport and
:meth:`BumbleHost.client_backend` / :meth:`BumbleHost.scanner_backend` return
:class:`~bleak.backends.client.BaseBleakClient` / ``BaseBleakScanner`` subclasses bound to it.

Bumble's controller model allows one pending LE connection at a time, so connects through
one host are serialised by :attr:`BumbleHost.connect_lock`. Bumble exceptions are mapped to
bleak's (``BleakError``, ``BleakGATTProtocolError``, ``TimeoutError``) in
:func:`_map_bumble_errors`, the one place that knows them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid as uuid_mod
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Final, Self

from bleak.args import SizedBuffer
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient, NotifyCallback
from bleak.backends.descriptor import BleakGATTDescriptor
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, BaseBleakScanner
from bleak.backends.service import BleakGATTService, BleakGATTServiceCollection
from bleak.exc import BleakError, BleakGATTProtocolError
from bumble import att, core, hci
from bumble.controller import Controller
from bumble.core import AdvertisingData
from bumble.device import Advertisement, Connection, Device, Peer
from bumble.host import Host
from bumble.transport import open_transport
from bumble.transport.common import AsyncPipeSink, Transport

from gateway.errors import AdapterUnavailable

__all__ = ["BumbleHost"]

DEFAULT_MTU = 247


def _uuid_str(u: core.UUID) -> str:
    return str(uuid_mod.UUID(bytes=bytes(reversed(u.to_bytes(force_128=True)))))


@contextlib.contextmanager
def _map_bumble_errors(what: str) -> Iterator[None]:
    try:
        yield
    except att.ATT_Error as exc:
        raise BleakGATTProtocolError(int(exc.error_code)) from exc
    except TimeoutError:
        raise
    except asyncio.CancelledError as exc:
        # Bumble cancels pending ATT transactions when the link drops; that is a link loss,
        # not a cancellation of our task — unless our task really is being cancelled.
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        raise BleakError(f"{what}: link lost") from exc
    except (core.BaseBumbleError, hci.HCI_Error, ConnectionError, OSError) as exc:
        # Several Bumble errors carry no text (core.TimeoutError(), ConnectionError()): name them.
        raise BleakError(f"{what}: {str(exc) or type(exc).__name__}") from exc


_PROPERTY_NAMES: tuple[tuple[int, str], ...] = (
    (0x02, "read"),
    (0x04, "write-without-response"),
    (0x08, "write"),
    (0x10, "notify"),
    (0x20, "indicate"),
)


class BumbleHost:
    """A Bumble host on a transport or an in-process controller. Async context manager."""

    def __init__(
        self,
        *,
        transport: str | None = None,
        controller: Controller | None = None,
        address: str = "F0:F0:F0:F0:F0:01",
        mtu: int = DEFAULT_MTU,
        lazy: bool = False,
    ) -> None:
        if (transport is None) == (controller is None):
            raise ValueError("give exactly one of transport= or controller=")
        self._transport_name = transport
        self._controller = controller
        self._address = address
        self.mtu = mtu
        self.connect_lock = asyncio.Lock()
        self._transport: Transport | None = None
        self._device: Device | None = None
        # Lazy: opened by the first connect or scan, and tried again by each later one while it
        # fails — so a gateway starts (events, MQTT, the CLI) without its dongle or simulator,
        # and recovers when it appears.
        self._lazy = lazy
        self._opening = asyncio.Lock()
        self._closed = False

    @property
    def device(self) -> Device:
        if self._device is None:
            raise AdapterUnavailable("Bumble host is not open; use 'async with BumbleHost(...)'")
        return self._device

    async def __aenter__(self) -> Self:
        if self._device is not None:
            raise RuntimeError("BumbleHost is not reentrant")
        if not self._lazy:
            await self.open()
        return self

    async def open(self) -> Device:
        """The host's device, opening the transport first if needed (AdapterUnavailable if not)."""
        async with self._opening:
            if self._closed:
                raise AdapterUnavailable("Bumble host is closed")
            if self._device is None:
                self._device = await self._open()
            return self._device

    async def _open(self) -> Device:
        try:
            if self._controller is not None:
                host = _GatewayHost(self._controller, AsyncPipeSink(self._controller))
            else:
                assert self._transport_name is not None
                self._transport = await open_transport(self._transport_name)
                host = _GatewayHost(self._transport.source, self._transport.sink)
            device = Device(name="lockgw", address=hci.Address(self._address), host=host)
            async with asyncio.timeout(10):
                await device.power_on()
        except (OSError, TimeoutError, core.BaseBumbleError, ValueError) as exc:
            if self._transport is not None:
                await self._transport.close()
                self._transport = None
            raise AdapterUnavailable(
                f"cannot open Bumble transport {self._transport_name!r}: {exc}. "
                "Is the simulator (lockgw-sim serve) or the dongle there?"
            ) from exc
        return device

    async def __aexit__(self, *exc: object) -> None:
        self._closed = True
        device, self._device = self._device, None
        if device is not None:
            for connection in list(device.connections.values()):
                with contextlib.suppress(Exception):
                    await connection.disconnect()
            # Commands whose callers were cancelled are still owed an answer: let them have it
            # before the transport goes (else Bumble logs each as "transport lost").
            host = device.host
            if isinstance(host, _GatewayHost) and host.exchanges:
                await asyncio.wait(host.exchanges, timeout=HCI_RESPONSE_TIMEOUT_S / 10)
        if self._transport is not None:
            with contextlib.suppress(Exception):
                await self._transport.close()
            self._transport = None

    def client_backend(self) -> type[BaseBleakClient]:
        return type("BoundBumbleClient", (BumbleBleakClient,), {"host": self})

    def scanner_backend(self) -> type[BaseBleakScanner]:
        return type("BoundBumbleScanner", (BumbleBleakScanner,), {"host": self})


_HOST_LOG: Final = logging.getLogger("bumble.host")
#: An HCI command whose controller never answers is given up after this long (Bumble waits for
#: ever by default); a live controller answers in microseconds.
HCI_RESPONSE_TIMEOUT_S: Final = 10.0


class _GatewayHost(Host):
    """Bumble's host with two corrections.

    HCI commands run to their answer even when the caller is cancelled. Bumble's host allows one
    outstanding command; cancelling the coroutine that waits for its answer frees the slot at
    once, so the late answer is taken for the *next* command's (a mismatch warning, a wrong
    result, then InvalidStateError when the real answer comes). Here the exchange runs in its
    own task, shielded: a cancelled caller stops waiting, the slot stays taken until the
    controller answers (or HCI_RESPONSE_TIMEOUT_S passes).

    And packets are not formatted for a debug line that is not logged (below).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Commands still waiting for their answer (BumbleHost lets them finish before closing).
        self.exchanges: set[asyncio.Future[Any]] = set()

    # Bumble's host formats every HCI packet, both ways, for a debug log line — eagerly, whatever
    # the log level: a third of the event loop's time in a burst of unlocks. These two methods
    # are Host's own (bumble==0.0.236, pinned; tests/test_conformance.py notices a change)
    # without that line unless debug logging is really on.

    def send_hci_packet(self, packet: hci.HCI_Packet) -> None:
        if self.snooper or _HOST_LOG.isEnabledFor(logging.DEBUG):
            super().send_hci_packet(packet)
        elif self.hci_sink:
            self.hci_sink.on_packet(bytes(packet))

    def on_hci_packet(self, packet: hci.HCI_Packet) -> None:
        if self.snooper or _HOST_LOG.isEnabledFor(logging.DEBUG):
            super().on_hci_packet(packet)
            return
        match packet:
            case hci.HCI_Event():
                self.on_hci_event_packet(packet)
            case hci.HCI_AclDataPacket():
                self.on_hci_acl_data_packet(packet)
            case _:
                super().on_hci_packet(packet)

    async def _send_command(self, command: Any, response_timeout: float | None = None) -> Any:
        exchange = asyncio.ensure_future(
            super()._send_command(command, response_timeout or HCI_RESPONSE_TIMEOUT_S)
        )
        self.exchanges.add(exchange)
        exchange.add_done_callback(self._answered)
        return await asyncio.shield(exchange)

    def _answered(self, exchange: asyncio.Future[Any]) -> None:
        self.exchanges.discard(exchange)
        if not exchange.cancelled():
            exchange.exception()  # retrieved: the caller that would have seen it was cancelled


class BumbleBleakScanner(BaseBleakScanner):
    host: ClassVar[BumbleHost]

    def __init__(
        self,
        detection_callback: Callable[[BLEDevice, AdvertisementData], Any] | None,
        service_uuids: list[str] | None,
        scanning_mode: str = "active",
        **kwargs: Any,
    ) -> None:
        super().__init__(detection_callback, service_uuids)
        self._listening = False

    async def start(self) -> None:
        self.seen_devices = {}
        device = await self.host.open()
        device.on("advertisement", self._on_advertisement)
        self._listening = True
        with _map_bumble_errors("start scanning"):
            await device.start_scanning(filter_duplicates=False)

    async def stop(self) -> None:
        device = self.host.device
        if self._listening:
            device.remove_listener("advertisement", self._on_advertisement)
            self._listening = False
        with _map_bumble_errors("stop scanning"):
            await device.stop_scanning()

    def _on_advertisement(self, adv: Advertisement) -> None:
        name: str | None = None
        manufacturer: dict[int, bytes] = {}
        service_uuids: list[str] = []
        tx_power: int | None = None
        for ad_type, raw in adv.data.ad_structures:
            if ad_type in (
                AdvertisingData.COMPLETE_LOCAL_NAME,
                AdvertisingData.SHORTENED_LOCAL_NAME,
            ):
                name = raw.decode("utf-8", "replace")
            elif ad_type == AdvertisingData.MANUFACTURER_SPECIFIC_DATA and len(raw) >= 2:
                manufacturer[int.from_bytes(raw[:2], "little")] = bytes(raw[2:])
            elif ad_type in (
                AdvertisingData.COMPLETE_LIST_OF_128_BIT_SERVICE_CLASS_UUIDS,
                AdvertisingData.INCOMPLETE_LIST_OF_128_BIT_SERVICE_CLASS_UUIDS,
            ):
                service_uuids += [
                    str(uuid_mod.UUID(bytes=bytes(reversed(raw[i : i + 16]))))
                    for i in range(0, len(raw) - 15, 16)
                ]
            elif ad_type == AdvertisingData.TX_POWER_LEVEL and raw:
                tx_power = int.from_bytes(raw[:1], "little", signed=True)
        if not self.is_allowed_uuid(service_uuids):
            return
        data = AdvertisementData(
            local_name=name,
            manufacturer_data=manufacturer,
            service_data={},
            service_uuids=service_uuids,
            tx_power=tx_power,
            rssi=adv.rssi,
            platform_data=(adv,),
        )
        address = str(adv.address).split("/")[0]
        device = self.create_or_update_device(address, address, name, adv.address, data)
        self.call_detection_callbacks(device, data)


class BumbleBleakClient(BaseBleakClient):
    host: ClassVar[BumbleHost]

    def __init__(self, address_or_ble_device: BLEDevice | str, **kwargs: Any) -> None:
        super().__init__(
            address_or_ble_device,
            disconnected_callback=kwargs.pop("disconnected_callback", None),
            timeout=kwargs.pop("timeout", 10.0),
        )
        details = address_or_ble_device.details if isinstance(address_or_ble_device, BLEDevice) else None
        self._peer_address: hci.Address = (
            details if isinstance(details, hci.Address) else hci.Address(self.address)
        )
        self._connection: Connection | None = None
        self._peer: Peer | None = None

    @property
    def name(self) -> str:
        return self.address

    @property
    def mtu_size(self) -> int:
        return self._connection.att_mtu if self._connection is not None else 23

    @property
    def is_connected(self) -> bool:
        return self._connection is not None

    def _require(self) -> Peer:
        if self._peer is None:
            raise BleakError("Not connected")
        return self._peer

    async def connect(self, pair: bool, **kwargs: Any) -> None:
        device = await self.host.open()
        async with self.host.connect_lock:
            try:
                with _map_bumble_errors(f"connect to {self.address}"):
                    # Bumble's own timeout cancels the pending LE connection; ours is a backstop.
                    async with asyncio.timeout(self._timeout + 2):
                        try:
                            connection = await device.connect(self._peer_address, timeout=self._timeout)
                        except core.TimeoutError as exc:
                            # Nothing heard from the lock: the one message LockClient gives for it.
                            raise TimeoutError(f"no connection within {self._timeout:g} s") from exc
            except (TimeoutError, BleakError):
                # A connection attempt left pending in the controller would make every later
                # one fail with COMMAND_DISALLOWED: cancel it whatever happened (the LE cancel;
                # Device.cancel_connection(address) would send the BR/EDR one). A controller
                # with nothing pending (Bumble's timeout cancelled it already) answers
                # COMMAND_DISALLOWED, which is fine: unchecked, so Bumble logs no warning for it.
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(2):
                        await device.host.send_command(
                            hci.HCI_LE_Create_Connection_Cancel_Command(), check_result=False
                        )
                raise
        self._connection = connection
        connection.on("disconnection", self._on_disconnection)
        peer = Peer(connection)
        self._peer = peer
        try:
            with _map_bumble_errors("service discovery"):
                async with asyncio.timeout(self._timeout):
                    await peer.request_mtu(self.host.mtu)
                    await peer.discover_services()
                    services = BleakGATTServiceCollection()
                    for service in peer.services:
                        bservice = BleakGATTService(service, service.handle, _uuid_str(service.uuid))
                        services.add_service(bservice)
                        await service.discover_characteristics()
                        for char in service.characteristics:
                            await char.discover_descriptors()
                            props = [n for bit, n in _PROPERTY_NAMES if int(char.properties) & bit]
                            bchar = BleakGATTCharacteristic(
                                char,
                                char.handle,
                                _uuid_str(char.uuid),
                                props,  # type: ignore[arg-type]
                                lambda: self.mtu_size - 3,
                                bservice,
                            )
                            services.add_characteristic(bchar)
                            for desc in char.descriptors:
                                services.add_descriptor(
                                    BleakGATTDescriptor(desc, desc.handle, _uuid_str(desc.type), bchar)
                                )
            self.services = services
        except BaseException:
            await self.disconnect()
            raise

    def _on_disconnection(self, _reason: int) -> None:
        was_connected = self._connection is not None
        self._connection = None
        self._peer = None
        if was_connected and self._disconnected_callback is not None:
            self._disconnected_callback()

    async def disconnect(self) -> None:
        connection = self._connection
        if connection is None:
            return
        with contextlib.suppress(core.BaseBumbleError, hci.HCI_Error, TimeoutError, ConnectionError):
            async with asyncio.timeout(5):
                await connection.disconnect()
        self._on_disconnection(0)

    async def pair(self, *args: Any, **kwargs: Any) -> None:
        # The lock protocol authenticates at the application layer (protocols.session);
        # BLE-level bonding is not used with simulated locks.
        raise BleakError("BLE-level pairing is not supported by the Bumble backend")

    async def unpair(self) -> None:
        raise BleakError("BLE-level pairing is not supported by the Bumble backend")

    async def read_gatt_char(
        self, characteristic: BleakGATTCharacteristic, *, use_cached: bool = False, **kwargs: Any
    ) -> bytearray:
        peer = self._require()
        with _map_bumble_errors("read"):
            return bytearray(await peer.read_value(characteristic.obj))

    async def read_gatt_descriptor(
        self, descriptor: BleakGATTDescriptor, *, use_cached: bool = False, **kwargs: Any
    ) -> bytearray:
        peer = self._require()
        with _map_bumble_errors("read descriptor"):
            return bytearray(await peer.read_value(descriptor.obj))

    async def write_gatt_char(
        self, characteristic: BleakGATTCharacteristic, data: SizedBuffer, response: bool
    ) -> None:
        peer = self._require()
        with _map_bumble_errors("write"):
            await peer.write_value(characteristic.obj, bytes(data), with_response=response)

    async def write_gatt_descriptor(self, descriptor: BleakGATTDescriptor, data: SizedBuffer) -> None:
        peer = self._require()
        with _map_bumble_errors("write descriptor"):
            await peer.write_value(descriptor.obj, bytes(data), with_response=True)

    async def start_notify(
        self, characteristic: BleakGATTCharacteristic, callback: NotifyCallback, **kwargs: Any
    ) -> None:
        peer = self._require()
        with _map_bumble_errors("subscribe"):
            await peer.subscribe(characteristic.obj, lambda value: callback(bytearray(value)))

    async def stop_notify(self, characteristic: BleakGATTCharacteristic) -> None:
        peer = self._require()
        with _map_bumble_errors("unsubscribe"):
            await peer.unsubscribe(characteristic.obj)
