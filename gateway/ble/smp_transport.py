"""smpclient's ``SMPTransport`` over the lock link's own :class:`bleak.BleakClient`.

smpclient's BLE transport scans and connects by itself and takes no backend argument; a gateway
must instead reuse the connection its :class:`~gateway.ble.lock_client.LockClient` holds (the
injected backend, one connection slot, the link whose authenticated session opened the lock's
SMP window with ``SMP_OPEN``). This transport never connects or disconnects: ``connect``
subscribes to the SMP characteristic of the already connected client and ``disconnect``
unsubscribes.

Writes go out without response in pieces of ATT MTU − 3; answers are reassembled by the SMP
header's length, bounded by :data:`MAX_SMP_RESPONSE` (a hostile lock cannot make the gateway
buffer more). A link that drops fails the waiting receive with ``SMPTransportDisconnected``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from typing import Any, Final, TypeVar

from bleak import BleakClient
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.exc import BleakError
from cbor2 import CBORError
from smp import header as smphdr
from smpclient import SMPClient
from smpclient.exceptions import SMPClientException
from smpclient.transport import SMP_CHARACTERISTIC_UUID, SMPTransport, SMPTransportDisconnected

from gateway.ble.lock_client import LockClient
from gateway.errors import LinkLost, LinkTimeout, LockMisbehaved
from protocols.limits import ATT_OVERHEAD, MAX_ATT_MTU, MIN_ATT_MTU
from protocols.messages import Op, Status, parse_smp_open

__all__ = ["MAX_SMP_RESPONSE", "LinkSmpTransport", "SmpLink"]

_T = TypeVar("_T")

#: Largest SMP answer accepted: an image state list is < 300 bytes; 4 KiB is generous.
MAX_SMP_RESPONSE: Final = 4096


class LinkSmpTransport(SMPTransport):
    def __init__(self, client: BleakClient) -> None:
        self._client = client
        self._char: BleakGATTCharacteristic | None = None
        self._buffer = bytearray()
        self._changed = asyncio.Event()
        self._error: Exception | None = None

    async def connect(self, address: str, timeout_s: float) -> None:  # noqa: ARG002 - already connected
        char = self._client.services.get_characteristic(str(SMP_CHARACTERISTIC_UUID))
        if char is None:
            # Maybe a GATT layout cached before the lock's attribute table changed (a firmware
            # update, SMP enabled): drop it, so the step's next attempt discovers again.
            forget = getattr(getattr(self._client, "_backend", None), "forget_layout", None)
            if callable(forget):
                forget()
            raise LockMisbehaved("lock offers no SMP service", code="no_smp")
        try:
            async with asyncio.timeout(timeout_s):
                await self._client.start_notify(char, self._on_notify)
        except (BleakError, TimeoutError) as exc:
            raise SMPTransportDisconnected(f"cannot subscribe to SMP: {exc}") from exc
        self._char = char

    async def disconnect(self) -> None:
        char, self._char = self._char, None
        if char is not None and self._client.is_connected:
            with contextlib.suppress(BleakError, TimeoutError, OSError):
                async with asyncio.timeout(5):
                    await self._client.stop_notify(char)

    @property
    def mtu(self) -> int:
        return max(MIN_ATT_MTU, min(MAX_ATT_MTU, self._client.mtu_size)) - ATT_OVERHEAD

    async def send(self, data: bytes) -> None:
        if self._char is None or not self._client.is_connected:
            raise SMPTransportDisconnected("SMP transport is not connected")
        size = self.mtu
        try:
            for i in range(0, len(data), size):
                await self._client.write_gatt_char(self._char, data[i : i + size], response=False)
        except BleakError as exc:
            raise SMPTransportDisconnected(f"SMP write failed: {exc}") from exc

    async def receive(self) -> bytes:
        while True:
            if self._error is not None:
                error, self._error = self._error, None
                self._buffer.clear()
                raise error
            if len(self._buffer) >= smphdr.Header.SIZE:
                total = smphdr.Header.SIZE + int.from_bytes(self._buffer[2:4], "big")
                if len(self._buffer) >= total:
                    out = bytes(self._buffer[:total])
                    del self._buffer[:total]
                    return out
            if not self._client.is_connected:
                raise SMPTransportDisconnected("the lock link dropped")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.25):  # also notices a link that dropped silently
                    await self._changed.wait()

    async def send_and_receive(self, data: bytes) -> bytes:
        self._buffer.clear()  # a late answer of a timed-out request is never taken for this one
        await self.send(data)
        return await self.receive()

    def _on_notify(self, _char: BleakGATTCharacteristic, data: bytearray) -> None:
        self._buffer.extend(data)
        if len(self._buffer) > MAX_SMP_RESPONSE:
            self._buffer.clear()
            self._error = LockMisbehaved("SMP answer exceeds the bound", code="lock_error")
        self._changed.set()


#: How long one SMP_OPEN asks the lock to keep SMP open; renewed when less than half is left.
SMP_WINDOW_S: Final = 120


class SmpLink:
    """SMP on an established lock link: opens the lock's SMP window (``SMP_OPEN``, renewed
    before it ends), then runs smpclient requests; smpclient's and bleak's errors are mapped here
    to :mod:`gateway.errors` (LinkLost, LinkTimeout, LockMisbehaved)."""

    def __init__(self, client: LockClient) -> None:
        self._client = client
        self._transport: LinkSmpTransport | None = None
        self._smp: SMPClient | None = None
        self._until = 0.0

    @property
    def ready(self) -> bool:
        return self._transport is not None

    @property
    def buf_size(self) -> int:
        """The largest SMP request the lock takes (its MCUmgr ``buf_size``, else the MTU)."""
        assert self._transport is not None
        return self._transport.max_unencoded_size

    async def _open(self, timeout_s: float) -> SMPClient:
        now = time.monotonic()
        if now > self._until - SMP_WINDOW_S / 2:
            answer = await self._client.request(Op.SMP_OPEN, {"secs": SMP_WINDOW_S})
            if answer.status is not Status.OK:
                raise LockMisbehaved(f"lock refused SMP_OPEN: {answer.status.name}", code="smp_refused")
            self._until = now + parse_smp_open(answer.result)
        if self._smp is None:
            transport = LinkSmpTransport(self._client.bleak_client)
            smp = SMPClient(transport, self._client.lock_id or "lock", timeout_s=timeout_s)
            await self._call(smp.connect(), "SMP connect")
            self._transport, self._smp = transport, smp
        return self._smp

    async def request(self, request: Any, *, timeout_s: float = 10.0) -> Any:
        smp = await self._open(timeout_s)
        return await self._call(smp.request(request, timeout_s=timeout_s), type(request).__name__)

    async def _call(self, awaitable: Awaitable[_T], what: str) -> _T:
        try:
            return await awaitable
        except SMPTransportDisconnected as exc:
            raise LinkLost(f"{what}: {exc}") from exc
        except TimeoutError as exc:
            raise LinkTimeout(f"{what}: the lock did not answer") from exc
        except (SMPClientException, ValueError) as exc:
            raise LockMisbehaved(f"{what}: {exc}", code="lock_error") from exc
        except (CBORError, TypeError, KeyError) as exc:
            # What smp's decoder lets through of a body that is not CBOR (cbor2's errors are no
            # ValueError) or not a map (``**`` of a list): the lock's answer, not our bug.
            raise LockMisbehaved(
                f"{what}: the lock's answer is not an SMP message ({type(exc).__name__})", code="lock_error"
            ) from exc
