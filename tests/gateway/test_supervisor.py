"""The supervisor (THREATS F3: a crashed task's reason was swallowed, and nothing restarted it).

Every component runs in one TaskGroup; a crash is logged with its traceback and handled as the
component declared: restarted with backoff (and reported as restarting), or the daemon's
``failure`` resolves with the reason. Never a bare CancelledError, never silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from gateway import log
from gateway.runtime.supervisor import Component, OnFailure, Supervisor

BOUND_S = 10.0  # hang guard


class Lines:
    """The JSON log lines written while a test ran."""

    def __init__(self) -> None:
        self.out = io.StringIO()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter([json.loads(line) for line in self.out.getvalue().splitlines()])


@pytest.fixture
def lines() -> Iterator[Lines]:
    captured = Lines()
    log.configure(captured.out, json_lines=True)
    yield captured
    structlog.reset_defaults()
    log.configure(json_lines=False)


async def test_F3_a_crashing_component_is_logged_with_its_traceback_and_restarted(lines: Lines) -> None:
    runs = 0
    healthy = asyncio.Event()

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise RecursionError("maximum recursion depth exceeded")  # the deep-receipt crash
        healthy.set()
        await asyncio.Event().wait()

    async with Supervisor([Component("mqtt", flaky)], restart_base_s=0.01, stable_s=60) as sup:
        async with asyncio.timeout(BOUND_S):
            await healthy.wait()
        assert runs == 3 and sup.restarts == {"mqtt": 2}
        assert sup.restarting() == ["mqtt"]  # not yet stable for 60 s: an alarm and a doctor check
        assert not sup.failure.done()
    crashes = [e for e in lines if e.get("event") == "component_crashed"]
    assert len(crashes) == 2
    assert all("RecursionError" in str(e["exception"]) and e["task"] == "mqtt" for e in crashes)
    assert [e["restart_in_s"] for e in crashes] == [0.01, 0.02]  # backoff doubles


async def test_F3_a_stop_component_failure_resolves_the_failure_with_its_reason(lines: Lines) -> None:
    async def store() -> None:
        raise OSError(5, "Input/output error")

    async def other() -> None:
        await asyncio.Event().wait()

    async with Supervisor([Component("outbox", store, OnFailure.STOP), Component("x", other)]) as sup:
        async with asyncio.timeout(BOUND_S):
            failure = await sup.failure
    assert failure.component == "outbox" and "Input/output error" in str(failure)
    assert any(e.get("event") == "component_failed" and e.get("level") == "critical" for e in lines)


async def test_F3_a_cancellation_nobody_asked_for_is_a_crash_not_a_silent_end(lines: Lines) -> None:
    runs = 0
    again = asyncio.Event()

    async def victim() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            fut.cancel()
            await fut  # a library cancelled what we awaited: CancelledError, no cancel of our task
        again.set()
        await asyncio.Event().wait()

    async with Supervisor([Component("adverts", victim)], restart_base_s=0.01):
        async with asyncio.timeout(BOUND_S):
            await again.wait()
    assert any("StrayCancellation" in str(e.get("exception")) for e in lines)


async def test_F3_spawned_work_that_fails_is_logged_and_stops_nothing(lines: Lines) -> None:
    done = asyncio.Event()

    async def steady() -> None:
        await done.wait()

    async def bad_publish() -> None:
        raise ValueError("boom")

    async with Supervisor([Component("steady", steady)]) as sup:
        sup.spawn(bad_publish(), "publish")
        await asyncio.sleep(0.05)
        assert not sup.failure.done() and sup.restarting() == []
        done.set()
    assert any(e.get("event") == "task_failed" and "boom" in str(e.get("exception")) for e in lines)


async def test_F3_stopping_ends_children_that_swallow_a_cancellation() -> None:
    """Python 3.11's wait_for can swallow a cancel (gateway/tasks.py): exit still returns."""

    async def stubborn() -> None:
        for _ in range(2):
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(3600)
        await asyncio.sleep(3600)

    async with asyncio.timeout(BOUND_S):
        async with Supervisor([Component("stubborn", stubborn)]):
            await asyncio.sleep(0.01)
