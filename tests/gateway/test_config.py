from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gateway.authz.keyfiles import b64url
from gateway.cli import main as cli
from gateway.config import config_path, load_checked, load_config
from gateway.errors import ConfigError
from protocols import cbor
from protocols.cose import ALG_EDDSA, PrivateCoseKey, generate_private_key

GOOD = """
[gateway]
id = "gw-sandviken-1"
site = "bergen-sandviken"
data_dir = "/var/lib/lockgw"

[mqtt]
url = "mqtt://127.0.0.1:1883"
base_topic = "lockgw"

[ble]
backend = "bumble"
transport = "tcp-client:127.0.0.1:9100"
max_connections = 4

[trust]
root_keys = ["/etc/lockgw/root-1.pub"]

[policy]
clock_leeway_s = 60
on_stale_revocations = "accept"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "lockgw.toml"
    p.write_text(text)
    return p


def test_good_config_and_defaults(tmp_path: Path) -> None:
    c = load_config(write(tmp_path, GOOD), env={})
    assert c.gateway.id == "gw-sandviken-1" and c.mqtt is not None and c.mqtt.host_port == ("127.0.0.1", 1883)
    assert c.policy.max_token_ttl_s == 43200 and c.control.socket == Path("/run/lockgw/control.sock")
    assert c.trust.root_keys == [Path("/etc/lockgw/root-1.pub")]
    assert c.mqtt.protocol == "5"


def test_mqtt_protocol_311_from_file_and_environment(tmp_path: Path) -> None:
    text = GOOD.replace('base_topic = "lockgw"', 'base_topic = "lockgw"\nprotocol = "3.1.1"')
    c = load_config(write(tmp_path, text), env={})
    assert c.mqtt is not None and c.mqtt.protocol == "3.1.1"
    c = load_config(write(tmp_path, GOOD), env={"LOCKGW_MQTT__PROTOCOL": "3.1.1"})
    assert c.mqtt is not None and c.mqtt.protocol == "3.1.1"


def test_mqtt_section_may_be_absent(tmp_path: Path) -> None:
    c = load_config(write(tmp_path, '[gateway]\nid = "g"\nsite = "s"\n'), env={})
    assert c.mqtt is None and c.ble.backend == "bluez"


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        (("clock_leeway_s = 60", 'clock_leeway_s = "60"'), "policy.clock_leeway_s"),
        (("clock_leeway_s = 60", "clock_leeway_s = -1"), "policy.clock_leeway_s"),
        (("max_connections = 4", "max_connections = 4\nbogus = 1"), "ble.bogus: unknown key"),
        (('id = "gw-sandviken-1"', 'id = "GW 1"'), "gateway.id"),
        (('url = "mqtt://127.0.0.1:1883"', 'url = "http://x"'), "mqtt.url"),
        (('backend = "bumble"', 'backend = "winrt"'), "ble.backend"),
        (
            ('on_stale_revocations = "accept"', 'on_stale_revocations = "maybe"'),
            "policy.on_stale_revocations",
        ),
        (('transport = "tcp-client:127.0.0.1:9100"', ""), "ble.transport"),
        (("[policy]", "[polcy]"), "polcy"),
        (('base_topic = "lockgw"', 'base_topic = "lockgw"\nprotocol = "4"'), "mqtt.protocol"),
        (('base_topic = "lockgw"', 'base_topic = "lockgw"\nprotocol = 5'), "mqtt.protocol"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, patch: tuple[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, GOOD.replace(*patch)), env={})
    assert needle in str(info.value)


def test_error_carries_the_file_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"lockgw.toml:20: policy.clock_leeway_s"):
        load_config(write(tmp_path, GOOD.replace("clock_leeway_s = 60", 'clock_leeway_s = "x"')), env={})


def test_environment_overrides(tmp_path: Path) -> None:
    c = load_config(
        write(tmp_path, GOOD),
        env={"LOCKGW_POLICY__CLOCK_LEEWAY_S": "30", "LOCKGW_MQTT__URL": "mqtts://broker.example:8883"},
    )
    assert c.policy.clock_leeway_s == 30 and c.mqtt is not None and c.mqtt.tls
    with pytest.raises(ConfigError, match=r"policy\.clock_leeway_s"):
        load_config(write(tmp_path, GOOD), env={"LOCKGW_POLICY__CLOCK_LEEWAY_S": "abc"})


def test_B13_secret_files_must_not_be_group_readable(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("x")
    secret.chmod(0o640)
    text = GOOD.replace('base_topic = "lockgw"', f'base_topic = "lockgw"\npassword_file = "{secret}"')
    with pytest.raises(ConfigError, match="chmod 600"):
        load_config(write(tmp_path, text), env={})
    secret.chmod(0o600)
    assert load_config(write(tmp_path, text), env={}).mqtt is not None


def test_not_toml_and_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[gateway\n"), env={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml", env={})


def test_config_path_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCKGW_CONFIG", "/tmp/x.toml")
    assert config_path("/a.toml") == Path("/a.toml")
    assert config_path(None) == Path("/tmp/x.toml")
    monkeypatch.delenv("LOCKGW_CONFIG")
    assert config_path(None) == Path("/etc/lockgw/lockgw.toml")


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("ble", "auto_unlock"),
        ("ble", "unlock_on_proximity"),
        ("ble", "rssi_unlock_threshold"),
        ("policy", "auto_unlock"),
    ],
)
def test_B3_no_proximity_or_auto_unlock_setting_exists(tmp_path: Path, section: str, key: str) -> None:
    # Presence, RSSI or a connection never unlocks: there is no setting that could make it.
    text = GOOD.replace(f"[{section}]\n", f"[{section}]\n{key} = true\n", 1)
    with pytest.raises(ConfigError, match=f"{section}.{key}: unknown key"):
        load_config(write(tmp_path, text), env={})


# --- `config check` runs exactly the validation `run` does (issue 10 §2) -----------------------


def _field_config(tmp_path: Path, root_file: Path) -> Path:
    return write(
        tmp_path,
        f'[gateway]\nid = "gw-1"\nsite = "site-a"\ndata_dir = "{tmp_path / "data"}"\n'
        f'[control]\nsocket = "{tmp_path / "ctl.sock"}"\n[trust]\nroot_keys = ["{root_file}"]\n',
    )


@pytest.mark.parametrize("problem", ["missing", "small_order", "no_kid", "not_a_key"])
def test_B6_T3_config_check_and_run_both_refuse_a_bad_root_key_file_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], problem: str
) -> None:
    root = tmp_path / "root-1.pub"
    if problem == "small_order":  # the identity point: cryptography would accept forgeries for it
        root.write_bytes(cbor.dumps({1: 1, 2: b"root-1", 3: -8, -1: 6, -2: bytes.fromhex("01" + "00" * 31)}))
    elif problem == "no_kid":
        root.write_bytes(cbor.dumps(_root_key().public.to_cbor(with_kid=False)))
    elif problem == "not_a_key":
        root.write_text("hello\n")
    path = _field_config(tmp_path, root)
    for argv in (["config", "check", str(path)], ["--config", str(path), "run"]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "trust.root_keys" in err and str(root) in err and "Traceback" not in err
    assert not (tmp_path / "data").exists()  # run refused before touching the data directory


def test_config_check_ok_with_a_good_root_key_and_load_checked_returns_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root-1.pub"
    root.write_text(b64url(cbor.dumps(_root_key().public.to_cbor())) + "\n")
    path = _field_config(tmp_path, root)
    assert cli.main(["--json", "config", "check", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    checked = load_checked(path, env={})
    assert checked.config.gateway.id == "gw-1" and set(checked.roots) == {b"root-1"}


def _root_key() -> PrivateCoseKey:
    return generate_private_key(ALG_EDDSA, b"root-1", lambda n: b"\x05" * n)


# Found by attack on `config check` (THREATS B6, F2): each was a traceback, a pass that failed at
# run time, or an endless read; each is now exit 2 naming what is wrong.
@pytest.mark.parametrize(
    ("text", "says"),
    [
        pytest.param("x = " + "[" * 5000, "nested too deeply", id="deep-toml"),
        pytest.param(GOOD.replace("mqtt://127.0.0.1:1883", "mqtt://h:99999"), "mqtt.url", id="port-range"),
        pytest.param(GOOD.replace("mqtt://127.0.0.1:1883", "mqtt://[::1"), "mqtt.url", id="bad-ipv6"),
        pytest.param(
            GOOD + f'\n[control]\nsocket = "/tmp/{"s" * 120}.sock"\n', "control.socket", id="long-socket"
        ),
    ],
)
def test_F2_config_check_refuses_what_run_would_trip_on(tmp_path: Path, text: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        load_config(write(tmp_path, text), env={}, check_files=False)


def test_F2_a_config_file_that_is_not_text_is_a_config_error(tmp_path: Path) -> None:
    p = tmp_path / "lockgw.toml"
    p.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(p, env={})


def test_F2_a_root_key_that_is_a_device_is_refused_without_reading_it(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD.replace("/etc/lockgw/root-1.pub", "/dev/zero"))
    with pytest.raises(ConfigError, match=r"trust\.root_keys.*not a regular file"):
        load_checked(p, env={})


def test_link_latency_keys_and_their_bounds(tmp_path: Path) -> None:
    c = load_config(write(tmp_path, GOOD), env={})
    assert (c.ble.connect_on_challenge_s, c.ble.warm_s, c.ble.battery_budget_s_per_hour) == (10.0, 0.0, 180.0)
    extra = "max_connections = 4\nconnect_on_challenge_s = 5\nwarm_s = 2.5\nbattery_budget_s_per_hour = 60"
    c = load_config(write(tmp_path, GOOD.replace("max_connections = 4", extra)), env={})
    assert (c.ble.connect_on_challenge_s, c.ble.warm_s, c.ble.battery_budget_s_per_hour) == (5.0, 2.5, 60.0)
    for bad in ("connect_on_challenge_s = -1", "connect_on_challenge_s = 61", "warm_s = 301", 'warm_s = "5"'):
        with pytest.raises(ConfigError, match=r"ble\.(connect_on_challenge_s|warm_s)"):
            load_config(
                write(tmp_path, GOOD.replace("max_connections = 4", f"max_connections = 4\n{bad}")), env={}
            )


def test_F2_a_root_key_that_is_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "root-1.pub"
    os.mkfifo(fifo)
    p = write(tmp_path, GOOD.replace("/etc/lockgw/root-1.pub", str(fifo)))
    with pytest.raises(ConfigError, match=r"trust\.root_keys.*not a regular file"):
        load_checked(p, env={})
