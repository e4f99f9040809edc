"""The fleet's simulated gateway (tests/fleetgw.py) keeps the contract's gateway side: checked
here by hand, as a central would see it, over a real mosquitto on MQTT 3.1.1 — so the bench and
the fault tests measure a receiver against a publisher that behaves like the real gateway."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable

import aiomqtt
import pytest
from broker import Broker
from fleetgw import SimGateway, shift_event

from protocols.event_encoding import verify_chain

pytestmark = [pytest.mark.slow]
B = "lockgw"


class Watch:
    def __init__(self, client: aiomqtt.Client) -> None:
        self.c = client
        self.inbox: list[aiomqtt.Message] = []
        self.cond = asyncio.Condition()

    async def pump(self) -> None:
        async for m in self.c.messages:
            async with self.cond:
                self.inbox.append(m)
                self.cond.notify_all()

    async def wait(self, pred: Callable[[list[aiomqtt.Message]], bool], within: float = 30.0) -> None:
        async with asyncio.timeout(within), self.cond:
            await self.cond.wait_for(lambda: pred(self.inbox))

    def bodies(self, topic: str) -> list[dict]:
        return [json.loads(m.payload) for m in self.inbox if m.topic.matches(topic)]


def seqs_seen(w: Watch, gw: str, *, replayed: bool | None = None) -> set[int]:
    return {
        e["seq"]
        for e in w.bodies(f"{B}/{gw}/events")
        if replayed is None or e.get("replayed", False) is replayed
    }


async def test_simulated_gateway_keeps_the_contract_gateway_side(live_broker: Broker) -> None:
    rng = random.Random(3)
    async with aiomqtt.Client("127.0.0.1", live_broker.port, identifier="central-fleetgw") as c:
        w = Watch(c)
        pump = asyncio.create_task(w.pump())
        for t in ("events", "heartbeat", "availability", "response/+"):
            await c.subscribe(f"{B}/sim-1/{t}", qos=1)
        gw = SimGateway("sim-1", site="s-1", host="127.0.0.1", port=live_broker.port, heartbeat_s=0.2)
        async with gw:
            for _ in range(50):
                gw.commit(shift_event(rng, gw))
            await w.wait(lambda _i: seqs_seen(w, "sim-1") >= set(range(1, 51)))
            first = {e["seq"]: e for e in w.bodies(f"{B}/sim-1/events")}
            verify_chain([first[i] for i in range(1, 51)])  # the real chain, from seq 1
            assert {"state": "online"} in w.bodies(f"{B}/sim-1/availability")
            # Receipts: malformed, another epoch, beyond last_seq and a bool seq are ignored.
            for bad in (
                b"\xff",
                b"[]",
                json.dumps({"epoch": "other", "seq": 5}).encode(),
                json.dumps({"epoch": gw.epoch, "seq": 51}).encode(),
                json.dumps({"epoch": gw.epoch, "seq": True}).encode(),
            ):
                await c.publish(f"{B}/sim-1/receipt", bad, qos=1)
            await c.publish(f"{B}/sim-1/receipt", json.dumps({"epoch": gw.epoch, "seq": 40}), qos=1)
            await w.wait(lambda _i: any(h["receipt_seq"] == 40 for h in w.bodies(f"{B}/sim-1/heartbeat")))
            hb = next(h for h in w.bodies(f"{B}/sim-1/heartbeat") if h["receipt_seq"] == 40)
            assert hb["backlog"] == hb["last_seq"] - 40 and hb["epoch"] == gw.epoch
            assert gw.receipt_seq == 40
            # Replay of exactly a range, with the transaction echoed.
            req = {"from_seq": 10, "to_seq": 12, "transaction": "r-1"}
            await c.publish(f"{B}/sim-1/request/replay", json.dumps(req), qos=1)
            await w.wait(
                lambda _i: any(r.get("transaction") == "r-1" for r in w.bodies(f"{B}/sim-1/response/replay"))
            )
            resp = next(r for r in w.bodies(f"{B}/sim-1/response/replay") if r["transaction"] == "r-1")
            assert resp == {"transaction": "r-1", "status": "ok", "data": {"count": 3}}
            await w.wait(lambda _i: seqs_seen(w, "sim-1", replayed=True) >= {10, 11, 12})
            await c.publish(f"{B}/sim-1/request/replay", b"{nope", qos=1)
            await w.wait(
                lambda _i: any(r["transaction"] is None for r in w.bodies(f"{B}/sim-1/response/replay"))
            )
            # A cut: no DISCONNECT, so the will says offline; events committed meanwhile arrive
            # in order after the reconnect, chained on to what came before.
            connects = gw.stats.connects
            gw.go_offline()
            await w.wait(lambda _i: {"state": "offline"} in w.bodies(f"{B}/sim-1/availability"))
            for _ in range(30):
                gw.commit(shift_event(rng, gw))
            gw.go_online()
            await w.wait(lambda _i: seqs_seen(w, "sim-1") >= set(range(1, 81)))
            assert gw.stats.connects == connects + 1
            by_seq = {e["seq"]: e for e in w.bodies(f"{B}/sim-1/events") if not e.get("replayed")}
            verify_chain([by_seq[i] for i in range(1, 81)])
            # Re-sends after the reconnect start at the receipt, never skip ahead.
            await c.publish(f"{B}/sim-1/receipt", json.dumps({"epoch": gw.epoch, "seq": 80}), qos=1)
            async with asyncio.timeout(30):
                await gw.wait_receipted(80)
            assert gw.backlog == 0 and len(gw.stats.receipt_latency_s) == 80
        pump.cancel()
