"""The whole loop with a real gateway: `lockgw run` (simulated locks on Bumble, make_site) →
its own mosquitto → MQTT 5 shared subscription → two `lockgw-receiver` processes → PostgreSQL.

A third member of the share group is the Norway failure: a consumer that takes events and
stores nothing (it drops the first two it gets, then leaves). The receivers see the gap, ask the
daemon for exactly that range (`replay`), store what it re-publishes, and only then does the
receipt pass the gap. Checked at the end against the daemon's own database: every event it
committed is in PostgreSQL exactly once with the same hash, the chain verifies, the healed
events came by replay, and the daemon's receipt_seq reached its last seq.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest
from broker import Broker
from daemonfix import BASE, GW, Site, make_site
from fleetfix import Postgres, ReceiverProc, new_database, pg_fetch, postgres, receiver_config, wait_until

from protocols.event_encoding import verify_chain

__all__ = ["postgres"]

pytestmark = [pytest.mark.ble, pytest.mark.slow]


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path)
    b.start()
    yield b
    b.stop()


def _outbox(db: Path) -> tuple[list[dict[str, object]], int]:
    """(events, receipt_seq) from the daemon's SQLite, read-only."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        events = [json.loads(r[0]) for r in con.execute("SELECT json FROM events ORDER BY seq")]
        receipted = con.execute("SELECT coalesce(max(seq), 0) FROM events WHERE receipted_at IS NOT NULL")
        return events, int(receipted.fetchone()[0])
    finally:
        con.close()


async def test_real_daemon_two_receivers_gap_healed_by_replay(  # noqa: C901 - one scenario, top to bottom
    tmp_path: Path, postgres: Postgres, own_broker: Broker
) -> None:
    dsn = await new_database(postgres)
    (tmp_path / "site").mkdir()
    receivers = []
    for name in ("a", "b"):
        cfg = receiver_config(
            tmp_path / f"{name}.toml", dsn=dsn, instance=f"daemon-{name}", mqtt_url=own_broker.url,
            base=BASE, gap_replay_after_s=1.0, replay_retry_s=3.0,
        )  # fmt: skip
        r = ReceiverProc(cfg, tmp_path / f"{name}.log").start()
        r.wait_log("mqtt_connected")
        receivers.append(r)
    dropped: list[int] = []
    dropper = aiomqtt.Client(
        "127.0.0.1", own_broker.port, identifier="norway", protocol=aiomqtt.ProtocolVersion.V5
    )
    await dropper.__aenter__()
    await dropper.subscribe(f"$share/receivers/{BASE}/+/events", qos=1)

    async def drop_two() -> None:
        async for m in dropper.messages:
            dropped.append(json.loads(m.payload)["seq"])
            if len(dropped) == 2:
                return

    drop_task = asyncio.create_task(drop_two())
    sim: subprocess.Popen[str] | None = None
    site: Site | None = None
    try:
        site, sim = await asyncio.to_thread(make_site, tmp_path / "site", own_broker)
        c = await site.session()
        try:
            for _ in range(4):  # events until the dropper has had its two
                answer = await site.unlock(c, site.locks[0])
                assert answer["status"] == "ok", answer
                if drop_task.done():
                    break
            await asyncio.wait_for(drop_task, 60)
            await dropper.__aexit__(None, None, None)  # it leaves the group; what follows is stored
            answer = await site.unlock(c, site.locks[1])
            assert answer["status"] == "ok", answer
        finally:
            await c.__aexit__(None, None, None)
        db = site.db

        async def receipted_all() -> bool:
            events, receipt_seq = await asyncio.to_thread(_outbox, db)
            return bool(events) and receipt_seq == events[-1]["seq"]

        await wait_until(receipted_all, within_s=90, what="the daemon's receipt_seq at its last seq")
        events, _ = _outbox(db)
        rows = await pg_fetch(
            dsn, "SELECT id, hash, replayed, body FROM events WHERE gw = $1 ORDER BY seq", GW
        )
        stored = [json.loads(r["body"]) for r in rows]
        assert [e["id"] for e in stored] == [e["id"] for e in events]
        assert [r["hash"] for r in rows] == [e["hash"] for e in events]
        verify_chain(stored)
        healed = {json.loads(r["body"])["seq"] for r in rows if r["replayed"]}
        assert set(dropped) <= healed, (dropped, healed)
        assert any("replay_requested" in r.output() for r in receivers)
    finally:
        if site is not None:
            assert site.daemon.stop() == 0, site.daemon.output()
        if sim is not None:
            sim.terminate()
            sim.communicate(timeout=10)
        for r in receivers:
            assert r.stop() == 0, r.output()[-3000:]
            assert "Traceback" not in r.output()
