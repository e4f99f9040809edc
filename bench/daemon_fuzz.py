"""The long fault-and-fuzz run against the running daemon (issue: fail-safe core §7).

The CI test (tests/integration/test_daemon_attacks.py) runs a bounded number of generated cases;
this runs many more on the same site: `lockgw-sim` with two paired locks, a real mosquitto,
`lockgw run` as a process, and hypothesis-generated requests to every action (and unknown ones),
receipts and trust documents. After every case: the daemon is alive and answered; every
``--check-every`` cases and at the end: an honest unlock on each lock succeeds and the store is
gap-free, hash-chained, with one ``gateway.started``.

Run: .venv/bin/python bench/daemon_fuzz.py [--cases 10000] [--check-every 500] [--seed 1]
Prints {"cases", "answered", "crashes", "hangs", "honest_unlocks", "events", "restarts", "seconds",
"log_lines", "error_log_lines"} (an error line is a crash or a failure the daemon logged).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))

from broker import Broker
from daemonfix import Case, Site, attack_cases, make_site
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st


def fuzz(site: Site, *, cases: int, check_every: int, rng_seed: int) -> dict[str, object]:
    stats = {"cases": 0, "answered": 0, "crashes": 0, "hangs": 0, "honest_unlocks": 0}
    t0 = time.monotonic()
    with asyncio.Runner() as runner:
        client = runner.run(site.session())

        def honest() -> None:
            for lock in site.locks:
                answer = runner.run(site.unlock(client, lock))
                assert answer["status"] == "ok", answer
                stats["honest_unlocks"] += 1
            site.check_store()

        @seed(rng_seed)
        @settings(max_examples=cases, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=attack_cases(site.locks) | st.nothing())
        def one(case: Case) -> None:
            stats["cases"] += 1
            try:
                runner.run(site.attack(client, case))
                stats["answered"] += 1
            except TimeoutError:
                stats["hangs"] += 1
            if not site.alive():
                stats["crashes"] += 1
                raise AssertionError(site.daemon.output()[-4000:])
            if stats["cases"] % check_every == 0:
                honest()
                print(json.dumps({**stats, "seconds": round(time.monotonic() - t0)}), file=sys.stderr)

        one()
        honest()
        runner.run(client.__aexit__(None, None, None))
    events = site.check_store()
    return {
        **stats,
        "events": len(events),
        "restarts": sum(e["type"] == "gateway.started" for e in events) - 1,
        "seconds": round(time.monotonic() - t0, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--check-every", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lockgw-fuzz-"))
    broker = Broker(work)
    broker.start()
    (work / "site").mkdir()
    site, sim = make_site(work / "site", broker)
    try:
        result = fuzz(site, cases=args.cases, check_every=args.check_every, rng_seed=args.seed)
        assert site.daemon.stop() == 0
        levels = [
            json.loads(line).get("level")
            for line in site.daemon.output().splitlines()
            if line.startswith("{")
        ]
        result["log_lines"] = len(levels)
        result["error_log_lines"] = sum(level in ("error", "critical") for level in levels)
        print(json.dumps(result))
    finally:
        if site.alive():
            site.daemon.proc.kill()
        sim.terminate()
        sim.communicate(timeout=10)
        broker.stop()


if __name__ == "__main__":
    main()
