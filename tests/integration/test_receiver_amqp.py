"""The receiver's AMQP transport on a private single RabbitMQ node (MQTT plugin on), with two
competing receivers on one durable quorum queue and a private PostgreSQL.

The gateway side is a contract-faithful MQTT 3.1.1 publisher (events sealed as the outbox does,
QoS 1, a persistent session subscribed to its receipt topic), publishing through RabbitMQ's MQTT
plugin — the gateway's own `[mqtt] protocol = "3.1.1"` mode is the fleet branch's; the fleet
tests run real daemons here. Checked: every event stored exactly once across both receivers,
receipts reach the MQTT session through `amq.topic`, one receiver SIGKILLed between commit and
ack loses nothing, a gap is asked for with a replay request the gateway's session receives.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from fleetfix import (
    Postgres,
    RabbitNode,
    ReceiverProc,
    chain,
    free_port,
    new_database,
    payload,
    pg_fetch,
    postgres,
    rabbit_node,
    receiver_config,
)

from protocols.event_encoding import verify_chain

__all__ = ["postgres"]

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def rabbit() -> Iterator[RabbitNode]:
    node = rabbit_node()
    try:
        node.start()
        yield node
    finally:
        node.destroy()


class Fleet:
    def __init__(self, tmp: Path, dsn: str, node: RabbitNode) -> None:
        self.tmp, self.dsn, self.node = tmp, dsn, node
        self.base = f"t{secrets.token_hex(4)}"
        self.receivers: list[ReceiverProc] = []

    def receiver(
        self, instance: str, *, env: dict[str, str] | None = None, dead_first: bool = False, **kw: Any
    ) -> ReceiverProc:
        """A receiver; with ``dead_first`` its first node is a port nobody listens on, the real
        one second in ``[amqp] urls`` (a cluster node down at start: it moves on to the next)."""
        cfg = receiver_config(
            self.tmp / f"{instance}.toml", dsn=self.dsn, instance=instance, transport="amqp",
            amqp_url=self.node.amqp_url, base=self.base, amqp_queue=f"{self.base}.central", **kw,
        )  # fmt: skip
        if dead_first:
            real = f'url = "{self.node.amqp_url}"'
            cfg.write_text(
                cfg.read_text().replace(
                    real, f'url = "amqp://127.0.0.1:{free_port()}/"\nurls = ["{self.node.amqp_url}"]'
                )
            )
        r = ReceiverProc(cfg, self.tmp / f"{instance}.log", env=env or {}).start()
        self.receivers.append(r)
        r.wait_log("amqp_connected")
        if dead_first:
            assert "broker_unavailable" in r.output()
        return r

    def gateway(self, gw: str) -> aiomqtt.Client:
        """The gateway's MQTT 3.1.1 session (persistent: clean session off)."""
        return aiomqtt.Client(
            "127.0.0.1", self.node.mqtt_port, identifier=f"lockgw-{gw}",
            protocol=aiomqtt.ProtocolVersion.V311, clean_session=False,
        )  # fmt: skip

    async def seqs(self, gw: str) -> list[int]:
        return [
            r["seq"]
            for r in await pg_fetch(self.dsn, "SELECT seq FROM events WHERE gw = $1 ORDER BY seq", gw)
        ]


@pytest.fixture
async def fleet(tmp_path: Path, postgres: Postgres, rabbit: RabbitNode) -> AsyncIterator[Fleet]:
    f = Fleet(tmp_path, await new_database(postgres), rabbit)
    yield f
    for r in f.receivers:
        if r.alive():
            assert r.stop() == 0, r.output()[-3000:]
        assert "Traceback" not in r.output(), r.output()[-3000:]


async def _until_receipt(gw: aiomqtt.Client, seq: int, *, within_s: float = 90) -> list[int]:
    got: list[int] = []
    async with asyncio.timeout(within_s):
        async for m in gw.messages:
            if str(m.topic).endswith("/receipt"):
                got.append(json.loads(m.payload)["seq"])
                if got[-1] >= seq:
                    return got
    raise AssertionError("no receipt")


async def test_two_competing_receivers_one_killed_between_commit_and_ack(fleet: Fleet) -> None:
    killed = fleet.receiver("r1", env={"LOCKGW_RECEIVER_FAULT": "kill-after-commit:2"}, batch_max=20)
    fleet.receiver("r2", batch_max=20)
    gws = [f"gw-{i}" for i in range(4)]
    chains = {g: chain(g, n=150) for g in gws}
    clients = [fleet.gateway(g) for g in gws]
    for c, g in zip(clients, gws, strict=True):
        await c.__aenter__()
        await c.subscribe(f"{fleet.base}/{g}/receipt", qos=1)
    try:
        for i in range(150):  # interleaved, as a fleet publishes
            for c, g in zip(clients, gws, strict=True):
                await c.publish(f"{fleet.base}/{g}/events", payload(chains[g][i]), qos=1)
        assert killed.proc is not None
        await asyncio.to_thread(killed.proc.wait, 90)
        assert killed.returncode() == -9
        fleet.receivers.remove(killed)
        for c in clients:
            await _until_receipt(c, 150)
    finally:
        for c in clients:
            await c.__aexit__(None, None, None)
    for g in gws:
        assert await fleet.seqs(g) == list(range(1, 151))
        rows = await pg_fetch(fleet.dsn, "SELECT body FROM events WHERE gw = $1 ORDER BY seq", g)
        verify_chain([json.loads(r["body"]) for r in rows])
    total = await pg_fetch(fleet.dsn, "SELECT count(*) AS n, count(DISTINCT id) AS d FROM events")
    assert total[0]["n"] == total[0]["d"] == 600
    # The survivor stored what the killed one committed but never acked, without a duplicate.
    assert not await pg_fetch(fleet.dsn, "SELECT 1 FROM conflicts")


async def test_gap_replay_request_reaches_the_gateway_session(fleet: Fleet) -> None:
    fleet.receiver("r1", gap_replay_after_s=1.0, dead_first=True)
    events = chain("gw-gap", n=10)
    async with fleet.gateway("gw-gap") as gw:
        await gw.subscribe(f"{fleet.base}/gw-gap/request/+", qos=1)
        await gw.subscribe(f"{fleet.base}/gw-gap/receipt", qos=1)
        for ev in events[:2] + events[5:]:
            await gw.publish(f"{fleet.base}/gw-gap/events", payload(ev), qos=1)
        async with asyncio.timeout(90):
            async for m in gw.messages:
                if str(m.topic).endswith("/request/replay"):
                    req = json.loads(m.payload)
                    break
        assert (req["from_seq"], req["to_seq"]) == (3, 5)
        for ev in events[2:5]:
            await gw.publish(f"{fleet.base}/gw-gap/events", payload(ev, replayed=True), qos=1)
        await _until_receipt(gw, 10)
    assert await fleet.seqs("gw-gap") == list(range(1, 11))
