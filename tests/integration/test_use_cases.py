"""The typed use cases (issue 11): pairing lives in the service once, the control commands call
the service's methods, and the MQTT adapter answers through the same methods."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from credfix import SITE, T0

from firmware_sim.bumble_peripheral import SimLock, SimRadio
from gateway.authz.clock import ManualClock
from gateway.ble.bumble_backend import BumbleHost
from gateway.cli.commands import dispatch
from gateway.config import load_config
from gateway.runtime.app import Gateway

pytestmark = pytest.mark.ble


@contextlib.asynccontextmanager
async def direct_gateway(tmp_path: Path, *, locks: int = 1) -> AsyncIterator[tuple[Gateway, SimRadio, list[SimLock]]]:
    """A gateway as a direct CLI command runs it (no daemon), over simulated unpaired locks."""
    cfg = tmp_path / "lockgw.toml"
    cfg.write_text(
        f'[gateway]\nid = "gw-uc"\nsite = "{SITE}"\ndata_dir = "{tmp_path}"\n'
        f'[control]\nsocket = "{tmp_path}/ctl.sock"\n'
    )
    clock = ManualClock(T0)
    async with SimRadio(clock=clock.wall) as radio:
        sims = await radio.add_locks(locks, seed=5)
        async with (
            BumbleHost(controller=radio.open_gateway_controller()) as host,
            Gateway(load_config(cfg, env={}), clock=clock, ble_backend=host.client_backend(), direct=True) as gw,
        ):
            yield gw, radio, sims


async def _pair(gw: Gateway, sim: SimLock, name: str = "") -> dict[str, Any]:
    return await dispatch(gw, "pair", {"address": str(sim.address), "code": sim.model.setup_code, "name": name})


async def test_a_lock_unpaired_and_paired_again_answers_status(tmp_path: Path) -> None:
    """Found while moving pairing into the service: unpair dropped the lock's view but not when
    it was last refreshed, so a status within 2 s of pairing it again was an internal_error."""
    async with direct_gateway(tmp_path) as (gw, radio, (sim,)):
        lock = sim.model.lock_id
        assert (await _pair(gw, sim))["ok"]
        assert (await dispatch(gw, "status", {"lock": lock}))["ok"]
        unpaired = await dispatch(gw, "unpair", {"lock": lock})
        assert unpaired == {"ok": True, "exit": 0, "data": {"lock": lock, "wiped_on_lock": True}}
        await radio.apply_fault(lock, "pairing_mode")  # the technician presses its button
        again = await _pair(gw, sim, "Back door")
        assert again["ok"], again
        status = await dispatch(gw, "status", {"lock": lock})
        assert status["ok"], status
        assert status["data"]["name"] == "Back door" and status["data"]["available"] is True
