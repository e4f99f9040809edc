"""A whole site for attacks on the running daemon: `lockgw-sim` (two paired locks on Bumble),
a real mosquitto, `lockgw run` as a process, and a phone/attacker speaking MQTT 5 to it.

Used by tests/integration/test_daemon_attacks.py (bounded cases in CI) and
bench/daemon_fuzz.py (the long run). Every wait is bounded; a hang fails with the daemon's log.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import sqlite3
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
from broker import Broker
from clifix import Daemon, Field, make_field, start_daemon
from credfix import SITE, World
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.authz.keyfiles import b64url
from protocols import cbor, issuer
from protocols.event_encoding import verify_chain

GW = "gw-attack"
BASE = "lockgw"
#: Bounds every wait for an answer: a hang guard, not a speed requirement.
ANSWER_WITHIN_S = 20.0


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Site:
    field: Field
    daemon: Daemon
    broker: Broker
    locks: list[str]
    db: Path
    #: Every secret the site used (tokens, proofs, setup codes, the phone's key): none may
    #: appear in any log line (THREATS B13).
    secrets: list[str] = field(default_factory=list)
    _n: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def w(self) -> World:
        return self.field.w

    def alive(self) -> bool:
        return self.daemon.proc.poll() is None

    def client(self) -> aiomqtt.Client:
        return aiomqtt.Client(
            "127.0.0.1",
            self.broker.port,
            protocol=aiomqtt.ProtocolVersion.V5,
            identifier=f"attacker-{next(self._n)}",
        )

    async def request(
        self,
        c: aiomqtt.Client,
        action: str,
        payload: bytes,
        *,
        response_topic: str | None = "attack/r",
        expect_on: str | None = None,
    ) -> dict[str, Any]:
        """Publish a request and return the answer (fails if none comes). ``c`` must already be
        subscribed to ``attack/#`` and ``BASE/GW/response/#`` (see :meth:`session`)."""
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        corr = f"c{next(self._n)}".encode()
        props.CorrelationData = corr
        if response_topic is not None:
            props.ResponseTopic = response_topic
        await c.publish(f"{BASE}/{GW}/request/{action}", payload, qos=1, properties=props)
        want = expect_on or response_topic or f"{BASE}/{GW}/response/"
        async with asyncio.timeout(ANSWER_WITHIN_S):
            async for m in c.messages:
                topic = str(m.topic)
                got_corr = getattr(m.properties, "CorrelationData", None)
                if topic.startswith(want) and got_corr == corr:
                    body = json.loads(m.payload)
                    assert isinstance(body, dict)
                    return body
        raise AssertionError("no answer")

    async def session(self) -> aiomqtt.Client:
        """A client subscribed for answers, once the daemon is on the broker: its control socket
        opens before its MQTT connection is up (doors never wait for a broker), so a request sent
        before its retained ``online`` would reach nobody."""
        c = self.client()
        await c.__aenter__()
        await c.subscribe("attack/#", qos=1)
        await c.subscribe(f"{BASE}/{GW}/response/#", qos=1)
        availability = f"{BASE}/{GW}/availability"
        await c.subscribe(availability, qos=1)
        async with asyncio.timeout(ANSWER_WITHIN_S * 3):
            async for m in c.messages:
                if str(m.topic) == availability and json.loads(m.payload) == {"state": "online"}:
                    break
        await c.unsubscribe(availability)
        return c

    async def unlock(self, c: aiomqtt.Client, lock: str, *, action: str = "unlock") -> dict[str, Any]:
        """The honest phone: challenge, proof, unlock — the answer."""
        ch = await self.request(c, "challenge", json.dumps({"lock": lock, "act": action}).encode())
        assert ch["status"] == "ok", ch
        nonce = base64.urlsafe_b64decode(ch["data"]["nonce"] + "==")
        token = self.w.token(locks=[lock], iat=int(time.time()) - 30)
        proof = issuer.proof(self.w.holder, token_bytes=token, nonce=nonce, gw=GW, lock=lock, act=action)
        body = {"lock": lock, "token": _b64(token), "proof": _b64(proof), "transaction": "honest"}
        self.secrets += [body["token"], body["proof"], nonce.hex()]
        return await self.request(c, action, json.dumps(body).encode())

    async def attack(self, c: aiomqtt.Client, case: Case) -> dict[str, Any]:
        """Send one generated case; the request's answer (a well-formed response, or it fails)."""
        await c.publish(f"{BASE}/{GW}/receipt", case.receipt, qos=1)
        await c.publish(f"{BASE}/{SITE}/keyring", case.trust, qos=1)
        answer = await self.request(c, case.action, case.payload)
        assert answer["status"] in ("ok", "error")
        assert set(answer) == {"transaction", "status", "data" if answer["status"] == "ok" else "error"}
        return answer

    def events(self) -> list[dict[str, Any]]:
        """Every stored event, read-only from the daemon's database (WAL: readers never block)."""
        db = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            return [json.loads(r[0]) for r in db.execute("SELECT json FROM events ORDER BY seq")]
        finally:
            db.close()

    def check_store(self) -> list[dict[str, Any]]:
        """Gap-free, hash-chained, one gateway.started (the daemon never restarted)."""
        events = self.events()
        verify_chain(events)
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert sum(e["type"] == "gateway.started" for e in events) == 1
        return events


def make_site(
    tmp: Path, broker: Broker, *, seed: int = 77, extra_config: str = ""
) -> tuple[Site, subprocess.Popen[str]]:
    f = make_field(
        tmp,
        gw=GW,
        seed=seed,
        extra_config=f'[mqtt]\nurl = "{broker.url}"\nbase_topic = "{BASE}"\n' + extra_config,
    )
    sim, locks, w = f.sim, f.locks, f.w
    f.run("trust", "install", str(tmp / "keyring.cose"))
    ids = [f.run("pair", lock["address"], "--code", lock["setup_code"]).stdout.strip() for lock in locks]
    daemon = start_daemon(f)
    site = Site(f, daemon, broker, ids, tmp / "data" / "events.sqlite3")
    site.secrets += [lock["setup_code"] for lock in locks]
    site.secrets.append(b64url(cbor.dumps(w.holder.to_cbor())))
    return site, sim


# --- generated attacks (the CI test and bench/daemon_fuzz.py) ---------------------------------

_text = st.text(max_size=40) | st.sampled_from(["\ud800", "\udfff", "a\x00b", "é" * 200, ""])
_leaf = st.none() | st.booleans() | st.integers() | st.floats() | _text
_json = st.recursive(
    _leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=12,
)
_keys = st.sampled_from(
    ["lock", "token", "proof", "keyring", "revocations", "time", "transaction", "act", "from_seq", "to_seq"]
)


def payloads(locks: list[str]) -> st.SearchStrategy[bytes]:
    lock = st.sampled_from(locks) | _text
    b64ish = st.binary(max_size=200).map(lambda b: base64.urlsafe_b64encode(b).decode()) | _text
    obj = st.fixed_dictionaries(
        {},
        optional={
            "lock": lock | _json,
            "token": b64ish | _json,
            "proof": b64ish | _json,
            "keyring": b64ish | _json,
            "time": b64ish | _json,
            "transaction": _text | _json,
            "act": st.sampled_from(["unlock", "lock", "status"]) | _json,
            "from_seq": st.integers() | _json,
            "to_seq": st.integers() | _json,
        },
    )
    as_json = (obj | st.dictionaries(_keys | _text, _json, max_size=5) | _json).map(
        lambda v: json.dumps(v, ensure_ascii=True).encode()
    )
    return (
        as_json
        | st.binary(max_size=300)
        | st.sampled_from([b"", b"{", b"[" * 5000, b'{"a":1,"a":2}', b"NaN"])
    )


actions = st.sampled_from(["challenge", "unlock", "lock", "status", "locks", "replay"]) | st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Cn", "Co"), blacklist_characters="+#/\ufeff"),
    min_size=1,
    max_size=12,
)


@dataclass(frozen=True)
class Case:
    action: str
    payload: bytes
    receipt: bytes
    trust: bytes


def attack_cases(locks: list[str]) -> st.SearchStrategy[Case]:
    """A request to any action (or none), a receipt and a trust document, each generated."""
    return st.builds(Case, actions, payloads(locks), payloads(locks), st.binary(max_size=300))
