"""Protocol cost (pure code, µs) and an unlock round trip through bleak → Bumble → simulator (ms).

Run: .venv/bin/python bench/protocol_bench.py [--rounds N]
Prints a JSON report; docs/benchmarks.md records a run. Ratios are against baselines measured in
the same run (raw X25519 + HKDF for the handshake; two AEAD seal+open pairs for a command)
because the machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from helpers import ConnectionPair

from firmware_sim.bumble_peripheral import SimRadio
from gateway.ble.bumble_backend import BumbleHost
from gateway.ble.lock_client import LockClient
from protocols.messages import Op, Request, Response, Status
from protocols.session import GatewayConnection, LockConnection

LTK = os.urandom(32)


def timeit(fn, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def handshake() -> ConnectionPair:
    gw = GatewayConnection(gw_id="gw-bench", rng=os.urandom)
    lock = LockConnection(lock_id="lk-bench", rng=os.urandom, keys={"gw-bench": LTK})
    pair = ConnectionPair(gw, lock)
    gw.start_session(lock_id="lk-bench", ltk=LTK)
    pair.transfer()
    return pair


def raw_handshake_crypto() -> None:
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    pa, pb = a.public_key(), b.public_key()
    for s in (a.exchange(pb), b.exchange(pa)):
        HKDF(hashes.SHA256(), 128, salt=LTK, info=b"x").derive(s)


def summarize(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"median": round(statistics.median(xs), 1), "p99": round(xs[max(0, int(len(xs) * 0.99) - 1)], 1)}


async def ble_roundtrips(rounds: int) -> dict[str, object]:
    async with SimRadio() as radio:
        (sim,) = await radio.add_locks(1, seed=1)
        async with BumbleHost(controller=radio.open_gateway_controller()) as host:
            backend = host.client_backend()
            async with LockClient(str(sim.address), gw_id="gw-bench", backend=backend) as c:
                ltk = (await c.pair(sim.model.setup_code)).ltk
            connect_unlock, unlock_only = [], []
            for i in range(rounds):
                t0 = time.perf_counter()
                async with LockClient(str(sim.address), gw_id="gw-bench", backend=backend) as c:
                    await c.open_session(lock_id=sim.model.lock_id, ltk=ltk)
                    t1 = time.perf_counter()
                    await c.request(Op.UNLOCK if i % 2 == 0 else Op.LOCK)
                    t2 = time.perf_counter()
                connect_unlock.append((t2 - t0) * 1000)
                unlock_only.append((t2 - t1) * 1000)
    return {
        "connect_handshake_command_ms": summarize(connect_unlock),
        "command_on_open_session_ms": summarize(unlock_only),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    n = args.rounds
    hs = timeit(handshake, n)
    raw = timeit(raw_handshake_crypto, n)
    pair = handshake()
    cmd = b"\x00" * 16

    def command() -> None:
        pair.gw.send_request(Request(Op.UNLOCK, cmd))
        pair.to_lock()
        pair.lock.send_response(Response(Op.UNLOCK, cmd, Status.OK, {"state": "unlocked", "lock_seq": 1}))
        pair.to_gw()

    aead = ChaCha20Poly1305(LTK)

    def raw_command() -> None:
        for _ in range(2):
            ct = aead.encrypt(b"\x00" * 12, b"x" * 40, b"hdr")
            aead.decrypt(b"\x00" * 12, ct, b"hdr")

    cmds = timeit(command, n * 10)
    raw_cmds = timeit(raw_command, n * 10)
    report = {
        "handshake_us": summarize(hs),
        "baseline_raw_handshake_crypto_us": summarize(raw),
        "handshake_ratio_to_raw": round(statistics.median(hs) / statistics.median(raw), 2),
        "command_roundtrip_us": summarize(cmds),
        "baseline_raw_aead_2x_seal_open_us": summarize(raw_cmds),
        "command_ratio_to_raw": round(statistics.median(cmds) / statistics.median(raw_cmds), 2),
        "ble": asyncio.run(ble_roundtrips(max(50, n // 3))),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
