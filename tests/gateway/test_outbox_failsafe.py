"""The outbox cannot die silently (issue: fail-safe core §1; THREATS D1, D7 and F1).

A job that cannot be stored fails alone — the other jobs of its batch commit — and every value
that reaches the writer was checked on the caller's side first. A failure that is nobody's job
(an I/O error) is fail-stop: every waiter gets the error at once, ``wait_failed`` returns, the
alarm is raised. Never a hang: every await here is bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import OutboxError
from gateway.store.outbox import Outbox
from protocols.event_encoding import verify_chain

WALL = 1_800_000_000.0
BOUND_S = 10.0  # a hang guard, not a speed assertion


def box(path: Path) -> Outbox:
    return Outbox(path / "events.sqlite3", gw="gw-1", site="s-1", wall=lambda: WALL)


async def _bounded(aw: Any) -> Any:
    async with asyncio.timeout(BOUND_S):
        return await aw


async def test_F1_lone_surrogate_in_an_event_is_refused_to_its_caller_and_the_writer_lives(
    tmp_path: Path,
) -> None:
    async with box(tmp_path) as ob:
        honest = [ob.append({"type": "lock.log", "data": {"i": i}}) for i in range(20)]
        poisoned = ob.append({"type": "access.denied", "transaction": "\ud800"})
        results = await _bounded(asyncio.gather(*honest, poisoned, return_exceptions=True))
        assert isinstance(results[-1], OutboxError) and "surrogate" in str(results[-1])
        assert all(isinstance(r, dict) for r in results[:-1])
        after = await _bounded(ob.append({"type": "gateway.stopping"}))
        assert after["seq"] == 21 and ob.healthy and not ob.alarms
        verify_chain(await ob.read(1))


@pytest.mark.parametrize(
    "fields",
    [
        {"type": "lock.log", "data": {"lock_seq": 2**64 - 1}},
        {"type": "lock.log", "data": {"n": -(2**63) - 1}},
        {"type": "lock.log", "data": {"x": float("nan")}},
        {"type": "lock.log", "data": {"b": b"bytes"}},
        {"type": "lock.log", "data": {1: "int key"}},
        {"type": 7},
        {"type": "lock.log", "lock": ["not", "text"]},
        {"type": "lock.log", "data": {"\udc80": 1}},
        {"type": "lock.log", "data": {"deep": [[[[[[[[[["x"]]]]]]]]]]}},
        {"type": "lock.log", "data": {"long": "x" * 100_000}},
    ],
    ids=lambda f: repr(f)[:40],
)
async def test_F1_values_the_store_cannot_hold_are_refused_before_they_are_queued(
    tmp_path: Path, fields: dict[Any, Any]
) -> None:
    async with box(tmp_path) as ob:
        with pytest.raises(OutboxError, match="event refused"):
            await _bounded(ob.append(fields))
        assert (await _bounded(ob.append({"type": "gateway.started"})))["seq"] == 1
        assert ob.healthy


async def test_F1_a_lock_seq_past_int64_in_the_bookkeeping_is_refused_and_nothing_is_committed(
    tmp_path: Path,
) -> None:
    async with box(tmp_path) as ob:
        with pytest.raises(OutboxError, match="lock_seq"):
            await _bounded(
                ob.append_many([{"type": "lock.unlocked", "lock": "L"}], forwarded=[("L", 2**64 - 1)])
            )
        with pytest.raises(OutboxError, match="lock_seq"):
            await _bounded(ob.append_many([{"type": "lock.log", "lock": "L"}], cursor=("L", -1)))
        assert ob.stats().last_seq == 0 and ob.healthy
        assert (await _bounded(ob.append({"type": "gateway.started"})))["seq"] == 1


async def test_F1_a_job_that_fails_in_the_writer_fails_alone_and_its_batch_commits(tmp_path: Path) -> None:
    """A job whose own work raises inside the writer (any exception, not only sqlite3.Error):
    its caller gets the error; the honest jobs queued with it in the same group commit."""

    def poisoned(_db: sqlite3.Connection) -> None:
        raise OverflowError("Python int too large to convert to SQLite INTEGER")

    async with box(tmp_path) as ob:
        # Queue them all before the writer wakes so they share one transaction.
        calls = [ob.append({"type": "lock.log", "data": {"i": i}}) for i in range(10)]
        calls.insert(5, ob._submit(poisoned, write=True))
        results = await _bounded(asyncio.gather(*calls, return_exceptions=True))
        assert isinstance(results[5], OutboxError) and "OverflowError" in str(results[5])
        assert [r["seq"] for r in results if isinstance(r, dict)] == list(range(1, 11))
        assert ob.healthy
        verify_chain(await ob.read(1))


async def test_F1_reads_that_overflow_fail_alone(tmp_path: Path) -> None:
    async with box(tmp_path) as ob:
        await ob.append({"type": "gateway.started"})
        assert await _bounded(ob.read(2**63)) == []  # clamped: nothing that high
        events, nxt = await _bounded(ob.query(1, limit=10))
        assert len(events) == 1 and nxt == 2
        with pytest.raises(OutboxError, match="read failed"):
            await _bounded(ob.query(2**64, limit=10))
        assert ob.healthy and (await _bounded(ob.append({"type": "gateway.stopping"})))["seq"] == 2


async def test_D7_a_failure_that_is_no_jobs_fault_is_fail_stop_for_every_waiter(tmp_path: Path) -> None:
    def broken_disk(_db: sqlite3.Connection) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    async with box(tmp_path) as ob:
        calls = [ob.append({"type": "lock.log"}) for _ in range(5)]
        calls.append(ob._submit(broken_disk, write=True))
        results = await _bounded(asyncio.gather(*calls, return_exceptions=True))
        assert all(isinstance(r, OutboxError) for r in results)
        failure = await _bounded(ob.wait_failed())
        assert "disk I/O error" in str(failure)
        assert not ob.healthy and "outbox_write_failed" in ob.alarms
        with pytest.raises(OutboxError):
            await _bounded(ob.append({"type": "lock.log"}))


# Any text (surrogates included), any int, nested data: either a clear refusal or a stored,
# chain-valid event — never a hang, never a dead writer.
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.dictionaries(st.text(max_size=10), _json, max_size=5),
    transaction=st.one_of(st.none(), st.text(max_size=20)),
    lock=st.one_of(st.none(), st.text(max_size=10), st.integers()),
)
def test_F1_any_generated_fields_are_refused_or_stored_chain_valid(
    tmp_path_factory: pytest.TempPathFactory, data: dict[str, Any], transaction: str | None, lock: Any
) -> None:
    path = tmp_path_factory.mktemp("ob")

    async def go() -> None:
        async with box(path) as ob:
            fields = {"type": "lock.log", "lock": lock, "transaction": transaction, "data": data}
            outcome: dict[str, Any] | OutboxError
            try:
                outcome = await _bounded(ob.append(fields))
            except OutboxError as exc:
                outcome = exc
            if isinstance(outcome, OutboxError):
                assert "event refused" in str(outcome)
            else:
                assert outcome["data"] == data
            after = await _bounded(ob.append({"type": "lock.log"}))
            assert ob.healthy
            events = await ob.read(1)
            verify_chain(events)
            assert events[-1]["seq"] == after["seq"]

    asyncio.run(go())
