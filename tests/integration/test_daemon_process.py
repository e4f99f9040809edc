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
from broker import PUBLISH, Broker, MqttProxy, drain_only_bridge, free_port
from clifix import default_signals
from simproc import start_sim

from gateway.store.outbox import Outbox

pytestmark = [pytest.mark.ble, pytest.mark.slow]
GW = "gw-proc-1"


@pytest.fixture
def sim_port() -> Iterator[int]:
    port = free_port()
    proc, _ = start_sim(port, seed=4, locks=1)
    yield port
    proc.terminate()
    proc.communicate(timeout=10)


def start_gateway(tmp_path: Path, broker: Broker, sim_port: int, log: Path) -> subprocess.Popen[bytes]:
    """``lockgw run`` with default signal dispositions; its stdout and stderr go to ``log`` (a
    file, never a pipe nobody reads while it runs), shown when the test fails."""
    cfg = tmp_path / "lockgw.toml"
    cfg.write_text(
        f'[gateway]\nid = "{GW}"\nsite = "s-1"\ndata_dir = "{tmp_path / "data"}"\n[control]\nsocket = "{tmp_path}/ctl.sock"\n'
        f'[mqtt]\nurl = "{broker.url}"\n[ble]\nbackend = "bumble"\ntransport = "tcp-client:127.0.0.1:{sim_port}"\n'
    )
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway.cli.main", "--config", str(cfg), "run"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
            preexec_fn=default_signals,  # noqa: PLW1509 - however this test run was started
        )


async def availability(broker: Broker, want: str, *, within: float = 15.0, gw: str = GW) -> dict:
    """Wait for ``want`` on the gateway's availability topic (the retained state comes first)."""
    async with aiomqtt.Client("127.0.0.1", broker.port) as c:
        await c.subscribe(f"lockgw/{gw}/availability", qos=1)
        async with asyncio.timeout(within):
            async for m in c.messages:
                body = json.loads(m.payload)
                if body["state"] == want:
                    return body
    raise AssertionError


async def retained_availability(broker: Broker, gw: str) -> dict:
    """What a subscriber arriving now is told first: the retained availability."""
    async with aiomqtt.Client("127.0.0.1", broker.port) as c:
        await c.subscribe(f"lockgw/{gw}/availability", qos=1)
        async with asyncio.timeout(15):
            async for m in c.messages:
                assert m.retain
                return json.loads(m.payload)
    raise AssertionError


async def test_sigterm_stops_cleanly_and_kill_9_triggers_the_will(
    tmp_path: Path, live_broker: Broker, sim_port: int
) -> None:
    log = tmp_path / "daemon.log"
    proc = start_gateway(tmp_path, live_broker, sim_port, log)
    try:
        assert await availability(live_broker, "online") == {"state": "online"}
        async with aiomqtt.Client("127.0.0.1", live_broker.port) as c:
            await c.subscribe(f"lockgw/{GW}/events", qos=1)
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(10):
                async for m in c.messages:
                    if json.loads(m.payload)["type"] == "gateway.stopping":
                        break
        assert proc.wait(30) == 0
        # Published, or left as the will when that publish did not complete: offline either way.
        assert await availability(live_broker, "offline") == {"state": "offline"}
        assert await retained_availability(live_broker, GW) == {"state": "offline"}
        # Restart, then kill -9: the broker publishes the will, and the epoch survives.
        proc = start_gateway(tmp_path, live_broker, sim_port, log)
        assert await availability(live_broker, "online") == {"state": "online"}
        proc.kill()
        proc.wait(10)
        assert await availability(live_broker, "offline", within=40) == {"state": "offline"}
    except BaseException:
        print(f"--- the daemon's output ---\n{log.read_text(errors='replace')}")
        raise
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_A6_a_graceful_stop_leaves_offline_retained_when_the_offline_publish_is_lost(
    tmp_path: Path, live_broker: Broker, protocol: str
) -> None:
    """A broker that stops taking the gateway's publishes just as it stops: the retained offline
    publish never completes, and a normal DISCONNECT would discard the will, leaving "online"
    retained for ever. The bridge disconnects with the will instead (MQTT 5: reason code 0x04;
    3.1.1, which has none: it ends the TCP stream without a DISCONNECT)."""
    gw = f"gw-a6-{protocol.replace('.', '')}"
    async with (
        Outbox(tmp_path / "events.sqlite3", gw=gw, site="s-1", wall=time.time) as outbox,
        MqttProxy(live_broker.port) as proxy,
    ):
        bridge = drain_only_bridge(proxy.url, outbox, gw_id=gw, site="s-1", protocol=protocol)
        await bridge.__aenter__()
        try:
            await asyncio.wait_for(bridge.connected.wait(), 15)
            assert await retained_availability(live_broker, gw) == {"state": "online"}
            proxy.swallow = lambda packet: packet[0] >> 4 == PUBLISH
        finally:
            await bridge.close(graceful=True)
        assert any(f"lockgw/{gw}/availability".encode() in p and b"offline" in p for p in proxy.swallowed)
    assert await availability(live_broker, "offline", gw=gw) == {"state": "offline"}
    assert await retained_availability(live_broker, gw) == {"state": "offline"}


def test_bad_configuration_exits_2_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[gateway]\nid = "gw-1"\nsite = "s"\n[policy]\nclock_leeway_s = "soon"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli.main", "--config", str(cfg), "run"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 2 and "policy.clock_leeway_s" in proc.stderr and "Traceback" not in proc.stderr
