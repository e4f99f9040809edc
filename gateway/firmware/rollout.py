"""Staged firmware rollouts: manifest in, signed image to each lock, ring by ring (docs/firmware.md).

Before any radio work the gateway refuses what it can: a manifest not signed by a keyring key
with role ``firmware`` (or for another site, or expired), an image whose SHA-256 is not the
manifest's, an image not signed by a firmware key, a version that is not the manifest's, a
security counter below one this gateway already confirmed, a version not above the one a lock
last confirmed. Then, per lock, each step persisted in :class:`~gateway.firmware.store.FirmwareStore`
before the next::

    pending → uploading (resumable: the lock answers its offset for the same SHA)
            → uploaded → testing (marked for test, reset) → health check → confirmed
                                                                       ↘ reset without confirm → reverted

The health check reconnects, requires the new image active and not confirmed, a STATUS round
trip, a battery at or above the manifest's threshold and a clock within ``CLOCK_SLACK_S`` of the
gateway's, and, when the manifest asks, an authenticated no-op actuation (LOCK of a locked
door). Rings run in order; a failure (reverted or failed) in a ring halts the rollout: later
rings are marked ``halted``. A lock below the battery threshold is ``refused`` (not a failure).
Quiet hours: no lock starts its update inside them.

Every SMP request goes through :meth:`LinkManager.smp` at the lowest priority: an unlock waits at
most for the chunk in flight. At most as many locks update at once as the link manager has
connection slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
import types
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Self

from gateway.ble.links import LinkManager, Priority
from gateway.ble.registry import LockRecord
from gateway.errors import BleError, LockgwError
from gateway.events import (
    Event,
    FirmwareConfirmed,
    FirmwareDone,
    FirmwareFailed,
    FirmwareHalted,
    FirmwareReverted,
    FirmwareStaged,
    FirmwareTesting,
    FirmwareUploading,
)
from gateway.events import FirmwareRefused as FirmwareRefusedEvent
from gateway.firmware.store import FINAL_STATES, FirmwareStore, LockRow
from protocols.cose import CoseKey
from protocols.errors import FirmwareImageError
from protocols.firmware import ImageInfo, ImageVersion, Manifest, check_upgrade, parse_manifest, verify_image
from protocols.messages import LockState, Op, Status, parse_status

__all__ = ["FirmwareRefused", "Rollouts", "chunk_request"]

log = logging.getLogger("lockgw.firmware")

#: Link failures one step survives (each resumes from the lock's own state).
STEP_ATTEMPTS: Final = 6
#: An upload sends at most this many times the image (a reboot mid-upload starts it over).
UPLOAD_BUDGET_X: Final = 4
#: How long a rebooted lock may take to come back and pass its health check.
HEALTH_TIMEOUT_S: Final = 60.0
#: A lock clock further than this from the gateway's fails the health check.
CLOCK_SLACK_S: Final = 300
QUIET_POLL_S: Final = 30.0
#: A lock answers a reset, then reboots: the most we wait for it to drop the link.
REBOOT_WAIT_S: Final = 10.0

#: Commits one firmware event (gateway/events.py) to the outbox (``Service.event``).
Emit = Callable[[Event], Awaitable[object]]


class FirmwareRefused(LockgwError):
    """A rollout or image refused before any radio work; ``code`` says why."""

    code = "firmware_refused"

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


class _StepFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Checked:
    manifest: Manifest
    image_digest: bytes
    security_counter: int


class Rollouts:
    """Runs rollouts; an async context manager owning one TaskGroup (one task per rollout)."""

    def __init__(
        self,
        store: FirmwareStore,
        links: LinkManager,
        *,
        site: str,
        lookup: Callable[[str], LockRecord | None],
        keys: Callable[[], dict[bytes, CoseKey]],
        emit: Emit,
        clock: Callable[[], float] = time.time,
        health_timeout_s: float = HEALTH_TIMEOUT_S,
        on_firmware: Callable[[str, str], Awaitable[None]] | None = None,
        autostart: bool = True,
    ) -> None:
        self._store = store
        self._links = links
        self._site = site
        self._lookup = lookup
        self._keys = keys
        self._emit = emit
        self._clock = clock
        self._health_timeout_s = health_timeout_s
        self._on_firmware = on_firmware
        #: False in a direct CLI command: a rollout is recorded, and the daemon runs it.
        self._autostart = autostart
        self._group: asyncio.TaskGroup | None = None
        self._running: dict[str, asyncio.Task[None]] = {}
        self.progress: dict[tuple[str, str], int] = {}

    async def __aenter__(self) -> Self:
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._running.values():
            task.cancel()
        group, self._group = self._group, None
        if group is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await group.__aexit__(None, None, None)

    # --- surfaces ----------------------------------------------------------------------------

    def check(self, manifest_raw: bytes, image: bytes, known: dict[str, tuple[str, int]]) -> Checked:
        """Every refusal that needs no radio (raises FirmwareRefused with the reason code)."""
        keys = self._keys()
        try:
            manifest = parse_manifest(manifest_raw, keys, site=self._site, now=int(self._clock()))
            if hashlib.sha256(image).digest() != manifest.image_sha256:
                raise FirmwareImageError("image SHA-256 is not the manifest's", code="image_mismatch")
            info = verify_image(image, list(keys.values()))
        except FirmwareImageError as exc:
            raise FirmwareRefused(str(exc), code=exc.code) from exc
        if info.version != manifest.version:
            raise FirmwareRefused(
                f"image version {info.version} is not the manifest's {manifest.version}",
                code="image_mismatch",
            )
        top = max((counter for _v, counter in known.values()), default=0)
        if (info.security_counter or 0) < top:
            raise FirmwareRefused(
                f"security counter {info.security_counter or 0} below {top} already confirmed on this site",
                code="counter_rollback",
            )
        return Checked(manifest, info.digest, info.security_counter or 0)

    async def apply(self, manifest_raw: bytes, image: bytes) -> dict[str, Any]:
        """Check, persist and start a rollout; its locks' refusals come back as events."""
        known = await self._store.known()
        try:
            checked = self.check(manifest_raw, image, known)
        except FirmwareRefused as exc:
            await self._emit(FirmwareRefusedEvent(lock=None, reason=exc.code, detail=str(exc)))
            raise
        m = checked.manifest
        unknown = [lock for ring in m.rings for lock in ring if self._lookup(lock) is None]
        if unknown:
            refusal = FirmwareRefused(
                f"locks not paired with this gateway: {', '.join(unknown[:5])}", code="unknown_lock"
            )
            await self._emit(FirmwareRefusedEvent(lock=None, reason=refusal.code, detail=str(refusal)))
            raise refusal
        locks = [(lock, i) for i, ring in enumerate(m.rings) for lock in ring]
        if not await self._store.add_rollout(m.rollout, manifest_raw, image, str(m.version), locks):
            raise FirmwareRefused(f"rollout {m.rollout} exists already", code="duplicate_rollout")
        await self._emit(FirmwareStaged(m.rollout, str(m.version), tuple(tuple(r) for r in m.rings)))
        if self._autostart:
            self._start(m.rollout)
        return {"rollout": m.rollout, "version": str(m.version), "rings": [list(r) for r in m.rings]}

    async def resume(self) -> list[str]:
        """Start again every rollout that was running when the gateway stopped."""
        ids = [r.id for r in await self._store.rollouts(running_only=True)]
        for rollout in ids:
            self._start(rollout)
        return ids

    async def wait(self, rollout: str) -> None:
        task = self._running.get(rollout)
        if task is not None:
            await asyncio.wait({task})

    async def status(self) -> list[dict[str, Any]]:
        out = []
        for r in await self._store.rollouts():
            locks = await self._store.locks(r.id)
            out.append(
                {
                    "rollout": r.id,
                    "version": r.version,
                    "state": r.state,
                    "reason": r.reason,
                    "locks": [
                        {
                            "lock": row.lock,
                            "ring": row.ring,
                            "state": row.state,
                            "progress": _pct(row.offset, row.size),
                            "reason": row.reason,
                            "from_version": row.from_version,
                        }
                        for row in locks
                    ],
                }
            )
        return out

    # --- the state machine -------------------------------------------------------------------

    def _start(self, rollout: str) -> None:
        assert self._group is not None, "Rollouts used outside its context"
        if rollout in self._running and not self._running[rollout].done():
            return
        self._running[rollout] = self._group.create_task(self._guarded(rollout), name=f"rollout-{rollout}")

    async def _guarded(self, rollout: str) -> None:
        try:
            await self._run(rollout)
        except asyncio.CancelledError:
            raise
        except FirmwareRefused as exc:  # resumed after its manifest expired or its key went
            await self._store.set_rollout(rollout, "halted", exc.code)
            await self._emit(FirmwareHalted(reason=exc.code, rollout=rollout, detail=str(exc)))
        except Exception as exc:
            log.exception("rollout %s crashed", rollout)
            await self._store.set_rollout(rollout, "halted", f"internal error: {type(exc).__name__}")

    async def _run(self, rollout: str) -> None:
        row = next(r for r in await self._store.rollouts() if r.id == rollout)
        known = await self._store.known()
        checked = self.check(row.manifest, row.image, {})  # keys may have rotated: check again
        locks = await self._store.locks(rollout)
        # At most as many locks at once as the link manager has slots: each goes through its
        # steps (preflight, upload, reset, health, confirm) while the others wait their turn,
        # instead of all of a ring's locks queueing for slots between every step (a lock on its
        # unconfirmed test image waited for dozens of other uploads before its health check).
        active = asyncio.Semaphore(max(1, self._links.occupancy()[1]))

        async def one(lk: LockRow) -> str:
            async with active:
                return await self._one_guarded(checked, row.image, lk, known)

        for ring in sorted({lk.ring for lk in locks}):
            members = [lk for lk in locks if lk.ring == ring]
            results = await asyncio.gather(*(one(lk) for lk in members))
            failed = [
                lk.lock for lk, state in zip(members, results, strict=True) if state in ("reverted", "failed")
            ]
            if failed:
                for lk in locks:
                    if lk.ring > ring and lk.state not in FINAL_STATES:
                        await self._store.set_lock(
                            rollout, lk.lock, state="halted", reason=f"ring {ring} failed"
                        )
                reason = f"ring {ring} failed on {', '.join(failed)}"
                await self._store.set_rollout(rollout, "halted", reason)
                await self._emit(FirmwareHalted(reason=reason, rollout=rollout, ring=ring))
                return
        await self._store.set_rollout(rollout, "done")
        await self._emit(FirmwareDone(rollout=rollout, version=row.version))

    async def _one(self, c: Checked, image: bytes, row: LockRow, known: dict[str, tuple[str, int]]) -> str:  # noqa: C901 - the state machine, one branch per persisted state
        m = c.manifest
        if row.state in FINAL_STATES:
            return row.state
        record = self._lookup(row.lock)
        if record is None:
            return await self._finish(m, row.lock, "refused", "unknown_lock")
        while m.in_quiet_hours(self._clock()) and row.state == "pending":  # noqa: ASYNC110 - a wall-clock condition
            await asyncio.sleep(QUIET_POLL_S)
        try:
            if row.state == "pending":
                if row.lock in known:
                    prior_version, prior_counter = known[row.lock]
                    try:
                        check_upgrade(
                            _info_of(c),
                            running=ImageVersion.parse(prior_version),
                            running_counter=prior_counter,
                        )
                    except FirmwareImageError as exc:
                        return await self._finish(m, row.lock, "refused", exc.code)
                refusal = await self._preflight(m, record, c)
                if refusal is not None:
                    return await self._finish(m, row.lock, "refused", refusal)
                await self._store.set_lock(m.rollout, row.lock, state="uploading")
                row = _with(row, "uploading")
            if row.state == "uploading":
                await self._upload(m, record, image)
                await self._store.set_lock(m.rollout, row.lock, state="uploaded", offset=len(image))
                row = _with(row, "uploaded")
            resumed_testing = row.state == "testing"
            if row.state == "uploaded":
                await self._mark_and_reset(record, c.image_digest)
                await self._store.set_lock(m.rollout, row.lock, state="testing")
                await self._emit(FirmwareTesting(row.lock, m.rollout, str(m.version)))
                row = _with(row, "testing")
            reason = await self._health(m, record, c, may_reset=resumed_testing)
            if reason is None:
                await self._confirm(record)
                await self._store.confirmed(row.lock, str(m.version), c.security_counter)
                if self._on_firmware is not None:
                    await self._on_firmware(row.lock, str(m.version))
                return await self._finish(m, row.lock, "confirmed", "")
            await self._revert(record)
            return await self._finish(m, row.lock, "reverted", reason)
        except _StepFailed as exc:
            return await self._finish(m, row.lock, "failed", exc.reason)

    async def _one_guarded(
        self, c: Checked, image: bytes, row: LockRow, known: dict[str, tuple[str, int]]
    ) -> str:
        """One lock's update; a bug of ours fails that lock (logged), never its ring's others."""
        try:
            return await self._one(c, image, row, known)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("firmware update of %s crashed", row.lock)
            return await self._finish(c.manifest, row.lock, "failed", f"internal error: {type(exc).__name__}")

    async def _finish(self, m: Manifest, lock: str, state: str, reason: str) -> str:
        await self._store.set_lock(m.rollout, lock, state=state, reason=reason)
        await self._emit(_final_event(state, lock, reason, m.rollout, str(m.version)))
        return state

    # --- steps -------------------------------------------------------------------------------

    async def _smp(self, record: LockRecord, request: Any, what: str) -> Any:
        """One SMP request, retried over link failures (a new link each time)."""
        for attempt in range(1, STEP_ATTEMPTS + 1):
            try:
                answer = await self._links.smp(record, request)
            except BleError as exc:
                if attempt == STEP_ATTEMPTS:
                    raise _StepFailed(f"{what}: {exc.code}") from exc
                await asyncio.sleep(min(2.0, 0.2 * attempt))
                continue
            if _m().error(answer):
                raise _StepFailed(f"{what}: lock answered {_describe(answer)}")
            return answer
        raise AssertionError("unreachable")

    async def _command(self, record: LockRecord, op: Op, what: str) -> Any:
        try:
            return await self._links.command(record, op, priority=Priority.HOUSEKEEPING)
        except BleError as exc:
            raise _StepFailed(f"{what}: {exc.code}") from exc

    async def _preflight(self, m: Manifest, record: LockRecord, c: Checked) -> str | None:
        """Battery and running version, read before the upload (None: go ahead)."""
        answer = await self._command(record, Op.STATUS, "status")
        if answer.status is not Status.OK:
            return f"status {answer.status.name.lower()}"
        status = parse_status(answer.result)
        if status.battery_pct < m.min_battery:
            return "battery_low"
        running = _images(await self._smp(record, _m().ImageStatesRead(), "state read"))[0]
        try:
            check_upgrade(_info_of(c), running=ImageVersion.parse(running.version), running_counter=0)
        except FirmwareImageError as exc:
            return exc.code
        await self._store.set_lock(m.rollout, record.lock, from_version=running.version)
        return None

    async def _upload(self, m: Manifest, record: LockRecord, image: bytes) -> None:
        sha = m.image_sha256  # checked against the image (check()): no hashing on the loop per lock
        off, reported, failures = 0, -1, 0
        # A lock that answers without moving forward (stuck at one offset, or sending the
        # gateway back and forth) made this loop endless: both are bounded, with the reason.
        stalls, sent, budget = 0, 0, UPLOAD_BUDGET_X * len(image) + 4096
        while True:
            try:
                buf = await self._buf_size(record)
                request = chunk_request(image, off, sha, buf)
                answer = await self._links.smp(record, request)
            except BleError as exc:
                failures += 1
                if failures >= STEP_ATTEMPTS:
                    raise _StepFailed(f"upload: {exc.code}") from exc
                await asyncio.sleep(min(2.0, 0.2 * failures))
                off = 0  # resume: off 0 with the same SHA answers the lock's offset
                continue
            if not isinstance(answer, _m().img.ImageUploadWriteResponse) or answer.off is None:
                if off == 0 or failures + 1 >= STEP_ATTEMPTS:
                    raise _StepFailed(f"upload: lock answered {_describe(answer)}")
                # Mid-upload the lock lost its upload (it rebooted between two chunks, and the
                # link came back unnoticed): ask again from 0 with the same SHA, as after a drop.
                failures += 1
                off = 0
                continue
            failures = 0
            sent += len(request.data)
            stalls = stalls + 1 if answer.off <= off and request.data else 0
            _check_progress(answer.off, len(image), stalls=stalls, sent=sent, budget=budget)
            off = answer.off
            pct = _pct(off, len(image))
            self.progress[(m.rollout, record.lock)] = pct
            if pct // 25 != reported // 25 or off == len(image):
                reported = pct
                await self._store.set_lock(m.rollout, record.lock, offset=off)
                await self._emit(FirmwareUploading(record.lock, m.rollout, pct, off))
            if off >= len(image):
                if answer.match is False:
                    raise _StepFailed("upload: the lock's SHA-256 of the image does not match")
                return

    async def _buf_size(self, record: LockRecord) -> int:
        smp = self._links.smp_link(record)
        return smp.buf_size if smp is not None and smp.ready else 256

    async def _mark_and_reset(self, record: LockRecord, digest: bytes) -> None:
        if _images(await self._smp(record, _m().ImageStatesRead(), "state read"))[0].hash == digest:
            return  # already swapped in (a reset before a kill): straight to the health check
        await self._smp(record, _m().ImageStatesWrite(hash=digest), "mark for test")
        await self._reset(record)

    async def _reset(self, record: LockRecord) -> None:
        """Reset and wait until the lock has dropped the link (it reboots after answering), so
        nothing asked afterwards can reach the image that is about to be swapped out."""
        with contextlib.suppress(_StepFailed):  # the answer may be lost with the reboot
            await self._smp(record, _m().ResetWrite(), "reset")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(REBOOT_WAIT_S):
                while self._links.link_open(record):  # noqa: ASYNC110 - the link's end has no event here
                    await asyncio.sleep(0.02)
        await self._links.drop(record)  # never reuse a link from before the reboot

    async def _health(self, m: Manifest, record: LockRecord, c: Checked, *, may_reset: bool) -> str | None:  # noqa: C901 - one branch per health criterion
        """None when healthy, else the reason. ``may_reset``: resuming after a stop, when the
        mark for test may have happened without its reset."""
        deadline = time.monotonic() + self._health_timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                states = await self._links.smp(record, _m().ImageStatesRead())
            except BleError as exc:
                last = f"state read: {exc.code}"
                await asyncio.sleep(0.5)
                continue
            if not isinstance(states, _m().img.ImageStatesReadResponse) or not states.images:
                return f"state read: lock answered {_describe(states)}"
            running = states.images[0]
            if running.hash != c.image_digest:
                if may_reset and any(s.pending and s.hash == c.image_digest for s in states.images[1:]):
                    may_reset = False
                    await self._reset(record)  # marked but not yet reset when we stopped
                    continue
                return "new image not running (the bootloader refused it or reverted)"
            if running.confirmed:
                return None  # confirmed already (a confirm before a kill)
            answer = await self._command(record, Op.STATUS, "status")
            if answer.status is not Status.OK:
                return f"status {answer.status.name.lower()}"
            status = parse_status(answer.result)
            if status.battery_pct < max(1, m.min_battery - 10):  # a small drop while updating is fine
                return "battery_not_sane"
            if abs(status.clock - int(self._clock())) > CLOCK_SLACK_S:
                return "clock_not_sane"
            if m.actuation_check and status.state is LockState.LOCKED:
                act = await self._command(record, Op.LOCK, "actuation check")
                if act.status is not Status.OK:
                    return f"actuation check {act.status.name.lower()}"
            return None
        return f"lock did not come back: {last}"

    async def _confirm(self, record: LockRecord) -> None:
        answer = await self._smp(record, _m().ImageStatesWrite(confirm=True), "confirm")
        if not _images(answer)[0].confirmed:
            raise _StepFailed("confirm: the lock did not confirm the image")

    async def _revert(self, record: LockRecord) -> None:
        await self._reset(record)
        deadline = time.monotonic() + self._health_timeout_s
        while time.monotonic() < deadline:
            try:
                await self._links.command(record, Op.STATUS, priority=Priority.HOUSEKEEPING)
            except BleError:
                await asyncio.sleep(0.5)
            else:
                return


@functools.cache
def _m() -> Any:
    """smp and smpclient, loaded on first use: a CLI command that never touches firmware does not
    pay for importing their hundreds of pydantic models (a second or more on a loaded Pi)."""
    from smp import image_management  # noqa: PLC0415 - deferred on purpose (see above)
    from smpclient.generics import error  # noqa: PLC0415 - deferred on purpose (see above)
    from smpclient.requests import image_management as req_img  # noqa: PLC0415 - deferred on purpose
    from smpclient.requests import os_management as req_os  # noqa: PLC0415 - deferred on purpose

    return types.SimpleNamespace(
        img=image_management,
        error=error,
        ImageStatesRead=req_img.ImageStatesRead,
        ImageStatesWrite=req_img.ImageStatesWrite,
        ImageUploadWrite=req_img.ImageUploadWrite,
        ResetWrite=req_os.ResetWrite,
    )


def _check_progress(answered: int, size: int, *, stalls: int, sent: int, budget: int) -> None:
    """Fail the upload step of a lock whose offsets lie: outside the image, or not advancing."""
    if not 0 <= answered <= size:
        raise _StepFailed(f"upload: the lock answered offset {answered}, outside 0..{size}")
    if stalls >= STEP_ATTEMPTS or sent > budget:
        raise _StepFailed(
            f"upload: the lock's offset does not advance (offset {answered} after {sent} bytes "
            f"sent for an image of {size})"
        )


def chunk_request(image: bytes, off: int, sha: bytes, buf_size: int) -> Any:
    """The largest upload request that fits the lock's SMP buffer."""
    first: dict[str, Any] = {"len": len(image), "sha": sha} if off == 0 else {}
    empty = _m().ImageUploadWrite(off=off, data=b"", **first)
    room = buf_size - len(bytes(empty)) - 3  # the data length head grows by at most 3 bytes
    size = max(1, min(room, len(image) - off))
    return _m().ImageUploadWrite(off=off, data=image[off : off + size], **first)


def _images(answer: object) -> list[Any]:
    """The image list of a state answer; a lock that names no running image fails the step."""
    images = getattr(answer, "images", None)
    if (
        not isinstance(images, list)
        or not images
        or not all(isinstance(i, _m().img.ImageState) for i in images)
    ):
        raise _StepFailed("state: the lock reported no running image")
    return images


def _final_event(state: str, lock: str, reason: str, rollout: str, version: str) -> Event:
    """The event of a lock's last step (its final state)."""
    if state == "confirmed":
        return FirmwareConfirmed(lock, rollout, version)
    if state == "reverted":
        return FirmwareReverted(lock, reason, rollout, version)
    if state == "refused":
        return FirmwareRefusedEvent(lock=lock, reason=reason, rollout=rollout, version=version)
    return FirmwareFailed(lock, reason, rollout, version)


def _pct(off: int, size: int) -> int:
    return 100 if size <= 0 else min(100, off * 100 // size)


def _info_of(c: Checked) -> ImageInfo:
    return ImageInfo(c.manifest.version, c.security_counter, c.image_digest, 0, 0, ())


def _with(row: LockRow, state: str) -> LockRow:
    return LockRow(row.rollout, row.lock, row.ring, state, row.offset, row.size, row.reason, row.from_version)


def _describe(answer: object) -> str:
    if isinstance(answer, _m().img.ImageManagementErrorV2):
        return f"{answer.err.rc.name if hasattr(answer.err.rc, 'name') else answer.err.rc}"
    rc = getattr(answer, "rc", None)
    return f"rc {rc}" if rc is not None else type(answer).__name__
