"""THREATS D8 at the service level: a disk filled to the last byte must not stop doors opening.

A real full file system (a small tmpfs mounted for the test; CI runs as root), the real outbox,
trust store and registry on it, simulated locks over the Bumble stack. The outbox's reserve is
released on the first ENOSPC, the alarm is raised, and every decision is still recorded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_service import build_rig

from gateway.store.outbox import RESERVE_BYTES
from protocols.event_encoding import verify_chain

pytestmark = [pytest.mark.ble]


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path) -> int:
    """Write until the file system refuses another byte; return how many were written."""
    written = 0
    with path.open("wb", buffering=0) as fh:
        for size in (1 << 20, 1 << 12, 1):
            chunk = b"\xff" * size
            with contextlib.suppress(OSError):
                while True:
                    written += fh.write(chunk)
    return written


async def test_D8_doors_open_on_a_full_disk_with_an_alarm_and_every_event(tiny_disk: Path) -> None:
    # A watermark of 12 MB on the 24 MB disk (8 MB of it the reserve), free space checked after
    # every commit.
    async with build_rig(tiny_disk, locks=1, low_space_bytes=12 << 20, space_check_s=0) as rig:
        lock = rig.locks[0].model.lock_id
        assert (await rig.unlock(lock))["status"] == "ok"
        assert (tiny_disk / "reserve.bin").exists()
        assert not rig.svc.outbox.alarms
        assert fill(tiny_disk / "filler") > 0
        with pytest.raises(OSError):
            (tiny_disk / "probe").write_bytes(b"x" * 4096)
        # The disk is full: the door still opens, the reserve is spent on the record of it.
        resp = await rig.unlock(lock)
        assert resp["status"] == "ok", resp
        assert rig.svc.outbox.alarms == {"disk_full", "disk_low"}
        assert not (tiny_disk / "reserve.bin").exists()
        # The released reserve carries a long shift of decisions, refusals included.
        for _ in range(25):
            assert (await rig.unlock(lock))["status"] == "ok"
        denied = await rig.unlock(lock, token=rig.w.token(locks=["lk-other"]))
        assert denied["status"] == "error" and denied["error"]["code"] == "wrong_lock"
        events = await rig.events()
        verify_chain(events)
        types = [e["type"] for e in events]
        assert types.count("access.granted") == types.count("lock.unlocked") == 27
        assert types[-1] == "access.denied"
        assert rig.svc.outbox.healthy
        # Space comes back (the technician cleans up): everything carries on, the reserve is
        # made again and both alarms clear.
        (tiny_disk / "filler").unlink()
        assert (await rig.unlock(lock))["status"] == "ok"
        verify_chain(await rig.events())
        assert not rig.svc.outbox.alarms
        assert (tiny_disk / "reserve.bin").stat().st_size == RESERVE_BYTES
