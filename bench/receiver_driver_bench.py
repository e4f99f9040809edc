"""PostgreSQL driver choice for the receiver: asyncpg vs psycopg 3 (async), same statement.

Each driver inserts the same events in batches, one transaction per batch, with the receiver's
statement shape: ``INSERT … SELECT * FROM unnest($1::text[], …) ON CONFLICT (id) DO NOTHING``
into a fresh table like ``events``. Then the same batches again (all duplicates: the dedup path).
A private PostgreSQL (tests/fleetfix.py) on this machine, fsync on; rounds alternate drivers;
psycopg sends its parameters in binary (its faster mode for arrays; text was slower still).

Run: .venv/bin/python bench/receiver_driver_bench.py [--events 50000] [--batch 500] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fleetfix import Postgres, chain

TABLE = """CREATE TABLE IF NOT EXISTS ev (id text PRIMARY KEY, gw text, epoch text, seq bigint,
  hash text, prev text, body text, UNIQUE (gw, epoch, seq))"""
COLS = "id, gw, epoch, seq, hash, prev, body"


def make_rows(n: int) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for g in range(n // 1000 + 1):
        out.extend(
            (e["id"], e["gw"], e["epoch"], e["seq"], e["hash"], e["prev"], json.dumps(e))
            for e in chain(f"gw-{g}", n=min(1000, n - g * 1000))
        )
    return out[:n]


def columns(batch: list[tuple[Any, ...]]) -> list[list[Any]]:
    return [list(c) for c in zip(*batch, strict=True)]


async def run_asyncpg(dsn: str, batches: list[list[tuple[Any, ...]]]) -> float:
    conn = await asyncpg.connect(dsn)
    sql = (
        f"INSERT INTO ev ({COLS}) SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], "
        "$5::text[], $6::text[], $7::text[]) ON CONFLICT (id) DO NOTHING"
    )
    t = time.perf_counter()
    for b in batches:
        async with conn.transaction():
            await conn.execute(sql, *columns(b))
    elapsed = time.perf_counter() - t
    await conn.close()
    return elapsed


async def run_psycopg(dsn: str, batches: list[list[tuple[Any, ...]]]) -> float:
    conn = await psycopg.AsyncConnection.connect(dsn, prepare_threshold=0)
    sql = (
        f"INSERT INTO ev ({COLS}) SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::bigint[], "
        "%s::text[], %s::text[], %s::text[]) ON CONFLICT (id) DO NOTHING"
    )
    t = time.perf_counter()
    for b in batches:
        async with conn.transaction():
            await conn.execute(sql, columns(b), binary=True)
    elapsed = time.perf_counter() - t
    await conn.close()
    return elapsed


async def reset(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    await conn.execute("DROP TABLE IF EXISTS ev")
    await conn.execute(TABLE)
    await conn.close()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rows = make_rows(args.events)
    batches = [rows[i : i + args.batch] for i in range(0, len(rows), args.batch)]
    pg = Postgres()
    pg.start()
    results: dict[str, list[float]] = {
        "asyncpg new": [],
        "asyncpg dup": [],
        "psycopg new": [],
        "psycopg dup": [],
    }
    try:
        for _ in range(args.rounds):
            for name, fn in (("asyncpg", run_asyncpg), ("psycopg", run_psycopg)):
                await reset(pg.dsn)
                results[f"{name} new"].append(len(rows) / await fn(pg.dsn, batches))
                results[f"{name} dup"].append(len(rows) / await fn(pg.dsn, batches))
    finally:
        pg.destroy()
    print(f"{args.events} events, batches of {args.batch}, {args.rounds} rounds (median events/s):")
    base = statistics.median(results["psycopg new"])
    for name, values in results.items():
        med = statistics.median(values)
        print(f"  {name:<12} {med:>10.0f} /s   ({med / base:.2f}x psycopg new)")


if __name__ == "__main__":
    asyncio.run(main())
