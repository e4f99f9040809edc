"""`lockgw-sim serve --state DIR` as a process: a restarted simulator is the same lock, and a
state file that cannot be written is a clear error on the fault channel (THREATS D9, D11)."""

from __future__ import annotations

import json
import select
import subprocess
from pathlib import Path

import pytest
from broker import free_port
from simproc import start_sim

from gateway.ble.bumble_backend import BumbleHost
from gateway.ble.lock_client import LockClient
from protocols.messages import Op, Status

pytestmark = [pytest.mark.ble, pytest.mark.slow]
GW = "gw-state"
#: Hang guard only: a working simulator answers a fault command at once.
HANG_GUARD_S = 20


def command(proc: subprocess.Popen[str], obj: dict[str, object]) -> dict[str, object]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps(obj) + "\n")
    proc.stdin.flush()
    ready, _, _ = select.select([proc.stdout], [], [], HANG_GUARD_S)
    assert ready, "the simulator did not answer the fault command"
    answer = json.loads(proc.stdout.readline())
    assert isinstance(answer, dict)
    return answer


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    proc.communicate(timeout=10)


async def test_D11_a_restarted_simulator_is_the_same_paired_lock(tmp_path: Path) -> None:
    port = free_port()
    proc, [lock] = start_sim(port, seed=5, locks=1, extra=("--state", str(tmp_path)))
    try:
        async with BumbleHost(transport=f"tcp-client:127.0.0.1:{port}") as host:
            async with LockClient(lock["address"], gw_id=GW, backend=host.client_backend()) as client:
                paired = await client.pair(lock["setup_code"])
            async with LockClient(lock["address"], gw_id=GW, backend=host.client_backend()) as client:
                await client.open_session(lock_id=lock["lock"], ltk=paired.ltk)
                unlocked = await client.request(Op.UNLOCK)
                assert unlocked.status is Status.OK
    finally:
        stop(proc)
    assert [p.name for p in tmp_path.iterdir()] == ["lock-0.json"]  # noqa: ASYNC240 - no temp file left
    port = free_port()
    proc, [again] = start_sim(port, seed=5, locks=1, extra=("--state", str(tmp_path)))
    try:
        assert again == lock
        async with (
            BumbleHost(transport=f"tcp-client:127.0.0.1:{port}") as host,
            LockClient(lock["address"], gw_id=GW, backend=host.client_backend()) as client,
        ):
            await client.open_session(lock_id=lock["lock"], ltk=paired.ltk)  # the same key
            status = await client.request(Op.STATUS)
            assert status.result["state"] == "unlocked"
            assert status.result["log_next"] == int(str(unlocked.result["lock_seq"])) + 1
    finally:
        stop(proc)


def test_D9_a_state_file_that_cannot_be_written_is_a_clear_fault_error(tmp_path: Path) -> None:
    proc, locks = start_sim(free_port(), seed=6, locks=2, extra=("--state", str(tmp_path)))
    try:
        # lock-0's file turns into a non-empty directory: the rename over it fails.
        (tmp_path / "lock-0.json").unlink()
        (tmp_path / "lock-0.json").mkdir()
        (tmp_path / "lock-0.json" / "in-the-way").write_text("")
        answer = command(proc, {"lock": locks[0]["lock"], "fault": "battery", "value": 50})
        assert answer["ok"] is False and "lock-0.json" in str(answer["error"])
        assert sorted(p.name for p in tmp_path.iterdir()) == ["lock-0.json", "lock-1.json"]  # no temp
        # The simulator still serves: the other lock's fault is written and confirmed.
        assert command(proc, {"lock": locks[1]["lock"], "fault": "battery", "value": 50})["ok"] is True
        assert json.loads((tmp_path / "lock-1.json").read_text())["battery_pct"] == 50.0
    finally:
        stop(proc)
