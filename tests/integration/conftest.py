from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from firmware_sim.bumble_peripheral import SimLock, SimRadio
from gateway.ble.bumble_backend import BumbleHost


@dataclass
class Air:
    radio: SimRadio
    host: BumbleHost
    locks: list[SimLock]


@pytest.fixture
async def air() -> AsyncIterator[Air]:
    async with SimRadio() as radio:
        locks = await radio.add_locks(2, seed=7)
        async with BumbleHost(controller=radio.open_gateway_controller()) as host:
            yield Air(radio, host, locks)
