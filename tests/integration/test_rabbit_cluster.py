"""The 3-node RabbitMQ cluster (tests/rabbit.py) the fleet runs on: MQTT 3.1.1 in, AMQP out
through a quorum queue, and both survive SIGKILL of a node — the events queue's leader, and
the node holding a gateway's persistent MQTT session."""

from __future__ import annotations

import asyncio
import json

import aio_pika
import aiomqtt
import pytest
from rabbit import RabbitCluster, RabbitNode

pytestmark = [pytest.mark.slow]
QUEUE = "lockgw.events"


def mqtt(node: RabbitNode, ident: str, *, clean: bool = True) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1",
        node.mqtt_port,
        identifier=ident,
        protocol=aiomqtt.ProtocolVersion.V311,
        clean_session=clean,
        timeout=30,
    )


async def consume(node: RabbitNode, n: int) -> list[dict[str, object]]:
    """Read ``n`` messages from the events queue through ``node`` (acked after reading)."""
    got: list[dict[str, object]] = []
    conn = await aio_pika.connect(node.amqp_url, timeout=30)
    async with conn:
        ch = await conn.channel()
        await ch.set_qos(prefetch_count=100)
        q = await ch.declare_queue(QUEUE, durable=True, passive=True)
        async with asyncio.timeout(120), q.iterator() as it:
            async for message in it:
                async with message.process():
                    got.append(json.loads(message.body))
                if len(got) == n:
                    break
    return got


def restore(rc: RabbitCluster, node: RabbitNode) -> None:
    """Bring a killed node back so the session's cluster has three nodes again."""
    if not node.alive():
        rc.start_node(node)


async def test_events_and_a_persistent_session_survive_sigkill_of_the_quorum_leader(
    rabbit3: RabbitCluster,
) -> None:
    """Events published over MQTT into the quorum queue are all read over AMQP after the
    queue's leader is SIGKILLed; and a gateway's session (clean session off, QoS 1
    subscription, on a quorum queue) that lived on the killed node still hands the gateway the
    receipt central sent while it was away, when it reconnects to another node."""
    rc = rabbit3
    await rc.declare_events_queue(QUEUE)
    leader = rc.quorum_leader(QUEUE)
    entry = next(n for n in rc.nodes if n is not leader)
    async with mqtt(leader, "lockgw-gw-c2", clean=False) as away:
        await away.subscribe("lockgw/gw-c2/receipt", qos=1)
    # A gateway on a node that is not the leader publishes 200 events at QoS 1.
    async with mqtt(entry, "lockgw-gw-c1", clean=False) as gw:
        for seq in range(1, 201):
            body = {"gw": "gw-c1", "seq": seq, "id": f"gw-c1/e/{seq}"}
            await gw.publish("lockgw/gw-c1/events", json.dumps(body), qos=1)
    # Central sends gw-c2 a receipt over AMQP to amq.topic (publisher confirms on).
    conn = await aio_pika.connect(entry.amqp_url, timeout=30)
    async with conn:
        ch = await conn.channel(publisher_confirms=True)
        ex = await ch.get_exchange("amq.topic")
        await ex.publish(
            aio_pika.Message(json.dumps({"epoch": "e", "seq": 7}).encode(), delivery_mode=2),
            routing_key="lockgw.gw-c2.receipt",
        )
    # Every PUBACK and confirm means a majority has it: the leader dies now.
    rc.kill(leader)
    try:
        got = await consume(entry, 200)
        assert sorted(int(str(e["seq"])) for e in got) == list(range(1, 201))
        assert rc.quorum_leader(QUEUE) is not leader  # a new leader was elected
        async with mqtt(entry, "lockgw-gw-c2", clean=False) as back:
            async with asyncio.timeout(60):
                async for m in back.messages:
                    assert json.loads(m.payload) == {"epoch": "e", "seq": 7}
                    break
    finally:
        restore(rc, leader)
