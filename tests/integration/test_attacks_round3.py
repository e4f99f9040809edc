"""Attack round 3 on today's surfaces (receiver, backup, …): each test is one attack that broke
something, kept so it stays fixed."""

from __future__ import annotations

import json

import pytest
from fleetfix import Postgres, chain, new_database, payload, postgres

from gateway.receiver.config import PostgresConfig
from gateway.receiver.messages import Event, Heartbeat, Malformed, parse
from gateway.receiver.store import Store
from protocols.event_encoding import GENESIS, seal_event

__all__ = ["postgres"]

pytestmark = [pytest.mark.slow]


def _hostile() -> list[tuple[str, bytes]]:
    """Messages that pass every contract check yet carry a NUL, which a PostgreSQL text column
    cannot hold: any of them in a batch made every commit fail, the batch was retried forever
    as if PostgreSQL were down, and no gateway got a receipt again (a poison message)."""
    sealed = [
        seal_event(
            {"type": "lock.unlocked", "lock": "lock-1", **extra},
            gw="gw-nul",
            site=site,
            epoch="e1",
            seq=1,
            prev=GENESIS,
            wall=1_780_000_000,
        )
        for site, extra in (("s\x00", {}), ("s", {"type": "lock.\x00"}), ("s", {"ts": "\x00"}))
    ]
    beat = {"epoch": "e1", "last_seq": 1, "receipt_seq": 0, "time_state": "ok\x00"}
    alarm = {"epoch": "e1", "last_seq": 1, "receipt_seq": 0, "alarms": ["a\x00b"]}
    return [("t/gw-nul/events", payload(e)) for e in sealed] + [
        ("t/gw-nul/heartbeat", json.dumps(beat).encode()),
        ("t/gw-nul/heartbeat", json.dumps(alarm).encode()),
    ]


async def test_a_nul_in_any_stored_text_is_quarantined_not_a_poisoned_batch(postgres: Postgres) -> None:
    dsn = await new_database(postgres)
    async with Store.connect(PostgresConfig(dsn=dsn), migrate=True) as store:
        for topic, raw in _hostile():
            try:
                item = parse(topic, raw, base="t")
            except Malformed:
                continue  # quarantined with its reason: fine
            events = [item] if isinstance(item, Event) else []
            beats = [item] if isinstance(item, Heartbeat) else []
            # Parsed as valid, it must then commit: a PostgreSQL error here is a poison batch.
            await store.commit_batch(events=events, heartbeats=beats, availability=[], quarantined=[])
        good = [parse("t/gw-ok/events", payload(e), base="t") for e in chain("gw-ok", n=2)]
        assert all(isinstance(e, Event) for e in good)
        result = await store.commit_batch(
            events=[e for e in good if isinstance(e, Event)], heartbeats=[], availability=[], quarantined=[]
        )
        assert result.stored == 2
