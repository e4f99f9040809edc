"""``lockgw demo``: simulated locks, the gateway's BLE edge, a scripted pairing and unlocks.

Everything runs over the real BLE host stack (Bumble virtual controllers on a local link):
scan → pair with each lock's setup code → authenticated session → unlock / lock / status /
log, a wrong setup code refused, and a replayed unlock refused. The full service demo (broker,
tokens, events) builds on this (see README).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time

from bleak import BleakScanner
from bleak.backends.device import BLEDevice

from firmware_sim.bumble_peripheral import SimRadio
from gateway.ble.bumble_backend import BumbleHost
from gateway.ble.link import LockClient
from gateway.errors import LockMisbehaved, PairingFailed
from protocols.gatt import COMPANY_ID, decode_advert
from protocols.messages import Op, parse_actuation, parse_log, parse_status

__all__ = ["run_demo"]

GW_ID = "gw-demo-1"


def _say(text: str) -> None:
    print(text, flush=True)


async def _scan(host: BumbleHost, want: int) -> dict[str, BLEDevice]:
    found: dict[str, BLEDevice] = {}
    async with BleakScanner(backend=host.scanner_backend()) as scanner, asyncio.timeout(10):
        async for device, adv in scanner.advertisement_data():
            advert = decode_advert(adv.manufacturer_data.get(COMPANY_ID, b""))
            if advert and advert.lock_id not in found:
                found[advert.lock_id] = device
                mode = "pairing mode" if advert.pairing_mode else "paired" if advert.paired else "idle"
                _say(f"  found {advert.lock_id} at {device.address}  rssi {adv.rssi} dBm  ({mode})")
            if len(found) == want:
                break
    return found


async def run_demo(*, locks: int = 3, seed: int | None = None) -> int:
    _say("lockgw demo — simulated locks on a Bumble BLE stack\n")
    async with SimRadio() as radio:
        sims = await radio.add_locks(locks, seed=seed)
        for sim in sims:
            code = sim.model.setup_code
            _say(f"  lock unit {sim.model.lock_id}: setup code printed on the unit: {code}")
        async with BumbleHost(controller=radio.open_gateway_controller()) as host:
            backend = host.client_backend()
            _say("\n1. scan")
            devices = await _scan(host, locks)

            _say("\n2. a wrong setup code is refused")
            first = sims[0]
            async with LockClient(devices[first.model.lock_id], gw_id=GW_ID, backend=backend) as client:
                try:
                    await client.pair("000-000-000")
                except PairingFailed as exc:
                    _say(f"  refused: {exc} ({exc.attempts_left} attempts left)")

            _say("\n3. pair every lock with its setup code")
            keys: dict[str, bytes] = {}
            for sim in sims:
                async with LockClient(devices[sim.model.lock_id], gw_id=GW_ID, backend=backend) as client:
                    done = await client.pair(sim.model.setup_code)
                keys[done.lock_id] = done.ltk
                _say(f"  paired {done.lock_id} (fresh 256-bit link key)")

            _say("\n4. unlock and lock each door over an authenticated session")
            latencies: list[float] = []
            for sim in sims:
                lock_id = sim.model.lock_id
                async with LockClient(devices[lock_id], gw_id=GW_ID, backend=backend) as client:
                    t0 = time.perf_counter()
                    await client.open_session(lock_id=lock_id, ltk=keys[lock_id])
                    state, _ = parse_actuation((await client.request(Op.UNLOCK)).result)
                    latencies.append((time.perf_counter() - t0) * 1000)
                    _say(f"  {lock_id}: unlock → {state}")
                    state, _ = parse_actuation((await client.request(Op.LOCK)).result)
                    _say(f"  {lock_id}: lock   → {state}")
                    st = parse_status((await client.request(Op.STATUS)).result)
                    _say(f"  {lock_id}: status door={st.door} battery={st.battery_pct}% fw={st.firmware}")
                    log = await client.request(Op.READ_LOG, {"from": 1, "max": 16})
                    entries, _ = parse_log(log.result)
                    _say(f"  {lock_id}: lock log {[f'{e.lock_seq}:{e.kind}' for e in entries]}")

            _say("\n5. a forged session (wrong link key) is refused by the lock")
            lock_id = sims[-1].model.lock_id
            async with LockClient(devices[lock_id], gw_id=GW_ID, backend=backend) as client:
                try:
                    await client.open_session(lock_id=lock_id, ltk=os.urandom(32))
                except LockMisbehaved as exc:
                    _say(f"  refused: {exc}")
            _say(
                f"\nsummary: {locks} locks paired, {2 * locks} actuations, "
                f"connect+handshake+unlock median {statistics.median(latencies):.1f} ms"
            )
    return 0


def main() -> int:
    return asyncio.run(run_demo())
