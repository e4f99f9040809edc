"""Layering rules, enforced: protocols/ is sans-I/O; firmware_sim imports only protocols."""

from __future__ import annotations

import ast
import importlib
import os
import pkgutil
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN_IN_PROTOCOLS = {
    "asyncio",
    "bleak",
    "bumble",
    "aiomqtt",
    "sqlite3",
    "socket",
    "paho",
    "trio",
    "anyio",
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def py_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", py_files("protocols"), ids=lambda p: p.name)
def test_protocols_is_sans_io(path: Path) -> None:
    bad = imports_of(path) & FORBIDDEN_IN_PROTOCOLS
    assert not bad, f"{path.name} imports {sorted(bad)}: protocols/ must stay free of I/O"
    assert not imports_of(path) & {"gateway", "firmware_sim"}


@pytest.mark.parametrize("path", py_files("firmware_sim"), ids=lambda p: p.name)
def test_firmware_sim_imports_only_protocols(path: Path) -> None:
    assert "gateway" not in imports_of(path)


def test_the_check_catches_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "x.py"
    bad.write_text("import asyncio\nfrom sqlite3 import connect\n")
    assert imports_of(bad) & FORBIDDEN_IN_PROTOCOLS == {"asyncio", "sqlite3"}


@pytest.mark.parametrize("package", ["protocols", "gateway", "firmware_sim"])
def test_every_module_declares_all_and_exports_exist(package: str) -> None:
    pkg = importlib.import_module(package)
    for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        exported = getattr(module, "__all__", None)
        assert exported is not None, f"{info.name} has no __all__"
        for name in exported:
            assert hasattr(module, name), f"{info.name}.__all__ names missing {name}"


#: Secret material that must never be committed or shipped (THREATS B12, B13). Test vectors are
#: public by design: their keys come from seeded generators and open nothing.
SECRET_PATTERNS = {
    "PEM private key": re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "inline password": re.compile(rb"""(?m)^\s*password\s*=\s*["'][^"']+["']"""),
    "AWS-style access key": re.compile(rb"AKIA[0-9A-Z]{16}"),
}
SECRET_FILE_SUFFIXES = {".key", ".pem", ".p12", ".pfx", ".jks"}
NOT_OURS = {".git", ".venv", ".tools", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"}


def repository_files() -> list[Path]:
    out = []
    for top, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in NOT_OURS]  # pruned, not walked and filtered
        out += [Path(top, f) for f in files]
    return out


def test_B12_no_private_keys_or_passwords_in_the_repository_or_the_wheel() -> None:
    # The wheel ships gateway/, protocols/ and firmware_sim/: they are scanned with the rest.
    found = []
    for path in repository_files():
        rel = path.relative_to(ROOT)
        if rel.parts[0] == "tests" and rel.parts[1] == "vectors":
            continue
        if path.suffix in SECRET_FILE_SUFFIXES:
            found.append(f"{rel}: a key file")
        data = path.read_bytes()
        found += [f"{rel}: {what}" for what, rx in SECRET_PATTERNS.items() if rx.search(data)]
    assert not found, found


def test_the_secret_scan_catches_what_it_looks_for() -> None:
    pem = b"-----BEGIN " + b"PRIVATE KEY-----\nMIIE\n"
    assert SECRET_PATTERNS["PEM private key"].search(pem)
    assert SECRET_PATTERNS["inline password"].search(b'[mqtt]\npassword = "hunter2"\n')
    assert not SECRET_PATTERNS["inline password"].search(b'password_file = "/etc/lockgw/mqtt.pw"\n')
