"""A BLE controller that stalls (THREATS A9): the simulator process frozen with SIGSTOP, as a USB
dongle or bluetoothd that stops answering for a while.

No request waits on a frozen controller (the link manager's deadline answers it while the
controller is still frozen), the health probe sees the stall, and once the controller answers
again the host re-opens it (HCI Reset), a connection that completed after the host gave up is
disconnected, and the lock opens on the next attempts. Times are printed, never asserted: the
bounds here are hang guards only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
from broker import free_port
from clifix import Field, start_daemon
from simproc import start_sim

from gateway.ble.bumble_backend import BumbleHost
from gateway.ble.links import COMMAND_DEADLINE_S, LinkManager
from gateway.ble.registry import LockRecord
from gateway.errors import AdapterUnavailable, BleError, LockUnreachable
from protocols.messages import Op, Status

pytestmark = [pytest.mark.ble, pytest.mark.slow]
GW = "gw-stall"
#: Hang guards only (a working simulator answers in well under a second).
HANG_GUARD_S = 60.0
#: Longer than the command deadline, so the answer must come while the controller is frozen.
FREEZE_S = COMMAND_DEADLINE_S + 10


@dataclass
class Rig:
    sim: subprocess.Popen[str]
    host: BumbleHost
    links: LinkManager
    records: list[LockRecord]

    def freeze(self) -> None:
        os.kill(self.sim.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.sim.pid, signal.SIGCONT)


@pytest.fixture
def sim() -> Iterator[tuple[int, subprocess.Popen[str], list[dict[str, str]]]]:
    port = free_port()
    proc, locks = start_sim(port, seed=9, locks=2)
    try:
        yield port, proc, locks
    finally:
        os.kill(proc.pid, signal.SIGCONT)  # a failed test must not leave it frozen
        proc.terminate()
        proc.communicate(timeout=10)


@pytest.fixture
async def rig(sim: tuple[int, subprocess.Popen[str], list[dict[str, str]]]) -> AsyncIterator[Rig]:
    port, proc, locks = sim
    async with (
        BumbleHost(transport=f"tcp-client:127.0.0.1:{port}") as host,
        LinkManager(gw_id=GW, backend=host.client_backend(), max_connections=2, idle_s=0.2) as links,
    ):
        records = []
        for lock in locks:
            paired = await links.pair(lock["address"], lock["setup_code"])
            records.append(LockRecord(paired.lock_id, lock["address"], "door", paired.ltk))
        yield Rig(proc, host, links, records)


async def _until_links_closed(links: LinkManager) -> None:
    async with asyncio.timeout(HANG_GUARD_S):
        while links.open_links():  # noqa: ASYNC110 - the reaper closes idle links
            await asyncio.sleep(0.05)


async def _until_it_opens(links: LinkManager, record: LockRecord) -> tuple[float, int]:
    """Unlock until the lock answers OK; (seconds, attempts)."""
    t0, attempts = time.monotonic(), 0
    async with asyncio.timeout(HANG_GUARD_S):
        while True:
            attempts += 1
            try:
                response = await links.command(record, Op.UNLOCK)
            except BleError:
                continue
            assert response.status is Status.OK
            return time.monotonic() - t0, attempts


async def test_A9_unlock_mid_connect_on_a_frozen_controller_is_answered_and_the_lock_opens_after(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    a, b = rig.records
    assert (await rig.links.command(a, Op.UNLOCK)).status is Status.OK
    await _until_links_closed(rig.links)  # the next unlock of A must connect
    rig.freeze()
    t0 = time.monotonic()
    thawed = asyncio.get_running_loop().create_future()

    async def thaw_later() -> None:
        await asyncio.sleep(FREEZE_S)  # the scenario: a 25 s stall, not a synchronisation
        rig.thaw()
        thawed.set_result(time.monotonic() - t0)

    thawing = asyncio.create_task(thaw_later())
    try:
        async with asyncio.timeout(HANG_GUARD_S):
            with pytest.raises(LockUnreachable):
                await rig.links.command(a, Op.UNLOCK)
        answered = time.monotonic() - t0
        # Answered by the deadline while the controller was still frozen, not when it resumed.
        assert not thawed.done()
        # The health probe sees the stall (the daemon's adapter alarm and doctor use it).
        with pytest.raises(AdapterUnavailable, match="did not answer"):
            await rig.host.check()
        assert rig.host.suspect is not None
    finally:
        await thawing
    recovered, attempts = await _until_it_opens(rig.links, a)
    assert (await rig.links.command(b, Op.STATUS)).status is Status.OK
    await rig.host.check()
    assert rig.host.suspect is None and rig.host.reopened >= 1
    # Bumble's event handling never crashed on the late events (no "!!! Exception" traceback).
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []
    print(
        f"\nunlock during a {FREEZE_S:g} s freeze answered at t+{answered:.1f} s; "
        f"lock A opened again {recovered:.1f} s after SIGCONT ({attempts} attempt(s))"
    )


async def test_A9_a_status_on_the_other_lock_is_answered_while_the_controller_is_frozen(
    rig: Rig,
) -> None:
    """With A's link up (a command in flight meets the stall on a link, not on a connect)."""
    a, b = rig.records
    assert (await rig.links.command(a, Op.STATUS)).status is Status.OK
    rig.freeze()
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(HANG_GUARD_S):
            results = await asyncio.gather(
                rig.links.command(a, Op.UNLOCK),
                rig.links.command(b, Op.STATUS),
                return_exceptions=True,
            )
        answered = time.monotonic() - t0
        assert [type(r) for r in results] == [LockUnreachable, LockUnreachable]
    finally:
        rig.thaw()
    recovered, attempts = await _until_it_opens(rig.links, a)
    assert (await rig.links.command(b, Op.STATUS)).status is Status.OK
    print(
        f"\nunlock A and status B on a frozen controller answered by t+{answered:.1f} s; "
        f"A opened again {recovered:.1f} s after SIGCONT ({attempts} attempt(s))"
    )


def _checks(f: Field) -> dict[str, dict[str, str]]:
    out = json.loads(f.run("--json", "doctor", ok=None).stdout)
    checks = out.get("data", out).get("checks", [])
    return {c["name"]: c for c in checks}


def test_A9_daemon_a_frozen_controller_fails_the_unlock_raises_the_alarm_then_recovers(field: Field) -> None:
    """The running daemon: the unlock is answered lock_unreachable with access.failed while the
    controller is frozen, doctor's adapter check fails and the alarm is raised; after SIGCONT
    the alarm clears and the door opens, with no Bumble traceback in the daemon's log."""
    daemon = start_daemon(field)
    try:
        lock = field.locks[0]
        field.run("--json", "pair", lock["address"], "--code", lock["setup_code"])
        field.run("trust", "install", str(field.tmp / "keyring.cose"))
        assert json.loads(field.act("unlock", lock["lock"], "--json").stdout)["status"] == "ok"
        os.kill(field.sim.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            failed = field.act("unlock", lock["lock"], "--json", ok=None)
            answered = time.monotonic() - t0
            assert json.loads(failed.stdout)["error"]["code"] == "lock_unreachable"
            deadline = time.monotonic() + HANG_GUARD_S
            while (checks := _checks(field))["BLE adapter"]["status"] != "fail":
                assert time.monotonic() < deadline, checks
            assert "ble_adapter_unavailable" in checks["alarms"]["detail"]
            alarmed = time.monotonic() - t0
        finally:
            os.kill(field.sim.pid, signal.SIGCONT)
        t1 = time.monotonic()
        deadline = t1 + HANG_GUARD_S
        while True:
            again = field.act("unlock", lock["lock"], "--json", ok=None)
            if json.loads(again.stdout)["status"] == "ok":
                break
            assert time.monotonic() < deadline, again.stdout
        opened = time.monotonic() - t1
        while "ble_adapter_unavailable" in (checks := _checks(field))["alarms"]["detail"]:
            assert time.monotonic() < deadline, checks
        assert checks["BLE adapter"]["status"] == "pass"
        events = json.loads(field.run("--json", "events").stdout)["events"]
        outcomes = [(e["type"], e["reason"]) for e in events if e["type"].startswith(("access.", "lock.un"))]
        assert outcomes[:4] == [
            ("access.granted", None),
            ("lock.unlocked", None),
            ("access.granted", None),
            ("access.failed", "lock_unreachable"),
        ]
        assert outcomes[-1] == ("lock.unlocked", None)
    finally:
        stopped = daemon.stop()
    log = daemon.output()
    assert stopped == 0, log
    assert "Traceback" not in log and "!!!" not in log, log
    print(
        f"\ndaemon: unlock on a frozen controller answered in {answered:.1f} s, adapter alarm and "
        f"failing doctor check by t+{alarmed:.1f} s, door opened {opened:.1f} s after SIGCONT"
    )
