"""Chunked image staging: an image too large for one request arrives in pieces (docs/firmware.md
§Staging; the ``firmware_stage`` action, docs/contract-additions-firmware.md).

Files under ``DATA/firmware/staging/``, named by the image's SHA-256 (lower-case hex, checked
by the request model before it names a file):

* ``<sha>.<size>.part``: an image being staged, appended chunk by chunk, each write fsynced
  before its answer. Its length is the offset the gateway has; a sender resumes there.
* ``<sha>.img``: a complete image. It only ever appears by ``rename(2)`` of a part whose
  SHA-256 is the name's and that parses as an MCUboot image, after an fsync of the part (and
  the directory is fsynced after): a ``kill -9`` at any moment leaves a part (resumable) or a
  complete, checked image, never a "complete" one that is not.

Bounds: an image of 1..``MAX_IMAGE_BYTES`` (1 MiB, as the image parser's); a chunk of at most
``MAX_CHUNK_BYTES`` (32 KiB: its base64url and the JSON around it fit the 64 KiB request bound of
MQTT and the control socket); at most ``MAX_STAGED`` images staged or being staged at once. A new
image beyond that takes the place of the one idle longest (a part first) if it has been idle
``STALE_S``; otherwise it is refused (``stage_full``): two senders staging at once never evict
each other. A staged image is removed once a rollout of it is recorded (the rollout keeps its
image in ``firmware.sqlite3``, as an inline one), or when it is evicted.

Work on the files runs in a worker thread, one call at a time (an asyncio lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final, Self, TypeVar

from gateway import log
from gateway.durable import fsync_dir
from gateway.errors import LockgwError
from gateway.wire import MAX_STAGE_CHUNK_BYTES
from protocols.errors import FirmwareImageError
from protocols.firmware import MAX_IMAGE_BYTES, parse_image

__all__ = ["MAX_CHUNK_BYTES", "MAX_STAGED", "STALE_S", "Staged", "Staging", "StagingError"]

T = TypeVar("T")
_log = log.get("firmware")

#: Image bytes one ``firmware_stage`` request carries at most (its JSON fits 64 KiB).
MAX_CHUNK_BYTES: Final = MAX_STAGE_CHUNK_BYTES
#: Images staged (complete or not) at once, at most.
MAX_STAGED: Final = 4
#: A staged image idle this long may make room for a new one.
STALE_S: Final = 600.0


class StagingError(LockgwError):
    """A chunk refused (``code``: docs/contract-additions-firmware.md); ``offset``: where the
    gateway's copy of that image stands, when it has one."""

    def __init__(self, message: str, *, code: str, offset: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.offset = offset


@dataclass(frozen=True, slots=True)
class Staged:
    """Where the staging of one image stands: the answer to every accepted chunk."""

    sha256: str
    offset: int
    size: int
    complete: bool

    def as_json(self) -> dict[str, object]:
        return {"sha256": self.sha256, "offset": self.offset, "size": self.size, "complete": self.complete}


class Staging:
    """The staging directory; an async context manager (it creates the directory)."""

    def __init__(
        self,
        root: Path,
        *,
        max_staged: int = MAX_STAGED,
        max_bytes: int = MAX_IMAGE_BYTES,
        stale_s: float = STALE_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = root
        self._max_staged = max_staged
        self._max_bytes = max_bytes
        self._stale_s = stale_s
        self._clock = clock
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> Self:
        """Makes the directory if it can. If it cannot (a full disk, a read-only or foreign-owned
        directory, a file in its way), the gateway starts all the same, doors first: each
        ``firmware_stage`` tries again and answers ``stage_io`` with the reason meanwhile."""
        try:
            await asyncio.to_thread(self._mkdir)
        except OSError as exc:
            _log.warning("staging_unavailable", path=str(self.root), reason=exc.strerror or str(exc))
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    # --- the surface -------------------------------------------------------------------------

    async def stage(self, sha256: str, size: int, offset: int, data: bytes) -> Staged:
        """Append ``data`` at ``offset`` of the image ``sha256`` of ``size`` bytes (empty
        ``data``: only ask where it stands). Raises :class:`StagingError` with its code."""
        async with self._lock:
            return await asyncio.to_thread(self._io, lambda: self._stage(sha256, size, offset, data))

    async def image(self, sha256: str) -> bytes:
        """The complete staged image ``sha256`` (its hash checked again), or ``not_staged``."""
        async with self._lock:
            return await asyncio.to_thread(self._io, lambda: self._read(sha256))

    async def discard(self, sha256: str) -> None:
        """Forget the image ``sha256``, complete or not (nothing if there is none)."""
        async with self._lock:
            await asyncio.to_thread(self._io, lambda: self._remove(sha256))

    # --- in the worker thread ----------------------------------------------------------------

    @staticmethod
    def _io(work: Callable[[], T]) -> T:
        try:
            return work()
        except OSError as exc:
            raise StagingError(f"staging directory: {exc.strerror or exc}", code="stage_io") from exc

    def _mkdir(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _stage(self, sha: str, size: int, offset: int, data: bytes) -> Staged:
        self._mkdir()  # made at start unless it could not be then
        if not 0 < size <= self._max_bytes:
            raise StagingError(f"size {size} is outside 1..{self._max_bytes} bytes", code="stage_too_large")
        if offset + len(data) > size:
            raise StagingError(
                f"{len(data)} bytes at offset {offset} run past the image's size {size}", code="stage_overrun"
            )
        done = _lstat_regular(self.root / f"{sha}.img")
        if done is not None:
            have = done.st_size
            if have != size:
                raise StagingError(f"image {sha} is staged with size {have}, not {size}", code="stage_size")
            return Staged(sha, size, size, complete=True)
        part = self._part(sha)
        if part is not None and part.name != f"{sha}.{size}.part":
            declared = part.name.split(".")[1]
            raise StagingError(
                f"image {sha} is being staged with size {declared}, not {size}", code="stage_size"
            )
        if part is None:
            if offset != 0:
                raise StagingError(
                    f"offset {offset} is not where image {sha} stands: resume at offset 0",
                    code="stage_offset",
                    offset=0,
                )
            if not data:
                return Staged(sha, 0, size, complete=False)
            self._make_room()
            part = self.root / f"{sha}.{size}.part"
            part.touch(mode=0o600, exist_ok=False)
            fsync_dir(self.root)
        return self._append(part, sha, size, offset, data)

    def _append(self, part: Path, sha: str, size: int, offset: int, data: bytes) -> Staged:
        with _open_regular(part, os.O_RDWR) as f:
            have = os.fstat(f.fileno()).st_size
            if offset > have:
                raise StagingError(
                    f"offset {offset} is not where image {sha} stands: resume at offset {have}",
                    code="stage_offset",
                    offset=have,
                )
            overlap = min(have, offset + len(data)) - offset
            if overlap > 0:  # a chunk sent again (a lost answer): the same bytes, or refused
                f.seek(offset)
                if f.read(overlap) != data[:overlap]:
                    raise StagingError(
                        f"bytes at offset {offset} differ from those staged for image {sha}",
                        code="stage_conflict",
                        offset=have,
                    )
            rest = data[max(0, overlap) :]
            if rest:
                f.seek(have)
                f.write(rest)
                f.flush()
                os.fsync(f.fileno())
                have += len(rest)
            os.utime(f.fileno())  # idle since now (eviction)
        if have < size:
            return Staged(sha, have, size, complete=False)
        self._complete(part, sha)
        return Staged(sha, size, size, complete=True)

    def _complete(self, part: Path, sha: str) -> None:
        """Check the whole image, then make it complete with one rename (after its fsync)."""
        with _open_regular(part, os.O_RDONLY) as f:
            image = f.read()
        if hashlib.sha256(image).hexdigest() != sha:
            part.unlink()
            raise StagingError(
                f"the staged bytes' SHA-256 is not {sha}: discarded, stage it again from offset 0",
                code="stage_hash_mismatch",
                offset=0,
            )
        try:
            parse_image(image)
        except FirmwareImageError as exc:
            part.unlink()
            raise StagingError(
                f"the staged bytes are not an MCUboot image ({exc}): discarded",
                code="stage_bad_image",
                offset=0,
            ) from exc
        part.replace(self.root / f"{sha}.img")
        fsync_dir(self.root)

    def _read(self, sha: str) -> bytes:
        done = self.root / f"{sha}.img"
        try:
            with _open_regular(done, os.O_RDONLY) as f:
                image = f.read(self._max_bytes + 1)
        except FileNotFoundError:
            part = self._part(sha)
            st = _lstat_regular(part) if part is not None else None
            where = f" (staging stands at offset {st.st_size})" if st is not None else ""
            raise StagingError(f"no complete staged image {sha}{where}", code="not_staged") from None
        if hashlib.sha256(image).hexdigest() != sha:  # changed on disk since: never use it
            done.unlink()
            raise StagingError(f"staged image {sha} changed on disk: discarded", code="stage_hash_mismatch")
        return image

    def _remove(self, sha: str) -> None:
        for path in [self.root / f"{sha}.img", *self.root.glob(f"{sha}.*.part")]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        fsync_dir(self.root)

    def _part(self, sha: str) -> Path | None:
        return next(iter(sorted(self.root.glob(f"{sha}.*.part"))), None)

    def _make_room(self) -> None:
        """Room for one more image: evict the one idle longest (a part first) if it has been
        idle ``STALE_S``; else ``stage_full``."""
        entries = [p for p in self.root.iterdir() if p.suffix in (".part", ".img") and _is_regular(p)]
        if len(entries) < self._max_staged:
            return
        now = self._clock()
        idle = sorted(
            ((p.suffix == ".img", p.stat().st_mtime, p) for p in entries),
            key=lambda e: (e[0], e[1]),
        )
        for _complete, mtime, path in idle:
            # Either way: a file stamped in the future (a clock set back since, e.g. a gateway
            # without a real-time clock that booted with a date ahead) is as idle as any other.
            if abs(now - mtime) >= self._stale_s:
                path.unlink()
                return
        raise StagingError(
            f"{len(entries)} images are staged or being staged already (at most {self._max_staged}); "
            f"one idle for {int(self._stale_s)} s makes room, and an applied one is removed",
            code="stage_full",
        )


def _lstat_regular(path: Path) -> os.stat_result | None:
    """``path``'s own status (a symlink not followed) if it is a regular file, ``None`` if there
    is nothing; anything else under one of the staging's names refuses (``stage_io``)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path)
    return st


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except FileNotFoundError:
        return False


def _open_regular(path: Path, flags: int) -> BinaryIO:
    """Open a staging file that is a regular file, never through a symlink (``O_NOFOLLOW``) and
    never blocking on a FIFO or a device (``O_NONBLOCK``, then its type checked on the open file):
    whatever else writes to the data directory cannot make a chunk land in another file or a
    read hang. ``FileNotFoundError`` when there is nothing."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise _not_regular(path) from exc
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _not_regular(path)
    return os.fdopen(fd, "r+b" if flags & os.O_RDWR else "rb")


def _not_regular(path: Path) -> StagingError:
    return StagingError(
        f"{path.name} in the staging directory {path.parent} is not a regular file (a symlink, "
        "directory or device put there by something else): nothing is read or written through it; "
        "remove it",
        code="stage_io",
    )
