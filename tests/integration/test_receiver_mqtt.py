"""The receiver on mosquitto (MQTT 5 shared subscription) and a private PostgreSQL, driven by a
contract-faithful publisher (events sealed by protocols.event_encoding, as the outbox does).

Each test has its own database and base topic; receivers run as real `lockgw-receiver run`
processes. Checked from PostgreSQL: every event stored exactly once, receipts published for the
highest gap-free seq, gaps asked for by replay, hostile input quarantined or kept as conflicts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from broker import Broker
from fleetfix import (
    RECEIVER_EXE,
    Postgres,
    ReceiverProc,
    chain,
    free_port,
    new_database,
    payload,
    pg_fetch,
    postgres,
    receiver_config,
    wait_until,
)

from gateway.receiver.config import PostgresConfig, ReceiverSection
from gateway.receiver.store import Store
from protocols.event_encoding import event_hash, verify_chain

__all__ = ["postgres"]

pytestmark = [pytest.mark.slow]


class Central:
    """One test's world: a database, a base topic, and receivers started on demand."""

    def __init__(self, tmp: Path, dsn: str, broker: Broker) -> None:
        self.tmp, self.dsn, self.broker = tmp, dsn, broker
        self.base = f"t{secrets.token_hex(4)}"
        self.receivers: list[ReceiverProc] = []

    def receiver(
        self, instance: str, *, env: dict[str, str] | None = None, wait: bool = True, **kw: Any
    ) -> ReceiverProc:
        cfg = receiver_config(
            self.tmp / f"{instance}.toml", dsn=self.dsn, instance=f"{self.base}-{instance}",
            mqtt_url=self.broker.url, base=self.base, **kw,
        )  # fmt: skip
        r = ReceiverProc(cfg, self.tmp / f"{instance}.log", env=env or {}).start()
        self.receivers.append(r)
        if wait:
            r.wait_log("mqtt_connected")
        return r

    def report(self, **section: Any) -> Any:
        """``lockgw-receiver status``'s report, computed in-process (the CLI is checked once)."""
        return _report(self.dsn, **section)

    def client(self, name: str) -> aiomqtt.Client:
        return aiomqtt.Client(
            "127.0.0.1",
            self.broker.port,
            identifier=f"{self.base}-{name}",
            protocol=aiomqtt.ProtocolVersion.V5,
        )

    async def stored(self, gw: str) -> list[dict[str, Any]]:
        rows = await pg_fetch(self.dsn, "SELECT body FROM events WHERE gw = $1 ORDER BY seq", gw)
        return [json.loads(r["body"]) for r in rows]

    async def stored_seqs(self, gw: str) -> list[int]:
        return [
            r["seq"]
            for r in await pg_fetch(self.dsn, "SELECT seq FROM events WHERE gw = $1 ORDER BY seq", gw)
        ]


@pytest.fixture
async def central(tmp_path: Path, postgres: Postgres, live_broker: Broker) -> AsyncIterator[Central]:
    c = Central(tmp_path, await new_database(postgres), live_broker)
    yield c
    for r in c.receivers:
        if r.alive():
            assert r.stop() == 0, r.output()[-3000:]
        assert "Traceback" not in r.output(), r.output()[-3000:]


async def publish(c: aiomqtt.Client, base: str, events: list[dict[str, Any]], **kw: Any) -> None:
    for ev in events:
        await c.publish(f"{base}/{ev['gw']}/events", payload(ev, **kw), qos=1)


async def test_events_stored_once_and_receipted(central: Central) -> None:
    for r in (central.receiver("a", wait=False), central.receiver("b", wait=False)):
        r.wait_log("mqtt_connected")
    events = chain("gw-one", n=60)
    async with central.client("gw") as gw:
        await gw.subscribe(f"{central.base}/gw-one/receipt", qos=1)
        await publish(gw, central.base, events)
        await publish(gw, central.base, events[:20])  # at least once: re-published after a reconnect
        receipts: list[int] = []
        async with asyncio.timeout(60):
            async for m in gw.messages:
                body = json.loads(m.payload)
                assert body["epoch"] == events[0]["epoch"]
                receipts.append(body["seq"])
                if body["seq"] == 60:
                    break
    assert receipts == sorted(receipts)  # never goes back
    stored = await central.stored("gw-one")
    assert [e["seq"] for e in stored] == list(range(1, 61))
    verify_chain(stored)
    rows = await pg_fetch(central.dsn, "SELECT contiguous_seq, receipt_seq FROM streams WHERE gw = 'gw-one'")
    assert rows[0]["contiguous_seq"] == 60


async def test_gap_is_asked_for_exactly_and_healed(central: Central) -> None:
    central.receiver("a", gap_replay_after_s=1.0)
    events = chain("gw-gap", n=12)
    async with central.client("gw") as gw:
        await gw.subscribe(f"{central.base}/gw-gap/request/replay", qos=1)
        await gw.subscribe(f"{central.base}/gw-gap/receipt", qos=1)
        await publish(gw, central.base, events[:3] + events[6:])  # 4..6 lost on the way
        request = None
        async with asyncio.timeout(60):
            async for m in gw.messages:
                if str(m.topic).endswith("/request/replay"):
                    request = json.loads(m.payload)
                    break
        assert request is not None
        assert (request["from_seq"], request["to_seq"]) == (4, 6)
        assert isinstance(request["transaction"], str)
        # Receipts so far stopped at the gap.
        rows = await pg_fetch(central.dsn, "SELECT contiguous_seq FROM streams WHERE gw = 'gw-gap'")
        assert rows[0]["contiguous_seq"] == 3
        await publish(gw, central.base, events[3:6], replayed=True)  # the gateway answers the replay
        async with asyncio.timeout(60):
            async for m in gw.messages:
                if str(m.topic).endswith("/receipt") and json.loads(m.payload)["seq"] == 12:
                    break
    assert await central.stored_seqs("gw-gap") == list(range(1, 13))
    replayed = await pg_fetch(
        central.dsn, "SELECT seq FROM events WHERE gw = 'gw-gap' AND replayed ORDER BY seq"
    )
    assert [r["seq"] for r in replayed] == [4, 5, 6]


async def test_killed_between_commit_and_ack_loses_nothing(central: Central) -> None:
    """SIGKILL right after the first commit, before its receipt and PUBACKs: the broker delivers
    the batch again to the restarted receiver (same session), nothing is stored twice."""
    r = central.receiver("a", env={"LOCKGW_RECEIVER_FAULT": "kill-after-commit:1"})
    events = chain("gw-kill", n=40)
    async with central.client("gw") as gw:
        await gw.subscribe(f"{central.base}/gw-kill/receipt", qos=1)
        await publish(gw, central.base, events)
        assert r.proc is not None
        await asyncio.to_thread(r.proc.wait, 60)
        assert r.returncode() == -9
        assert "fault_kill_after_commit" in r.output()
        committed = await central.stored_seqs("gw-kill")
        assert committed  # the first batch was committed before the kill
        central.receiver("a")  # same instance: the same MQTT session resumes
        async with asyncio.timeout(60):
            async for m in gw.messages:
                if json.loads(m.payload)["seq"] == 40:
                    break
    assert await central.stored_seqs("gw-kill") == list(range(1, 41))
    central.receivers.remove(r)


async def test_hostile_messages_are_quarantined_and_conflicts_kept(central: Central) -> None:
    r = central.receiver("a")
    base = central.base
    good = chain("gw-h", n=5)
    forged = dict(good[2], data={"n": "forged"})  # content changed, hash left: a forgery
    reuse = chain("gw-h", n=3, epoch=good[0]["epoch"])  # seq 1..3 again, other content, valid hashes
    reuse = [dict(e) for e in reuse]
    for e in reuse:
        e["data"] = {"other": True}
    prev = "0" * 64
    for e in reuse:
        e["prev"] = prev
        e["hash"] = event_hash(e)
        prev = e["hash"]
    breaker = dict(good[4], seq=6, id=f"gw-h/{good[0]['epoch']}/6", prev="ab" * 32)
    breaker["hash"] = event_hash(breaker)
    hostile = [
        b"not json",
        b'{"v": 1, "gw": "gw-h", "seq": "\\ud800"}',
        b"[" * 100_000,
        b"{" + b'"a":' * 10 + b"1" + b"}" * 10,
        json.dumps({"v": 1, "gw": "gw-h", "epoch": "e", "seq": True}).encode(),
        json.dumps({"v": 1, "gw": "gw-other", "epoch": "e", "seq": 1}).encode(),
        b"x" * 300_000,
        b'{"a":1,"a":2}',
        b"\xff\xfe",
        payload(forged),
    ]
    async with central.client("gw") as gw:
        for h in hostile:
            await gw.publish(f"{base}/gw-h/events", h, qos=1)
        await gw.publish(f"{base}/gw-h/heartbeat", b'{"epoch": 5}', qos=1)
        await gw.publish(f"{base}/gw-h/availability", b'{"state": "maybe"}', qos=1)
        await gw.publish(f"{base}/gw-h/bridge", b"2", qos=1)
        await publish(gw, base, good)
        await publish(gw, base, reuse)
        await publish(gw, base, [breaker])

        async def settled() -> bool:
            rows = await pg_fetch(
                central.dsn, "SELECT (SELECT count(*) FROM quarantine) q, (SELECT count(*) FROM conflicts) c"
            )
            return rows[0]["q"] >= len(hostile) + 3 and rows[0]["c"] >= 4

        await wait_until(settled, what="quarantine and conflicts")
    assert r.alive()
    q = await pg_fetch(central.dsn, "SELECT reason, raw FROM quarantine ORDER BY n")
    assert len(q) == len(hostile) + 3
    assert {bytes(row["raw"]) for row in q} >= {h for h in hostile if len(h) <= 256 * 1024}
    assert any("forged" in row["reason"] for row in q)
    c = await pg_fetch(central.dsn, "SELECT kind, seq, body FROM conflicts ORDER BY seq, kind")
    assert [(row["kind"], row["seq"]) for row in c] == [
        ("seq_reuse", 1), ("seq_reuse", 2), ("seq_reuse", 3), ("chain_break", 6),
    ]  # fmt: skip
    assert all("other" in row["body"] for row in c[:3])
    # The genuine chain is stored, untouched; the conflicting versions never overwrote it.
    stored = await central.stored("gw-h")
    assert stored == [json.loads(payload(e)) for e in good]
    # Still serving: a new gateway's events go through.
    async with central.client("gw2") as gw:
        await publish(gw, base, chain("gw-after", n=3))
    await wait_until(lambda: _seqs(central, "gw-after", 3), what="events after the attack")


async def _seqs(central: Central, gw: str, n: int) -> bool:
    return await central.stored_seqs(gw) == list(range(1, n + 1))


async def _report(dsn: str, **section: Any) -> Any:
    async with Store.connect(PostgresConfig(dsn=dsn), migrate=False) as store:
        return await store.status(ReceiverSection(**section))


def _status(r: ReceiverProc) -> tuple[int, dict[str, Any]]:
    out = subprocess.run(
        [str(RECEIVER_EXE), "--config", str(r.config), "status", "--json"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert out.returncode in (0, 1), out.stderr
    return out.returncode, json.loads(out.stdout)


async def test_postgres_restart_then_status_alerts(central: Central, postgres: Postgres) -> None:
    """PostgreSQL stops while events flow: nothing is acked, the batch is retried, and once it is
    back everything is stored and receipted. Then `status --json` reports liveness from
    PostgreSQL alone: no heartbeat yet → `heartbeat_stale`; a fresh one → no alert; a large
    backlog → `lag`; the will message → `offline`."""
    r = central.receiver("a")
    base = central.base
    events = chain("gw-pg", n=40)
    async with central.client("gw") as gw:
        await gw.subscribe(f"{base}/gw-pg/receipt", qos=1)
        await publish(gw, base, events[:20])
        await wait_until(lambda: _seqs(central, "gw-pg", 20), what="first 20 stored")
        await asyncio.to_thread(postgres.stop)
        await publish(gw, base, events[20:])
        await asyncio.to_thread(r.wait_log, "store_unavailable")
        await asyncio.to_thread(postgres.start)
        async with asyncio.timeout(90):
            async for m in gw.messages:
                if json.loads(m.payload)["seq"] == 40:
                    break
        assert await central.stored_seqs("gw-pg") == list(range(1, 41))
        code, report = await asyncio.to_thread(_status, r)
        (g,) = report["gateways"]
        assert code == 1
        assert "heartbeat_stale" in g["alerts"]
        assert g["streams"][0]["stored_seq"] == 40
        hb = {
            "ts": 1,
            "epoch": events[0]["epoch"],
            "last_seq": 40,
            "receipt_seq": 40,
            "backlog": 0,
            "alarms": [],
        }
        await gw.publish(f"{base}/gw-pg/heartbeat", json.dumps(hb).encode(), qos=0)
        await gw.publish(f"{base}/gw-pg/availability", b'{"state": "online"}', qos=1, retain=True)

        async def healthy() -> bool:
            report = await central.report()
            return report["alerts"] == 0 and report["gateways"][0]["availability"] == "online"

        await wait_until(healthy, what="no alerts after a heartbeat")
        assert (await asyncio.to_thread(_status, r))[0] == 0
        await gw.publish(f"{base}/gw-pg/heartbeat", json.dumps(dict(hb, backlog=5000)).encode(), qos=0)
        await gw.publish(f"{base}/gw-pg/availability", b'{"state": "offline"}', qos=1, retain=True)
        await gw.publish(f"{base}/gw-pg/bridge", b"0", qos=1, retain=True)  # the site broker's notification

        async def alerted() -> list[str] | None:
            report = await central.report()
            alerts = report["gateways"][0]["alerts"]
            return alerts if {"lag", "offline", "uplink_down"} <= set(alerts) else None

        await wait_until(alerted, what="lag, offline and uplink_down alerts")
        text = await asyncio.to_thread(
            subprocess.run,
            [str(RECEIVER_EXE), "--config", str(r.config), "status"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert text.returncode == 1
        assert "gw-pg" in text.stdout and "uplink_down" in text.stdout
    # Migrations are versioned and idempotent.
    versions = await pg_fetch(central.dsn, "SELECT version FROM schema_version ORDER BY version")
    assert [v["version"] for v in versions] == [1, 2, 3]
    again = await asyncio.to_thread(
        subprocess.run,
        [str(RECEIVER_EXE), "--config", str(r.config), "migrate"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert again.stdout.strip() == "schema version 3"
    assert r.alive()


async def test_new_epoch_is_recorded_as_such(central: Central) -> None:
    """A gateway restored from scratch starts a new epoch at seq 1: a second stream, receipted
    in its own epoch, the old one kept; `status` shows `new_epoch`."""
    r = central.receiver("a")
    old, new = chain("gw-e", n=3), chain("gw-e", n=2)
    async with central.client("gw") as gw:
        await gw.subscribe(f"{central.base}/gw-e/receipt", qos=1)
        await publish(gw, central.base, old)
        await publish(gw, central.base, new)
        seen: set[tuple[str, int]] = set()
        async with asyncio.timeout(60):
            async for m in gw.messages:
                body = json.loads(m.payload)
                seen.add((body["epoch"], body["seq"]))
                if {(old[0]["epoch"], 3), (new[0]["epoch"], 2)} <= seen:
                    break
    rows = await pg_fetch(central.dsn, "SELECT epochs, epoch FROM gateways WHERE gw = 'gw-e'")
    assert (rows[0]["epochs"], rows[0]["epoch"]) == (2, new[0]["epoch"])
    _, report = await asyncio.to_thread(_status, r)
    (g,) = report["gateways"]
    assert "new_epoch" in g["alerts"]
    assert sorted(s["stored_seq"] for s in g["streams"]) == [2, 3]
    assert "epoch_new" in r.output()


async def _get(port: int, path: str) -> tuple[str, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return head.split("\r\n")[0], body


async def test_prometheus_metrics(central: Central) -> None:
    port = free_port()
    central.receiver("a", extra=f"metrics_port = {port}\nmetrics_refresh_s = 0.5\n")
    events = chain("gw-m", n=5)
    async with central.client("gw") as gw:
        await publish(gw, central.base, events + events[:2])
        await gw.publish(f"{central.base}/gw-m/events", b"junk", qos=1)

    async def scraped() -> str | None:
        status, body = await _get(port, "/metrics")
        assert status.endswith("200 OK")
        want = [
            "lockgw_receiver_events_stored_total 5.0",
            "lockgw_receiver_events_duplicate_total 2.0",
            "lockgw_receiver_quarantined_total 1.0",
            f'lockgw_receiver_stored_seq{{epoch="{events[0]["epoch"]}",gw="gw-m"}} 5.0',
            'lockgw_receiver_alert{alert="heartbeat_stale",gw="gw-m"} 1.0',
        ]
        return body if all(w in body for w in want) else None

    await wait_until(scraped, what="metrics")
    status, _ = await _get(port, "/nope")
    assert "404" in status
    # Garbage on the metrics port is dropped, the receiver carries on.
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\x00" * 9000)
    writer.close()
    assert (await _get(port, "/metrics"))[0].endswith("200 OK")


async def test_sigterm_drains_while_events_flow(central: Central) -> None:
    """SIGTERM in the middle of a stream: the batch in hand is committed, receipted and acked,
    the receiver exits 0; whatever it had not taken is delivered to its next run, once."""
    r = central.receiver("a", batch_max=10)
    events = chain("gw-t", n=150)
    async with central.client("gw") as gw:
        await publish(gw, central.base, events[:75])
        await wait_until(lambda: _some(central, "gw-t"), what="first events stored")
        assert r.proc is not None
        r.proc.terminate()
        await publish(gw, central.base, events[75:])
        assert await asyncio.to_thread(r.proc.wait, 60) == 0
        assert "receiver_stopped" in r.output()
        central.receiver("a", batch_max=10)
        await wait_until(lambda: _seqs(central, "gw-t", 150), what="all 150 stored after the restart")
    rows = await pg_fetch(central.dsn, "SELECT count(*) AS n FROM events WHERE gw = 'gw-t'")
    assert rows[0]["n"] == 150


async def _some(central: Central, gw: str) -> bool:
    return bool(await central.stored_seqs(gw))


async def test_receipts_not_reaching_the_gateway_raise_receipt_lag(central: Central) -> None:
    """Receipts are sent, but the gateway's heartbeats keep reporting an older receipt_seq (an
    ACL or bridge that drops them): `receipt_lag`; once its receipt_seq catches up, cleared."""
    central.receiver("a")
    events = chain("gw-l", n=5)
    epoch = events[0]["epoch"]
    hb = {"ts": 1, "epoch": epoch, "last_seq": 5, "receipt_seq": 0, "backlog": 5, "alarms": []}
    async with central.client("gw") as gw:
        await publish(gw, central.base, events)

        async def receipted() -> bool:
            rows = await pg_fetch(central.dsn, "SELECT receipt_seq FROM streams WHERE gw = 'gw-l'")
            return bool(rows) and rows[0]["receipt_seq"] == 5

        await wait_until(receipted, what="receipt 5 sent")
        await gw.publish(f"{central.base}/gw-l/heartbeat", json.dumps(hb).encode(), qos=1)

        async def lagging() -> bool:
            report = await central.report(receipt_lag_alert_s=0.5)
            return bool(report["gateways"]) and "receipt_lag" in report["gateways"][0]["alerts"]

        await wait_until(lagging, what="receipt_lag")
        assert "receipt_lag" not in (await central.report())["gateways"][0]["alerts"]  # default bound
        await gw.publish(
            f"{central.base}/gw-l/heartbeat", json.dumps(dict(hb, receipt_seq=5, backlog=0)).encode(), qos=1
        )

        async def cleared() -> bool:
            report = await central.report(receipt_lag_alert_s=0.5)
            g = report["gateways"][0]
            return g["receipt_seq"] == 5 and "receipt_lag" not in g["alerts"]

        await wait_until(cleared, what="receipt_lag cleared")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_mqtts_with_the_configured_ca_stores_and_receipts(tmp_path: Path, postgres: Postgres) -> None:
    """``mqtts://`` is a TLS connection checked against ``[mqtt] ca_file`` (it used to be
    accepted by the config and then spoken in plain text)."""
    from test_mqtt_tls import make_ca, make_server

    ca_key, ca, ca_path = make_ca(tmp_path, "central-ca")
    (tmp_path / "tls").mkdir()
    broker = Broker(tmp_path / "tls", tls=make_server(tmp_path, ca_key, ca))
    broker.start()
    try:
        dsn = await new_database(postgres)
        base = f"t{secrets.token_hex(4)}"
        cfg = receiver_config(
            tmp_path / "r.toml", dsn=dsn, instance=f"{base}-r", mqtt_url=broker.url, base=base,
            mqtt_extra=f'ca_file = "{ca_path}"',
        )  # fmt: skip
        r = ReceiverProc(cfg, tmp_path / "r.log").start()
        try:
            r.wait_log("mqtt_connected")
            events = chain("gw-tls", n=5)
            tls = aiomqtt.TLSParameters(ca_certs=str(ca_path))
            async with aiomqtt.Client(
                "127.0.0.1", broker.port, identifier=f"{base}-gw", protocol=aiomqtt.ProtocolVersion.V5,
                tls_params=tls,
            ) as gw:  # fmt: skip
                await gw.subscribe(f"{base}/gw-tls/receipt", qos=1)
                await publish(gw, base, events)
                async with asyncio.timeout(60):
                    async for m in gw.messages:
                        if json.loads(m.payload)["seq"] == 5:
                            break
            rows = await pg_fetch(dsn, "SELECT seq FROM events WHERE gw = 'gw-tls' ORDER BY seq")
            assert [row["seq"] for row in rows] == [1, 2, 3, 4, 5]
        finally:
            assert r.stop() == 0, r.output()[-3000:]
    finally:
        broker.stop()


async def test_a_lost_tail_of_a_connected_quiet_gateway_is_asked_for(central: Central) -> None:
    """Round-4 attack (docs/threat-model.md R4-TAIL): since a gap is only a hole below a received
    seq, a gateway's newest events that the broker acknowledged but central never got were asked
    for by nobody, though its heartbeats showed them; the contract (§5) re-publishes only after a
    reconnect, so a connected gateway at a quiet site never sent them again. A gateway at rest
    (no event for ``tail_replay_after_s``, every receipt held) is asked for its tail — not before."""
    central.receiver("a", gap_replay_after_s=1.0, replay_retry_s=2.0, extra="tail_replay_after_s = 3.0")
    events = chain("gw-tail", n=12)
    hb = {"epoch": events[0]["epoch"], "last_seq": 12, "time_state": "synced", "alarms": []}
    async with central.client("gw") as gw:
        await gw.subscribe(f"{central.base}/gw-tail/request/replay", qos=1)
        await gw.subscribe(f"{central.base}/gw-tail/receipt", qos=1)
        await publish(gw, central.base, events[:10])  # 11, 12: acknowledged, then lost on the way
        t_last, receipt, request = time.monotonic(), 0, None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30):  # heartbeats every second, nothing else
                while request is None:
                    body = {**hb, "ts": int(time.time()), "receipt_seq": receipt, "backlog": 12 - receipt}
                    await gw.publish(f"{central.base}/gw-tail/heartbeat", json.dumps(body), qos=0)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1):
                            async for m in gw.messages:
                                if str(m.topic).endswith("/receipt"):
                                    receipt = max(receipt, json.loads(m.payload)["seq"])
                                else:
                                    request = json.loads(m.payload)
                                    break
        asked_after = time.monotonic() - t_last
        assert receipt == 10  # central stored and receipted the first ten
        assert request is not None, "nobody asked for the lost tail 11..12"
        assert (request["from_seq"], request["to_seq"]) == (11, 12)
        assert asked_after >= 3.0  # only once the gateway was at rest
        await publish(gw, central.base, events[10:], replayed=True)  # the gateway answers the replay
    await wait_until(lambda: _seqs(central, "gw-tail", 12), what="the tail stored")
