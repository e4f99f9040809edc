"""The gateway's authorization service: the pure :class:`protocols.credentials.Authority`
plus the OS clock, persistence and the results the event layer turns into events.

State that must survive kill -9 and reboot lives in ``trust.sqlite3`` in the data directory
(WAL, ``synchronous=FULL``, asserted at open): the installed keyring and revocation list (their
exact signed bytes) each with the key that verified it at install, the highest version ever
installed per kind (the rollback floor), the last root-signed time reset, the time floor and
the saved wall clock. Every install is one transaction; the floor and the version floors are
written with ``max()`` in SQL so that even a stale writer cannot lower them — only a
root-signed reset writes a lower floor. At start the stored documents are restored as they
were verified (``Authority.restore``): a rotation that retired the key that signed the
revocation list does not drop it, and one that no longer verifies is an alarm and
``trust_state: "stale"``, never silently ``ok``. Challenges keep no state but a per-boot secret
(see ``Challenges``): a restart invalidates every nonce issued before it.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Final

from gateway.authz.clock import Clock, SystemClock
from gateway.authz.keyfiles import load_root_keys
from gateway.errors import OutboxError
from protocols import cbor
from protocols.cose import ContentType, CoseKey, decode_key
from protocols.credentials import (
    Authority,
    Decision,
    Expiry,
    InstallResult,
    Keyring,
    Policy,
    RevocationList,
    TimeView,
)
from protocols.errors import CborError, CredentialError, TrustDocumentError

__all__ = [
    "RELEASE_FLOOR",
    "Authorizer",
    "DocumentKind",
    "InstallOutcome",
    "TrustStore",
    "load_root_keys",
    "unverified_stored",
]

#: The starting time floor: this release's date (2026-11-22T00:00:00Z). A device that boots at
#: 1970 with no network still knows it is at least this late.
RELEASE_FLOOR: Final = 1_795_305_600

#: How often the wall clock is saved (s): it only detects a clock that went backwards.
SAVE_WALL_EVERY_S: Final = 60


class TrustStore:
    """SQLite persistence of the trust state (one small table)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            mode = self._db.execute("PRAGMA journal_mode").fetchone()[0]
            sync = self._db.execute("PRAGMA synchronous").fetchone()[0]
            if mode != "wal" or sync != 2:
                raise OutboxError(f"{path}: SQLite refused WAL/FULL (got {mode}/{sync})")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS trust (name TEXT PRIMARY KEY, blob BLOB, num INTEGER)"
            )
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot open trust store {path}: {exc}") from exc

    def close(self) -> None:
        self._db.close()

    def get_blob(self, name: str) -> bytes | None:
        row = self._db.execute("SELECT blob FROM trust WHERE name = ?", (name,)).fetchone()
        return bytes(row[0]) if row and row[0] is not None else None

    def get_num(self, name: str) -> int | None:
        row = self._db.execute("SELECT num FROM trust WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row and row[0] is not None else None

    def put_blob(self, name: str, value: bytes) -> None:
        self._write(_PUT_BLOB, (name, value))

    def put_num(self, name: str, value: int) -> None:
        self._write(_PUT_NUM, (name, value))

    def raise_num(self, name: str, value: int) -> None:
        """Store ``max(stored, value)``: the floor never decreases, whoever writes."""
        self._write(_RAISE_NUM, (name, value))

    def commit(
        self,
        *,
        blobs: Mapping[str, bytes] | None = None,
        nums: Mapping[str, int] | None = None,
        raise_nums: Mapping[str, int] | None = None,
    ) -> None:
        """Several values in one transaction: a document, its signer and its version floor
        are never stored apart."""
        ops: list[tuple[str, tuple[object, ...]]] = []
        ops += [(_PUT_BLOB, (k, v)) for k, v in (blobs or {}).items()]
        ops += [(_PUT_NUM, (k, v)) for k, v in (nums or {}).items()]
        ops += [(_RAISE_NUM, (k, v)) for k, v in (raise_nums or {}).items()]
        self._write_many(ops)

    def _write(self, sql: str, args: tuple[object, ...]) -> None:
        self._write_many([(sql, args)])

    def _write_many(self, ops: list[tuple[str, tuple[object, ...]]]) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            for sql, args in ops:
                self._db.execute(sql, args)
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise OutboxError(f"trust store write failed: {exc}") from exc


_PUT_BLOB: Final = (
    "INSERT INTO trust (name, blob) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET blob = excluded.blob"
)
_PUT_NUM: Final = (
    "INSERT INTO trust (name, num) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET num = excluded.num"
)
_RAISE_NUM: Final = (
    "INSERT INTO trust (name, num) VALUES (?, ?) "
    "ON CONFLICT(name) DO UPDATE SET num = max(coalesce(num, excluded.num), excluded.num)"
)


class DocumentKind(StrEnum):
    """Which trust document an install was about (``unknown``: not one we could tell)."""

    KEYRING = "keyring"
    REVOCATIONS = "revocations"
    TIME = "time"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class InstallOutcome:
    """What happened to an offered document, ready for a trust.installed / trust.rejected event."""

    kind: DocumentKind
    installed: bool
    rejected: bool
    code: str | None = None
    message: str = ""
    version: int | None = None
    exp: int | None = None
    alarm: str | None = None
    expiring: list[Expiry] = field(default_factory=list)


_KIND: Final = {
    ContentType.KEYRING: DocumentKind.KEYRING,
    ContentType.REVOCATIONS: DocumentKind.REVOCATIONS,
    ContentType.TIME: DocumentKind.TIME,
}
#: Stored documents, in restore order (a legacy revocation list is checked against the keyring).
_STORED: Final = (
    ("keyring", ContentType.KEYRING),
    ("revocations", ContentType.REVOCATIONS),
    ("time.reset", ContentType.TIME),
)


class Authorizer:
    def __init__(
        self,
        *,
        gw_id: str,
        site: str,
        roots: Mapping[bytes, CoseKey],
        policy: Policy,
        store: TrustStore,
        clock: Clock | None = None,
        release_floor: int = RELEASE_FLOOR,
        nonce_secret: bytes | None = None,
    ) -> None:
        self.clock: Clock = clock or SystemClock()
        self.store = store
        floor = max(release_floor, store.get_num("floor") or 0)
        self.core = Authority(
            gw_id=gw_id,
            site=site,
            roots=roots,
            policy=policy,
            floor=floor,
            saved_wall=store.get_num("saved_wall"),
            nonce_secret=nonce_secret or os.urandom(32),  # per boot: a restart voids every nonce
        )
        core = self.core
        for name, kind in _STORED[:2]:
            version = store.get_num(f"{name}.version")
            if version is not None:
                core.version_floor[kind] = version
        for name, kind in _STORED:
            raw = store.get_blob(name)
            if raw is None:
                continue
            core.restore(raw, kind=kind, signer=_stored_key(store.get_blob(f"{name}.signer")))
        # A store written before version floors were kept gets them from what it restored.
        self.store.commit(
            raise_nums={
                "floor": core.time.floor,
                **{f"{n}.version": core.version_floor[k] for n, k in _STORED[:2] if k in core.version_floor},
            }
        )

    def close(self) -> None:
        self.store.close()

    # -- time ----------------------------------------------------------------------------------

    def time_view(self) -> TimeView:
        return self.core.time.view(wall=self.clock.wall(), synced=self.clock.synced())

    def save_wall_clock(self) -> None:
        """Periodic: remember the clock while it is synchronised (detects backwards steps)."""
        if self.clock.synced():
            wall = int(self.clock.wall())
            self.store.put_num("saved_wall", wall)
            self.core.time.saved_wall = wall

    @property
    def alarms(self) -> list[str]:
        view = self.time_view()
        out = sorted(self.core.time.alarms)
        out += sorted(f"stored_{_KIND[kind]}_unverified" for kind in self.core.unverified)
        trust = self.core.trust_state(view.now)
        if trust != "ok":
            out.append(f"trust_{trust}")
        return out

    # -- trust documents ---------------------------------------------------------------------

    def install(self, raw: bytes) -> InstallOutcome:
        """Offer a signed document (from MQTT, a phone's request or ``trust install``)."""
        try:
            result = self.core.install(raw, wall=self.clock.wall(), synced=self.clock.synced())
        except TrustDocumentError as exc:
            kind = _kind_of(raw)
            return InstallOutcome(kind, installed=False, rejected=True, code=exc.code, message=str(exc))
        self._persist(result)
        doc = result.document
        return InstallOutcome(
            _KIND[result.kind],
            installed=result.installed,
            rejected=False,
            version=getattr(doc, "version", None),
            exp=getattr(doc, "exp", None),
            alarm=result.alarm,
            expiring=self.core.expiring(self.time_view().now) if result.installed else [],
        )

    def _persist(self, result: InstallResult) -> None:
        """One transaction: the document, the key that verified it, its version floor, the floor."""
        doc, floor = result.document, self.core.time.floor
        if not result.installed:
            return
        signer = cbor.dumps(result.signer.to_cbor()) if result.signer is not None else b""
        if isinstance(doc, Keyring | RevocationList):
            name = _KIND[result.kind]
            self.store.commit(
                blobs={name: doc.raw, f"{name}.signer": signer},
                raise_nums={f"{name}.version": doc.version, "floor": floor},
            )
        elif doc.reset:
            nums = {"floor": floor}  # a reset may lower it: written as is
            if self.core.time.saved_wall is not None:
                nums["saved_wall"] = self.core.time.saved_wall
            self.store.commit(blobs={"time.reset": doc.raw, "time.reset.signer": signer}, nums=nums)
        else:
            self.store.raise_num("floor", floor)

    # -- decisions -----------------------------------------------------------------------------

    def challenge(self, *, lock: str, action: str) -> bytes:
        return self.core.challenge(lock=lock, action=action, mono=self.clock.mono(), rng=os.urandom)

    def decide(self, token: bytes, proof: bytes | None, *, lock: str, action: str) -> Decision:
        """Raises TokenError (contract code) on refusal. No token moves the time floor (§8.7)."""
        return self.core.decide(
            token,
            proof,
            lock=lock,
            action=action,
            wall=self.clock.wall(),
            synced=self.clock.synced(),
            mono=self.clock.mono(),
        )

    def trust_summary(self) -> dict[str, object]:
        """The ``trust show`` object (CONTRACT §8.3)."""
        kr, rl, view = self.core.keyring, self.core.revocations, self.time_view()
        return {
            "keyring": {"version": kr.version, "exp": kr.exp} if kr else None,
            "revocations": {"version": rl.version, "exp": rl.exp} if rl else None,
            "time": {"state": str(view.state), "floor": self.core.time.floor},
        }

    def expiring(self) -> list[Expiry]:
        return self.core.expiring(self.time_view().now)

    def trust_state(self) -> str:
        return self.core.trust_state(self.time_view().now)


def _stored_key(raw: bytes | None) -> CoseKey | None:
    if not raw:
        return None
    try:
        return decode_key(cbor.loads(raw))
    except (CredentialError, CborError):
        return None  # restore then treats the document as unverifiable


def _kind_of(raw: bytes) -> DocumentKind:
    from protocols.credentials import document_type  # noqa: PLC0415 - only for refusals

    try:
        return _KIND[document_type(raw)]
    except CredentialError:
        return DocumentKind.UNKNOWN


def unverified_stored(
    path: Path, *, gw_id: str, site: str, roots: Mapping[bytes, CoseKey], policy: Policy
) -> list[str]:
    """The documents of the trust store at ``path`` that do not verify against ``roots`` (as the
    daemon would restore them at start; ``lockgw restore`` refuses a backup holding any: the
    daemon would use them, marked stale). Reads a copy: ``path`` is never written."""
    with tempfile.TemporaryDirectory(prefix="lockgw-trust-") as tmp:
        copy = Path(tmp) / "trust.sqlite3"
        shutil.copyfile(path, copy)
        authz = Authorizer(
            gw_id=gw_id, site=site, roots=roots, policy=policy, store=TrustStore(copy), release_floor=0
        )
        try:
            return sorted(_KIND[kind] for kind in authz.core.unverified)
        finally:
            authz.close()
