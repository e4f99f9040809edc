"""What a care worker waits for at the door, on a modelled radio (issue 15).

The phone's whole interaction, timed: challenge request → the proof signed (the phone's time,
modelled: ``--sign-ms``, default 150) → unlock request → the response after the bolt moved.
Reported per radio profile (firmware_sim/radio.py), at 1, 20 and 200 paired locks with 4
connection slots, idle and under load (other doors opened by other phones, status polls), as
p50/p95/p99 of the whole interaction and of the unlock request alone (request → response).

Baselines, in the same run:

* **radio floor**, computed from the model (mean advert wait + connection set-up + one
  connection event per ATT PDU + motor) and measured with a bare client (LockClient: bleak on
  Bumble, no link manager, no service) against the same simulator profile: connect, discovery,
  subscribe, session handshake, UNLOCK. The *actuation floor* is the UNLOCK exchange alone on an
  open session (write + motor + notification).
* **naive**: a connect-per-command gateway — the link manager with connect on challenge off
  (the gateway before issue 15: it connects when the unlock arrives).

The gateway (service, link manager, Bumble host) runs in this process over HCI/TCP against
``lockgw-sim serve --radio PROFILE`` in its own process. The 200 locks are paired once on a
``flat`` simulator with ``--state`` (fast), then each profile's simulator starts from that state.

Run: .venv/bin/python bench/latency_bench.py [--profiles typical,slow] [--sizes 1,20,200]
     [--samples 20] [--sign-ms 150] [--warm-s 5]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from broker import free_port
from credfix import SITE, T0, World
from gateway_bench import pct
from simproc import start_sim

from firmware_sim.bumble_peripheral import SimRadio
from firmware_sim.radio import PROFILES, RadioProfile, expected_advert_wait_s, expected_setup_s
from gateway.authz.clock import ManualClock
from gateway.ble.bumble_backend import BumbleHost
from gateway.ble.links import LinkManager
from gateway.ble.lock_client import LockClient
from gateway.ble.registry import LockRecord, Registry
from gateway.runtime.service import Service
from gateway.store.outbox import Outbox
from protocols import issuer
from protocols.messages import Op, Status

GW = "gw-latency"
SEED = 3


def b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


def summary(xs: list[float]) -> dict[str, float]:
    ms = [x * 1000 for x in xs]
    return {"n": len(ms), "p50": pct(ms, 0.5), "p95": pct(ms, 0.95), "p99": pct(ms, 0.99)}


@dataclass
class Gate:
    """One gateway (service + link manager) on one simulator process."""

    svc: Service
    w: World
    clock: ManualClock
    ids: list[str]
    sign_s: float

    async def flow(self, lock: str) -> tuple[float, float, float]:
        """The phone's interaction: (whole, unlock request → response, command on the link)."""
        t0 = time.perf_counter()
        ch = await self.svc.handle("challenge", json.dumps({"lock": lock, "act": "unlock"}).encode())
        assert ch["status"] == "ok", ch
        nonce = base64.urlsafe_b64decode(ch["data"]["nonce"] + "==")
        token = self.w.token(locks=[lock], iat=int(self.clock.wall()) - 30)
        proof = issuer.proof(self.w.holder, token_bytes=token, nonce=nonce, gw=GW, lock=lock, act="unlock")
        await asyncio.sleep(max(0.0, self.sign_s - (time.perf_counter() - t0)))
        body = json.dumps({"lock": lock, "token": b64(token), "proof": b64(proof)}).encode()
        t1 = time.perf_counter()
        assert self.svc.trace is not None
        n = len(self.svc.trace)
        answer = await self.svc.handle("unlock", body)
        t2 = time.perf_counter()
        assert answer["status"] == "ok", answer
        _, c, r, _ = self.svc.trace[n] if len(self.svc.trace) > n else (0, 0, 0, 0)
        return t2 - t0, t2 - t1, r - c


async def load(gate: Gate, stop: asyncio.Event, busy: set[str], rng: random.Random) -> None:
    """Other doors opened (two phones, each opening a random other door every 0.2-0.6 s after
    its last) and status polls (one a second, a random lock)."""

    async def doors() -> None:
        while not stop.is_set():
            free = [x for x in gate.ids if x not in busy]
            if free:
                lock = rng.choice(free)
                busy.add(lock)
                try:
                    await gate.flow(lock)
                finally:
                    busy.discard(lock)
            await asyncio.sleep(rng.uniform(0.2, 0.6))

    async def polls() -> None:
        while not stop.is_set():
            lock = rng.choice(gate.ids)
            await gate.svc.handle("status", json.dumps({"lock": lock}).encode())
            await asyncio.sleep(1.0)

    await asyncio.gather(doors(), doors(), polls())


async def measure(gate: Gate, samples: int, *, loaded: bool, rng: random.Random) -> dict[str, Any]:
    stop, busy = asyncio.Event(), set()
    background = asyncio.ensure_future(load(gate, stop, busy, rng)) if loaded else None
    whole, request, command = [], [], []
    assert gate.svc.links.exchanges is not None
    gate.svc.links.exchanges.clear()
    try:
        for _ in range(samples):
            await asyncio.sleep(rng.uniform(0.5, 1.5))  # the next person: a random advert phase
            lock = rng.choice([x for x in gate.ids if x not in busy] or gate.ids)
            busy.add(lock)
            try:
                w, r, c = await gate.flow(lock)
            finally:
                busy.discard(lock)
            whole.append(w)
            request.append(r)
            command.append(c)
    finally:
        stop.set()
        if background is not None:
            await background
    actuation = [s for op, s in gate.svc.links.exchanges if op == "UNLOCK"]
    return {
        "interaction": summary(whole),
        "unlock_request": summary(request),
        "command": summary(command),
        "actuation": summary(actuation),
    }


@contextlib.asynccontextmanager
async def gateway(
    port: int,
    records: list[LockRecord],
    work: Path,
    *,
    hold_s: float,
    warm_s: float,
    sign_s: float,
    layouts: dict[str, Any],
) -> AsyncIterator[Gate]:
    w = World()
    clock = ManualClock(T0)
    work.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once per gateway, before it runs
    async with BumbleHost(transport=f"tcp-client:127.0.0.1:{port}") as host:
        # Each lock's GATT layout was learned when it was paired (the same addresses and
        # attribute tables): a long-running gateway has it in its discovery cache.
        host.gatt_cache.update(layouts)
        registry = Registry(work / "locks.sqlite3")
        for rec in records:
            registry.put(rec)
        authz = w.authorizer(work, clock, gw_id=GW)
        authz.install(w.keyring())
        try:
            async with (
                Outbox(work / "events.sqlite3", gw=GW, site=SITE, wall=clock.wall) as outbox,
                LinkManager(
                    gw_id=GW, backend=host.client_backend(), max_connections=4, hold_s=hold_s, warm_s=warm_s
                ) as links,
            ):
                svc = Service(GW, SITE, authz, outbox, registry, links)
                svc.trace = []
                links.exchanges = []
                yield Gate(svc, w, clock, [r.lock for r in records], sign_s)
        finally:
            registry.close()
            authz.close()


async def pair_all(count: int, state: Path, layouts: dict[str, Any]) -> list[LockRecord]:
    """Pair ``count`` locks once, on a flat simulator that keeps its state in ``state``; the
    GATT layouts discovered on the way go into ``layouts``."""
    port = free_port()
    sim, lines = start_sim(port, seed=SEED, locks=count, extra=("--state", str(state)))
    records = []
    try:
        async with (
            BumbleHost(transport=f"tcp-client:127.0.0.1:{port}") as host,
            LinkManager(gw_id=GW, backend=host.client_backend(), max_connections=4) as links,
        ):
            sem = asyncio.Semaphore(4)

            async def one(line: dict[str, str]) -> LockRecord:
                async with sem:
                    done = await links.pair(line["address"], line["setup_code"])
                    return LockRecord(done.lock_id, line["address"], "door", done.ltk)

            records = list(await asyncio.gather(*(one(x) for x in lines)))
            layouts.update(host.gatt_cache)
    finally:
        sim.terminate()
        sim.communicate(timeout=30)
    return records


async def floor(profile: RadioProfile, samples: int, rng: random.Random) -> dict[str, Any]:
    """The radio floor: computed from the model, and measured with a bare client in-process."""
    ci = profile.conn_interval_ms / 1000
    whole, actuation, pdus_seen, actuation_pdus, computed = [], [], [], [], []
    async with SimRadio(profile=profile, seed=SEED) as radio:
        (sim,) = await radio.add_locks(1, seed=SEED)
        assert sim.radio is not None
        async with BumbleHost(controller=radio.open_gateway_controller()) as host:
            backend = host.client_backend()
            async with LockClient(str(sim.address), gw_id=GW, backend=backend) as client:
                done = await client.pair(sim.model.setup_code)
            loop = asyncio.get_running_loop()
            for _ in range(samples):
                await asyncio.sleep(rng.uniform(0.5, 1.5))
                t0 = loop.time()
                async with LockClient(str(sim.address), gw_id=GW, backend=backend) as client:
                    await client.open_session(lock_id=done.lock_id, ltk=done.ltk)
                    link = radio.link_clock(sim)
                    assert link is not None
                    t1, before = loop.time(), link.pdus
                    response = await client.request(Op.UNLOCK)
                    t2 = loop.time()
                    pdus_seen.append(link.pdus)
                    actuation_pdus.append(link.pdus - before)
                assert response.status is Status.OK
                whole.append(t2 - t0)
                actuation.append(t2 - t1)
            motor = sim.radio.motor_base_s
            adv = expected_advert_wait_s(profile, sim.radio.adv_interval_s)
            pdus = statistics.median(pdus_seen)
            # From a random moment: the advert, the set-up, then one event per further PDU.
            computed.append(adv + expected_setup_s(profile) + (pdus - 1) * ci + motor)
    # The UNLOCK on an open session: its writes (each with its response) and notifications, one
    # event each, the first write waiting half an event on average and the first notification
    # half an event after the motor: (PDUs - 1) intervals + the motor.
    act_pdus = statistics.median(actuation_pdus)
    actuation_model = (act_pdus - 1) * ci + motor
    return {
        "pdus_per_unlock_from_idle": pdus,
        "pdus_per_actuation": act_pdus,
        "computed_ms": round(computed[0] * 1000, 1),
        "measured": summary(whole),
        "actuation_computed_ms": round(actuation_model * 1000, 1),
        "actuation_measured": summary(actuation),
    }


async def run_profile(
    name: str,
    *,
    sizes: list[int],
    records: list[LockRecord],
    layouts: dict[str, Any],
    state: Path,
    work: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    profile = PROFILES[name]
    rng = random.Random(7)
    out: dict[str, Any] = {"floor": await floor(profile, max(5, args.samples // 2), rng)}
    print(f"{name}: floor {out['floor']}", file=sys.stderr, flush=True)
    for n in sizes:
        port = free_port()
        sim, _ = start_sim(port, seed=SEED, locks=n, extra=("--state", str(state), "--radio", name))
        try:
            for label, hold_s, warm_s in (("gateway", 10.0, args.warm_s), ("naive", 0.0, 0.0)):
                async with gateway(
                    port,
                    records[:n],
                    work / f"{name}-{n}-{label}",
                    hold_s=hold_s,
                    warm_s=warm_s,
                    sign_s=args.sign_ms / 1000,
                    layouts=layouts,
                ) as gate:
                    for loaded in (False, True):
                        key = f"{n}_locks_{'load' if loaded else 'idle'}"
                        result = await measure(gate, args.samples, loaded=loaded, rng=rng)
                        result["connects"] = gate.svc.links.stats.connects
                        out.setdefault(key, {})[label] = result
                        print(f"{name} {key} {label}: {result}", file=sys.stderr, flush=True)
        finally:
            sim.terminate()
            sim.communicate(timeout=30)
    return out


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profiles", default="typical,slow")
    parser.add_argument("--sizes", default="1,20,200")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--sign-ms", type=float, default=150.0)
    parser.add_argument("--warm-s", type=float, default=5.0, help="the gateway's warm_s (0: off)")
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="lockgw-latency-"))
    state = work / "sim-state"
    t0 = time.perf_counter()
    layouts: dict[str, Any] = {}
    records = await pair_all(max(sizes), state, layouts)
    report: dict[str, Any] = {
        "command": " ".join(["bench/latency_bench.py", *sys.argv[1:]]),
        "paired": len(records),
        "pairing_s": round(time.perf_counter() - t0, 1),
        "sign_ms": args.sign_ms,
        "warm_s": args.warm_s,
        "slots": 4,
    }
    for name in args.profiles.split(","):
        report[name] = await run_profile(
            name, sizes=sizes, records=records, layouts=layouts, state=state, work=work, args=args
        )
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
