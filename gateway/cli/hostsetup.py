"""What the installer sets up on the host and ``doctor`` checks afterwards: the BlueZ settings in
``/etc/bluetooth/main.conf`` (only keys BlueZ 5.66 — Debian 12 and Raspberry Pi OS bookworm —
reads) and the unit's network allow-list (``IPAddressAllow=``), which must admit the broker the
configuration names.

``packaging/install.sh`` runs it with the release's own Python::

    python -m gateway.cli.hostsetup bluez /etc/bluetooth/main.conf     # edit in place, idempotent
    python -m gateway.cli.hostsetup network-dropin /etc/lockgw/lockgw.toml   # print the drop-in

Pure functions below; the two commands at the bottom are the only I/O.
"""

from __future__ import annotations

import configparser
import ipaddress
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import click

from gateway.config import Config, load_config
from gateway.errors import ConfigError

__all__ = [
    "BLUEZ_MAIN_CONF",
    "BLUEZ_WANTED",
    "UNIT_PATHS",
    "NetworkCheck",
    "apply_bluez",
    "bluez_problems",
    "broker_addresses",
    "check_broker_allowed",
    "is_allowed",
    "network_dropin",
    "unit_allow_list",
]

BLUEZ_MAIN_CONF: Final = Path("/etc/bluetooth/main.conf")
#: (section, key) → (what THREATS B8–B10 want, BlueZ 5.66's default when the key is unset).
#: Every key here is in BlueZ 5.66's main.conf; ``SecureConnections`` is not (5.66 has no such
#: key: Secure Connections is a controller setting, ``btmgmt sc``), so it is not checked here.
BLUEZ_WANTED: Final = {
    ("General", "ControllerMode"): ("le", "dual"),  # B9: no BR/EDR, no cross-transport keys
    ("General", "JustWorksRepairing"): ("never", "never"),  # B9: a bonded address cannot re-pair
    ("General", "AlwaysPairable"): ("false", "false"),  # B10: pairable only with an agent
    ("GATT", "KeySize"): ("16", "0"),  # B8: no 7-byte (KNOB) encryption keys
}
_MARK: Final = "# set by lockgw (docs/install.md, BlueZ settings)"


def _parse(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return parser


def bluez_problems(text: str) -> list[str]:
    """Each setting that is not what the threat model wants, as ``Section.Key=value``
    (``(unset: default)`` when the default is what applies). Raises configparser.Error."""
    parser = _parse(text)
    wrong = []
    for (section, key), (wanted, default) in BLUEZ_WANTED.items():
        raw = parser.get(section, key, fallback=None)
        value = default if raw is None else raw.strip().lower()
        if value != wanted:
            shown = f"(unset: {default})" if raw is None else raw.strip()
            wrong.append(f"{section}.{key}={shown}")
    return wrong


def bluez_wanted_text() -> str:
    return ", ".join(f"[{s}] {k} = {v}" for (s, k), (v, _) in BLUEZ_WANTED.items())


def apply_bluez(text: str) -> str:
    """``text`` with every wanted key set: an active line with another value is replaced, a
    commented-out default gets the active line after it, a missing key goes after its section
    header, a missing section at the end. Setting what is already set changes nothing."""
    lines = text.splitlines()
    for (section, key), (wanted, _) in BLUEZ_WANTED.items():
        lines = _set(lines, section, key, wanted)
    return "\n".join(lines) + "\n"


def _set(lines: list[str], section: str, key: str, value: str) -> list[str]:
    """Every active ``key`` line in every ``[section]`` of that name gets ``value``: BlueZ
    (GKeyFile) and doctor take the last of a key given twice, or of a section given twice, so
    a weak value left after the first would still apply."""
    header = f"[{section}]"
    starts = [i for i, line in enumerate(lines) if line.strip() == header]
    if not starts:
        return [*lines, "", header, _MARK, f"{key} = {value}"]
    active = re.compile(rf"^\s*{re.escape(key)}\s*=")
    commented = re.compile(rf"^\s*#\s*{re.escape(key)}\s*=")
    found, weak = False, []
    for start in starts:
        for i in range(start + 1, _section_end(lines, start)):
            if active.match(lines[i]):
                found = True
                if lines[i].split("=", 1)[1].strip().lower() != value:
                    weak.append(i)
    if found:
        out = list(lines)
        for i in reversed(weak):
            out[i : i + 1] = [_MARK, f"{key} = {value}"]
        return out
    start, end = starts[0], _section_end(lines, starts[0])
    at = next((i + 1 for i in range(start + 1, end) if commented.match(lines[i])), start + 1)
    return [*lines[:at], _MARK, f"{key} = {value}", *lines[at:]]


def _section_end(lines: list[str], start: int) -> int:
    return next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")), len(lines))


# --- the unit's network allow-list ------------------------------------------------------------

#: Where systemd reads the installed unit and its drop-ins (sorted), relative to a root.
UNIT_PATHS: Final = ("etc/systemd/system/lockgw.service", "etc/systemd/system/lockgw.service.d")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAMED: Final[dict[str, tuple[str, ...]]] = {
    "any": ("0.0.0.0/0", "::/0"),
    "localhost": ("127.0.0.0/8", "::1/128"),
    "link-local": ("169.254.0.0/16", "fe80::/64"),
    "multicast": ("224.0.0.0/4", "ff00::/8"),
}


def unit_allow_list(texts: Iterable[str]) -> list[Network]:
    """The effective ``IPAddressAllow=`` of a unit and its drop-ins, in systemd's order
    (an empty assignment resets the list). Unparseable entries are left out."""
    allowed: list[Network] = []
    for text in texts:
        section = ""
        for line in text.splitlines():
            stripped = line.strip()
            if stripped.startswith("[") and stripped.endswith("]"):
                section = stripped[1:-1]
            elif section == "Service" and stripped.startswith("IPAddressAllow="):
                value = stripped.partition("=")[2].strip()
                if not value:
                    allowed = []
                for word in value.split():
                    for cidr in _NAMED.get(word, (word,)):
                        try:
                            allowed.append(ipaddress.ip_network(cidr, strict=False))
                        except ValueError:
                            continue
    return allowed


def is_allowed(address: Address, allowed: Sequence[Network]) -> bool:
    return any(address.version == net.version and address in net for net in allowed)


def broker_addresses(host: str) -> list[Address]:
    """The addresses a broker host name resolves to (an address literal is itself)."""
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    return sorted({ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos}, key=str)


def nameservers(resolv_conf: str) -> list[Address]:
    out: list[Address] = []
    for line in resolv_conf.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                out.append(ipaddress.ip_address(parts[1].split("%")[0]))
            except ValueError:
                continue
    return out


def network_dropin(config: Config, addresses: Sequence[Address], dns: Sequence[Address]) -> str:
    """The unit drop-in (``lockgw.service.d/50-broker.conf``) that admits the configured
    broker's ``addresses`` (and, for a broker named by host name, the ``dns`` servers the
    daemon resolves it through)."""
    url = config.mqtt.url if config.mqtt else "(no [mqtt] section)"
    # The path escaped: a newline in it would end the comment and write unit settings.
    source = str(config.source).encode("unicode_escape").decode()
    lines = [
        f"# Written by packaging/install.sh from {source}: [mqtt] url = {url}",
        "# The addresses are resolved at install time; when the broker's change, run",
        "# `install.sh reconfigure` again (lockgw doctor warns when they no longer match).",
        "[Service]",
    ]
    lines += [f"IPAddressAllow={a}" for a in addresses]
    extra = [a for a in dns if a not in addresses]
    if extra:
        lines.append("# the DNS servers of /etc/resolv.conf, which resolve the broker's name")
        lines += [f"IPAddressAllow={a}" for a in extra]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class NetworkCheck:
    status: str  # "pass" | "warn"
    detail: str
    fix: str = ""


def check_broker_allowed(config: Config, unit_texts: Sequence[str]) -> NetworkCheck:
    """Would the installed unit's ``IPAddressAllow=`` let the daemon reach its broker?"""
    if config.mqtt is None:
        return NetworkCheck("pass", "no [mqtt] section: no broker to admit")
    host, port = config.mqtt.host_port
    allowed = unit_allow_list(unit_texts)
    addresses = broker_addresses(host)
    if not addresses:
        return NetworkCheck("warn", f"{host} does not resolve", "fix [mqtt] url or DNS")
    blocked = [a for a in addresses if not is_allowed(a, allowed)]
    if blocked:
        return NetworkCheck(
            "warn",
            f"{host}:{port} → {', '.join(map(str, blocked))} is outside the unit's IPAddressAllow=: "
            "the daemon cannot reach its broker",
            "run: packaging/install.sh reconfigure (writes lockgw.service.d/50-broker.conf), "
            "then systemctl restart lockgw",
        )
    return NetworkCheck("pass", f"{host}:{port} ({', '.join(map(str, addresses))}) is allowed")


def read_unit_texts(root: Path = Path("/")) -> list[str] | None:
    """The installed unit and its drop-ins in systemd's order; None when not installed."""
    unit = root / UNIT_PATHS[0]
    if not unit.is_file():
        return None
    dropins = sorted((root / UNIT_PATHS[1]).glob("*.conf")) if (root / UNIT_PATHS[1]).is_dir() else []
    return [p.read_text(encoding="utf-8", errors="replace") for p in [unit, *dropins]]


# --- the installer's commands -----------------------------------------------------------------


@click.group()
def cli() -> None:
    """Host setup for packaging/install.sh (not part of the lockgw command line)."""


@cli.command("bluez")
@click.argument("path", type=click.Path(path_type=Path), default=BLUEZ_MAIN_CONF)
def bluez_command(path: Path) -> None:
    """Set the BlueZ keys lockgw relies on in PATH (BlueZ 5.66 main.conf), in place."""
    try:
        text = path.read_text(encoding="utf-8") if path.exists() else ""
    except UnicodeDecodeError as exc:  # left as it is: rewriting would change its other bytes
        raise click.ClickException(
            f"{path}: not UTF-8 text (byte {exc.start}); set {bluez_wanted_text()}"
        ) from None
    except OSError as exc:
        raise click.ClickException(f"{path}: cannot read: {exc.strerror}") from None
    new = apply_bluez(text)
    if new != text:
        path.write_text(new, encoding="utf-8")
        click.echo(f"{path}: set {bluez_wanted_text()}")
    else:
        click.echo(f"{path}: already hardened")


@cli.command("network-dropin")
@click.argument("config_path", type=click.Path(path_type=Path))
@click.option("--resolv-conf", type=click.Path(path_type=Path), default=Path("/etc/resolv.conf"))
def network_dropin_command(config_path: Path, resolv_conf: Path) -> None:
    """Print the IPAddressAllow= drop-in that admits the broker CONFIG_PATH names."""
    try:
        config = load_config(config_path, check_files=False)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    addresses: list[Address] = []
    dns: list[Address] = []
    if config.mqtt is not None:
        host = config.mqtt.host_port[0]
        addresses = broker_addresses(host)
        if not addresses:
            raise click.ClickException(f"[mqtt] url: {host} does not resolve")
        try:
            ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            text = resolv_conf.read_text(encoding="utf-8") if resolv_conf.exists() else ""
            dns = nameservers(text)
    click.echo(network_dropin(config, addresses, dns), nl=False)


if __name__ == "__main__":
    cli()
