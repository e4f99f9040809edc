"""The gateway under its supervisor (THREATS F1, F3): a crashing component is an alarm and a
failing doctor check while it restarts; the outbox's fail-stop resolves ``Gateway.failed``
with the reason (the daemon then exits 1)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

from credfix import SITE, T0

from gateway.authz.clock import ManualClock
from gateway.cli.doctor import run_checks
from gateway.config import load_config
from gateway.errors import OutboxError
from gateway.runtime.app import Gateway
from gateway.runtime.supervisor import Component

BOUND_S = 15.0  # hang guard


def gateway(tmp_path: Path) -> Gateway:
    cfg = tmp_path / "lockgw.toml"
    cfg.write_text(
        f'[gateway]\nid = "gw-sup"\nsite = "{SITE}"\ndata_dir = "{tmp_path}"\n[control]\nsocket = "{tmp_path}/ctl.sock"\n'
    )

    class NoRadio:  # no lock is paired: the link manager never uses its backend
        pass

    return Gateway(load_config(cfg, env={}), clock=ManualClock(T0), ble_backend=NoRadio)  # type: ignore[arg-type]


async def test_F3_a_component_restarting_is_an_alarm_and_a_failing_doctor_check(tmp_path: Path) -> None:
    async def crashing() -> None:
        raise RuntimeError("probe crashed")

    async with gateway(tmp_path) as gw:
        assert gw.supervisor is not None
        gw.supervisor.add(Component("probe", crashing))
        async with asyncio.timeout(BOUND_S):
            while "probe_restarting" not in gw.alarms():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        checks = {c.name: c for c in await run_checks(gw, daemon=True)}
        assert checks["components"].status == "fail" and "probe" in checks["components"].detail
        assert not gw.failed.done()  # a restarting component never stops the daemon


async def test_F1_the_outbox_failing_for_good_resolves_failed_with_the_reason(tmp_path: Path) -> None:
    def broken_disk(_db: sqlite3.Connection) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    async with gateway(tmp_path) as gw:
        with contextlib.suppress(OutboxError):  # its caller's error is not what this test is about
            await gw.outbox._submit(broken_disk, write=True)  # the fault, injected at the writer
        async with asyncio.timeout(BOUND_S):
            failure = await gw.failed
        assert failure.component == "outbox" and "disk I/O error" in str(failure)
        assert not gw.healthy()  # the watchdog is no longer fed


async def test_A7_one_replay_at_a_time_the_others_get_busy(tmp_path: Path) -> None:
    """Found by attack: 40 replays from seq 1 at once re-published the store 40 times over."""
    gate = asyncio.Event()
    sent: list[int] = []

    async def slow_sink(event: dict[str, object]) -> None:
        await gate.wait()
        sent.append(int(str(event["seq"])))

    async with gateway(tmp_path) as gw:
        gw.service.replay_sink = slow_sink
        first = asyncio.create_task(gw.service.handle("replay", b'{"from_seq": 1}'))
        await asyncio.sleep(0.05)  # the first is now waiting on its sink
        second = await gw.service.handle("replay", b'{"from_seq": 1, "transaction": "t2"}')
        assert second["status"] == "error" and second["error"]["code"] == "busy"
        assert second["transaction"] == "t2"
        gate.set()
        async with asyncio.timeout(BOUND_S):
            done = await first
        assert done["status"] == "ok" and done["data"]["count"] == len(sent) >= 1
