"""Backup and restore of a stopped gateway's data directory (gateway/store/backup.py); the
running-daemon case is tests/integration/test_backup_restore.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.authz.authorizer import TrustStore
from gateway.ble.registry import LockRecord, Registry
from gateway.store.backup import BackupError, backup, read_summary, restore
from gateway.store.outbox import Outbox


async def _make(data: Path) -> None:
    reg = Registry(data / "locks.sqlite3")
    reg.put(LockRecord("lk-1", "C0:00:00:00:00:01", "Front", b"k" * 16))
    reg.close()
    store = TrustStore(data / "trust.sqlite3")
    store.put_num("floor", 1)
    store.close()
    async with Outbox(data / "events.sqlite3", gw="gw-1", site="s-1", wall=lambda: 1.8e9) as ob:
        for _ in range(5):
            await ob.append({"type": "gateway.started", "time_state": "synced", "trust_state": "ok"})
        await ob.receipt(ob.epoch, 2)


async def test_a_stopped_gateway_backs_up_and_restores_onto_an_empty_directory(tmp_path: Path) -> None:
    data = tmp_path / "data"
    await _make(data)
    assert not list(data.glob("*-shm"))  # closed cleanly: the read-only open must still work
    before = {p.name for p in data.iterdir()}
    s = backup(data, tmp_path / "b.tar", gw="gw-1", site="s-1")
    assert {p.name for p in data.iterdir()} == before  # the backup wrote nothing there
    assert (s.locks, s.trust_entries, s.last_seq, s.receipt_seq, s.unreceipted) == (1, 1, 5, 2, 3)
    assert read_summary(tmp_path / "b.tar") == s
    with pytest.raises(BackupError, match="gateway 'gw-1'; this configuration is 'gw-2'"):
        restore(tmp_path / "b.tar", tmp_path / "new", gw="gw-2")
    assert not (tmp_path / "new").exists()
    (tmp_path / "new").mkdir()
    got, aside = restore(tmp_path / "b.tar", tmp_path / "new", gw="gw-1")
    assert got == s and aside is None
    assert Registry(tmp_path / "new" / "locks.sqlite3").get("lk-1") == LockRecord(
        "lk-1", "C0:00:00:00:00:01", "Front", b"k" * 16
    )
    async with Outbox(tmp_path / "new" / "events.sqlite3", gw="gw-1", site="s-1", wall=lambda: 1.8e9) as ob:
        assert (ob.epoch, ob.stats().last_seq, ob.stats().receipt_seq) == (s.epoch, 5, 2)
        assert (await ob.append({"type": "gateway.started", "time_state": "synced", "trust_state": "ok"}))[
            "seq"
        ] == 6


async def test_force_moves_the_old_contents_aside_and_never_deletes_them(tmp_path: Path) -> None:
    await _make(tmp_path / "data")
    backup(tmp_path / "data", tmp_path / "b.tar", gw="gw-1", site="s-1")
    with pytest.raises(BackupError, match="not empty"):
        restore(tmp_path / "b.tar", tmp_path / "data", gw="gw-1")
    _, aside = restore(tmp_path / "b.tar", tmp_path / "data", gw="gw-1", force=True)
    assert aside is not None and (aside / "locks.sqlite3").exists()
    assert (tmp_path / "data" / "events.sqlite3").exists()


def test_backup_of_a_directory_without_databases_says_so(tmp_path: Path) -> None:
    with pytest.raises(BackupError, match="nothing to back up"):
        backup(tmp_path, tmp_path / "b.tar", gw="gw-1", site="s-1")


async def test_new_epoch_restores_the_locks_and_trust_but_not_the_events(tmp_path: Path) -> None:
    await _make(tmp_path / "data")
    s = backup(tmp_path / "data", tmp_path / "b.tar", gw="gw-1", site="s-1")
    restore(tmp_path / "b.tar", tmp_path / "new", gw="gw-1", new_epoch=True)
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["locks.sqlite3", "trust.sqlite3"]
    async with Outbox(tmp_path / "new" / "events.sqlite3", gw="gw-1", site="s-1", wall=lambda: 1.8e9) as ob:
        assert ob.epoch != s.epoch and ob.stats().last_seq == 0
