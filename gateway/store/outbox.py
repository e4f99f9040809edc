"""The durable outbox: every event committed (fsync) before anything depends on it.

SQLite in WAL mode with ``synchronous=FULL`` (asserted at open), owned by **one writer thread**.
Every call — appends, receipts, reads — is a job on that thread's queue, so there is exactly one
connection and no lock contention; the event loop only awaits futures. Appends that queue up
while a commit is in flight are committed together (group commit), each still durable before
its caller is answered.

Numbering: ``epoch`` is a random id made when the database is created; ``seq`` starts at 1 and
grows by exactly 1; ``prev``/``hash`` chain every event (protocols.event_encoding). The next
seq and the chain head are advanced only after a successful COMMIT, so a failed transaction
leaves no gap.

Failures (THREATS D7, D8): free space below a watermark raises ``disk_low`` (checked after
commits, at most every ``space_check_s``), well before anything fails. A full disk releases a
reserved file (``reserve.bin``, preallocated at open) and retries the batch once, with the
``disk_full`` alarm; when space is back above the watermark the reserve is made again and the
alarm clears. Any other write error — including an fsync EIO — stops the writer for good: the
batch's callers get :class:`OutboxError`, nothing is retried on that connection, and the daemon
exits non-zero; on restart SQLite recovers from the WAL.

Retention: rows stay until a receipt covers them and for ``retention_s`` after that receipt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Self, TypeVar, cast

from gateway import log
from gateway.errors import OutboxError
from gateway.events import SealedEvent
from protocols.event_encoding import GENESIS, INT64_MAX, check_fields, seal_event_json

__all__ = ["DEFAULT_RETENTION_S", "Outbox", "OutboxStats"]

T = TypeVar("T")

_log = log.get("outbox")

#: Events are kept this long after the receipt that covers them (CONTRACT §8.8).
DEFAULT_RETENTION_S: Final = 30 * 86400
#: Released on a full disk so that an ``access.granted`` can still commit (THREATS D8).
RESERVE_BYTES: Final = 8 * 1024 * 1024
#: Below this much free space on the outbox's file system: the ``disk_low`` alarm. At ~1 KB per
#: event this is tens of thousands of events of warning before the reserve is needed.
LOW_SPACE_BYTES: Final = 64 * 1024 * 1024
#: statvfs at most this often (it runs on the writer thread, after a commit).
SPACE_CHECK_S: Final = 30.0
#: Appends committed in one transaction at most: bounds the latency of the last one in a burst.
MAX_GROUP: Final = 256

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY, type TEXT NOT NULL, lock TEXT, json TEXT NOT NULL,
    hash TEXT NOT NULL, receipted_at INTEGER);
CREATE INDEX IF NOT EXISTS events_receipted ON events (receipted_at) WHERE receipted_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS lock_cursor (lock TEXT PRIMARY KEY, lock_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS forwarded (lock TEXT NOT NULL, lock_seq INTEGER NOT NULL, PRIMARY KEY (lock, lock_seq));
"""


@dataclass(frozen=True, slots=True)
class OutboxStats:
    epoch: str
    last_seq: int
    receipt_seq: int

    @property
    def backlog(self) -> int:
        return self.last_seq - self.receipt_seq


class _JobFault(Exception):
    """Writer thread: job ``index`` of a batch failed by its own fault (``cause``)."""

    def __init__(self, index: int, cause: BaseException) -> None:
        super().__init__(index, cause)
        self.index, self.cause = index, cause


#: SQLite errors that are the job's fault (a value or statement it brought), not the database's.
_JOB_SQL_FAULTS: Final = (
    sqlite3.IntegrityError,
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,
    sqlite3.DataError,
)


def _rollback(db: sqlite3.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):
        if db.in_transaction:
            db.execute("ROLLBACK")


@dataclass(slots=True)
class _Job:
    fn: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    write: bool
    appends: Sequence[Mapping[str, Any]] | None = None  # None: run fn; a list: append these events
    cursor: tuple[str, int] | None = None
    forwarded: list[tuple[str, int]] | None = None


class Outbox:
    def __init__(
        self,
        path: Path,
        *,
        gw: str,
        site: str,
        wall: Callable[[], float],
        retention_s: int = DEFAULT_RETENTION_S,
        reserve_bytes: int = RESERVE_BYTES,
        low_space_bytes: int = LOW_SPACE_BYTES,
        space_check_s: float = SPACE_CHECK_S,
    ) -> None:
        self.path = path
        self._gw, self._site, self._wall = gw, site, wall
        self._retention_s = retention_s
        self._reserve = path.with_name("reserve.bin")
        self._reserve_bytes = reserve_bytes
        self._low_space_bytes = low_space_bytes
        self._space_check_s = space_check_s
        self._space_due = 0.0  # time.monotonic() of the next free-space check (writer thread)
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._failed: OutboxError | None = None
        self.alarms: set[str] = set()
        self.epoch = ""
        self._last_seq = 0
        self._last_hash = GENESIS
        self._receipt_seq = 0
        self.appended = asyncio.Event()  # set after every commit (publisher wake-up)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failure: asyncio.Future[OutboxError] | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._thread is not None:
            raise RuntimeError("Outbox is not reentrant")
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self._loop, self._failure = loop, loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(loop, ready), name="lockgw-outbox", daemon=True
        )
        self._thread.start()
        await ready
        return self

    async def __aexit__(self, *exc: object) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(None)
            await asyncio.to_thread(thread.join, 10)

    async def wait_failed(self) -> OutboxError:
        """Return when the store has failed for good (fail-stop): the supervisor's cue to stop
        the daemon with exit 1 so that systemd restarts it."""
        if self._failure is None:
            raise OutboxError("outbox is not open")
        return await asyncio.shield(self._failure)

    @property
    def healthy(self) -> bool:
        return self._failed is None and self._thread is not None and self._thread.is_alive()

    def stats(self) -> OutboxStats:
        return OutboxStats(self.epoch, self._last_seq, self._receipt_seq)

    # --- the writer thread --------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        mode = db.execute("PRAGMA journal_mode").fetchone()[0]
        sync = db.execute("PRAGMA synchronous").fetchone()[0]
        if mode != "wal" or sync != 2:
            raise OutboxError(f"{self.path}: SQLite refused WAL + synchronous=FULL (got {mode}/{sync})")
        db.executescript(_SCHEMA)
        row = db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
        if row is None:
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO meta VALUES ('epoch', ?)", (secrets.token_hex(8),))
            db.execute("INSERT INTO meta VALUES ('receipt_seq', '0')")
            db.execute("COMMIT")
            row = db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
        self.epoch = str(row[0])
        self._receipt_seq = int(db.execute("SELECT value FROM meta WHERE key = 'receipt_seq'").fetchone()[0])
        last = db.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
        if last is not None:
            self._last_seq, self._last_hash = int(last[0]), str(last[1])
        else:
            # Everything may have been pruned: the chain continues from the stored head.
            head = db.execute("SELECT value FROM meta WHERE key = 'head'").fetchone()
            if head is not None:
                seq, _, digest = str(head[0]).partition(":")
                self._last_seq, self._last_hash = int(seq), digest
        if not self._reserve.exists():
            self._make_reserve()
        self._check_space()
        return db

    def _make_reserve(self) -> bool:
        try:
            with self._reserve.open("wb") as fh:
                os.posix_fallocate(fh.fileno(), 0, self._reserve_bytes)
        except OSError:
            with contextlib.suppress(OSError):
                self._reserve.unlink()  # a partial reserve would promise space it does not hold
            return False
        return True

    def _check_space(self) -> None:
        """Writer thread: raise or clear ``disk_low``; once space is back, restore the reserve
        and clear ``disk_full``."""
        now = time.monotonic()
        if now < self._space_due:
            return
        self._space_due = now + self._space_check_s
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return
        free = st.f_bavail * st.f_frsize
        if free < self._low_space_bytes:
            self.alarms.add("disk_low")
            return
        self.alarms.discard("disk_low")
        room = free >= self._low_space_bytes + self._reserve_bytes
        if "disk_full" in self.alarms and room and (self._reserve.exists() or self._make_reserve()):
            self.alarms.discard("disk_full")

    def _run(self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future[None]) -> None:
        try:
            db = self._open()
        except (sqlite3.Error, OSError, OutboxError) as exc:
            err = (
                exc if isinstance(exc, OutboxError) else OutboxError(f"cannot open outbox {self.path}: {exc}")
            )
            self._failed = err
            loop.call_soon_threadsafe(_set_exception, ready, err)
            return
        loop.call_soon_threadsafe(_set_result, ready, None)
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                batch = [job]
                if job.write:
                    # The only consumer: empty() is exact here, and cheaper than catching Empty.
                    while len(batch) < MAX_GROUP and not self._jobs.empty():
                        nxt = self._jobs.get_nowait()
                        if nxt is None:
                            self._jobs.put(None)
                            break
                        batch.append(nxt)
                self._execute(db, batch)
        except BaseException as exc:  # a bug of ours: fail-stop, loudly, never a silent dead thread
            self._fail_stop(OutboxError(f"outbox writer crashed ({type(exc).__name__}: {exc})"), exc)
            raise
        finally:
            db.close()
            self._drain_after_stop()

    def _drain_after_stop(self) -> None:
        """Writer thread, ending: no job queued now or later waits for ever."""
        if self._failed is None:
            self._failed = OutboxError("outbox is closed")
        while not self._jobs.empty():
            job = self._jobs.get_nowait()
            if job is not None:
                job.loop.call_soon_threadsafe(_set_exception, job.future, self._failed)

    def _fail_stop(self, err: OutboxError, cause: BaseException) -> None:
        """Writer thread: a failure that is not one job's fault. Every waiter gets ``err`` at
        once, ``outbox_write_failed`` is raised, :meth:`wait_failed` returns (the supervisor then
        stops the daemon with exit 1) and the watchdog is no longer fed (:attr:`healthy`)."""
        _log.error("outbox_failed", reason=str(err), exc_info=cause)
        self._failed = err
        self.alarms.add("outbox_write_failed")
        loop, failure = self._loop, self._failure
        if loop is not None and failure is not None and not loop.is_closed():
            loop.call_soon_threadsafe(_set_result, failure, err)

    def _execute(self, db: sqlite3.Connection, batch: list[_Job]) -> None:
        if self._failed is not None:
            for job in batch:
                job.loop.call_soon_threadsafe(_set_exception, job.future, self._failed)
            return
        reads = [j for j in batch if not j.write]
        writes = [j for j in batch if j.write]
        for job in reads:
            try:
                result = job.fn(db)
            except Exception as exc:  # noqa: BLE001 - fails this read alone, with its reason
                job.loop.call_soon_threadsafe(
                    _set_exception,
                    job.future,
                    OutboxError(f"outbox read failed: {type(exc).__name__}: {exc}"),
                )
            else:
                job.loop.call_soon_threadsafe(_set_result, job.future, result)
        if writes:
            self._commit(db, writes)

    def _commit(self, db: sqlite3.Connection, writes: list[_Job]) -> None:
        """Commit the batch in one transaction. A job that cannot be stored (its own fault: a
        value SQLite refuses, a bug in its function) is failed alone and the rest committed
        without it; any other failure is fail-stop, except a full disk, which releases the
        reserve and tries once more."""
        reserve_left = True
        while writes:
            try:
                results = self._transaction(db, writes)
            except _JobFault as fault:
                _rollback(db)
                job = writes.pop(fault.index)
                _log.warning("outbox_job_refused", reason=str(fault.cause), exc_info=fault.cause)
                job.loop.call_soon_threadsafe(
                    _set_exception,
                    job.future,
                    OutboxError(f"event refused by the store: {type(fault.cause).__name__}: {fault.cause}"),
                )
                continue
            except sqlite3.Error as exc:
                _rollback(db)
                full = isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower()
                if full and reserve_left and self._reserve.exists():
                    reserve_left = False
                    self.alarms.add("disk_full")
                    _log.error("disk_full", reason=str(exc), reserve_released=self._reserve_bytes)
                    with contextlib.suppress(OSError):
                        self._reserve.unlink()
                    continue
                err = OutboxError(f"outbox commit failed ({exc}); the writer stopped — restart the daemon")
                self._fail_stop(err, exc)
                for job in writes:
                    job.loop.call_soon_threadsafe(_set_exception, job.future, err)
                return
            # One wake-up of the event loop per commit, however many callers it answers.
            writes[0].loop.call_soon_threadsafe(
                self._committed, [(j.future, r) for j, r in zip(writes, results, strict=True)]
            )
            self._check_space()  # after the answer: never on a caller's latency
            return

    def _transaction(self, db: sqlite3.Connection, writes: list[_Job]) -> list[Any]:
        """One transaction over ``writes``; raises :class:`_JobFault` naming the job at fault,
        or the ``sqlite3.Error`` that is nobody's fault. The seq and chain head move only after
        COMMIT."""
        seq, head = self._last_seq, self._last_hash
        results: list[Any] = []
        db.execute("BEGIN IMMEDIATE")
        for index, job in enumerate(writes):
            try:
                if job.appends is not None:
                    seq, head, sealed = self._insert(db, job, seq, head)
                    results.append(sealed)
                else:
                    results.append(job.fn(db))
            except sqlite3.Error as exc:
                if isinstance(exc, _JOB_SQL_FAULTS):
                    raise _JobFault(index, exc) from exc
                raise
            except Exception as exc:  # this job's fault, whatever it is
                raise _JobFault(index, exc) from exc
        db.execute("COMMIT")
        self._last_seq, self._last_hash = seq, head
        return results

    def _insert(self, db: sqlite3.Connection, job: _Job, seq: int, head: str) -> tuple[int, str, list[Any]]:
        assert job.appends is not None
        sealed = []
        for fields in job.appends:
            seq += 1
            event, text = seal_event_json(
                fields, gw=self._gw, site=self._site, epoch=self.epoch, seq=seq, prev=head, wall=self._wall()
            )
            head = event["hash"]
            db.execute(
                "INSERT INTO events (seq, type, lock, json, hash) VALUES (?, ?, ?, ?, ?)",
                (seq, event["type"], event["lock"], text, head),
            )
            sealed.append(event)
        if job.forwarded:
            db.executemany("INSERT OR IGNORE INTO forwarded VALUES (?, ?)", job.forwarded)
        if job.cursor is not None:
            db.execute(
                "INSERT INTO lock_cursor VALUES (?, ?) ON CONFLICT(lock) DO UPDATE "
                "SET lock_seq = max(lock_seq, excluded.lock_seq)",
                job.cursor,
            )
            db.execute("DELETE FROM forwarded WHERE lock = ? AND lock_seq <= ?", job.cursor)
        return seq, head, sealed

    def _committed(self, answers: list[tuple[asyncio.Future[Any], Any]]) -> None:
        for future, result in answers:
            _set_result(future, result)
        self.appended.set()

    # --- API (coroutines; all work happens on the writer thread) ---------------------------------

    async def _submit(
        self,
        fn: Callable[[sqlite3.Connection], T],
        *,
        write: bool,
        appends: Sequence[Mapping[str, Any]] | None = None,
        cursor: tuple[str, int] | None = None,
        forwarded: list[tuple[str, int]] | None = None,
    ) -> Any:
        if self._failed is not None:
            raise self._failed
        if self._thread is None:
            raise OutboxError("outbox is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._jobs.put(_Job(fn, future, loop, write, appends, cursor, forwarded))
        return await future

    async def append(self, fields: Mapping[str, Any]) -> SealedEvent:
        """Commit one event durably; return it sealed (epoch, seq, id, prev, hash). Fields that
        cannot be stored as they are (:func:`protocols.event_encoding.check_fields`) are refused
        here with :class:`OutboxError`, before anything is queued."""
        _checked([fields])
        (event,) = await self._submit(_noop, write=True, appends=[fields])
        return cast("SealedEvent", event)

    async def append_many(
        self,
        events: Sequence[Mapping[str, Any]],
        *,
        cursor: tuple[str, int] | None = None,
        forwarded: list[tuple[str, int]] | None = None,
    ) -> list[SealedEvent]:
        """Commit several events in one transaction, with the lock-log bookkeeping if given:
        ``forwarded`` marks (lock, lock_seq) pairs as reported, ``cursor`` advances the lock's
        log cursor (and forgets the marks it covers). Refused whole, before anything is queued,
        if any event or (lock, lock_seq) cannot be stored as it is."""
        _checked(events)
        for lock_id, lock_seq in [*(forwarded or ()), *([cursor] if cursor else [])]:
            if (
                not isinstance(lock_id, str)
                or not isinstance(lock_seq, int)
                or not 0 <= lock_seq <= INT64_MAX
            ):
                raise OutboxError(f"lock_seq {lock_seq!r} of {lock_id!r} is outside 0..2^63-1")
        return list(await self._submit(_noop, write=True, appends=events, cursor=cursor, forwarded=forwarded))

    async def forwarded(self, lock: str, seqs: list[int]) -> set[int]:
        """Which of these lock_seqs were already reported (by a command response)."""
        if not seqs:
            return set()
        marks = ",".join("?" * len(seqs))

        def read(db: sqlite3.Connection) -> set[int]:
            sql = f"SELECT lock_seq FROM forwarded WHERE lock = ? AND lock_seq IN ({marks})"  # noqa: S608 - placeholders only
            return {int(r[0]) for r in db.execute(sql, (lock, *seqs)).fetchall()}

        return set(await self._submit(read, write=False))

    async def lock_cursor(self, lock: str) -> int:
        def read(db: sqlite3.Connection) -> int:
            row = db.execute("SELECT lock_seq FROM lock_cursor WHERE lock = ?", (lock,)).fetchone()
            return int(row[0]) if row else 0

        return int(await self._submit(read, write=False))

    async def receipt(self, epoch: str, seq: int) -> bool:
        """Central stored everything of ``epoch`` up to ``seq``. Other epochs or seq beyond the
        last are ignored (CONTRACT §8.8); returns whether the receipt moved forward."""
        if epoch != self.epoch or seq > self._last_seq or seq <= self._receipt_seq:
            return False
        now = int(self._wall())

        def write(db: sqlite3.Connection) -> bool:
            db.execute(
                "UPDATE events SET receipted_at = ? WHERE seq <= ? AND receipted_at IS NULL", (now, seq)
            )
            db.execute(
                "UPDATE meta SET value = ? WHERE key = 'receipt_seq' AND CAST(value AS INTEGER) < ?",
                (str(seq), seq),
            )
            return True

        await self._submit(write, write=True)
        self._receipt_seq = max(self._receipt_seq, seq)
        return True

    async def prune(self) -> int:
        cutoff = int(self._wall()) - self._retention_s

        def write(db: sqlite3.Connection) -> int:
            # Keep the chain head before rows go, so numbering continues after a full prune.
            db.execute(
                "INSERT INTO meta VALUES ('head', ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (f"{self._last_seq}:{self._last_hash}",),
            )
            return int(
                db.execute(
                    "DELETE FROM events WHERE receipted_at IS NOT NULL AND receipted_at < ?", (cutoff,)
                ).rowcount
            )

        return int(await self._submit(write, write=True))

    async def read(self, from_seq: int, to_seq: int | None = None, *, limit: int = 500) -> list[SealedEvent]:
        """Stored events with from_seq ≤ seq ≤ to_seq, in order (at most ``limit``)."""
        hi = min(to_seq, INT64_MAX) if to_seq is not None else INT64_MAX
        from_seq = max(0, min(from_seq, INT64_MAX))

        def read(db: sqlite3.Connection) -> list[SealedEvent]:
            rows = db.execute(
                "SELECT json FROM events WHERE seq >= ? AND seq <= ? ORDER BY seq LIMIT ?",
                (from_seq, hi, limit),
            ).fetchall()
            return [json.loads(r[0]) for r in rows]

        return list(await self._submit(read, write=False))

    async def query(
        self,
        since: int,
        *,
        limit: int,
        lock: str | None = None,
        type_glob: str | None = None,
        sub: str | None = None,
        ts_from: str | None = None,
        ts_until: str | None = None,
    ) -> tuple[list[SealedEvent], int]:
        """Stored events from ``since`` on that match every filter given, in order, at most
        ``limit``; and the seq to continue from (past everything examined, so a follower neither
        misses nor repeats an event). ``ts_*`` compare as strings: every ``ts`` has one format."""

        def read(db: sqlite3.Connection) -> tuple[list[SealedEvent], int]:
            top = db.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]
            rows = db.execute(
                "SELECT seq, json FROM events WHERE seq >= :since AND seq <= :top"
                " AND (:lock IS NULL OR lock = :lock) AND (:type IS NULL OR type GLOB :type)"
                " AND (:sub IS NULL OR json_extract(json, '$.sub') = :sub)"
                " AND (:from IS NULL OR json_extract(json, '$.ts') >= :from)"
                " AND (:until IS NULL OR json_extract(json, '$.ts') < :until)"
                " ORDER BY seq LIMIT :limit",
                {
                    "since": since,
                    "top": top,
                    "lock": lock,
                    "type": type_glob,
                    "sub": sub,
                    "from": ts_from,
                    "until": ts_until,
                    "limit": limit,
                },
            ).fetchall()
            nxt = rows[-1][0] + 1 if len(rows) == limit else max(since, top + 1)
            return [json.loads(r[1]) for r in rows], nxt

        events, nxt = await self._submit(read, write=False)
        return list(events), int(nxt)

    async def integrity_check(self) -> str:
        return str(await self._submit(lambda db: db.execute("PRAGMA quick_check").fetchone()[0], write=False))


def _checked(events: Sequence[Mapping[str, Any]]) -> None:
    for fields in events:
        try:
            check_fields(fields)
        except ValueError as exc:
            raise OutboxError(f"event refused: {exc}", code="internal_error") from exc


def _noop(_db: sqlite3.Connection) -> None:
    return None


def _set_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
