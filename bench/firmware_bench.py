"""Firmware upload throughput against raw GATT write throughput of the same link, and unlock
latency with and without a rollout running (docs/firmware.md, docs/benchmarks.md).

* raw: write-without-response of MTU − 3 bytes to the SMP characteristic with the SMP window
  closed (the lock drops them unanswered: pure link throughput), until the lock has seen all;
* upload: the rollout's own path (``LinkManager.smp`` chunks sized from the lock's SMP buffer,
  each answered) for the same number of bytes;
* unlock latency: unlocks of lock B, alone, then while lock A uploads (one connection slot each).

Run: .venv/bin/python bench/firmware_bench.py [--kib 64] [--unlocks 30]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fwfix import firmware_key, signed_image
from smp import image_management as smpimg

from firmware_sim.bumble_peripheral import SimRadio
from firmware_sim.smp_gatt import SMP_CHAR_UUID, imgtool_verifier
from gateway.ble.bumble_backend import BumbleHost
from gateway.ble.links import LinkManager, Priority
from gateway.ble.lock_client import LockClient
from gateway.ble.registry import LockRecord
from gateway.firmware.rollout import chunk_request
from protocols.messages import Op


async def upload(links: LinkManager, record: LockRecord, image: bytes) -> float:
    sha = hashlib.sha256(image).digest()
    t0, off = time.perf_counter(), 0
    while off < len(image):
        smp = links.smp_link(record)
        buf = smp.buf_size if smp is not None and smp.ready else 256
        answer = await links.smp(record, chunk_request(image, off, sha, buf))
        assert isinstance(answer, smpimg.ImageUploadWriteResponse), answer
        assert answer.off is not None, answer
        off = answer.off
    return time.perf_counter() - t0


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kib", type=int, default=64)
    parser.add_argument("--unlocks", type=int, default=30)
    args = parser.parse_args()
    key = firmware_key()
    image = signed_image(key, "1.1.0", security_counter=2, size=args.kib * 1024)
    async with SimRadio() as radio:
        sims = await radio.add_locks(2, seed=3)
        smps = [radio.enable_firmware(s.model.lock_id, imgtool_verifier([key.imgtool_key])) for s in sims]
        async with (
            BumbleHost(controller=radio.open_gateway_controller()) as host,
            LinkManager(gw_id="gw-bench", backend=host.client_backend(), max_connections=2) as links,
        ):
            records = []
            for s in sims:
                done = await links.pair(str(s.address), s.model.setup_code)
                records.append(LockRecord(done.lock_id, str(s.address), "", done.ltk))

            # Raw GATT writes on a link of the same kind (no SMP window: dropped unanswered).
            async with LockClient(str(sims[0].address), gw_id="gw-bench", backend=host.client_backend()) as c:
                await c.open_session(lock_id=records[0].lock, ltk=records[0].ltk)
                client = c.bleak_client
                char = client.services.get_characteristic(SMP_CHAR_UUID)
                assert char is not None
                piece = bytes(client.mtu_size - 3)
                n = len(image) // len(piece) + 1
                before = smps[0].refused
                t0 = time.perf_counter()
                for _ in range(n):
                    await client.write_gatt_char(char, piece, response=False)
                while smps[0].refused - before < n:  # noqa: ASYNC110 - until the lock has seen them all
                    await asyncio.sleep(0.001)
                raw_s = time.perf_counter() - t0
                raw_bps = n * len(piece) / raw_s
                mtu = client.mtu_size

            up_s = await upload(links, records[0], image)
            up_bps = len(image) / up_s

            async def unlocks() -> list[float]:
                out = []
                for _ in range(args.unlocks):
                    t = time.perf_counter()
                    await links.command(records[1], Op.UNLOCK, priority=Priority.ACCESS)
                    out.append((time.perf_counter() - t) * 1000)
                    await links.command(records[1], Op.LOCK, priority=Priority.ACCESS)
                return out

            alone = await unlocks()
            stop = asyncio.Event()
            rounds = 0

            async def keep_uploading() -> None:
                nonlocal rounds
                while not stop.is_set():
                    smps[0].server.upload = None  # each round a fresh upload from offset 0
                    await upload(links, records[0], image)
                    rounds += 1

            task = asyncio.create_task(keep_uploading())
            await asyncio.sleep(0.2)
            during = await unlocks()
            uploading_at_end = not task.done()
            stop.set()
            await task
    result = {
        "image_bytes": len(image),
        "att_mtu": mtu,
        "smp_buf_size": 1024,
        "raw_gatt_write_bytes_per_s": round(raw_bps),
        "upload_bytes_per_s": round(up_bps),
        "upload_vs_raw": round(up_bps / raw_bps, 2),
        "unlock_ms_alone_median": round(statistics.median(alone), 1),
        "unlock_ms_alone_p95": round(sorted(alone)[int(0.95 * len(alone)) - 1], 1),
        "unlock_ms_during_upload_median": round(statistics.median(during), 1),
        "unlock_ms_during_upload_p95": round(sorted(during)[int(0.95 * len(during)) - 1], 1),
        "upload_still_running_after_unlocks": uploading_at_end,
        "upload_rounds_during_unlocks": rounds,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
