"""The SMP GATT service of a simulated lock (Bumble), around the pure :mod:`firmware_sim.smp_server`.

One characteristic (``DA2E7828-…``, write without response + notify) in the SMP service
(``8D53DC1D-…``). Writes are reassembled by the SMP header's length; each answer is notified in
pieces of at most ATT MTU − 3 bytes. A write is accepted only from a link whose authenticated
lock session opened the window with ``SMP_OPEN`` (docs/protocol.md §5): anything else is
dropped unanswered and counted in :attr:`SmpService.refused` (a real lock has no way to answer
an unauthorised SMP peer that would not leak state).

Faults (docs/simulator.md): ``fw_drop_after`` N SMP writes the link drops; ``fw_reboot`` reboots
now (mid-upload: the upload state in RAM is lost); ``fw_flash_delay`` seconds per upload chunk;
``fw_unhealthy`` VERSION: that image, once booted for test, answers every lock command FAILED
(a health check must catch it); ``fw_lie_offset`` N: every upload write is answered ``off=N``; ``fw_bad_cbor`` true: every SMP
answer's body is not CBOR.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from bumble import gatt
from bumble.core import UUID
from bumble.device import Connection, Device
from imgtool.image import Image, VerifyResult

from firmware_sim.lock_model import LockModel
from firmware_sim.peripheral import LinkDriver
from firmware_sim.persist import BootStore
from firmware_sim.smp_server import BootOutcome, McuBoot, SlotImage, SmpReassembler, SmpServer, Verifier
from protocols.errors import FirmwareImageError
from protocols.firmware import ImageInfo, parse_image
from protocols.limits import ATT_OVERHEAD

__all__ = ["SMP_CHAR_UUID", "SMP_SERVICE_UUID", "SmpService", "imgtool_verifier"]

SMP_SERVICE_UUID = "8D53DC1D-1DB7-4CD3-868B-8A527460AA84"
SMP_CHAR_UUID = "DA2E7828-FBCE-4E01-AE9E-261174997C48"

log = logging.getLogger("lockgw.sim")


def imgtool_verifier(keys: Sequence[Any]) -> Verifier:
    """The bootloader's check, by imgtool's own ``Image.verify`` against the provisioned keys
    (imgtool reads a file, so the image goes through a temporary one)."""

    def verify(data: bytes) -> ImageInfo:
        info = parse_image(data)  # bounded first: imgtool's parser trusts the lengths
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "slot1.bin"
            path.write_bytes(data)
            results = []
            for key in keys:
                try:
                    result = Image.verify(os.fspath(path), key)[0]
                except Exception as exc:  # imgtool raises anything on a hostile image
                    raise FirmwareImageError(f"imgtool: {exc}", code="bad_image") from exc
                if result is VerifyResult.OK:
                    return info
                results.append(result.name)
        raise FirmwareImageError(
            f"bootloader refuses the image: {results or 'no keys'}", code="bad_signature"
        )

    return verify


class SmpService:
    """SMP over GATT for one simulated lock; tasks run through ``spawn`` (the radio's)."""

    def __init__(
        self,
        device: Device,
        model: LockModel,
        *,
        verifier: Verifier,
        now: Callable[[], float],
        driver_for: Callable[[Connection], LinkDriver | None],
        disconnect_all: Callable[[], Awaitable[None]],
        spawn: Callable[[Any, str], None],
        store: BootStore | None = None,
    ) -> None:
        """``store``: the bootloader's state file (``--state``): loaded, then booted as after a
        power cut (a pending image is swapped in, an unconfirmed test image reverted); None:
        in memory, factory-fresh."""
        self.model = model
        self.boot = McuBoot(verifier=verifier, primary=SlotImage.factory(model.lock_id))
        self.store = store
        if store is not None:
            if store.load(self.boot):
                outcome = self.boot.boot()
                log.info("lock %s powers on: %s %s", model.lock_id, outcome.kind, outcome.reason)
            store.sync(self.boot)
        self.server = SmpServer(self.boot)
        self._device = device
        self._now = now
        self._driver_for = driver_for
        self._disconnect_all = disconnect_all
        self._spawn = spawn
        self._queues: dict[Connection, asyncio.Queue[bytes]] = {}
        self.refused = 0
        self._generation = 0  # raised by each reboot: a link from before serves nothing more
        self.writes = 0
        self.drop_after: int | None = None
        self.flash_delay_s = 0.0
        self.unhealthy_versions: set[str] = set()
        #: Fault ``fw_bad_cbor``: every SMP answer keeps its header and carries a body that is
        #: not CBOR (an indefinite array never closed).
        self.bad_cbor = False
        self.boots: list[BootOutcome] = self.boot.history
        self.char: gatt.Characteristic[bytes] = gatt.Characteristic(
            UUID(SMP_CHAR_UUID),
            gatt.Characteristic.Properties.WRITE_WITHOUT_RESPONSE | gatt.Characteristic.Properties.NOTIFY,
            gatt.Characteristic.WRITEABLE,
            gatt.CharacteristicValue(write=self._on_write),
        )
        device.add_service(gatt.Service(UUID(SMP_SERVICE_UUID), [self.char]))
        self._apply_running()

    def _on_write(self, connection: Connection, value: bytes) -> None:
        driver = self._driver_for(connection)
        if driver is None or not driver.smp_open(self._now()):
            self.refused += 1
            return
        queue = self._queues.get(connection)
        if queue is None:
            queue = self._queues[connection] = asyncio.Queue()
            connection.on("disconnection", lambda _reason: self._end(connection))
            self._spawn(self._serve(connection, queue), f"smp-{self.model.lock_id}-{connection.handle}")
        queue.put_nowait(bytes(value))

    def _end(self, connection: Connection) -> None:
        queue = self._queues.pop(connection, None)
        if queue is not None:
            queue.put_nowait(b"")

    async def _serve(self, connection: Connection, queue: asyncio.Queue[bytes]) -> None:
        reassembler = SmpReassembler()
        generation = self._generation
        while True:
            data = await queue.get()
            if not data or generation != self._generation:
                return  # the link ended, or the lock rebooted under it
            self.writes += 1
            if self.drop_after is not None and self.writes >= self.drop_after:
                self.drop_after = None
                await self._disconnect_all()
                return
            try:
                requests = reassembler.feed(data)
            except ValueError as exc:
                log.info("lock %s drops an SMP link: %s", self.model.lock_id, exc)
                await self._disconnect_all()
                return
            for request in requests:
                if not await self._answer(connection, request, generation):
                    return

    async def _answer(self, connection: Connection, request: bytes, generation: int) -> bool:
        """Handle one whole request and notify its answer; False when the link is done with
        (the lock rebooted, the answer could not leave, the flash did not take a write)."""
        if self.flash_delay_s and request[4:6] == b"\x00\x01" and request[7] == 1:
            await asyncio.sleep(self.flash_delay_s)  # image group, upload: a flash write
        if generation != self._generation:
            return False
        reply = self.server.handle(request)
        if not self._persisted():
            await self._disconnect_all()  # unanswered: the flash did not take it
            return False
        if not await self._notify(connection, self._faulty(reply.data)):
            return False
        if reply.reboot:
            await asyncio.sleep(0.05)  # the answer leaves first, as on Zephyr
            await self.reboot()
            return False
        return True

    def _persisted(self) -> bool:
        """The bootloader's state on disk (with ``--state``) before anything is answered."""
        if self.store is None:
            return True
        try:
            self.store.sync(self.boot)
        except OSError as exc:
            log.warning("lock %s cannot write its bootloader state: %s", self.model.lock_id, exc)
            return False
        return True

    def _faulty(self, data: bytes) -> bytes:
        """An answer as fault ``fw_bad_cbor`` sends it: its header, a body that is not CBOR."""
        if self.bad_cbor and len(data) >= 8:
            return data[:2] + (1).to_bytes(2, "big") + data[4:8] + b"\x9f"
        return data

    async def _notify(self, connection: Connection, data: bytes) -> bool:
        size = max(1, connection.att_mtu - ATT_OVERHEAD)
        try:
            for i in range(0, len(data), size):
                await self._device.notify_subscriber(connection, self.char, data[i : i + size])
        except Exception:  # noqa: BLE001 - the link went away under the notification
            return False
        return True

    async def reboot(self) -> BootOutcome:
        """Forget the upload in RAM and what the links had queued, let MCUboot swap or revert,
        then drop every link: all at once, as an MCU reset is (nothing a peer sends meanwhile
        meets the state from before)."""
        self._generation += 1
        self.server.reset_ram()
        outcome = self.boot.boot()
        log.info("lock %s boots: %s %s", self.model.lock_id, outcome.kind, outcome.reason)
        self._persisted()
        self._apply_running()
        await self._disconnect_all()
        return outcome

    def _apply_running(self) -> None:
        version = str(self.boot.primary.version)
        self.model.firmware = f"sim-{version}"
        self.model.unhealthy = not self.boot.confirmed and version in self.unhealthy_versions

    def stats(self) -> dict[str, Any]:
        """What the ``fw_stats`` command answers: requests handled by name, the offset the
        upload in RAM reached (None: none), the running image and each boot's outcome."""
        upload = self.server.upload
        return {
            "handled": dict(self.server.handled),
            "upload_off": upload.off if upload is not None else None,
            "running": str(self.boot.primary.version),
            "confirmed": self.boot.confirmed,
            "security_counter": self.boot.security_counter,
            "boots": [o.kind for o in self.boot.history],
        }

    def apply_fault(self, fault: str, value: Any) -> Awaitable[Any] | None:
        if fault == "fw_drop_after":
            self.drop_after, self.writes = int(value), 0
        elif fault == "fw_flash_delay":
            self.flash_delay_s = float(value)
        elif fault == "fw_unhealthy":
            self.unhealthy_versions.add(str(value))
            self._apply_running()
        elif fault == "fw_bad_cbor":
            self.bad_cbor = bool(value)
        elif fault == "fw_lie_offset":
            self.server.lie_offset = int(value)
        elif fault == "fw_reboot":
            return self.reboot()
        else:
            raise ValueError(f"unknown fault {fault!r}")
        return None
