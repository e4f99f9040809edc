"""The daemon always wins the data directory (issue: fail-safe core §6).

A technician's `lockgw events --follow` running without a daemon (direct mode) must never keep
`lockgw run` from starting: under systemd that would keep every door's gateway down. Readers
take no lock; commands that drive the adapter or write events hold it for their few seconds.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from clifix import EXE, Field, default_signals, start_daemon

pytestmark = [pytest.mark.ble, pytest.mark.slow]


def test_F6_a_direct_mode_follower_never_keeps_the_daemon_from_starting(field: Field) -> None:
    field.run("trust", "install", str(field.tmp / "keyring.cose"))
    log = field.tmp / "follower.log"
    with log.open("wb") as out:
        follower = subprocess.Popen(
            [*EXE, "--config", str(field.cfg), "--json", "events", "--follow"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
            preexec_fn=default_signals,  # noqa: PLW1509 - the tests run no threads of their own
        )
    try:
        deadline = time.monotonic() + 60
        while "trust.installed" not in log.read_text(errors="replace"):  # it reads the store
            assert follower.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        daemon = start_daemon(field)  # fails the test if the daemon exits ("in use by …")
        try:
            assert follower.poll() is None  # and the reader runs on beside it
        finally:
            assert daemon.stop() == 0, daemon.output()
    finally:
        follower.terminate()
        follower.wait(timeout=20)
