"""The gateway over a real mosquitto: CONTRACT §4–5 end to end, broker killed and restarted."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest
from broker import Broker, drain_only_bridge
from credfix import SITE, World
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from rabbit import RabbitCluster

from firmware_sim.bumble_peripheral import SimLock, SimRadio
from gateway.authz.clock import ManualClock
from gateway.authz.keyfiles import b64url
from gateway.ble.bumble_backend import BumbleHost
from gateway.ble.registry import LockRecord
from gateway.config import Config, load_config
from gateway.mqtt.bridge import RECEIPT_ALARM_S
from gateway.runtime.app import Gateway
from gateway.store.outbox import Outbox
from protocols import cbor, issuer
from protocols.event_encoding import verify_chain

pytestmark = [pytest.mark.ble, pytest.mark.slow]
GW = "gw-test-1"
B = "lockgw"


@dataclass
class Setup:
    w: World
    gw: Gateway
    broker: Broker | RabbitMqtt
    locks: list[SimLock]
    radio: SimRadio
    clock: ManualClock


#: The MQTT protocol both the gateway and the test's central speak; tests parametrised over
#: it run the same contract on 3.1.1 (docs/mqtt-3.1.1.md), where nothing carries properties.
#: "3.1.1@rabbitmq": 3.1.1 against a private single RabbitMQ node (tests/rabbit.py) instead
#: of mosquitto.
BOTH_PROTOCOLS = pytest.mark.parametrize("protocol", ["5", "3.1.1"])


@pytest.fixture
def protocol() -> str:
    return "5"


def aiomqtt_version(protocol: str) -> aiomqtt.ProtocolVersion:
    return aiomqtt.ProtocolVersion.V5 if protocol == "5" else aiomqtt.ProtocolVersion.V311


@dataclass
class RabbitMqtt:
    """A RabbitMQ node's MQTT listener where a test expects a mosquitto ``Broker``."""

    rc: RabbitCluster

    @property
    def port(self) -> int:
        return self.rc.nodes[0].mqtt_port

    @property
    def url(self) -> str:
        return self.rc.nodes[0].mqtt_url


@pytest.fixture
def mqtt_broker(request: pytest.FixtureRequest, protocol: str) -> Broker | RabbitMqtt:
    if protocol.endswith("@rabbitmq"):
        return RabbitMqtt(request.getfixturevalue("rabbit1"))
    return request.getfixturevalue("live_broker")


def write_config(tmp: Path, broker: Broker | RabbitMqtt, w: World, protocol: str = "5") -> Config:
    root = tmp / "root.pub"
    root.write_text(b64url(cbor.dumps(w.root.public.to_cbor())))
    cfg = tmp / "lockgw.toml"
    cfg.write_text(f"""
[gateway]
id = "{GW}"
site = "{SITE}"
data_dir = "{tmp / "data"}"
[mqtt]
url = "{broker.url}"
protocol = "{protocol.split("@", maxsplit=1)[0]}"
[trust]
root_keys = ["{root}"]
[control]
socket = "{tmp / "ctl.sock"}"
""")
    return load_config(cfg, env={})


@pytest.fixture
async def setup(tmp_path: Path, mqtt_broker: Broker | RabbitMqtt, protocol: str) -> AsyncIterator[Setup]:
    from credfix import T0

    w = World()
    clock = ManualClock(T0)
    async with SimRadio(clock=clock.wall) as radio:
        sims = await radio.add_locks(2, seed=21)
        async with BumbleHost(controller=radio.open_gateway_controller()) as host:
            config = write_config(tmp_path, mqtt_broker, w, protocol)
            gw = Gateway(
                config, clock=clock, ble_backend=host.client_backend(), heartbeat_s=0.3, housekeeping_s=3600
            )
            async with gw:
                for sim in sims:
                    done = await gw.links.pair(str(sim.address), sim.model.setup_code)
                    gw.registry.put(LockRecord(done.lock_id, str(sim.address), sim.model.name, done.ltk))
                yield Setup(w, gw, mqtt_broker, sims, radio, clock)


class Central:
    """A test MQTT client that keeps every message it receives (nothing is dropped while a
    test waits for something else)."""

    def __init__(self, client: aiomqtt.Client, protocol: str = "5") -> None:
        self.client = client
        self.v311 = protocol != "5"
        self.inbox: list[aiomqtt.Message] = []
        self._cond = asyncio.Condition()

    async def pump(self) -> None:
        async for m in self.client.messages:
            async with self._cond:
                self.inbox.append(m)
                self._cond.notify_all()

    async def subscribe(self, topic: str) -> None:
        await self.client.subscribe(topic, qos=1)

    async def publish(self, topic: str, payload, **kw) -> None:
        await self.client.publish(topic, payload, **kw)

    def all(self, topic: str) -> list[aiomqtt.Message]:
        return [m for m in self.inbox if m.topic.matches(topic)]


@pytest.fixture
async def central(mqtt_broker: Broker | RabbitMqtt, protocol: str) -> AsyncIterator[Central]:
    async with aiomqtt.Client(
        "127.0.0.1", mqtt_broker.port, identifier="central-test", protocol=aiomqtt_version(protocol)
    ) as client:
        c = Central(client, protocol)
        task = asyncio.create_task(c.pump())
        yield c
        task.cancel()


async def next_on(c: Central, topic: str, *, within: float = 10.0, pred=lambda _m: True) -> aiomqtt.Message:
    async with asyncio.timeout(within), c._cond:
        while True:
            for m in c.inbox:
                if m.topic.matches(topic) and pred(m):
                    return m
            await c._cond.wait()


async def request(client: Central, action: str, body: dict, *, corr: bytes) -> dict:
    """A request and its answer: over MQTT 5 on a Response Topic with Correlation Data; over
    3.1.1 (no properties) on ``B/G/response/<action>``, matched by ``transaction``."""
    if client.v311:
        tx = body.get("transaction") or corr.decode()
        await client.subscribe(f"{B}/{GW}/response/{action}")
        await client.publish(f"{B}/{GW}/request/{action}", json.dumps({**body, "transaction": tx}), qos=1)
        msg = await next_on(
            client,
            f"{B}/{GW}/response/{action}",
            pred=lambda m: json.loads(m.payload).get("transaction") == tx,
        )
        return json.loads(msg.payload)
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "phone/replies"
    props.CorrelationData = corr
    await client.publish(f"{B}/{GW}/request/{action}", json.dumps(body), qos=1, properties=props)
    msg = await next_on(client, "phone/replies", pred=lambda m: m.properties.CorrelationData == corr)
    return json.loads(msg.payload)


async def unlock_via_mqtt(s: Setup, client: Central, lock: str, corr: bytes) -> dict:
    token = s.w.token(locks=[lock], iat=int(s.clock.wall()) - 10)
    ch = await request(
        client, "challenge", {"lock": lock, "act": "unlock", "transaction": "c"}, corr=corr + b"c"
    )
    nonce = base64.urlsafe_b64decode(ch["data"]["nonce"] + "==")
    proof = issuer.proof(s.w.holder, token_bytes=token, nonce=nonce, gw=GW, lock=lock, act="unlock")
    return await request(
        client,
        "unlock",
        {"lock": lock, "token": b64url(token), "proof": b64url(proof), "transaction": "t-9"},
        corr=corr,
    )


@pytest.mark.parametrize("protocol", ["5", "3.1.1", "3.1.1@rabbitmq"])
async def test_contract_topics_request_response_receipts(setup: Setup, central: Central) -> None:
    s = setup
    await central.subscribe(f"{B}/{GW}/#")
    await central.subscribe("phone/replies")
    if isinstance(s.broker, RabbitMqtt):
        # RabbitMQ 3.10 sends retained messages only to subscriptions without wildcards
        # (docs/mqtt-3.1.1.md): central subscribes to the retained topics by name.
        await central.subscribe(f"{B}/{GW}/availability")
        await central.subscribe(f"{B}/{GW}/info")
    avail = await next_on(central, f"{B}/{GW}/availability")
    assert json.loads(avail.payload) == {"state": "online"} and avail.retain
    info = json.loads((await next_on(central, f"{B}/{GW}/info")).payload)
    assert set(info) == {
        "gw",
        "site",
        "version",
        "started_at",
        "epoch",
        "locks",
        "keyring_version",
        "keyring_exp",
        "revocations_version",
        "revocations_exp",
        "time_state",
    }
    # Trust intake from the retained site topic.
    await central.publish(f"{B}/{SITE}/keyring", s.w.keyring(), qos=1, retain=True)
    info = json.loads(
        (
            await next_on(
                central, f"{B}/{GW}/info", pred=lambda m: json.loads(m.payload)["keyring_version"] == 1
            )
        ).payload
    )
    assert info["keyring_version"] == 1
    lock = s.locks[0].model.lock_id
    resp = await unlock_via_mqtt(s, central, lock, b"corr-1")
    assert resp["status"] == "ok" and resp["transaction"] == "t-9" and resp["data"]["state"] == "unlocked"
    # Without a response topic: B/G/response/<action>.
    await central.publish(f"{B}/{GW}/request/locks", json.dumps({"transaction": "L"}), qos=1)
    locks = json.loads((await next_on(central, f"{B}/{GW}/response/locks")).payload)
    assert locks["transaction"] == "L" and len(locks["data"]["locks"]) == 2
    # Garbage requests get error responses and the gateway carries on.
    await central.publish(f"{B}/{GW}/request/unlock", b"\xff\x00garbage", qos=1)
    bad = json.loads(
        (
            await next_on(
                central,
                f"{B}/{GW}/response/unlock",
                pred=lambda m: json.loads(m.payload)["transaction"] is None,
            )
        ).payload
    )
    assert (
        bad == {"transaction": None, "status": "error", "error": bad["error"]}
        and bad["error"]["code"] == "invalid_request"
    )
    # Events arrive in order with a valid chain; a receipt empties the backlog.
    await next_on(
        central, f"{B}/{GW}/events", pred=lambda m: json.loads(m.payload)["type"] == "lock.unlocked"
    )
    events = [json.loads(m.payload) for m in central.all(f"{B}/{GW}/events")]
    events = events[: [e["type"] for e in events].index("lock.unlocked") + 1]
    seqs = [e["seq"] for e in events]
    # The central subscribed after the gateway started, so it may have missed the first events
    # live (they were not retained); what it saw is gapless and chained, and replay fills in.
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    verify_chain(events, prev=events[0]["prev"])
    replayed = await request(central, "replay", {"from_seq": 1, "to_seq": seqs[0]}, corr=b"r")
    assert replayed["data"]["count"] == seqs[0]
    await next_on(
        central,
        f"{B}/{GW}/events",
        pred=lambda m: json.loads(m.payload).get("replayed") is True and json.loads(m.payload)["seq"] == 1,
    )
    await central.publish(
        f"{B}/{GW}/receipt", json.dumps({"epoch": events[0]["epoch"], "seq": seqs[-1]}), qos=1
    )
    hb = await next_on(
        central, f"{B}/{GW}/heartbeat", pred=lambda m: json.loads(m.payload)["receipt_seq"] == seqs[-1]
    )
    body = json.loads(hb.payload)
    assert body["backlog"] == body["last_seq"] - body["receipt_seq"]
    await next_on(central, f"{B}/{GW}/locks/{lock}/state")
    # A late subscriber gets the retained state and availability.
    async with aiomqtt.Client(
        "127.0.0.1", s.broker.port, identifier="late", protocol=aiomqtt_version(central_protocol(central))
    ) as late:
        await late.subscribe(f"{B}/{GW}/locks/{lock}/state", qos=1)
        await late.subscribe(f"{B}/{GW}/availability", qos=1)
        got: dict[str, aiomqtt.Message] = {}
        async with asyncio.timeout(5):
            async for m in late.messages:
                got[str(m.topic)] = m
                if len(got) == 2:
                    break
    state = got[f"{B}/{GW}/locks/{lock}/state"]
    assert state.retain and json.loads(state.payload)["state"] == "unlocked"
    assert got[f"{B}/{GW}/availability"].retain


def central_protocol(c: Central) -> str:
    return "3.1.1" if c.v311 else "5"


async def test_D10_unconfirmed_events_raise_receipts_stalled_in_heartbeats(
    setup: Setup, central: Central
) -> None:
    s = setup
    await central.subscribe(f"{B}/{GW}/heartbeat")
    assert s.gw.mqtt is not None
    last = s.gw.outbox.stats().last_seq
    await asyncio.wait_for(s.gw.mqtt.wait_drained(last), 10)
    assert "receipts_stalled" not in s.gw.alarms()
    # The broker took every event; central confirms none of them for ten minutes.
    s.clock.advance(RECEIPT_ALARM_S)

    def alarms(m: aiomqtt.Message) -> list[str]:
        return list(json.loads(m.payload)["alarms"])

    await next_on(central, f"{B}/{GW}/heartbeat", pred=lambda m: "receipts_stalled" in alarms(m))
    epoch = s.gw.outbox.stats().epoch
    await central.publish(f"{B}/{GW}/receipt", json.dumps({"epoch": epoch, "seq": last}), qos=1)
    hb = await next_on(
        central,
        f"{B}/{GW}/heartbeat",
        pred=lambda m: json.loads(m.payload)["receipt_seq"] == last and "receipts_stalled" not in alarms(m),
    )
    assert json.loads(hb.payload)["backlog"] == s.gw.outbox.stats().last_seq - last


@BOTH_PROTOCOLS
async def test_D3_D4_A4_broker_without_persistence_killed_doors_open_nothing_lost_order_kept(
    setup: Setup, protocol: str
) -> None:
    s = setup
    assert not s.gw.authz.install(s.w.keyring()).rejected  # may already be in, retained by the broker
    lock = s.locks[0].model.lock_id
    assert s.gw.mqtt is not None
    await asyncio.wait_for(s.gw.mqtt.connected.wait(), 10)
    s.broker.kill()
    # The receiver notices the dead broker (the bound here is liveness, not a speed goal).
    async with asyncio.timeout(10):
        while s.gw.mqtt.connected.is_set():  # noqa: ASYNC110 - the bridge owns the event
            await asyncio.sleep(0.05)
    assert "mqtt_disconnected" in s.gw.alarms()
    # The Bergen case in miniature: no broker, doors still open through the service.
    for _ in range(3):
        token = s.w.token(locks=[lock], iat=int(s.clock.wall()) - 10)
        ch = await s.gw.service.handle("challenge", json.dumps({"lock": lock}).encode())
        nonce = base64.urlsafe_b64decode(ch["data"]["nonce"] + "==")
        proof = issuer.proof(s.w.holder, token_bytes=token, nonce=nonce, gw=GW, lock=lock, act="unlock")
        r = await s.gw.service.handle(
            "unlock", json.dumps({"lock": lock, "token": b64url(token), "proof": b64url(proof)}).encode()
        )
        assert r["status"] == "ok"
    last = s.gw.outbox.stats().last_seq
    assert s.gw.outbox.stats().backlog == last
    s.broker.start()
    async with aiomqtt.Client(
        "127.0.0.1", s.broker.port, identifier="central-2", protocol=aiomqtt_version(protocol)
    ) as central:
        await central.subscribe(f"{B}/{GW}/events", qos=1)
        seen: dict[int, dict] = {}
        async with asyncio.timeout(20):
            async for m in central.messages:
                e = json.loads(m.payload)
                seen[e["seq"]] = e  # dedup on id/seq (at-least-once)
                if len(seen) == last:
                    break
    assert sorted(seen) == list(range(1, last + 1))
    verify_chain([seen[i] for i in range(1, last + 1)])


async def test_D5_D6_a_thousand_events_queued_across_a_restart_arrive_in_order_dedup_by_id(
    tmp_path: Path, live_broker: Broker
) -> None:
    from credfix import T0

    path = tmp_path / "events.sqlite3"
    live_broker.kill()  # no broker while the events are made
    async with Outbox(path, gw=GW, site=SITE, wall=lambda: T0) as ob:
        for chunk in range(10):
            await ob.append_many(
                [
                    {"type": "lock.log", "lock": "lk-1", "data": {"lock_seq": chunk * 100 + i}}
                    for i in range(100)
                ]
            )
    live_broker.start()

    # A restart: the outbox is the only queue; nothing of the first process's memory survives.
    async with (
        Outbox(path, gw=GW, site=SITE, wall=lambda: T0) as ob,
        aiomqtt.Client(
            "127.0.0.1", live_broker.port, identifier="central-d5", protocol=aiomqtt.ProtocolVersion.V5
        ) as central,
    ):
        await central.subscribe(f"{B}/{GW}/events", qos=1)
        bridge = drain_only_bridge(
            live_broker.url,
            ob,
            gw_id=GW,
            site=SITE,
            republish_after_s=0.5,  # no receipts yet: everything is sent again (at least once)
        )
        received: list[dict] = []
        async with bridge:
            async with asyncio.timeout(60):
                async for m in central.messages:
                    received.append(json.loads(m.payload))
                    if len(received) > 1000:
                        break  # only 1000 exist: the first pass is complete and one came twice
            assert [e["seq"] for e in received[:1000]] == list(range(1, 1001))  # in order
            duplicates = len(received) - len({e["id"] for e in received})
            assert duplicates > 0  # QoS 1 and re-publication deliver some events twice ...
            unique = {e["id"]: e for e in received}  # ... and the consumer drops them by id
            verify_chain(sorted(unique.values(), key=lambda e: e["seq"]))
            assert len(unique) == 1000
            await central.publish(f"{B}/{GW}/receipt", json.dumps({"epoch": ob.epoch, "seq": 1000}), qos=1)
            async with asyncio.timeout(10):
                while ob.stats().backlog:  # noqa: ASYNC110 - the receipt is the bridge's to take
                    await asyncio.sleep(0.05)
