"""Firmware rollout on the running daemon: `lockgw firmware apply` through the control socket to
`lockgw run`, simulated locks in a `lockgw-sim` process with SMP enabled (`--firmware-key`), and
a kill -9 of the daemon in the middle of the upload: the restarted daemon resumes.

About a minute on a loaded 2-core machine (a dozen CLI processes), so it runs with
``LOCKGW_FIRMWARE_DAEMON=1``; the default suite has the reduced version
(tests/integration/test_firmware_rollout.py::test_a_stopped_gateway_resumes_the_upload_from_the_locks_offset).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from clifix import make_field, start_daemon
from fwfix import FirmwareKey, shared_firmware_key, signed_image, signed_manifest

from protocols import issuer
from protocols.cose import PrivateCoseKey

pytestmark = [
    pytest.mark.ble,
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("LOCKGW_FIRMWARE_DAEMON") != "1", reason="set LOCKGW_FIRMWARE_DAEMON=1"
    ),
]


def _firmware_key(tmp: Path) -> tuple[FirmwareKey, PrivateCoseKey]:
    key, cose = shared_firmware_key()
    key.imgtool_key.export_public(str(tmp / "boot.pem"))  # the simulated bootloader's key
    return key, cose


def _status(f) -> dict:
    print("status at", time.strftime("%X"))
    out = f.run("--json", "firmware", "status")
    return json.loads(out.stdout)


def _wait(f, predicate, what: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _status(f)
        if predicate(status):
            return status
        time.sleep(0.2)
    pytest.fail(f"{what}: {status}")


def test_kill_9_mid_rollout_resumes_and_confirms(tmp_path: Path) -> None:
    key, cose = _firmware_key(tmp_path)
    f = make_field(tmp_path, gw="gw-fw", seed=61, sim_args=("--firmware-key", str(tmp_path / "boot.pem")))
    try:
        now = int(time.time())
        (tmp_path / "keyring.cose").write_bytes(  # make_field's keyring, plus the firmware key
            issuer.keyring(
                f.w.root,
                site="site-a",
                version=1,
                iat=now - 10,
                exp=now + 90 * 86400,
                entries=[
                    issuer.KeyringEntry(f.w.issuer_a.public, now - 86400, now + 60 * 86400, ["staff"]),
                    issuer.KeyringEntry(cose.public, now - 86400, now + 60 * 86400, ["firmware"]),
                ],
            )
        )
        f.run("trust", "install", str(tmp_path / "keyring.cose"))
        lock = f.run("pair", f.locks[0]["address"], "--code", f.locks[0]["setup_code"]).stdout.strip()
        f.fault(lock, "fw_flash_delay", 0.03)
        image = signed_image(key, "1.1.0", security_counter=2, size=16000)
        (tmp_path / "app.bin").write_bytes(image)
        (tmp_path / "manifest.cose").write_bytes(signed_manifest(cose, image, [lock], site="site-a"))
        daemon = start_daemon(f)
        try:
            started = f.run(
                "--json", "firmware", "apply", str(tmp_path / "manifest.cose"), str(tmp_path / "app.bin")
            )
            assert json.loads(started.stdout)["rings"] == [[lock]]
            _wait(f, lambda s: s["rollouts"][0]["locks"][0]["progress"] >= 25, "upload under way")
        finally:
            daemon.proc.send_signal(signal.SIGKILL)
            daemon.proc.wait(timeout=10)
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
            done = _wait(f, lambda s: s["rollouts"][0]["state"] != "running", "rollout finished", timeout=180)
            assert done["rollouts"][0]["state"] == "done", done
            assert {lk["state"] for lk in done["rollouts"][0]["locks"]} == {"confirmed"}
            [view] = json.loads(f.run("--json", "locks").stdout)["locks"]
            assert view["firmware"] == "sim-1.1.0"  # the lock state follows
        finally:
            daemon.stop()
        db = sqlite3.connect(f"file:{tmp_path / 'data' / 'events.sqlite3'}?mode=ro", uri=True)
        try:
            events = [json.loads(r[0]) for r in db.execute("SELECT json FROM events ORDER BY seq")]
        finally:
            db.close()
        types = [e["type"] for e in events]
        assert types.count("firmware.staged") == 1 and types.count("firmware.confirmed") == 1
        assert "firmware.done" in types
        # The upload resumed from the lock's offset: its progress never went back after the kill.
        progress = [e["data"]["progress"] for e in events if e["type"] == "firmware.uploading"]
        assert progress == sorted(progress) and progress[-1] == 100
    finally:
        f.sim.terminate()
        f.sim.communicate(timeout=10)
