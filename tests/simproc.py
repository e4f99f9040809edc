"""Start `lockgw-sim serve` as a child process on a tcp-server transport."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def start_sim(
    port: int,
    *,
    seed: int,
    locks: int = 2,
    extra: tuple[str, ...] = (),
    stderr: Path | None = None,
) -> tuple[subprocess.Popen[str], list[dict[str, str]]]:
    """Return the process (stdin/stdout pipes open for fault commands) and its lock lines.

    ``stderr``: a file that takes the simulator's log (else it goes to ours)."""
    err = stderr.open("w") if stderr is not None else None
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "firmware_sim",
                "serve",
                "--locks",
                str(locks),
                "--seed",
                str(seed),
                "--transport",
                f"tcp-server:127.0.0.1:{port}",
                *extra,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
    finally:
        if err is not None:
            err.close()  # the child holds its own descriptor
    assert proc.stdout is not None
    found = []
    while True:
        line = proc.stdout.readline()
        assert line, "simulator exited early"
        obj = json.loads(line)
        if obj.get("ready"):
            return proc, found
        found.append(obj)
