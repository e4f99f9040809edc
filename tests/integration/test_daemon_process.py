"""`lockgw run` as a real process: READY, retained availability, SIGTERM and kill -9 (CONTRACT §8.9)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest
from broker import Broker, free_port
from simproc import start_sim

pytestmark = [pytest.mark.ble, pytest.mark.slow]
GW = "gw-proc-1"


@pytest.fixture
def sim_port() -> Iterator[int]:
    port = free_port()
    proc, _ = start_sim(port, seed=4, locks=1)
    yield port
    proc.terminate()
    proc.communicate(timeout=10)


def start_gateway(tmp_path: Path, broker: Broker, sim_port: int) -> subprocess.Popen[str]:
    cfg = tmp_path / "lockgw.toml"
    cfg.write_text(
        f'[gateway]\nid = "{GW}"\nsite = "s-1"\ndata_dir = "{tmp_path / "data"}"\n[control]\nsocket = "{tmp_path}/ctl.sock"\n'
        f'[mqtt]\nurl = "{broker.url}"\n[ble]\nbackend = "bumble"\ntransport = "tcp-client:127.0.0.1:{sim_port}"\n'
    )
    return subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "--config", str(cfg), "run"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


async def availability(broker: Broker, want: str, *, within: float = 15.0) -> dict:
    async with aiomqtt.Client("127.0.0.1", broker.port) as c:
        await c.subscribe(f"lockgw/{GW}/availability", qos=1)
        async with asyncio.timeout(within):
            async for m in c.messages:
                body = json.loads(m.payload)
                if body["state"] == want:
                    return body
    raise AssertionError


async def test_sigterm_stops_cleanly_and_kill_9_triggers_the_will(
    tmp_path: Path, live_broker: Broker, sim_port: int
) -> None:
    proc = start_gateway(tmp_path, live_broker, sim_port)
    try:
        assert await availability(live_broker, "online") == {"state": "online"}
        async with aiomqtt.Client("127.0.0.1", live_broker.port) as c:
            await c.subscribe(f"lockgw/{GW}/events", qos=1)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(10):
                async for m in c.messages:
                    if json.loads(m.payload)["type"] == "gateway.stopping":
                        break
        assert await availability(live_broker, "offline", within=10) == {"state": "offline"}
        assert proc.wait(10) == 0
        assert time.monotonic() - t0 < 10
        proc.communicate(timeout=10)
        # Restart, then kill -9: the broker publishes the will, and the epoch survives.
        proc = start_gateway(tmp_path, live_broker, sim_port)
        assert await availability(live_broker, "online") == {"state": "online"}
        proc.kill()
        proc.wait(10)
        assert await availability(live_broker, "offline", within=40) == {"state": "offline"}
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def test_bad_configuration_exits_2_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[gateway]\nid = "gw-1"\nsite = "s"\n[policy]\nclock_leeway_s = "soon"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "--config", str(cfg), "run"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 2 and "policy.clock_leeway_s" in proc.stderr and "Traceback" not in proc.stderr
