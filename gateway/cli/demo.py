"""``lockgw demo``: a scripted home-care shift against simulated locks, end to end.

Starts simulated lock units on a Bumble BLE stack, a mosquitto broker on a free port (when
mosquitto is installed; otherwise the demo runs without a broker and says so), a gateway, and a
central side built with the reference issuer. Then: a technician pairs the locks; central
publishes a keyring; staff unlock and lock with holder-bound tokens over MQTT; a forged and a
revoked token are refused; an emergency unlock; the broker is killed (doors keep opening) and
restarted (nothing lost); a key rotation. A central consumer prints the live event stream,
deduplicates on ``id``, checks the hash chain and sends receipts. It ends with a summary.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiomqtt

from firmware_sim.bumble_peripheral import SimLock, SimRadio
from gateway import log
from gateway.authz.keyfiles import b64url
from gateway.ble.bumble_backend import BumbleHost
from gateway.cli.commands import dispatch
from gateway.config import Config, load_config
from gateway.mqtt.bridge import quiet_closed_socket_callbacks, retrieve_disconnect_error
from gateway.runtime.app import Gateway
from gateway.wire import JsonObject, Response
from protocols import cbor, issuer
from protocols.cose import ALG_EDDSA, ALG_ES256, PrivateCoseKey, generate_private_key
from protocols.event_encoding import event_hash

__all__ = ["run_demo"]

GW, SITE, BASE = "gw-demo-1", "demo-site", "lockgw"


_log = log.get("demo")
#: A phone on the broker: its client and the answers it received.
_Phone = tuple[aiomqtt.Client, asyncio.Queue[dict[str, Any]]]


def _say(text: str) -> None:
    print(text, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Broker:
    def __init__(self, workdir: Path) -> None:
        self.exe = shutil.which("mosquitto") or (
            "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
        )
        self.port = _free_port()
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> bool:
        if self.exe is None:
            return False
        # A short-lived child started once; blocking Popen is fine here.
        self.proc = subprocess.Popen(  # noqa: ASYNC220, S603 - fixed argv, our own broker
            [self.exe, "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return True
            await asyncio.sleep(0.05)
        return False

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


class _Central:
    """The care organisation's side: issues credentials, consumes events, sends receipts."""

    def __init__(self, port: int | None) -> None:
        self.port = port
        self.rng = os.urandom
        self.root = generate_private_key(ALG_EDDSA, b"root-1", self.rng)
        self.issuer_a = generate_private_key(ALG_EDDSA, b"issuer-a", self.rng)
        self.issuer_b = generate_private_key(ALG_ES256, b"issuer-b", self.rng)
        self.phones = {f"staff-{i}": generate_private_key(ALG_EDDSA, b"", self.rng) for i in (17, 23)}
        self.events: dict[str, dict[str, Any]] = {}
        self.duplicates = 0
        self.chain_ok = True

    def keyring(self, version: int, *, rotated: bool = False) -> bytes:
        now = int(time.time())
        entries = [
            issuer.KeyringEntry(
                self.issuer_a.public,
                now - 86400,
                now + (1 if rotated else 90) * 86400,
                ["staff", "emergency", "revocations", "time"],
            )
        ]
        if rotated:
            entries.append(
                issuer.KeyringEntry(self.issuer_b.public, now - 60, now + 180 * 86400, ["staff", "emergency"])
            )
        return issuer.keyring(
            self.root, site=SITE, version=version, iat=now - 10, exp=now + 120 * 86400, entries=entries
        )

    def token(
        self,
        sub: str,
        lock: str,
        *,
        signer: PrivateCoseKey | None = None,
        role: str = "staff",
        alarm: str | None = None,
        ttl: int = 8 * 3600,
    ) -> bytes:
        now = int(time.time())
        return issuer.token(
            signer or self.issuer_a,
            iss="central",
            sub=sub,
            aud=SITE,
            iat=now - 5,
            exp=now + ttl,
            locks=[lock],
            act=["unlock", "lock"],
            role=role,
            holder=self.phones[sub].public,
            alarm=alarm,
            rng=self.rng,
        )

    def consume(self, event: dict[str, Any]) -> bool:
        if event.get("replayed") or event["id"] in self.events:
            self.duplicates += 1
            return False
        if event_hash(event) != event["hash"]:
            self.chain_ok = False
        self.events[event["id"]] = event
        return True

    def gaps(self) -> int:
        seqs = sorted(e["seq"] for e in self.events.values())
        return (seqs[-1] - seqs[0] + 1 - len(seqs)) if seqs else 0


def _fmt(e: dict[str, Any]) -> str:
    extra = f" reason={e['reason']}" if e.get("reason") else ""
    who = f" sub={e['sub']}" if e.get("sub") else ""
    lock = f" lock={e['lock']}" if e.get("lock") else ""
    return f"    event #{e['seq']:<3} {e['type']:<18}{lock}{who}{extra}  time={e['time_state']} trust={e['trust_state']}"


async def _consume(central: _Central, port: int, stop: asyncio.Event) -> None:
    while not stop.is_set():
        client: aiomqtt.Client | None = None
        try:
            async with aiomqtt.Client(
                "127.0.0.1",
                port,
                identifier="demo-central",
                protocol=aiomqtt.ProtocolVersion.V5,
                clean_start=False,
            ) as client:
                await client.subscribe(f"{BASE}/{GW}/events", qos=1)
                async for m in client.messages:
                    event = json.loads(bytes(m.payload))
                    if central.consume(event):
                        _say(_fmt(event))
                        await client.publish(
                            f"{BASE}/{GW}/receipt",
                            json.dumps({"epoch": event["epoch"], "seq": event["seq"]}),
                            qos=1,
                        )
        except (aiomqtt.MqttError, OSError, TimeoutError):
            # aiomqtt 2.5.1 can leave a QoS 1 publish waiting after the broker died (THREATS
            # A4): every publish here has a timeout, and any failure means "reconnect".
            await asyncio.sleep(0.3)
        finally:
            if client is not None:
                retrieve_disconnect_error(client)


@contextlib.asynccontextmanager
async def _phone(port: int, name: str) -> AsyncIterator[_Phone]:
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"demo-{name}") as client:
        await client.subscribe(f"{BASE}/{GW}/response/#", qos=1)
        replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        async def pump() -> None:
            async for m in client.messages:
                replies.put_nowait(json.loads(bytes(m.payload)))

        task = asyncio.create_task(pump())
        try:
            yield client, replies
        finally:
            task.cancel()


async def _ask(
    client: aiomqtt.Client, replies: asyncio.Queue[dict[str, Any]], action: str, body: JsonObject
) -> Response:
    tx = f"{action}-{os.urandom(3).hex()}"
    await client.publish(
        f"{BASE}/{GW}/request/{action}", json.dumps({**body, "transaction": tx}), qos=1, timeout=5
    )
    async with asyncio.timeout(15):
        while True:
            reply = await replies.get()
            if reply.get("transaction") == tx:
                return cast("Response", reply)  # the gateway's own answer (CONTRACT §4)


def _show(label: str, resp: Response) -> None:
    if resp["status"] == "ok":
        _say(f"  {label}: ok → {resp['data'].get('state')}")
    else:
        _say(f"  {label}: refused ({resp['error']['code']}: {resp['error']['message']})")


@dataclass
class _Shift:
    """What the demo's steps share: the gateway, central, the broker and the phone in hand."""

    gw: Gateway
    central: _Central
    broker: _Broker
    have_broker: bool
    phone: _Phone | None = None
    door: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    async def at_door(
        self,
        sub: str,
        lock: str,
        token: bytes,
        act: str = "unlock",
        *,
        proof_from: str | None = None,
        over_mqtt: bool = True,
    ) -> Response:
        """What a phone does at the door: challenge, proof, request (over MQTT while the phone
        has the broker, else locally)."""
        holder = self.central.phones[proof_from or sub]
        phone = self.phone if over_mqtt else None

        async def ask(action: str, body: JsonObject) -> Response:
            if phone is None:
                return await self.gw.service.handle(action, json.dumps(body).encode())
            return await _ask(phone[0], phone[1], action, body)

        ch = await ask("challenge", {"lock": lock, "act": act})
        if ch["status"] != "ok":
            return ch
        nonce = base64.urlsafe_b64decode(str(ch["data"]["nonce"]) + "==")
        proof = issuer.proof(holder, token_bytes=token, nonce=nonce, gw=GW, lock=lock, act=act)
        return await ask(act, {"lock": lock, "token": b64url(token), "proof": b64url(proof)})


def _write_config(work: Path, central: _Central, broker_port: int | None) -> Config:
    (work / "root.pub").write_text(b64url(cbor.dumps(central.root.public.to_cbor())))
    mqtt = f'[mqtt]\nurl = "mqtt://127.0.0.1:{broker_port}"\n' if broker_port is not None else ""
    (work / "lockgw.toml").write_text(
        f'[gateway]\nid = "{GW}"\nsite = "{SITE}"\ndata_dir = "{work / "data"}"\n[control]\nsocket = "{work}/ctl.sock"\n{mqtt}'
        f'[trust]\nroot_keys = ["{work / "root.pub"}"]\n'
    )
    return load_config(work / "lockgw.toml", env={})


async def run_demo(*, locks: int = 3, seed: int | None = None) -> int:
    _say("lockgw demo — a home-care shift with simulated locks, a broker, a gateway and central\n")
    quiet_closed_socket_callbacks(asyncio.get_running_loop())  # the broker is killed in step 6
    work = Path(tempfile.mkdtemp(prefix="lockgw-demo-"))
    broker = _Broker(work)
    have_broker = await broker.start()
    _say(
        f"  broker: mosquitto on 127.0.0.1:{broker.port}"
        if have_broker
        else "  broker: mosquitto is not installed — running without MQTT; everything stays in the outbox"
    )
    central = _Central(broker.port if have_broker else None)
    config = _write_config(work, central, broker.port if have_broker else None)
    try:
        async with SimRadio() as radio:
            sims = await radio.add_locks(locks, seed=seed)
            async with (
                BumbleHost(controller=radio.open_gateway_controller()) as host,
                Gateway(
                    config,
                    ble_backend=host.client_backend(),
                    heartbeat_s=5,
                    republish_after_s=2,
                    control_handler=dispatch,
                ) as gw,
            ):
                await _run_shift(_Shift(gw, central, broker, have_broker), sims)
    finally:
        broker.kill()
        shutil.rmtree(work, ignore_errors=True)
    return 0


async def _run_shift(shift: _Shift, sims: list[SimLock]) -> None:
    """The shift, step by step; central consumes the events meanwhile."""
    stop = asyncio.Event()
    consumer = (
        asyncio.create_task(_consume(shift.central, shift.broker.port, stop)) if shift.have_broker else None
    )
    await _pair_locks(shift, sims)
    await _publish_keyring(shift)
    async with contextlib.AsyncExitStack() as phones:
        if shift.have_broker:
            shift.phone = await phones.enter_async_context(_phone(shift.broker.port, "phone-17"))
        await _staff_unlock_and_lock(shift)
        await _refusals(shift)
        await _emergency(shift)
        if shift.have_broker:
            await _broker_dies(shift, phones)
        await _key_rotation(shift)
    await _settle(shift)
    stop.set()
    if consumer is not None:
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
    _summary(shift)


async def _pair_locks(shift: _Shift, sims: list[SimLock]) -> None:
    _say("\n1. A technician pairs the lock units (setup code printed on each)")
    for sim in sims:
        done = await shift.gw.service.pair(str(sim.address), sim.model.setup_code, sim.model.name)
        _say(f"  paired {done.lock} ({sim.model.name}) with code {sim.model.setup_code}")
    shift.door = [s.model.lock_id for s in sims]


async def _publish_keyring(shift: _Shift) -> None:
    gw, central = shift.gw, shift.central
    _say("\n2. Central publishes the site keyring (retained) — or the gateway gets it from a phone")
    if shift.have_broker:
        async with aiomqtt.Client("127.0.0.1", shift.broker.port, identifier="demo-publisher") as pub:
            await pub.publish(f"{BASE}/{SITE}/keyring", central.keyring(1), qos=1, retain=True)
        for _ in range(100):
            if gw.authz.core.keyring is not None:
                break
            await asyncio.sleep(0.05)
    else:
        await gw.service.install(central.keyring(1))
    _say(f"  keyring v{gw.authz.trust_summary()['keyring']['version']} installed")  # type: ignore[index]


async def _staff_unlock_and_lock(shift: _Shift) -> None:
    _say("\n3. Staff unlock and lock with holder-bound tokens")
    central = shift.central
    for lock in shift.door:
        t0 = time.perf_counter()
        _show(
            f"staff-17 unlocks {lock}", await shift.at_door("staff-17", lock, central.token("staff-17", lock))
        )
        shift.latencies.append((time.perf_counter() - t0) * 1000)
        _show(
            f"staff-17 locks   {lock}",
            await shift.at_door("staff-17", lock, central.token("staff-17", lock), "lock"),
        )


async def _refusals(shift: _Shift) -> None:
    _say("\n4. Refusals")
    central, first = shift.central, shift.door[0]
    forger = generate_private_key(ALG_EDDSA, b"issuer-a", os.urandom)
    _show(
        "a forged token",
        await shift.at_door("staff-17", first, central.token("staff-17", first, signer=forger)),
    )
    stolen = central.token("staff-23", first)
    _show(
        "staff-23's token with staff-17's phone",
        await shift.at_door("staff-23", first, stolen, proof_from="staff-17"),
    )
    revoke = issuer.revocations(
        central.issuer_a,
        site=SITE,
        version=1,
        iat=int(time.time()),
        exp=int(time.time()) + 7 * 86400,
        sub=[("staff-23", int(time.time()) + 1)],
    )
    await shift.gw.service.install(revoke)
    _show("staff-23 after revocation", await shift.at_door("staff-23", first, stolen))


async def _emergency(shift: _Shift) -> None:
    _say("\n5. Emergency: the safety alarm went off")
    last = shift.door[-1]
    emergency = shift.central.token("staff-17", last, role="emergency", alarm="alarm-2026-0042", ttl=1800)
    _show(f"emergency unlock of {last}", await shift.at_door("staff-17", last, emergency))


async def _broker_dies(shift: _Shift, phones: contextlib.AsyncExitStack) -> None:
    _say("\n6. The broker dies (kill -9); doors keep opening; nothing is lost")
    await phones.aclose()  # the phone walks away from the dead broker
    shift.phone = None
    shift.broker.kill()
    await asyncio.sleep(0.3)
    for lock in shift.door[:2]:
        _show(
            f"offline unlock of {lock}",
            await shift.at_door("staff-17", lock, shift.central.token("staff-17", lock), over_mqtt=False),
        )
    _say(f"  outbox backlog while the broker is down: {shift.gw.outbox.stats().backlog} events")
    await shift.broker.start()
    _say("  broker restarted; the gateway re-publishes in order")
    async with asyncio.timeout(20):
        while shift.gw.outbox.stats().backlog > 0:  # noqa: ASYNC110 - polls receipts owned by central
            await asyncio.sleep(0.2)


async def _key_rotation(shift: _Shift) -> None:
    _say("\n7. Key rotation: keyring v2 adds issuer B; issuer A's tokens stay valid to their exp")
    central, first = shift.central, shift.door[0]
    await shift.gw.service.install(central.keyring(2, rotated=True))
    _show(
        "token from issuer B",
        await shift.at_door(
            "staff-17", first, central.token("staff-17", first, signer=central.issuer_b), over_mqtt=False
        ),
    )
    _show(
        "older token from issuer A",
        await shift.at_door("staff-17", first, central.token("staff-17", first), over_mqtt=False),
    )


async def _settle(shift: _Shift) -> None:
    """Status and lock logs of every lock, forwarded as events; then central's receipts."""
    for record in shift.gw.registry.all():
        await shift.gw.service.refresh(record)
    async with asyncio.timeout(10):
        while shift.gw.outbox.stats().backlog > 0 and shift.have_broker:  # noqa: ASYNC110 - polls receipts owned by central
            await asyncio.sleep(0.2)


def _summary(shift: _Shift) -> None:
    gw, central = shift.gw, shift.central
    stats = gw.outbox.stats()
    _say("\nLock states:")
    for view in gw.service.views.values():
        _say(f"  {view.lock} {view.name:<8} {view.state:<9} door={view.door} available={view.available}")
    _say("\nSummary")
    _say(f"  events committed: {stats.last_seq} (epoch {stats.epoch}); receipted: {stats.receipt_seq}")
    if shift.have_broker:
        _say(
            f"  central received {len(central.events)} distinct events, {central.duplicates} duplicates "
            f"(dropped by id), gaps = {central.gaps()}, hash chain {'ok' if central.chain_ok else 'BROKEN'}"
        )
    if shift.latencies:
        _say(
            f"  unlock latency (challenge + proof + unlock over MQTT and BLE): median {statistics.median(shift.latencies):.0f} ms, "
            f"max {max(shift.latencies):.0f} ms"
        )
