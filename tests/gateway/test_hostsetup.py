"""The unit's network allow-list as systemd reads it, the drop-in the installer writes from the
configuration, and doctor's warning when the broker is outside it."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from gateway.cli import hostsetup
from gateway.config import Config, load_config

ROOT = Path(__file__).resolve().parents[2]
UNIT = (ROOT / "config" / "lockgw.service").read_text()


def config(tmp_path: Path, url: str | None) -> Config:
    text = '[gateway]\nid = "gw-1"\nsite = "site-1"\n' + (f'[mqtt]\nurl = "{url}"\n' if url else "")
    (tmp_path / "lockgw.toml").write_text(text)
    return load_config(tmp_path / "lockgw.toml", env={}, check_files=False)


def ip(text: str) -> hostsetup.Address:
    return ipaddress.ip_address(text)


def test_the_shipped_unit_admits_localhost_only() -> None:
    allowed = hostsetup.unit_allow_list([UNIT])
    assert hostsetup.is_allowed(ip("127.0.0.1"), allowed) and hostsetup.is_allowed(ip("::1"), allowed)
    for outside in ("192.168.1.20", "10.0.0.1", "203.0.113.7", "2001:db8::1"):
        assert not hostsetup.is_allowed(ip(outside), allowed), outside


def test_drop_ins_add_and_an_empty_assignment_resets() -> None:
    add = "[Service]\nIPAddressAllow=203.0.113.0/24 2001:db8::/32\n"
    reset = "[Service]\nIPAddressAllow=\nIPAddressAllow=link-local\n"
    allowed = hostsetup.unit_allow_list([UNIT, add])
    assert hostsetup.is_allowed(ip("203.0.113.9"), allowed) and hostsetup.is_allowed(
        ip("2001:db8::5"), allowed
    )
    assert hostsetup.is_allowed(ip("127.0.0.1"), allowed)
    allowed = hostsetup.unit_allow_list([UNIT, add, reset])
    assert not hostsetup.is_allowed(ip("127.0.0.1"), allowed)
    assert hostsetup.is_allowed(ip("169.254.3.4"), allowed)
    # outside [Service], or not an address: ignored
    assert (
        hostsetup.unit_allow_list(["[Unit]\nIPAddressAllow=any\n", "[Service]\nIPAddressAllow=bogus\n"]) == []
    )


@pytest.mark.parametrize(
    ("url", "status"),
    [
        ("mqtt://127.0.0.1:1883", "pass"),  # local broker + bridge
        ("mqtt://localhost:1883", "pass"),
        ("mqtts://203.0.113.7:8883", "warn"),  # direct to central, no drop-in
        ("mqtt://192.168.1.5:1883", "warn"),  # a LAN broker, no drop-in
        ("mqtts://[2001:db8::7]:8883", "warn"),
    ],
)
def test_doctor_warns_when_the_broker_is_outside_the_unit(tmp_path: Path, url: str, status: str) -> None:
    result = hostsetup.check_broker_allowed(config(tmp_path, url), [UNIT])
    assert result.status == status, result
    if status == "warn":
        assert "IPAddressAllow" in result.detail and "install.sh reconfigure" in result.fix


def test_the_drop_in_from_the_config_admits_the_broker(tmp_path: Path) -> None:
    cfg = config(tmp_path, "mqtts://203.0.113.7:8883")
    dropin = hostsetup.network_dropin(cfg, [ip("203.0.113.7")], [])
    assert "[Service]\nIPAddressAllow=203.0.113.7\n" in dropin
    assert hostsetup.check_broker_allowed(cfg, [UNIT, dropin]).status == "pass"
    # by name: the resolved addresses and the DNS servers, each once
    dns = hostsetup.nameservers(
        "# c\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\nnameserver x\nsearch lan\n"
    )
    assert dns == [ip("192.0.2.53"), ip("fe80::1")]
    named = hostsetup.network_dropin(cfg, [ip("198.51.100.4")], [*dns, ip("198.51.100.4")])
    assert named.count("IPAddressAllow=198.51.100.4") == 1 and "IPAddressAllow=192.0.2.53" in named
    assert hostsetup.network_dropin(config(tmp_path, None), [], []).rstrip().endswith("[Service]")


def test_no_mqtt_and_unresolvable_brokers(tmp_path: Path) -> None:
    assert hostsetup.check_broker_allowed(config(tmp_path, None), [UNIT]).status == "pass"
    result = hostsetup.check_broker_allowed(config(tmp_path, "mqtt://no-such-host.invalid:1883"), [UNIT])
    assert result.status == "warn" and "does not resolve" in result.detail


def test_read_unit_texts_in_systemd_order(tmp_path: Path) -> None:
    assert hostsetup.read_unit_texts(tmp_path) is None
    d = tmp_path / "etc/systemd/system/lockgw.service.d"
    d.mkdir(parents=True)
    (tmp_path / "etc/systemd/system/lockgw.service").write_text("unit")
    (d / "60-b.conf").write_text("b")
    (d / "50-a.conf").write_text("a")
    (d / "ignored.txt").write_text("x")
    assert hostsetup.read_unit_texts(tmp_path) == ["unit", "a", "b"]


def test_a_config_path_with_a_newline_cannot_add_lines_to_the_drop_in(tmp_path: Path) -> None:
    """Found by attack (round 2): the drop-in's first comment named the configuration path
    as is; a directory name holding a newline ended the comment and wrote its own
    ``IPAddressAllow=any`` into the unit."""
    d = tmp_path / "x\n[Service]\nIPAddressAllow=any\n#"
    d.mkdir()
    cfg = config(d, "mqtts://203.0.113.7:8883")
    dropin = hostsetup.network_dropin(cfg, [ip("203.0.113.7")], [])
    assert not hostsetup.is_allowed(ip("192.0.2.1"), hostsetup.unit_allow_list([UNIT, dropin]))
    assert all(
        line.startswith(("#", "[Service]", "IPAddressAllow=203.0.113.7")) for line in dropin.splitlines()
    )


def test_a_main_conf_that_is_not_utf8_is_a_clear_error_and_is_left_as_it_is(tmp_path: Path) -> None:
    """Found by attack (round 2): the installer's BlueZ edit ended in a UnicodeDecodeError
    traceback on a main.conf holding Latin-1 bytes."""
    from click.testing import CliRunner

    conf = tmp_path / "main.conf"
    raw = b"[General]\nName = D\xf6rr\n"
    conf.write_bytes(raw)
    result = CliRunner().invoke(hostsetup.cli, ["bluez", str(conf)])
    assert result.exit_code == 1 and "not UTF-8" in result.output, result.output
    assert not isinstance(result.exception, UnicodeDecodeError)
    assert conf.read_bytes() == raw
