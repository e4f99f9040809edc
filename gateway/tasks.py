"""Stopping tasks for certain on Python 3.11.

``asyncio.wait_for`` on 3.11 swallows a cancellation that arrives just as the awaited call
completes (python/cpython#86296; fixed in 3.12, where ``wait_for`` was rewritten on
``asyncio.timeout``). Every aiomqtt call, Bumble's HCI commands and GATT requests await it. A loop
in a task hit that way carries on as if never cancelled, and a single ``cancel()`` followed by a
gather or a TaskGroup exit waits for ever — seen as an MQTT bridge that never closed. Both
helpers here cancel again, every ``CANCEL_RETRY_S``, until the tasks have ended.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from typing import Any, Final

__all__ = ["CANCEL_RETRY_S", "cancel_and_wait", "cancelling_until_done"]

#: While stopping, a task still running this long after a cancel is cancelled again.
CANCEL_RETRY_S: Final = 0.5


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel the tasks and wait until every one has ended. Exceptions the tasks ended with
    are retrieved here; a caller that needs one reads it from the task."""
    tasks = list(tasks)
    pending = {t for t in tasks if not t.done()}
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=CANCEL_RETRY_S)
    for t in tasks:
        if not t.cancelled():
            t.exception()


@contextlib.asynccontextmanager
async def cancelling_until_done(tasks: Iterable[asyncio.Task[Any]]) -> AsyncIterator[None]:
    """Cancel the tasks now and again every ``CANCEL_RETRY_S`` while the body runs — for a
    TaskGroup's exit, which must itself do the waiting (it owns its children's errors)."""
    tasks = list(tasks)

    async def again() -> None:
        while True:
            for t in tasks:
                if not t.done():
                    t.cancel()
            await asyncio.sleep(CANCEL_RETRY_S)

    nagger = asyncio.create_task(again(), name="cancel-again")
    try:
        yield
    finally:
        nagger.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await nagger
