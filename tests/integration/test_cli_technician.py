"""The technician at the door, through the real `lockgw` against `lockgw-sim`: the setup code
never on the command line (a prompt that does not echo, or one line of stdin) and `scan`
showing locks as they are found."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clifix import EXE, Field, default_signals, make_field
from test_cli_field import run_in_terminal

pytestmark = [pytest.mark.ble, pytest.mark.slow]

WITHIN_S = 60.0


@pytest.fixture(scope="module")
def field(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Field]:
    """One field for the module, in order: scans (both locks in pairing mode), then the two
    ways of pairing."""
    f = make_field(Path(tmp_path_factory.mktemp("technician")), gw="gw-tech", seed=52)
    try:
        yield f
    finally:
        f.sim.terminate()
        f.sim.communicate(timeout=10)


def _pair_with_stdin(f: Field, address: str, stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EXE, "--config", str(f.cfg), "pair", address, "--name", "Back door"],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=WITHIN_S,
        check=False,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def test_scan_follow_streams_json_lines_as_locks_are_found(field: Field) -> None:
    proc = subprocess.Popen(
        [*EXE, "--config", str(field.cfg), "--json", "scan", "--follow", "--timeout", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        preexec_fn=default_signals,  # noqa: PLW1509 - the test runs no threads of its own
    )
    try:
        assert proc.stdout is not None
        seen = {}
        while len(seen) < len(field.locks):
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else ""
            row = json.loads(line)
            seen[row["lock"]] = row
        assert proc.poll() is None  # the lines came while it was still scanning
        assert set(seen) == {lock["lock"] for lock in field.locks}
        assert all(r["pairing_mode"] is True for r in seen.values())
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=WITHIN_S)
        assert proc.returncode == 0 and "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


def test_scan_on_a_terminal_fills_a_live_table_and_plain_json_stays_one_object(field: Field) -> None:
    rc, shown = run_in_terminal(field, "scan", "--timeout", "2")
    assert rc == 0 and "locks in range" in shown, shown
    assert all(lock["lock"] in shown for lock in field.locks), shown
    once = json.loads(field.run("--json", "scan", "--timeout", "1.5").stdout)
    assert {r["lock"] for r in once["locks"]} == {lock["lock"] for lock in field.locks}


def test_pair_reads_the_setup_code_from_one_line_of_stdin(field: Field) -> None:
    lock = field.locks[0]
    empty = _pair_with_stdin(field, lock["address"], "")
    assert empty.returncode == 2 and "no setup code" in empty.stderr and "Traceback" not in empty.stderr
    huge = _pair_with_stdin(field, lock["address"], "9" * 5000 + "\n")
    assert huge.returncode == 2 and "longer than" in huge.stderr
    proc = _pair_with_stdin(field, lock["address"], lock["setup_code"] + "\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == lock["lock"]  # the id alone: L=$(lockgw pair A < code)
    assert lock["setup_code"] not in proc.stdout + proc.stderr


def test_pair_on_a_terminal_asks_for_the_code_and_does_not_echo_it(field: Field) -> None:
    lock = field.locks[1]
    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TERM": "xterm-256color"}
    proc = subprocess.Popen(
        [*EXE, "--config", str(field.cfg), "pair", lock["address"]],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        preexec_fn=default_signals,  # noqa: PLW1509 - the test runs no threads of its own
    )
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + WITHIN_S
    typed = False
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            seen += data
        if not typed and b"setup code" in seen:
            os.write(master, lock["setup_code"].encode() + b"\r")
            typed = True
        if typed and proc.poll() is not None:
            break
    os.close(master)
    assert proc.wait(timeout=WITHIN_S) == 0, seen.decode(errors="replace")
    shown = seen.decode(errors="replace")
    assert typed and lock["lock"] in shown
    assert lock["setup_code"] not in shown  # not echoed, not printed


# The unreachable lock's one message: tests/integration/test_cli_field.py (a lock out of range).
