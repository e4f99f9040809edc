"""Configuration files as TOML tables: read bounded, UTF-8, parsed, environment merged.

Shared by the gateway's configuration (gateway/config.py) and the receiver's
(gateway/receiver/config.py); each says what its keys mean. Imports nothing of ours but the
error tree: every failure is a :class:`~gateway.errors.ConfigError` naming the file.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from gateway.errors import ConfigError

__all__ = ["MAX_CONFIG_BYTES", "merge_env", "parse_toml", "read_text"]

#: A configuration file is small; anything larger is the wrong file.
MAX_CONFIG_BYTES: Final = 1024 * 1024


def read_text(path: Path) -> str:
    """The file as text: bounded, UTF-8."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc.strerror}") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB; not a configuration file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from exc


def parse_toml(path: Path, text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{path}: not valid TOML: nested too deeply") from exc


def merge_env(where: object, data: dict[str, Any], overrides: Mapping[str, Mapping[str, Any]]) -> None:
    """Merge ``{section: {key: value}}`` from the environment over the file's tables."""
    for section, values in overrides.items():
        current = data.setdefault(section, {})
        if not isinstance(current, dict):
            raise ConfigError(f"{where}: [{section}] must be a table")
        current.update(values)
