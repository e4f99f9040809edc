"""The simulator's state files: the only place firmware_sim writes to disk.

Two per lock under ``--state DIR``: ``lock-N.json`` (the lock model, :class:`LockStore`) and,
with SMP enabled, ``lock-N.mcuboot.cbor`` (the bootloader's flash: both slots, the image flags,
the security counter — :class:`BootStore`).

:class:`~firmware_sim.lock_model.LockModel` is pure; each durable change raises its
``revision``. A :class:`LockStore` holds one lock's state file and writes the model's snapshot
when the file is behind (:meth:`LockStore.sync`). The link driver syncs before anything leaves
for the gateway, so a lock never answers about an actuation or a log entry that is not on disk
(THREATS D1/D11); a write that fails leaves the old file whole (THREATS D9).

:func:`write_atomic` is the gateway's (``gateway/authz/keyfiles.py``), repeated here because
the simulator shares only ``protocols/`` with the gateway.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import cbor2

from firmware_sim.lock_model import LockModel
from firmware_sim.smp_server import McuBoot

__all__ = ["BootStore", "LockStore", "write_atomic"]


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Temp file, fsync, rename, fsync of the directory (THREATS D9).

    A short write is continued, not taken for the whole; when anything fails the temp file is
    removed and the old file, if any, is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]  # a short write is not an error
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class LockStore:
    """One lock's state file (JSON, mode 0600: it holds the pairing key). One store per model."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._written: int | None = None  # the model revision the file holds; None: unknown

    def load_or_create(self, lock_id: str, setup_code: str, name: str = "") -> LockModel:
        """The lock the file describes, or a factory-fresh one written to a new file."""
        if self.path.exists():
            model = LockModel.from_json(json.loads(self.path.read_text()))
            self._written = model.revision
            return model
        model = LockModel(lock_id=lock_id, setup_code=setup_code, name=name)
        self.save(model)
        return model

    def behind(self, model: LockModel) -> bool:
        """Whether the model changed since the file was last written."""
        return model.revision != self._written

    def sync(self, model: LockModel) -> None:
        """Write the model if the file is behind it; a no-op otherwise."""
        if self.behind(model):
            self.save(model)

    def save(self, model: LockModel) -> None:
        """Write the model's snapshot now. On failure the file keeps the previous snapshot and
        stays behind, so the next :meth:`sync` tries again."""
        revision = model.revision
        write_atomic(self.path, json.dumps(model.to_json(), indent=1).encode())
        self._written = revision


class BootStore:
    """One lock's bootloader state file (CBOR: the slots are bytes). :meth:`sync` writes it,
    atomically, whenever the durable state (:meth:`McuBoot.durable`) differs from the file's:
    after an SMP request that changed it and before its answer leaves, and at each boot — so
    a restarted simulator is on the image it confirmed, with its security counter, and an image
    pending when it stopped is swapped in at the next boot, as MCUboot does after a power cut."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._written: dict[str, Any] | None = None

    def load(self, boot: McuBoot) -> bool:
        """Restore ``boot`` from the file (False: no file yet). ValueError on a file that is
        not a bootloader state."""
        if not self.path.exists():
            return False
        try:
            state = cbor2.loads(self.path.read_bytes())
        except (cbor2.CBORDecodeError, ValueError) as exc:
            raise ValueError(f"{self.path}: not a bootloader state file ({exc})") from exc
        try:
            boot.restore(state)
        except ValueError as exc:
            raise ValueError(f"{self.path}: {exc}") from exc
        self._written = boot.durable()
        return True

    def sync(self, boot: McuBoot) -> bool:
        """Write the state if the file is behind it; whether it wrote. On failure (OSError) the
        file keeps the previous state and stays behind."""
        state = boot.durable()
        if state == self._written:
            return False
        write_atomic(self.path, cbor2.dumps(state))
        self._written = state
        return True
