"""Issue 11: the CLI's adapters depend on narrow Protocols, not on the runtime's Gateway."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports: module level, deferred, and under TYPE_CHECKING."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


@pytest.mark.parametrize("module", ["gateway/cli/commands.py", "gateway/cli/doctor.py"])
def test_the_control_commands_and_doctor_never_import_the_gateway(module: str) -> None:
    assert "gateway.runtime.app" not in imported_modules(ROOT / module)


def test_the_check_sees_a_deferred_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from gateway.runtime.app import Gateway\n    return Gateway\n")
    assert "gateway.runtime.app" in imported_modules(probe)
