"""config/: the example configuration validates, the unit meets the exposure goal, the demo runs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def test_example_config_is_valid() -> None:
    config = load_config(ROOT / "config" / "lockgw.toml", env={}, check_files=False)
    assert config.gateway.id == "gw-sandviken-1" and config.mqtt is not None


def test_A3_unit_is_notify_with_watchdog_and_no_bluetooth_sockets() -> None:
    unit = (ROOT / "config" / "lockgw.service").read_text()
    assert "Type=notify" in unit and re.search(r"^WatchdogSec=\d+", unit, re.MULTILINE)
    families = re.search(r"^RestrictAddressFamilies=(.*)$", unit, re.MULTILINE)
    assert families is not None and "AF_BLUETOOTH" not in families.group(1)
    assert "CAP_NET_ADMIN" not in unit.split("CapabilityBoundingSet=")[1].split("\n")[0]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_exposure_at_most_2() -> None:
    proc = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=true",
            "--threshold=20",
            str(ROOT / "config" / "lockgw.service"),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout[-2000:]
    level = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", proc.stdout).group(1))  # type: ignore[union-attr]
    assert level <= 2.0


@pytest.mark.slow
def test_demo_runs_and_reports_no_gaps() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli.main", "demo", "--seed", "5"],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    out = proc.stdout
    assert "refused (token_invalid" in out and "refused (token_revoked" in out
    if "broker: mosquitto on" in out:
        assert "gaps = 0, hash chain ok" in out
