"""Units of the operations features: metrics names (and the sample dashboard that uses them),
the metrics endpoint's listen address, Home Assistant discovery ids, the doctor action's
sharing of one run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import Config
from gateway.runtime.homeassistant import COMPONENTS, Discovery, LockInfo
from gateway.runtime.metrics import Metrics, Snapshot, parse_listen

ROOT = Path(__file__).resolve().parents[2]


def _names(metrics: Metrics) -> set[str]:
    text = metrics.render(
        Snapshot(trust_expiry_days={"keyring": 3.0}, alarms=("disk_low",), mqtt_connected=True)
    )
    families = list(text_string_to_metric_families(text.decode()))
    return {f.name for f in families} | {s.name for f in families for s in f.samples}


def test_the_sample_dashboard_queries_only_series_the_gateway_exports() -> None:
    m = Metrics()
    m.request_done("unlock", None, 0.2)
    m.request_done("unlock", "token_expired", 0.01)
    m.lock_round_trip("unlock", 0.15)
    names = _names(m)
    dashboard = json.loads((ROOT / "config" / "grafana-dashboard.json").read_text())
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"lockgw_[a-z_]+", target["expr"])
    }
    assert used and used <= names, used - names
    alerts = set(re.findall(r"lockgw_[a-z_]+", (ROOT / "docs" / "operations.md").read_text()))
    assert alerts <= names, alerts - names


def test_decisions_count_granted_as_ok_and_refusals_by_code() -> None:
    m = Metrics()
    m.request_done("unlock", None, 0.2)
    m.request_done("lock", "lock_jammed", 0.2)
    m.request_done("status", None, 0.1)  # not a decision
    text = m.render(Snapshot()).decode()
    assert 'lockgw_decisions_total{action="unlock",reason="ok"} 1.0' in text
    assert 'lockgw_decisions_total{action="lock",reason="lock_jammed"} 1.0' in text
    assert 'action="status"' not in text.split("lockgw_decisions_total", 1)[1].split("# HELP", 1)[0]
    # Two gateways in one process (tests, the demo) never share a series: private registries.
    assert "lockgw_decisions_total" not in Metrics().render(Snapshot()).decode().replace(
        "# HELP lockgw_decisions_total", ""
    ).replace("# TYPE lockgw_decisions_total", "")


@pytest.mark.parametrize(
    ("listen", "ok"),
    [
        ("127.0.0.1:9108", True),
        ("[::1]:9108", True),
        ("unix:/run/lockgw/metrics.sock", True),
        ("unix:relative.sock", False),
        ("127.0.0.1", False),
        ("127.0.0.1:0", False),
        ("127.0.0.1:70000", False),
        ("host name:1", False),
        ("unix:/" + "a" * 200, False),
    ],
)
def test_metrics_listen_is_checked_at_config_time(listen: str, ok: bool) -> None:
    raw: dict[str, Any] = {
        "gateway": {"id": "gw-1", "site": "s-1"},
        "metrics": {"enabled": True, "listen": listen},
    }
    if ok:
        assert Config.model_validate(raw).metrics.listen == listen
        assert parse_listen(listen)
    else:
        with pytest.raises(ValueError, match="metrics"):
            Config.model_validate(raw)


def test_metrics_and_discovery_are_off_by_default() -> None:
    config = Config.model_validate({"gateway": {"id": "gw-1", "site": "s-1"}})
    assert config.metrics.enabled is False and config.metrics.listen.startswith("127.0.0.1:")
    assert config.homeassistant.discovery is False


def test_discovery_ids_are_safe_unique_and_nothing_is_commandable() -> None:
    d = Discovery(gw="gw-1", base_topic="lockgw", prefix="homeassistant", version="1")
    odd = [
        LockInfo("lk-1", "Front"),
        LockInfo("lk/1", "Slash"),
        LockInfo("lk+1", "Plus"),
        LockInfo("lk 1", ""),
    ]
    configs = d.encoded(odd)
    assert len(configs) == 5 * len(odd)
    ids = set()
    for topic, raw in configs.items():
        parts = topic.split("/")
        assert (
            len(parts) == 5
            and parts[0] == "homeassistant"
            and parts[1] in COMPONENTS
            and parts[4] == "config"
        )
        assert all(re.fullmatch(r"[A-Za-z0-9_-]+", p) for p in parts[2:4]), topic
        body = json.loads(raw)
        assert not any("command" in key for key in body)
        ids.add(body["unique_id"])
    assert len(ids) == len(configs)  # lk/1, lk+1 and lk 1 do not collide after replacement
    assert set(d.removals("lk/1")) <= set(configs)


async def test_concurrent_doctor_requests_share_one_run_and_a_fresh_report_is_reused() -> None:
    from gateway.runtime.service import Service

    runs = 0
    gate = asyncio.Event()

    async def diagnose() -> dict[str, Any]:
        nonlocal runs
        runs += 1
        await gate.wait()
        return {"ok": True, "checks": []}

    svc = Service.__new__(Service)  # only the doctor fields matter here
    svc.diagnose = diagnose
    svc._doctor_run = None
    svc._doctor_last = None
    waiting = [asyncio.ensure_future(svc.doctor()) for _ in range(20)]
    await asyncio.sleep(0)
    gate.set()
    answers = await asyncio.gather(*waiting)
    assert runs == 1 and all(a == {"ok": True, "checks": []} for a in answers)
    assert await svc.doctor() == {"ok": True, "checks": []} and runs == 1


async def test_the_endpoint_serves_on_a_unix_socket_and_survives_bad_requests(tmp_path: Path) -> None:
    from gateway.runtime.metrics import MetricsServer

    path = tmp_path / "m.sock"
    m = Metrics()
    m.request_done("unlock", None, 0.3)

    async def snapshot() -> Snapshot:
        return Snapshot(last_seq=7, receipt_seq=2)

    server = asyncio.ensure_future(MetricsServer(f"unix:{path}", m, snapshot).run())

    async def get(raw: bytes) -> bytes:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(raw)
        await writer.drain()
        data = await reader.read()
        writer.close()
        return data

    try:
        async with asyncio.timeout(30):
            while not path.exists():  # noqa: ASYNC110 - the socket file is the only signal
                await asyncio.sleep(0.01)
            assert (await get(b"GET /nope HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 404")
            assert (await get(b"\xff" * 10000)).startswith(b"HTTP/1.0 400")
            ok = await get(b"GET /metrics HTTP/1.0\r\n\r\n")
        head, _, body = ok.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200") and b"text/plain" in head
        assert b"lockgw_outbox_backlog_events 5.0" in body
        assert path.stat().st_mode & 0o777 == 0o660
    finally:
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server
    assert not path.exists()  # removed on the way out


async def test_a_unix_listen_path_that_is_not_a_socket_is_never_removed(tmp_path: Path) -> None:
    """``listen = "unix:DATA_DIR/locks.sqlite3"`` (a slip) removed the lock registry: the server
    unlinks a stale socket before it binds. A path that is no socket is refused and kept."""
    from gateway.errors import ConfigError
    from gateway.runtime.metrics import MetricsServer

    victim = tmp_path / "locks.sqlite3"
    victim.write_bytes(b"link keys")

    async def snapshot() -> Snapshot:
        return Snapshot()

    with pytest.raises(ConfigError, match="not a socket"):
        await MetricsServer(f"unix:{victim}", Metrics(), snapshot).run()
    assert victim.read_bytes() == b"link keys"
