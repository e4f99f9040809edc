"""The receiver's configuration (docs/fleet.md): one TOML file, strict, errors name the key.

Path: ``--config``, else ``$LOCKGW_RECEIVER_CONFIG``, else ``/etc/lockgw/receiver.toml``. Every
key may also come from the environment as ``LOCKGW_RECEIVER_<SECTION>__<KEY>`` (read as a TOML
value, as the gateway does with ``LOCKGW_<SECTION>__<KEY>``; a prefix of its own so a gateway's
variables on the same host never reconfigure the receiver). Secrets only through ``*_file``
keys, which must not be group or world readable.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.errors import ConfigError
from gateway.tomlfile import merge_env, parse_toml, read_text

__all__ = [
    "DEFAULT_PATH",
    "AmqpConfig",
    "MqttConfig",
    "PostgresConfig",
    "ReceiverConfig",
    "ReceiverSection",
    "config_path",
    "load_receiver_config",
    "read_secret",
]

DEFAULT_PATH: Final = Path("/etc/lockgw/receiver.toml")
ENV_PREFIX: Final = "LOCKGW_RECEIVER_"
Id = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ReceiverSection(_Section):
    instance: Id = "r1"
    base_topic: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")] = "lockgw"
    transport: Literal["mqtt", "amqp"] = "mqtt"
    batch_max: Annotated[int, Field(ge=1, le=10_000)] = 500
    batch_linger_s: Annotated[float, Field(ge=0, le=10)] = 0.05
    gap_replay_after_s: Annotated[float, Field(gt=0, le=86400)] = 10.0
    replay_retry_s: Annotated[float, Field(gt=0, le=86400)] = 60.0
    #: A gateway at rest this long (no event of it arrived, its heartbeat holding every receipt
    #: central gave) whose heartbeat's last_seq lies past the highest seq received: that tail was
    #: acknowledged by the broker and lost before central → a replay request for it. Long against
    #: a heartbeat (60 s) and a draining site's queueing, so a backlog on its way is never asked.
    tail_replay_after_s: Annotated[float, Field(gt=0, le=86400)] = 300.0
    heartbeat_stale_s: Annotated[float, Field(gt=0, le=86400)] = 180.0
    lag_alert_events: Annotated[int, Field(ge=1)] = 1000
    #: Receipts sent, yet the gateway's heartbeats show its receipt_seq behind them and unmoved for
    #: this long → alert ``receipt_lag``: receipts do not reach it (ACLs, a broken bridge).
    receipt_lag_alert_s: Annotated[float, Field(gt=0, le=86400)] = 300.0
    #: ``GET /metrics`` (Prometheus) on this port; 0 = off.
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 0
    metrics_host: Annotated[str, Field(min_length=1, max_length=253)] = "127.0.0.1"
    #: Per-gateway gauges are refreshed from PostgreSQL this often (one status query).
    metrics_refresh_s: Annotated[float, Field(ge=0.1, le=3600)] = 15.0


class PostgresConfig(_Section):
    dsn: Annotated[str, Field(pattern=r"^postgres(ql)?://")] = "postgresql://lockgw@127.0.0.1:5432/lockgw"
    password_file: Path | None = None
    pool_size: Annotated[int, Field(ge=1, le=64)] = 4

    @field_validator("dsn")
    @classmethod
    def _no_inline_password(cls, v: str) -> str:
        if urlsplit(v).password:
            raise ValueError(
                "secrets are never inline: put the password in a file (mode 0600) and set password_file"
            )
        return v


def _broker_url(v: str, schemes: tuple[str, ...]) -> str:
    parts = urlsplit(v)
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port ({exc})") from None
    if parts.scheme not in schemes or not parts.hostname:
        raise ValueError(f"must look like {schemes[0]}://HOST:PORT")
    if parts.password:
        raise ValueError("secrets are never inline: set password_file")
    if port is not None and not 1 <= port <= 65535:
        raise ValueError("port must be in 1..65535")
    return v


class MqttConfig(_Section):
    url: str = "mqtt://127.0.0.1:1883"
    share_group: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = "receivers"
    username: str | None = None
    password_file: Path | None = None
    #: For ``mqtts://``: the CA that signed the broker's certificate (else the system's CAs).
    ca_file: Path | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _broker_url(v, ("mqtt", "mqtts"))

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"

    @property
    def host_port(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        return parts.hostname or "127.0.0.1", parts.port or (8883 if parts.scheme == "mqtts" else 1883)


class AmqpConfig(_Section):
    url: str = "amqp://127.0.0.1:5672/"
    #: Further nodes of the cluster: each reconnect tries the next of [url, *urls].
    urls: Annotated[list[str], Field(max_length=32)] = Field(default_factory=list)
    queue: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,200}$")] = "lockgw.central"
    prefetch: Annotated[int, Field(ge=1, le=65535)] = 500
    username: str | None = None
    password_file: Path | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _broker_url(v, ("amqp", "amqps"))

    @field_validator("urls")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        return [_broker_url(u, ("amqp", "amqps")) for u in v]

    @property
    def nodes(self) -> list[str]:
        return [self.url, *self.urls]


class ReceiverConfig(_Section):
    receiver: ReceiverSection = ReceiverSection()
    postgres: PostgresConfig = PostgresConfig()
    mqtt: MqttConfig = MqttConfig()
    amqp: AmqpConfig = AmqpConfig()

    @model_validator(mode="after")
    def _prefetch_covers_batch(self) -> ReceiverConfig:
        if self.receiver.transport == "amqp" and self.amqp.prefetch < self.receiver.batch_max:
            raise ValueError("amqp.prefetch must be at least receiver.batch_max (a batch could never fill)")
        return self


def config_path(cli_path: str | None, env: Mapping[str, str] | None = None) -> Path:
    if cli_path:
        return Path(cli_path)
    found = (os.environ if env is None else env).get("LOCKGW_RECEIVER_CONFIG")
    return Path(found) if found else DEFAULT_PATH


def read_secret(path: Path, what: str) -> str:
    """The first line of a secret file that is not group/world readable (CONTRACT §2)."""
    try:
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"{what}: {path} is readable by group or others; run: chmod 600 {path}")
        return path.read_text(encoding="utf-8").splitlines()[0] if path.stat().st_size else ""
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from exc


def _env_overrides(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].partition("__")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out.setdefault(section.lower(), {})[key.lower()] = value
    return out


def load_receiver_config(path: Path | None, *, env: Mapping[str, str] | None = None) -> ReceiverConfig:
    """Read (``path`` may be None: defaults and environment only), merge the environment,
    validate; :class:`ConfigError` naming ``section.key`` otherwise."""
    where = str(path) if path is not None else "environment"
    data: dict[str, Any] = parse_toml(path, read_text(path)) if path is not None else {}
    merge_env(where, data, _env_overrides(os.environ if env is None else env))
    for section in data.values():
        if isinstance(section, dict):
            for key, value in list(section.items()):
                if key.endswith("_file") and isinstance(value, str):
                    section[key] = Path(value)
    try:
        config = ReceiverConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            loc = ".".join(str(p) for p in err["loc"]) or "config"
            msg = (
                err["msg"]
                .replace("Extra inputs are not permitted", "unknown key")
                .removeprefix("Value error, ")
            )
            problems.append(f"{where}: {loc}: {msg}")
        raise ConfigError("; ".join(problems)) from None
    for section_name in ("postgres", "mqtt", "amqp"):
        secret = getattr(config, section_name).password_file
        if secret is not None:
            read_secret(secret, f"{section_name}.password_file")
    return config
