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

A controller that stalls (a USB dongle or bluetoothd hiccup; the simulator under SIGSTOP) is
noticed and recovered from here (THREATS A3/A5, A9):

* :meth:`BumbleHost.check` is a cheap health probe (HCI Read BD_ADDR, bounded by
  ``PROBE_TIMEOUT_S``); the daemon's adapter loop runs it and raises ``ble_adapter_unavailable``.
* An HCI command left unanswered for ``HCI_RESPONSE_TIMEOUT_S`` marks the controller *suspect*:
  the next :meth:`BumbleHost.open` probes it first — still silent: ``AdapterUnavailable`` at
  once; answering again: the host is **re-opened** (transport reconnected, HCI Reset, state
  re-learned), which drops whatever links and pending connects the stall left in the controller
  and reports each old link to its client as lost.
* A transport that drops after opening (the simulator restarted, a UART gone) is re-opened the
  same way by the next ``open``.
* Late events from the stall are handled at the boundary (:class:`_GatewayHost`): an answer to a
  command nobody waits for is dropped, an LE connection that completes when no connect to that
  address is pending is disconnected at once (else the lock stays connected to nobody and never
  advertises again), and any other exception from Bumble's event handling is one log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
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
from bumble.gatt_client import CharacteristicProxy, DescriptorProxy, ServiceProxy
from bumble.host import Host
from bumble.transport import open_transport
from bumble.transport.common import AsyncPipeSink, Transport

from gateway import log
from gateway.errors import AdapterUnavailable

__all__ = ["BumbleHost"]

DEFAULT_MTU = 247
#: The health probe's bound: a live controller answers Read BD_ADDR in well under a millisecond
#: (a USB round trip); one that has not answered in 2 s is stalled, not slow.
PROBE_TIMEOUT_S: Final = 2.0

_log = log.get("ble")


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


#: (handle, end_group_handle, uuid, [(handle, end, uuid, properties, [(handle, type)])]).
_CachedService = tuple[
    int, int, core.UUID, list[tuple[int, int, core.UUID, int, list[tuple[int, core.UUID]]]]
]


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
        #: GATT layouts found by discovery, per peer address: a later connection to the same
        #: peer skips discovery (about 30 ATT PDUs, one connection event each on a real radio).
        #: A peer whose cached layout fails on a link (its firmware changed the attribute
        #: table) is dropped from the cache and discovered again on its next connection.
        self.gatt_cache: dict[str, list[_CachedService]] = {}
        self._transport: Transport | None = None
        self._device: Device | None = None
        # Lazy: opened by the first connect or scan, and tried again by each later one while it
        # fails — so a gateway starts (events, MQTT, the CLI) without its dongle or simulator,
        # and recovers when it appears.
        self._lazy = lazy
        self._opening = asyncio.Lock()
        self._closed = False
        #: Why the controller is suspected of a stall (an HCI command went unanswered, a probe
        #: failed); the next open() probes it before handing the device out.
        self._suspect: str | None = None
        self._suspected = asyncio.Event()
        #: How many times the host was re-opened after a stall or a lost transport.
        self.reopened = 0

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

    @property
    def suspect(self) -> str | None:
        """Why the controller is thought stalled, or None."""
        return self._suspect

    async def open(self) -> Device:
        """The host's device, opening the transport first if needed (AdapterUnavailable if not).

        A device whose transport dropped is re-opened; one whose controller is suspected of a
        stall is probed first: still silent, AdapterUnavailable at once; answering again, it is
        re-opened (HCI Reset) so nothing the stall left behind survives."""
        async with self._opening:
            if self._closed:
                raise AdapterUnavailable("Bumble host is closed")
            device = self._device
            if device is not None and self._transport_lost():
                await self._reset(device, "the HCI transport was lost")
            elif device is not None and self._suspect is not None:
                await self._probe(device)  # AdapterUnavailable while it is still silent
                await self._reset(device, f"the controller answers again after: {self._suspect}")
            if self._device is None:
                self._device = await self._open()
                self._suspect = None
            return self._device

    async def check(self) -> None:
        """The health probe: open (or re-open) the host and see that the controller answers a
        harmless HCI command within ``PROBE_TIMEOUT_S``; AdapterUnavailable if not."""
        device = await self.open()
        await self._probe(device)

    async def _probe(self, device: Device) -> None:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                await device.host.send_command(hci.HCI_Read_BD_ADDR_Command(), check_result=True)
        except (TimeoutError, core.BaseBumbleError, hci.HCI_Error, ConnectionError, OSError) as exc:
            reason = (
                f"the BLE controller did not answer an HCI command within {PROBE_TIMEOUT_S:g} s"
                if isinstance(exc, TimeoutError)
                else f"the BLE controller failed an HCI command: {str(exc) or type(exc).__name__}"
            )
            self._suspect = self._suspect or reason
            raise AdapterUnavailable(reason) from exc

    def _transport_lost(self) -> bool:
        transport = self._transport
        return transport is not None and transport.source.terminated.done()

    def _stalled(self, reason: str) -> None:
        if self._suspect is None:
            _log.warning("ble_controller_suspect", reason=reason)
            self._suspect = reason
            self._suspected.set()

    async def wait_suspect(self, timeout_s: float) -> None:
        """Return when the controller becomes suspect of a stall, or after ``timeout_s``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._suspected.wait()
        self._suspected.clear()

    async def _reset(self, device: Device, reason: str) -> None:
        """Forget this device: its links are reported lost to their clients, the transport is
        closed; the next _open() reconnects and power_on's HCI Reset clears the controller."""
        _log.warning("ble_host_reopening", reason=reason, links=len(device.connections))
        self._device = None
        self.reopened += 1
        host = device.host
        if isinstance(host, _GatewayHost):
            host.retire("the HCI host was re-opened")
        for handle in list(device.connections):
            with contextlib.suppress(Exception):
                device.on_disconnection(handle, hci.HCI_ErrorCode.CONNECTION_TIMEOUT_ERROR)
        transport, self._transport = self._transport, None
        if transport is not None:
            with contextlib.suppress(Exception):
                await transport.close()

    async def _open(self) -> Device:
        try:
            if self._controller is not None:
                host = _GatewayHost(self._controller, AsyncPipeSink(self._controller))
            else:
                assert self._transport_name is not None
                self._transport = await open_transport(self._transport_name)
                host = _GatewayHost(self._transport.source, self._transport.sink)
            host.on_stall = self._stalled
            device = Device(name="lockgw", address=hci.Address(self._address), host=host)
            host.device = device
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


class _Abandoned(TimeoutError):
    """The command's answer will never come: its host was re-opened or its transport lost.
    A TimeoutError, because that is what callers handle and what Bumble does not log."""


class _GatewayHost(Host):
    """Bumble's host with two corrections.

    HCI commands run to their answer even when the caller is cancelled. Bumble's host allows one
    outstanding command; cancelling the coroutine that waits for its answer frees the slot at
    once, so the late answer is taken for the *next* command's (a mismatch warning, a wrong
    result, then InvalidStateError when the real answer comes). Here the exchange runs in its
    own task, shielded: a cancelled caller stops waiting, the slot stays taken until the
    controller answers (or HCI_RESPONSE_TIMEOUT_S passes).

    And packets are not formatted for a debug line that is not logged (below).

    Late events after a stall (the controller answers, or completes a connection, after the
    host gave up) are handled here, each with one log line: see :meth:`on_command_processed`,
    :meth:`on_hci_le_connection_complete_event` and :meth:`on_packet`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Commands still waiting for their answer (BumbleHost lets them finish before closing).
        self.exchanges: set[asyncio.Future[Any]] = set()
        #: Told when an HCI command goes unanswered for its whole timeout (a stalled controller).
        self.on_stall: Callable[[str], None] | None = None
        #: The device on this host (whether a connect is pending is the device's to say).
        self.device: Device | None = None
        #: The peer a BumbleBleakClient is connecting to right now (under connect_lock).
        self.expecting: hci.Address | None = None
        #: Set when BumbleHost re-opened past this host: its events are no longer acted on.
        self.retired = False
        #: Handles of connections nobody asked for, being disconnected.
        self._orphans: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()

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
        timeout = response_timeout or HCI_RESPONSE_TIMEOUT_S
        exchange = asyncio.ensure_future(super()._send_command(command, timeout))
        self.exchanges.add(exchange)
        exchange.add_done_callback(functools.partial(self._answered, command.name, timeout))
        return await asyncio.shield(exchange)

    def _answered(self, name: str, timeout: float, exchange: asyncio.Future[Any]) -> None:
        self.exchanges.discard(exchange)
        if exchange.cancelled():
            return
        exc = exchange.exception()  # retrieved: the caller that would have seen it was cancelled
        stalled = isinstance(exc, TimeoutError) and not isinstance(exc, _Abandoned)
        if stalled and self.on_stall is not None and not self.retired:
            self.on_stall(f"{name} unanswered for {timeout:g} s")

    def retire(self, reason: str) -> None:
        """Stop acting on this host's events; the command waiting for an answer gets a timeout."""
        self.retired = True
        self._abandon(reason)

    def on_transport_lost(self) -> None:
        # Bumble fails the waiting command with TransportLostError, which its _send_command logs
        # as a traceback; a TimeoutError is what callers handle (and it is logged by nobody).
        # BumbleHost.open() re-opens the transport on the next call.
        self._abandon("the HCI transport was lost")
        self.emit("flush")

    def _abandon(self, reason: str) -> None:
        pending = self.pending_response
        if pending is not None and not pending.done():
            pending.set_exception(_Abandoned(reason))

    # --- late events after a stall ------------------------------------------------------------

    def on_packet(self, packet: bytes) -> None:
        # Bumble's packet parser logs any exception from here as a "!!! Exception in on_packet"
        # traceback; whatever Bumble's handlers still trip over is one line here instead.
        try:
            super().on_packet(packet)
        except Exception as exc:  # noqa: BLE001 - the boundary: one line, the host goes on
            _log.warning(
                "hci_event_not_handled", packet=bytes(packet[:8]).hex(), error=f"{type(exc).__name__}: {exc}"
            )

    def on_command_processed(
        self, event: hci.HCI_Command_Complete_Event[Any] | hci.HCI_Command_Status_Event
    ) -> None:
        pending, command = self.pending_response, self.pending_command
        if pending is not None and command is not None and not pending.done():
            if command.op_code == event.command_opcode:
                super().on_command_processed(event)
                return
        elif pending is None and event.num_hci_command_packets and self.command_semaphore.locked():
            self.command_semaphore.release()  # as Bumble does, without its "!!!" warning
        # The answer to a command given up on (a stall) while another one waits, or a second
        # answer: Bumble would hand it to the waiting command (a wrong result) or crash on it.
        _log.info(
            "late_hci_answer_dropped",
            opcode=f"0x{event.command_opcode:04X}",
            waiting=f"0x{command.op_code:04X}" if command is not None else None,
        )

    def on_hci_le_connection_complete_event(self, event: Any) -> None:
        if self.retired:
            return
        if event.status == hci.HCI_SUCCESS and event.role == hci.Role.CENTRAL and not self._wanted(event):
            # The connect was given up (a stalled controller finished it late) or was for another
            # lock: nobody will use this link, and the lock on it would never advertise again.
            handle = event.connection_handle
            _log.warning("orphan_connection_disconnected", peer=str(event.peer_address), handle=handle)
            self._orphans.add(handle)
            task = asyncio.get_running_loop().create_task(self._disconnect_orphan(handle))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        super().on_hci_le_connection_complete_event(event)

    def _wanted(self, event: Any) -> bool:
        device = self.device
        if device is None or device.connect_own_address_type is None:
            return False  # no LE connect pending in this host
        expected = self.expecting
        return expected is None or expected.address_bytes == event.peer_address.address_bytes

    async def _disconnect_orphan(self, handle: int) -> None:
        try:
            await self.send_command(
                hci.HCI_Disconnect_Command(
                    connection_handle=handle, reason=hci.HCI_REMOTE_USER_TERMINATED_CONNECTION_ERROR
                ),
                check_result=False,
            )
        except Exception as exc:  # noqa: BLE001 - a stalled controller: the reset clears it
            self._orphans.discard(handle)
            if not self.retired:  # else the re-opened host's HCI Reset dropped the link already
                _log.warning("orphan_disconnect_failed", handle=handle, error=f"{type(exc).__name__}: {exc}")

    def on_hci_disconnection_complete_event(self, event: hci.HCI_Disconnection_Complete_Event) -> None:
        if event.connection_handle in self._orphans:
            self._orphans.discard(event.connection_handle)
            return
        if self.retired:
            return
        super().on_hci_disconnection_complete_event(event)


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
                        host = device.host
                        if isinstance(host, _GatewayHost):
                            host.expecting = self._peer_address
                        try:
                            connection = await device.connect(self._peer_address, timeout=self._timeout)
                        except core.TimeoutError as exc:
                            # Nothing heard from the lock: the one message LockClient gives for it.
                            raise TimeoutError(f"no connection within {self._timeout:g} s") from exc
                        finally:
                            if isinstance(host, _GatewayHost):
                                host.expecting = None
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
        cached = self.host.gatt_cache.get(str(self._peer_address))
        try:
            with _map_bumble_errors("service discovery"):
                async with asyncio.timeout(self._timeout):
                    await peer.request_mtu(self.host.mtu)
                    if cached is not None:
                        _restore_layout(peer, cached)
                    else:
                        await peer.discover_services()
                        for service in peer.services:
                            await service.discover_characteristics()
                            for char in service.characteristics:
                                await char.discover_descriptors()
                        self.host.gatt_cache[str(self._peer_address)] = _layout_of(peer)
            self.services = self._collection(peer)
        except BaseException:
            await self.disconnect()
            raise

    def _collection(self, peer: Peer) -> BleakGATTServiceCollection:
        services = BleakGATTServiceCollection()
        for service in peer.services:
            bservice = BleakGATTService(service, service.handle, _uuid_str(service.uuid))
            services.add_service(bservice)
            for char in service.characteristics:
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
        return services

    @contextlib.contextmanager
    def _forgetting_on_error(self) -> Iterator[None]:
        try:
            yield
        except BleakError:
            self.forget_layout()  # maybe a stale handle: discover again next time
            raise

    def forget_layout(self) -> None:
        """Drop this peer's cached GATT layout: its next connection discovers it again."""
        self.host.gatt_cache.pop(str(self._peer_address), None)

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
        with self._forgetting_on_error(), _map_bumble_errors("write"):
            await peer.write_value(characteristic.obj, bytes(data), with_response=response)

    async def write_gatt_descriptor(self, descriptor: BleakGATTDescriptor, data: SizedBuffer) -> None:
        peer = self._require()
        with _map_bumble_errors("write descriptor"):
            await peer.write_value(descriptor.obj, bytes(data), with_response=True)

    async def start_notify(
        self, characteristic: BleakGATTCharacteristic, callback: NotifyCallback, **kwargs: Any
    ) -> None:
        peer = self._require()
        with self._forgetting_on_error(), _map_bumble_errors("subscribe"):
            await peer.subscribe(characteristic.obj, lambda value: callback(bytearray(value)))

    async def stop_notify(self, characteristic: BleakGATTCharacteristic) -> None:
        peer = self._require()
        with _map_bumble_errors("unsubscribe"):
            await peer.unsubscribe(characteristic.obj)


def _layout_of(peer: Peer) -> list[_CachedService]:
    return [
        (
            service.handle,
            service.end_group_handle,
            service.uuid,
            [
                (
                    char.handle,
                    char.end_group_handle,
                    char.uuid,
                    int(char.properties),
                    [(desc.handle, desc.type) for desc in char.descriptors],
                )
                for char in service.characteristics
            ],
        )
        for service in peer.services
    ]


def _restore_layout(peer: Peer, layout: list[_CachedService]) -> None:
    """Bumble's proxies for a cached layout, as discovery would have left them."""
    client = peer.gatt_client
    client.services = []
    for handle, end, uuid, chars in layout:
        service = ServiceProxy(client, handle, end, uuid)  # type: ignore[no-untyped-call]
        for c_handle, c_end, c_uuid, props, descs in chars:
            char: CharacteristicProxy[bytes] = CharacteristicProxy(client, c_handle, c_end, c_uuid, props)
            char.descriptors = [DescriptorProxy(client, d_handle, d_type) for d_handle, d_type in descs]
            char.descriptors_discovered = True
            service.characteristics.append(char)
        client.services.append(service)
