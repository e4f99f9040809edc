"""The architecture's measures (docs/architecture.md, Measures), for a source tree.

    .venv/bin/python bench/architecture_measures.py [ROOT]

ROOT defaults to this checkout; to measure an older commit, unpack it first
(``git archive COMMIT | tar -x -C /tmp/before``) and pass that directory. Prints one JSON
object: modules per package, the five longest functions (lines, decorators excluded), the five
highest cyclomatic complexities (ruff's mccabe, the same numbers C901 checks), and how many
lines of gateway/ write ``dict[str, Any]``. Import cycles are import-linter's
(``lint-imports --no-cache``, the acyclic_siblings contract)."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

PACKAGES = ("gateway", "protocols", "firmware_sim")
RUFF = Path(sys.executable).with_name("ruff")


def modules_per_package(root: Path) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            counts[str(path.parent.relative_to(root))] += 1
    return dict(sorted(counts.items()))


def longest_functions(root: Path, top: int = 5) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno:
                    lines = node.end_lineno - node.lineno + 1
                    found.append((lines, f"{path.relative_to(root)}::{node.name}"))
    return sorted(found, reverse=True)[:top]


def complexities(root: Path, top: int = 5, *, under: str = "") -> list[tuple[int, str]]:
    proc = subprocess.run(
        [
            str(RUFF),
            "check",
            "--isolated",
            "--ignore-noqa",
            "--select",
            "C901",
            "--config",
            "lint.mccabe.max-complexity=0",
            "--output-format",
            "json",
            *PACKAGES,
        ],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    out = []
    for item in json.loads(proc.stdout):
        m = re.match(r"`(.+)` is too complex \((\d+) > 0\)", item["message"])
        if m:
            where = Path(item["filename"]).resolve().relative_to(root.resolve())
            out.append((int(m.group(2)), f"{where}::{m.group(1)}"))
    return sorted((c for c in out if c[1].startswith(under)), reverse=True)[:top]


def dict_any(root: Path) -> int:
    """Lines of gateway/ that write ``dict[str, Any]`` (as ``grep -c`` counts them)."""
    return sum(
        sum("dict[str, Any]" in line for line in p.read_text().splitlines())
        for p in (root / "gateway").rglob("*.py")
    )


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent
    print(
        json.dumps(
            {
                "modules": modules_per_package(root),
                "longest": longest_functions(root),
                "complexity": complexities(root),
                "complexity_gateway": complexities(root, under="gateway/"),
                "longest_gateway": [
                    f for f in longest_functions(root, top=100) if f[1].startswith("gateway/")
                ][:5],
                "dict_str_any": dict_any(root),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
