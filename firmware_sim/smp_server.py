"""The lock's firmware-update side, modelled: an MCUmgr SMP server over an MCUboot with two slots.

Pure like :mod:`firmware_sim.lock_model`: no I/O and no clock; the GATT glue in
:mod:`firmware_sim.bumble_peripheral` feeds :class:`SmpReassembler` with each write, hands each
whole request to :meth:`SmpServer.handle` and notifies the answer; when the answer says
``reboot`` it drops the link and calls :meth:`McuBoot.boot`.

The server follows Zephyr's ``img_mgmt`` and ``os_mgmt`` (subsys/mgmt/mcumgr), parsed and
answered with the ``smp`` package's models:

* OS group: MCUmgr parameters (``buf_size``, ``buf_count``), reset (answer, then reboot), echo;
* image group: state read; state write (``hash`` + ``confirm=false``: test the secondary image
  on the next boot; ``confirm=true``: confirm the running one, or make the secondary permanent);
  upload (``off=0`` starts one, or, with the same ``sha`` and ``len`` as the upload in progress,
  resumes it and answers the offset reached; a chunk at another offset is answered with the
  offset expected; data past ``len`` is ``INVALID_IMAGE_DATA_OVERRUN``; ``upgrade=true`` refuses a
  version not newer than the running one; the first chunk must start with MCUboot's magic);
  erase (the secondary slot, unless it is pending);
* MCUboot: on :meth:`McuBoot.boot`, a test image that was not confirmed is swapped back
  (revert); a pending secondary image is verified (signature with the boot keys, via an
  injected verifier: imgtool's own in the simulator) and its security counter must not be below
  the bootloader's; a refused image is erased and the running one stays. Confirming raises the
  security counter to the running image's, never lowers it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import cbor2
from smp import error as smperr
from smp import header as smphdr
from smp import image_management as img
from smp import os_management as osm
from smp.exceptions import SMPMalformed
from smp.message import Response

from protocols.errors import FirmwareImageError
from protocols.firmware import IMAGE_MAGIC, ImageInfo, ImageVersion, parse_image

__all__ = ["BootOutcome", "McuBoot", "SlotImage", "SmpReassembler", "SmpReply", "SmpServer"]

#: Zephyr's CONFIG_MCUMGR_TRANSPORT_NETBUF_SIZE default is 384; nRF Connect SDK DFU samples use
#: 2475. 1024 keeps the simulator honest about buffer limits at a realistic size.
BUF_SIZE: Final = 1024
BUF_COUNT: Final = 4
#: The secondary slot of the simulated nRF52 (an image larger than this is refused).
SLOT_SIZE: Final = 256 * 1024

#: Verifies a whole image for the bootloader: returns its info or raises FirmwareImageError.
Verifier = Callable[[bytes], ImageInfo]


@dataclass(frozen=True, slots=True)
class SlotImage:
    data: bytes
    version: ImageVersion
    digest: bytes
    security_counter: int

    @classmethod
    def factory(cls, lock_id: str) -> SlotImage:
        """The image a lock ships with: version 1.0.0, counter 1."""
        digest = hashlib.sha256(b"factory image of " + lock_id.encode()).digest()
        return cls(b"", ImageVersion(1, 0, 0), digest, 1)


@dataclass(frozen=True, slots=True)
class BootOutcome:
    kind: str  # "normal" | "swapped_test" | "swapped_permanent" | "reverted" | "refused"
    reason: str = ""


@dataclass
class McuBoot:
    """Two slots in swap mode with revert (MCUboot's default for Zephyr DFU)."""

    verifier: Verifier
    primary: SlotImage
    secondary: bytes = b""  # raw slot contents (complete or not)
    confirmed: bool = True  # image_ok of the running image
    pending: str | None = None  # None | "test" | "permanent"
    testing: bool = False  # the running image was swapped in for test; the old one is in secondary
    security_counter: int = 1
    previous: SlotImage | None = None  # while testing: the confirmed image now in secondary
    history: list[BootOutcome] = field(default_factory=list)

    def secondary_info(self) -> ImageInfo | None:
        try:
            return parse_image(self.secondary) if self.secondary else None
        except FirmwareImageError:
            return None

    def boot(self) -> BootOutcome:
        outcome = self._boot()
        self.history.append(outcome)
        return outcome

    def _boot(self) -> BootOutcome:
        if self.testing and not self.confirmed and self.previous is not None:
            # The test image never confirmed itself: swap back. The old image was confirmed.
            self.secondary = self.primary.data
            self.primary, self.previous = self.previous, None
            self.testing, self.confirmed, self.pending = False, True, None
            return BootOutcome("reverted", "test image was not confirmed")
        if self.pending is None:
            return BootOutcome("normal")
        mode, self.pending = self.pending, None
        try:
            info = self.verifier(self.secondary)
        except FirmwareImageError as exc:
            self.secondary = b""  # MCUboot erases an image that fails validation
            return BootOutcome("refused", f"{exc.code}: {exc}")
        if (info.security_counter or 0) < self.security_counter:
            self.secondary = b""
            return BootOutcome("refused", "security counter below the bootloader's")
        new = SlotImage(self.secondary, info.version, info.digest, info.security_counter or 0)
        self.secondary = self.primary.data
        old_primary, self.primary = self.primary, new
        if mode == "test":
            self.testing, self.confirmed, self.previous = True, False, old_primary
            return BootOutcome("swapped_test")
        self.testing, self.confirmed = False, True
        self.security_counter = max(self.security_counter, new.security_counter)
        return BootOutcome("swapped_permanent")

    def confirm_running(self) -> None:
        self.confirmed, self.testing, self.previous = True, False, None
        self.security_counter = max(self.security_counter, self.primary.security_counter)

    # --- what survives a power cycle (firmware_sim/persist.py writes it) -------------------

    def durable(self) -> dict[str, Any]:
        """The flash's content: both slots, the image flags, the security counter (not the
        boot history, which is the simulator's log)."""
        return {
            "v": 1,
            "primary": _slot_state(self.primary),
            "previous": _slot_state(self.previous) if self.previous is not None else None,
            "secondary": self.secondary,
            "confirmed": self.confirmed,
            "pending": self.pending,
            "testing": self.testing,
            "security_counter": self.security_counter,
        }

    def restore(self, state: object) -> None:
        """Back to a :meth:`durable` state (ValueError when it is not one)."""
        try:
            if not isinstance(state, dict) or state.get("v") != 1:
                raise TypeError("not a version 1 bootloader state")
            primary = _slot_of(state["primary"])
            previous = None if state["previous"] is None else _slot_of(state["previous"])
            secondary, pending = state["secondary"], state["pending"]
            flags = (state["confirmed"], state["testing"])
            counter = state["security_counter"]
            if not isinstance(secondary, bytes) or pending not in (None, "test", "permanent"):
                raise TypeError("bad secondary slot or pending flag")
            if not all(isinstance(f, bool) for f in flags) or type(counter) is not int or counter < 0:
                raise TypeError("bad image flags or security counter")
        except (KeyError, TypeError) as exc:
            raise ValueError(f"bootloader state: {exc}") from exc
        self.primary, self.previous, self.secondary, self.pending = primary, previous, secondary, pending
        self.confirmed, self.testing = flags
        self.security_counter = counter


def _slot_state(slot: SlotImage) -> dict[str, Any]:
    v = slot.version
    return {
        "data": slot.data,
        "version": [v.major, v.minor, v.revision, v.build],
        "digest": slot.digest,
        "security_counter": slot.security_counter,
    }


def _slot_of(state: object) -> SlotImage:
    if not isinstance(state, dict):
        raise TypeError("a slot is a map")
    data, version, digest, counter = (
        state["data"],
        state["version"],
        state["digest"],
        state["security_counter"],
    )
    if not isinstance(data, bytes) or not isinstance(digest, bytes) or len(digest) != 32:
        raise TypeError("bad slot data or digest")
    if (
        not isinstance(version, list)
        or len(version) != 4
        or not all(type(x) is int and x >= 0 for x in version)
    ):
        raise TypeError("bad slot version")
    if type(counter) is not int or counter < 0:
        raise TypeError("bad slot security counter")
    return SlotImage(data, ImageVersion(*version), digest, counter)


@dataclass(frozen=True, slots=True)
class SmpReply:
    data: bytes
    reboot: bool = False


class SmpReassembler:
    """Collects GATT writes into whole SMP requests by the header's length (bounded)."""

    def __init__(self, limit: int = BUF_SIZE) -> None:
        self._buf = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> list[bytes]:
        """Whole requests completed by ``data``; raises ValueError (the link must end) on a
        request larger than the buffer or an impossible header."""
        self._buf.extend(data)
        out: list[bytes] = []
        while len(self._buf) >= smphdr.Header.SIZE:
            length = int.from_bytes(self._buf[2:4], "big")
            total = smphdr.Header.SIZE + length
            if total > self._limit:
                self._buf.clear()
                raise ValueError(f"SMP request of {total} bytes exceeds the {self._limit}-byte buffer")
            if len(self._buf) < total:
                break
            out.append(bytes(self._buf[:total]))
            del self._buf[:total]
        return out


@dataclass
class _Upload:
    length: int
    sha: bytes | None
    data: bytearray
    off: int = 0


class SmpServer:
    """One lock's SMP server (one per lock: the upload state is in its RAM)."""

    def __init__(self, boot: McuBoot) -> None:
        self.boot = boot
        self.upload: _Upload | None = None
        self.handled: dict[str, int] = {}  # requests by name, for tests
        #: Fault ``fw_lie_offset``: every upload write is answered with this offset, whatever
        #: was written (a hostile or broken lock: stuck at one offset, or beyond the image).
        self.lie_offset: int | None = None

    def reset_ram(self) -> None:
        """A reboot forgets the upload in progress (the slot keeps what was written)."""
        self.upload = None

    def handle(self, frame: bytes) -> SmpReply:
        if len(frame) < smphdr.Header.SIZE:
            return SmpReply(b"")  # not SMP: Zephyr drops it
        try:
            header = smphdr.Header.loads(frame[: smphdr.Header.SIZE])
        except (ValueError, KeyError):
            return SmpReply(b"")  # not SMP: Zephyr drops it
        group, cmd, op = int(header.group_id), int(header.command_id), header.op
        route = _ROUTES.get((group, cmd, op))
        if route is None:
            return SmpReply(_error(header, smperr.MGMT_ERR.ENOTSUP))
        name, request_cls, method = route
        try:
            request = request_cls.loads(frame)
        except (SMPMalformed, ValueError, TypeError, cbor2.CBORDecodeError):
            return SmpReply(_error(header, smperr.MGMT_ERR.EINVAL))
        self.handled[name] = self.handled.get(name, 0) + 1
        reply: SmpReply = method(self, request)
        return reply

    # --- OS group ----------------------------------------------------------------------

    def on_params(self, request: osm.MCUMgrParametersReadRequest) -> SmpReply:
        return SmpReply(
            _ok(osm.MCUMgrParametersReadResponse, request.header, buf_size=BUF_SIZE, buf_count=BUF_COUNT)
        )

    def on_echo(self, request: osm.EchoWriteRequest) -> SmpReply:
        return SmpReply(_ok(osm.EchoWriteResponse, request.header, r=request.d))

    def on_reset(self, request: osm.ResetWriteRequest) -> SmpReply:
        return SmpReply(_ok(osm.ResetWriteResponse, request.header), reboot=True)

    # --- image group ---------------------------------------------------------------------

    def _states(self) -> list[dict[str, Any]]:
        boot = self.boot
        primary: dict[str, Any] = {
            "slot": 0,
            "version": str(boot.primary.version),
            "hash": boot.primary.digest,
            "bootable": True,
            "active": True,
        }
        if boot.confirmed:
            primary["confirmed"] = True
        states = [primary]
        info = boot.secondary_info()
        if info is not None and (self.upload is None or self.upload.off == self.upload.length):
            second: dict[str, Any] = {"slot": 1, "version": str(info.version), "hash": info.digest}
            second["bootable"] = True
            if boot.pending is not None:
                second["pending"] = True
            if boot.pending == "permanent":
                second["permanent"] = True
            if boot.testing:
                second["confirmed"] = True  # the old image, swapped out, stays confirmed
            states.append(second)
        return states

    def on_state_read(self, request: img.ImageStatesReadRequest) -> SmpReply:
        return SmpReply(_ok(img.ImageStatesReadResponse, request.header, images=self._states()))

    def on_state_write(self, request: img.ImageStatesWriteRequest) -> SmpReply:
        boot = self.boot
        if request.confirm and (request.hash is None or request.hash == boot.primary.digest):
            boot.confirm_running()
            return SmpReply(_ok(img.ImageStatesWriteResponse, request.header, images=self._states()))
        info = boot.secondary_info()
        if info is None or request.hash != info.digest or boot.testing:
            return SmpReply(_img_error(request.header, img.IMG_MGMT_ERR.HASH_NOT_FOUND))
        if self.upload is not None and self.upload.off != self.upload.length:
            return SmpReply(_img_error(request.header, img.IMG_MGMT_ERR.HASH_NOT_FOUND))
        boot.pending = "permanent" if request.confirm else "test"
        return SmpReply(_ok(img.ImageStatesWriteResponse, request.header, images=self._states()))

    def on_erase(self, request: img.ImageEraseRequest) -> SmpReply:
        if self.boot.pending is not None or self.boot.testing:
            return SmpReply(_img_error(request.header, img.IMG_MGMT_ERR.IMAGE_ALREADY_PENDING))
        self.boot.secondary, self.upload = b"", None
        return SmpReply(_ok(img.ImageEraseResponse, request.header))

    def on_upload(self, request: img.ImageUploadWriteRequest) -> SmpReply:  # noqa: C901, PLR0912 - Zephyr's img_mgmt_upload, rule by rule
        header, boot = request.header, self.boot
        if self.lie_offset is not None:
            return SmpReply(_ok(img.ImageUploadWriteResponse, header, off=self.lie_offset))
        if request.off == 0:
            if request.len is None:
                return SmpReply(_error(header, smperr.MGMT_ERR.EINVAL))
            up = self.upload
            if (
                up is not None
                and request.sha is not None
                and up.sha == request.sha
                and up.length == request.len
            ):
                # The same image again: resume where it stopped (Zephyr answers the offset).
                return SmpReply(_ok(img.ImageUploadWriteResponse, header, off=up.off))
            if boot.pending is not None or boot.testing:
                return SmpReply(_img_error(header, img.IMG_MGMT_ERR.NO_FREE_SLOT))
            if request.len > SLOT_SIZE:
                return SmpReply(_img_error(header, img.IMG_MGMT_ERR.INVALID_IMAGE_TOO_LARGE))
            if len(request.data) < 4 or int.from_bytes(request.data[:4], "little") != IMAGE_MAGIC:
                return SmpReply(_img_error(header, img.IMG_MGMT_ERR.INVALID_IMAGE_HEADER_MAGIC))
            if request.upgrade and len(request.data) >= 28:
                new = ImageVersion(*_header_version(request.data))
                if new <= boot.primary.version:
                    return SmpReply(_img_error(header, img.IMG_MGMT_ERR.CURRENT_VERSION_IS_NEWER))
            self.upload = _Upload(request.len, request.sha, bytearray())
            boot.secondary = b""  # erase before writing (the slot holds the image once whole)
        up = self.upload
        if up is None:
            return SmpReply(_error(header, smperr.MGMT_ERR.EINVAL))
        if request.off != up.off:
            # Offset correction: tell the client where the next byte goes.
            return SmpReply(_ok(img.ImageUploadWriteResponse, header, off=up.off))
        if up.off + len(request.data) > up.length:
            return SmpReply(_img_error(header, img.IMG_MGMT_ERR.INVALID_IMAGE_DATA_OVERRUN))
        up.data.extend(request.data)
        up.off += len(request.data)
        if up.off < up.length:
            return SmpReply(_ok(img.ImageUploadWriteResponse, header, off=up.off))
        # Whole: now the slot's content. Until then it is in the upload's buffer (copying the
        # growing slot at every chunk cost O(image²); no one reads a partial slot: a state read
        # lists the secondary only once the upload is whole, and a reboot forgets the upload).
        boot.secondary = bytes(up.data)
        fields: dict[str, Any] = {"off": up.off}
        if up.sha is not None:
            fields["match"] = hashlib.sha256(up.data).digest() == up.sha
        return SmpReply(_ok(img.ImageUploadWriteResponse, header, **fields))


def _header_version(data: bytes) -> tuple[int, int, int, int]:
    return data[20], data[21], int.from_bytes(data[22:24], "little"), int.from_bytes(data[24:28], "little")


_G_OS, _G_IMG = int(smphdr.GroupId.OS_MANAGEMENT), int(smphdr.GroupId.IMAGE_MANAGEMENT)
_OS, _IMG = smphdr.CommandId.OSManagement, smphdr.CommandId.ImageManagement
_R, _W = smphdr.OP.READ, smphdr.OP.WRITE

_ROUTES: Final[dict[tuple[int, int, smphdr.OP], tuple[str, Any, Callable[[SmpServer, Any], SmpReply]]]] = {
    (_G_OS, int(_OS.MCUMGR_PARAMETERS), _R): ("params", osm.MCUMgrParametersReadRequest, SmpServer.on_params),
    (_G_OS, int(_OS.ECHO), _W): ("echo", osm.EchoWriteRequest, SmpServer.on_echo),
    (_G_OS, int(_OS.RESET), _W): ("reset", osm.ResetWriteRequest, SmpServer.on_reset),
    (_G_IMG, int(_IMG.STATE), _R): ("state_read", img.ImageStatesReadRequest, SmpServer.on_state_read),
    (_G_IMG, int(_IMG.STATE), _W): ("state_write", img.ImageStatesWriteRequest, SmpServer.on_state_write),
    (_G_IMG, int(_IMG.UPLOAD), _W): ("upload", img.ImageUploadWriteRequest, SmpServer.on_upload),
    (_G_IMG, int(_IMG.ERASE), _W): ("erase", img.ImageEraseRequest, SmpServer.on_erase),
}


def _response_header(request: smphdr.Header, body: bytes) -> smphdr.Header:
    op = smphdr.OP.READ_RSP if request.op is smphdr.OP.READ else smphdr.OP.WRITE_RSP
    return smphdr.Header(
        op=op,
        version=request.version,
        flags=smphdr.Flag(0),
        length=len(body),
        group_id=request.group_id,
        sequence=request.sequence,
        command_id=request.command_id,
    )


def _ok(cls: type[Response], request: smphdr.Header, **fields: Any) -> bytes:
    """A response model of ``cls`` answering ``request`` (same group, command, sequence)."""
    body = cbor2.dumps(cls(**fields).model_dump(exclude_unset=True, exclude={"header", "version", "sequence", "smp_data"}, exclude_none=True), canonical=True)  # fmt: skip
    return bytes(cls(header=_response_header(request, body), **fields))


def _error(request: smphdr.Header, rc: smperr.MGMT_ERR) -> bytes:
    body = cbor2.dumps({"rc": int(rc)}, canonical=True)
    message = smperr.ErrorV1(header=_response_header(request, body), rc=rc)
    return bytes(message)


def _img_error(request: smphdr.Header, rc: img.IMG_MGMT_ERR) -> bytes:
    fields = {"err": {"group": int(smphdr.GroupId.IMAGE_MANAGEMENT), "rc": int(rc)}}
    body = cbor2.dumps(fields, canonical=True)
    return bytes(img.ImageManagementErrorV2(header=_response_header(request, body), **fields))  # type: ignore[arg-type]
