"""The installed `lockgw` executable against `lockgw-sim`, without and with a running daemon."""

from __future__ import annotations

import json
import subprocess

import pytest
from clifix import EXE, Field, start_daemon

pytestmark = [pytest.mark.ble, pytest.mark.slow]


def test_direct_mode_pair_trust_unlock_events(field: Field) -> None:
    lock = field.locks[0]
    wrong = field.run("pair", lock["address"], "--code", "000-000-000", ok=None)
    assert wrong.returncode == 1 and "wrong setup code" in wrong.stderr and "attempts left" in wrong.stderr
    paired = json.loads(
        field.run("--json", "pair", lock["address"], "--code", lock["setup_code"], "--name", "Front").stdout
    )
    assert paired == {"lock": lock["lock"], "address": lock["address"], "name": "Front"}
    assert "installed" in field.run("trust", "install", str(field.tmp / "keyring.cose")).stdout
    shown = json.loads(field.run("--json", "trust", "show").stdout)
    assert shown["keyring"]["version"] == 1 and set(shown) == {"keyring", "revocations", "time"}
    resp = json.loads(field.act("unlock", lock["lock"], "--json").stdout)
    assert resp["status"] == "ok" and resp["data"]["state"] == "unlocked"
    denied = field.act("unlock", lock["lock"], "--json", proof=False, ok=None)
    assert denied.returncode == 1 and json.loads(denied.stdout)["error"]["code"] == "proof_required"
    events = json.loads(field.run("--json", "events").stdout)["events"]
    assert [e["type"] for e in events] == [
        "lock.paired",
        "trust.installed",
        "access.granted",
        "lock.unlocked",
        "access.denied",
    ]
    states = json.loads(field.run("--json", "locks").stdout)["locks"]
    assert states[0]["lock"] == lock["lock"] and set(states[0]) >= {"state", "door", "available"}


def test_daemon_mode_and_exclusive_data_dir(field: Field) -> None:
    daemon = start_daemon(field)  # fails, with the daemon's output, unless its socket answers
    try:
        lock = field.locks[1]
        paired = json.loads(field.run("--json", "pair", lock["address"], "--code", lock["setup_code"]).stdout)
        assert paired["lock"] == lock["lock"]
        field.run("trust", "install", str(field.tmp / "keyring.cose"))
        out = field.act("unlock", lock["lock"]).stdout
        assert "unlocked" in out
        second = subprocess.run(
            [*EXE, "--config", str(field.cfg), "run"], capture_output=True, text=True, timeout=60, check=False
        )
        assert second.returncode == 3 and "in use by" in second.stderr
        status = json.loads(field.run("--json", "status", lock["lock"]).stdout)
        assert status["state"] == "unlocked"
        unknown = field.run("status", "lk-nope", ok=None)
        assert unknown.returncode == 2
    finally:
        stopped = daemon.stop()
    assert stopped == 0, daemon.output()


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["pair", "C0:00:00:00:00:01"], "--code"),
        (["unlock", "lk-1"], "--token"),
        (["events", "--since", "x"], "--since"),
        (["scan", "--timeout", "soon"], "--timeout"),
        (["bogus"], "'bogus'"),
        (["events", "--from", "yesterday"], "--from"),
        (["events", "--from", "99999999999d"], "--from"),
        (["events", "--until", "0001-01-01"], "--until"),
        (["events", "--limit", "0"], "--limit"),
        (["scan", "--timeout", "600"], "--timeout"),
        (["trust", "install", "/nonexistent/keyring.cose"], "FILE"),
        (["completion", "tcsh"], "SHELL"),
    ],
)
def test_bad_arguments_exit_2_naming_the_flag(field: Field, args: list[str], flag: str) -> None:
    proc = field.run(*args, ok=None)
    assert proc.returncode == 2 and flag in proc.stderr
    as_json = field.run("--json", *args, ok=None)
    assert as_json.returncode == 2
    assert json.loads(as_json.stdout)["code"] in {"usage", "config_error"} and flag in as_json.stderr


def test_help_for_every_command(field: Field) -> None:
    for command in (
        "run",
        "demo",
        "config",
        "scan",
        "pair",
        "unpair",
        "locks",
        "status",
        "unlock",
        "lock",
        "events",
        "trust",
        "doctor",
        "completion",
        "config check",
        "trust show",
        "trust install",
    ):
        proc = field.run(*command.split(), "--help")
        assert "example:" in proc.stdout and "lockgw " in proc.stdout.split("example:")[1], command


def test_doctor_reports_and_fails_without_a_keyring(field: Field) -> None:
    proc = field.run("--json", "doctor", ok=None)
    report = json.loads(proc.stdout)
    names = {c["name"]: c for c in report["checks"]}
    assert proc.returncode == 1 and report["ok"] is False
    assert names["keyring"]["status"] == "fail" and "trust install" in names["keyring"]["fix"]
    assert names["database integrity"]["status"] == "pass"
    assert names["configuration"]["status"] == "pass"
    assert names["alarms"]["status"] == "warn" and "trust_none" in names["alarms"]["detail"]
    field.run("trust", "install", str(field.tmp / "keyring.cose"))
    human = field.run("doctor", ok=None)
    assert "PASS  keyring: v1" in human.stdout
    assert "PASS  alarms: none" in human.stdout
    assert human.returncode == (1 if "FAIL" in human.stdout else 0)


def test_pair_prints_the_lock_id_alone(field: Field) -> None:
    lock = field.locks[1]
    out = field.run("pair", lock["address"], "--code", lock["setup_code"]).stdout
    assert out.strip() == lock["lock"]
    unknown = field.act("unlock", "lk-nope", proof=False, ok=None)
    assert unknown.returncode == 2 and "unknown_lock" in unknown.stderr
