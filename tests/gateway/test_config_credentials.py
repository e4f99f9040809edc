"""Secrets through systemd credentials: a bare ``[mqtt] *_file`` name (no ``/``) is read from
``$CREDENTIALS_DIRECTORY`` (``LoadCredential=NAME:PATH`` in the unit), bounded, 0600 checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import MAX_SECRET_BYTES, load_checked, load_config
from gateway.errors import ConfigError

BASE = """
[gateway]
id = "gw-1"
site = "site-1"

[mqtt]
url = "mqtts://central.example.org:8883"
username = "gw-1"
password_file = "mqtt.password"
ca_file = "/etc/lockgw/central-ca.pem"
"""


def write(tmp_path: Path, text: str = BASE) -> Path:
    p = tmp_path / "lockgw.toml"
    p.write_text(text)
    return p


def credentials(tmp_path: Path, **files: bytes) -> Path:
    d = tmp_path / "credentials"
    d.mkdir()
    for name, data in files.items():
        f = d / name.replace("_", ".")
        f.write_bytes(data)
        f.chmod(0o400)  # how systemd hands them to the service
    return d


def test_a_bare_name_is_read_from_the_credentials_directory(tmp_path: Path) -> None:
    d = credentials(tmp_path, mqtt_password=b"s3cret\n")
    config = load_config(write(tmp_path), env={"CREDENTIALS_DIRECTORY": str(d)})
    assert config.mqtt is not None
    assert config.mqtt.password_file == d / "mqtt.password"
    assert config.mqtt.ca_file == Path("/etc/lockgw/central-ca.pem")  # a path stays a path


def test_a_bare_name_without_systemd_refuses_run_and_config_check_not_other_commands(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"mqtt\.password_file: 'mqtt\.password' names a systemd credential"
    ):
        load_checked(write(tmp_path), env={})
    # a technician's command (it talks to the daemon) loads the file, the name left as is
    config = load_config(write(tmp_path), env={})
    assert config.mqtt is not None and config.mqtt.password_file == Path("mqtt.password")
    # with the credentials directory (as the unit runs it, or CREDENTIALS_DIRECTORY=/etc/lockgw)
    d = credentials(tmp_path, mqtt_password=b"s3cret\n")
    assert load_checked(write(tmp_path), env={"CREDENTIALS_DIRECTORY": str(d)}).config.mqtt is not None


def test_a_missing_credential_is_an_error_naming_the_key(tmp_path: Path) -> None:
    d = credentials(tmp_path)
    with pytest.raises(ConfigError, match=r"mqtt\.password_file: cannot stat"):
        load_config(write(tmp_path), env={"CREDENTIALS_DIRECTORY": str(d)})


def test_a_credential_that_is_not_a_small_regular_file_is_refused_without_reading_it_all(
    tmp_path: Path,
) -> None:
    d = credentials(tmp_path, mqtt_password=b"x" * (MAX_SECRET_BYTES + 1))
    with pytest.raises(ConfigError, match="larger than 64 KiB"):
        load_checked(write(tmp_path), env={"CREDENTIALS_DIRECTORY": str(d)})
    (d / "mqtt.password").unlink()
    (d / "mqtt.password").mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="Is a directory"):
        load_checked(write(tmp_path), env={"CREDENTIALS_DIRECTORY": str(d)})


@pytest.mark.parametrize("name", ["..", ".hidden", "a b", "é", "x" * 200])
def test_names_that_are_neither_paths_nor_credential_names_are_refused(tmp_path: Path, name: str) -> None:
    text = BASE.replace('password_file = "mqtt.password"', f'password_file = "{name}"')
    with pytest.raises(ConfigError, match=r"mqtt\.password_file: .* neither a path"):
        load_config(write(tmp_path, text), env={"CREDENTIALS_DIRECTORY": str(tmp_path)})


def test_a_password_that_is_not_utf8_is_refused_not_silently_altered(tmp_path: Path) -> None:
    """Found by attack (round 2): a password file with bytes that are not UTF-8 passed
    ``config check``, and the bridge logged in with U+FFFD in their place (the broker then
    said only 'not authorized')."""
    d = credentials(tmp_path, mqtt_password=b"s3cr\xff\xfet\n")
    with pytest.raises(ConfigError, match=r"mqtt\.password_file: .* not UTF-8"):
        load_checked(write(tmp_path), env={"CREDENTIALS_DIRECTORY": str(d)})
