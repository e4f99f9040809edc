"""Firmware rollout on the running daemon: `lockgw firmware apply` through the control socket to
`lockgw run`, a simulated lock in a `lockgw-sim` process with SMP enabled (`--firmware-key`), and
a real kill -9 of the daemon in the middle of the upload: the restarted daemon resumes from the
lock's offset, the lock ends on the new image, confirmed, and the outbox holds the rollout's
events in order, with no gap.

Kept fast for the default suite: a 12 kB image, three CLI processes (trust install, pair,
apply) and one for the refusal while the daemon is down; every wait is on the outbox (the
events themselves) or the simulator's answer, none is a fixed sleep.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from clifix import Field, make_field, start_daemon
from fwfix import FirmwareKey, firmware_keyring, shared_firmware_key, signed_image, signed_manifest

from gateway.runtime.control import call
from protocols.cose import PrivateCoseKey

pytestmark = [pytest.mark.ble, pytest.mark.slow]

Events = list[dict[str, Any]]


def _firmware_key(tmp: Path) -> tuple[FirmwareKey, PrivateCoseKey]:
    key, cose = shared_firmware_key()
    key.imgtool_key.export_public(str(tmp / "boot.pem"))  # the simulated bootloader's key
    return key, cose


def _outbox(tmp: Path) -> Events:
    """Every event in the outbox, by seq (read-only: the daemon may be writing)."""
    path = tmp / "data" / "events.sqlite3"
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        rows = db.execute("SELECT seq, json FROM events ORDER BY seq").fetchall()
    except sqlite3.OperationalError:  # not created yet
        return []
    finally:
        db.close()
    return [{"seq": seq, **json.loads(text)} for seq, text in rows]


def _wait_outbox(tmp: Path, predicate: Callable[[Events], bool], what: str, timeout: float = 60) -> Events:
    deadline = time.monotonic() + timeout
    events: Events = []
    while time.monotonic() < deadline:
        events = _outbox(tmp)
        if predicate(events):
            return events
        time.sleep(0.01)  # a poll of the daemon's own record, not a wait for time to pass
    pytest.fail(f"{what}: {[(e['type'], e.get('data')) for e in events if e['type'].startswith('firmware')]}")


def _sim(f: Field, lock: str, fault: str, value: object = None) -> dict[str, Any]:
    """One simulator command and its whole answer (``fw_stats``: the lock's SMP side)."""
    assert f.sim.stdin is not None and f.sim.stdout is not None
    f.sim.stdin.write(json.dumps({"lock": lock, "fault": fault, "value": value}) + "\n")
    f.sim.stdin.flush()
    answer: dict[str, Any] = json.loads(f.sim.stdout.readline())
    assert answer["ok"] is True, answer
    return answer


def _progress(events: Events) -> list[int]:
    return [e["data"]["progress"] for e in events if e["type"] == "firmware.uploading"]


def test_kill_9_mid_rollout_resumes_and_confirms(tmp_path: Path) -> None:
    key, cose = _firmware_key(tmp_path)
    f = make_field(tmp_path, gw="gw-fw", seed=61, sim_args=("--firmware-key", str(tmp_path / "boot.pem")))
    try:
        now = int(time.time())
        (tmp_path / "keyring.cose").write_bytes(  # make_field's keyring, plus the firmware key
            firmware_keyring(
                f.w.root, f.w.issuer_a.public, cose.public, site="site-a", now=now, version=1, iat_ago=10
            )
        )
        f.run("trust", "install", str(tmp_path / "keyring.cose"))
        lock = f.run("pair", f.locks[0]["address"], "--code", f.locks[0]["setup_code"]).stdout.strip()
        # 13 upload chunks of ~1 KB, 80 ms of flash writing each: long enough to be killed in.
        _sim(f, lock, "fw_flash_delay", 0.08)
        image = signed_image(key, "1.1.0", security_counter=2, size=12000)
        (tmp_path / "app.bin").write_bytes(image)
        (tmp_path / "manifest.cose").write_bytes(signed_manifest(cose, image, [lock], site="site-a"))
        daemon = start_daemon(f)
        try:
            started = f.run(
                "--json", "firmware", "apply", str(tmp_path / "manifest.cose"), str(tmp_path / "app.bin")
            )
            assert json.loads(started.stdout)["rings"] == [[lock]]
            _wait_outbox(tmp_path, lambda ev: any(p >= 25 for p in _progress(ev)), "upload under way")
        finally:
            daemon.proc.send_signal(signal.SIGKILL)
            daemon.proc.wait(timeout=10)
        before = _sim(f, lock, "fw_stats")
        reached, sent_before = before["upload_off"], before["handled"]["upload"]
        assert reached is not None and 0 < reached < len(image), before  # killed mid-upload
        assert before["boots"] == [] and before["running"] == "1.0.0"
        # Refused before any radio work, daemon or not: a tampered image.
        bad = bytearray(image)
        bad[200] ^= 1
        (tmp_path / "bad.bin").write_bytes(bytes(bad))
        refused = f.run(
            "firmware", "apply", str(tmp_path / "manifest.cose"), str(tmp_path / "bad.bin"), ok=False
        )
        assert refused.returncode == 1 and "firmware_refused" in refused.stderr
        daemon = start_daemon(f)
        try:
            events = _wait_outbox(
                tmp_path,
                lambda ev: any(e["type"] in {"firmware.done", "firmware.halted"} for e in ev),
                "rollout finished",
            )
            locks = asyncio.run(call(tmp_path / "ctl.sock", "locks", {}))
            [view] = locks["data"]["locks"]
            assert view["firmware"] == "sim-1.1.0"  # the lock state follows
        finally:
            assert daemon.stop() == 0
        after = _sim(f, lock, "fw_stats")
        assert after["running"] == "1.1.0" and after["confirmed"] and after["security_counter"] == 2
        assert after["boots"] == ["swapped_test"]
        # Resumed from the lock's offset: only the rest of the image went over the air again.
        chunk = 1024 - 40
        assert after["handled"]["upload"] - sent_before <= (len(image) - reached) // chunk + 3, (
            before,
            after,
        )
        _check_outbox(_outbox(tmp_path), lock)
        assert events == _outbox(tmp_path)[: len(events)]
    finally:
        f.sim.terminate()
        f.sim.communicate(timeout=10)


def _check_outbox(events: Events, lock: str) -> None:
    """Gapless, and the rollout's story in order: staged, uploading (each quarter, progress
    never going back across the kill), the tampered image's refusal while the daemon was down,
    uploading again, testing, confirmed, done — nothing failed, reverted or halted."""
    assert [e["seq"] for e in events] == list(range(events[0]["seq"], events[0]["seq"] + len(events)))
    firmware = [e for e in events if e["type"].startswith("firmware.")]
    types = [e["type"] for e in firmware]
    stages = [t for i, t in enumerate(types) if i == 0 or t != types[i - 1]]
    assert stages == [
        "firmware.staged",
        "firmware.uploading",
        "firmware.refused",
        "firmware.uploading",
        "firmware.testing",
        "firmware.confirmed",
        "firmware.done",
    ], types
    [refusal] = [e for e in firmware if e["type"] == "firmware.refused"]
    assert refusal["lock"] is None and refusal["reason"] in {"image_mismatch", "bad_hash"}, refusal
    progress = _progress(events)
    assert progress == sorted(progress) and progress[-1] == 100, progress
    assert {p // 25 for p in progress} == {0, 1, 2, 3, 4}, progress  # no quarter skipped
    per_lock = [
        e for e in firmware if e["type"] not in {"firmware.staged", "firmware.refused", "firmware.done"}
    ]
    assert all(e["lock"] == lock for e in per_lock), per_lock
    assert [e["type"] for e in events].count("gateway.started") == 2  # killed once, restarted
