"""Stopping tasks for certain although Python 3.11's wait_for may swallow a cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from gateway.tasks import cancel_and_wait, cancelling_until_done


def swallows(times: int) -> tuple[Callable[[], Coroutine[Any, Any, None]], list[int]]:
    """A loop that swallows its first ``times`` cancellations, as asyncio.wait_for on Python
    3.11 does when the cancel arrives just as the awaited call completes (python/cpython#86296)."""
    swallowed: list[int] = []

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if len(swallowed) < times:
                    swallowed.append(1)
                    asyncio.current_task().uncancel()  # type: ignore[union-attr]
                    continue
                raise

    return stubborn, swallowed


async def test_cancel_and_wait_ends_a_task_that_swallowed_one_cancellation() -> None:
    stubborn, swallowed = swallows(2)
    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    async with asyncio.timeout(10):  # liveness bound: one cancel and a gather would wait for ever
        await cancel_and_wait([task])
    assert task.cancelled() and swallowed == [1, 1]


async def test_a_taskgroup_exits_although_a_child_swallowed_its_cancellation() -> None:
    stubborn, swallowed = swallows(2)
    group = asyncio.TaskGroup()
    await group.__aenter__()
    task = group.create_task(stubborn())
    await asyncio.sleep(0)
    async with asyncio.timeout(10), cancelling_until_done([task]):
        await group.__aexit__(None, None, None)
    assert task.cancelled() and swallowed == [1, 1]


async def test_cancel_and_wait_retrieves_exceptions() -> None:
    async def fails() -> None:
        raise ValueError("boom")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    await cancel_and_wait([task])  # already done: nothing to cancel, the exception is retrieved
    assert isinstance(task.exception(), ValueError)
