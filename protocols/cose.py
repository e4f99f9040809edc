"""COSE_Key and COSE_Sign1 (RFC 9052) for lockgw's signed documents — strict and bounded.

Parsing comes before any cryptography: the size limit of the document's type, strict CBOR
(no indefinite lengths, duplicate keys or nesting over 8; the protected header and the payload
each start a new count), the exact COSE_Sign1 shape (optional tag 18, optionally inside CWT
tag 61), a protected header holding only alg (1), content type (3) and kid (4), an empty
unprotected header, and the expected content type. Only then is a signature checked, with the
algorithm taken from the *key*; a protected alg that differs from the key's is a rejection.

Keys: OKP/Ed25519 (kty 1, crv 6, alg -8) and EC2/P-256 (kty 2, crv 1, alg -7), each carrying its
alg. Ed25519 public keys must be canonical, on the curve, in the prime-order subgroup and not
of small order — checked with libsodium's ``crypto_core_ed25519_is_valid_point`` plus an
explicit blocklist of the eight small-order encodings and a canonical-``y`` check, because
OpenSSL (through ``cryptography``) accepts the identity key with the signature (R = identity,
S = 0) for *any* message. P-256 points must lie on the curve. Ed25519 signatures are verified
by libsodium, which also refuses small-order R and non-canonical S.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import nacl.bindings
import nacl.exceptions
import nacl.signing
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from protocols import cbor
from protocols.errors import CborError, CredentialError
from protocols.limits import (
    MAX_KEYRING_BYTES,
    MAX_PROOF_BYTES,
    MAX_REVOCATIONS_BYTES,
    MAX_TIME_STATEMENT_BYTES,
    MAX_TOKEN_BYTES,
)

__all__ = [
    "ALG_EDDSA",
    "ALG_ES256",
    "SMALL_ORDER_ED25519",
    "ContentType",
    "CoseKey",
    "PrivateCoseKey",
    "Sign1",
    "decode_key",
    "decode_private_key",
    "generate_private_key",
    "parse_sign1",
    "sign1",
]

ALG_EDDSA: Final = -8
ALG_ES256: Final = -7
_KTY_OKP, _KTY_EC2 = 1, 2
_CRV_ED25519, _CRV_P256 = 6, 1
_TAG_SIGN1, _TAG_CWT = 18, 61
_ED25519_P: Final = 2**255 - 19
_P256_N: Final = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
#: ES256's signature algorithm (an immutable descriptor: made once, not per verification).
_ECDSA_SHA256: Final = ec.ECDSA(hashes.SHA256())

#: The eight small-order points of edwards25519 in canonical encoding (Chalkias et al. 2020,
#: "Taming the many EdDSAs", Table 6). Non-canonical encodings are refused by the y < p check.
SMALL_ORDER_ED25519: Final = frozenset(
    bytes.fromhex(h)
    for h in (
        "0100000000000000000000000000000000000000000000000000000000000000",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000080",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
    )
)


class ContentType(enum.StrEnum):
    TOKEN = "application/lockgw-token+cwt"  # noqa: S105 - a media type, not a secret
    PROOF = "application/lockgw-proof+cose"
    KEYRING = "application/lockgw-keyring+cbor"
    REVOCATIONS = "application/lockgw-revocations+cbor"
    TIME = "application/lockgw-time+cbor"
    FIRMWARE_MANIFEST = "application/lockgw-firmware-manifest+cbor"


MAX_BYTES: Final[Mapping[ContentType, int]] = {
    ContentType.TOKEN: MAX_TOKEN_BYTES,
    ContentType.PROOF: MAX_PROOF_BYTES,
    ContentType.KEYRING: MAX_KEYRING_BYTES,
    ContentType.REVOCATIONS: MAX_REVOCATIONS_BYTES,
    ContentType.TIME: MAX_TIME_STATEMENT_BYTES,
    ContentType.FIRMWARE_MANIFEST: 16 * 1024,  # 1000 lock ids of ≤ 14 bytes plus the plan
}


def _err(message: str, code: str) -> CredentialError:
    return CredentialError(message, code=code)


# --- keys ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CoseKey:
    """A validated public key. ``alg`` is what it verifies; ``kid`` may be empty."""

    alg: int
    public: bytes  # Ed25519: 32 bytes; P-256: x ‖ y (64 bytes)
    kid: bytes = b""
    _p256: Any = field(default=None, compare=False, repr=False)

    def verify(self, signature: bytes, message: bytes, *, code: str = "token_invalid") -> None:
        """Raise CredentialError(code) unless ``signature`` is valid for ``message``."""
        if self.alg == ALG_EDDSA:
            if len(signature) != 64 or len(self.public) != 32:
                raise _err("Ed25519 signature must be 64 bytes and its key 32", code)
            try:  # libsodium's crypto_sign_open itself: VerifyKey would re-check what is checked
                nacl.bindings.crypto_sign_open(signature + message, self.public)
            except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError) as exc:
                raise _err("signature does not verify", code) from exc
            return
        if len(signature) != 64:
            raise _err("ES256 signature must be 64 bytes (r ‖ s)", code)
        r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        if not (0 < r < _P256_N and 0 < s < _P256_N):
            raise _err("ES256 signature out of range", code)
        try:
            self._p256.verify(encode_dss_signature(r, s), message, _ECDSA_SHA256)
        except InvalidSignature as exc:
            raise _err("signature does not verify", code) from exc

    def to_cbor(self, *, with_kid: bool = True) -> dict[int, cbor.CborValue]:
        out: dict[int, cbor.CborValue]
        if self.alg == ALG_EDDSA:
            out = {1: _KTY_OKP, 3: ALG_EDDSA, -1: _CRV_ED25519, -2: self.public}
        else:
            out = {1: _KTY_EC2, 3: ALG_ES256, -1: _CRV_P256, -2: self.public[:32], -3: self.public[32:]}
        if with_kid and self.kid:
            out[2] = self.kid
        return out

    @property
    def alg_name(self) -> str:
        return "EdDSA" if self.alg == ALG_EDDSA else "ES256"


@functools.lru_cache(maxsize=4096)
def check_ed25519_point(public: bytes) -> None:
    """Refuse non-canonical, off-curve, small-order and mixed-order Ed25519 public keys.

    Memoised: a pure function of 32 bytes whose full check costs a scalar multiplication, and a
    phone presents the same cnf key with every token it holds. A refusal raises, so it is
    never cached: every bad key is checked (and refused) each time.
    """
    if len(public) != 32:
        raise _err("Ed25519 key must be 32 bytes", "bad_key")
    y = int.from_bytes(public, "little") & ((1 << 255) - 1)
    if y >= _ED25519_P:
        raise _err("Ed25519 key is not canonically encoded", "bad_key")
    if public in SMALL_ORDER_ED25519 or (public[:31] + bytes([public[31] & 0x7F])) in SMALL_ORDER_ED25519:
        raise _err("Ed25519 key is a small-order point", "bad_key")
    # libsodium's full check: on the curve, canonical, in the prime-order subgroup.
    if not nacl.bindings.crypto_core_ed25519_is_valid_point(public):
        raise _err("Ed25519 key is not a valid prime-order point", "bad_key")


@functools.lru_cache(maxsize=4096)
def _ed25519_key(x: bytes, kid: bytes) -> CoseKey:
    """A checked Ed25519 CoseKey. Memoised (an immutable value of its two arguments; a refusal
    raises and is not cached): a phone's cnf key is decoded with every token it presents."""
    check_ed25519_point(x)
    return CoseKey(ALG_EDDSA, x, kid)


def _p256_public(x: bytes, y: bytes) -> ec.EllipticCurvePublicKey:
    if len(x) != 32 or len(y) != 32:
        raise _err("P-256 coordinates must be 32 bytes each", "bad_key")
    try:
        return ec.EllipticCurvePublicNumbers(
            int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
        ).public_key()
    except ValueError as exc:
        raise _err("P-256 key is not a point on the curve", "bad_key") from exc


_PUBLIC_LABELS: Final = frozenset({1, 2, 3, 4, -1, -2, -3})
_PRIVATE_LABELS: Final = _PUBLIC_LABELS | {-4}


def decode_key(value: cbor.CborValue, *, allow_private: bool = False) -> CoseKey:
    """Validate a COSE_Key map; raise CredentialError(code="bad_key")."""
    if not isinstance(value, Mapping):
        raise _err("COSE_Key must be a map", "bad_key")
    allowed = _PRIVATE_LABELS if allow_private else _PUBLIC_LABELS
    if not allowed.issuperset(value):
        raise _err(f"COSE_Key has unexpected labels {sorted(set(value) - allowed, key=str)}", "bad_key")
    kty, alg, crv = value.get(1), value.get(3), value.get(-1)
    kid = value.get(2, b"")
    if not isinstance(kid, bytes) or len(kid) > 32:
        raise _err("COSE_Key kid must be a byte string of at most 32 bytes", "bad_key")
    if alg not in (ALG_EDDSA, ALG_ES256) or isinstance(alg, bool):
        raise _err("COSE_Key must carry alg -8 (EdDSA) or -7 (ES256)", "bad_key")
    x = value.get(-2)
    if not isinstance(x, bytes):
        raise _err("COSE_Key x must be a byte string", "bad_key")
    if kty == _KTY_OKP and crv == _CRV_ED25519 and alg == ALG_EDDSA and -3 not in value:
        return _ed25519_key(x, kid)
    if kty == _KTY_EC2 and crv == _CRV_P256 and alg == ALG_ES256:
        y = value.get(-3)
        if not isinstance(y, bytes):
            raise _err("P-256 COSE_Key y must be a byte string (compressed points unsupported)", "bad_key")
        return CoseKey(ALG_ES256, x + y, kid, _p256_public(x, y))
    raise _err("COSE_Key kty/crv/alg must be OKP/Ed25519/EdDSA or EC2/P-256/ES256", "bad_key")


# --- private keys (issuer, holder) ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PrivateCoseKey:
    public: CoseKey
    d: bytes

    def sign(self, message: bytes) -> bytes:
        if self.public.alg == ALG_EDDSA:
            return nacl.signing.SigningKey(self.d).sign(message).signature
        private = ec.derive_private_key(int.from_bytes(self.d, "big"), ec.SECP256R1())
        r, s = decode_dss_signature(private.sign(message, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def to_cbor(self) -> dict[int, cbor.CborValue]:
        return {**self.public.to_cbor(), -4: self.d}


def decode_private_key(value: cbor.CborValue) -> PrivateCoseKey:
    public = decode_key(value, allow_private=True)
    assert isinstance(value, Mapping)
    d = value.get(-4)
    if not isinstance(d, bytes) or len(d) != 32:
        raise _err("private COSE_Key needs d (label -4) of 32 bytes", "bad_key")
    key = PrivateCoseKey(public, d)
    if key.public.alg == ALG_EDDSA:
        derived = bytes(nacl.signing.SigningKey(d).verify_key)
    else:
        point = ec.derive_private_key(int.from_bytes(d, "big"), ec.SECP256R1()).public_key().public_numbers()
        derived = point.x.to_bytes(32, "big") + point.y.to_bytes(32, "big")
    if derived != public.public:
        raise _err("private key d does not match its public part", "bad_key")
    return key


def generate_private_key(alg: int, kid: bytes, rng: Any) -> PrivateCoseKey:
    """New key pair; ``rng(n)`` supplies the secret bytes (os.urandom in production)."""
    if alg == ALG_EDDSA:
        d = rng(32)
        pub = bytes(nacl.signing.SigningKey(d).verify_key)
        check_ed25519_point(pub)
        return PrivateCoseKey(CoseKey(ALG_EDDSA, pub, kid), d)
    while True:
        d = rng(32)
        n = int.from_bytes(d, "big")
        if 0 < n < _P256_N:
            break
    nums = ec.derive_private_key(n, ec.SECP256R1()).public_key().public_numbers()
    x, y = nums.x.to_bytes(32, "big"), nums.y.to_bytes(32, "big")
    return PrivateCoseKey(CoseKey(ALG_ES256, x + y, kid, _p256_public(x, y)), d)


# --- COSE_Sign1 ------------------------------------------------------------------------------


class Sign1(NamedTuple):
    """A parsed, not yet verified COSE_Sign1 (immutable; a NamedTuple, not a frozen dataclass,
    because two are made on every decision)."""

    protected: bytes
    alg: int
    content_type: ContentType
    kid: bytes | None
    payload: bytes
    signature: bytes

    def to_be_signed(self) -> bytes:
        """Sig_structure ``["Signature1", protected, h'', payload]`` (RFC 9052 §4.4)."""
        return b"".join(
            (
                _SIG1_PREFIX,
                _bstr_head(len(self.protected)),
                self.protected,
                b"\x40",
                _bstr_head(len(self.payload)),
                self.payload,
            )
        )

    def verify_with(self, key: CoseKey, *, code: str) -> None:
        """The algorithm is the key's: a protected alg that differs is a rejection."""
        if self.alg != key.alg:
            raise _err(f"document alg {self.alg} does not match the key's alg {key.alg}", code)
        key.verify(self.signature, self.to_be_signed(), code=code)

    def payload_map(self, *, code: str) -> Mapping[Any, cbor.CborValue]:
        try:
            value = cbor.loads(self.payload)
        except CborError as exc:
            raise _err(f"payload is not strict CBOR: {exc}", code) from exc
        if not isinstance(value, Mapping):
            raise _err("payload must be a CBOR map", code)
        return value


_SIG1_PREFIX: Final = b"\x84" + cbor.dumps("Signature1")
_bstr_head = cbor.bstr_head


def parse_sign1(raw: bytes, expected: ContentType, *, code: str, require_kid: bool = True) -> Sign1:
    """Parse, bounded, a COSE_Sign1 of the expected content type. Raises CredentialError(code).

    The refusals of CONTRACT §3.1 and §8.12 (THREATS T1) in order: size and strict CBOR
    (:func:`_document`), the COSE_Sign1 shape (:func:`_sign1_fields`), the protected header
    (:func:`_protected_header`).
    """
    fields = _common_sign1(raw, expected)
    if fields is None:
        fields = _sign1_fields(_document(raw, expected, code), code)
    protected, payload, signature = fields
    alg, kid = _protected_header(protected, expected, code, require_kid)
    return Sign1(protected, alg, expected, kid, payload, signature)


def _common_sign1(raw: bytes, expected: ContentType) -> tuple[bytes, bytes, bytes] | None:
    """The fields of a document in the shape every issuer of ours writes, read without the
    general decoder; ``None`` for any other input, which then takes the general path.

    The shape: within the size limit, optional tag 61 (a token only) and tag 18 in their
    shortest heads, then exactly ``[bstr, {}, bstr, bstr]`` with definite shortest-or-not
    lengths of up to 65535 bytes, ending at the last byte. The strict decoder accepts every
    such input (4 items, nesting 4, nothing to UTF-8-decode) and returns these same fields.
    """
    n = len(raw)
    if n > MAX_BYTES[expected] or n < 5:
        return None
    pos = 2 if raw[0] == 0xD8 and raw[1] == _TAG_CWT and expected is ContentType.TOKEN else 0
    if raw[pos] == 0xC0 | _TAG_SIGN1:
        pos += 1
    if raw[pos] != 0x84:
        return None
    protected = _bstr_at(raw, pos + 1)
    if protected is None or protected[1] >= n or raw[protected[1]] != 0xA0:
        return None
    payload = _bstr_at(raw, protected[1] + 1)
    signature = _bstr_at(raw, payload[1]) if payload is not None else None
    if payload is None or signature is None or signature[1] != n:
        return None
    return raw[protected[0] : protected[1]], raw[payload[0] : payload[1]], raw[signature[0] : signature[1]]


def _bstr_at(raw: bytes, pos: int) -> tuple[int, int] | None:
    """(start, end) of the byte string whose head is at ``pos`` (lengths up to 65535)."""
    if pos >= len(raw):
        return None
    head = raw[pos]
    if 0x40 <= head < 0x58:
        start, length = pos + 1, head - 0x40
    elif head == 0x58 and pos + 1 < len(raw):
        start, length = pos + 2, raw[pos + 1]
    elif head == 0x59 and pos + 2 < len(raw):
        start, length = pos + 3, raw[pos + 1] << 8 | raw[pos + 2]
    else:
        return None
    end = start + length
    return (start, end) if end <= len(raw) else None


def _document(raw: bytes, expected: ContentType, code: str) -> cbor.CborValue:
    """The type's size limit, strict CBOR, then the optional tags: 61 (a token only), 18."""
    limit = MAX_BYTES[expected]
    if len(raw) > limit:
        raise _err(f"document of {len(raw)} bytes exceeds the {limit}-byte limit", code)
    try:
        value = cbor.loads(raw)
    except CborError as exc:
        raise _err(f"not strict CBOR: {exc}", code) from exc
    if isinstance(value, cbor.Tag) and value.number == _TAG_CWT and expected is ContentType.TOKEN:
        value = value.value
    if isinstance(value, cbor.Tag) and value.number == _TAG_SIGN1:
        value = value.value
    return value


def _sign1_fields(value: cbor.CborValue, code: str) -> tuple[bytes, bytes, bytes]:
    """``[protected: bstr, unprotected: {}, payload: bstr, signature: bstr]``."""
    if not isinstance(value, list) or len(value) != 4:
        raise _err("not a COSE_Sign1 (a 4-element array, optionally tag 18)", code)
    protected, unprotected, payload, signature = value
    if not isinstance(protected, bytes) or not isinstance(payload, bytes) or not isinstance(signature, bytes):
        raise _err("COSE_Sign1 fields have wrong types", code)
    if not isinstance(unprotected, Mapping) or unprotected:
        raise _err("the unprotected header must be an empty map", code)
    return protected, payload, signature


@functools.lru_cache(maxsize=256)
def _protected_header(
    protected: bytes, expected: ContentType, code: str, require_kid: bool
) -> tuple[int, bytes | None]:
    """Strict CBOR holding only alg (an integer), the expected content type and the kid (1..32
    bytes where required, absent where not). Returns (alg, kid).

    Memoised: a pure function of its arguments, and a gateway sees a handful of headers (one
    per issuing key and kind); a refusal is never cached (it raises), and the cache is bounded.
    """
    try:
        header = cbor.loads(protected)
    except CborError as exc:
        raise _err(f"protected header is not strict CBOR: {exc}", code) from exc
    if not isinstance(header, Mapping) or not set(header) <= {1, 3, 4}:
        raise _err("protected header may hold only alg (1), content type (3) and kid (4)", code)
    alg, ctype, kid = header.get(1), header.get(3), header.get(4)
    if not isinstance(alg, int) or isinstance(alg, bool):
        raise _err("protected header lacks an integer alg", code)
    if ctype != str(expected):
        shown = ctype if isinstance(ctype, str | int) else type(ctype).__name__
        raise _err(f"content type {shown!r} is not {expected}", code)
    if require_kid:
        if not isinstance(kid, bytes) or not 1 <= len(kid) <= 32:
            raise _err("protected header lacks a kid of 1..32 bytes", code)
    elif kid is not None:
        raise _err("this document must not carry a kid", code)
    return alg, kid if isinstance(kid, bytes) else None


def sign1(payload: bytes, key: PrivateCoseKey, content_type: ContentType, *, kid: bytes | None) -> bytes:
    """Produce a tagged COSE_Sign1 (the reference issuer's encoder)."""
    header: dict[int, cbor.CborValue] = {1: key.public.alg, 3: str(content_type)}
    if kid is not None:
        header[4] = kid
    protected = cbor.dumps(header)
    tbs = cbor.dumps(["Signature1", protected, b"", payload])
    return cbor.dumps(cbor.Tag(_TAG_SIGN1, [protected, {}, payload, key.sign(tbs)]))
