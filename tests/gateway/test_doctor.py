"""``doctor``'s BlueZ check and the installer's edit of main.conf: only keys BlueZ 5.66
(Debian 12, Raspberry Pi OS bookworm) reads, the settings THREATS B8–B10 rely on."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest

from gateway.cli import doctor
from gateway.cli.doctor import Check, _bluez_settings
from gateway.cli.hostsetup import BLUEZ_WANTED, apply_bluez, bluez_problems

#: The shape of BlueZ 5.66's shipped /etc/bluetooth/main.conf: every key commented out at its
#: default, the sections in its order (condensed: the comments are ours).
STOCK_566 = """\
[General]

# Device name.
#Name = BlueZ

#AlwaysPairable = false

#PairableTimeout = 0

# Dual mode by default.
#ControllerMode = dual

#Privacy = off

#JustWorksRepairing = never

[BR]
#PageScanType=

[LE]
#MinAdvertisementInterval=

[GATT]
#Cache = always

# Minimum required Encryption Key Size. 0 means don't care.
#KeySize = 0

#ExchangeMTU = 517

[AVDTP]
#SessionMode = basic

[Policy]
#AutoEnable=true
"""

HARDENED = """
[General]
ControllerMode = le
JustWorksRepairing = never
AlwaysPairable = false

[GATT]
KeySize = 16
"""


def check(tmp_path: Path, text: str) -> Check:
    conf = tmp_path / "main.conf"
    conf.write_text(text)
    return _bluez_settings(conf)


def test_only_keys_bluez_5_66_has_are_checked() -> None:
    # BlueZ 5.66 has no SecureConnections key in main.conf: demanding it made "hardened"
    # unreachable. Every checked key is in the stock file (commented at its default).
    assert ("General", "SecureConnections") not in BLUEZ_WANTED
    for _section, key in BLUEZ_WANTED:
        assert f"#{key} =" in STOCK_566


def test_hardened_main_conf_passes(tmp_path: Path) -> None:
    c = check(tmp_path, HARDENED)
    assert (c.status, c.detail, c.fix) == ("pass", "hardened", "")


def test_stock_main_conf_is_flagged_where_its_defaults_are_weak(tmp_path: Path) -> None:
    c = check(tmp_path, STOCK_566)
    # the defaults that are already what B9/B10 want (never, false) are not flagged
    assert (c.status, c.detail) == ("warn", "General.ControllerMode=(unset: dual), GATT.KeySize=(unset: 0)")
    assert "ControllerMode = le" in c.fix and "KeySize = 16" in c.fix


def test_the_installers_edit_makes_the_stock_file_pass_and_is_idempotent(tmp_path: Path) -> None:
    once = apply_bluez(STOCK_566)
    assert bluez_problems(once) == []
    assert apply_bluez(once) == once
    assert check(tmp_path, once).detail == "hardened"
    # each key set once, inside its own section, right after the commented default
    lines = once.splitlines()
    assert lines.count("ControllerMode = le") == 1 and lines.count("KeySize = 16") == 1
    gatt, avdtp = lines.index("[GATT]"), lines.index("[AVDTP]")
    assert gatt < lines.index("KeySize = 16") < avdtp
    assert lines.index("#KeySize = 0") + 2 == lines.index("KeySize = 16")
    # comments and other settings are kept
    assert "#ExchangeMTU = 517" in lines and "#AutoEnable=true" in lines


def test_the_edit_replaces_weak_values_and_adds_missing_sections() -> None:
    weak = "[General]\nControllerMode = dual\nJustWorksRepairing = always\nName = door\n"
    fixed = apply_bluez(weak)
    assert bluez_problems(fixed) == []
    assert "ControllerMode = dual" not in fixed and "Name = door" in fixed
    assert "[GATT]" in fixed
    assert bluez_problems(apply_bluez("")) == []


@pytest.mark.parametrize(
    ("line", "wrong", "detail"),
    [
        pytest.param("KeySize = 16", "KeySize = 7", "GATT.KeySize=7", id="B8-key-size-7"),
        pytest.param("KeySize = 16\n", "", "GATT.KeySize=(unset: 0)", id="B8-key-size-by-default"),
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
            "JustWorksRepairing = never",
            "JustWorksRepairing = confirm",
            "General.JustWorksRepairing=confirm",
            id="B9-just-works-confirm",
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
    assert "[GATT] KeySize = 16" in c.fix and "[General] ControllerMode = le" in c.fix


def test_missing_or_broken_main_conf_is_a_warning_with_the_fix(tmp_path: Path) -> None:
    missing = _bluez_settings(tmp_path / "absent.conf")
    assert missing.status == "warn" and "KeySize = 16" in missing.fix
    broken = check(tmp_path, "no section header\n")
    assert broken.status == "warn" and broken.fix == "fix the file"


@pytest.mark.parametrize(
    "hostile",
    [
        pytest.param(
            "[General]\nJustWorksRepairing = never\nJustWorksRepairing = always\n",
            id="B9-key-twice-last-wins",
        ),
        pytest.param(
            "[General]\nControllerMode = le\n[Policy]\n[General]\nControllerMode = dual\n",
            id="B9-section-twice-last-wins",
        ),
        pytest.param("[GATT]\nKeySize = 16\n\n[GATT]\n  KeySize=7\n", id="B8-indented-in-a-second-section"),
    ],
)
def test_the_installers_edit_leaves_no_later_weak_value_behind(hostile: str) -> None:
    """Found by attack (round 2): BlueZ (GKeyFile) and doctor take the *last* value of a key
    given twice, or of a section given twice; the edit set only the first, and a re-run said
    'already hardened' while doctor warned and BlueZ ran with the weak value."""
    fixed = apply_bluez(hostile)
    assert bluez_problems(fixed) == []
    assert apply_bluez(fixed) == fixed


def test_an_unreadable_main_conf_is_a_warning_not_a_crash(tmp_path: Path) -> None:
    """Found by attack (round 2): main.conf as a directory (or unreadable) raised OSError out
    of doctor."""
    (tmp_path / "main.conf").mkdir()
    c = _bluez_settings(tmp_path / "main.conf")
    assert c.status == "warn" and "cannot read" in c.detail


async def test_a_check_that_raises_is_one_failed_line_and_the_others_still_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by attack (round 2): one check raising ended doctor with no line at all."""

    async def broken(_gw: object, _daemon: bool) -> list[Check]:
        raise PermissionError(13, "Permission denied")

    async def fine(_gw: object, _daemon: bool) -> list[Check]:
        return [Check("fine", doctor.PASS, "ok")]

    monkeypatch.setattr(doctor, "CHECKS", (broken, fine))
    lines = await doctor.run_checks(cast("doctor.HealthSnapshot", object()), daemon=False)
    assert [(c.name, c.status) for c in lines] == [("broken", "fail"), ("fine", "pass")]
    assert "PermissionError" in lines[0].detail
