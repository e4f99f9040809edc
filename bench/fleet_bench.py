"""1,000 gateways through a 3-node RabbitMQ cluster into PostgreSQL (issue 13; docs/benchmarks.md).

Run: .venv/bin/python bench/fleet_bench.py [--gateways 1000] [--daemons 20] [--receivers 2]
       [--shift-s 60] [--compress 60] [--per-min 3] [--burst 20] [--outage-min 60] [--raw 20000]

Everything is private (tests/rabbit.py, tests/fleetfix.py): a 3-node cluster, a PostgreSQL,
``--receivers`` ``lockgw-receiver`` processes (AMQP, one quorum queue), ``--daemons`` real
``lockgw run`` daemons on simulated locks (MQTT 3.1.1; events from door sensors and CLI
unlocks) and the rest simulated gateways (tests/fleetgw.py, the contract's gateway side, all
in this process, one MQTT connection each).

Phases, in one run on the same cluster:
1. **raw**: the cluster's own rate — ``--raw`` QoS 1 MQTT publishes (16 connections, PUBACKed)
   and ``--raw`` AMQP publishes with publisher confirms, into a quorum queue bound like the
   events queue. The baseline the fleet's rates are divided by.
2. **shift**: ``--shift-s`` seconds of a time-compressed care shift (``--compress`` simulated s
   per s; ``--per-min`` events a simulated minute per site, ``--burst`` more at each shift
   change). Sustained stored/s (PostgreSQL rows) and receipted/s (receipts the simulated
   gateways took), receipt latency (commit → receipt, per event), receivers' CPU and RSS.
3. **outage**: every simulated site offline for ``--outage-min`` simulated minutes (its
   events committed meanwhile, the same rate), then all back at once: the time until every
   site's receipt_seq reaches its last seq (time to drain), and the drain rate.
4. **check** from PostgreSQL alone (tests/fleetrun.py): lost 0, stored twice 0, chains, gaps.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import aio_pika
import aiomqtt
from fleetfix import Postgres, new_database
from fleetgw import Shift, SimGateway, shift_event
from fleetrun import Fleet, RealSite, check_postgres, open_fleet, start_real_site, stored_count
from rabbit import RabbitCluster


def proc_cpu_rss(pid: int) -> tuple[float, float]:
    """(CPU seconds used, RSS MiB) of a process, from /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = 100.0
    cpu = (int(stat[11]) + int(stat[12])) / ticks
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    return cpu, rss


def receivers_usage(fleet: Fleet) -> list[tuple[float, float]]:
    return [proc_cpu_rss(r.proc.pid) for r in fleet.receivers if r.proc is not None]


async def raw_rates(rc: RabbitCluster, n: int) -> dict[str, float]:
    """The cluster's own publish rates into a quorum queue: MQTT QoS 1 and AMQP with confirms."""
    await rc.declare_events_queue("raw.q", base="raw")
    body = json.dumps({"v": 1, "pad": "x" * 420})  # about an event's size
    clients = 16

    async def mqtt_one(i: int) -> None:
        node = rc.nodes[i % len(rc.nodes)]
        async with aiomqtt.Client("127.0.0.1", node.mqtt_port, identifier=f"raw-{i}", timeout=60) as c:
            c.pending_calls_threshold = 1000
            per = n // clients
            for start in range(0, per, 64):
                await asyncio.gather(
                    *(c.publish(f"raw/r{i}/events", body, qos=1) for _ in range(min(64, per - start)))
                )

    t0 = time.perf_counter()
    await asyncio.gather(*(mqtt_one(i) for i in range(clients)))
    mqtt_rate = (n // clients * clients) / (time.perf_counter() - t0)
    conn = await aio_pika.connect(rc.nodes[1].amqp_url, timeout=30)
    async with conn:
        ch = await conn.channel(publisher_confirms=True)
        ex = await ch.get_exchange("amq.topic")
        t0 = time.perf_counter()
        for start in range(0, n, 200):
            await asyncio.gather(
                *(
                    ex.publish(aio_pika.Message(body.encode(), delivery_mode=2), routing_key="raw.a.events")
                    for _ in range(min(200, n - start))
                )
            )
        amqp_rate = n / (time.perf_counter() - t0)
        q = await ch.declare_queue("raw.q", durable=True, passive=True)
        await q.delete(if_unused=False, if_empty=False)
    return {"mqtt_qos1_publish_per_s": round(mqtt_rate), "amqp_confirmed_publish_per_s": round(amqp_rate)}


def door_flow(site: RealSite, stop: threading.Event, every_s: float) -> None:
    """Door sensor changes on the daemon's simulated locks (lock log → events), and a CLI
    unlock every tenth step."""
    i = 0
    while not stop.wait(every_s):
        lock = site.field.locks[i % len(site.field.locks)]["lock"]
        try:
            if i % 10 == 9:
                site.field.act("unlock", site.locks[i % len(site.locks)], ok=None)
                site.unlocks += 1
            else:
                site.field.fault(lock, "door", "open" if (i // 2) % 2 == 0 else "closed")
        except Exception as exc:  # a busy daemon refuses; the flow goes on
            print(f"{site.gw}: {exc}", file=sys.stderr)
        i += 1


def percentile(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


async def main(args: argparse.Namespace) -> dict[str, Any]:  # noqa: C901, PLR0912 - one run, top to bottom
    tmp = Path(tempfile.mkdtemp(prefix="lockgw-fleet-bench-"))
    report: dict[str, Any] = {"args": vars(args)}
    rc = RabbitCluster(tmp / "rabbit", nodes=3)
    rc.start()
    report["cluster_start_s"] = round(rc.start_s, 1)
    pg = Postgres()
    pg.start()
    sites: list[RealSite] = []
    fleet: Fleet | None = None
    stop_doors = threading.Event()
    try:
        report["raw"] = await raw_rates(rc, args.raw)
        dsn = await new_database(pg)
        fleet = await open_fleet(
            tmp, rc, pg, dsn, receivers=args.receivers, batch_max=500,
            gap_replay_after_s=args.gap_replay_after_s, replay_retry_s=args.replay_retry_s,
        )  # fmt: skip
        for i in range(args.receivers):
            fleet.receivers.append(await asyncio.to_thread(fleet.receiver, i))
        # Real daemons, started four at a time.
        t0 = time.monotonic()
        sem = asyncio.Semaphore(4)

        async def one_site(i: int) -> RealSite:
            async with sem:
                node = rc.nodes[i % 3]
                return await asyncio.to_thread(
                    start_real_site, tmp / f"site-{i}", f"gw-real-{i:02d}", node, fleet.base, seed=200 + i
                )

        started = await asyncio.gather(*(one_site(i) for i in range(args.daemons)), return_exceptions=True)
        sites = [s for s in started if isinstance(s, RealSite)]  # closed in finally, whatever happens
        for s in sites:
            # The daemons and their simulators at nice 10: on a small machine their idle work
            # (≈ 40 processes) would otherwise starve the one process that drives the simulated
            # gateways, and the bench would measure its own harness.
            for pid in (s.daemon.proc.pid, s.field.sim.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.setpriority(os.PRIO_PROCESS, pid, 10)
        fleet.sites = sites
        failed = [s for s in started if not isinstance(s, RealSite)]
        if failed:
            raise RuntimeError(f"{len(failed)} of {args.daemons} daemons did not start: {failed[0]!r}"[:2000])
        report["daemons_start_s"] = round(time.monotonic() - t0, 1)
        # Simulated gateways, connected 50 at a time.
        n_sims = args.gateways - args.daemons
        t0 = time.monotonic()
        for i in range(n_sims):
            node = rc.nodes[i % 3]
            gw = SimGateway(
                f"sim-{i:04d}", site=f"site-{i:04d}", host="127.0.0.1", port=node.mqtt_port, base=fleet.base,
                heartbeat_s=60.0, republish_after_s=60.0, max_backoff_s=10.0,
            )  # fmt: skip
            await gw.__aenter__()
            fleet.sims.append(gw)
            if i % 50 == 49:
                await asyncio.sleep(0.2)
        async with asyncio.timeout(600):
            for gw in fleet.sims:
                await gw.connected.wait()
        report["sims_connect_s"] = round(time.monotonic() - t0, 1)
        gws = [g.gw for g in fleet.sims] + [s.gw for s in sites]
        # --- shift ----------------------------------------------------------------------
        doors = [
            threading.Thread(target=door_flow, args=(s, stop_doors, args.door_every_s), daemon=True)
            for s in sites
        ]
        for t in doors:
            t.start()
        shift = Shift(
            per_min=args.per_min, burst=args.burst, shift_min=args.shift_min, compress=args.compress
        )
        rng = random.Random(5)
        for g in fleet.sims:
            g.stats.receipt_latency_s.clear()
        stored0, rcpt0, use0, t0 = (
            await stored_count(dsn, gws),
            sum(g.receipt_seq for g in fleet.sims),
            receivers_usage(fleet),
            time.monotonic(),
        )
        minutes = args.shift_s * args.compress / 60
        await asyncio.gather(
            *(shift.run(g, minutes=minutes, rng=random.Random(rng.random())) for g in fleet.sims)
        )
        dt = time.monotonic() - t0
        stored1, rcpt1, use1 = (
            await stored_count(dsn, gws),
            sum(g.receipt_seq for g in fleet.sims),
            receivers_usage(fleet),
        )
        lat = [x for g in fleet.sims for x in g.stats.receipt_latency_s]
        report["shift"] = {
            "seconds": round(dt, 1),
            "committed": sum(g.last_seq for g in fleet.sims),
            "stored_per_s": round((stored1 - stored0) / dt, 1),
            "receipted_per_s": round((rcpt1 - rcpt0) / dt, 1),
            "receipt_latency_p50_ms": round(percentile(lat, 50) * 1000, 1),
            "receipt_latency_p99_ms": round(percentile(lat, 99) * 1000, 1),
            "receiver_cpu_pct": [round((b[0] - a[0]) / dt * 100, 1) for a, b in zip(use0, use1, strict=True)],
            "receiver_rss_mib": [round(b[1], 1) for b in use1],
        }
        # --- outage and drain -----------------------------------------------------------
        async with asyncio.timeout(600):
            for g in fleet.sims:
                await g.wait_receipted(g.last_seq)
        for g in fleet.sims:
            g.go_offline()
        per_site = 0
        for g in fleet.sims:
            n = max(1, round(args.per_min * args.outage_min))
            for _ in range(n):
                g.commit(shift_event(rng, g))
            per_site = n
        backlog = sum(g.backlog for g in fleet.sims)
        use0, t0 = receivers_usage(fleet), time.monotonic()
        stored0 = await stored_count(dsn, gws)
        for g in fleet.sims:
            g.go_online()
        async with asyncio.timeout(3600):
            for g in fleet.sims:
                await g.wait_receipted(g.last_seq)
        dt = time.monotonic() - t0
        use1 = receivers_usage(fleet)
        stored1 = await stored_count(dsn, gws)
        report["outage"] = {
            "sites": len(fleet.sims),
            "simulated_minutes": args.outage_min,
            "events_per_site": per_site,
            "backlog": backlog,
            "drain_s": round(dt, 1),
            "drain_stored_per_s": round((stored1 - stored0) / dt, 1),
            "receiver_cpu_pct": [round((b[0] - a[0]) / dt * 100, 1) for a, b in zip(use0, use1, strict=True)],
            "receiver_rss_mib": [round(b[1], 1) for b in use1],
        }
        stop_doors.set()
        for t in doors:
            t.join(60)
        report["daemons"] = {"count": len(sites), "unlocks": sum(s.unlocks for s in sites)}
        report["check"] = await check_postgres(fleet, within_s=900)
        raw = report["raw"]["mqtt_qos1_publish_per_s"]
        report["ratios"] = {
            "drain_stored_vs_raw_mqtt": round(report["outage"]["drain_stored_per_s"] / raw, 3),
            "drain_stored_vs_raw_amqp": round(
                report["outage"]["drain_stored_per_s"] / report["raw"]["amqp_confirmed_publish_per_s"], 3
            ),
        }
        lat_all = statistics.mean(lat) if lat else float("nan")
        report["shift"]["receipt_latency_mean_ms"] = round(lat_all * 1000, 1)
        return report
    finally:
        stop_doors.set()
        if fleet is not None:
            for g in fleet.sims:
                await g.__aexit__(None, None, None)
            for r in fleet.receivers:
                r.kill()
        for s in sites:
            await asyncio.to_thread(s.close)
        pg.destroy()
        rc.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--gateways", type=int, default=1000)
    p.add_argument("--daemons", type=int, default=20)
    p.add_argument("--receivers", type=int, default=2)
    p.add_argument("--shift-s", type=float, default=60.0)
    p.add_argument("--compress", type=float, default=60.0)
    p.add_argument("--per-min", type=float, default=3.0)
    p.add_argument("--burst", type=int, default=20)
    p.add_argument("--shift-min", type=float, default=480.0)
    p.add_argument("--outage-min", type=float, default=60.0)
    p.add_argument("--door-every-s", type=float, default=5.0)
    p.add_argument("--raw", type=int, default=20000)
    # The receiver's production defaults (config/receiver.toml), not the fault test's quick ones.
    p.add_argument("--gap-replay-after-s", type=float, default=10.0)
    p.add_argument("--replay-retry-s", type=float, default=60.0)
    print(json.dumps(asyncio.run(main(p.parse_args())), indent=1))
