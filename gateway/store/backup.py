"""Backup and restore of a gateway's state: the lock registry (link keys), the trust store and
the outbox, in one file (``lockgw backup`` / ``lockgw restore``, docs/operations.md).

**Online, without the daemon's help.** While the daemon runs, each database is opened read-only
(``mode=ro``, sharing the daemon's ``-shm``) and copied with SQLite's online backup API in one
step, which holds one read transaction: in WAL mode a consistent snapshot of that database while
the daemon keeps writing. Without a daemon the backup holds the data directory's lock (no
daemon starts meanwhile) and copies the files, with any ``-wal`` a crash left, to a temporary
directory first and backs up from there. Either way nothing is created in the data directory
(run as root, a new ``-shm`` or ``.lock`` would be root's and lock the daemon out).
The three are copied one after the other (locks, trust, events), so a
pairing that completes during the backup may be in the events and not yet in the registry; the
summary says what the file holds, and a second run picks it up. Whether the daemon runs or not
makes no difference, which is why this does not go through the control socket.

**The file** is an uncompressed tar (mode 0600, written to a temporary name, fsynced, renamed):
``manifest.json`` first (format, version, gateway, site, the summary, and the SHA-256 and size
of each database), then ``locks.sqlite3``, ``trust.sqlite3``, ``events.sqlite3``. It holds the
locks' link keys: **it is a secret** — whoever has it can open a session with every lock of the
site. Keep it encrypted at rest and off the gateway.

**Restore** never trusts the file: only the four exact member names, regular files, bounded
sizes; each database is written to a staging directory next to the data directory, its hash
checked against the manifest, then ``PRAGMA integrity_check``, the expected tables, the
epoch, a gap-free hash chain of the events and a summary equal to the manifest's. Only then is
the staging directory renamed onto the data directory (one ``rename(2)``; a non-empty data
directory is first renamed aside with ``--force``, never deleted), so a failure at any point
leaves the data directory as it was.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import sqlite3
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Final

from gateway.durable import fsync_dir
from gateway.errors import AdapterUnavailable, LockgwError
from gateway.wire import WireError, loads_bounded
from protocols.errors import RemoteProtocolError
from protocols.event_encoding import event_hash
from protocols.messages import validate_id
from protocols.session import LTK_LEN

__all__ = ["BackupError", "BackupSummary", "backup", "read_summary", "restore"]

FORMAT: Final = "lockgw-backup"
VERSION: Final = 1
MANIFEST: Final = "manifest.json"
#: The databases, in the order they are copied and stored.
DATABASES: Final = ("locks.sqlite3", "trust.sqlite3", "events.sqlite3")
MAX_MANIFEST_BYTES: Final = 64 * 1024
#: A database larger than this is not one of ours (the outbox prunes receipted events after 30 days).
MAX_DATABASE_BYTES: Final = 8 * 2**30
_TABLES: Final = {
    "locks.sqlite3": {"locks"},
    "trust.sqlite3": {"trust"},
    "events.sqlite3": {"meta", "events", "lock_cursor", "forwarded"},
}
_CHUNK: Final = 1 << 20
_ADDRESS: Final = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")
#: A lock's name as pairing stores it (the CLI and MQTT bound it far below this).
MAX_LOCK_NAME: Final = 1024


class BackupError(LockgwError):
    """A backup that cannot be made, or a file that is not a backup this gateway can restore."""

    code = "backup_invalid"


@dataclass(frozen=True, slots=True)
class BackupSummary:
    """What a backup holds (also what ``lockgw backup`` and ``lockgw restore`` print)."""

    gw: str
    site: str
    created: str
    locks: int
    trust_entries: int
    epoch: str
    first_seq: int
    last_seq: int
    receipt_seq: int
    events: int

    @property
    def unreceipted(self) -> int:
        return self.last_seq - self.receipt_seq

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "unreceipted": self.unreceipted}


# --- backup -----------------------------------------------------------------------------------


def backup(data_dir: Path, out: Path, *, gw: str, site: str) -> BackupSummary:
    """Copy the three databases of ``data_dir`` into the backup file ``out`` (0600)."""
    for name in DATABASES:
        if not (data_dir / name).is_file():
            raise BackupError(f"{data_dir / name} does not exist: nothing to back up (wrong data_dir?)")
    out = out.absolute()
    if Path(os.path.realpath(out)).is_relative_to(os.path.realpath(data_dir)):
        # Renamed into place, the tar would replace a live database (--out DATA_DIR/events.sqlite3).
        raise BackupError(f"{out} is inside the data directory {data_dir}; write the backup elsewhere")
    if out.is_dir():
        raise BackupError(f"{out} is a directory; give a file name (--out FILE)")
    with tempfile.TemporaryDirectory(prefix="lockgw-backup-") as tmp, _daemon_or_hold(data_dir) as running:
        copies = {name: Path(tmp) / name for name in DATABASES}
        for name, copy in copies.items():
            _copy_db(data_dir / name, copy, live=running)
        summary = _summarise(copies, gw=gw, site=site, created=_now())
        manifest = _manifest(summary, copies)
        _write_tar(out, manifest, copies)
    return summary


@contextlib.contextmanager
def _daemon_or_hold(data_dir: Path) -> Iterator[bool]:
    """True while a daemon holds the data directory; else hold its lock ourselves (False), so
    that no daemon starts writing while the files are copied."""
    lock = data_dir / ".lock"
    if not lock.exists():  # the daemon makes it before it opens anything; never made here (owner)
        yield False
        return
    fd = os.open(lock, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield True
        else:
            yield False
    finally:
        os.close(fd)


def _copy_db(src: Path, dst: Path, *, live: bool) -> None:
    """A consistent copy of ``src`` in ``dst``. With the daemon running, the database is open and
    its ``-shm`` exists: a read-only connection shares it and reads one snapshot. Without it,
    the files (and a ``-wal`` a crash left) are first copied aside and opened there, so nothing
    is ever created in the data directory (a root-owned ``-shm`` would lock the daemon out)."""
    try:
        if live:
            source = sqlite3.connect(f"{src.absolute().as_uri()}?mode=ro", uri=True)
        else:
            aside = dst.with_name(dst.name + ".src")
            shutil.copyfile(src, aside)
            wal = src.with_name(src.name + "-wal")
            if wal.exists():
                shutil.copyfile(wal, aside.with_name(aside.name + "-wal"))
            source = sqlite3.connect(aside)
        with contextlib.closing(source) as s, contextlib.closing(sqlite3.connect(dst)) as d:
            s.backup(d)  # pages=-1: one step, one read transaction, one snapshot
            d.execute("PRAGMA journal_mode=DELETE")  # a self-contained file, no -wal beside it
    except (sqlite3.Error, OSError) as exc:
        raise BackupError(f"cannot copy {src}: {exc}") from exc
    dst.chmod(0o600)


def _manifest(summary: BackupSummary, copies: dict[str, Path]) -> bytes:
    files = {name: {"sha256": _sha256(path), "bytes": path.stat().st_size} for name, path in copies.items()}
    body = {"format": FORMAT, "version": VERSION, "summary": summary.as_json(), "files": files}
    return json.dumps(body, indent=1, sort_keys=True).encode()


def _write_tar(out: Path, manifest: bytes, copies: dict[str, Path]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            with tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tar:
                info = _info(MANIFEST, len(manifest))
                tar.addfile(info, io.BytesIO(manifest))
                for name, path in copies.items():
                    with path.open("rb") as src:
                        tar.addfile(_info(name, path.stat().st_size), src)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(out)
        fsync_dir(out.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o600, int(dt.datetime.now(dt.UTC).timestamp())
    return info


# --- reading and checking a backup ---------------------------------------------------------------


def read_summary(path: Path) -> BackupSummary:
    """Verify a backup file completely (as restore does) and return what it holds."""
    with tempfile.TemporaryDirectory(prefix="lockgw-verify-") as tmp:
        return _unpack_verified(path, Path(tmp))


def _unpack_verified(path: Path, into: Path) -> BackupSummary:  # noqa: C901, PLR0912 - one check per way a file can be wrong
    """Unpack ``path`` into the empty directory ``into`` and verify everything; BackupError
    names the first thing wrong."""
    try:
        tar = tarfile.open(path, mode="r:")  # noqa: SIM115 - closed below; no compression, no streams
    except FileNotFoundError as exc:
        raise BackupError(f"{path}: no such file") from exc
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BackupError(f"{path}: not a lockgw backup (not a tar file: {exc})") from exc
    with tar:
        manifest: dict[str, Any] | None = None
        seen: list[str] = []
        try:
            for member in tar:
                name = member.name
                if name not in (MANIFEST, *DATABASES) or name in seen:
                    raise BackupError(f"{path}: unexpected member {name[:80]!r}; not a lockgw backup")
                if not member.isreg():
                    raise BackupError(f"{path}: member {name!r} is not a regular file")
                if member.issparse():  # a few KiB in the file, its full stated size on disk
                    raise BackupError(f"{path}: member {name!r} is sparse; lockgw backups never are")
                if name == MANIFEST:
                    if seen:
                        raise BackupError(f"{path}: the manifest must come first")
                    if member.size > MAX_MANIFEST_BYTES:
                        raise BackupError(f"{path}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
                    manifest = _parse_manifest(path, _read_member(tar, member))
                else:
                    if manifest is None:
                        raise BackupError(f"{path}: the manifest must come first")
                    want = manifest["files"][name]
                    if member.size != want["bytes"] or member.size > MAX_DATABASE_BYTES:
                        raise BackupError(
                            f"{path}: {name} is {member.size} bytes, the manifest says {want['bytes']}"
                        )
                    digest = _extract(tar, member, into / name)
                    if digest != want["sha256"]:
                        raise BackupError(f"{path}: {name} does not match its checksum (damaged or altered)")
                seen.append(name)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise BackupError(f"{path}: damaged or truncated ({exc})") from exc
    missing = [n for n in (MANIFEST, *DATABASES) if n not in seen]
    if missing or manifest is None:
        raise BackupError(f"{path}: incomplete backup (missing {', '.join(missing)}); truncated?")
    stated = manifest["summary"]
    copies = {name: into / name for name in DATABASES}
    for name, copy in copies.items():
        _check_db(path, name, copy)
    summary = _summarise(copies, gw=stated["gw"], site=stated["site"], created=stated["created"])
    if summary.as_json() != stated:
        raise BackupError(f"{path}: the databases do not hold what the manifest says")
    return summary


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    fh = tar.extractfile(member)
    if fh is None:
        raise BackupError(f"member {member.name!r} has no data")
    with fh:
        data = fh.read(member.size + 1)
    if len(data) != member.size:
        raise BackupError(f"member {member.name!r} is truncated")
    return data


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, dst: Path) -> str:
    fh = tar.extractfile(member)
    if fh is None:
        raise BackupError(f"member {member.name!r} has no data")
    digest, n = hashlib.sha256(), 0
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with fh, os.fdopen(fd, "wb") as out:
        while chunk := fh.read(_CHUNK):
            n += len(chunk)
            if n > member.size:
                break
            digest.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    if n != member.size:
        raise BackupError(f"member {member.name!r} is truncated")
    return digest.hexdigest()


def _parse_manifest(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        body = loads_bounded(raw, max_bytes=MAX_MANIFEST_BYTES)
    except WireError as exc:
        raise BackupError(f"{path}: manifest is not valid JSON ({exc})") from exc
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise BackupError(f"{path}: not a lockgw backup (manifest format is not {FORMAT!r})")
    if body.get("version") != VERSION:
        raise BackupError(
            f"{path}: backup format version {body.get('version')!r}; this lockgw reads {VERSION}"
        )
    files, summary = body.get("files"), body.get("summary")
    if not isinstance(files, dict) or set(files) != set(DATABASES):
        raise BackupError(f"{path}: manifest must list exactly {', '.join(DATABASES)}")
    for name, entry in files.items():
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not isinstance(entry.get("bytes"), int)
            or isinstance(entry.get("bytes"), bool)
            or not 0 < entry["bytes"] <= MAX_DATABASE_BYTES
        ):
            raise BackupError(f"{path}: manifest entry for {name} is malformed")
    fields = set(BackupSummary.__dataclass_fields__) | {"unreceipted"}
    if not isinstance(summary, dict) or set(summary) != fields:
        raise BackupError(f"{path}: manifest summary is malformed")
    for key in ("gw", "site", "created", "epoch"):
        if not isinstance(summary[key], str) or not 0 < len(summary[key]) <= 128:
            raise BackupError(f"{path}: manifest summary.{key} is malformed")
    return body


def _check_db(path: Path, name: str, copy: Path) -> None:
    try:
        with contextlib.closing(sqlite3.connect(f"{copy.as_uri()}?mode=ro", uri=True)) as db:
            result = db.execute("PRAGMA integrity_check").fetchone()[0]
            if result != "ok":
                raise BackupError(f"{path}: {name} fails SQLite's integrity check ({result})")
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            # A trigger runs inside the daemon's own writes (one on INSERT INTO events could delete
            # the outbox); a view can shadow nothing we read but is no part of our schema either.
            code = db.execute(
                "SELECT type, name FROM sqlite_master WHERE type IN ('trigger', 'view') LIMIT 1"
            ).fetchone()
    except sqlite3.Error as exc:
        raise BackupError(f"{path}: {name} is not a readable SQLite database ({exc})") from exc
    if code is not None:
        raise BackupError(f"{path}: {name} holds a {code[0]} ({str(code[1])[:40]!r}); lockgw's never do")
    if not _TABLES[name] <= tables:
        raise BackupError(f"{path}: {name} lacks the tables {sorted(_TABLES[name] - tables)}")


def _summarise(copies: dict[str, Path], *, gw: str, site: str, created: str) -> BackupSummary:
    """Counts, epoch and seqs of copied databases; checks the outbox's numbering and chain."""
    try:
        with contextlib.closing(
            sqlite3.connect(f"{copies['locks.sqlite3'].as_uri()}?mode=ro", uri=True)
        ) as db:
            locks = int(db.execute("SELECT count(*) FROM locks").fetchone()[0])
            for lock, address, name, ltk in db.execute("SELECT lock, address, name, ltk FROM locks"):
                if not _lock_record_ok(lock, address, name, ltk):
                    raise BackupError(f"locks.sqlite3 holds a malformed lock record ({str(lock)[:40]!r})")
        with contextlib.closing(
            sqlite3.connect(f"{copies['trust.sqlite3'].as_uri()}?mode=ro", uri=True)
        ) as db:
            trust_entries = int(db.execute("SELECT count(*) FROM trust").fetchone()[0])
        with contextlib.closing(
            sqlite3.connect(f"{copies['events.sqlite3'].as_uri()}?mode=ro", uri=True)
        ) as db:
            meta = {str(k): str(v) for k, v in db.execute("SELECT key, value FROM meta")}
            epoch, receipt = meta.get("epoch"), meta.get("receipt_seq", "0")
            first, last, count = db.execute("SELECT min(seq), max(seq), count(*) FROM events").fetchone()
            head_seq, head_hash = _head(meta.get("head"))
            _check_chain(db, first, last, count, head_seq, head_hash)
    except sqlite3.Error as exc:
        raise BackupError(f"cannot read the databases: {exc}") from exc
    if not epoch:
        raise BackupError("events.sqlite3 has no epoch")
    if not receipt.isdigit():
        raise BackupError("events.sqlite3 has a malformed receipt_seq")
    last_seq = int(last) if last is not None else head_seq
    if int(receipt) > last_seq:
        raise BackupError("events.sqlite3: receipt_seq beyond the last event")
    return BackupSummary(
        gw=gw,
        site=site,
        created=created,
        locks=locks,
        trust_entries=trust_entries,
        epoch=epoch,
        first_seq=int(first) if first is not None else 0,
        last_seq=last_seq,
        receipt_seq=int(receipt),
        events=int(count),
    )


def _lock_record_ok(lock: object, address: object, name: object, ltk: object) -> bool:
    """A registry row as pairing makes it: the daemon puts the id into MQTT topic names and the
    address and link key into every connect, and never checks them again."""
    try:
        validate_id(lock, "lock")
    except RemoteProtocolError:
        return False
    return (
        isinstance(address, str)
        and _ADDRESS.fullmatch(address) is not None
        and isinstance(name, str)
        and len(name) <= MAX_LOCK_NAME
        and "\x00" not in name
        and isinstance(ltk, bytes)
        and len(ltk) == LTK_LEN
    )


def _head(raw: str | None) -> tuple[int, str | None]:
    if raw is None:
        return 0, None
    seq, _, digest = raw.partition(":")
    if not seq.isdigit():
        raise BackupError("events.sqlite3 has a malformed chain head")
    return int(seq), digest


def _check_chain(  # noqa: PLR0917 - the facts one chain check needs
    db: sqlite3.Connection,
    first: int | None,
    last: int | None,
    count: int,
    head_seq: int,
    head_hash: str | None,
) -> None:
    if first is None or last is None:
        return
    if last - first + 1 != count:
        raise BackupError(f"events.sqlite3: seq {first}..{last} has gaps ({count} events)")
    prev: str | None = head_hash if head_seq == first - 1 else None
    for seq, raw, stored in db.execute("SELECT seq, json, hash FROM events ORDER BY seq"):
        try:
            event = json.loads(raw)
        except (TypeError, ValueError) as exc:
            raise BackupError(f"events.sqlite3: event {seq} is not JSON") from exc
        if not isinstance(event, dict) or event.get("seq") != seq or event.get("hash") != stored:
            raise BackupError(f"events.sqlite3: event {seq} does not match its row")
        if (prev is not None and event.get("prev") != prev) or event_hash(event) != stored:
            raise BackupError(f"events.sqlite3: the hash chain breaks at seq {seq}")
        prev = stored


# --- restore ----------------------------------------------------------------------------------


def restore(
    path: Path,
    data_dir: Path,
    *,
    gw: str,
    force: bool = False,
    new_epoch: bool = False,
    trust_check: Callable[[Path], None] | None = None,
) -> tuple[BackupSummary, Path | None]:
    """Restore the backup ``path`` onto ``data_dir``; returns what it held and where the previous
    contents went (``--force`` on a non-empty directory), or None. With ``new_epoch`` only the
    locks and the trust store come back: the daemon starts a new outbox (a new epoch), for a
    backup older than what central already has (docs/operations.md). ``trust_check`` is
    given the verified trust store before anything moves and raises :class:`BackupError` to
    refuse it (the CLI checks its documents against the configured root keys)."""
    data_dir = data_dir.absolute()
    parent = data_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _no_daemon(data_dir):
        if data_dir.exists() and not data_dir.is_dir():
            raise BackupError(f"{data_dir} is not a directory")
        present = sorted(p.name for p in data_dir.iterdir()) if data_dir.exists() else []
        leftovers = [name for name in present if name != ".lock"]  # a lock file alone holds no state
        if leftovers and not force:
            raise BackupError(
                f"{data_dir} is not empty ({', '.join(leftovers[:5])}); restore onto an empty data "
                "directory, or add --force to move what is there aside (it is kept, never deleted)"
            )
        staging = Path(tempfile.mkdtemp(prefix=f".{data_dir.name}.restoring-", dir=parent))
        try:
            summary = _unpack_verified(path, staging)
            if summary.gw != gw:
                raise BackupError(
                    f"{path} is a backup of gateway {summary.gw!r}; this configuration is {gw!r} "
                    "(restore it with that gateway's configuration)"
                )
            if trust_check is not None:
                trust_check(staging / "trust.sqlite3")
            if new_epoch:
                (staging / "events.sqlite3").unlink()
            aside = _swap(staging, data_dir, keep_old=bool(present))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return summary, aside


def _swap(staging: Path, data_dir: Path, *, keep_old: bool) -> Path | None:
    """Rename the verified staging directory onto ``data_dir`` (one rename(2)); with old contents,
    first rename ``data_dir`` aside. The data directory's mode and owner carry over."""
    aside: Path | None = None
    if data_dir.exists():
        st = data_dir.stat()
        staging.chmod(st.st_mode & 0o7777)
        if os.geteuid() == 0:
            os.chown(staging, st.st_uid, st.st_gid)
            for child in staging.iterdir():
                os.chown(child, st.st_uid, st.st_gid)
    else:
        staging.chmod(0o700)
    try:
        if keep_old:
            stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
            aside = data_dir.with_name(f"{data_dir.name}.before-restore-{stamp}")
            data_dir.rename(aside)
        staging.replace(data_dir)  # an empty directory is replaced atomically; else it is absent
    except OSError as exc:
        if aside is not None and not data_dir.exists():
            aside.rename(data_dir)  # put it back: nothing changed
            aside = None
        raise BackupError(
            f"cannot move the restored state into {data_dir}: {exc.strerror or exc} (a mount point "
            "cannot be replaced: point [gateway] data_dir at a directory inside it)"
        ) from exc
    fsync_dir(data_dir.parent)
    return aside


@contextlib.contextmanager
def _no_daemon(data_dir: Path) -> Iterator[None]:
    """Hold the data directory's lock (as the daemon does) for the restore: refuse if it is held."""
    lock = data_dir / ".lock"
    if not lock.exists():
        yield
        return
    fd = os.open(lock, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            # Exit 3 (CONTRACT §6: the daemon is busy), as for any command the daemon's lock refuses.
            raise AdapterUnavailable(
                f"{data_dir} is in use by the daemon (pid {other}); stop it first: systemctl stop lockgw"
            ) from exc
        yield
    finally:
        os.close(fd)


# --- small helpers ------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        fh_io: IO[bytes] = fh
        while chunk := fh_io.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
