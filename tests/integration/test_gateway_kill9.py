"""Gateway kill -9 at random points (THREATS D1/D11): every event committed before the kill is
kept, every unlock that got an ok response has its access.granted, numbering stays gapless and
chained, and lock-log entries are forwarded exactly once across restarts. 20 iterations in CI;
bench/soak_kill9.py runs the long version."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gateway.outbox import Outbox
from protocols.event_encoding import verify_chain

pytestmark = [pytest.mark.ble, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent("""
    import asyncio, base64, json, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from credfix import SITE, T0, World
    from firmware_sim.bumble_peripheral import SimRadio
    from gateway.authz import Authorizer, TrustStore
    from gateway.ble.bumble_backend import BumbleHost
    from gateway.clock import ManualClock
    from gateway.links import LinkManager
    from gateway.outbox import Outbox
    from gateway.registry import LockRecord, Registry
    from gateway.service import Service
    from protocols import issuer

    data = Path({data!r})
    async def main():
        w = World(); clock = ManualClock(T0)
        async with SimRadio(clock=clock.wall) as radio:
            sims = await radio.add_locks(2, seed=5, state_dir=data / "locks")
            async with BumbleHost(controller=radio.open_gateway_controller()) as host:
                authz = Authorizer(gw_id="gw-k", site=SITE, roots={{w.root.public.kid: w.root.public}},
                                   policy=w.policy, store=TrustStore(data / "trust.sqlite3"), clock=clock,
                                   release_floor=T0 - 10**7)
                registry = Registry(data / "reg.sqlite3")
                async with Outbox(data / "events.sqlite3", gw="gw-k", site=SITE, wall=clock.wall) as ob, \\
                        LinkManager(gw_id="gw-k", backend=host.client_backend(), max_connections=2) as links:
                    for sim in sims:
                        if registry.get(sim.model.lock_id) is None:
                            done = await links.pair(str(sim.address), sim.model.setup_code)
                            registry.put(LockRecord(done.lock_id, str(sim.address), "d", done.ltk))
                    svc = Service("gw-k", SITE, authz, ob, registry, links)
                    svc.authz.install(w.keyring())
                    print("ready", flush=True)
                    i = 0
                    while True:
                        i += 1
                        sim = sims[i % 2]
                        lock = sim.model.lock_id
                        if i % 5 == 0:
                            await radio.apply_fault(lock, "manual")
                            await svc.refresh(registry.get(lock))
                            continue
                        tok = w.token(locks=[lock], iat=T0 - 10)
                        ch = await svc.handle("challenge", json.dumps({{"lock": lock}}).encode())
                        nonce = base64.urlsafe_b64decode(ch["data"]["nonce"] + "==")
                        proof = issuer.proof(w.holder, token_bytes=tok, nonce=nonce, gw="gw-k", lock=lock, act="unlock")
                        b64 = lambda b: base64.urlsafe_b64encode(b).decode().rstrip("=")
                        resp = await svc.handle("unlock", json.dumps({{"lock": lock, "token": b64(tok), "proof": b64(proof)}}).encode())
                        if resp["status"] == "ok":
                            print("ok", resp["data"]["seq"], flush=True)
    asyncio.run(main())
""")


def run_kill9(data: Path, *, iterations: int, seed: int = 9) -> dict[str, int]:
    """Run the child ``iterations`` times, kill -9 each at a random point, then check the store."""
    script = CHILD.format(tests=str(ROOT / "tests"), data=str(data))
    rnd = random.Random(seed)
    ok_seqs: list[int] = []
    for _ in range(iterations):
        proc = subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        for _ in range(rnd.randint(1, 6)):
            line = proc.stdout.readline().split()
            assert line and line[0] == "ok"
            ok_seqs.append(int(line[1]))
        time.sleep(rnd.random() * 0.05)  # land the kill anywhere, not only right after a response
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()

    async def check() -> int:
        async with Outbox(data / "events.sqlite3", gw="gw-k", site="x", wall=lambda: 0) as ob:
            events = await ob.read(1, limit=10**7)
        seqs = [e["seq"] for e in events]
        assert seqs == list(range(1, len(seqs) + 1)), "a gap in seq"
        verify_chain(events)
        by_seq = {e["seq"]: e for e in events}
        for seq in ok_seqs:  # every ok response: its lock.unlocked and, before it, its access.granted
            done = by_seq[seq]
            assert done["type"] == "lock.unlocked"
            granted = [
                e
                for e in events
                if e["type"] == "access.granted" and e["data"]["cmd_id"] == done["data"]["cmd_id"]
            ]
            assert len(granted) == 1 and granted[0]["seq"] < seq
        forwarded = [
            (e["lock"], e["data"]["lock_seq"])
            for e in events
            if e["type"].startswith("lock.") and "lock_seq" in e.get("data", {})
        ]
        assert len(forwarded) == len(set(forwarded)), "a (lock, lock_seq) was forwarded twice"
        return len(events)

    events = asyncio.run(check())
    return {
        "iterations": iterations,
        "ok_responses": len(ok_seqs),
        "events": events,
        "lost": 0,
        "gaps": 0,
        "duplicates": 0,
    }


def test_D11_gateway_kill_9_loop_loses_nothing_and_forwards_each_lock_log_entry_once(tmp_path: Path) -> None:
    report = run_kill9(tmp_path, iterations=20)
    assert report["ok_responses"] >= 20
