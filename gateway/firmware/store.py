"""Durable rollout state: one SQLite file in the data directory (``firmware.sqlite``).

Every step of a lock's update is written (WAL, ``synchronous=FULL``) before the next one starts,
so a gateway killed with ``kill -9`` at any point resumes where it was: an upload resumes from
the lock's own offset, a lock that was reset is health-checked, a finished lock is not touched
again. Calls run in a worker thread (``asyncio.to_thread``): the event loop never waits on disk.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Self

__all__ = ["FINAL_STATES", "FirmwareStore", "LockRow", "RolloutRow"]

#: A lock in one of these is done for its rollout.
FINAL_STATES: Final = frozenset({"confirmed", "reverted", "refused", "failed", "halted"})

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY, manifest BLOB NOT NULL, image BLOB NOT NULL, version TEXT NOT NULL,
    state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', created REAL NOT NULL, updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS locks (
    rollout TEXT NOT NULL, lock TEXT NOT NULL, ring INTEGER NOT NULL, state TEXT NOT NULL,
    offset INTEGER NOT NULL DEFAULT 0, size INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '', from_version TEXT NOT NULL DEFAULT '', updated REAL NOT NULL,
    PRIMARY KEY (rollout, lock)
);
CREATE TABLE IF NOT EXISTS confirmed (
    lock TEXT PRIMARY KEY, version TEXT NOT NULL, security_counter INTEGER NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class RolloutRow:
    id: str
    manifest: bytes
    image: bytes
    version: str
    state: str  # "running" | "done" | "halted"
    reason: str


@dataclass(frozen=True, slots=True)
class LockRow:
    rollout: str
    lock: str
    ring: int
    state: str  # pending | uploading | uploaded | testing | FINAL_STATES
    offset: int
    size: int
    reason: str
    from_version: str


class FirmwareStore:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._db: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> Self:
        self._db = await asyncio.to_thread(self._open)
        return self

    async def __aexit__(self, *exc: object) -> None:
        db, self._db = self._db, None
        if db is not None:
            await asyncio.to_thread(db.close)

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        return db

    async def _run(self, sql: str, *args: object) -> list[tuple[object, ...]]:
        assert self._db is not None, "FirmwareStore used outside its context"
        db = self._db
        async with self._lock:
            return await asyncio.to_thread(lambda: db.execute(sql, args).fetchall())

    # --- rollouts ----------------------------------------------------------------------------

    async def add_rollout(
        self, rollout: str, manifest: bytes, image: bytes, version: str, locks: list[tuple[str, int]]
    ) -> bool:
        """Record a new rollout with its locks (ring numbers); False if the id exists."""
        assert self._db is not None
        db, now = self._db, time.time()

        def write() -> bool:
            with db:
                db.execute("BEGIN IMMEDIATE")
                if db.execute("SELECT 1 FROM rollouts WHERE id = ?", (rollout,)).fetchone():
                    return False
                db.execute(
                    "INSERT INTO rollouts VALUES (?, ?, ?, ?, 'running', '', ?, ?)",
                    (rollout, manifest, image, version, now, now),
                )
                db.executemany(
                    "INSERT INTO locks (rollout, lock, ring, state, size, updated) VALUES (?, ?, ?, 'pending', ?, ?)",
                    [(rollout, lock, ring, len(image), now) for lock, ring in locks],
                )
                return True

        async with self._lock:
            return await asyncio.to_thread(write)

    async def set_rollout(self, rollout: str, state: str, reason: str = "") -> None:
        await self._run(
            "UPDATE rollouts SET state = ?, reason = ?, updated = ? WHERE id = ?",
            state,
            reason,
            time.time(),
            rollout,
        )

    async def rollouts(self, *, running_only: bool = False) -> list[RolloutRow]:
        where = " WHERE state = 'running'" if running_only else ""
        rows = await self._run(
            f"SELECT id, manifest, image, version, state, reason FROM rollouts{where} ORDER BY created"  # noqa: S608 - a constant
        )
        return [RolloutRow(*map(_v, r)) for r in rows]  # type: ignore[arg-type]

    # --- locks -------------------------------------------------------------------------------

    async def locks(self, rollout: str) -> list[LockRow]:
        rows = await self._run(
            "SELECT rollout, lock, ring, state, offset, size, reason, from_version FROM locks "
            "WHERE rollout = ? ORDER BY ring, rowid",
            rollout,
        )
        return [LockRow(*map(_v, r)) for r in rows]  # type: ignore[arg-type]

    async def set_lock(
        self,
        rollout: str,
        lock: str,
        *,
        state: str | None = None,
        offset: int | None = None,
        reason: str | None = None,
        from_version: str | None = None,
    ) -> None:
        await self._run(
            "UPDATE locks SET state = COALESCE(?, state), offset = COALESCE(?, offset), "
            "reason = COALESCE(?, reason), from_version = COALESCE(?, from_version), updated = ? "
            "WHERE rollout = ? AND lock = ?",
            state,
            offset,
            reason,
            from_version,
            time.time(),
            rollout,
            lock,
        )

    async def confirmed(self, lock: str, version: str, counter: int) -> None:
        await self._run("INSERT OR REPLACE INTO confirmed VALUES (?, ?, ?)", lock, version, counter)

    async def known(self) -> dict[str, tuple[str, int]]:
        """The version and security counter this gateway last confirmed on each lock."""
        rows = await self._run("SELECT lock, version, security_counter FROM confirmed")
        return {str(r[0]): (str(r[1]), int(str(r[2]))) for r in rows}


def _v(value: object) -> object:
    return value
