"""Attacks on the running daemon (issue: fail-safe core §2 and §7; THREATS F1-F5, B6, D1).

One site per module: `lockgw-sim` with two paired locks, a real mosquitto, `lockgw run`. Each
case sends what an outsider can send — to every request action, the receipt and trust topics,
the control socket — and then checks: the daemon is alive and never restarted, the request got
an answer, an honest unlock still opens the door, and the stored events are gap-free and
hash-chained. The named cases are the ones that stopped every door before.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from broker import Broker
from clifix import EXE
from credfix import SITE
from daemonfix import BASE, GW, Site, attack_cases, make_site
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = [pytest.mark.ble, pytest.mark.slow]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, broker: Broker) -> Iterator[Site]:
    if broker.proc is None or broker.proc.poll() is not None:
        broker.start()
    s, sim = make_site(tmp_path_factory.mktemp("attacks"), broker)
    try:
        yield s
        assert s.daemon.stop() == 0, s.daemon.output()
        assert "Traceback" not in s.daemon.output()
    finally:
        sim.terminate()
        sim.communicate(timeout=10)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _with_session(site: Site, body: Any) -> Any:
    c = await site.session()
    try:
        return await body(c)
    finally:
        await c.__aexit__(None, None, None)


def assert_still_serving(site: Site) -> None:
    assert site.alive(), site.daemon.output()

    async def honest(c: Any) -> None:
        answer = await site.unlock(c, site.locks[0])
        assert answer["status"] == "ok", answer

    run(_with_session(site, honest))
    site.check_store()


# --- the cases that stopped every door -------------------------------------------------------


def test_F1_a_70_byte_message_with_a_lone_surrogate_transaction_is_refused(site: Site) -> None:
    payload = b'{"lock": "%s", "token": "AAAA", "transaction": "\\ud800"}' % site.locks[0].encode()

    async def go(c: Any) -> dict[str, Any]:
        return await site.request(c, "unlock", payload)

    answer = run(_with_session(site, go))
    assert answer["status"] == "error" and answer["error"]["code"] == "invalid_request"
    assert answer["transaction"] is None
    assert_still_serving(site)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"from_seq": 2**63}, "invalid_request"),
        ({"from_seq": 1, "to_seq": 2**64}, "invalid_request"),
        ({"from_seq": -1}, "invalid_request"),
        ({"from_seq": True}, "invalid_request"),
        ({"from_seq": 2**63 - 1}, None),
    ],
)
def test_F2_replay_bounds_are_the_contracts(site: Site, body: dict[str, Any], code: str | None) -> None:
    async def go(c: Any) -> dict[str, Any]:
        return await site.request(c, "replay", json.dumps(body).encode())

    answer = run(_with_session(site, go))
    if code is None:
        assert answer == {"transaction": None, "status": "ok", "data": {"count": 0}}
    else:
        assert answer["error"]["code"] == code
    assert site.alive()


def test_F2_a_receipt_nested_100000_deep_is_ignored_and_receipts_still_work(site: Site) -> None:
    async def go(c: Any) -> None:
        topic = f"{BASE}/{GW}/receipt"
        await c.publish(topic, b"[" * 100_000 + b"]" * 100_000, qos=1)
        await c.publish(topic, b'{"epoch": "\\ud800", "seq": 1}', qos=1)
        await c.publish(topic, json.dumps({"epoch": "x", "seq": 2**64}).encode(), qos=1)
        # A request after them is answered: the bridge is alive and in order.
        answer = await site.request(c, "locks", b"{}")
        assert answer["status"] == "ok"

    run(_with_session(site, go))
    assert_still_serving(site)


def test_F2_deep_json_in_a_request_is_invalid_request(site: Site) -> None:
    async def go(c: Any) -> dict[str, Any]:
        return await site.request(c, "status", b'{"lock": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")

    assert run(_with_session(site, go))["error"]["code"] == "invalid_request"
    assert site.alive()


@pytest.mark.parametrize(
    "topic",
    [
        "attack/+/r",
        "attack/#",
        f"{BASE}/{GW}/events",
        f"{BASE}/{GW}/locks/x/state",
        f"{BASE}/{GW}/request/unlock",
        f"{BASE}/{GW}/availability",
        f"{BASE}/{SITE}/keyring",
        f"{BASE}/{SITE}/revocations",
        f"{BASE}/{SITE}/time",
        f"{BASE}/gw-other/request/unlock",
        f"{BASE}/gw-other/receipt",
        f"{BASE}/gw-other/events",  # another gateway's event stream (the receiver would quarantine it)
        f"{BASE}/gw-other/locks/x/state",
        f"{BASE}/gw-other/heartbeat",
    ],
)
def test_F4_a_response_topic_on_a_wildcard_or_the_gateways_own_topics_is_refused_unexecuted(
    site: Site, topic: str
) -> None:
    """CONTRACT §8.10: answered invalid_request on B/G/response/<action>; the unlock is not run
    (run, its bogus token would have been an access.denied event carrying the transaction)."""
    tx = f"t-topic-{topic}"

    async def go(c: Any) -> dict[str, Any]:
        body = {"lock": site.locks[0], "token": "AAAA", "transaction": tx}
        return await site.request(
            c,
            "unlock",
            json.dumps(body).encode(),
            response_topic=topic,
            expect_on=f"{BASE}/{GW}/response/unlock",
        )

    answer = run(_with_session(site, go))
    assert answer == {
        "transaction": tx,
        "status": "error",
        "error": {"code": "invalid_request", "message": answer["error"]["message"]},
    }
    assert not [e for e in site.events() if e["transaction"] == tx]


def test_F5_control_socket_lines_out_of_range_get_an_error_line(site: Site) -> None:
    lines = [
        json.dumps({"cmd": "events", "args": {"since": 2**63}}),
        json.dumps({"cmd": "events", "args": {"since": 2**70, "limit": 1}}),
        '{"cmd": "\\ud800"}',
        "[" * 50_000,
        '{"cmd": "events", "args": {"since": 1e400}}',
        '{"cmd": 1}',
        "not json",
        json.dumps({"cmd": "pair", "args": {"address": "zz:zz", "code": "1"}}),
        json.dumps({"cmd": "pair", "args": {"address": "", "code": "1"}}),
        json.dumps({"cmd": "trust_install", "args": {"document": None}}),
    ]
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(20)
        s.connect(str(site.daemon.control))
        reader = s.makefile("rb")
        for line in lines:
            s.sendall(line.encode() + b"\n")
            answer = json.loads(reader.readline())
            assert answer["ok"] is False and answer["exit"] == 2, (line[:40], answer)
        s.sendall(json.dumps({"cmd": "ping"}).encode() + b"\n")
        assert json.loads(reader.readline())["ok"] is True
    assert site.alive()


def test_F5_cli_events_since_past_int64_is_a_usage_error(site: Site) -> None:

    proc = subprocess.run(
        [*EXE, "--config", str(site.field.cfg), "--json", "events", "--since", str(2**63)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert site.alive()


@pytest.mark.parametrize(
    "mode", ["lock_seq", "battery", "time", "huge", "types", "surrogate", "cmd_id", "op"]
)
def test_B7_a_lying_lock_fails_alone_on_the_running_daemon(site: Site, mode: str) -> None:
    """The simulator's `lie` fault on lock 2: its unlock fails with a lock error, never the
    gateway; lock 1 opens meanwhile; once lock 2 tells the truth again it opens too."""
    liar, honest = site.field.locks[1]["lock"], site.locks[0]
    assert liar == site.locks[1]
    site.field.fault(liar, "lie", mode)
    try:

        async def during(c: Any) -> None:
            if mode in ("battery", "time"):  # lies in STATUS and the log only: ask for a status
                answer = await site.request(c, "status", json.dumps({"lock": liar}).encode())
                if answer["status"] == "ok":  # a state fresh from before the lie (2 s window)
                    assert answer["data"]["battery_pct"] in (None, *range(101)), answer
            else:
                answer = await site.unlock(c, liar)
            if answer["status"] == "error":
                assert answer["error"]["code"] in ("lock_error", "lock_unreachable"), answer
            else:
                assert mode in ("battery", "time"), answer
            assert (await site.unlock(c, honest))["status"] == "ok"

        run(_with_session(site, during))
    finally:
        site.field.fault(liar, "lie", None)

    async def after(c: Any) -> None:
        answer = await site.unlock(c, liar)
        assert answer["status"] == "ok", answer

    run(_with_session(site, after))
    assert site.alive()
    site.check_store()


# --- generated attacks -------------------------------------------------------------------------


@settings(max_examples=60, suppress_health_check=list(HealthCheck), deadline=None)
@given(data=st.data())
def test_F_generated_requests_receipts_and_trust_documents_never_stop_the_daemon(
    site: Site, data: st.DataObject
) -> None:
    case = data.draw(attack_cases(site.locks), label="case")
    run(_with_session(site, lambda c: site.attack(c, case)))
    assert site.alive(), site.daemon.output()


def test_F_after_the_generated_attacks_the_site_still_serves_and_nothing_was_lost(site: Site) -> None:
    """Runs after the generated cases (file order): every door still opens, the store is
    gap-free and hash-chained from seq 1, the daemon started once."""
    for lock in site.locks:

        async def honest(c: Any, lock: str = lock) -> None:
            answer = await site.unlock(c, lock)
            assert answer["status"] == "ok", answer

        run(_with_session(site, honest))
    events = site.check_store()
    assert events[-1]["type"] == "lock.unlocked" or any(e["type"] == "lock.unlocked" for e in events[-3:])
    assert "Traceback" not in site.daemon.output()


def test_B13_no_secret_the_site_used_appears_in_the_daemons_log(site: Site) -> None:
    output = site.daemon.output()
    assert '"event": "request"' in output  # the log does speak of every request
    assert len(site.secrets) > 5
    for secret in site.secrets:
        assert secret not in output


def _links_report(site: Site) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(20)
        s.connect(str(site.daemon.control))
        s.sendall(json.dumps({"cmd": "ping"}).encode() + b"\n")
        answer = json.loads(s.makefile("rb").readline())
    assert answer["ok"] is True, answer
    report: dict[str, Any] = answer["data"]["links"]
    return report


def test_connect_on_challenge_on_the_running_daemon(site: Site) -> None:
    """A challenge opens the lock's link while the phone signs; its unlock needs no new
    connection (the daemon's link counters, read over the control socket)."""
    lock = site.locks[1]

    async def wait_for(cond: Any, within_s: float = 30) -> dict[str, Any] | None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within_s):
                while not cond(report := _links_report(site)):  # noqa: ASYNC110 - the daemon's counters
                    await asyncio.sleep(0.1)
                return report
        return None

    async def attempt(c: Any) -> bool:
        """One try; False when the daemon's own work (a housekeeping connect) interfered."""
        # Whatever earlier tests left open (idle links, links held for their challenges) ends.
        before = await wait_for(lambda r: r["open"] == 0 and r["held"] == 0)
        assert before is not None, "links stayed open"
        want = before["prepared"] + 1
        ch = await site.request(c, "challenge", json.dumps({"lock": lock, "act": "unlock"}).encode())
        assert ch["status"] == "ok", ch
        ready = await wait_for(lambda r: r["prepared"] == want, within_s=10)
        if ready is None or ready["connects"] != before["connects"] + 1:
            return False  # the lock's link was opened by housekeeping just before, or another's
        answer = await site.unlock(c, lock)
        assert answer["status"] == "ok", answer
        after = _links_report(site)
        assert after["prepared_used"] == before["prepared_used"] + 1
        assert after["connected_s_last_hour"][lock] > 0
        return bool(after["connects"] == ready["connects"])  # the unlock used the held link

    async def body(c: Any) -> None:
        for _ in range(5):
            if await attempt(c):
                return
        raise AssertionError("the unlock after a challenge opened a new connection, 5 times")

    run(_with_session(site, body))


# --- attack round 3: today's actions ----------------------------------------------------------


def test_R3_a_doctor_and_firmware_apply_flood_never_starves_an_honest_unlock(site: Site) -> None:
    """200 ``doctor`` and 100 hostile ``firmware_apply`` requests published at once, then an
    honest unlock: it opens (its own request budget), the daemon lives, the store stays whole."""
    hostile = [
        b"{}",
        b'{"manifest": "", "image": ""}',
        b'{"manifest": "!!", "image": "AAAA"}',
        json.dumps({"manifest": "A" * 4000, "image": "B" * 4000}).encode(),
        b'{"manifest": 1, "image": null}',
        json.dumps({"manifest": "oA", "image": "AA", "extra": "\ud800"}, ensure_ascii=True).encode(),
    ]

    async def go(c: Any) -> None:
        for i in range(200):
            await c.publish(f"{BASE}/{GW}/request/doctor", b'{"transaction": "d%d"}' % i, qos=0)
        for i in range(100):
            await c.publish(f"{BASE}/{GW}/request/firmware_apply", hostile[i % len(hostile)], qos=0)
        answer = await site.unlock(c, site.locks[0])
        assert answer["status"] == "ok", answer
        for body in hostile:
            got = await site.request(c, "firmware_apply", body)
            assert got["status"] == "error" and got["error"]["code"] in (
                "invalid_request",
                "firmware_refused",
                "unavailable",
                "busy",
            ), got

    run(_with_session(site, go))
    assert_still_serving(site)
