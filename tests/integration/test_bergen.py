"""THREATS A1, the Bergen test: WAN and broker down, keyring expired, a simulated week of shifts —
every valid unlock succeeds, every event is flagged, nothing is lost; when the broker comes
back, the week drains in order."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import aiomqtt
import pytest
from broker import Broker, free_port
from credfix import SITE, T0, World

from firmware_sim.bumble_peripheral import SimRadio
from gateway.authz.clock import ManualClock
from gateway.authz.keyfiles import b64url
from gateway.ble.bumble_backend import BumbleHost
from gateway.ble.registry import LockRecord
from gateway.config import load_config
from gateway.runtime.app import Gateway
from protocols import cbor, issuer
from protocols.event_encoding import verify_chain

pytestmark = [pytest.mark.ble, pytest.mark.slow]
GW = "gw-bergen"


async def test_A1_a_week_offline_with_expired_trust(tmp_path: Path) -> None:
    w = World()
    clock = ManualClock(T0, is_synced=False)  # no NTP either
    port = free_port()  # nobody listens here until the end
    root = tmp_path / "root.pub"
    root.write_text(b64url(cbor.dumps(w.root.public.to_cbor())))
    cfg = tmp_path / "lockgw.toml"
    cfg.write_text(
        f'[gateway]\nid = "{GW}"\nsite = "{SITE}"\ndata_dir = "{tmp_path / "data"}"\n[control]\nsocket = "{tmp_path}/ctl.sock"\n'
        f'[mqtt]\nurl = "mqtt://127.0.0.1:{port}"\n[trust]\nroot_keys = ["{root}"]\n'
    )
    unlocks = 0
    async with SimRadio(clock=clock.wall) as radio:
        sims = await radio.add_locks(2, seed=31)
        async with BumbleHost(controller=radio.open_gateway_controller()) as host:
            gw = Gateway(
                load_config(cfg, env={}),
                clock=clock,
                ble_backend=host.client_backend(),
                housekeeping_s=3600,
                republish_after_s=1,
            )
            async with gw:
                for sim in sims:
                    done = await gw.links.pair(str(sim.address), sim.model.setup_code)
                    gw.registry.put(LockRecord(done.lock_id, str(sim.address), sim.model.name, done.ltk))
                # A keyring that expires tomorrow: the week runs on a stale keyring.
                assert (await gw.service.install(w.keyring(exp=T0 + 86400))).installed
                for step in range(7 * 4):  # every 6 hours for 7 days
                    clock.advance(6 * 3600)
                    for sim in sims:
                        lock = sim.model.lock_id
                        tok = w.token(locks=[lock], iat=int(clock.wall()) - 30)  # a fresh token from central
                        ch = await gw.service.handle("challenge", json.dumps({"lock": lock}).encode())
                        nonce = base64.urlsafe_b64decode(ch["data"]["nonce"] + "==")
                        proof = issuer.proof(
                            w.holder, token_bytes=tok, nonce=nonce, gw=GW, lock=lock, act="unlock"
                        )
                        resp = await gw.service.handle(
                            "unlock",
                            json.dumps({"lock": lock, "token": b64url(tok), "proof": b64url(proof)}).encode(),
                        )
                        assert resp["status"] == "ok", (step, resp)
                        unlocks += 1
                assert gw.mqtt is not None and not gw.mqtt.connected.is_set()
                stats = gw.outbox.stats()
                assert stats.backlog == stats.last_seq  # everything queued, nothing dropped
                assert "trust_stale" in gw.alarms() and "mqtt_disconnected" in gw.alarms()
                events = await gw.outbox.read(1, limit=10_000)
                granted = [e for e in events if e["type"] == "access.granted"]
                assert len(granted) == unlocks == 56
                assert all(
                    e["trust_state"] == "stale" for e in granted[8:]
                )  # from the 5th step on, past the keyring exp
                assert all(e["trust_state"] == "ok" for e in granted[:6])
                # The uplink returns: the whole week drains, in order, chained.
                broker = Broker(tmp_path, port=port)
                broker.start()
                try:
                    async with aiomqtt.Client("127.0.0.1", port, identifier="central") as central:
                        await central.subscribe(f"lockgw/{GW}/events", qos=1)
                        seen: dict[int, dict] = {}
                        async with asyncio.timeout(60):
                            async for m in central.messages:
                                e = json.loads(m.payload)
                                seen[e["seq"]] = e
                                if len(seen) >= stats.last_seq:
                                    break
                    assert sorted(seen)[: stats.last_seq] == list(range(1, stats.last_seq + 1))
                    verify_chain([seen[i] for i in range(1, stats.last_seq + 1)])
                finally:
                    broker.stop()
