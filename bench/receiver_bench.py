"""Receiver throughput on one machine, against the same broker's raw rate measured in the same run.

For each transport (mosquitto MQTT 5 shared subscription; RabbitMQ 3.10 AMQP quorum queue with
gateways publishing MQTT 3.1.1 into its MQTT plugin):

1. **raw**: the same events published by the same publishers (QoS 1) to a bare consumer that
   only counts (an MQTT 5 subscriber; an AMQP consumer with auto-ack on an equal quorum queue);
2. **receiver**: R `lockgw-receiver` processes storing into a private PostgreSQL (fsync on);
   the publishers subscribe to their receipts. Measured: events/s stored *and* receipted (first
   publish to the last receipt covering every gateway's last seq), receipt latency p50/p99 (an
   event's publish to the first receipt covering it), receiver CPU seconds and peak RSS.

Contract-faithful publishers: events sealed as the outbox does (tests/fleetfix.py ``chain``),
G gateways per MQTT client connection, interleaved. Baselines and runs share the machine.

Run: .venv/bin/python bench/receiver_bench.py [--gateways 200] [--events 100] [--receivers 2]
     [--transport mqtt,amqp] [--batch 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aio_pika
import aiomqtt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from broker import Broker
from fleetfix import (
    Postgres,
    RabbitNode,
    ReceiverProc,
    chain,
    new_database,
    payload,
    pg_fetch,
    rabbit_node,
    receiver_config,
)

PER_CLIENT = 10  # gateways sharing one publisher connection
WINDOW = 64  # QoS 1 publishes in flight per connection (the gateway's PUBLISH_WINDOW)


def proc_usage(pid: int) -> tuple[float, int]:
    """(CPU seconds, peak RSS bytes) of a live process, from /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(stat[11]) + int(stat[12])) / ticks
    hwm = next(
        line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmHWM")
    )
    return cpu, int(hwm.split()[1]) * 1024


class Publishers:
    def __init__(self, host_port: tuple[str, int], base: str, gws: list[str], *, v5: bool) -> None:
        self.base, self.gws = base, gws
        self.host, self.port = host_port
        self.v5 = v5
        self.clients: list[aiomqtt.Client] = []
        self.sent_at: dict[tuple[str, int], float] = {}
        self.receipt: dict[str, int] = dict.fromkeys(gws, 0)
        self.latency: list[float] = []
        self.done = asyncio.Event()
        self.want = 0

    async def __aenter__(self) -> Publishers:  # noqa: PYI034 - a bench helper, never subclassed
        for _ in range(0, len(self.gws), PER_CLIENT):
            c = aiomqtt.Client(
                self.host, self.port, identifier=f"bench-{secrets.token_hex(4)}",
                protocol=aiomqtt.ProtocolVersion.V5 if self.v5 else aiomqtt.ProtocolVersion.V311,
                max_inflight_messages=200,
            )  # fmt: skip
            await c.__aenter__()
            self.clients.append(c)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for c in self.clients:
            await c.__aexit__(None, None, None)

    async def listen_receipts(self) -> list[asyncio.Task[None]]:
        async def one(c: aiomqtt.Client, gws: list[str]) -> None:
            for g in gws:
                await c.subscribe(f"{self.base}/{g}/receipt", qos=1)
            async for m in c.messages:
                gw = str(m.topic).split("/")[1]
                seq = json.loads(m.payload)["seq"]
                now = time.perf_counter()
                for s in range(self.receipt[gw] + 1, seq + 1):
                    t = self.sent_at.get((gw, s))
                    if t is not None:
                        self.latency.append(now - t)
                self.receipt[gw] = max(self.receipt[gw], seq)
                if all(v >= self.want for v in self.receipt.values()):
                    self.done.set()

        tasks = []
        for i, c in enumerate(self.clients):
            tasks.append(asyncio.create_task(one(c, self.gws[i * PER_CLIENT : (i + 1) * PER_CLIENT])))
        await asyncio.sleep(0.5)
        return tasks

    async def publish(self, chains: dict[str, list[dict[str, Any]]], topic: str | None = None) -> None:
        n = len(next(iter(chains.values())))
        self.want = n

        async def send(c: aiomqtt.Client, g: str, i: int) -> None:
            self.sent_at[(g, i + 1)] = time.perf_counter()
            await c.publish(topic or f"{self.base}/{g}/events", payload(chains[g][i]), qos=1)

        async def one(c: aiomqtt.Client, gws: list[str]) -> None:
            # A window of QoS 1 publishes in flight per connection, as the gateway's drain does.
            order = [(g, i) for i in range(n) for g in gws]
            for k in range(0, len(order), WINDOW):
                await asyncio.gather(*(send(c, g, i) for g, i in order[k : k + WINDOW]))

        await asyncio.gather(
            *(one(c, self.gws[k * PER_CLIENT : (k + 1) * PER_CLIENT]) for k, c in enumerate(self.clients))
        )


async def raw_mqtt(
    broker: Broker, base: str, gws: list[str], chains: dict[str, list[dict[str, Any]]]
) -> float:
    total = len(gws) * len(next(iter(chains.values())))
    got = 0
    done = asyncio.Event()
    async with aiomqtt.Client(
        "127.0.0.1", broker.port, identifier="raw-sub", protocol=aiomqtt.ProtocolVersion.V5
    ) as sub:
        await sub.subscribe(f"$share/raw/{base}/+/events", qos=1)

        async def count() -> None:
            nonlocal got
            async for _ in sub.messages:
                got += 1
                if got == total:
                    done.set()

        t_count = asyncio.create_task(count())
        async with Publishers(("127.0.0.1", broker.port), base, gws, v5=True) as pubs:
            t = time.perf_counter()
            await pubs.publish(chains)
            await asyncio.wait_for(done.wait(), 600)
            elapsed = time.perf_counter() - t
        t_count.cancel()
    return total / elapsed


async def raw_amqp(
    node: RabbitNode, base: str, gws: list[str], chains: dict[str, list[dict[str, Any]]]
) -> float:
    total = len(gws) * len(next(iter(chains.values())))
    got = 0
    done = asyncio.Event()
    conn = await aio_pika.connect(node.amqp_url)
    async with conn:
        ch = await conn.channel()
        await ch.set_qos(prefetch_count=1000)
        q = await ch.declare_queue(f"{base}.raw", durable=True, arguments={"x-queue-type": "quorum"})
        await q.bind("amq.topic", routing_key=f"{base}.*.events")

        async def on(m: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal got
            await m.ack()
            got += 1
            if got == total:
                done.set()

        await q.consume(on)
        async with Publishers(("127.0.0.1", node.mqtt_port), base, gws, v5=False) as pubs:
            t = time.perf_counter()
            await pubs.publish(chains)
            await asyncio.wait_for(done.wait(), 900)
            elapsed = time.perf_counter() - t
        await q.delete(if_unused=False, if_empty=False)
    return total / elapsed


async def with_receivers(  # noqa: PLR0917 - a bench step
    transport: str, url: str, mqtt_port: int, pg: Postgres, args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    base = f"b{secrets.token_hex(3)}"
    gws = [f"gw-{i}" for i in range(args.gateways)]
    chains = {g: chain(g, n=args.events) for g in gws}
    total = len(gws) * args.events
    dsn = await new_database(pg)
    procs = []
    for i in range(args.receivers):
        cfg = receiver_config(
            tmp / f"{base}-{i}.toml", dsn=dsn, instance=f"{base}-{i}", transport=transport, base=base,
            mqtt_url=url if transport == "mqtt" else None, amqp_url=url if transport == "amqp" else None,
            amqp_queue=f"{base}.central", batch_max=args.batch, gap_replay_after_s=30.0,
        )  # fmt: skip
        r = ReceiverProc(cfg, tmp / f"{base}-{i}.log").start()
        r.wait_log("mqtt_connected" if transport == "mqtt" else "amqp_connected")
        procs.append(r)
    async with Publishers(("127.0.0.1", mqtt_port), base, gws, v5=transport == "mqtt") as pubs:
        tasks = await pubs.listen_receipts()
        t = time.perf_counter()
        await pubs.publish(chains)
        await asyncio.wait_for(pubs.done.wait(), 1800)
        elapsed = time.perf_counter() - t
        for task in tasks:
            task.cancel()
    usage = [proc_usage(r.proc.pid) for r in procs if r.proc is not None]
    for r in procs:
        assert r.stop() == 0, r.output()[-2000:]
    rows = await pg_fetch(dsn, "SELECT count(*) AS n, count(DISTINCT id) AS d FROM events")
    assert rows[0]["n"] == rows[0]["d"] == total, rows
    lat = sorted(pubs.latency)
    return {
        "rate": total / elapsed,
        "p50": statistics.median(lat),
        "p99": lat[int(0.99 * (len(lat) - 1))],
        "cpu": sum(u[0] for u in usage),
        "rss": max(u[1] for u in usage),
        "elapsed": elapsed,
        "total": total,
    }


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gateways", type=int, default=200)
    ap.add_argument("--events", type=int, default=100)
    ap.add_argument("--receivers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--transport", default="mqtt,amqp")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="receiver-bench-"))
    pg = Postgres()
    pg.start()
    try:
        for transport in args.transport.split(","):
            gws = [f"gw-{i}" for i in range(args.gateways)]
            chains = {g: chain(g, n=args.events) for g in gws}
            if transport == "mqtt":
                broker = Broker(tmp)
                broker.conf.write_text(broker.conf.read_text() + "max_inflight_messages 1000\n")
                broker.start()
                try:
                    raw = await raw_mqtt(broker, f"raw{secrets.token_hex(2)}", gws, chains)
                    got = await with_receivers("mqtt", broker.url, broker.port, pg, args, tmp)
                finally:
                    broker.stop()
            else:
                node = rabbit_node()
                node.start()
                try:
                    raw = await raw_amqp(node, f"raw{secrets.token_hex(2)}", gws, chains)
                    got = await with_receivers("amqp", node.amqp_url, node.mqtt_port, pg, args, tmp)
                finally:
                    node.destroy()
            print(
                f"{transport}: {args.gateways} gateways x {args.events} events, {args.receivers} receivers, "
                f"batch_max {args.batch}\n"
                f"  raw broker rate (bare consumer)  {raw:8.0f} events/s\n"
                f"  stored + receipted               {got['rate']:8.0f} events/s  ({got['rate'] / raw:.2f}x raw)\n"
                f"  receipt latency p50 / p99        {got['p50'] * 1000:8.0f} / {got['p99'] * 1000:.0f} ms\n"
                f"  receivers' CPU                   {got['cpu']:8.1f} s for {got['total']} events "
                f"({got['cpu'] / got['total'] * 1e6:.0f} µs/event); peak RSS {got['rss'] / 2**20:.0f} MiB"
            )
    finally:
        pg.destroy()


if __name__ == "__main__":
    asyncio.run(main())
