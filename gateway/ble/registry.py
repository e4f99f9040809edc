"""Paired locks: id, BLE address, name and the link key (secret), in ``locks.sqlite3`` (0600)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import OutboxError

__all__ = ["LockRecord", "Registry"]


@dataclass(frozen=True, slots=True)
class LockRecord:
    lock: str
    address: str
    name: str
    ltk: bytes


class Registry:
    def __init__(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600, exist_ok=True)
            path.chmod(0o600)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS locks (lock TEXT PRIMARY KEY, address TEXT NOT NULL, "
                "name TEXT NOT NULL, ltk BLOB NOT NULL)"
            )
        except (sqlite3.Error, OSError) as exc:
            raise OutboxError(f"cannot open lock registry {path}: {exc}") from exc
        self._cache = {r.lock: r for r in self._load()}

    def _load(self) -> list[LockRecord]:
        rows = self._db.execute("SELECT lock, address, name, ltk FROM locks ORDER BY lock").fetchall()
        return [LockRecord(str(a), str(b), str(c), bytes(d)) for a, b, c, d in rows]

    def close(self) -> None:
        self._db.close()

    def get(self, lock: str) -> LockRecord | None:
        return self._cache.get(lock)

    def all(self) -> list[LockRecord]:
        return sorted(self._cache.values(), key=lambda r: r.lock)

    def put(self, record: LockRecord) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        self._db.execute(
            "INSERT INTO locks VALUES (?, ?, ?, ?) ON CONFLICT(lock) DO UPDATE SET address = excluded.address, "
            "name = excluded.name, ltk = excluded.ltk",
            (record.lock, record.address, record.name, record.ltk),
        )
        self._db.execute("COMMIT")
        self._cache[record.lock] = record

    def remove(self, lock: str) -> bool:
        self._db.execute("BEGIN IMMEDIATE")
        n = self._db.execute("DELETE FROM locks WHERE lock = ?", (lock,)).rowcount
        self._db.execute("COMMIT")
        self._cache.pop(lock, None)
        return bool(n)
