from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from airfix import Air
from clifix import field

from firmware_sim.bumble_peripheral import SimRadio
from gateway.ble.bumble_backend import BumbleHost

__all__ = ["air", "field"]  # field: the CLI tests' fixture (tests/clifix.py)


@pytest.fixture
async def air() -> AsyncIterator[Air]:
    async with SimRadio() as radio:
        locks = await radio.add_locks(2, seed=7)
        async with BumbleHost(controller=radio.open_gateway_controller()) as host:
            yield Air(radio, host, locks)
