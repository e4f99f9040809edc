"""Configuration (CONTRACT §2): one TOML file, typed and validated; errors name the key.

Path: ``--config``, else ``$LOCKGW_CONFIG``, else ``/etc/lockgw/lockgw.toml``. Every key may also
come from the environment as ``LOCKGW_<SECTION>__<KEY>`` (the value is read as a TOML value, so
``LOCKGW_POLICY__CLOCK_LEEWAY_S=30`` is an integer and ``…=abc`` a string). Unknown keys, wrong
types and bad values are :class:`~gateway.errors.ConfigError` naming ``section.key`` and, where
it can be found, the file line. Secrets are never inline: ``*_file`` keys name files that must
not be group or world readable, or (a bare name, no ``/``) systemd credentials read from
``$CREDENTIALS_DIRECTORY``.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.authz.keyfiles import check_secret_permissions, load_root_keys, read_bounded
from gateway.errors import ConfigError
from gateway.tomlfile import merge_env, parse_toml, read_text
from protocols.cose import CoseKey

__all__ = [
    "DEFAULT_PATH",
    "BleConfig",
    "CheckedConfig",
    "Config",
    "HomeAssistantConfig",
    "MetricsConfig",
    "MqttConfig",
    "config_path",
    "load_checked",
    "load_config",
]

DEFAULT_PATH = Path("/etc/lockgw/lockgw.toml")
_ID = r"^[a-z0-9][a-z0-9-]{0,63}$"
Id = Annotated[str, Field(pattern=_ID)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class GatewayConfig(_Section):
    id: Id
    site: Id
    data_dir: Path = Path("/var/lib/lockgw")


class MqttConfig(_Section):
    url: str = "mqtt://127.0.0.1:1883"
    base_topic: Annotated[str, Field(pattern=r"^[^#+/\x00][^#+\x00]{0,127}$")] = "lockgw"
    username: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    #: MQTT protocol version (docs/mqtt-3.1.1.md): "5" (default), or "3.1.1" for brokers that
    #: speak nothing newer (RabbitMQ's MQTT plugin). The whole contract holds on both.
    protocol: Literal["5", "3.1.1"] = "5"

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.fullmatch(r"mqtts?://[A-Za-z0-9.\-\[\]:]+(:\d{1,5})?/?", v):
            raise ValueError("must look like mqtt://HOST:PORT or mqtts://HOST:PORT")
        try:
            parts = urlsplit(v)
            port = parts.port
        except ValueError as exc:  # "Port out of range 0-65535", "Invalid IPv6 URL"
            raise ValueError(f"must look like mqtt://HOST:PORT or mqtts://HOST:PORT ({exc})") from None
        if not parts.hostname or (port is not None and not 1 <= port <= 65535):
            raise ValueError("must name a host and a port in 1..65535")
        return v

    @property
    def tls(self) -> bool:
        return self.url.startswith("mqtts://")

    @property
    def host_port(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        return parts.hostname or "127.0.0.1", parts.port or (8883 if self.tls else 1883)


class BleConfig(_Section):
    backend: Literal["bluez", "bumble"] = "bluez"
    transport: str | None = None
    adapter: Annotated[str, Field(pattern=r"^hci[0-9]{1,2}$")] = "hci0"
    max_connections: Annotated[int, Field(ge=1, le=16)] = 4
    #: Connect on challenge: a challenge for a lock opens its link and session at once, held
    #: this long for the unlock that follows (0: off). docs/architecture.md (LinkManager).
    connect_on_challenge_s: Annotated[float, Field(ge=0, le=60)] = 10.0
    #: After an unlock/lock, keep its link open this long for the next command (0: idle_s).
    warm_s: Annotated[float, Field(ge=0, le=300)] = 0.0
    #: A lock's connected time per hour past which it gets no held or warm link.
    battery_budget_s_per_hour: Annotated[float, Field(ge=0, le=3600)] = 180.0


class TrustConfig(_Section):
    root_keys: list[Path] = Field(default_factory=list)


class PolicyConfig(_Section):
    clock_leeway_s: Annotated[int, Field(ge=0, le=3600)] = 60
    max_token_ttl_s: Annotated[int, Field(ge=60, le=7 * 86400)] = 43200
    max_emergency_ttl_s: Annotated[int, Field(ge=60, le=86400)] = 3600
    on_stale_revocations: Literal["accept", "deny"] = "accept"
    expiry_warning_days: Annotated[int, Field(ge=1, le=365)] = 30


class ControlConfig(_Section):
    socket: Path = Path("/run/lockgw/control.sock")

    @field_validator("socket")
    @classmethod
    def _socket(cls, v: Path) -> Path:
        if len(os.fsencode(v)) > MAX_SOCKET_PATH:
            raise ValueError(f"a unix socket path has at most {MAX_SOCKET_PATH} bytes")
        return v


class MetricsConfig(_Section):
    """The Prometheus endpoint (docs/operations.md): off unless enabled; loopback by default."""

    enabled: bool = False
    #: ``HOST:PORT`` or ``unix:/ABSOLUTE/PATH``. Anything but loopback or a unix socket exposes
    #: the site's health to the network: put a firewall or a reverse proxy in front.
    listen: str = "127.0.0.1:9108"

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        if v.startswith("unix:"):
            path = v[len("unix:") :]
            if not path.startswith("/") or len(os.fsencode(path)) > MAX_SOCKET_PATH:
                raise ValueError(f"unix: takes an absolute path of at most {MAX_SOCKET_PATH} bytes")
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not re.fullmatch(r"[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:]+\]", host) or not port.isdigit():
            raise ValueError("must be HOST:PORT (127.0.0.1:9108) or unix:/PATH")
        if not 1 <= int(port) <= 65535:
            raise ValueError("the port must be in 1..65535")
        return v


class HomeAssistantConfig(_Section):
    """Home Assistant MQTT discovery (docs/homeassistant.md): read-only entities, off by default."""

    discovery: bool = False
    #: Home Assistant's discovery prefix (its default).
    prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$")] = "homeassistant"


class Config(_Section):
    gateway: GatewayConfig
    mqtt: MqttConfig | None = None
    ble: BleConfig = BleConfig()
    trust: TrustConfig = TrustConfig()
    policy: PolicyConfig = PolicyConfig()
    control: ControlConfig = ControlConfig()
    metrics: MetricsConfig = MetricsConfig()
    homeassistant: HomeAssistantConfig = HomeAssistantConfig()
    source: Path | None = Field(default=None, exclude=True)


#: Keys people write when they mean the ``*_file`` form (the value itself is never echoed).
_INLINE_SECRETS: Final = frozenset({"password", "key", "cert", "token", "secret"})


def config_path(cli_path: str | None) -> Path:
    if cli_path:
        return Path(cli_path)
    env = os.environ.get("LOCKGW_CONFIG")
    return Path(env) if env else DEFAULT_PATH


def _env_overrides(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, raw in env.items():
        if not name.startswith("LOCKGW_") or "__" not in name or name == "LOCKGW_CONFIG":
            continue
        section, _, key = name[len("LOCKGW_") :].partition("__")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out.setdefault(section.lower(), {})[key.lower()] = value
    return out


def _line_of(text: str, section: str, key: str) -> int | None:
    current = ""
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            current = stripped.strip("[] ")
        elif (current == section and re.match(rf"{re.escape(key)}\s*=", stripped)) or (
            not section and current == "" and stripped.startswith(f"{key}")
        ):
            return n
    return None


#: A configuration file is a few KiB; anything this large is the wrong file.
#: sun_path is 108 bytes with its terminating NUL (Linux).
MAX_SOCKET_PATH: Final = 107


def load_config(path: Path, *, env: Mapping[str, str] | None = None, check_files: bool = True) -> Config:
    """Read, merge the environment, validate. Raises ConfigError naming the key."""
    text = read_text(path)
    data = parse_toml(path, text)
    merge_env(path, data, _env_overrides(os.environ if env is None else env))
    _paths_as_paths(data)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("; ".join(_problems(path, text, exc))) from exc
    config = config.model_copy(update={"source": path})
    config = _resolve_credentials(path, config, os.environ if env is None else env)
    if check_files and config.mqtt is not None:
        for key in ("password_file", "key_file"):
            secret = getattr(config.mqtt, key)
            if secret is not None and "/" in str(secret):  # a credential name is no file here
                check_secret_permissions(secret, f"mqtt.{key}")
    if config.ble.backend == "bumble" and not config.ble.transport:
        raise ConfigError(f'{path}: ble.transport: required when ble.backend = "bumble"')
    return config


#: The ``[mqtt]`` keys that name files; a bare name (no ``/``) is a systemd credential.
CREDENTIAL_KEYS: Final = ("password_file", "ca_file", "cert_file", "key_file")
#: A password, key or certificate file is a few KiB at most.
MAX_SECRET_BYTES: Final = 64 * 1024
_CREDENTIAL_NAME: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")


def read_password(path: Path) -> str:
    """The MQTT password: the file's UTF-8 text (bounded), without surrounding whitespace.
    Bytes that are not UTF-8 are refused, not replaced: the broker would only say 'not
    authorized' to a password changed on the way."""
    raw = read_bounded(path, "mqtt.password_file", MAX_SECRET_BYTES)
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"mqtt.password_file: {path} is not UTF-8 text (byte {exc.start})") from None


def _resolve_credentials(path: Path, config: Config, env: Mapping[str, str]) -> Config:
    """A ``[mqtt] *_file`` value without a ``/`` names a systemd credential
    (``LoadCredential=NAME:/etc/lockgw/FILE`` in the unit): it is read from
    ``$CREDENTIALS_DIRECTORY/NAME``. Without ``$CREDENTIALS_DIRECTORY`` (a technician's CLI
    command, which talks to the daemon and needs no MQTT secret) it stays a bare name;
    :func:`load_checked` (``run``, ``config check``) refuses it then."""
    if config.mqtt is None:
        return config
    directory = env.get("CREDENTIALS_DIRECTORY")
    update: dict[str, Path] = {}
    for key in CREDENTIAL_KEYS:
        value = getattr(config.mqtt, key)
        if value is None or "/" in str(value):
            continue
        name = str(value)
        if not _CREDENTIAL_NAME.fullmatch(name):
            raise ConfigError(
                f"{path}: mqtt.{key}: {name!r} is neither a path (with a /) nor a systemd credential "
                "name ([A-Za-z0-9_.-], at most 128)"
            )
        if directory:
            update[key] = Path(directory) / name
    if not update:
        return config
    return config.model_copy(update={"mqtt": config.mqtt.model_copy(update=update)})


def _paths_as_paths(data: dict[str, Any]) -> None:
    """TOML gives str for paths; strict pydantic wants Path objects."""
    for section in data.values():
        if isinstance(section, dict):
            for key, value in list(section.items()):
                if (key.endswith(("_file", "_dir")) or key == "socket") and isinstance(value, str):
                    section[key] = Path(value)
                elif key == "root_keys" and isinstance(value, list):
                    section[key] = [Path(v) if isinstance(v, str) else v for v in value]


def _problems(path: Path, text: str, exc: ValidationError) -> list[str]:
    """Each validation error as ``FILE:LINE: section.key: what is wrong``."""
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        parts = [str(p) for p in err["loc"]]
        line = _line_of(text, parts[0] if len(parts) > 1 else "", parts[-1]) if parts else None
        where = f"{path}:{line}" if line else str(path)
        message = (
            err["msg"].replace("Extra inputs are not permitted", "unknown key").removeprefix("Value error, ")
        )
        if message == "unknown key" and parts and parts[-1] in _INLINE_SECRETS:
            message += f"; secrets are never inline: put it in a file (mode 0600) and set {parts[-1]}_file"
        problems.append(f"{where}: {loc}: {message}")
    return problems


@dataclass(frozen=True, slots=True)
class CheckedConfig:
    """A configuration with everything it names loaded: what ``run`` starts from."""

    config: Config
    roots: dict[bytes, CoseKey]


def load_checked(path: Path, *, env: Mapping[str, str] | None = None) -> CheckedConfig:
    """The one validation ``lockgw run`` and ``lockgw config check`` share: the file (keys,
    types, values, secret file modes), then the root key files it names (readable, valid
    public COSE_Keys with a kid: a small-order Ed25519 point is refused). Raises ConfigError
    naming the key; so ``config check`` answers ``ok`` exactly when ``run`` would start.
    The MQTT secrets are read too (bounded): ``run`` needs them, under the unit from
    ``$CREDENTIALS_DIRECTORY``."""
    config = load_config(path, env=env)
    if config.mqtt is not None:
        for key in CREDENTIAL_KEYS:
            value = getattr(config.mqtt, key)
            if value is not None and "/" not in str(value):
                raise ConfigError(
                    f"{path}: mqtt.{key}: {str(value)!r} names a systemd credential but "
                    "$CREDENTIALS_DIRECTORY is not set (run under the unit with LoadCredential=, "
                    "or give a path)"
                )
        if config.mqtt.password_file is not None:
            read_password(config.mqtt.password_file)
        if config.mqtt.key_file is not None:
            read_bounded(config.mqtt.key_file, "mqtt.key_file", MAX_SECRET_BYTES)
    return CheckedConfig(config, load_root_keys(config.trust.root_keys))
