"""Time to update a site: N simulated locks with SMP and MCUboot, the gateway's LinkManager with S
connection slots, one signed rollout in rings (a canary, a fraction, the rest) run to the end
by the gateway's own state machine (gateway/firmware/rollout.py), docs/benchmarks.md.

The locks run in a ``lockgw-sim serve`` process (``--in-process``: on this process's loop);
the gateway reaches them over HCI/TCP as ``lockgw run`` does. Reports the wall time, each
ring's, per lock the upload, reset and health-check times (from the rollout's events), the
aggregate bytes/s and how the locks' time splits.

Run: .venv/bin/python bench/firmware_fleet_bench.py [--locks 50] [--slots 4] [--kib 128]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fwfleet import fw_site, rollout_fleet


async def run(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--locks", type=int, default=50)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--kib", type=int, default=128, help="image body size (KiB)")
    parser.add_argument("--canary", type=int, default=1)
    parser.add_argument("--fraction", type=int, default=20, help="ring 2: percent of the rest")
    parser.add_argument("--in-process", action="store_true", help="the simulator on this loop")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lockgw-fwfleet-") as tmp:
        t0 = time.perf_counter()
        async with fw_site(
            Path(tmp), locks=args.locks, slots=args.slots, process=not args.in_process
        ) as site:
            set_up = time.perf_counter() - t0
            result = await rollout_fleet(site, kib=args.kib, canary=args.canary, fraction=args.fraction)
    result["set_up_s (simulator start, pairing)"] = round(set_up, 1)
    result["simulator"] = "in this process" if args.in_process else "own process"
    result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    result = asyncio.run(run(argv))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
