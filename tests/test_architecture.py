"""Layering rules, enforced: protocols/ is sans-I/O; firmware_sim imports only protocols."""

from __future__ import annotations

import ast
import importlib
import pkgutil
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
