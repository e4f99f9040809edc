"""``doctor``'s BlueZ check: the settings THREATS B8–B10 rely on, read from main.conf."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli.doctor import Check, _bluez_settings

HARDENED = """
[General]
ControllerMode = le
JustWorksRepairing = never
AlwaysPairable = false
SecureConnections = only

[GATT]
KeySize = 16
"""


def check(tmp_path: Path, text: str) -> Check:
    conf = tmp_path / "main.conf"
    conf.write_text(text)
    return _bluez_settings(conf)


def test_hardened_main_conf_passes(tmp_path: Path) -> None:
    c = check(tmp_path, HARDENED)
    assert (c.status, c.detail, c.fix) == ("pass", "hardened", "")


@pytest.mark.parametrize(
    ("line", "wrong", "detail"),
    [
        pytest.param("KeySize = 16", "KeySize = 7", "GATT.KeySize=7", id="B8-key-size-7"),
        pytest.param(
            "ControllerMode = le", "ControllerMode = dual", "General.ControllerMode=dual", id="B9-dual"
        ),
        pytest.param(
            "JustWorksRepairing = never",
            "JustWorksRepairing = always",
            "General.JustWorksRepairing=always",
            id="B9-just-works-repairing",
        ),
        pytest.param(
            "SecureConnections = only",
            "SecureConnections = on",
            "General.SecureConnections=on",
            id="B10-legacy",
        ),
        pytest.param(
            "SecureConnections = only\n", "", "General.SecureConnections=(unset)", id="B10-legacy-by-default"
        ),
        pytest.param(
            "AlwaysPairable = false",
            "AlwaysPairable = true",
            "General.AlwaysPairable=true",
            id="B10-pairable",
        ),
    ],
)
def test_B8_B9_B10_bluez_settings_that_weaken_the_link_are_flagged(
    tmp_path: Path, line: str, wrong: str, detail: str
) -> None:
    c = check(tmp_path, HARDENED.replace(line, wrong))
    assert (c.status, c.detail) == ("warn", detail)
    assert "[GATT] KeySize = 16" in c.fix and "[General] SecureConnections = only" in c.fix


def test_missing_or_broken_main_conf_is_a_warning_with_the_fix(tmp_path: Path) -> None:
    missing = _bluez_settings(tmp_path / "absent.conf")
    assert missing.status == "warn" and "KeySize = 16" in missing.fix
    broken = check(tmp_path, "no section header\n")
    assert broken.status == "warn" and broken.fix == "fix the file"
