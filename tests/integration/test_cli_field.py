"""The CLI as people meet it: a terminal versus a pipe, a lock out of range, secrets in the config,
shell completion, and the event filters. Drives the installed `lockgw` against `lockgw-sim`."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest
from clifix import EXE, Field, default_signals, ignoring_signals, start_daemon

pytestmark = [pytest.mark.ble, pytest.mark.slow]

ESC = "\x1b["


def run_in_terminal(f: Field, *args: str, timeout: float = 60) -> tuple[int, str]:
    """Run the CLI with stdout and stderr on a pseudo-terminal; return its exit code and output."""
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "TERM")}
    env |= {"TERM": "xterm-256color", "COLUMNS": "160", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [*EXE, "--config", str(f.cfg), *args], stdout=slave, stderr=slave, stdin=subprocess.DEVNULL, env=env
    )
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    rc = proc.wait(timeout=timeout)
    return rc, b"".join(chunks).decode("utf-8", "replace")


def pair(f: Field, lock: dict[str, str]) -> None:
    f.run("pair", lock["address"], "--code", lock["setup_code"], "--name", "Front door")
    f.run("trust", "install", str(f.tmp / "keyring.cose"))


def test_terminal_gets_tables_and_colour_a_pipe_gets_plain_text(field: Field) -> None:
    lock = field.locks[0]
    pair(field, lock)
    rc, shown = run_in_terminal(field, "locks")
    assert rc == 0 and ESC in shown and "┃" in shown and "Front door" in shown
    piped = field.run("locks").stdout
    assert ESC not in piped and "┃" not in piped
    header, row = piped.splitlines()[:2]
    assert header.split()[:3] == ["LOCK", "NAME", "STATE"] and row.startswith(lock["lock"])
    # Events: colour and a receipt mark on a terminal; tags in brackets when piped.
    rc, shown = run_in_terminal(field, "events")
    assert rc == 0 and ESC in shown and "┃" in shown and "lock.paired" in shown
    plain = field.run("events").stdout
    assert ESC not in plain and "lock.paired" in plain
    # NO_COLOR on a terminal: layout stays, colour goes.
    master_env = os.environ.get("NO_COLOR")
    try:
        os.environ["NO_COLOR"] = "1"
        proc = field.run("--json", "locks")
        assert json.loads(proc.stdout)["locks"][0]["lock"] == lock["lock"]
    finally:
        if master_env is None:
            os.environ.pop("NO_COLOR", None)
    # Errors on a terminal are still plain words a person can read, with the exit code intact.
    rc, shown = run_in_terminal(field, "status", "lk-nope")
    assert rc == 2 and "unknown_lock" in shown and "Traceback" not in shown


def test_flagged_events_are_tagged_and_filters_narrow_history(field: Field) -> None:
    lock = field.locks[0]
    pair(field, lock)
    field.act("unlock", lock["lock"])
    field.act("unlock", lock["lock"], proof=False, ok=None)  # no proof
    everything = json.loads(field.run("--json", "events").stdout)
    assert (
        everything["last_seq"] == everything["events"][-1]["seq"]
        and everything["next"] > everything["last_seq"]
    )
    access = json.loads(field.run("--json", "events", "--type", "access.*").stdout)["events"]
    assert [e["type"] for e in access] == ["access.granted", "access.denied"]
    only_denied = json.loads(field.run("--json", "events", "--type", "access.denied").stdout)["events"]
    assert len(only_denied) == 1 and only_denied[0]["reason"] == "proof_required"
    by_lock = json.loads(field.run("--json", "events", "--lock", lock["lock"]).stdout)["events"]
    assert by_lock and all(e["lock"] == lock["lock"] for e in by_lock)
    assert json.loads(field.run("--json", "events", "--sub", "nobody").stdout)["events"] == []
    recent = json.loads(field.run("--json", "events", "--from", "1h").stdout)["events"]
    assert len(recent) == len(everything["events"])
    assert json.loads(field.run("--json", "events", "--until", "1h").stdout)["events"] == []
    assert json.loads(field.run("--json", "events", "--from", "2100-01-01").stdout)["events"] == []
    limited = json.loads(field.run("--json", "events", "--limit", "2").stdout)
    assert len(limited["events"]) == 2 and limited["next"] == limited["events"][-1]["seq"] + 1
    bad = field.run("events", "--type", "access.[a]*", ok=None)
    assert bad.returncode == 2 and "type" in bad.stderr
    # Flagged decisions carry tags in plain output (this machine's clock is not NTP-synchronised
    # in CI, so decisions are flagged time:unknown or time:holdover; on a synced clock, none).
    plain = field.run("events", "--type", "access.granted").stdout
    granted = everything["events"][[e["type"] for e in everything["events"]].index("access.granted")]
    if granted["time_state"] != "synced":
        assert f"[time:{granted['time_state']}]" in plain
    else:
        assert "[time:" not in plain


def test_lock_out_of_range_is_a_clear_failure_then_recovers(field: Field) -> None:
    lock = field.locks[0]
    pair(field, lock)
    field.fault(lock["lock"], "range", "out")
    gone = field.act("unlock", lock["lock"], ok=None)
    assert gone.returncode == 1 and "lock_unreachable" in gone.stderr, gone.stderr
    # Said once: what was tried and what to do; no retry warnings around it (issue 12).
    assert gone.stderr.count("did not answer") == 1 and "connection attempts over" in gone.stderr
    assert "within range of the gateway" in gone.stderr and '"level"' not in gone.stderr, gone.stderr
    failed = json.loads(field.run("--json", "events", "--type", "access.failed").stdout)["events"]
    assert failed and failed[-1]["reason"] == "lock_unreachable"
    state = json.loads(field.run("--json", "locks").stdout)["locks"][0]
    assert state["available"] is False
    field.fault(lock["lock"], "range", "in")
    back = field.act("unlock", lock["lock"], "--json")
    assert json.loads(back.stdout)["data"]["state"] == "unlocked"


def test_B13_config_check_names_key_and_line_and_never_prints_secrets(field: Field, tmp_path: Path) -> None:
    secret = "hunter2-very-secret"
    pw = tmp_path / "mqtt.pass"
    pw.write_text(secret)
    pw.chmod(0o600)
    base = field.cfg.read_text()
    good = tmp_path / "good.toml"
    good.write_text(base + f'[mqtt]\nurl = "mqtt://127.0.0.1:1"\nusername = "gw"\npassword_file = "{pw}"\n')
    for args in (["config", "check", str(good)], ["--json", "config", "check", str(good)]):
        proc = field.run(*args)
        assert secret not in proc.stdout + proc.stderr
    inline = tmp_path / "inline.toml"
    inline.write_text(base + f'[mqtt]\nurl = "mqtt://127.0.0.1:1"\npassword = "{secret}"\n')
    proc = field.run("config", "check", str(inline), ok=None)
    line = base.count("\n") + 3
    assert proc.returncode == 2 and f"inline.toml:{line}: mqtt.password" in proc.stderr
    assert "password_file" in proc.stderr and secret not in proc.stdout + proc.stderr
    in_url = tmp_path / "url.toml"
    in_url.write_text(base + f'[mqtt]\nurl = "mqtt://gw:{secret}@127.0.0.1:1"\n')
    proc = field.run("config", "check", str(in_url), ok=None)
    assert proc.returncode == 2 and "mqtt.url" in proc.stderr and secret not in proc.stdout + proc.stderr
    pw.chmod(0o644)
    proc = field.run("config", "check", str(good), ok=None)
    assert proc.returncode == 2 and "mqtt.password_file" in proc.stderr and secret not in proc.stderr
    proc = field.run("--json", "config", "check", str(good), ok=None)
    assert json.loads(proc.stdout)["code"] == "config_error" and secret not in proc.stdout
    pw.chmod(0o600)
    proc = field.run("--config", str(good), "--json", "doctor", ok=None)
    assert secret not in proc.stdout + proc.stderr


def test_shell_completion_scripts_and_lock_ids(field: Field) -> None:
    lock = field.locks[0]
    pair(field, lock)
    for shell in ("bash", "zsh", "fish"):
        assert "_LOCKGW_COMPLETE" in field.run("completion", shell).stdout
    env = {
        **os.environ,
        "_LOCKGW_COMPLETE": "bash_complete",
        "COMP_WORDS": "lockgw unlock lk-",
        "COMP_CWORD": "2",
        "LOCKGW_CONFIG": str(field.cfg),
        "PYTHONWARNINGS": "ignore",
    }
    proc = subprocess.run(EXE, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert f"plain,{lock['lock']}" in proc.stdout.splitlines()
    env |= {"COMP_WORDS": "lockgw ev", "COMP_CWORD": "1"}
    proc = subprocess.run(EXE, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert "plain,events" in proc.stdout.splitlines()


def test_a_lock_paired_elsewhere_is_refused_with_a_clear_message(field: Field, tmp_path: Path) -> None:
    lock = field.locks[1]
    field.run("pair", lock["address"], "--code", lock["setup_code"])
    other = tmp_path / "other.toml"
    other.write_text(
        field.cfg.read_text()
        .replace('id = "gw-cli"', 'id = "gw-other"')
        .replace(str(field.tmp / "data"), str(tmp_path / "other-data"))
        .replace(str(field.tmp / "ctl.sock"), str(tmp_path / "other.sock"))
    )
    # The technician presses the pairing button on a lock that belongs to another gateway.
    field.fault(lock["lock"], "pairing_mode")
    proc = field.run("--config", str(other), "pair", lock["address"], "--code", lock["setup_code"], ok=None)
    assert proc.returncode == 1 and "paired with another gateway" in proc.stderr, proc.stderr
    scan = json.loads(field.run("--config", str(other), "--json", "scan", "--timeout", "1").stdout)["locks"]
    seen = {s["lock"]: s for s in scan}
    assert seen[lock["lock"]]["paired"] is True and seen[lock["lock"]]["paired_here"] is False


def test_events_follow_through_the_daemon_streams_json_lines_and_ends_on_ctrl_c(field: Field) -> None:
    lock = field.locks[0]
    pair(field, lock)
    daemon = start_daemon(field)
    follower: subprocess.Popen[str] | None = None
    try:
        last = json.loads(field.run("--json", "events").stdout)["last_seq"]
        follower = subprocess.Popen(
            [*EXE, "--config", str(field.cfg), "--json", "events", "--follow", "--type", "access.*"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
            preexec_fn=default_signals,  # noqa: PLW1509 - however this test run was started
        )
        field.act("unlock", lock["lock"])
        field.act("unlock", lock["lock"], proof=False, ok=None)
        assert follower.stdout is not None
        seen = [json.loads(follower.stdout.readline()) for _ in range(2)]
        assert [e["type"] for e in seen] == ["access.granted", "access.denied"]
        assert all(e["seq"] > last for e in seen)
        follower.send_signal(signal.SIGINT)
        _, err = follower.communicate(timeout=20)
        assert follower.returncode == 0 and "Traceback" not in err
    finally:
        if follower is not None and follower.poll() is None:
            follower.kill()
            follower.communicate(timeout=10)
        stopped = daemon.stop()
    assert stopped == 0, daemon.output()


def started_ignoring_signals(f: Field, *args: str) -> subprocess.Popen[str]:
    """The CLI as ``nohup lockgw … &`` starts it: SIGHUP, SIGINT, SIGQUIT (and here SIGTERM) ignored."""
    return subprocess.Popen(
        [*EXE, "--config", str(f.cfg), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        preexec_fn=ignoring_signals,  # noqa: PLW1509 - the tests run no threads of their own
    )


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_events_follow_ends_cleanly_on_a_signal_it_inherited_as_ignored(
    field: Field, sig: signal.Signals
) -> None:
    field.run("trust", "install", str(field.tmp / "keyring.cose"))
    follower = started_ignoring_signals(field, "--json", "events", "--follow")
    try:
        assert follower.stdout is not None
        assert json.loads(follower.stdout.readline())["type"] == "trust.installed"  # following now
        follower.send_signal(sig)
        out, err = follower.communicate(timeout=20)
        assert follower.returncode == 0 and "Traceback" not in err, err
        assert out == ""  # nothing half-written after the signal
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.communicate(timeout=10)
    # The direct follower held the data directory; it let go as it ended.
    assert json.loads(field.run("--json", "events").stdout)["events"][0]["type"] == "trust.installed"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_the_daemon_stops_cleanly_on_a_signal_it_inherited_as_ignored(
    field: Field, sig: signal.Signals
) -> None:
    daemon = start_daemon(field, preexec=ignoring_signals)
    try:
        daemon.proc.send_signal(sig)
        assert daemon.proc.wait(timeout=30) == 0, daemon.output()
    finally:
        daemon.stop()
    assert json.loads(field.run("--json", "events").stdout)["events"][-1]["type"] == "gateway.stopping"


@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["plain", "json"])
def test_a_long_command_stopped_by_sigterm_says_so_and_exits_143(field: Field, json_flag: list[str]) -> None:
    scan = started_ignoring_signals(field, *json_flag, "scan", "--timeout", "60")
    try:
        assert scan.stderr is not None
        assert scan.stderr.readline().startswith("scanning for 60 s")  # inside the command now
        scan.send_signal(signal.SIGTERM)
        out, err = scan.communicate(timeout=20)  # well before the 60 s scan would end
        assert scan.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
        assert "stopped by SIGTERM" in err
        if json_flag:
            assert json.loads(out) == {"error": "stopped by SIGTERM", "code": "failed"}
    finally:
        if scan.poll() is None:
            scan.kill()
            scan.communicate(timeout=10)
    field.run("--json", "locks")  # the data directory is free again


def test_lock_status_and_unpair_on_both_ends_or_forced(field: Field) -> None:
    first, second = field.locks
    pair(field, first)
    field.run("pair", second["address"], "--code", second["setup_code"])
    out = field.act("lock", first["lock"])
    assert out.stdout.startswith(f"{first['lock']}: locked")
    every = json.loads(field.run("--json", "status").stdout)["locks"]
    assert {s["lock"] for s in every} == {first["lock"], second["lock"]}
    assert all(s["available"] is True for s in every)
    # Unpair on both ends: the lock forgets the gateway (scan shows it unpaired again).
    assert field.run("unpair", first["lock"]).stdout.strip() == f"unpaired {first['lock']}"
    scan = {s["lock"]: s for s in json.loads(field.run("--json", "scan", "--timeout", "1").stdout)["locks"]}
    assert scan[first["lock"]]["paired"] is False and scan[first["lock"]]["paired_here"] is False
    assert field.run("unpair", first["lock"], ok=None).returncode == 2  # no longer known here
    # A lock gone for good: plain unpair fails and says what to do; --force forgets it, recorded.
    field.fault(second["lock"], "range", "out")
    gone = field.run("unpair", second["lock"], ok=None)
    assert gone.returncode == 1 and "--force" in gone.stderr, gone.stderr
    field.run("unpair", second["lock"], "--force")  # one connection attempt, not the retry run
    assert json.loads(field.run("--json", "locks").stdout)["locks"] == []
    unpaired = json.loads(field.run("--json", "events", "--type", "lock.unpaired").stdout)["events"]
    assert [e["lock"] for e in unpaired] == [first["lock"], second["lock"]]
    assert unpaired[1]["data"] == {"forced": True, "wiped_on_lock": False}


def test_without_the_adapter_history_trust_and_doctor_still_answer(field: Field) -> None:
    pair(field, field.locks[0])
    field.sim.terminate()  # the dongle (here: the simulator's HCI socket) is gone
    field.sim.communicate(timeout=10)
    assert json.loads(field.run("--json", "events").stdout)["events"][0]["type"] == "lock.paired"
    assert json.loads(field.run("--json", "trust", "show").stdout)["keyring"]["version"] == 1
    doctor = field.run("--json", "doctor", ok=None)
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert doctor.returncode == 1 and checks["BLE adapter"]["status"] == "fail"
    assert "lockgw-sim serve" in checks["BLE adapter"]["fix"]
    lock = field.locks[1]
    pairing = field.run("pair", lock["address"], "--code", lock["setup_code"], ok=None)
    assert pairing.returncode == 3 and "Bumble transport" in pairing.stderr
