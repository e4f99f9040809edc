"""Connect on challenge and warm sessions (gateway/ble/links.py) on the real stack: the service,
the link manager, Bumble, and simulated locks whose connection log counts CONNECT_INDs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from test_service import Rig, build_rig

pytestmark = pytest.mark.ble

#: A hang guard for every wait, not a speed requirement.
WITHIN_S = 20.0


async def until(cond: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(WITHIN_S):
        while not cond():  # noqa: ASYNC110 - polls counters the link manager owns
            await asyncio.sleep(0.01)
    assert cond(), what


def connections(rig: Rig, index: int) -> int:
    return rig.radio.connections_to(rig.locks[index])


async def test_the_unlock_after_a_challenge_needs_no_new_connection(tmp_path: Path) -> None:
    async with build_rig(tmp_path, slots=2, links_kw={"hold_s": 10.0}) as rig:
        links = rig.svc.links
        lock = rig.locks[0].model.lock_id
        before = connections(rig, 0)
        ch = await rig.req("challenge", {"lock": lock, "act": "unlock"})
        assert ch["status"] == "ok"
        await until(lambda: links.stats.prepared == 1, "the challenge opened the link")
        assert connections(rig, 0) == before + 1
        resp = await rig.unlock(lock)  # its own challenge, then the unlock: the held link
        assert resp["status"] == "ok", resp
        assert connections(rig, 0) == before + 1  # no second connection
        assert links.stats.prepared_used == 1
        assert links.report()["connected_s_last_hour"][lock] > 0


async def test_an_unclaimed_held_link_is_released_after_its_bound(tmp_path: Path) -> None:
    async with build_rig(tmp_path, slots=2, links_kw={"hold_s": 0.5}) as rig:
        links = rig.svc.links
        lock = rig.locks[0].model.lock_id
        await rig.req("challenge", {"lock": lock, "act": "unlock"})
        await until(lambda: links.stats.prepared == 1, "the challenge opened the link")
        await until(lambda: links.open_links() == 0, "the held link was closed")
        assert links.stats.prepared_expired == 1 and links.stats.prepared_used == 0
        await until(lambda: rig.locks[0].device.is_advertising, "the lock advertises again")


async def test_a_held_link_never_starves_an_unlock_for_another_lock(tmp_path: Path) -> None:
    # One slot, held for a minute by a challenge for lock 0 (a proof that never comes): an
    # unlock for lock 1 takes the slot at once rather than waiting out the hold.
    async with build_rig(tmp_path, slots=1, links_kw={"hold_s": 60.0, "warm_s": 60.0}) as rig:
        links = rig.svc.links
        first, second = rig.locks[0].model.lock_id, rig.locks[1].model.lock_id
        await rig.req("challenge", {"lock": first, "act": "unlock"})
        await until(lambda: links.stats.prepared == 1, "the challenge opened the link")
        resp = await rig.unlock(second)
        assert resp["status"] == "ok", resp
        assert links.stats.preempted == 1
        # The second lock's link is warm now (60 s): an unlock for the first takes it over too.
        resp = await rig.unlock(first)
        assert resp["status"] == "ok", resp
        assert rig.locks[0].model.state.value == "unlocked" and rig.locks[1].model.state.value == "unlocked"


async def test_no_held_link_past_the_battery_budget(tmp_path: Path) -> None:
    async with build_rig(tmp_path, slots=2, links_kw={"hold_s": 10.0, "budget_s_per_hour": 0.0}) as rig:
        links = rig.svc.links
        lock = rig.locks[0].model.lock_id
        before = connections(rig, 0)
        await rig.req("challenge", {"lock": lock, "act": "unlock"})
        assert links.stats.over_budget >= 1 and links.stats.prepared == 0
        assert connections(rig, 0) == before  # nothing opened ahead
        resp = await rig.unlock(lock)  # the unlock itself is never refused for the budget
        assert resp["status"] == "ok", resp


async def test_a_prepare_that_cannot_reach_its_lock_costs_no_slot_and_no_extra_attempt(
    tmp_path: Path,
) -> None:
    async with build_rig(tmp_path, slots=1, links_kw={"hold_s": 30.0}) as rig:
        links = rig.svc.links
        gone, other = rig.locks[0].model.lock_id, rig.locks[1].model.lock_id
        await rig.radio.apply_fault(gone, "range", "out")
        await rig.req("challenge", {"lock": gone, "act": "unlock"})
        await until(lambda: not links._preparing, "the prepare gave up")
        assert links.stats.prepared == 0 and links._slots.free == 1  # the one slot, released once
        resp = await rig.unlock(other)  # the slot is there for another lock
        assert resp["status"] == "ok", resp
        connects, retries = links.stats.connects, links.stats.retries
        # The failed prepare was the unlock's first attempt: one more connect, then the answer
        # (no retry: the person at the door does not wait for a third connect timeout).
        resp = await rig.unlock(gone)
        assert resp["error"]["code"] == "lock_unreachable", resp
        assert links.stats.connects == connects  # no link came up
        assert links.stats.retries == retries
        assert links._slots.free == 1
