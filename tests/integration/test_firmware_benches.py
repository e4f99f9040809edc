"""The firmware benches, tiny, so they cannot rot (bench/firmware_fleet_bench.py,
bench/firmware_bench.py), and the slot rules they showed: firmware work hands its connection
slot over only to more urgent work, and a rollout runs at most as many locks at once as there
are slots."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import time
from pathlib import Path
from types import ModuleType

import pytest
from fwfix import signed_image
from fwfleet import fw_site
from smp import image_management as smpimg

from gateway.ble.links import LinkManager, Priority
from gateway.ble.registry import LockRecord
from gateway.firmware.rollout import chunk_request
from protocols.messages import Op, Status

pytestmark = [pytest.mark.ble, pytest.mark.slow]
BENCH = Path(__file__).resolve().parents[2] / "bench"


def _bench(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_fleet_bench_updates_every_lock_connecting_each_about_twice() -> None:
    result = _bench("firmware_fleet_bench").main(["--locks", "5", "--slots", "2", "--kib", "8"])
    assert result["state"] == "done" and result["confirmed"] == 5, result
    assert [r["locks"] for r in result["rings"]] == [1, 1, 3]
    # At most as many locks at once as slots (the third lock of the last ring waits its turn).
    assert result["max_locks_at_once"] <= 2, result
    # Preflight + upload on one link, health + confirm on the next: not a connection per chunk.
    assert result["link_connects"] <= 2 * 5 + 2, result
    for phase in ("per_lock_upload_s", "per_lock_reset_s", "per_lock_health_s"):
        assert result[phase]["n"] == 5, result
    assert result["aggregate_bytes_per_s"] > 0


def test_the_firmware_bench_measures_both_ways() -> None:
    result = _bench("firmware_bench").main(
        ["--kib", "8", "--unlocks", "5", "--rounds", "1", "--latency-kib", "8", "--modes", "inproc,process"]
    )
    assert result["throughput"]["upload_bytes_per_s"] > 0
    for mode in ("inproc", "process"):
        latency = result[f"unlock_latency_{mode}"]
        assert latency["unlock_ms_alone"]["n"] == 5 and latency["unlock_ms_during_rollout"]["n"] == 5
        assert latency["gateway_loop_lag_ms_during_rollout"]["n"] > 0


async def _upload(links: LinkManager, record: LockRecord, image: bytes) -> None:
    sha, off = hashlib.sha256(image).digest(), 0
    while off < len(image):
        answer = await links.smp(record, chunk_request(image, off, sha, 1024))
        assert isinstance(answer, smpimg.ImageUploadWriteResponse) and answer.off is not None, answer
        off = answer.off


async def test_uploads_keep_their_slot_against_other_uploads_not_against_an_unlock(tmp_path: Path) -> None:
    """Three locks upload at once over two slots: the third waits for a slot instead of every
    chunk of every lock reconnecting (it did: ~100 connects here); an unlock of a fourth lock
    still gets a slot after the chunk in flight."""
    async with fw_site(tmp_path, locks=4, slots=2, process=False) as site:
        image = signed_image(site.key, "1.1.0", security_counter=2, size=24000)
        uploaders, door = site.records[:3], site.records[3]
        before = site.links.stats.connects
        tasks = [asyncio.create_task(_upload(site.links, r, image)) for r in uploaders]
        async with asyncio.timeout(60):
            while site.links.open_links() < 2:  # noqa: ASYNC110 - the link manager keeps no event for it
                await asyncio.sleep(0.005)
        t0 = time.perf_counter()
        answer = await site.links.command(door, Op.UNLOCK, priority=Priority.ACCESS)
        unlock_s = time.perf_counter() - t0
        assert answer.status is Status.OK
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        connects = site.links.stats.connects - before
    # One link per uploader, one for the unlock, one for the uploader it displaced.
    assert connects <= len(uploaders) + 2, connects
    assert unlock_s < 5, unlock_s
