"""The gateway's client for one lock: connect, pair or handshake, one request at a time.

``LockClient`` is an async context manager around a :class:`bleak.BleakClient` (backend class
injected) and a :class:`protocols.session.GatewayConnection`. Rules (STYLE §5):

* one request in flight per link (``_request_lock``) and one pending future;
* every await has a timeout; a timeout *poisons* the link (it is closed) because the session's
  AEAD counters make a late reply unusable anyway — the caller retries the *same* ``cmd_id`` on
  a new link and the lock's idempotency cache returns the first result;
* link loss fails the pending future with :class:`~gateway.errors.LinkLost`;
* bleak/bumble and protocol errors are mapped here, at the boundary, into :mod:`gateway.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Self

from bleak import BleakClient
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient
from bleak.backends.device import BLEDevice
from bleak.exc import BleakError

from gateway.errors import (
    BleError,
    LinkLost,
    LinkTimeout,
    LockMisbehaved,
    LockUnreachable,
    PairingFailed,
)
from protocols.cbor import CborValue
from protocols.errors import ProtocolError
from protocols.framing import fragment
from protocols.gatt import RX_CHAR_UUID, TX_CHAR_UUID
from protocols.limits import COMMAND_ID_LEN, MAX_ATT_MTU, MIN_ATT_MTU
from protocols.messages import Op, Request, Response
from protocols.session import (
    Event,
    GatewayConnection,
    PairingCompleted,
    PairingRefused,
    RemoteErrorReceived,
    ResponseReceived,
    Rng,
    SessionEstablished,
)

__all__ = ["LockClient"]

#: Connect + service discovery. A real lock answers in < 1 s; BlueZ may need several seconds
#: when the controller is busy. Past this the lock is "unreachable" for this attempt.
CONNECT_TIMEOUT_S = 10.0
#: One request/response exchange. Actuation takes ~0.5 s on real units.
REQUEST_TIMEOUT_S = 5.0
#: SPAKE2 on a small MCU takes a moment; pairing is interactive anyway.
PAIRING_TIMEOUT_S = 20.0


class LockClient:
    def __init__(
        self,
        device: BLEDevice | str,
        *,
        gw_id: str,
        backend: type[BaseBleakClient] | None = None,
        rng: Rng = os.urandom,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self._device = device
        self._gw_id = gw_id
        self._backend = backend
        self._rng = rng
        self._connect_timeout_s = connect_timeout_s
        self._request_timeout_s = request_timeout_s
        self._client: BleakClient | None = None
        self._rx: BleakGATTCharacteristic | None = None
        self._conn = GatewayConnection(gw_id=gw_id, rng=rng)
        self._events: list[Event] = []
        self._wakeup = asyncio.Event()
        self._request_lock = asyncio.Lock()
        self._poisoned: BleError | None = None
        self.lock_id: str | None = None
        self.on_disconnect: Callable[[], None] | None = None

    @property
    def is_connected(self) -> bool:
        return self._client is not None and self._client.is_connected and self._poisoned is None

    @property
    def bleak_client(self) -> BleakClient:
        """The connected client, for the SMP transport of this same link (gateway.ble.smp_transport)."""
        if self._client is None or self._poisoned is not None:
            raise self._poisoned or LinkLost("not connected")
        return self._client

    @property
    def mtu(self) -> int:
        assert self._client is not None
        return max(MIN_ATT_MTU, min(MAX_ATT_MTU, self._client.mtu_size))

    async def __aenter__(self) -> Self:
        if self._client is not None:
            raise RuntimeError("LockClient is not reentrant")
        client = BleakClient(
            self._device,
            disconnected_callback=self._on_disconnected,
            timeout=self._connect_timeout_s,
            backend=self._backend,
        )
        try:
            async with asyncio.timeout(self._connect_timeout_s + 1):
                await client.connect()
                services = client.services
                rx = services.get_characteristic(RX_CHAR_UUID)
                tx = services.get_characteristic(TX_CHAR_UUID)
                if rx is None or tx is None:
                    raise LockMisbehaved("device does not offer the lockgw service")
                await client.start_notify(tx, self._on_notify)
        except TimeoutError as exc:
            await _quiet_disconnect(client)
            raise LockUnreachable(
                f"no connection to {_name(self._device)} within {self._connect_timeout_s:.0f} s"
            ) from exc
        except BleakError as exc:
            await _quiet_disconnect(client)
            raise LockUnreachable(f"cannot connect to {_name(self._device)}: {exc}") from exc
        except BaseException:
            await _quiet_disconnect(client)
            raise
        self._client, self._rx = client, rx
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        client, self._client = self._client, None
        self._conn.close()
        self._poisoned = self._poisoned or LinkLost("link closed")
        self._wakeup.set()
        if client is not None:
            await _quiet_disconnect(client)

    # --- protocol operations -------------------------------------------------------------

    async def pair(self, setup_code: str) -> PairingCompleted:
        """Run pairing with the lock's setup code; returns the new long-term key."""
        self._conn.start_pairing(setup_code)
        event = await self._exchange(PAIRING_TIMEOUT_S)
        if isinstance(event, PairingCompleted):
            self.lock_id = event.lock_id
            return event
        if isinstance(event, PairingRefused):
            raise PairingFailed(
                event.message, reason=event.code.name.lower(), attempts_left=event.attempts_left
            )
        raise LockMisbehaved(f"unexpected answer to pairing: {type(event).__name__}")

    async def open_session(self, *, lock_id: str, ltk: bytes) -> None:
        self._conn.start_session(lock_id=lock_id, ltk=ltk)
        event = await self._exchange(self._request_timeout_s)
        if isinstance(event, SessionEstablished):
            self.lock_id = lock_id
            return
        if isinstance(event, RemoteErrorReceived):
            raise LockMisbehaved(f"lock refused the session: {event.message}", code="lock_error")
        raise LockMisbehaved(f"unexpected answer to HELLO: {type(event).__name__}")

    async def request(
        self, op: Op, args: Mapping[str, CborValue] | None = None, *, cmd_id: bytes | None = None
    ) -> Response:
        """Send one command and wait for its response (same ``cmd_id`` ⇒ same result)."""
        cmd_id = cmd_id or self._rng(COMMAND_ID_LEN)
        async with self._request_lock:
            if self._poisoned is not None:
                raise self._poisoned
            try:
                self._conn.send_request(Request(op, cmd_id, args or {}))
            except ProtocolError as exc:  # the session ended (the lock sent ERROR) or args too big
                err = LockMisbehaved(f"cannot send {op.name} on this link: {exc}", code="lock_error")
                await self._poison(err)
                raise err from exc
            event = await self._exchange(self._request_timeout_s)
            # The session already refuses a response to another request (THREATS B7); a
            # mismatch reaching here is still never returned as the answer.
            if (
                not isinstance(event, ResponseReceived)
                or event.response.cmd_id != cmd_id
                or event.response.op is not op
            ):
                err = LockMisbehaved(
                    f"lock answered {op.name} with {_describe(event)}: not this request's answer",
                    code="lock_error",
                )
                await self._poison(err)
                raise err
        return event.response

    # --- plumbing ------------------------------------------------------------------------

    async def _exchange(self, timeout_s: float) -> Event:
        """Flush what the session queued, until it yields an event (several round trips for
        pairing and the handshake, whose replies the session answers by itself)."""
        if self._poisoned is not None:
            raise self._poisoned
        if self._client is None or self._rx is None:
            raise LinkLost("not connected")
        self._events.clear()
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    self._wakeup.clear()
                    out = self._conn.data_to_send()
                    if out:
                        await self._write(out)  # notifications may arrive meanwhile
                    if self._events:  # an answer that arrived before a link loss still counts
                        return self._events.pop(0)
                    if self._poisoned is not None:
                        raise self._poisoned
                    if not self._wakeup.is_set():
                        await self._wakeup.wait()
        except TimeoutError as exc:
            name = self.lock_id or _name(self._device)
            err = LinkTimeout(f"lock {name} did not answer in {timeout_s:.0f} s")
            await self._poison(err)
            raise err from exc

    async def _write(self, data: bytes) -> None:
        assert self._client is not None
        assert self._rx is not None
        try:
            for piece in fragment(data, self.mtu):
                await self._client.write_gatt_char(self._rx, piece, response=True)
        except BleakError as exc:
            await self._poison(LinkLost(f"write failed: {exc}"))

    def _on_notify(self, _char: BleakGATTCharacteristic, data: bytearray) -> None:
        try:
            self._events.extend(self._conn.receive_data(bytes(data)))
        except ProtocolError as exc:
            self._poisoned = self._poisoned or LockMisbehaved(
                f"lock broke the protocol: {exc}", code="lock_error"
            )
            self._spawn_poison()
        self._wakeup.set()

    def _on_disconnected(self, _client: BleakClient) -> None:
        self._poisoned = self._poisoned or LinkLost("lock disconnected")
        self._wakeup.set()
        if self.on_disconnect is not None:
            self.on_disconnect()

    def _spawn_poison(self) -> None:
        # Disconnect from the loop, not from inside the notification callback.
        task = asyncio.get_running_loop().create_task(self._disconnect_now(), name="lockgw-poison")
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)

    async def _disconnect_now(self) -> None:
        if self._client is not None:
            await _quiet_disconnect(self._client)

    async def _poison(self, exc: BleError) -> None:
        self._poisoned = self._poisoned or exc
        self._conn.close()
        self._wakeup.set()
        if self._client is not None:
            await _quiet_disconnect(self._client)


_BACKGROUND: set[asyncio.Task[None]] = set()


async def _quiet_disconnect(client: BleakClient) -> None:
    with contextlib.suppress(BleakError, TimeoutError, OSError):
        async with asyncio.timeout(5):
            await client.disconnect()


def _describe(event: Event) -> str:
    if isinstance(event, ResponseReceived):
        return f"{event.response.op.name} {event.response.cmd_id.hex()[:8]}…"
    return type(event).__name__


def _name(device: BLEDevice | str) -> str:
    return device.address if isinstance(device, BLEDevice) else device
