from __future__ import annotations

import asyncio

import pytest

from gateway.backoff import MAX_COMMAND_ATTEMPTS, backoff_for, should_retry
from gateway.ble.links import Priority, _Slots
from gateway.errors import LinkLost, LinkTimeout, LockMisbehaved, LockUnreachable, MqttUnavailable


@pytest.mark.parametrize(
    ("exc", "attempt", "low", "high"),
    [
        (LinkLost("x"), 1, 0.0375, 0.0625),
        (LockUnreachable("x"), 1, 0.375, 0.625),
        (LockUnreachable("x"), 3, 1.5, 2.5),
        (LinkTimeout("x"), 2, 0.375, 0.625),
        (LockMisbehaved("x"), 1, 1.5, 2.5),
        (MqttUnavailable("x"), 10, 45.0, 75.0),  # capped at 60 s ± 25 %
        (LockUnreachable("x"), 20, 7.5, 12.5),  # capped at 10 s ± 25 %
    ],
)
def test_backoff_table(exc: Exception, attempt: int, low: float, high: float) -> None:
    for r in (0.0, 0.5, 0.999):
        assert low <= backoff_for(exc, attempt, lambda r=r: r) <= high


def test_retry_policy() -> None:
    assert should_retry(LinkLost("x"), 1) and should_retry(LockUnreachable("x"), MAX_COMMAND_ATTEMPTS - 1)
    assert not should_retry(LinkLost("x"), MAX_COMMAND_ATTEMPTS)
    assert not should_retry(LockMisbehaved("x"), 1)  # never hammer a misbehaving lock
    assert not should_retry(ValueError("x"), 1)


async def test_slots_serve_access_before_housekeeping_fifo_within_priority() -> None:
    slots = _Slots(1)
    await slots.acquire(Priority.ACCESS)
    order: list[str] = []

    async def want(name: str, prio: Priority) -> None:
        await slots.acquire(prio)
        order.append(name)
        slots.release()

    tasks = [
        asyncio.create_task(want(n, p))
        for n, p in [
            ("hk1", Priority.HOUSEKEEPING),
            ("a1", Priority.ACCESS),
            ("hk2", Priority.HOUSEKEEPING),
            ("i1", Priority.INTERACTIVE),
            ("a2", Priority.ACCESS),
        ]
    ]
    await asyncio.sleep(0)
    slots.release()
    await asyncio.gather(*tasks)
    assert order == ["a1", "a2", "i1", "hk1", "hk2"]
    assert slots.free == 1


async def test_cancelled_waiter_passes_its_slot_on() -> None:
    slots = _Slots(1)
    await slots.acquire(Priority.ACCESS)
    waiter = asyncio.create_task(slots.acquire(Priority.ACCESS))
    await asyncio.sleep(0)
    waiter.cancel()
    slots.release()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert slots.free == 1
