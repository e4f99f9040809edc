"""Two `lockgw-sim serve` processes and this test as the client process, over tcp transports."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest
from broker import free_port
from simproc import start_sim

from gateway.ble.bumble_backend import BumbleHost
from gateway.ble.lock_client import LockClient
from gateway.errors import AdapterUnavailable
from protocols.messages import Op, Status

pytestmark = [pytest.mark.ble, pytest.mark.slow]


@pytest.fixture
def two_sims() -> Iterator[list[tuple[int, subprocess.Popen[str], list[dict[str, str]]]]]:
    sims = []
    try:
        for seed in (1, 2):
            port = free_port()
            proc, locks = start_sim(port, seed=seed)
            sims.append((port, proc, locks))
        yield sims
    finally:
        for _, proc, _ in sims:
            proc.terminate()
            proc.communicate(timeout=10)  # also closes the pipes


async def test_client_process_drives_two_simulator_processes(two_sims) -> None:
    for port, proc, locks in two_sims:
        assert [set(lock) for lock in locks] == [{"lock", "address", "setup_code"}] * 2
        target = locks[1]
        async with BumbleHost(transport=f"tcp-client:127.0.0.1:{port}") as host:
            backend = host.client_backend()
            async with LockClient(target["address"], gw_id="gw-tcp", backend=backend) as client:
                paired = await client.pair(target["setup_code"])
            assert paired.lock_id == target["lock"]
            async with LockClient(target["address"], gw_id="gw-tcp", backend=backend) as client:
                await client.open_session(lock_id=target["lock"], ltk=paired.ltk)
                assert (await client.request(Op.UNLOCK)).status is Status.OK
        # Fault commands over stdin: jam, answered with one JSON line.
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps({"lock": target["lock"], "fault": "jam"}) + "\n")
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline()) == {
            "fault": "jam",
            "lock": target["lock"],
            "ok": True,
        }
        proc.stdin.write("not json\n")
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline())["ok"] is False


async def test_transport_nobody_listens_on_is_adapter_unavailable() -> None:
    with pytest.raises(AdapterUnavailable, match="lockgw-sim serve"):
        async with BumbleHost(transport=f"tcp-client:127.0.0.1:{free_port()}"):
            pass
