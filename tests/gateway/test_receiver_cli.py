"""`lockgw-receiver` on bad input: configuration errors name the key (exit 2), an unreachable
PostgreSQL is exit 3 with a message — never a traceback."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from fleetfix import RECEIVER_EXE, free_port

from gateway.receiver.config import load_receiver_config


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(RECEIVER_EXE), *args], capture_output=True, text=True, check=False, timeout=60, env=env
    )


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "r.toml"
    cfg.write_text('[receiver]\nbatch_max = "many"\n[postgres]\ndsn = "postgresql://u:secret@h/db"\n')
    out = run("--config", str(cfg), "status")
    assert out.returncode == 2
    assert "receiver.batch_max" in out.stderr
    assert "postgres.dsn" in out.stderr
    assert "secret" not in out.stderr.replace("secrets are never inline", "")
    assert "Traceback" not in out.stderr
    cfg.write_text("")
    fault = run("--config", str(cfg), "run", env={**os.environ, "LOCKGW_RECEIVER_FAULT": "explode"})
    assert fault.returncode == 2
    assert "LOCKGW_RECEIVER_FAULT" in fault.stderr
    assert "Traceback" not in fault.stderr
    missing = run("--config", str(tmp_path / "nope.toml"), "migrate")
    assert missing.returncode == 2
    assert "cannot read configuration" in missing.stderr


def test_postgres_unreachable_is_exit_3(tmp_path: Path) -> None:
    cfg = tmp_path / "r.toml"
    cfg.write_text(f'[postgres]\ndsn = "postgresql://lockgw@127.0.0.1:{free_port()}/x"\n')
    for command in ("status", "run"):
        out = run("--config", str(cfg), command)
        assert out.returncode == 3, (command, out.stderr)
        assert "PostgreSQL" in out.stderr
        assert "Traceback" not in out.stderr


def test_example_receiver_config_is_valid(tmp_path: Path) -> None:
    text = (Path(__file__).resolve().parents[2] / "config" / "receiver.toml").read_text()
    secret = tmp_path / "pw"
    secret.write_text("x\n")
    secret.chmod(0o600)
    text = text.replace("/etc/lockgw/pg-password", str(secret)).replace(
        "/etc/lockgw/amqp-password", str(secret)
    )
    (tmp_path / "r.toml").write_text(text)
    config = load_receiver_config(tmp_path / "r.toml", env={})
    assert config.receiver.transport == "amqp"
    assert len(config.amqp.nodes) == 3


def test_receiver_unit_exposure_at_most_2() -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    unit = Path(__file__).resolve().parents[2] / "config" / "lockgw-receiver@.service"
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=20", str(unit)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    level = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout + out.stderr)
    assert level is not None, out.stdout + out.stderr
    assert float(level.group(1)) <= 2.0
