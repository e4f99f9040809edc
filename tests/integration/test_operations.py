"""Operating a site from afar, on the running daemon (`lockgw-sim`, mosquitto, `lockgw run`):
the MQTT `doctor` action, the Prometheus endpoint scraped before and after real unlocks, and
Home Assistant discovery checked against the fields Home Assistant requires."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import aiomqtt
import pytest
from broker import Broker, free_port
from daemonfix import BASE, GW, Site, make_site
from prometheus_client.parser import text_string_to_metric_families

from gateway.runtime.service import LockView

pytestmark = [pytest.mark.ble, pytest.mark.slow]

WITHIN_S = 30.0
HA = "homeassistant"


#: The daemon's sd_notify datagrams (systemd's NOTIFY_SOCKET, played by the test's socket).
NOTIFIED: list[str] = []
NOTIFY: list[socket.socket] = []


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory, broker: Broker) -> Iterator[tuple[Site, int]]:
    if broker.proc is None or broker.proc.poll() is not None:
        broker.start()
    port = free_port()
    extra = f'[metrics]\nenabled = true\nlisten = "127.0.0.1:{port}"\n[homeassistant]\ndiscovery = true\n'
    tmp = tmp_path_factory.mktemp("ops")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp / "notify.sock"))
    notify.setblocking(False)
    NOTIFY.append(notify)
    saved = os.environ.get("NOTIFY_SOCKET")
    os.environ["NOTIFY_SOCKET"] = str(tmp / "notify.sock")
    try:
        s, sim = make_site(tmp, broker, extra_config=extra)
    finally:
        if saved is None:
            os.environ.pop("NOTIFY_SOCKET", None)
        else:
            os.environ["NOTIFY_SOCKET"] = saved
    try:
        yield s, port
        assert s.daemon.stop() == 0, s.daemon.output()
        assert "Traceback" not in s.daemon.output()
    finally:
        sim.terminate()
        sim.communicate(timeout=10)
        _drain_notify()
        NOTIFY.clear()
        notify.close()


def _drain_notify() -> list[str]:
    """Every datagram the daemon sent to NOTIFY_SOCKET so far."""
    for sock in NOTIFY:
        while True:
            try:
                NOTIFIED.append(sock.recv(4096).decode())
            except BlockingIOError:
                break
    return NOTIFIED


def http(port: int, request: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=WITHIN_S) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def scrape(port: int) -> tuple[dict[tuple[str, tuple[tuple[str, str], ...]], float], str]:
    status, body = http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200
    text = body.decode()
    values = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return values, text


async def _session(site: Site, body: Any) -> Any:
    c = await site.session()
    try:
        return await body(c)
    finally:
        await c.__aexit__(None, None, None)


def test_doctor_over_mqtt_answers_with_the_same_checks_as_the_cli(ops: tuple[Site, int]) -> None:
    site, _ = ops

    async def ask(c: aiomqtt.Client) -> tuple[dict[str, Any], dict[str, Any]]:
        good = await site.request(c, "doctor", b'{"transaction": "diag-1"}')
        bad = await site.request(c, "doctor", b"[1]")
        return good, bad

    good, bad = asyncio.run(_session(site, ask))
    assert good["status"] == "ok" and good["transaction"] == "diag-1", good
    report = good["data"]
    assert report["ok"] is True, report
    by_name = {c["name"]: c for c in report["checks"]}
    assert by_name["broker"]["status"] == "pass" and by_name["outbox"]["status"] == "pass"
    assert by_name["BLE adapter"]["status"] == "pass"
    assert bad["status"] == "error" and bad["error"]["code"] == "invalid_request"
    cli = json.loads(site.field.run("--json", "doctor").stdout)
    assert [c["name"] for c in cli["checks"]] == [c["name"] for c in report["checks"]]


def _sample(values: dict[Any, float], name: str, **labels: str) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_with_real_unlocks(ops: tuple[Site, int]) -> None:
    site, port = ops
    before, _ = scrape(port)

    async def shift(c: aiomqtt.Client) -> None:
        for lock in site.locks:
            answer = await site.unlock(c, lock)
            assert answer["status"] == "ok", answer
        denied = await site.request(
            c, "unlock", json.dumps({"lock": site.locks[0], "token": "AAAA"}).encode()
        )
        assert denied["status"] == "error"

    asyncio.run(_session(site, shift))
    after, text = scrape(port)
    print(
        "\n".join(
            line
            for line in text.splitlines()
            if not line.startswith("#") and "_bucket" not in line and "_created" not in line
        )
    )

    def moved(name: str, **labels: str) -> float:
        return _sample(after, name, **labels) - _sample(before, name, **labels)

    assert moved("lockgw_request_seconds_count", action="unlock") == 3
    assert moved("lockgw_request_seconds_count", action="challenge") == 2
    assert moved("lockgw_lock_round_trip_seconds_count", action="unlock") == 2
    assert moved("lockgw_lock_round_trip_seconds_sum", action="unlock") > 0
    assert moved("lockgw_decisions_total", action="unlock", reason="ok") == 2
    assert moved("lockgw_decisions_total", action="unlock", reason="token_invalid") == 1
    assert moved("lockgw_outbox_last_seq") >= 5  # granted + unlocked twice, and the denial
    assert _sample(after, "lockgw_outbox_backlog_events") > 0  # nobody receipts in this site
    assert _sample(after, "lockgw_receipt_lag_seconds") > 0
    assert _sample(after, "lockgw_link_slots") == 4
    assert 0 <= _sample(after, "lockgw_link_slots_in_use") <= 4
    assert _sample(after, "lockgw_locks_paired") == 2
    assert 59 < _sample(after, "lockgw_trust_expiry_days", what="key") <= 60  # the key's exp: now + 60 d
    assert 59 < _sample(after, "lockgw_trust_nearest_expiry_days") <= 60
    assert sum(v for (n, _), v in after.items() if n == "lockgw_time_state") == 1
    assert _sample(after, "lockgw_mqtt_connected") == 1
    assert _sample(after, "lockgw_alarms") == sum(v for (n, _), v in after.items() if n == "lockgw_alarm")
    # Only GET /metrics; a malformed request is a 400, never the end of the endpoint.
    assert http(port, b"GET /other HTTP/1.1\r\n\r\n")[0] == 404
    assert http(port, b"POST /metrics HTTP/1.1\r\n\r\n")[0] == 405
    assert http(port, b"G" * 20000)[0] == 400
    assert scrape(port)[0]


#: What Home Assistant requires of a discovery config for these entities, from its docs:
#: https://www.home-assistant.io/integrations/mqtt/ ("Discovery messages": the topic format,
#: `<discovery_prefix>/<component>/[<node_id>/]<object_id>/config` with ids in [a-zA-Z0-9_-];
#: "the `device` mapping … only works … when `unique_id` is set"; at least one of `identifiers`
#: or `connections` in it), https://www.home-assistant.io/integrations/sensor.mqtt/
#: (`state_topic` Required) and https://www.home-assistant.io/integrations/binary_sensor.mqtt/
#: (`state_topic`; `payload_on`/`payload_off`, default ON/OFF); each `availability` entry needs
#: its `topic` (Required). device_class values from the sensor and binary_sensor entity docs.
REQUIRED = {
    "sensor": {"state_topic", "unique_id", "device", "availability"},
    "binary_sensor": {"state_topic", "unique_id", "device", "availability", "payload_on", "payload_off"},
}
DEVICE_CLASSES = {
    "sensor": {"enum", "battery", "timestamp"},
    "binary_sensor": {"door", "connectivity"},
}
TOPIC = re.compile(rf"^{HA}/(sensor|binary_sensor)/([A-Za-z0-9_-]+)/([A-Za-z0-9_-]+)/config$")


async def _retained(port: int, topic: str, *, want: int) -> dict[str, bytes]:
    got: dict[str, bytes] = {}
    async with aiomqtt.Client("127.0.0.1", port, identifier="home-assistant") as c:
        await c.subscribe(topic, qos=1)
        async with asyncio.timeout(WITHIN_S):
            async for m in c.messages:
                got[str(m.topic)] = bytes(m.payload)
                if len(got) >= want:
                    return got
    return got


def test_home_assistant_discovery_is_read_only_and_complete(ops: tuple[Site, int]) -> None:
    site, _ = ops
    configs = asyncio.run(_retained(site.broker.port, f"{HA}/#", want=5 * len(site.locks)))
    assert len(configs) == 5 * len(site.locks)
    unique_ids = set()
    for topic, raw in configs.items():
        m = TOPIC.match(topic)
        assert m, topic
        component, node = m.group(1), m.group(2)
        assert node == GW
        body = json.loads(raw)
        missing = REQUIRED[component] - set(body)
        assert not missing, (topic, missing)
        assert "command_topic" not in body and not any("command" in k for k in body), topic
        assert body["device_class"] in DEVICE_CLASSES[component]
        assert body["device"]["identifiers"] and body["device"]["name"]
        assert all(a["topic"] == f"{BASE}/{GW}/availability" for a in body["availability"])
        fields = set(re.findall(r"value_json\.(\w+)", body["value_template"]))
        if body["state_topic"].endswith("/state"):
            assert fields <= set(LockView.FIELDS), (topic, fields)
        else:
            assert body["state_topic"].endswith("/last_access") and fields == {"ts"}
        unique_ids.add(body["unique_id"])
    assert len(unique_ids) == len(configs)
    components = {TOPIC.match(t).group(1) for t in configs}  # type: ignore[union-attr]
    assert components == {"sensor", "binary_sensor"}  # never a `lock` (or any commandable) entity

    # After an unlock, the last access (no staff id) is retained for the timestamp sensor.
    asyncio.run(_session(site, lambda c: site.unlock(c, site.locks[1])))
    last = asyncio.run(_retained(site.broker.port, f"{BASE}/{GW}/locks/{site.locks[1]}/last_access", want=1))
    body = json.loads(next(iter(last.values())))
    assert body["lock"] == site.locks[1] and body["action"] == "unlock" and "sub" not in body
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", body["ts"])


def test_sd_notify_status_is_kept_current(ops: tuple[Site, int]) -> None:
    """READY=1 with a STATUS= line, and STATUS= again when the backlog moves (within the alarm
    loop's 5 s; the deadline is a hang guard)."""
    site, _ = ops
    sent = _drain_notify()
    assert any(d.startswith("READY=1") for d in sent), sent
    statuses = [line for d in sent for line in d.splitlines() if line.startswith("STATUS=")]
    assert statuses and statuses[0].startswith("STATUS=serving 2 locks; backlog "), statuses
    before = statuses[-1]
    asyncio.run(_session(site, lambda c: site.unlock(c, site.locks[0])))
    deadline = time.monotonic() + WITHIN_S
    while True:
        lines = [line for d in _drain_notify() for line in d.splitlines() if line.startswith("STATUS=")]
        if lines[-1] != before:
            break
        assert time.monotonic() < deadline, lines
        time.sleep(0.1)
    assert lines[-1].startswith("STATUS=serving 2 locks; backlog "), lines
    assert lines[-1].endswith("no alarms") or "; alarms: " in lines[-1], lines
