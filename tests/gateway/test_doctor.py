"""``doctor``'s BlueZ check: the settings THREATS B8–B10 rely on, read from main.conf."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.doctor import Check, _bluez_settings

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


def test_B8_a_key_size_below_16_is_flagged(tmp_path: Path) -> None:
    c = check(tmp_path, HARDENED.replace("KeySize = 16", "KeySize = 7"))
    assert c.status == "warn" and c.detail == "GATT.KeySize=7" and "[GATT] KeySize = 16" in c.fix


@pytest.mark.parametrize(
    ("line", "wrong", "detail"),
    [
        ("ControllerMode = le", "ControllerMode = dual", "General.ControllerMode=dual"),
        ("JustWorksRepairing = never", "JustWorksRepairing = always", "General.JustWorksRepairing=always"),
    ],
)
def test_B9_cross_transport_and_just_works_repairing_are_flagged(
    tmp_path: Path, line: str, wrong: str, detail: str
) -> None:
    c = check(tmp_path, HARDENED.replace(line, wrong))
    assert c.status == "warn" and c.detail == detail


@pytest.mark.parametrize(
    ("line", "wrong", "detail"),
    [
        ("SecureConnections = only", "SecureConnections = on", "General.SecureConnections=on"),
        ("AlwaysPairable = false", "AlwaysPairable = true", "General.AlwaysPairable=true"),
        ("SecureConnections = only\n", "", "General.SecureConnections=(unset)"),
    ],
)
def test_B10_legacy_pairing_and_always_pairable_are_flagged(
    tmp_path: Path, line: str, wrong: str, detail: str
) -> None:
    c = check(tmp_path, HARDENED.replace(line, wrong))
    assert c.status == "warn" and c.detail == detail


def test_missing_or_broken_main_conf_is_a_warning_with_the_fix(tmp_path: Path) -> None:
    missing = _bluez_settings(tmp_path / "absent.conf")
    assert missing.status == "warn" and "KeySize = 16" in missing.fix
    broken = check(tmp_path, "no section header\n")
    assert broken.status == "warn" and broken.fix == "fix the file"
