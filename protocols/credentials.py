"""Offline authorization: keyrings, revocation lists, time statements, tokens and proofs.

Pure: wall-clock time (``wall=``), the clock-synchronisation flag (``synced=``), monotonic time
(``mono=``) and randomness (``rng=``) are arguments. The gateway (``gateway/authz/authorizer.py``) adds the
OS clock, persistence and events. CONTRACT §3 and §8.4–8.7 are implemented here; the order of
checks in :meth:`Authority.decide` is the contract's, and every refusal raises
:class:`~protocols.errors.TokenError` whose ``code`` is the contract's error code.

Safety reasoning (docs/credentials.md): nothing foreseeable locks staff out. A key verifies
what it signed while it was valid (token ``iat`` in the key's window) even after it expired; a
keyring or revocation list past its ``exp`` keeps working, flagged ``stale`` with an alarm;
every expiry is announced ``expiry_warning_days`` ahead; the time floor moves only on the
authenticated time central publishes on purpose (time statements, installed keyrings and
revocation lists — never a token, never a refused document), only forward but for a
root-signed reset, and never ahead of a synchronised clock (CONTRACT §8.7 v1.1). Challenge
nonces are stateless (MAC'd by a per-boot secret), so a flood of challenges cannot evict one
(CONTRACT §8.14).
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import functools
import hashlib
import heapq
import hmac
import struct
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, ClassVar, Final, NamedTuple

from protocols import cbor
from protocols.cose import ContentType, CoseKey, Sign1, decode_key, parse_sign1
from protocols.errors import CborError, CredentialError, TokenError, TrustDocumentError
from protocols.limits import CHALLENGE_NONCE_LEN, CHALLENGE_TTL_S
from protocols.messages import validate_id

__all__ = [
    "ACTIONS",
    "ROLES",
    "Authority",
    "Challenges",
    "Decision",
    "Expiry",
    "InstallResult",
    "Keyring",
    "KeyringKey",
    "Policy",
    "RevocationList",
    "TimeKeeper",
    "TimeState",
    "TimeStatement",
    "TimeView",
    "document_type",
    "load_cbor_or_b64",
]

ROLES: Final = frozenset({"staff", "emergency", "revocations", "time", "firmware"})
ACTIONS: Final = frozenset({"unlock", "lock", "status"})
TOKEN_ROLES: Final = frozenset({"staff", "emergency"})
#: Actions a token can authorise at the gateway; "status" in a token is reserved (CONTRACT §8.11).
TOKEN_ACTIONS: Final = frozenset({"unlock", "lock"})
#: A value this far ahead of a synchronised clock does not move the floor (CONTRACT §3.6).
MAX_AHEAD_OF_SYNCED_S: Final = 24 * 3600
#: Consumed nonces remembered at once (each for at most its 30 s). Only a valid proof adds one,
#: so real unlocks bound it; when full, new proofs get ``busy`` (retryable) — forgetting a
#: consumed nonce early would allow a replay.
MAX_CONSUMED_NONCES: Final = 4096
_MAX_LOCKS: Final = 64
_CTI_LEN: Final = 16
_MAX_TEXT: Final = 256


@dataclass(frozen=True, slots=True)
class Policy:
    clock_leeway_s: int = 60
    max_token_ttl_s: int = 43200
    max_emergency_ttl_s: int = 3600
    on_stale_revocations: str = "accept"  # "accept" | "deny"
    expiry_warning_days: int = 30


# --- small typed readers ---------------------------------------------------------------------


def _int(
    m: Mapping[Any, cbor.CborValue], key: object, what: str, code: str, *, unsigned: bool = False
) -> int:
    v = m.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not -(2**63) <= v < 2**63 or (unsigned and v < 0):
        raise CredentialError(f"{what} must be an {'unsigned ' if unsigned else ''}integer", code=code)
    return v


def _text(m: Mapping[Any, cbor.CborValue], key: object, what: str, code: str) -> str:
    v = m.get(key)
    if not isinstance(v, str) or not 1 <= len(v) <= _MAX_TEXT:
        raise CredentialError(f"{what} must be text of 1..{_MAX_TEXT} characters", code=code)
    return v


def _exact_keys(
    m: Mapping[Any, cbor.CborValue],
    required: AbstractSet[Any],
    optional: AbstractSet[Any],
    what: str,
    code: str,
) -> None:
    keys = set(m)
    if not required <= keys:
        raise CredentialError(f"{what} lacks {sorted(map(str, required - keys))}", code=code)
    extra = keys - required - optional
    if extra:
        raise CredentialError(f"{what} has unexpected fields {sorted(map(str, extra))}", code=code)


# --- trust documents -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyringKey:
    kid: bytes
    key: CoseKey
    nbf: int
    exp: int
    roles: frozenset[str]
    max_ttl: int
    bearer: bool

    def covers(self, iat: int) -> bool:
        """A key verifies what it signed while valid: iat in [nbf, exp] (CONTRACT §3.2)."""
        return self.nbf <= iat <= self.exp


@dataclass(frozen=True, slots=True)
class Keyring:
    site: str
    version: int
    iat: int
    exp: int
    keys: Mapping[bytes, KeyringKey]
    raw: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class RevocationList:
    site: str
    version: int
    iat: int
    exp: int
    cti: frozenset[bytes]
    sub: Mapping[str, int]
    raw: bytes = field(repr=False)

    def revokes(self, cti: bytes, sub: str, iat: int) -> bool:
        revoked_at = self.sub.get(sub)
        return cti in self.cti or (revoked_at is not None and iat < revoked_at)


@dataclass(frozen=True, slots=True)
class TimeStatement:
    site: str
    t: int
    raw: bytes = field(repr=False)
    reset: bool = False  # root-signed: sets the floor to t even when lower (CONTRACT §8.7)


TrustDocument = Keyring | RevocationList | TimeStatement

_REJECT = "trust_rejected"


def document_type(raw: bytes) -> ContentType:
    """The content type of a signed document (for ``trust install FILE``), without verifying."""
    for ctype in (ContentType.KEYRING, ContentType.REVOCATIONS, ContentType.TIME):
        try:
            parse_sign1(raw, ctype, code=_REJECT)
        except CredentialError as exc:
            if "content type" in str(exc) or "exceeds" in str(exc):
                continue
            raise TrustDocumentError(str(exc), code="malformed") from exc
        return ctype
    raise TrustDocumentError("not a keyring, revocation list or time statement", code="wrong_type")


def _parse_keyring_payload(sign1: Sign1, raw: bytes) -> Keyring:
    m = sign1.payload_map(code="malformed")
    _exact_keys(m, {"site", "version", "iat", "exp", "keys"}, set(), "keyring", "malformed")
    site = validate_site(m["site"])
    keys_raw = m["keys"]
    if not isinstance(keys_raw, Sequence) or isinstance(keys_raw, str | bytes) or not keys_raw:
        raise TrustDocumentError("keyring keys must be a non-empty array", code="malformed")
    keys: dict[bytes, KeyringKey] = {}
    for entry in keys_raw:
        if not isinstance(entry, Mapping):
            raise TrustDocumentError("keyring entry must be a map", code="malformed")
        _exact_keys(
            entry,
            {"kid", "key", "nbf", "exp", "roles", "max_ttl", "bearer"},
            set(),
            "keyring entry",
            "malformed",
        )
        kid = entry["kid"]
        if not isinstance(kid, bytes) or not 1 <= len(kid) <= 32:
            raise TrustDocumentError("keyring kid must be 1..32 bytes", code="malformed")
        if kid in keys:
            raise TrustDocumentError(f"duplicate kid {kid.hex()} in keyring", code="malformed")
        try:
            key = decode_key(entry["key"])
        except CredentialError as exc:
            raise TrustDocumentError(f"keyring key {kid.hex()}: {exc}", code="bad_key") from exc
        if key.kid and key.kid != kid:
            raise TrustDocumentError("keyring entry kid differs from its COSE_Key kid", code="malformed")
        roles = entry["roles"]
        if (
            not isinstance(roles, Sequence)
            or isinstance(roles, str | bytes)
            or not roles
            or not all(isinstance(r, str) and r in ROLES for r in roles)
        ):
            raise TrustDocumentError(f"roles must be a non-empty subset of {sorted(ROLES)}", code="malformed")
        bearer = entry["bearer"]
        if not isinstance(bearer, bool):
            raise TrustDocumentError("bearer must be a boolean", code="malformed")
        keys[kid] = KeyringKey(
            kid,
            dataclasses.replace(key, kid=kid),
            _int(entry, "nbf", "nbf", "malformed"),
            _int(entry, "exp", "exp", "malformed"),
            frozenset(str(r) for r in roles),
            _int(entry, "max_ttl", "max_ttl", "malformed", unsigned=True),
            bearer,
        )
    return Keyring(
        site,
        _int(m, "version", "version", "malformed", unsigned=True),
        _int(m, "iat", "iat", "malformed"),
        _int(m, "exp", "exp", "malformed"),
        keys,
        raw,
    )


def validate_site(value: object) -> str:
    try:
        return validate_id(value, "site")
    except Exception as exc:
        raise TrustDocumentError("site is not a valid id", code="malformed") from exc


# --- time ------------------------------------------------------------------------------------


class TimeState(enum.StrEnum):
    SYNCED = "synced"
    HOLDOVER = "holdover"
    UNKNOWN = "unknown"


class TimeView(NamedTuple):
    """The time a decision uses (immutable; a NamedTuple: made on every decision)."""

    state: TimeState
    wall: int  # the system clock
    now: int  # the time decisions use: the clock, or max(clock, floor) when unknown
    floor: int


@dataclass
class TimeKeeper:
    """The persisted time floor and the time state (CONTRACT §3.6).

    The floor moves only forward and only on authenticated time (:meth:`offer`: time
    statements, installed keyrings and revocation lists — never tokens); while the clock is (or
    was, this boot) synchronised, an offered value moves it at most to the clock, and a value
    more than 24 h ahead is ignored and alarmed. Without a synchronised clock, the issuer's
    signature is the only evidence and any valid value raises it. Only a root-signed reset
    (:meth:`reset`) lowers it (CONTRACT §8.7).
    """

    floor: int
    saved_wall: int | None = None
    ever_synced: bool = False
    alarms: set[str] = field(default_factory=set)

    def view(self, *, wall: float, synced: bool) -> TimeView:
        w = int(wall)
        if synced:
            self.ever_synced = True
        behind = w < self.floor or (self.saved_wall is not None and w < self.saved_wall)
        if behind:
            self.alarms.add("clock_behind_floor" if w < self.floor else "clock_went_backwards")
        if behind or not self.ever_synced:
            state = TimeState.UNKNOWN
        else:
            state = TimeState.SYNCED if synced else TimeState.HOLDOVER
        now = w if state is not TimeState.UNKNOWN else max(w, self.floor)
        return TimeView(state, w, now, self.floor)

    def _bounded(self, t: int, view: TimeView) -> int | None:
        """Authenticated time ``t`` as a floor candidate: as given while the clock is unknown;
        with a synchronised clock at most the clock, and ``None`` (ignored, alarmed) when more
        than 24 h ahead of it."""
        if view.state is TimeState.UNKNOWN:
            return t
        if t > view.wall + MAX_AHEAD_OF_SYNCED_S:
            self.alarms.add("signed_time_far_ahead")
            return None
        return min(t, view.wall)

    def offer(self, t: int, view: TimeView) -> bool:
        """Offer authenticated time ``t``; return True when the floor rose."""
        new = self._bounded(t, view)
        if new is None:
            return False
        if new > self.floor:
            self.floor = new
            return True
        return False

    def reset(self, t: int, view: TimeView) -> bool:
        """A root-signed reset: the floor becomes ``t`` even when lower, the time alarms clear.

        With a synchronised clock the usual bounds hold (at most the clock; more than 24 h ahead
        is ignored and alarmed). The saved wall clock is lowered with it, so a value pushed
        ahead by a rogue NTP server stops flagging the clock as gone backwards. Returns False
        when the statement was ignored.
        """
        new = self._bounded(t, view)
        if new is None:
            return False
        self.floor = new
        if self.saved_wall is not None:
            self.saved_wall = min(self.saved_wall, new)
        self.alarms.clear()
        return True


# --- proof-of-possession challenges ------------------------------------------------------------

_NONCE_DOMAIN: Final = b"lockgw-nonce-v1\x00"
_NONCE_TAG_LEN: Final = 16


def _ms(mono: float) -> int:
    return int(mono * 1000)


def _nonce_error(code: str) -> TokenError:
    if code == "nonce_expired":
        return TokenError(
            f"nonce is older than {CHALLENGE_TTL_S:.0f} s; ask for a new challenge", code="nonce_expired"
        )
    return TokenError(
        "nonce was never issued, already used, or is bound to another lock or action", code="nonce_unknown"
    )


@functools.lru_cache(maxsize=1024)
def _nonce_binding(lock: str, action: str) -> bytes:
    """What a nonce's MAC covers before (issued, random): the domain, then lock and action, each
    with a 2-byte length. Memoised per (lock, action): a pure function of them."""
    msg = bytearray(_NONCE_DOMAIN)
    for part in (lock.encode(), action.encode()):
        msg += len(part).to_bytes(2, "big") + part
    return bytes(msg)


class Challenges:
    """Stateless nonces (like TCP SYN cookies): 32 bytes, bound to (lock, action), 30 s by the
    monotonic clock, single use (CONTRACT §3.4, §8.14).

    A nonce is ``issued (8 bytes, monotonic ms) ‖ random (8) ‖ tag (16)``, where the tag is
    HMAC-SHA256 under a per-boot secret over (lock, action, issued, random), truncated. Issuing
    stores nothing, so no number of challenges can evict or invalidate one already handed out.
    Only consumed nonces are remembered, each until its 30 s are over; one is consumed only by a
    proof that verified (a valid token, the holder's signature, the right gateway, lock, action
    and token hash), so real unlocks bound the set. At :data:`MAX_CONSUMED_NONCES` new proofs
    get ``busy`` (retryable) rather than forgetting a consumed nonce, which would allow a replay.

    The secret lives in memory only: after a restart every earlier nonce is ``nonce_unknown``.
    It is an argument (``secret=``) or, when not given, drawn from the first ``issue``'s rng.
    """

    def __init__(
        self,
        *,
        secret: bytes | None = None,
        ttl_s: float = CHALLENGE_TTL_S,
        max_consumed: int = MAX_CONSUMED_NONCES,
    ) -> None:
        if secret is not None and len(secret) < 16:
            raise ValueError("the nonce secret must be at least 16 bytes")
        self._secret = secret
        self._ttl_ms = _ms(ttl_s)
        self._max = max_consumed
        self._consumed: dict[bytes, int] = {}
        self._by_issue: list[tuple[int, bytes]] = []  # heap of (issued ms, nonce)

    def __len__(self) -> int:
        """How many consumed nonces are remembered."""
        return len(self._consumed)

    def issue(self, *, lock: str, action: str, mono: float, rng: Callable[[int], bytes]) -> bytes:
        if self._secret is None:
            self._secret = rng(32)
        head = struct.pack(">q", _ms(mono)) + rng(CHALLENGE_NONCE_LEN - 8 - _NONCE_TAG_LEN)
        return head + self._tag(self._secret, lock, action, head)

    @staticmethod
    def _tag(secret: bytes, lock: str, action: str, head: bytes) -> bytes:
        return hmac.digest(secret, _nonce_binding(lock, action) + head, "sha256")[:_NONCE_TAG_LEN]

    def peek(self, nonce: bytes, *, lock: str, action: str, mono: float) -> None:
        """Raise nonce_unknown / nonce_expired unless ``nonce`` is usable for (lock, action)."""
        cut = CHALLENGE_NONCE_LEN - _NONCE_TAG_LEN
        if (
            self._secret is None
            or len(nonce) != CHALLENGE_NONCE_LEN
            or not hmac.compare_digest(self._tag(self._secret, lock, action, nonce[:cut]), nonce[cut:])
        ):
            raise _nonce_error("nonce_unknown")
        issued = struct.unpack(">q", nonce[:8])[0]
        now = _ms(mono)
        if issued > now:  # cannot happen on one monotonic clock: not ours
            raise _nonce_error("nonce_unknown")
        if now - issued > self._ttl_ms:
            raise _nonce_error("nonce_expired")
        self._prune(now)
        if nonce in self._consumed:
            raise _nonce_error("nonce_unknown")

    def consume(self, nonce: bytes, *, mono: float) -> None:
        """Remember a nonce whose proof verified (call after :meth:`peek` passed)."""
        self._prune(_ms(mono))
        if nonce in self._consumed:
            raise _nonce_error("nonce_unknown")
        if len(self._consumed) >= self._max:
            raise TokenError(
                "too many unlocks in the last 30 s to remember another nonce; ask for a new "
                "challenge and retry",
                code="busy",
            )
        issued = struct.unpack(">q", nonce[:8])[0]
        self._consumed[nonce] = issued
        heapq.heappush(self._by_issue, (issued, nonce))

    def _prune(self, now_ms: int) -> None:
        """Forget consumed nonces past their 30 s: they are refused as expired anyway."""
        heap = self._by_issue
        while heap and now_ms - heap[0][0] > self._ttl_ms:
            _, old = heapq.heappop(heap)
            self._consumed.pop(old, None)


# --- decisions -------------------------------------------------------------------------------


class Decision(NamedTuple):
    """An accepted request, ready to become an ``access.granted`` event.

    Immutable like the frozen dataclasses elsewhere; a NamedTuple because it is made on every
    decision and a frozen dataclass costs a ``object.__setattr__`` call per field (13 here)."""

    lock: str
    action: str
    sub: str
    cti: str  # hex
    role: str
    iss: str
    iat: int
    exp: int
    kid: str  # hex
    time_state: TimeState
    trust_state: str
    flags: tuple[str, ...]
    alarm: str | None

    @property
    def priority(self) -> str:
        return "high" if self.role == "emergency" else "normal"


@dataclass(frozen=True, slots=True)
class InstallResult:
    kind: ContentType
    installed: bool  # False: the same version again (silent) or a time statement that raised nothing
    document: TrustDocument
    alarm: str | None = None
    signer: CoseKey | None = None  # the key that verified it (persisted with it)


@dataclass(frozen=True, slots=True)
class Expiry:
    what: str  # "keyring" | "revocations" | "key"
    ident: str
    exp: int
    days_left: float


def _deny(message: str, code: str, **context: object) -> TokenError:
    err = TokenError(message, code=code)
    err.context = context  # type: ignore[attr-defined]
    return err


class _Claims(NamedTuple):
    """A token's claims, checked (immutable; a NamedTuple: made on every decision)."""

    iss: str
    sub: str
    aud: str
    exp: int
    nbf: int | None
    iat: int
    cti: bytes
    cnf: cbor.CborValue | None
    locks: tuple[str, ...]
    act: tuple[str, ...]
    role: str
    alarm: str | None


_CLAIMS_REQUIRED: Final = frozenset({1, 2, 3, 4, 6, 7, "locks", "act", "role"})
_CLAIMS_OPTIONAL: Final = frozenset({5, 8, "alarm"})


@dataclass
class _Checking:
    """One decision in progress: the request, then what each check of §8.4 found."""

    token: bytes
    proof: bytes | None
    lock: str
    action: str
    mono: float
    view: TimeView
    sign1: Sign1 | None = None
    entry: KeyringKey | None = None
    claims_map: Mapping[Any, cbor.CborValue] | None = None
    iat: int = 0
    ctx: dict[str, object] = field(default_factory=dict)
    parsed: _Claims | None = None
    holder: CoseKey | None = None
    flags: list[str] = field(default_factory=list)

    # Each accessor is reached only after the check that sets its value passed.
    @property
    def signed(self) -> Sign1:
        assert self.sign1 is not None
        return self.sign1

    @property
    def key_entry(self) -> KeyringKey:
        assert self.entry is not None
        return self.entry

    def claims(self) -> Mapping[Any, cbor.CborValue]:
        assert self.claims_map is not None
        return self.claims_map

    @property
    def claims_parsed(self) -> _Claims:
        assert self.parsed is not None
        return self.parsed


@dataclass
class _Installing:
    """One trust document being installed (or restored): what each step of §8.5 found."""

    raw: bytes
    kind: ContentType
    view: TimeView | None  # None while restoring: nothing moves the floor then
    sign1: Sign1
    payload: Mapping[Any, cbor.CborValue] | None = None
    iat: int = 0
    document: TrustDocument | None = None
    signer: CoseKey | None = None

    # Each accessor is reached only after the step that sets its value passed.
    @property
    def map(self) -> Mapping[Any, cbor.CborValue]:
        assert self.payload is not None
        return self.payload

    @property
    def doc(self) -> TrustDocument:
        assert self.document is not None
        return self.document

    @property
    def key(self) -> CoseKey:
        assert self.signer is not None
        return self.signer

    @property
    def now(self) -> TimeView:
        assert self.view is not None
        return self.view


def _verifies(sign1: Sign1, key: CoseKey) -> bool:
    try:
        sign1.verify_with(key, code="bad_signature")
    except CredentialError:
        return False
    return True


class Authority:
    """The gateway's authorization state and decision procedure (pure)."""

    def __init__(
        self,
        *,
        gw_id: str,
        site: str,
        roots: Mapping[bytes, CoseKey],
        policy: Policy,
        floor: int,
        saved_wall: int | None = None,
        nonce_secret: bytes | None = None,
    ) -> None:
        self.gw_id = gw_id
        self.site = site
        self.roots = dict(roots)
        self.policy = policy
        self.keyring: Keyring | None = None
        self.revocations: RevocationList | None = None
        #: The highest version ever installed per kind: the rollback floor. The gateway
        #: persists it apart from the documents, so it survives rotations and restarts.
        self.version_floor: dict[ContentType, int] = {}
        #: Kinds whose stored document could not be verified at restore (alarm, ``stale``).
        self.unverified: set[ContentType] = set()
        #: The last root-signed reset applied (a re-delivery of it is silent, an older is refused).
        self.last_reset: TimeStatement | None = None
        self.time = TimeKeeper(floor=floor, saved_wall=saved_wall)
        self.challenges = Challenges(secret=nonce_secret)

    # -- state ------------------------------------------------------------------------------

    def firmware_keys(self, now: int) -> dict[bytes, CoseKey]:
        """Keys (by kid) the installed keyring names with role ``firmware``, valid at ``now``
        (docs/firmware.md; used by :mod:`protocols.firmware` for images and manifests)."""
        if self.keyring is None:
            return {}
        return {k: e.key for k, e in self.keyring.keys.items() if "firmware" in e.roles and e.covers(now)}

    def trust_state(self, now: int) -> str:
        """``ok``, ``stale`` (past an exp, or a stored document no longer verifies) or ``none``."""
        if self.keyring is None:
            return "none"
        if (
            now > self.keyring.exp
            or (self.revocations is not None and now > self.revocations.exp)
            or self.unverified
        ):
            return "stale"
        return "ok"

    def expiring(self, now: int) -> list[Expiry]:
        """Every expiry within ``expiry_warning_days`` (or already past), soonest first."""
        horizon = now + self.policy.expiry_warning_days * 86400
        out: list[Expiry] = []
        if self.keyring is not None:
            out.append(Expiry("keyring", f"v{self.keyring.version}", self.keyring.exp, 0))
            out += [Expiry("key", key.kid.hex(), key.exp, 0) for key in self.keyring.keys.values()]
        if self.revocations is not None:
            out.append(Expiry("revocations", f"v{self.revocations.version}", self.revocations.exp, 0))
        return sorted(
            (
                Expiry(e.what, e.ident, e.exp, round((e.exp - now) / 86400, 2))
                for e in out
                if e.exp <= horizon
            ),
            key=lambda e: e.exp,
        )

    def _signer(self, kid: bytes, role: str, iat: int) -> CoseKey:
        """A key with ``role`` from the keyring (iat in its window), or a root key."""
        if self.keyring is not None:
            entry = self.keyring.keys.get(kid)
            if entry is not None:
                if role not in entry.roles:
                    raise TrustDocumentError(f"key {kid.hex()} lacks role {role}", code="bad_signature")
                if not entry.covers(iat):
                    raise TrustDocumentError(
                        f"key {kid.hex()} was not valid at iat {iat}", code="bad_signature"
                    )
                return entry.key
        root = self.roots.get(kid)
        if root is None:
            raise TrustDocumentError(f"unknown signing key {kid.hex()}", code="unknown_key")
        return root

    # -- trust documents ----------------------------------------------------------------------

    def install(self, raw: bytes, *, wall: float, synced: bool) -> InstallResult:
        """Verify and install a keyring, revocation list or time statement.

        Raises TrustDocumentError for each refusal (signature, site, rollback, type, shape); the
        same version again returns ``installed=False`` (silent).
        """
        try:
            return self._install(raw, wall=wall, synced=synced)
        except TrustDocumentError:
            raise
        except CredentialError as exc:
            raise TrustDocumentError(str(exc), code=exc.code) from exc

    def _install(self, raw: bytes, *, wall: float, synced: bool) -> InstallResult:
        """CONTRACT §8.5: the document's type, then each step of :attr:`INSTALL_STEPS` for its
        kind, in turn: a step raises its refusal, passes (``None``), or ends the install with
        its result (the same version again is silent; the last step installs)."""
        kind = document_type(raw)
        view = self.time.view(wall=wall, synced=synced)
        st = _Installing(raw, kind, view, parse_sign1(raw, kind, code="malformed"))
        for step in self.INSTALL_STEPS[kind]:
            result = step(self, st)
            if result is not None:
                return result
        raise AssertionError(f"the install steps for {kind} end without a result")  # pragma: no cover

    # Steps shared by the kinds. Each reads what the earlier ones found.

    def _payload(self, st: _Installing) -> None:
        """The payload is a strict CBOR map → malformed."""
        st.payload = st.sign1.payload_map(code="malformed")

    def _verified(self, st: _Installing) -> None:
        """The signature under the signer found for it → bad_signature."""
        st.sign1.verify_with(st.key, code="bad_signature")

    def _same_site(self, st: _Installing) -> None:
        """The document is for this site → wrong_site."""
        site = st.doc.site
        if site != self.site:
            raise TrustDocumentError(
                f"{_KIND_NAME[st.kind]} is for site {site}, not {self.site}", code="wrong_site"
            )

    def _not_installed_already(self, st: _Installing) -> InstallResult | None:
        """The installed document again (byte for byte) → silent, ``installed=False``."""
        current = self.keyring if st.kind is ContentType.KEYRING else self.revocations
        if current is not None and st.doc.raw == current.raw:
            return InstallResult(st.kind, installed=False, document=current)
        return None

    def _newer(self, st: _Installing) -> None:
        """A higher version than the installed one and not below the highest ever → rollback."""
        doc = st.doc
        assert isinstance(doc, Keyring | RevocationList)
        current = self.keyring if st.kind is ContentType.KEYRING else self.revocations
        self._check_newer(st.kind, doc.version, current.version if current else None)

    # Keyring (§3.2): signed by a root.

    def _root_signer(self, st: _Installing) -> None:
        """A keyring names a configured root → unknown_key."""
        kid = st.sign1.kid
        assert kid is not None
        root = self.roots.get(kid)
        if root is None:
            raise TrustDocumentError(f"keyring signed by unknown root {kid.hex()}", code="unknown_key")
        st.signer = root

    def _keyring_payload(self, st: _Installing) -> None:
        """The keyring's shape and keys → malformed, bad_key."""
        st.document = _parse_keyring_payload(st.sign1, st.raw)

    def _no_root_kid(self, st: _Installing) -> None:
        """No keyring kid is a root's → malformed."""
        keyring = st.doc
        assert isinstance(keyring, Keyring)
        if set(keyring.keys) & set(self.roots):
            raise TrustDocumentError("keyring reuses a root key's kid", code="malformed")

    def _install_keyring(self, st: _Installing) -> InstallResult:
        keyring = st.doc
        assert isinstance(keyring, Keyring)
        self.keyring = keyring
        self._installed(st.kind, keyring.version)
        self.time.offer(keyring.iat, st.now)
        return InstallResult(st.kind, installed=True, document=keyring, signer=st.key)

    # Revocation list (§3.5): signed by a key with role revocations, or a root.

    def _revocations_fields(self, st: _Installing) -> None:
        """Exactly the list's fields, an integer iat → malformed."""
        m = st.map
        _exact_keys(m, {"site", "version", "iat", "exp", "cti", "sub"}, set(), "revocation list", "malformed")
        st.iat = _int(m, "iat", "iat", "malformed")

    def _revocations_signer(self, st: _Installing) -> None:
        """A keyring key with role revocations valid at iat, or a root → bad_signature, unknown_key."""
        kid = st.sign1.kid
        assert kid is not None
        st.signer = self._signer(kid, "revocations", st.iat)

    def _revocations_payload(self, st: _Installing) -> None:
        """The entries' shapes → malformed."""
        st.document = _parse_revocations(st.map, st.raw, st.iat)

    def _install_revocations(self, st: _Installing) -> InstallResult:
        rl = st.doc
        assert isinstance(rl, RevocationList)
        self.revocations = rl
        self._installed(st.kind, rl.version)
        self.time.offer(rl.iat, st.now)
        return InstallResult(st.kind, installed=True, document=rl, signer=st.key)

    # Time statement (§3.6, §8.7): signed by a key with role time, or a root; a reset by a root.

    def _time_payload(self, st: _Installing) -> None:
        """Exactly site, t and an optional reset: true → malformed."""
        st.document = _parse_time_statement(st.map, st.raw)

    def _time_signer(self, st: _Installing) -> None:
        """A reset: a root → bad_signature; otherwise a key with role time valid at t, or a root."""
        ts, kid = st.doc, st.sign1.kid
        assert isinstance(ts, TimeStatement)
        assert kid is not None
        if ts.reset:
            root_key = self.roots.get(kid)
            if root_key is None:
                raise TrustDocumentError(
                    "a reset time statement must be signed by a root key", code="bad_signature"
                )
            st.signer = root_key
        else:
            st.signer = self._signer(kid, "time", ts.t)

    def _reset_is_new(self, st: _Installing) -> InstallResult | None:
        """A reset: the last one again → silent; one not later than it → rollback."""
        ts, last = st.doc, self.last_reset
        assert isinstance(ts, TimeStatement)
        if not ts.reset or last is None:
            return None
        if last.raw == st.raw:
            return InstallResult(st.kind, installed=False, document=last)
        if ts.t <= last.t:
            raise TrustDocumentError(
                f"reset to {ts.t} is not later than the last reset ({last.t})", code="rollback"
            )
        return None

    def _apply_time(self, st: _Installing) -> InstallResult:
        """Installed only when the floor moved (a reset: when it was applied)."""
        ts = st.doc
        assert isinstance(ts, TimeStatement)
        before = set(self.time.alarms)
        if ts.reset:
            raised = self.time.reset(ts.t, st.now)
            if raised:
                self.last_reset = ts
        else:
            raised = self.time.offer(ts.t, st.now)
        alarm = next(iter(self.time.alarms - before), None)
        return InstallResult(st.kind, installed=raised, document=ts, alarm=alarm, signer=st.key)

    #: CONTRACT §8.5, per kind, after the type and the COSE_Sign1 shape: each step raises its
    #: refusal (TrustDocumentError, or CredentialError mapped by :meth:`install`), passes, or
    #: returns the result.
    INSTALL_STEPS: ClassVar[
        Mapping[ContentType, tuple[Callable[[Authority, _Installing], InstallResult | None], ...]]
    ] = {
        ContentType.KEYRING: (
            _root_signer,
            _verified,
            _keyring_payload,
            _same_site,
            _no_root_kid,
            _not_installed_already,
            _newer,
            _install_keyring,
        ),
        ContentType.REVOCATIONS: (
            _payload,
            _revocations_fields,
            _revocations_signer,
            _verified,
            _revocations_payload,
            _same_site,
            _not_installed_already,
            _newer,
            _install_revocations,
        ),
        ContentType.TIME: (
            _payload,
            _time_payload,
            _time_signer,
            _verified,
            _same_site,
            _reset_is_new,
            _apply_time,
        ),
    }

    def _check_newer(self, kind: ContentType, version: int, current: int | None) -> None:
        """No rollback: newer than the installed one and not below the highest ever installed.

        The same version as the floor is accepted only when nothing of that version is
        installed (the stored copy was lost): it is then authentic and no older.
        """
        floor = self.version_floor.get(kind)
        if (current is not None and version <= current) or (floor is not None and version < floor):
            newest = max(v for v in (current, floor) if v is not None)
            raise TrustDocumentError(
                f"{_KIND_NAME[kind]} version {version} is not newer than {newest}", code="rollback"
            )

    def _installed(self, kind: ContentType, version: int) -> None:
        self.version_floor[kind] = max(version, self.version_floor.get(kind, version))
        self.unverified.discard(kind)

    def restore(self, raw: bytes, *, kind: ContentType, signer: CoseKey | None) -> bool:
        """Reinstate a document installed before a restart; return False if it no longer verifies.

        A stored document was verified when it was installed, so it stays in force whatever has
        rotated since: a revocation list is checked against the key that verified it then
        (``signer``, persisted with it), not against the current keyring, which may have
        retired that key. A keyring is checked against the configured roots. A document that
        parses but no longer verifies (a root removed from the configuration, a damaged store)
        is still used — dropping it would lock staff out or un-revoke tokens — and its kind is
        marked unverified: ``trust_state`` says ``stale`` and the gateway raises an alarm until
        a newer one installs. One that cannot even be parsed is dropped, also marked. The time
        floor does not move: it was persisted when the document was installed.

        The steps: parse and shape as at install (:attr:`RESTORE_STEPS`), the keys that may
        have signed it (:meth:`_restore_signers`), then :meth:`_reinstate`.
        """
        try:
            st = _Installing(raw, kind, None, parse_sign1(raw, kind, code="malformed"))
            for step in self.RESTORE_STEPS[kind]:
                step(self, st)
        except CredentialError:
            if kind is not ContentType.TIME:  # a lost reset record only loses its replay guard
                self.unverified.add(kind)
            return False
        verified = any(_verifies(st.sign1, key) for key in self._restore_signers(st, signer))
        return self._reinstate(kind, st.doc, verified=verified)

    #: Parsing a stored document: the install steps up to the site, without any signature.
    RESTORE_STEPS: ClassVar[Mapping[ContentType, tuple[Callable[[Authority, _Installing], None], ...]]] = {
        ContentType.KEYRING: (_keyring_payload, _same_site),
        ContentType.REVOCATIONS: (_payload, _revocations_fields, _revocations_payload, _same_site),
        ContentType.TIME: (_payload, _time_payload, _same_site),
    }

    def _restore_signers(self, st: _Installing, signer: CoseKey | None) -> list[CoseKey]:
        """A keyring: its root. Others: the key persisted with it, or (stored before signers
        were kept) the current keyring's key for the role, or a root."""
        kid = st.sign1.kid
        assert kid is not None
        if st.kind is ContentType.KEYRING:
            return [k for k in (self.roots.get(kid),) if k is not None]
        if signer is not None:
            return [signer]
        role = "revocations" if st.kind is ContentType.REVOCATIONS else "time"
        try:
            return [self._signer(kid, role, _doc_time(st.doc))]
        except CredentialError:
            return []

    def _reinstate(self, kind: ContentType, doc: TrustDocument, *, verified: bool) -> bool:
        """Use it, verified or not; an unverified keyring or list marks its kind (stale)."""
        if isinstance(doc, TimeStatement):
            self.last_reset = doc
            return verified  # a reset is history (the floor it set is persisted): no alarm
        if isinstance(doc, Keyring):
            self.keyring = doc
        else:
            self.revocations = doc
        self.version_floor[kind] = max(doc.version, self.version_floor.get(kind, doc.version))
        if not verified:
            self.unverified.add(kind)
        return verified

    # -- challenges ---------------------------------------------------------------------------

    def challenge(self, *, lock: str, action: str, mono: float, rng: Callable[[int], bytes]) -> bytes:
        return self.challenges.issue(lock=lock, action=action, mono=mono, rng=rng)

    # -- decisions ----------------------------------------------------------------------------

    def decide(
        self,
        token: bytes,
        proof: bytes | None,
        *,
        lock: str,
        action: str,
        wall: float,
        synced: bool,
        mono: float,
    ) -> Decision:
        """Check a token (and its proof) for ``action`` on ``lock`` in the contract's order
        (CONTRACT §8.4): each check of :attr:`CHECKS`, in turn, raises its code or passes."""
        c = _Checking(token, proof, lock, action, mono, self.time.view(wall=wall, synced=synced))
        for check in self.CHECKS:
            check(self, c)
        return self._decision(c)

    # §8.4 steps 4–14, one function each, in order. Each reads what the earlier ones found.

    def _token_shape(self, c: _Checking) -> None:
        """4. token parse and size → token_invalid."""
        try:
            c.sign1 = parse_sign1(c.token, ContentType.TOKEN, code="token_invalid")
        except CredentialError as exc:
            raise _deny(str(exc), "token_invalid") from exc

    def _known_key(self, c: _Checking) -> None:
        """5. kid → unknown_key."""
        kid = c.signed.kid
        assert kid is not None
        c.entry = self.keyring.keys.get(kid) if self.keyring is not None else None
        if c.entry is None:
            raise _deny(
                "token signed by a key this gateway does not know"
                if self.keyring
                else "no keyring installed: every token is unknown_key",
                "unknown_key",
            )

    def _signature_window_role(self, c: _Checking) -> None:
        """6. signature, key window, role held by the key → token_invalid."""
        entry = c.key_entry
        try:
            c.signed.verify_with(entry.key, code="token_invalid")
            c.claims_map = c.signed.payload_map(code="token_invalid")
        except CredentialError as exc:
            raise _deny(str(exc), "token_invalid") from exc
        iat, role = c.claims_map.get(6), c.claims_map.get("role")
        if not isinstance(iat, int) or isinstance(iat, bool) or not -(2**63) <= iat < 2**63:
            raise _deny("token lacks an integer iat", "token_invalid")
        if not entry.covers(iat):
            raise _deny("token iat is outside its signing key's validity window", "token_invalid")
        if not isinstance(role, str) or role not in TOKEN_ROLES or role not in entry.roles:
            raise _deny(f"signing key does not hold the token's role {_show(role)}", "token_invalid")
        # A token never moves the time floor (CONTRACT §8.7 v1.1): no token, however it is
        # dated, changes what later tokens get.
        c.iat, c.ctx = iat, _context(c.claims_map)

    def _audience(self, c: _Checking) -> None:
        """7. aud → wrong_audience."""
        if c.claims().get(3) not in (self.site, self.gw_id):
            raise _deny("token is addressed to another site or gateway", "wrong_audience", **c.ctx)

    def _lock_named(self, c: _Checking) -> None:
        """8. lock in locks → wrong_lock."""
        locks = c.claims().get("locks")
        if not isinstance(locks, Sequence) or isinstance(locks, str | bytes) or c.lock not in locks:
            raise _deny(f"token does not name lock {c.lock}", "wrong_lock", **c.ctx)

    def _action_allowed(self, c: _Checking) -> None:
        """9. act → action_not_allowed."""
        act = c.claims().get("act")
        if (
            not isinstance(act, Sequence)
            or isinstance(act, str | bytes)
            or c.action not in act
            or c.action not in TOKEN_ACTIONS
        ):
            raise _deny(f"token does not allow {c.action}", "action_not_allowed", **c.ctx)

    def _valid_yet(self, c: _Checking) -> None:
        """10. nbf / iat ahead → token_not_yet_valid. With the clock unknown an iat ahead is no
        refusal: after a power cut the clock may be days behind, and refusing would lock staff
        out (§8.7)."""
        leeway, view = self.policy.clock_leeway_s, c.view
        nbf = c.claims().get(5)
        synced_view = view.state is not TimeState.UNKNOWN
        if synced_view and c.iat > view.wall + MAX_AHEAD_OF_SYNCED_S:
            self.time.alarms.add("signed_time_far_ahead")
        if (synced_view and c.iat - leeway > view.now) or (
            isinstance(nbf, int) and not isinstance(nbf, bool) and nbf - leeway > view.now
        ):
            raise _deny("token is not valid yet (check the issuing clock)", "token_not_yet_valid", **c.ctx)

    def _not_expired(self, c: _Checking) -> None:
        """11. exp → token_expired (and, with the clock unknown, an iat before the floor allows)."""
        exp = c.claims().get(4)
        if not isinstance(exp, int) or isinstance(exp, bool):
            raise _deny("token lacks an integer exp", "token_invalid", **c.ctx)
        if c.view.now > exp + self.policy.clock_leeway_s:
            raise _deny("token has expired", "token_expired", **c.ctx)
        if c.view.state is TimeState.UNKNOWN and c.iat < self.time.floor - self.policy.max_token_ttl_s:
            raise _deny(
                "clock unknown and the token was issued before the time floor allows",
                "token_expired",
                **c.ctx,
            )

    def _lifetime_and_claims(self, c: _Checking) -> None:
        """12. lifetime caps, emergency alarm, claim shapes, small-order or invalid cnf key →
        token_invalid."""
        pol, ctx = self.policy, c.ctx
        claims = c.parsed = _claims(c.claims(), ctx)
        ttl_cap = min(c.key_entry.max_ttl, pol.max_token_ttl_s)
        if claims.role == "emergency":
            ttl_cap = min(ttl_cap, pol.max_emergency_ttl_s)
            if claims.alarm is None:
                raise _deny("emergency token without its safety-alarm reference", "token_invalid", **ctx)
            if len(claims.locks) != 1:
                raise _deny("an emergency token opens exactly one door", "token_invalid", **ctx)
        if claims.exp - claims.iat > ttl_cap or claims.exp < claims.iat:
            raise _deny(f"token lifetime exceeds {ttl_cap} s", "token_invalid", **ctx)
        if claims.cnf is not None:
            if not isinstance(claims.cnf, Mapping) or set(claims.cnf) != {1}:
                raise _deny("cnf must be {1: COSE_Key}", "token_invalid", **ctx)
            try:
                c.holder = decode_key(claims.cnf[1])
            except CredentialError as exc:
                raise _deny(f"cnf key refused: {exc}", "token_invalid", **ctx) from exc

    def _not_revoked(self, c: _Checking) -> None:
        """13. revocation → token_revoked (a stale list per policy: stale_trust, or a flag)."""
        rl, claims = self.revocations, c.claims_parsed
        if rl is not None and rl.revokes(claims.cti, claims.sub, claims.iat):
            raise _deny("token or its subject is revoked", "token_revoked", **c.ctx)
        if rl is not None and c.view.now > rl.exp:
            if self.policy.on_stale_revocations == "deny":
                raise _deny("revocation list is past its exp and policy is deny", "stale_trust", **c.ctx)
            c.flags.append("stale_revocations")

    def _possession(self, c: _Checking) -> None:
        """14. proof → proof_required, nonce_unknown, nonce_expired, proof_invalid."""
        if c.holder is None:
            if not c.key_entry.bearer:
                raise _deny(
                    "token has no cnf and its key does not allow bearer tokens", "proof_required", **c.ctx
                )
            return
        if c.proof is None:
            raise _deny("holder-bound token needs a proof of possession", "proof_required", **c.ctx)
        self._check_proof(c.proof, c.holder, c.token, lock=c.lock, action=c.action, mono=c.mono, ctx=c.ctx)

    #: The contract's check order (§8.4, after request shape, lock and carried documents).
    CHECKS: ClassVar[tuple[Callable[[Authority, _Checking], None], ...]] = (
        _token_shape,
        _known_key,
        _signature_window_role,
        _audience,
        _lock_named,
        _action_allowed,
        _valid_yet,
        _not_expired,
        _lifetime_and_claims,
        _not_revoked,
        _possession,
    )

    def _decision(self, c: _Checking) -> Decision:
        now, claims = c.view.now, c.claims_parsed
        trust = self.trust_state(now)
        if self.keyring is not None and now > self.keyring.exp:
            c.flags.append("stale_keyring")
        kid = c.signed.kid
        assert kid is not None
        return Decision(
            c.lock,
            c.action,
            claims.sub,
            claims.cti.hex(),
            claims.role,
            claims.iss,
            claims.iat,
            claims.exp,
            kid.hex(),
            c.view.state,
            trust,
            tuple(c.flags),
            claims.alarm,
        )

    def _check_proof(
        self,
        proof: bytes,
        holder: CoseKey,
        token: bytes,
        *,
        lock: str,
        action: str,
        mono: float,
        ctx: dict[str, object],
    ) -> None:
        try:
            sign1 = parse_sign1(proof, ContentType.PROOF, code="proof_invalid", require_kid=False)
        except CredentialError as exc:
            raise _deny(str(exc), "proof_invalid", **ctx) from exc
        th = hashlib.sha256(token).digest()
        nonce: cbor.CborValue = _canonical_proof_nonce(sign1.payload, self.gw_id, lock, action, th)
        payload = None if nonce is not None else self._proof_payload(sign1, ctx)
        if payload is not None:
            nonce = payload["nonce"]
        if not isinstance(nonce, bytes) or len(nonce) != CHALLENGE_NONCE_LEN:
            raise _deny("proof nonce must be 32 bytes", "proof_invalid", **ctx)
        try:
            self.challenges.peek(nonce, lock=lock, action=action, mono=mono)
        except TokenError as exc:
            raise _deny(str(exc), exc.code, **ctx) from exc
        try:
            sign1.verify_with(holder, code="proof_invalid")
        except CredentialError as exc:
            raise _deny(str(exc), "proof_invalid", **ctx) from exc
        if payload is not None:  # the canonical payload names exactly these by construction
            if payload["gw"] != self.gw_id or payload["lock"] != lock or payload["act"] != action:
                raise _deny("proof names another gateway, lock or action", "proof_invalid", **ctx)
            if payload["th"] != th:
                raise _deny("proof is bound to another token", "proof_invalid", **ctx)
        try:  # single use: a proof that verified consumes its nonce
            self.challenges.consume(nonce, mono=mono)
        except TokenError as exc:
            raise _deny(str(exc), exc.code, **ctx) from exc

    @staticmethod
    def _proof_payload(sign1: Sign1, ctx: dict[str, object]) -> Mapping[Any, cbor.CborValue]:
        """A proof payload in any encoding: strict CBOR, exactly its five fields → proof_invalid."""
        try:
            payload = sign1.payload_map(code="proof_invalid")
            _exact_keys(payload, {"nonce", "gw", "lock", "act", "th"}, set(), "proof", "proof_invalid")
        except CredentialError as exc:
            raise _deny(str(exc), "proof_invalid", **ctx) from exc
        return payload


def _canonical_proof_nonce(payload: bytes, gw: str, lock: str, action: str, th: bytes) -> bytes | None:
    """The nonce of a proof payload that is, byte for byte, the deterministic encoding (RFC 8949
    §4.2.1, what our issuer writes) of ``{"gw": gw, "th": th, "act": action, "lock": lock,
    "nonce": <32 bytes>}``; ``None`` for any other payload, which is then decoded and checked
    field by field. Such a payload decodes strictly to exactly those fields, so every check the
    general path makes on it passes: this only skips the decoding."""
    parts = _canonical_proof_parts(gw, lock, action)
    if parts is None:
        return None
    before_th, before_nonce = parts
    cut = len(before_th) + 32
    if (
        len(payload) != cut + len(before_nonce) + CHALLENGE_NONCE_LEN
        or not payload.startswith(before_th)
        or payload[len(before_th) : cut] != th
        or payload[cut : cut + len(before_nonce)] != before_nonce
    ):
        return None
    return payload[-CHALLENGE_NONCE_LEN:]


@functools.lru_cache(maxsize=1024)
def _canonical_proof_parts(gw: str, lock: str, action: str) -> tuple[bytes, bytes] | None:
    """The bytes of that encoding before th and between th and the nonce, checked against the
    encoder itself (``None``, i.e. no shortcut, should the layout ever differ)."""
    zero = bytes(32)
    try:
        whole = cbor.dumps({"nonce": zero, "gw": gw, "lock": lock, "act": action, "th": zero})
    except CborError:
        return None
    before_th = b"\xa5" + cbor.dumps("gw") + cbor.dumps(gw) + cbor.dumps("th") + cbor.bstr_head(32)
    before_nonce = (
        cbor.dumps("act") + cbor.dumps(action) + cbor.dumps("lock") + cbor.dumps(lock) + cbor.dumps("nonce")
    ) + cbor.bstr_head(CHALLENGE_NONCE_LEN)
    if before_th + zero + before_nonce + zero != whole:
        return None
    return before_th, before_nonce


def _context(m: Mapping[Any, cbor.CborValue]) -> dict[str, object]:
    ctx: dict[str, object] = {}
    sub, cti, role = m.get(2), m.get(7), m.get("role")
    if isinstance(sub, str) and len(sub) <= _MAX_TEXT:
        ctx["sub"] = sub
    if isinstance(cti, bytes) and len(cti) == _CTI_LEN:
        ctx["cti"] = cti.hex()
    if isinstance(role, str) and role in TOKEN_ROLES:
        ctx["role"] = role
    return ctx


def _show(value: object) -> str:
    """A claim value for a message: short, and never a big structure."""
    return repr(value) if isinstance(value, str) and len(value) <= 32 else f"of type {type(value).__name__}"


_KIND_NAME: Final = {
    ContentType.KEYRING: "keyring",
    ContentType.REVOCATIONS: "revocation list",
    ContentType.TIME: "time statement",
}


def _doc_time(doc: TrustDocument) -> int:
    return doc.t if isinstance(doc, TimeStatement) else doc.iat


def _parse_time_statement(m: Mapping[Any, cbor.CborValue], raw: bytes) -> TimeStatement:
    _exact_keys(m, {"site", "t"}, {"reset"}, "time statement", "malformed")
    if "reset" in m and m["reset"] is not True:
        raise TrustDocumentError('time statement "reset" must be true when present', code="malformed")
    return TimeStatement(validate_site(m["site"]), _int(m, "t", "t", "malformed"), raw, reset="reset" in m)


def _claims(m: Mapping[Any, cbor.CborValue], ctx: dict[str, object]) -> _Claims:
    try:
        _exact_keys(m, _CLAIMS_REQUIRED, _CLAIMS_OPTIONAL, "token claims", "token_invalid")
        cti = m[7]
        if not isinstance(cti, bytes) or len(cti) != _CTI_LEN:
            raise CredentialError("cti must be 16 bytes", code="token_invalid")
        locks, act = m["locks"], m["act"]
        if (
            not isinstance(locks, Sequence)
            or isinstance(locks, str | bytes)
            or not 1 <= len(locks) <= _MAX_LOCKS
            or not all(map(isinstance, locks, repeat(str)))
            or len(set(locks)) != len(locks)
        ):
            raise CredentialError("locks must be 1..64 distinct lock ids", code="token_invalid")
        for lock_id in locks:
            validate_id(lock_id, "lock id")
        if (
            not isinstance(act, Sequence)
            or isinstance(act, str | bytes)
            or not act
            or not all(map(isinstance, act, repeat(str)))
            or not ACTIONS.issuperset(act)
            or len(set(act)) != len(act)
        ):
            raise CredentialError(
                f"act must be a non-empty subset of {sorted(ACTIONS)}", code="token_invalid"
            )
        nbf = m.get(5)
        if nbf is not None and (not isinstance(nbf, int) or isinstance(nbf, bool)):
            raise CredentialError("nbf must be an integer", code="token_invalid")
        alarm = m.get("alarm")
        if alarm is not None and (not isinstance(alarm, str) or not 1 <= len(alarm) <= _MAX_TEXT):
            raise CredentialError("alarm must be text", code="token_invalid")
        return _Claims(
            _text(m, 1, "iss", "token_invalid"),
            _text(m, 2, "sub", "token_invalid"),
            _text(m, 3, "aud", "token_invalid"),
            _int(m, 4, "exp", "token_invalid"),
            nbf,
            _int(m, 6, "iat", "token_invalid"),
            cti,
            m.get(8),
            tuple(map(str, locks)),
            tuple(map(str, act)),
            str(m["role"]),
            alarm if isinstance(alarm, str) else None,
        )
    except CredentialError as exc:
        raise _deny(str(exc), "token_invalid", **ctx) from exc
    except Exception as exc:  # validate_id raises RemoteProtocolError
        raise _deny(f"malformed claim: {exc}", "token_invalid", **ctx) from exc


def _parse_revocations(m: Mapping[Any, cbor.CborValue], raw: bytes, iat: int) -> RevocationList:
    ctis = m["cti"]
    subs = m["sub"]
    if (
        not isinstance(ctis, Sequence)
        or isinstance(ctis, str | bytes)
        or not all(isinstance(c, bytes) and len(c) == _CTI_LEN for c in ctis)
    ):
        raise TrustDocumentError("cti must be an array of 16-byte strings", code="malformed")
    if not isinstance(subs, Sequence) or isinstance(subs, str | bytes):
        raise TrustDocumentError("sub must be an array of [sub, revoked_at]", code="malformed")
    sub_map: dict[str, int] = {}
    for item in subs:
        if (
            not isinstance(item, Sequence)
            or isinstance(item, str | bytes)
            or len(item) != 2
            or not isinstance(item[0], str)
            or not isinstance(item[1], int)
            or isinstance(item[1], bool)
        ):
            raise TrustDocumentError("sub entries must be [text, int]", code="malformed")
        sub_map[item[0]] = max(item[1], sub_map.get(item[0], item[1]))
    return RevocationList(
        validate_site(m["site"]),
        _int(m, "version", "version", "malformed", unsigned=True),
        iat,
        _int(m, "exp", "exp", "malformed"),
        frozenset(c for c in ctis if isinstance(c, bytes)),
        sub_map,
        raw,
    )


def load_cbor_or_b64(data: bytes) -> bytes:
    """Files hold raw CBOR or base64url text (CONTRACT §8.1–8.2); return the raw bytes.

    Raw documents start with an array, map or tag (major types 4–6, bytes 0x80–0xdf); base64url
    text never does, since its alphabet is ASCII letters, digits, '-' and '_'.
    """
    if data[:1] and data[0] >> 5 in (4, 5, 6):
        return bytes(data)
    try:
        text = data.strip().decode("ascii")
        if not text or not set(text) <= _B64URL:
            raise ValueError("not base64url")
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CredentialError("neither raw CBOR nor base64url text", code="malformed") from exc


_B64URL: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=")
