"""Issue 13's proof, reduced size: events flowing from real `lockgw run` daemons and simulated
gateways through a 3-node RabbitMQ cluster to two `lockgw-receiver`s into PostgreSQL, while the
quorum queue's leader node is SIGKILLed, a receiver is SIGKILLed between commit and ack,
PostgreSQL restarts, a gateway's uplink is cut, and gateways are killed -9 — then, from
PostgreSQL alone: every committed event stored exactly once, every gap healed, every chain
verified, every receipt_seq at its gateway's last seq (tests/fleetrun.py).

Sizes: ``LOCKGW_FLEET_DAEMONS`` real daemons (default 2), ``LOCKGW_FLEET_SIMS`` simulated
gateways (default 12); bench/fleet_bench.py runs the 1,000-gateway version.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from pathlib import Path

import pytest
from fleetfix import Postgres, new_database, postgres
from fleetgw import SimGateway
from fleetrun import check_postgres, flow_daemon, flow_sims, open_fleet, run_faults, start_real_site
from rabbit import RabbitCluster

__all__ = ["postgres"]

pytestmark = [pytest.mark.ble, pytest.mark.slow, pytest.mark.timeout(900)]


async def test_fleet_faults_lose_nothing_store_nothing_twice(  # noqa: C901 - one scenario
    tmp_path: Path, rabbit3: RabbitCluster, postgres: Postgres
) -> None:
    n_daemons = int(os.environ.get("LOCKGW_FLEET_DAEMONS", "2"))
    n_sims = int(os.environ.get("LOCKGW_FLEET_SIMS", "12"))
    t_start = time.monotonic()
    dsn = await new_database(postgres)
    fleet = await open_fleet(tmp_path, rabbit3, postgres, dsn)
    stop_sims, stop_daemons = asyncio.Event(), threading.Event()
    threads: list[asyncio.Task[None]] = []
    try:
        fleet.receivers.append(
            await asyncio.to_thread(fleet.receiver, 0, env={"LOCKGW_RECEIVER_FAULT": "kill-after-commit:4"})
        )
        for i in range(1, 2):
            fleet.receivers.append(await asyncio.to_thread(fleet.receiver, i))
        starting = [
            asyncio.to_thread(
                start_real_site,
                tmp_path / f"site-{i}",
                f"gw-real-{i}",
                fleet.safe_nodes[i % len(fleet.safe_nodes)],
                fleet.base,
                seed=100 + i,
            )
            for i in range(n_daemons)
        ]
        for done in await asyncio.gather(*starting, return_exceptions=True):
            if isinstance(done, BaseException):
                raise done
            fleet.sites.append(done)
        for i in range(n_sims):
            node = rabbit3.nodes[i % len(rabbit3.nodes)]  # some on the leader: they lose their node
            gw = SimGateway(
                f"sim-{i:04d}",
                site=f"site-{i:04d}",
                host="127.0.0.1",
                port=node.mqtt_port,
                base=fleet.base,
                heartbeat_s=2.0,
                republish_after_s=5.0 if i != 3 else 3600.0,
                max_backoff_s=3.0,
                # Gateway 3 "loses" two first sends and will not re-send within the run: only
                # the receivers' replay request can heal that gap.
                lose_first_send=(5, 6) if i == 3 else (),
            )
            await gw.__aenter__()
            fleet.sims.append(gw)
        flows = asyncio.create_task(flow_sims(fleet.sims, stop_sims, every_s=0.5))
        threads += [
            asyncio.create_task(asyncio.to_thread(flow_daemon, site, stop_daemons, every_s=1.0))
            for site in fleet.sites
        ]
        await run_faults(fleet)
        await asyncio.sleep(3)  # events keep flowing after the last fault
        stop_sims.set()
        stop_daemons.set()
        await flows
        await asyncio.gather(*threads)
        t_check = time.monotonic()
        report = await check_postgres(fleet)
        report["converged_s"] = round(time.monotonic() - t_check, 1)
        report["total_s"] = round(time.monotonic() - t_start, 1)
        print(report)
        assert report["lost"] == 0 and report["stored_twice"] == 0
        assert report["stored_by_replay"] >= 2  # gateway 3's gap came back by replay
        assert report["faults"]["receiver_killed_after_commit"]
        assert report["faults"]["new_leader"] != report["faults"]["killed_leader"]
        assert all(site.unlocks > 0 for site in fleet.sites)  # the daemons did real work
    finally:
        stop_sims.set()
        stop_daemons.set()
        for t in threads:
            with contextlib.suppress(Exception):
                await t
        for gw in fleet.sims:
            await gw.__aexit__(None, None, None)
        for r in fleet.receivers:
            r.kill()
        for site in fleet.sites:
            await asyncio.to_thread(site.close)
        for node in rabbit3.nodes:  # the session's cluster stays whole for later tests
            if not node.alive():
                rabbit3.start_node(node)
