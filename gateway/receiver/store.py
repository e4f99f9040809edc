"""The event store: PostgreSQL through asyncpg (docs/fleet.md, "Schema" and "Driver").

One call, :meth:`Store.commit_batch`, writes everything a batch of broker messages carries in
**one transaction**: quarantined messages, new events (``INSERT … SELECT FROM unnest(…) ON
CONFLICT (id) DO NOTHING``), conflicts, per-(gateway, epoch) bookkeeping and gateway liveness. It
returns the receipts to send — each touched stream's highest gap-free seq — which the caller
sends only after that commit returned.

Several receivers write at once (competing consumers): a batch locks the ``streams`` rows it
touches (``SELECT … FOR UPDATE`` in a fixed order, so two batches never deadlock), then reads what
is stored around its events, decides with :func:`~gateway.receiver.messages.classify`, and
advances ``contiguous_seq``. The gap sweeper claims overdue gaps with ``FOR UPDATE SKIP LOCKED``,
so exactly one receiver asks for a replay of each.

Errors: every asyncpg/OS error is mapped once, here, to :class:`StoreUnavailable`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Self, TypeAlias

import asyncpg
import asyncpg.pool

from gateway import log
from gateway.errors import LockgwError
from gateway.receiver.config import PostgresConfig, ReceiverSection, read_secret
from gateway.receiver.messages import (
    Availability,
    BridgeState,
    Conflict,
    Event,
    Heartbeat,
    StreamKey,
    classify,
)

__all__ = ["MIGRATIONS", "BatchResult", "Quarantined", "Replay", "Store", "StoreUnavailable"]

_log = log.get("receiver.store")

#: Versioned schema: MIGRATIONS[n-1] takes the database from version n-1 to n, in one
#: transaction with its ``schema_version`` row. Append only; never edit a released step.
MIGRATIONS: Final[list[str]] = [
    """
    CREATE TABLE events (
        id text PRIMARY KEY,
        gw text NOT NULL, epoch text NOT NULL, seq bigint NOT NULL,
        site text NOT NULL, type text NOT NULL, ts text NOT NULL,
        hash char(64) NOT NULL, prev char(64) NOT NULL,
        replayed boolean NOT NULL,
        body text NOT NULL,
        received_at timestamptz NOT NULL DEFAULT now(),
        UNIQUE (gw, epoch, seq)
    );
    CREATE TABLE streams (
        gw text NOT NULL, epoch text NOT NULL, site text NOT NULL,
        first_seen timestamptz NOT NULL DEFAULT now(),
        contiguous_seq bigint NOT NULL DEFAULT 0,
        head_hash char(64) NOT NULL DEFAULT repeat('0', 64),
        max_seq bigint NOT NULL DEFAULT 0,
        gap_since timestamptz,
        replay_at timestamptz,
        replays bigint NOT NULL DEFAULT 0,
        receipt_seq bigint NOT NULL DEFAULT 0,
        receipt_at timestamptz,
        PRIMARY KEY (gw, epoch)
    );
    CREATE INDEX streams_gaps ON streams (gap_since) WHERE gap_since IS NOT NULL;
    CREATE TABLE gateways (
        gw text PRIMARY KEY,
        site text NOT NULL DEFAULT '',
        epoch text NOT NULL DEFAULT '',
        epochs integer NOT NULL DEFAULT 0,
        epoch_changed_at timestamptz,
        last_event_at timestamptz,
        heartbeat_at timestamptz,
        hb_epoch text, hb_last_seq bigint, hb_receipt_seq bigint, hb_backlog bigint,
        hb_alarms text[] NOT NULL DEFAULT '{}',
        backlog_rising integer NOT NULL DEFAULT 0,
        availability text,
        availability_at timestamptz
    );
    CREATE TABLE conflicts (
        n bigserial PRIMARY KEY,
        kind text NOT NULL,
        gw text NOT NULL, epoch text NOT NULL, seq bigint NOT NULL, event_id text NOT NULL,
        received_hash char(64) NOT NULL, stored char(64) NOT NULL, detail text NOT NULL,
        body text NOT NULL,
        received_at timestamptz NOT NULL DEFAULT now(),
        UNIQUE (event_id, received_hash, kind)
    );
    CREATE TABLE quarantine (
        n bigserial PRIMARY KEY,
        source text NOT NULL,
        reason text NOT NULL,
        raw bytea NOT NULL,
        received_at timestamptz NOT NULL DEFAULT now()
    );
    """,
    # 2: bridge notifications of site brokers (B/G/bridge).
    """
    ALTER TABLE gateways ADD COLUMN bridge_up boolean, ADD COLUMN bridge_at timestamptz;
    """,
    # 3: when the receipt_seq a gateway reports last moved (the receipt_lag alert).
    """
    ALTER TABLE gateways ADD COLUMN hb_receipt_moved_at timestamptz;
    """,
]

#: A stream whose contiguous seq stopped short of what is stored is walked this far per query.
_WALK_LIMIT: Final = 100_000
#: Holes asked for per stream and sweep at most (each is one replay request).
MAX_HOLES: Final = 16


_Db: TypeAlias = "asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"


class StoreUnavailable(LockgwError):
    code = "store_unavailable"


@contextlib.contextmanager
def _mapped() -> Iterator[None]:
    try:
        yield
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
        raise StoreUnavailable(f"PostgreSQL: {type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Quarantined:
    source: str
    reason: str
    raw: bytes


@dataclass(frozen=True, slots=True)
class Replay:
    gw: str
    epoch: str
    from_seq: int
    to_seq: int


@dataclass(slots=True)
class BatchResult:
    #: (gw, epoch) → highest gap-free seq, for every stream the batch touched (or a heartbeat
    #: showed lagging): the receipts to send after the commit.
    receipts: dict[StreamKey, int] = field(default_factory=dict)
    stored: int = 0
    duplicates: int = 0
    conflicts: list[Conflict] = field(default_factory=list)
    quarantined: int = 0
    new_streams: list[StreamKey] = field(default_factory=list)


class Store:
    """A pool of connections to the event store. Use :meth:`connect` (an async context manager)."""

    def __init__(self, pool: asyncpg.Pool[asyncpg.Record]) -> None:
        self._pool = pool

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, config: PostgresConfig, *, migrate: bool = True) -> AsyncIterator[Self]:
        password = (
            read_secret(config.password_file, "postgres.password_file") if config.password_file else None
        )
        with _mapped():
            # min_size 0: no background "connection floor" reconnect loop while PostgreSQL is down
            # (it logs a traceback per attempt); each batch reconnects as it needs.
            pool = await asyncpg.create_pool(
                config.dsn,
                password=password,
                min_size=0,
                max_size=config.pool_size,
                timeout=15,
                command_timeout=60,
            )
        try:
            store = cls(pool)
            if migrate:
                await store.migrate()
            yield store
        finally:
            with contextlib.suppress(Exception):
                await pool.close()

    async def migrate(self) -> int:
        """Apply what is missing of :data:`MIGRATIONS` (idempotent; concurrent receivers
        serialise on an advisory lock). Returns the schema version."""
        with _mapped():
            async with self._pool.acquire() as db, db.transaction():
                await db.execute("SELECT pg_advisory_xact_lock(7242001)")
                await db.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version ("
                    "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                )
                current = int(await db.fetchval("SELECT coalesce(max(version), 0) FROM schema_version"))
                for version in range(current + 1, len(MIGRATIONS) + 1):
                    await db.execute(MIGRATIONS[version - 1])
                    await db.execute("INSERT INTO schema_version (version) VALUES ($1)", version)
                    _log.info("schema_migrated", version=version)
                return max(current, len(MIGRATIONS))

    async def commit_batch(  # noqa: C901, PLR0912 - one transaction, read top to bottom
        self,
        *,
        events: Sequence[Event],
        heartbeats: Sequence[Heartbeat],
        availability: Sequence[Availability],
        quarantined: Sequence[Quarantined],
        bridges: Sequence[BridgeState] = (),
    ) -> BatchResult:
        result = BatchResult(quarantined=len(quarantined))
        with _mapped():
            async with self._pool.acquire() as db, db.transaction():
                if quarantined:
                    await db.execute(
                        "INSERT INTO quarantine (source, reason, raw) SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[])",
                        [q.source for q in quarantined],
                        [q.reason for q in quarantined],
                        [q.raw for q in quarantined],
                    )
                streams = sorted({e.stream for e in events} | {(h.gw, h.epoch) for h in heartbeats})
                state: dict[StreamKey, asyncpg.Record] = {}
                if streams:
                    site_of = {e.stream: e.site for e in events}
                    created = await db.fetch(
                        "INSERT INTO streams (gw, epoch, site) SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) "
                        "ON CONFLICT (gw, epoch) DO UPDATE SET site = EXCLUDED.site "
                        "WHERE streams.site = '' AND EXCLUDED.site <> '' "
                        "RETURNING gw, epoch, (xmax = 0) AS inserted",
                        [s[0] for s in streams],
                        [s[1] for s in streams],
                        [site_of.get(s, "") for s in streams],
                    )
                    result.new_streams = [(r["gw"], r["epoch"]) for r in created if r["inserted"]]
                    rows = await db.fetch(
                        "SELECT s.gw, s.epoch, s.contiguous_seq, s.max_seq FROM streams s "
                        "JOIN unnest($1::text[], $2::text[]) AS k(gw, epoch) USING (gw, epoch) "
                        "ORDER BY s.gw, s.epoch FOR UPDATE OF s",
                        [s[0] for s in streams],
                        [s[1] for s in streams],
                    )
                    state = {(r["gw"], r["epoch"]): r for r in rows}
                stored: dict[tuple[str, str, int], tuple[str, str]] = {}
                if events:
                    keys = {
                        (e.gw, e.epoch, s) for e in events for s in (e.seq - 1, e.seq, e.seq + 1) if s >= 1
                    }
                    gws, eps, seqs = zip(*sorted(keys), strict=True)
                    for r in await db.fetch(
                        "SELECT e.gw, e.epoch, e.seq, e.hash, e.prev FROM events e "
                        "JOIN unnest($1::text[], $2::text[], $3::bigint[]) AS k(gw, epoch, seq) USING (gw, epoch, seq)",
                        list(gws),
                        list(eps),
                        list(seqs),
                    ):
                        stored[(r["gw"], r["epoch"], r["seq"])] = (r["hash"], r["prev"])
                decided = classify(events, stored)
                result.duplicates, result.conflicts = len(decided.duplicates), decided.conflicts
                if decided.new:
                    n = decided.new
                    status = await db.execute(
                        "INSERT INTO events (id, gw, epoch, seq, site, type, ts, hash, prev, replayed, body) "
                        "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[], "
                        "$7::text[], $8::text[], $9::text[], $10::boolean[], $11::text[]) ON CONFLICT (id) DO NOTHING",
                        [e.id for e in n],
                        [e.gw for e in n],
                        [e.epoch for e in n],
                        [e.seq for e in n],
                        [e.site for e in n],
                        [e.type for e in n],
                        [e.ts for e in n],
                        [e.hash for e in n],
                        [e.prev for e in n],
                        [e.replayed for e in n],
                        [e.body for e in n],
                    )
                    result.stored = int(status.rsplit(" ", 1)[-1])
                if decided.conflicts:
                    c = decided.conflicts
                    await db.execute(
                        "INSERT INTO conflicts (kind, gw, epoch, seq, event_id, received_hash, stored, detail, body) "
                        "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[], "
                        "$7::text[], $8::text[], $9::text[]) ON CONFLICT DO NOTHING",
                        [x.kind for x in c],
                        [x.event.gw for x in c],
                        [x.event.epoch for x in c],
                        [x.event.seq for x in c],
                        [x.event.id for x in c],
                        [x.event.hash for x in c],
                        [x.stored for x in c],
                        [x.detail for x in c],
                        [x.event.body for x in c],
                    )
                # Advance each touched stream's gap-free seq.
                reported = {(h.gw, h.epoch): h for h in heartbeats}
                batch_max: dict[StreamKey, int] = {}
                for e in events:
                    batch_max[e.stream] = max(batch_max.get(e.stream, 0), e.seq)
                upd: list[tuple[str, str, int, str, int, bool]] = []
                for key in streams:
                    row = state[key]
                    old, high = int(row["contiguous_seq"]), int(row["max_seq"])
                    c_seq = old
                    while (key[0], key[1], c_seq + 1) in decided.known:
                        c_seq += 1
                    if high > c_seq:  # stored events may lie past a gap this batch filled
                        c_seq = await _walk(db, key, c_seq)
                    head = decided.known.get((key[0], key[1], c_seq), (None, None))[0]
                    if head is None and c_seq > 0:
                        head = await db.fetchval(
                            "SELECT hash FROM events WHERE gw=$1 AND epoch=$2 AND seq=$3",
                            key[0],
                            key[1],
                            c_seq,
                        )
                    hb = reported.get(key)
                    # A gap is a hole below a seq this store has *seen*. A heartbeat's last_seq
                    # past it is backlog still on its way (the gateway re-publishes it until a
                    # receipt), not a gap: asking for it again would re-queue a draining site's
                    # whole backlog behind itself (the replay storm of docs/benchmarks.md).
                    top = max(high, batch_max.get(key, 0))
                    upd.append((key[0], key[1], c_seq, head or "0" * 64, top, c_seq > old))
                    # Receipt every stream the batch carried events for (a duplicate means the
                    # gateway missed a receipt), and any whose heartbeat shows an older receipt.
                    if c_seq > 0 and (key in batch_max or (hb is not None and hb.receipt_seq < c_seq)):
                        result.receipts[key] = c_seq
                if upd:
                    await db.execute(
                        "UPDATE streams s SET contiguous_seq = u.c, head_hash = u.h, max_seq = u.m, "
                        "gap_since = CASE WHEN u.c >= u.m THEN NULL WHEN u.adv THEN now() "
                        "ELSE coalesce(s.gap_since, now()) END "
                        "FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::bigint[], $6::boolean[]) "
                        "AS u(gw, epoch, c, h, m, adv) WHERE s.gw = u.gw AND s.epoch = u.epoch",
                        *map(list, zip(*upd, strict=True)),
                    )
                await self._liveness(
                    db, events, heartbeats, availability, result, bridge_gws=[b.gw for b in bridges]
                )
                await self._bridges(db, bridges)
        return result

    @staticmethod
    async def _liveness(
        db: _Db,
        events: Sequence[Event],
        heartbeats: Sequence[Heartbeat],
        availability: Sequence[Availability],
        result: BatchResult,
        *,
        bridge_gws: Sequence[str] = (),
    ) -> None:
        # Lock every gateways row this batch touches first, in key order (after the streams rows,
        # also in key order): concurrent batches then never wait on each other in a cycle.
        touched = sorted(
            {e.gw for e in events}
            | {h.gw for h in heartbeats}
            | {a.gw for a in availability}
            | set(bridge_gws)
        )
        if touched:
            await db.execute(
                "INSERT INTO gateways (gw) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING", touched
            )
            await db.execute(
                "SELECT 1 FROM gateways WHERE gw = ANY($1::text[]) ORDER BY gw FOR UPDATE", touched
            )
        if events:
            last: dict[str, Event] = {}
            for e in events:
                last[e.gw] = e
            await db.execute(
                "INSERT INTO gateways (gw, site, last_event_at) SELECT g, s, now() FROM unnest($1::text[], $2::text[]) "
                "AS u(g, s) ON CONFLICT (gw) DO UPDATE SET site = EXCLUDED.site, last_event_at = now()",
                list(last),
                [e.site for e in last.values()],
            )
        await Store._epochs(db, events, result)
        if heartbeats:
            latest = {h.gw: h for h in heartbeats}
            hb = list(latest.values())
            await db.execute(
                "INSERT INTO gateways AS g (gw, heartbeat_at, hb_epoch, hb_last_seq, hb_receipt_seq, hb_backlog, hb_alarms, "
                "hb_receipt_moved_at) "
                "SELECT gw, now(), e, l, r, b, string_to_array(a, E'\\x1f'), now() FROM unnest($1::text[], $2::text[], "
                "$3::bigint[], $4::bigint[], $5::bigint[], $6::text[]) AS u(gw, e, l, r, b, a) "
                "ON CONFLICT (gw) DO UPDATE SET heartbeat_at = now(), hb_epoch = EXCLUDED.hb_epoch, "
                "hb_receipt_moved_at = CASE WHEN g.hb_receipt_moved_at IS NULL "
                "OR g.hb_receipt_seq IS DISTINCT FROM EXCLUDED.hb_receipt_seq "
                "OR g.hb_epoch IS DISTINCT FROM EXCLUDED.hb_epoch THEN now() ELSE g.hb_receipt_moved_at END, "
                "hb_last_seq = EXCLUDED.hb_last_seq, hb_receipt_seq = EXCLUDED.hb_receipt_seq, "
                "backlog_rising = CASE WHEN EXCLUDED.hb_backlog > coalesce(g.hb_backlog, 0) THEN g.backlog_rising + 1 "
                "ELSE 0 END, hb_backlog = EXCLUDED.hb_backlog, hb_alarms = EXCLUDED.hb_alarms",
                [h.gw for h in hb],
                [h.epoch for h in hb],
                [h.last_seq for h in hb],
                [h.receipt_seq for h in hb],
                [h.backlog for h in hb],
                ["\x1f".join(h.alarms) for h in hb],
            )
        if availability:
            latest_av = {a.gw: a for a in availability}
            await db.execute(
                "INSERT INTO gateways (gw, availability, availability_at) SELECT gw, st, now() "
                "FROM unnest($1::text[], $2::text[]) AS u(gw, st) "
                "ON CONFLICT (gw) DO UPDATE SET availability = EXCLUDED.availability, availability_at = now()",
                list(latest_av),
                [a.state for a in latest_av.values()],
            )

    @staticmethod
    async def _bridges(db: _Db, bridges: Sequence[BridgeState]) -> None:
        """Site brokers' bridge state (rows already locked by :meth:`_liveness`)."""
        if not bridges:
            return
        latest = {b.gw: b.up for b in bridges}
        gws = sorted(latest)
        await db.execute(
            "UPDATE gateways g SET bridge_up = u.up, bridge_at = now() "
            "FROM unnest($1::text[], $2::boolean[]) AS u(gw, up) WHERE g.gw = u.gw",
            gws,
            [latest[g] for g in gws],
        )

    @staticmethod
    async def _epochs(db: _Db, events: Sequence[Event], result: BatchResult) -> None:
        # New epochs per gateway: how many, and which is current (the one its latest event in
        # the batch belongs to; a heartbeat-only epoch otherwise).
        added: dict[str, int] = {}
        current: dict[str, str] = {}
        fresh = set(result.new_streams)
        for gw, epoch in result.new_streams:
            added[gw] = added.get(gw, 0) + 1
            current.setdefault(gw, epoch)
        for e in events:
            if e.stream in fresh:
                current[e.gw] = e.epoch
        if added:
            rows = await db.fetch(
                "INSERT INTO gateways AS g (gw, epoch, epochs) SELECT * FROM unnest($1::text[], $2::text[], $3::int[]) "
                "ON CONFLICT (gw) DO UPDATE SET epochs = g.epochs + EXCLUDED.epochs, epoch = EXCLUDED.epoch, "
                "epoch_changed_at = CASE WHEN g.epochs + EXCLUDED.epochs > 1 THEN now() ELSE g.epoch_changed_at END "
                "RETURNING g.gw, g.epochs",
                list(added),
                [current[g] for g in added],
                list(added.values()),
            )
            for r in rows:
                if r["epochs"] > 1:
                    _log.warning("epoch_new", gw=r["gw"], epoch=current[r["gw"]], epochs=r["epochs"])

    async def record_receipts(self, receipts: dict[StreamKey, int]) -> None:
        """What was receipted (after it was sent): the receipt lag in ``status``."""
        if not receipts:
            return
        keys = sorted(receipts)
        gws, epochs, seqs = [k[0] for k in keys], [k[1] for k in keys], [receipts[k] for k in keys]
        with _mapped():
            async with self._pool.acquire() as db, db.transaction():
                await db.execute(  # rows locked in key order, as a batch locks them
                    "SELECT 1 FROM streams s JOIN unnest($1::text[], $2::text[]) AS k(gw, epoch) USING (gw, epoch) "
                    "ORDER BY s.gw, s.epoch FOR UPDATE OF s",
                    gws,
                    epochs,
                )
                await db.execute(
                    "UPDATE streams s SET receipt_seq = greatest(s.receipt_seq, u.seq), receipt_at = now() "
                    "FROM unnest($1::text[], $2::text[], $3::bigint[]) AS u(gw, epoch, seq) "
                    "WHERE s.gw = u.gw AND s.epoch = u.epoch",
                    gws,
                    epochs,
                    seqs,
                )

    async def claim_gaps(self, *, after_s: float, retry_s: float, limit: int = 200) -> list[Replay]:
        """Gaps that did not fill within ``after_s`` and were not asked for within ``retry_s``:
        claimed (one receiver each) and returned as the exact missing ranges."""
        out: list[Replay] = []
        with _mapped():
            async with self._pool.acquire() as db, db.transaction():
                rows = await db.fetch(
                    "UPDATE streams s SET replay_at = now(), replays = s.replays + 1 FROM ("
                    "SELECT gw, epoch FROM streams WHERE gap_since IS NOT NULL "
                    "AND gap_since < now() - make_interval(secs => $1) "
                    "AND (replay_at IS NULL OR replay_at < now() - make_interval(secs => $2)) "
                    # The contract's replay has no epoch: never ask a gateway now in another one.
                    "AND NOT EXISTS (SELECT 1 FROM gateways g WHERE g.gw = streams.gw "
                    "AND g.hb_epoch IS NOT NULL AND g.hb_epoch <> streams.epoch) "
                    "ORDER BY gap_since LIMIT $3 FOR UPDATE SKIP LOCKED) AS c "
                    "WHERE s.gw = c.gw AND s.epoch = c.epoch RETURNING s.gw, s.epoch, s.contiguous_seq, s.max_seq",
                    after_s,
                    retry_s,
                    limit,
                )
                for r in rows:
                    present = await db.fetch(
                        "SELECT seq FROM events WHERE gw=$1 AND epoch=$2 AND seq > $3 AND seq <= $4 ORDER BY seq LIMIT $5",
                        r["gw"],
                        r["epoch"],
                        r["contiguous_seq"],
                        r["max_seq"],
                        _WALK_LIMIT,
                    )
                    expect = int(r["contiguous_seq"]) + 1
                    holes: list[tuple[int, int]] = []
                    for p in present:
                        if p["seq"] > expect:
                            holes.append((expect, int(p["seq"]) - 1))
                        expect = int(p["seq"]) + 1
                    if expect <= r["max_seq"]:
                        holes.append((expect, int(r["max_seq"])))
                    out += [Replay(r["gw"], r["epoch"], a, b) for a, b in holes[:MAX_HOLES]]
        return out

    async def status(self, section: ReceiverSection) -> dict[str, Any]:
        """Per-gateway liveness and alerts, from PostgreSQL alone (``lockgw-receiver status``)."""
        with _mapped():
            async with self._pool.acquire() as db:
                now = time.time()
                gws = await db.fetch(
                    "SELECT g.*, extract(epoch FROM g.heartbeat_at)::float8 AS hb_t, "
                    "extract(epoch FROM g.hb_receipt_moved_at)::float8 AS hb_moved_t, "
                    "(SELECT count(*) FROM conflicts c WHERE c.gw = g.gw) AS conflicts FROM gateways g ORDER BY gw"
                )
                streams = await db.fetch(
                    "SELECT gw, epoch, contiguous_seq, max_seq, receipt_seq, replays, "
                    "extract(epoch FROM gap_since)::float8 AS gap_t, extract(epoch FROM first_seen)::float8 AS first_t "
                    "FROM streams ORDER BY gw, first_seen"
                )
                totals = await db.fetchrow(
                    "SELECT (SELECT count(*) FROM events) AS events, (SELECT count(*) FROM conflicts) AS conflicts, "
                    "(SELECT count(*) FROM quarantine) AS quarantined"
                )
        by_gw: dict[str, list[asyncpg.Record]] = {}
        for s in streams:
            by_gw.setdefault(s["gw"], []).append(s)
        report: list[dict[str, Any]] = []
        for g in gws:
            age = None if g["hb_t"] is None else round(now - g["hb_t"], 1)
            own = by_gw.get(g["gw"], [])
            alerts = _alerts(g, own, section, age=age, now=now)
            report.append(
                {
                    "gw": g["gw"],
                    "site": g["site"],
                    "availability": g["availability"],
                    "bridge": g["bridge_up"],
                    "heartbeat_age_s": age,
                    "last_seq": g["hb_last_seq"],
                    "receipt_seq": g["hb_receipt_seq"],
                    "backlog": g["hb_backlog"],
                    "gateway_alarms": list(g["hb_alarms"]),
                    "conflicts": g["conflicts"],
                    "streams": [
                        {
                            "epoch": s["epoch"],
                            "stored_seq": s["contiguous_seq"],
                            "max_seq": s["max_seq"],
                            "receipted_seq": s["receipt_seq"],
                            "replays": s["replays"],
                        }
                        for s in own
                    ],
                    "alerts": alerts,
                }
            )
        return {
            "events": totals["events"] if totals else 0,
            "conflicts": totals["conflicts"] if totals else 0,
            "quarantined": totals["quarantined"] if totals else 0,
            "gateways": report,
            "alerts": sum(len(r["alerts"]) for r in report),
        }


def _alerts(
    g: asyncpg.Record, own: list[asyncpg.Record], section: ReceiverSection, *, age: float | None, now: float
) -> list[str]:
    """A gateway's raised alerts (docs/fleet.md, "Liveness"), from its row and its streams."""
    checks = [
        ("heartbeat_stale", age is None or age > section.heartbeat_stale_s),
        ("offline", g["availability"] == "offline"),
        ("uplink_down", g["bridge_up"] is False),
        ("lag", (g["hb_backlog"] or 0) >= section.lag_alert_events),
        ("lag_rising", g["backlog_rising"] >= 3),
        ("conflict", bool(g["conflicts"])),
        ("gap", any(s["gap_t"] is not None and now - s["gap_t"] > section.gap_replay_after_s for s in own)),
        ("new_epoch", len(own) > 1 and now - own[-1]["first_t"] < 86400),
        ("receipt_lag", _receipts_not_arriving(g, own, section, now=now)),
    ]
    return [name for name, raised in checks if raised]


def _receipts_not_arriving(
    g: asyncpg.Record, own: list[asyncpg.Record], section: ReceiverSection, *, now: float
) -> bool:
    """Receipts were sent past what the gateway reports, and its reported receipt_seq has not
    moved for ``receipt_lag_alert_s``."""
    if g["hb_receipt_seq"] is None or g["hb_moved_t"] is None:
        return False
    sent = max((s["receipt_seq"] for s in own if s["epoch"] == g["hb_epoch"]), default=0)
    return bool(g["hb_receipt_seq"] < sent and now - g["hb_moved_t"] > section.receipt_lag_alert_s)


async def _walk(db: _Db, key: StreamKey, c_seq: int) -> int:
    """Extend a gap-free run over what is already stored past it (a gap just filled)."""
    rows = await db.fetch(
        "SELECT seq FROM events WHERE gw=$1 AND epoch=$2 AND seq > $3 ORDER BY seq LIMIT $4",
        key[0],
        key[1],
        c_seq,
        _WALK_LIMIT,
    )
    for r in rows:
        if r["seq"] != c_seq + 1:
            break
        c_seq += 1
    return c_seq
