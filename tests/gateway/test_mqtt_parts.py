"""The MQTT bridge's pure parts: the receipt watch (THREATS D10) and cancelling its tasks."""

from __future__ import annotations

import asyncio

from gateway.mqtt import ReceiptWatch, cancel_and_wait


def test_D10_stall_is_raised_after_the_period_and_cleared_by_progress() -> None:
    w = ReceiptWatch(600)
    assert not w.stalled(published_seq=5, receipt_seq=5, now=0)  # nothing outstanding
    assert not w.stalled(published_seq=9, receipt_seq=5, now=10)  # outstanding: the clock starts
    assert not w.stalled(published_seq=12, receipt_seq=5, now=609)  # new publishes do not reset it
    assert w.stalled(published_seq=12, receipt_seq=5, now=610)
    assert not w.stalled(published_seq=12, receipt_seq=8, now=611)  # progress starts over
    assert not w.stalled(published_seq=12, receipt_seq=8, now=1210)
    assert w.stalled(published_seq=12, receipt_seq=8, now=1211)
    assert not w.stalled(published_seq=12, receipt_seq=12, now=1212)  # all confirmed
    assert not w.stalled(published_seq=13, receipt_seq=12, now=5000)  # a fresh start


def test_D10_a_receipt_stuck_below_a_gap_stays_stalled() -> None:
    # Central lost seq 7: it can receipt 6 but never past the gap, however long events flow.
    w = ReceiptWatch(600)
    w.stalled(published_seq=7, receipt_seq=6, now=0)
    for t in range(60, 600, 60):
        assert not w.stalled(published_seq=7 + t, receipt_seq=6, now=t)
    assert w.stalled(published_seq=700, receipt_seq=6, now=600)


async def test_cancel_and_wait_ends_a_task_that_swallowed_one_cancellation() -> None:
    # Python 3.11's asyncio.wait_for (inside every aiomqtt call) can swallow a cancellation that
    # arrives as the call completes (python/cpython#86296); this task does it on purpose.
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed == 0:
                    swallowed += 1
                    asyncio.current_task().uncancel()  # type: ignore[union-attr]
                    continue
                raise

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    async with asyncio.timeout(10):  # liveness bound: one cancel and a gather would wait for ever
        await cancel_and_wait([task])
    assert task.cancelled() and swallowed == 1


async def test_cancel_and_wait_retrieves_exceptions() -> None:
    async def fails() -> None:
        raise ValueError("boom")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    await cancel_and_wait([task])  # already done: nothing to cancel, the exception is retrieved
    assert isinstance(task.exception(), ValueError)
