"""The gateway's authorization service: the pure :class:`protocols.credentials.Authority`
plus the OS clock, persistence and the results the event layer turns into events.

State that must survive kill -9 and reboot — the installed keyring and revocation list (their
exact signed bytes), the time floor and the saved wall clock — lives in ``trust.sqlite3`` in the
data directory (WAL, ``synchronous=FULL``, asserted at open). Every change is one transaction;
the floor is written with ``max()`` in SQL so that even a stale writer cannot lower it.
Outstanding challenges are deliberately not persisted (see ``Challenges``): a restart forgets
them all, so no nonce issued before it can be used after it.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from gateway.clock import Clock, SystemClock
from gateway.errors import ConfigError, OutboxError
from protocols import cbor
from protocols.cose import ContentType, CoseKey, decode_key
from protocols.credentials import (
    Authority,
    Decision,
    Expiry,
    InstallResult,
    Policy,
    TimeView,
    load_cbor_or_b64,
)
from protocols.errors import CborError, CredentialError, TrustDocumentError

__all__ = ["RELEASE_FLOOR", "Authorizer", "InstallOutcome", "TrustStore", "load_root_keys"]

#: The starting time floor: this release's date (2026-11-22T00:00:00Z). A device that boots at
#: 1970 with no network still knows it is at least this late.
RELEASE_FLOOR: Final = 1_795_305_600

#: How often the wall clock is saved (s): it only detects a clock that went backwards.
SAVE_WALL_EVERY_S: Final = 60


def load_root_keys(paths: Iterable[Path]) -> dict[bytes, CoseKey]:
    """Root keys from files (COSE_Key with kid and alg, raw CBOR or base64url; CONTRACT §8.1)."""
    roots: dict[bytes, CoseKey] = {}
    for path in paths:
        try:
            raw = load_cbor_or_b64(Path(path).read_bytes())
            key = decode_key(cbor.loads(raw))
        except OSError as exc:
            raise ConfigError(f"trust.root_keys: cannot read {path}: {exc.strerror}") from exc
        except (CredentialError, CborError) as exc:
            raise ConfigError(f"trust.root_keys: {path} is not a valid public COSE_Key: {exc}") from exc
        if not key.kid:
            raise ConfigError(f"trust.root_keys: {path} has no kid (label 2); keyrings name their root by it")
        if key.kid in roots:
            raise ConfigError(f"trust.root_keys: two root keys share kid {key.kid.hex()}")
        roots[key.kid] = key
    return roots


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
        self._write(
            "INSERT INTO trust (name, blob) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET blob = excluded.blob",
            (name, value),
        )

    def put_num(self, name: str, value: int) -> None:
        self._write(
            "INSERT INTO trust (name, num) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET num = excluded.num",
            (name, value),
        )

    def raise_num(self, name: str, value: int) -> None:
        """Store ``max(stored, value)``: the floor never decreases, whoever writes."""
        self._write(
            "INSERT INTO trust (name, num) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET num = max(num, excluded.num)",
            (name, value),
        )

    def _write(self, sql: str, args: tuple[object, ...]) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(sql, args)
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise OutboxError(f"trust store write failed: {exc}") from exc


@dataclass(frozen=True, slots=True)
class InstallOutcome:
    """What happened to an offered document, ready for a trust.installed / trust.rejected event."""

    kind: str  # "keyring" | "revocations" | "time" | "unknown"
    installed: bool
    rejected: bool
    code: str | None = None
    message: str = ""
    version: int | None = None
    exp: int | None = None
    alarm: str | None = None
    expiring: list[Expiry] = field(default_factory=list)


_KIND = {ContentType.KEYRING: "keyring", ContentType.REVOCATIONS: "revocations", ContentType.TIME: "time"}


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
        )
        self.load_alarms: list[str] = []
        for name in ("keyring", "revocations"):
            raw = store.get_blob(name)
            if raw is None:
                continue
            try:
                self.core.install(raw, wall=self.clock.wall(), synced=self.clock.synced())
            except CredentialError as exc:
                # E.g. the root was removed from the configuration: run without it, loudly.
                self.load_alarms.append(f"stored_{name}_invalid: {exc}")
        self._persist_floor()

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

    def _persist_floor(self) -> None:
        self.store.raise_num("floor", self.core.time.floor)

    @property
    def alarms(self) -> list[str]:
        view = self.time_view()
        out = sorted(self.core.time.alarms) + self.load_alarms
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
        if result.installed and result.kind is ContentType.KEYRING:
            self.store.put_blob("keyring", result.document.raw)
        elif result.installed and result.kind is ContentType.REVOCATIONS:
            self.store.put_blob("revocations", result.document.raw)
        self._persist_floor()

    # -- decisions -----------------------------------------------------------------------------

    def challenge(self, *, lock: str, action: str) -> bytes:
        return self.core.challenge(lock=lock, action=action, mono=self.clock.mono(), rng=os.urandom)

    def decide(self, token: bytes, proof: bytes | None, *, lock: str, action: str) -> Decision:
        """Raises TokenError (contract code) on refusal; persists a raised floor either way."""
        before = self.core.time.floor
        try:
            return self.core.decide(
                token,
                proof,
                lock=lock,
                action=action,
                wall=self.clock.wall(),
                synced=self.clock.synced(),
                mono=self.clock.mono(),
            )
        finally:
            if self.core.time.floor != before:
                self._persist_floor()

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


def _kind_of(raw: bytes) -> str:
    from protocols.credentials import document_type  # noqa: PLC0415 - only for refusals

    try:
        return _KIND[document_type(raw)]
    except CredentialError:
        return "unknown"
