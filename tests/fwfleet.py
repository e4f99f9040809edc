"""A site's firmware rollout, measured: simulated locks with SMP and MCUboot, the gateway's own
BumbleHost, LinkManager and Rollouts (the real state machine, its sqlite store) over them.

Shared by bench/firmware_fleet_bench.py (time to update N locks with S slots),
bench/firmware_bench.py (unlock latency with and without a rollout) and
tests/integration/test_firmware_benches.py (both, tiny, so the benches cannot rot).

Two ways to run the locks:

* ``process=True`` (the default of the benches): ``lockgw-sim serve --firmware-key boot.pem
  --transport tcp-server:…`` in its own process, the gateway's host reaching it over HCI/TCP as
  ``lockgw run`` does — the simulator's Bumble stacks (every lock's, and the virtual
  controllers') are not on the gateway's event loop;
* ``process=False``: everything in this process, on one loop (``SimRadio``).
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker import free_port
from fwfix import FirmwareKey, shared_firmware_key, signed_image, signed_manifest
from simproc import start_sim

from firmware_sim.bumble_peripheral import SimRadio
from firmware_sim.radio import parse_overrides, profile_named
from firmware_sim.smp_gatt import imgtool_verifier
from gateway.ble.bumble_backend import BumbleHost
from gateway.ble.links import LinkManager, Priority
from gateway.ble.registry import LockRecord
from gateway.firmware.rollout import Rollouts
from gateway.firmware.store import FirmwareStore
from protocols.cose import PrivateCoseKey
from protocols.messages import Op, Status

__all__ = ["FwSite", "fw_site", "rollout_fleet", "summary", "unlock_latency"]

GW = "gw-fwbench"
FINAL_EVENTS = frozenset({"firmware.confirmed", "firmware.failed", "firmware.reverted", "firmware.refused"})
SITE = "site-test"


@dataclass(frozen=True, slots=True)
class Event:
    t: float  # perf_counter
    type: str
    lock: str | None
    data: dict[str, Any]


@dataclass
class FwSite:
    records: list[LockRecord]
    links: LinkManager
    rollouts: Rollouts
    key: FirmwareKey
    cose: PrivateCoseKey
    process: bool
    events: list[Event] = field(default_factory=list)

    def of(self, type_: str, lock: str | None = None) -> list[Event]:
        return [e for e in self.events if e.type == type_ and (lock is None or e.lock == lock)]


@contextlib.asynccontextmanager
async def _locks_in_process(
    n: int, seed: int, key: FirmwareKey, radio_args: tuple[str, ...]
) -> AsyncIterator[tuple[BumbleHost, list[tuple[str, str]]]]:
    name, overrides = "flat", []
    for flag, value in zip(radio_args[::2], radio_args[1::2], strict=True):
        if flag == "--radio":
            name = value
        else:
            overrides.append(value)
    async with SimRadio(profile=parse_overrides(profile_named(name), overrides), seed=seed) as radio:
        sims = await radio.add_locks(n, seed=seed)
        for s in sims:
            radio.enable_firmware(s.model.lock_id, imgtool_verifier([key.imgtool_key]))
        async with BumbleHost(controller=radio.open_gateway_controller()) as host:
            yield host, [(str(s.address), s.model.setup_code) for s in sims]


@contextlib.asynccontextmanager
async def _locks_in_a_process(
    n: int, seed: int, key: FirmwareKey, work: Path, radio_args: tuple[str, ...]
) -> AsyncIterator[tuple[BumbleHost, list[tuple[str, str]]]]:
    pem = work / "boot.pem"
    key.imgtool_key.export_public(str(pem))  # the simulated bootloader's key
    port = free_port()
    sim, lines = start_sim(
        port, seed=seed, locks=n, extra=("--firmware-key", str(pem), *radio_args), stderr=work / "sim.log"
    )
    try:
        async with BumbleHost(transport=f"tcp-client:127.0.0.1:{port}") as host:
            yield host, [(line["address"], line["setup_code"]) for line in lines]
    finally:
        sim.terminate()
        try:
            sim.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            sim.kill()
            sim.communicate(timeout=10)


@contextlib.asynccontextmanager
async def fw_site(
    work: Path,
    *,
    locks: int,
    slots: int,
    process: bool = True,
    seed: int = 7,
    radio_args: tuple[str, ...] = (),
) -> AsyncIterator[FwSite]:
    """``locks`` simulated locks with SMP, paired with a gateway that has ``slots`` connection
    slots and a :class:`Rollouts` over a store in ``work``. ``radio_args``: the simulator's
    ``--radio NAME`` / ``--radio-set FIELD=VALUE`` pairs (docs/simulator.md; default flat)."""
    key, cose = shared_firmware_key()
    opened = (
        _locks_in_a_process(locks, seed, key, work, radio_args)
        if process
        else _locks_in_process(locks, seed, key, radio_args)
    )
    async with (
        opened as (host, found),
        LinkManager(gw_id=GW, backend=host.client_backend(), max_connections=slots) as links,
    ):
        records = []
        for address, code in found:
            done = await links.pair(address, code)
            records.append(LockRecord(done.lock_id, address, "", done.ltk))
        by_id = {r.lock: r for r in records}
        events: list[Event] = []

        async def emit(*args: Any, **fields: Any) -> None:
            if isinstance(args[0], str):  # emit(type, lock=…, reason=…, data={…})
                events.append(Event(time.perf_counter(), args[0], fields.get("lock"), dict(fields["data"])))
            else:  # a typed event (gateway/events.py: event_type(), data(), lock)
                ev = args[0]
                events.append(
                    Event(time.perf_counter(), ev.event_type(), getattr(ev, "lock", None), ev.data())
                )

        async with (
            FirmwareStore(work / "firmware.sqlite3") as store,
            Rollouts(
                store,
                links,
                site=SITE,
                lookup=by_id.get,
                keys=lambda: {cose.public.kid: cose.public},
                emit=emit,
            ) as rollouts,
        ):
            yield FwSite(records, links, rollouts, key, cose, process, events)


# --- time to update a site ----------------------------------------------------------------


def summary(xs: list[float]) -> dict[str, float]:
    """Median, p95 and max (ms or s, as given), rounded; p95 by the nearest rank."""
    if not xs:
        return {}
    s = sorted(xs)
    return {
        "n": len(s),
        "median": round(statistics.median(s), 3),
        "p95": round(s[min(len(s) - 1, max(0, round(0.95 * len(s)) - 1))], 3),
        "max": round(s[-1], 3),
    }


async def rollout_fleet(site: FwSite, *, kib: int, canary: int = 1, fraction: int = 20) -> dict[str, Any]:
    """One rollout of a ``kib`` KiB image to every lock of the site, rings (canary, a fraction,
    the rest), to the end; the wall time, and per lock how long its upload, reset and health
    check took (from the rollout's own events)."""
    image = signed_image(site.key, "1.1.0", security_counter=2, size=kib * 1024)
    ids = [r.lock for r in site.records]
    manifest = signed_manifest(site.cose, image, ids, canary=canary, fraction=fraction, rollout="ro-fleet")
    t0 = time.perf_counter()
    plan = await site.rollouts.apply(manifest, image)
    await site.rollouts.wait("ro-fleet")
    wall = time.perf_counter() - t0
    [status] = await site.rollouts.status()
    states = [lk["state"] for lk in status["locks"]]
    upload, reset, health, start = [], [], [], []
    for lock in ids:
        ups = site.of("firmware.uploading", lock)
        testing, confirmed = site.of("firmware.testing", lock), site.of("firmware.confirmed", lock)
        if not ups or not testing or not confirmed:
            continue
        upload.append(ups[-1].t - ups[0].t)  # first chunk answered → last chunk answered
        reset.append(testing[0].t - ups[-1].t)  # mark for test + reset + the link's end
        health.append(confirmed[0].t - testing[0].t)  # reconnect, checks, confirm
        start.append(ups[0].t - t0)
    rings = []
    for i, ring in enumerate(plan["rings"]):
        first = min(
            site.of("firmware.uploading", lk)[0].t for lk in ring if site.of("firmware.uploading", lk)
        )
        last = max(e.t for e in site.events if e.lock in ring and e.type in FINAL_EVENTS)
        rings.append({"ring": i, "locks": len(ring), "s": round(last - first, 2)})
    # How many locks were between their first upload chunk and their last step at once (the
    # rollout runs at most as many as there are slots).
    spans = []
    for lock in ids:
        ups = site.of("firmware.uploading", lock)
        ends = [e.t for e in site.events if e.lock == lock and e.type in FINAL_EVENTS]
        if ups and ends:
            spans.append((ups[0].t, max(ends)))
    at_once = max((sum(1 for a, b in spans if a <= t < b) for t, _ in spans), default=0)
    total = len(image) * states.count("confirmed")
    lock_s = sum(upload) + sum(reset) + sum(health)
    return {
        "locks": len(ids),
        "slots": site.links.occupancy()[1],
        "image_bytes": len(image),
        "state": status["state"],
        "confirmed": states.count("confirmed"),
        "wall_s": round(wall, 2),
        "rings": rings,
        "per_lock_upload_s": summary(upload),
        "per_lock_upload_bytes_per_s_median": round(len(image) / statistics.median(upload)) if upload else 0,
        "per_lock_reset_s": summary(reset),
        "per_lock_health_s": summary(health),
        "aggregate_bytes_per_s": round(total / wall),
        "lock_seconds_split": {
            "upload": round(sum(upload) / lock_s, 3) if lock_s else 0,
            "reset": round(sum(reset) / lock_s, 3) if lock_s else 0,
            "health": round(sum(health) / lock_s, 3) if lock_s else 0,
        },
        "link_connects": site.links.stats.connects,
        "max_locks_at_once": at_once,
        "not_confirmed": [
            {"lock": lk["lock"], "ring": lk["ring"], "state": lk["state"], "reason": lk["reason"]}
            for lk in status["locks"]
            if lk["state"] != "confirmed"
        ][:5],
    }


# --- unlock latency with and without a rollout ----------------------------------------------


async def _unlocks(
    site: FwSite, record: LockRecord, n: int, *, busy: list[str] | None
) -> list[tuple[float, bool]]:
    """``n`` unlocks of ``record`` (each followed by a lock): their latency (ms), and whether an
    upload was under way on one of the ``busy`` locks when each started."""
    out = []
    for _ in range(n):
        uploading = busy is not None and any(
            0 < pct < 100 for (_ro, lock), pct in site.rollouts.progress.items() if lock in busy
        )
        t = time.perf_counter()
        answer = await site.links.command(record, Op.UNLOCK, priority=Priority.ACCESS)
        out.append(((time.perf_counter() - t) * 1000, uploading))
        assert answer.status is Status.OK, answer
        await site.links.command(record, Op.LOCK, priority=Priority.ACCESS)
    return out


@contextlib.asynccontextmanager
async def _loop_lag(into: list[float]) -> AsyncIterator[None]:
    """How late a 2 ms timer fires on this (the gateway's) event loop, in ms, while inside:
    what anything else on the loop costs a callback that is ready to run."""

    async def probe() -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(0.002)
            into.append((loop.time() - t - 0.002) * 1000)

    task = asyncio.create_task(probe())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def unlock_latency(site: FwSite, *, rounds: int, unlocks: int, kib: int) -> dict[str, Any]:
    """Per round: ``unlocks`` unlocks of the first lock with nothing else going on, then as many
    while a real rollout (upload, mark, reset, health, confirm) runs on every other lock of the
    site; one image version higher each round."""
    target, updating = site.records[0], site.records[1:]
    images = [
        signed_image(site.key, f"1.{r + 1}.0", security_counter=r + 2, size=kib * 1024) for r in range(rounds)
    ]
    alone: list[float] = []
    during: list[float] = []
    during_upload: list[float] = []
    per_round = []
    busy = [r.lock for r in updating]
    await _unlocks(site, target, 3, busy=None)  # warm: the link open, the models loaded
    lag_alone: list[float] = []
    lag_during: list[float] = []
    for r, image in enumerate(images):
        async with _loop_lag(lag_alone):
            a = [ms for ms, _ in await _unlocks(site, target, unlocks, busy=None)]
        rollout = f"ro-lat-{r}"
        manifest = signed_manifest(site.cose, image, busy, canary=len(busy), rollout=rollout)
        await site.rollouts.apply(manifest, image)
        async with asyncio.timeout(120):
            while not any(site.rollouts.progress.get((rollout, lk), 0) > 0 for lk in busy):  # noqa: ASYNC110 - the runner's view
                await asyncio.sleep(0.005)
        async with _loop_lag(lag_during):
            d = await _unlocks(site, target, unlocks, busy=busy)
        still_running = rollout in {
            s["rollout"] for s in await site.rollouts.status() if s["state"] == "running"
        }
        await site.rollouts.wait(rollout)
        [status] = [s for s in await site.rollouts.status() if s["rollout"] == rollout]
        assert status["state"] == "done", status
        alone += a
        during += [ms for ms, _ in d]
        during_upload += [ms for ms, up in d if up]
        per_round.append(
            {
                "alone_ms": summary(a),
                "during_ms": summary([ms for ms, _ in d]),
                "of_which_during_an_upload": sum(up for _, up in d),
                "rollout_still_running_after_the_unlocks": still_running,
            }
        )
    return {
        "process": "simulator in its own process" if site.process else "one process, one event loop",
        "locks_updating": len(updating),
        "slots": site.links.occupancy()[1],
        "image_bytes": len(images[0]),
        "rounds": per_round,
        "unlock_ms_alone": summary(alone),
        "unlock_ms_during_rollout": summary(during),
        "unlock_ms_during_an_upload": summary(during_upload),
        "gateway_loop_lag_ms_alone": summary(lag_alone),
        "gateway_loop_lag_ms_during_rollout": summary(lag_during),
    }
