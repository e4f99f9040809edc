"""Attacks on the work merged on 2026-12-01 (round 2), on the running daemon: the typed
control commands. Each line gets a clear answer (a usage error, never a crashed command),
nothing changes, the daemon keeps opening doors, and its log has no traceback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from broker import Broker
from daemonfix import Site, make_site

pytestmark = [pytest.mark.ble, pytest.mark.slow]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, broker: Broker) -> Iterator[Site]:
    if broker.proc is None or broker.proc.poll() is not None:
        broker.start()
    s, sim = make_site(tmp_path_factory.mktemp("attacks2"), broker)
    try:
        yield s
        assert s.daemon.stop() == 0, s.daemon.output()
        assert "Traceback" not in s.daemon.output()
        assert "control_command_crashed" not in s.daemon.output()
    finally:
        sim.terminate()
        sim.communicate(timeout=10)


def ask(site: Site, lines: list[str]) -> list[dict[str, Any]]:
    answers = []
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(site.daemon.control))
        reader = s.makefile("rb")
        for line in lines:
            s.sendall(line.encode() + b"\n")
            answers.append(json.loads(reader.readline()))
    return answers


def honest_unlock(site: Site) -> None:
    async def go() -> None:
        c = await site.session()
        try:
            answer = await site.unlock(c, site.locks[0])
            assert answer["status"] == "ok", answer
        finally:
            await c.__aexit__(None, None, None)

    asyncio.run(go())


def _events(**args: object) -> str:
    return json.dumps({"cmd": "events", "args": args})


@pytest.mark.parametrize(
    "line",
    [
        pytest.param('{"cmd": "events", "args": {"lock": "\\ud800"}}', id="events-lock-surrogate"),
        pytest.param('{"cmd": "events", "args": {"sub": "a\\udfffb"}}', id="events-sub-surrogate"),
        pytest.param('{"cmd": "events", "args": {"from": "\\ud800"}}', id="events-from-surrogate"),
        pytest.param('{"cmd": "events", "args": {"until": "\\ud800"}}', id="events-until-surrogate"),
        pytest.param(_events(since=True), id="events-since-bool"),
        pytest.param(_events(limit=10**400), id="events-limit-huge"),
        pytest.param(_events(since="1"), id="events-since-text"),
        pytest.param(_events(lock=""), id="events-lock-empty"),
        pytest.param(json.dumps({"cmd": "scan", "args": {"timeout": "5"}}), id="scan-timeout-text"),
        pytest.param(json.dumps({"cmd": "scan", "args": {"timeout": 1e308}}), id="scan-timeout-huge"),
        pytest.param(
            json.dumps({"cmd": "pair", "args": {"address": "AA:BB:CC:DD:EE:FF", "code": []}}),
            id="pair-code-list",
        ),
        pytest.param(
            '{"cmd": "pair", "args": {"address": "AA:BB:CC:DD:EE:FF", "code": "\\ud800"}}',
            id="pair-code-surrogate",
        ),
        pytest.param(
            '{"cmd": "pair", "args": {"address": "AA:BB:CC:DD:EE:F\\ud800"}}', id="pair-address-surrogate"
        ),
        pytest.param(json.dumps({"cmd": "trust_install", "args": {"document": "!!"}}), id="trust-not-base64"),
        pytest.param(
            json.dumps({"cmd": "request", "args": {"action": 1, "payload": {}}}), id="request-action-int"
        ),
        pytest.param(
            json.dumps({"cmd": "request", "args": {"action": "unlock", "payload": []}}),
            id="request-payload-list",
        ),
        pytest.param(json.dumps({"cmd": "ping", "args": []}), id="args-a-list"),
        pytest.param('{"cmd": "ping", "args": {"x": ' + "[" * 40 + "1" + "]" * 40 + "}}", id="args-deep"),
    ],
)
def test_a_malformed_control_command_is_a_usage_error(site: Site, line: str) -> None:
    (answer,) = ask(site, [line])
    if answer["ok"]:  # extra keys are ignored by design (ping's args)
        assert json.loads(line)["cmd"] == "ping" and isinstance(json.loads(line).get("args"), dict), answer
    else:
        assert answer["exit"] == 2 or answer.get("code") == "invalid_request", (line, answer)
    assert site.alive()


def test_many_half_closed_connections_then_the_cli_and_the_doors_still_work(site: Site) -> None:
    """100 connections (over the cap of 64), each sending half a line and shutting its write
    side: each gets an answer line (an error, or too many connections) and ends; then ping
    answers and a door opens."""
    held = []
    try:
        for i in range(100):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(30)
            s.connect(str(site.daemon.control))
            s.sendall(b'{"cmd": "pi' if i % 2 else b'{"cmd": "ping"}\n{"cmd"')
            s.shutdown(socket.SHUT_WR)
            held.append(s)
        for s in held:
            data = b""
            # a refused connection is closed with our bytes unread: ECONNRESET after its line
            with contextlib.suppress(ConnectionResetError):
                while chunk := s.recv(65536):
                    data += chunk
            answers = [json.loads(line) for line in data.splitlines()]
            assert answers, "a half-closed connection got no answer"
            assert answers[-1]["ok"] is False and answers[-1]["exit"] in (2, 3), answers
    finally:
        for s in held:
            s.close()
    (pong,) = ask(site, [json.dumps({"cmd": "ping"})])
    assert pong["ok"] is True
    honest_unlock(site)
    site.check_store()
