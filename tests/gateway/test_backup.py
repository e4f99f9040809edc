"""Backup and restore of a stopped gateway's data directory (gateway/store/backup.py); the
running-daemon case is tests/integration/test_backup_restore.py."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import sqlite3
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from credfix import GW, SITE, World
from helpers import SeededRng

from gateway.authz.authorizer import TrustStore, unverified_stored
from gateway.ble.registry import LockRecord, Registry
from gateway.store.backup import (
    DATABASES,
    BackupError,
    BackupSummary,
    _manifest,
    _summarise,
    _write_tar,
    backup,
    read_summary,
    restore,
)
from gateway.store.outbox import Outbox


async def _make(data: Path) -> None:
    reg = Registry(data / "locks.sqlite3")
    reg.put(LockRecord("lk-1", "C0:00:00:00:00:01", "Front", b"k" * 32))
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
        "lk-1", "C0:00:00:00:00:01", "Front", b"k" * 32
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


# --- hostile backup files (attack round 3) -----------------------------------------------------


def _unpack(tar_path: Path, into: Path) -> dict[str, Path]:
    into.mkdir()
    with tarfile.open(tar_path) as tar:
        tar.extractall(into, filter="data")
    return {name: into / name for name in DATABASES}


async def test_a_database_with_a_trigger_is_refused_even_under_a_matching_manifest(tmp_path: Path) -> None:
    """A backup whose events.sqlite3 carries a trigger (here: every new event deletes the
    outbox) has a manifest that matches it, since whoever forged the file wrote both. Restored,
    the daemon's first append would run it and lose every acknowledged event: refused."""
    await _make(tmp_path / "data")
    backup(tmp_path / "data", tmp_path / "b.tar", gw="gw-1", site="s-1")
    for obj in (
        "CREATE TRIGGER wipe AFTER INSERT ON events BEGIN DELETE FROM events; END",
        "CREATE VIEW v AS SELECT * FROM events",
    ):
        copies = _unpack(tmp_path / "b.tar", tmp_path / "x")
        with contextlib.closing(sqlite3.connect(copies["events.sqlite3"])) as db:
            db.execute(obj)
            db.commit()
        summary = _summarise(copies, gw="gw-1", site="s-1", created="2026-12-01T00:00:00Z")
        _write_tar(tmp_path / "evil.tar", _manifest(summary, copies), copies)
        with pytest.raises(BackupError, match=r"holds a (trigger|view)"):
            restore(tmp_path / "evil.tar", tmp_path / "new", gw="gw-1")
        assert not (tmp_path / "new").exists()
        shutil.rmtree(tmp_path / "x")


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar makes the sparse member")
async def test_a_sparse_member_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """A sparse member is a few KiB in the file and its stated size on disk (up to 8 GiB per
    database): a small file that fills the SD card while it is unpacked. Refused at its header."""
    await _make(tmp_path / "data")
    backup(tmp_path / "data", tmp_path / "b.tar", gw="gw-1", site="s-1")
    copies = _unpack(tmp_path / "b.tar", tmp_path / "x")
    big = 64 * 2**20
    os.truncate(copies["events.sqlite3"], big)
    manifest = json.loads((tmp_path / "x" / "manifest.json").read_text())
    manifest["files"]["events.sqlite3"]["bytes"] = big
    (tmp_path / "x" / "manifest.json").write_text(json.dumps(manifest))
    await asyncio.to_thread(
        subprocess.run,
        [
            "tar",
            "--sparse",
            "--format=pax",
            "-cf",
            str(tmp_path / "evil.tar"),
            "-C",
            str(tmp_path / "x"),
            "manifest.json",
            *DATABASES,
        ],
        check=True,
    )
    assert (tmp_path / "evil.tar").stat().st_size < big // 16  # it is sparse
    with pytest.raises(BackupError, match=r"member .events\.sqlite3. is sparse"):
        read_summary(tmp_path / "evil.tar")


async def test_a_forged_lock_record_is_refused(tmp_path: Path) -> None:
    """The daemon trusts its registry: a lock id with topic metacharacters ends up in MQTT topic
    names, a malformed address or link key in every connect. A restored registry is checked
    field by field, as pairing would have made it."""
    await _make(tmp_path / "data")
    backup(tmp_path / "data", tmp_path / "b.tar", gw="gw-1", site="s-1")
    for row in (
        ("lk/#", "C0:00:00:00:00:02", "x", b"k" * 32),
        ("lk-2", "not an address", "x", b"k" * 32),
        ("lk-2", "C0:00:00:00:00:02", "x", b"short"),
        ("lk-2", "C0:00:00:00:00:02", "x" * 5000, b"k" * 32),
    ):
        copies = _unpack(tmp_path / "b.tar", tmp_path / "x")
        with contextlib.closing(sqlite3.connect(copies["locks.sqlite3"])) as db:
            db.execute("INSERT INTO locks VALUES (?, ?, ?, ?)", row)
            db.commit()
        summary = _summarise_unchecked(copies)
        _write_tar(tmp_path / "evil.tar", _manifest(summary, copies), copies)
        with pytest.raises(BackupError, match="malformed lock record"):
            restore(tmp_path / "evil.tar", tmp_path / "new", gw="gw-1")
        assert not (tmp_path / "new").exists()
        shutil.rmtree(tmp_path / "x")


def _summarise_unchecked(copies: dict[str, Path]) -> BackupSummary:
    """The summary a forger writes into the manifest (the lock count, whatever the rows hold)."""
    with contextlib.closing(sqlite3.connect(copies["locks.sqlite3"])) as db:
        locks = int(db.execute("SELECT count(*) FROM locks").fetchone()[0])
    with contextlib.closing(sqlite3.connect(copies["locks.sqlite3"])) as db:
        db.execute("ALTER TABLE locks RENAME TO locks_real")
        db.execute("CREATE TABLE locks AS SELECT * FROM locks_real WHERE 0")
        db.commit()
    try:
        base = _summarise(copies, gw="gw-1", site="s-1", created="2026-12-01T00:00:00Z")
    finally:
        with contextlib.closing(sqlite3.connect(copies["locks.sqlite3"])) as db:
            db.execute("DROP TABLE locks")
            db.execute("ALTER TABLE locks_real RENAME TO locks")
            db.commit()
    return dataclasses.replace(base, locks=locks)


async def test_a_keyring_that_does_not_verify_against_this_sites_roots_is_refused(tmp_path: Path) -> None:
    """Started on a trust store whose keyring does not verify (another site's backup, or one
    whose keyring a forger signed), the daemon uses it anyway, marked stale: whoever signed it
    issues tokens. Restore checks the stored documents against the configured roots first."""
    ours, theirs = World(), World(rng=SeededRng(b"other"))
    await _make(tmp_path / "data")
    store = TrustStore(tmp_path / "data" / "trust.sqlite3")
    store.put_blob("keyring", theirs.keyring())
    store.close()
    backup(tmp_path / "data", tmp_path / "b.tar", gw="gw-1", site="s-1")

    def check(world: World) -> Callable[[Path], None]:
        def run(trust: Path) -> None:
            roots = {world.root.public.kid: world.root.public}
            if bad := unverified_stored(trust, gw_id=GW, site=SITE, roots=roots, policy=world.policy):
                raise BackupError(f"holds a {', '.join(bad)} that does not verify")

        return run

    with pytest.raises(BackupError, match="holds a keyring that does not verify"):
        restore(tmp_path / "b.tar", tmp_path / "new", gw="gw-1", trust_check=check(ours))
    assert not (tmp_path / "new").exists()
    restore(tmp_path / "b.tar", tmp_path / "new", gw="gw-1", trust_check=check(theirs))
    assert (tmp_path / "new" / "trust.sqlite3").exists()


async def test_a_backup_written_into_the_data_directory_is_refused(tmp_path: Path) -> None:
    """``--out DATA_DIR/events.sqlite3`` (a slip of the keyboard) renamed the tar over the live
    outbox: every acknowledged event gone. Nothing is written into the data directory."""
    await _make(tmp_path / "data")
    before = {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()}
    for out in ("events.sqlite3", "locks.sqlite3", "b.tar", "sub/../events.sqlite3"):
        with pytest.raises(BackupError, match="inside the data directory"):
            backup(tmp_path / "data", tmp_path / "data" / out, gw="gw-1", site="s-1")
    assert {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()} == before
