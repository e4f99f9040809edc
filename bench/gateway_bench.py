"""Gateway-added latency, many locks, memory and start-up — against the simulator over HCI/TCP.

The simulator runs in its own process (`lockgw-sim serve --transport tcp-server:…`, radio
timing off) so the RSS reported is the gateway's. Measured in one run:

1. 50 concurrent unlock requests across 20 locks, 4 connection slots: gateway-added latency =
   (request → command handed to the link) + (lock reply → response), p50/p99; baseline in the
   same run: the command itself (BLE connect + handshake + exchange), p50/p99. Twice: all 50
   handed over in the same instant (a burst: the worst case), and 50 kept in flight by 50
   clients that each send the next request when the last is answered (sustained).
2. N locks (default 200) on one gateway, 4 slots: unlock throughput and tail latency.
3. Start-up to READY with N paired locks; peak RSS.

Run: .venv/bin/python bench/gateway_bench.py [--locks 40] [--adv-interval-ms 20]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from broker import free_port
from credfix import SITE, T0, World
from simproc import start_sim

from gateway.authz.clock import ManualClock
from gateway.ble.bumble_backend import BumbleHost
from gateway.ble.links import LinkManager
from gateway.ble.registry import LockRecord, Registry
from gateway.config import load_config
from gateway.runtime.app import Gateway
from gateway.runtime.service import Service
from gateway.store.outbox import Outbox
from protocols import issuer

GW = "gw-bench"


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(p * len(xs)))], 2)


async def prepare(svc: Service, w: World, lock: str) -> bytes:
    """What a phone sends: a token, and a proof over a fresh challenge (made before the burst, so
    the phones' signing is not on the gateway's clock)."""
    tok = w.token(locks=[lock], iat=T0 - 10)
    ch = await svc.handle("challenge", json.dumps({"lock": lock}).encode())
    nonce = base64.urlsafe_b64decode(ch["data"]["nonce"] + "==")
    proof = issuer.proof(w.holder, token_bytes=tok, nonce=nonce, gw=GW, lock=lock, act="unlock")
    b64 = lambda b: base64.urlsafe_b64encode(b).decode().rstrip("=")  # noqa: E731
    return json.dumps({"lock": lock, "token": b64(tok), "proof": b64(proof)}).encode()


async def burst(svc: Service, w: World, locks: list[str]) -> list[dict]:
    """Every request prepared, then all handed to the gateway at once."""
    bodies = [await prepare(svc, w, lock) for lock in locks]
    return await asyncio.gather(*(svc.handle("unlock", body) for body in bodies))


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--locks", type=int, default=40)
    parser.add_argument(
        "--adv-interval-ms",
        type=int,
        default=20,
        help="simulated advertising interval; connections wait for the next advert",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lockgw-gwbench-"))
    port = free_port()
    # Connections wait for the lock's next advert, so the interval bounds connect time; the
    # simulated air delivers every advert to every controller (O(locks²) in Python), which is
    # what limits how many simulated locks one core can carry.
    sim, lock_lines = start_sim(
        port, seed=3, locks=args.locks, extra=("--adv-interval-ms", str(args.adv_interval_ms))
    )
    report: dict[str, object] = {"locks": args.locks}
    try:
        w = World()
        clock = ManualClock(T0)
        async with BumbleHost(transport=f"tcp-client:127.0.0.1:{port}") as host:
            registry = Registry(work / "locks.sqlite3")
            authz = w.authorizer(work, clock, gw_id=GW)
            authz.install(w.keyring())
            async with (
                Outbox(work / "events.sqlite3", gw=GW, site=SITE, wall=clock.wall) as outbox,
                LinkManager(gw_id=GW, backend=host.client_backend(), max_connections=4) as links,
            ):
                t0 = time.perf_counter()
                for n, line in enumerate(lock_lines, 1):
                    done = await links.pair(line["address"], line["setup_code"])
                    if n % 20 == 0:
                        print(f"paired {n}", file=sys.stderr, flush=True)
                    registry.put(LockRecord(done.lock_id, line["address"], "d", done.ltk))
                report["pairing_s_per_lock"] = round((time.perf_counter() - t0) / len(lock_lines), 3)
                svc = Service(GW, SITE, authz, outbox, registry, links)
                svc.trace = []
                ids = [r.lock for r in registry.all()]
                # 1. 50 concurrent requests across 20 locks
                results = await burst(svc, w, [ids[i % 20] for i in range(50)])
                assert all(r["status"] == "ok" for r in results), results[:3]
                added = [((c - t0) + (out - r)) * 1000 for t0, c, r, out in svc.trace]
                command = [(r - c) * 1000 for _, c, r, _ in svc.trace]
                report["concurrent_50_on_20_locks"] = {
                    "gateway_added_ms": {"p50": pct(added, 0.5), "p99": pct(added, 0.99)},
                    "baseline_command_ms": {"p50": pct(command, 0.5), "p99": pct(command, 0.99)},
                }
                # 1b. 50 in flight, sustained: 50 clients, each sending its next request when
                # the previous is answered (so arrivals spread as answers come back); the first
                # 50 (the opening burst) are left out of the statistics.
                svc.trace = []
                queue = [await prepare(svc, w, ids[i % 20]) for i in range(300)]

                async def client() -> None:
                    while queue:
                        answer = await svc.handle("unlock", queue.pop())
                        assert answer["status"] == "ok", answer

                await asyncio.gather(*(client() for _ in range(50)))
                steady = sorted(svc.trace)[50:]
                added = [((c - t0) + (out - r)) * 1000 for t0, c, r, out in steady]
                command = [(r - c) * 1000 for _, c, r, _ in steady]
                report["sustained_50_in_flight_on_20_locks"] = {
                    "requests": len(steady),
                    "gateway_added_ms": {"p50": pct(added, 0.5), "p99": pct(added, 0.99)},
                    "baseline_command_ms": {"p50": pct(command, 0.5), "p99": pct(command, 0.99)},
                }
                # 2. every lock once, all at once
                svc.trace = []
                bodies = [await prepare(svc, w, lock) for lock in ids]
                t0 = time.perf_counter()
                results = await asyncio.gather(*(svc.handle("unlock", body) for body in bodies))
                elapsed = time.perf_counter() - t0
                assert all(r["status"] == "ok" for r in results)
                total = [(out - t_in) * 1000 for t_in, _, _, out in svc.trace]
                report["all_locks_at_once"] = {
                    "unlocks_per_s": round(len(ids) / elapsed, 1),
                    "latency_ms": {
                        "p50": pct(total, 0.5),
                        "p99": pct(total, 0.99),
                        "max": round(max(total), 1),
                    },
                }
            registry.close()
            authz.close()
        # 3. start-up to READY with N paired locks, through the configured Bumble transport
        cfg = work / "lockgw.toml"
        cfg.write_text(
            f'[gateway]\nid = "{GW}"\nsite = "{SITE}"\ndata_dir = "{work}"\n[control]\nsocket = "{work}/ctl.sock"\n'
            f'[ble]\nbackend = "bumble"\ntransport = "tcp-client:127.0.0.1:{port}"\n'
        )
        config = load_config(cfg, env={})
        t0 = time.perf_counter()
        gw = Gateway(config, housekeeping_s=3600)
        await gw.__aenter__()
        report["startup_to_ready_s"] = round(time.perf_counter() - t0, 3)
        await gw.__aexit__(None, None, None)
        report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    finally:
        sim.terminate()
        sim.communicate(timeout=30)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
