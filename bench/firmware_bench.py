"""Firmware upload throughput against raw GATT write throughput of the same link, and unlock
latency with and without a rollout running (docs/firmware.md, docs/benchmarks.md).

* raw: write-without-response of MTU − 3 bytes to the SMP characteristic with the SMP window
  closed (the lock drops them unanswered: pure link throughput), until the lock has seen all;
* upload: the rollout's own path (``LinkManager.smp`` chunks sized from the lock's SMP buffer,
  each answered) for the same number of bytes;
* unlock latency (tests/fwfleet.py): per round, unlocks of one lock with nothing else going on,
  then as many while the gateway's real rollout (``Rollouts``: upload, mark, reset, health,
  confirm) updates ``--updating`` other locks, one connection slot each; with the simulator in
  its own process (``lockgw-sim serve`` over HCI/TCP, as ``lockgw run`` meets it) and, for
  comparison, on the gateway's own event loop.

Run: .venv/bin/python bench/firmware_bench.py [--kib 64] [--unlocks 30] [--rounds 3]
     [--updating 2] [--latency-kib 128] [--modes process,inproc]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fwfix import firmware_key, signed_image
from fwfleet import fw_site, unlock_latency
from smp import image_management as smpimg

from firmware_sim.bumble_peripheral import SimRadio
from firmware_sim.smp_gatt import SMP_CHAR_UUID, imgtool_verifier
from gateway.ble.bumble_backend import BumbleHost
from gateway.ble.links import LinkManager
from gateway.ble.lock_client import LockClient
from gateway.ble.registry import LockRecord
from gateway.firmware.rollout import chunk_request


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


async def throughput(kib: int) -> dict[str, Any]:
    """Raw GATT write throughput and the upload's on the same kind of link (in process)."""
    key = firmware_key()
    image = signed_image(key, "1.1.0", security_counter=2, size=kib * 1024)
    async with SimRadio() as radio:
        sims = await radio.add_locks(1, seed=3)
        smp = radio.enable_firmware(sims[0].model.lock_id, imgtool_verifier([key.imgtool_key]))
        async with (
            BumbleHost(controller=radio.open_gateway_controller()) as host,
            LinkManager(gw_id="gw-bench", backend=host.client_backend(), max_connections=1) as links,
        ):
            done = await links.pair(str(sims[0].address), sims[0].model.setup_code)
            record = LockRecord(done.lock_id, str(sims[0].address), "", done.ltk)
            # Raw GATT writes on a link of the same kind (no SMP window: dropped unanswered).
            async with LockClient(str(sims[0].address), gw_id="gw-bench", backend=host.client_backend()) as c:
                await c.open_session(lock_id=record.lock, ltk=record.ltk)
                client = c.bleak_client
                char = client.services.get_characteristic(SMP_CHAR_UUID)
                assert char is not None
                piece = bytes(client.mtu_size - 3)
                n = len(image) // len(piece) + 1
                before = smp.refused
                t0 = time.perf_counter()
                for _ in range(n):
                    await client.write_gatt_char(char, piece, response=False)
                while smp.refused - before < n:  # noqa: ASYNC110 - until the lock has seen them all
                    await asyncio.sleep(0.001)
                raw_bps = n * len(piece) / (time.perf_counter() - t0)
                mtu = client.mtu_size
            up_bps = len(image) / await upload(links, record, image)
    return {
        "image_bytes": len(image),
        "att_mtu": mtu,
        "smp_buf_size": 1024,
        "raw_gatt_write_bytes_per_s": round(raw_bps),
        "upload_bytes_per_s": round(up_bps),
        "upload_vs_raw": round(up_bps / raw_bps, 2),
    }


async def latency(args: argparse.Namespace, process: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="lockgw-fwlat-") as tmp:
        radio = ("--radio", args.radio, *(x for kv in args.radio_set for x in ("--radio-set", kv)))
        async with fw_site(
            Path(tmp), locks=args.updating + 1, slots=args.updating + 1, process=process, radio_args=radio
        ) as site:
            return await unlock_latency(site, rounds=args.rounds, unlocks=args.unlocks, kib=args.latency_kib)


async def run(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kib", type=int, default=64, help="throughput: image body size (KiB)")
    parser.add_argument("--unlocks", type=int, default=30, help="unlocks per round, alone and during")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--updating", type=int, default=2, help="locks updated during the unlocks")
    parser.add_argument("--latency-kib", type=int, default=128, help="latency: image body size (KiB)")
    parser.add_argument("--modes", default="process,inproc", help="simulator process and/or in process")
    parser.add_argument("--radio", default="flat", help="latency: the simulator's radio profile")
    parser.add_argument(
        "--radio-set", action="append", default=[], metavar="FIELD=VALUE", help="latency: profile override"
    )
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if not set(modes) <= {"process", "inproc"}:
        parser.error("--modes takes process and/or inproc")
    result: dict[str, Any] = {
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "radio": [args.radio, *args.radio_set],
    }
    if args.kib > 0:
        result["throughput"] = await throughput(args.kib)
    for mode in modes:
        result[f"unlock_latency_{mode}"] = await latency(args, process=mode == "process")
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    result = asyncio.run(run(argv))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
