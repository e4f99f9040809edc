"""The long kill -9 soak (THREATS D1/D11/A8): the CI test's loop, for many more iterations.

Run: .venv/bin/python bench/soak_kill9.py [--iterations 1000] [--seed 1]
One simulator process serves every gateway process (killed idle, mid-connect, mid-command in
turn). Prints {"iterations", "kills", "ok_responses", "events", "lost", "gaps", "duplicates",
"restart_to_status_s", "status_s"}; any loss, gap, duplicate (lock, lock_seq), ok response
without its access.granted, lock unreachable after a restart or simulator crash fails with an
assertion.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))

from test_gateway_kill9 import run_kill9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(
        json.dumps(
            run_kill9(
                Path(tempfile.mkdtemp(prefix="lockgw-soak-")), iterations=args.iterations, seed=args.seed
            ),
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
