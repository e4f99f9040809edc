"""A change seen in a lock's advert (someone turned the knob inside) is fetched and forwarded
without waiting for the periodic refresh; the advert's RSSI lands in the lock state."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from credfix import SITE, T0

from firmware_sim.bumble_peripheral import SimRadio
from gateway.authz.clock import ManualClock
from gateway.ble.bumble_backend import BumbleHost
from gateway.ble.registry import LockRecord
from gateway.config import load_config
from gateway.runtime.app import Gateway

pytestmark = pytest.mark.ble


async def test_advert_change_triggers_a_refresh(tmp_path: Path) -> None:
    cfg = tmp_path / "lockgw.toml"
    cfg.write_text(
        f'[gateway]\nid = "gw-adv"\nsite = "{SITE}"\ndata_dir = "{tmp_path}"\n[control]\nsocket = "{tmp_path}/ctl.sock"\n'
    )
    clock = ManualClock(T0)
    async with SimRadio(clock=clock.wall) as radio:
        (sim,) = await radio.add_locks(1, seed=41)
        async with BumbleHost(controller=radio.open_gateway_controller()) as host:
            gw = Gateway(
                load_config(cfg, env={}),
                clock=clock,
                ble_backend=host.client_backend(),
                scanner_backend=host.scanner_backend(),
                housekeeping_s=3600,
            )
            async with gw:
                done = await gw.links.pair(str(sim.address), sim.model.setup_code)
                record = LockRecord(done.lock_id, str(sim.address), "Door", done.ltk)
                gw.registry.put(record)
                await gw.service.refresh(record)  # the lock's view exists from here on
                # The watcher has seen an advert of the paired lock since (it records the RSSI
                # and the state counter together): it knows the counter the change moves from.
                async with asyncio.timeout(15):
                    while (v := gw.service.views.get(sim.model.lock_id)) is None or v.rssi is None:  # noqa: ASYNC110
                        await asyncio.sleep(0.05)
                await radio.apply_fault(sim.model.lock_id, "manual")
                async with asyncio.timeout(15):
                    while True:
                        types = [e["type"] for e in await gw.outbox.read(1)]
                        if "lock.manual" in types:
                            break
                        await asyncio.sleep(0.1)
                assert gw.service.views[sim.model.lock_id].rssi is not None
