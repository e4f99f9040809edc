"""A lock that cannot be reached fails in seconds, with one clear message and no log noise."""

from __future__ import annotations

import logging

import pytest
from airfix import Air

from gateway.ble.links import CONNECT_TIMEOUT_S, UNREACHABLE_ATTEMPTS, LinkManager
from gateway.ble.lock_client import LockClient
from gateway.ble.registry import LockRecord
from gateway.errors import LockUnreachable
from protocols.messages import Op, Status

pytestmark = pytest.mark.ble
GW = "gw-test-1"


async def test_A8_lock_out_of_range_fails_after_one_retry_with_one_clear_message(
    air: Air, caplog: pytest.LogCaptureFixture
) -> None:
    sim = air.locks[0]
    async with LockClient(str(sim.address), gw_id=GW, backend=air.host.client_backend()) as client:
        paired = await client.pair(sim.model.setup_code)
    # At once, while the simulator still re-advertises after that link's end: the lock must
    # end up silent all the same (two advert updates once raced and left it advertising).
    await air.radio.apply_fault(sim.model.lock_id, "range", "out")
    record = LockRecord(sim.model.lock_id, str(sim.address), "d", paired.ltk)
    caplog.set_level(logging.INFO)
    async with LinkManager(gw_id=GW, backend=air.host.client_backend(), max_connections=2) as links:
        with pytest.raises(LockUnreachable) as failure:
            await links.command(record, Op.STATUS)
        # One message: which lock, what was tried, the last reason, what to do (issue 12).
        message = str(failure.value)
        assert message.startswith(
            f"lock {record.lock} ({sim.address}) did not answer: 2 connection attempts over "
        )
        assert f"last: no connection to {sim.address} within {CONNECT_TIMEOUT_S:.0f} s." in message
        assert "within range of the gateway" in message
        assert links.stats.retries == UNREACHABLE_ATTEMPTS - 1 == 1
        # Bumble cancels its own timed-out connect; ours, the backstop, must not log a warning.
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
        await air.radio.apply_fault(sim.model.lock_id, "range", "in")
        assert (await links.command(record, Op.STATUS)).status is Status.OK
