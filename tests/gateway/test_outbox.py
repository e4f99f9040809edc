"""The durable outbox: numbering, hash chain, receipts, retention, crashes, a stateful model."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from gateway.errors import OutboxError
from gateway.store.outbox import RESERVE_BYTES, Outbox
from protocols.event_encoding import GENESIS, event_hash, verify_chain

WALL = 1_800_000_000.0


def box(path: Path, **kw) -> Outbox:
    return Outbox(path / "events.sqlite3", gw="gw-1", site="s-1", wall=lambda: WALL, **kw)


async def test_append_numbers_and_chains(tmp_path: Path) -> None:
    async with box(tmp_path) as ob:
        first = await ob.append({"type": "gateway.started"})
        events = [await ob.append({"type": "access.granted", "lock": "lk-1", "sub": "s"}) for _ in range(5)]
        assert first["seq"] == 1 and first["prev"] == GENESIS and first["id"] == f"gw-1/{ob.epoch}/1"
        assert [e["seq"] for e in events] == [2, 3, 4, 5, 6]
        stored = await ob.read(1)
        verify_chain(stored)
        assert stored[-1]["hash"] == event_hash(stored[-1])
        assert ob.stats().backlog == 6


async def test_concurrent_appends_are_gapless(tmp_path: Path) -> None:
    async with box(tmp_path) as ob:
        results = await asyncio.gather(
            *(ob.append({"type": "lock.log", "data": {"i": i}}) for i in range(300))
        )
        assert sorted(e["seq"] for e in results) == list(range(1, 301))
        verify_chain(await ob.read(1, limit=1000))


async def test_epoch_and_chain_survive_restart(tmp_path: Path) -> None:
    async with box(tmp_path) as ob:
        epoch = ob.epoch
        await ob.append({"type": "gateway.started"})
    async with box(tmp_path) as ob:
        assert ob.epoch == epoch
        e = await ob.append({"type": "gateway.started"})
        assert e["seq"] == 2
        verify_chain(await ob.read(1))


async def test_receipts_other_epoch_or_beyond_last_are_ignored(tmp_path: Path) -> None:
    async with box(tmp_path) as ob:
        for _ in range(3):
            await ob.append({"type": "gateway.started"})
        assert not await ob.receipt("other", 2)
        assert not await ob.receipt(ob.epoch, 9)
        assert await ob.receipt(ob.epoch, 2)
        assert not await ob.receipt(ob.epoch, 1)  # never backwards
        assert ob.stats().receipt_seq == 2 and ob.stats().backlog == 1


async def test_retention_prunes_only_receipted_and_old(tmp_path: Path) -> None:
    now = [WALL]
    ob = Outbox(tmp_path / "e.sqlite3", gw="gw-1", site="s-1", wall=lambda: now[0], retention_s=100)
    async with ob:
        for _ in range(4):
            await ob.append({"type": "gateway.started"})
        await ob.receipt(ob.epoch, 2)
        assert await ob.prune() == 0
        now[0] += 101
        assert await ob.prune() == 2
        assert [e["seq"] for e in await ob.read(1)] == [3, 4]
    async with ob.__class__(tmp_path / "e.sqlite3", gw="gw-1", site="s-1", wall=lambda: now[0]) as again:
        await again.receipt(again.epoch, 4)
    async with Outbox(
        tmp_path / "e.sqlite3", gw="gw-1", site="s-1", wall=lambda: now[0] + 10**9, retention_s=1
    ) as again:
        await again.prune()
        assert await again.read(1) == []
        nxt = await again.append({"type": "gateway.started"})
        assert nxt["seq"] == 5  # numbering and chain continue after everything was pruned
        assert nxt["prev"] != GENESIS


async def test_lock_cursor_commits_with_the_events(tmp_path: Path) -> None:
    async with box(tmp_path) as ob:
        assert await ob.lock_cursor("lk-1") == 0
        await ob.append_many(
            [{"type": "lock.manual", "lock": "lk-1", "data": {"lock_seq": 7}}], cursor=("lk-1", 7)
        )
        assert await ob.lock_cursor("lk-1") == 7
        await ob.append_many([], cursor=("lk-1", 3))
        assert await ob.lock_cursor("lk-1") == 7  # never backwards


async def test_D2_wal_and_full_are_asserted(tmp_path: Path) -> None:
    async with box(tmp_path) as ob:
        assert await ob.integrity_check() == "ok"
        db_mode = await ob._submit(lambda db: db.execute("PRAGMA journal_mode").fetchone()[0], write=False)
        sync = await ob._submit(lambda db: db.execute("PRAGMA synchronous").fetchone()[0], write=False)
        assert (db_mode, sync) == ("wal", 2)


async def test_D7_write_failure_stops_the_writer_without_retrying(tmp_path: Path) -> None:
    async with box(tmp_path) as ob:
        await ob.append({"type": "gateway.started"})

        def boom(db):  # an I/O error inside the transaction, as an fsync EIO surfaces
            raise __import__("sqlite3").OperationalError("disk I/O error")

        with pytest.raises(OutboxError, match="writer stopped"):
            await ob._submit(boom, write=True)
        assert not ob.healthy and "outbox_write_failed" in ob.alarms
        with pytest.raises(OutboxError):
            await ob.append({"type": "access.granted"})
    async with box(tmp_path) as ob:  # restart: intact, numbering continues without a gap
        assert await ob.integrity_check() == "ok"
        assert (await ob.append({"type": "gateway.started"}))["seq"] == 2


async def test_D8_full_disk_releases_the_reserve_and_commits(tmp_path: Path) -> None:
    async with box(tmp_path) as ob:
        reserve = tmp_path / "reserve.bin"
        assert reserve.exists()
        calls = {"n": 0}

        def full_once(db):
            calls["n"] += 1
            if calls["n"] == 1:
                raise __import__("sqlite3").OperationalError("database or disk is full")

        await ob._submit(full_once, write=True)
        assert calls["n"] == 2 and "disk_full" in ob.alarms and not reserve.exists()
        assert (await ob.append({"type": "access.granted"}))["seq"] == 1


async def test_D8_low_space_watermark_alarm(tmp_path: Path) -> None:
    async with box(tmp_path, low_space_bytes=2**62) as ob:  # more than any disk has free
        assert ob.alarms == {"disk_low"}  # checked at open, before anything fails
        assert (await ob.append({"type": "access.granted"}))["seq"] == 1
    async with box(tmp_path, low_space_bytes=0) as ob:
        assert not ob.alarms


async def test_D8_reserve_is_made_again_when_space_is_back(tmp_path: Path) -> None:
    async with box(tmp_path, low_space_bytes=0, space_check_s=0) as ob:
        reserve = tmp_path / "reserve.bin"
        reserve.unlink()
        ob.alarms.add("disk_full")  # as after a released reserve; this disk has room
        await ob.append({"type": "access.granted"})
        await ob.read(1)  # the check runs after the commit's answer: wait for the next job
        assert not ob.alarms and reserve.stat().st_size == RESERVE_BYTES


def test_D1_kill_9_at_random_points_loses_nothing_committed(tmp_path: Path) -> None:
    """A child appends and prints each committed seq; after kill -9 every printed seq is stored
    exactly once and the chain is intact (20 iterations; bench/ has the long soak)."""
    script = textwrap.dedent(f"""
        import asyncio, sys
        from pathlib import Path
        from gateway.store.outbox import Outbox
        async def main():
            async with Outbox(Path({str(tmp_path / "k.sqlite3")!r}), gw="gw-1", site="s-1",
                              wall=lambda: 1.8e9) as ob:
                while True:
                    e = await ob.append({{"type": "lock.log"}})
                    print(e["seq"], flush=True)
        asyncio.run(main())
    """)
    import random

    rnd = random.Random(1)
    acked = 0
    for _ in range(20):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        target = rnd.randint(1, 40)
        for _ in range(target):
            line = proc.stdout.readline()
            assert line, "child died"
            acked = max(acked, int(line))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()

    async def check() -> None:
        async with Outbox(tmp_path / "k.sqlite3", gw="gw-1", site="s-1", wall=lambda: WALL) as ob:
            stored = await ob.read(1, limit=10**6)
            seqs = [e["seq"] for e in stored]
            assert seqs == list(range(1, len(seqs) + 1))  # gapless, each exactly once
            assert len(seqs) >= acked  # every acknowledged event survived
            verify_chain(stored)
            assert await ob.integrity_check() == "ok"

    asyncio.run(check())


class OutboxModel(RuleBasedStateMachine):
    """Commit, receipt, prune and crash/reopen in any order: nothing acknowledged is lost,
    numbering stays gapless, receipts never move backwards."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.dir = Path(tempfile.mkdtemp())
        self.loop = asyncio.new_event_loop()
        self.acked: list[int] = []
        self.receipt = 0
        self.ob = self._open()

    def _open(self) -> Outbox:
        ob = Outbox(self.dir / "m.sqlite3", gw="gw-1", site="s-1", wall=lambda: WALL, retention_s=10**9)
        self.loop.run_until_complete(ob.__aenter__())
        return ob

    @rule(n=st.integers(1, 5))
    def commit(self, n: int) -> None:
        events = self.loop.run_until_complete(self.ob.append_many([{"type": "lock.log"}] * n))
        self.acked += [e["seq"] for e in events]

    @rule(data=st.data())
    def receipt_some(self, data: st.DataObject) -> None:
        if self.acked:
            seq = data.draw(st.integers(0, self.acked[-1] + 2))
            moved = self.loop.run_until_complete(self.ob.receipt(self.ob.epoch, seq))
            assert moved == (self.receipt < seq <= self.acked[-1])
            self.receipt = max(self.receipt, seq) if moved else self.receipt

    @rule()
    def crash_and_reopen(self) -> None:
        self.loop.run_until_complete(self.ob.__aexit__(None, None, None))
        self.ob = self._open()

    @invariant()
    def nothing_lost(self) -> None:
        stored = self.loop.run_until_complete(self.ob.read(1, limit=10**6))
        assert [e["seq"] for e in stored] == self.acked
        assert self.ob.stats().receipt_seq == self.receipt
        verify_chain(stored)
        assert all(json.dumps(e) for e in stored)

    def teardown(self) -> None:
        self.loop.run_until_complete(self.ob.__aexit__(None, None, None))
        self.loop.close()


TestOutboxModel = OutboxModel.TestCase
TestOutboxModel.settings = settings(max_examples=30, stateful_step_count=15, deadline=None)
