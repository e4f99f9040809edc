"""The reference issuer's document builders (pure): what central integrators copy.

Every builder returns the exact COSE bytes of CONTRACT §3. ``lockgw-issuer`` (gateway/
issuer_cli.py) wraps them with files and arguments; tests and the demo call them directly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from protocols import cbor
from protocols.cose import ContentType, CoseKey, PrivateCoseKey, sign1

__all__ = ["KeyringEntry", "keyring", "proof", "revocations", "time_statement", "token"]


@dataclass(frozen=True, slots=True)
class KeyringEntry:
    key: CoseKey
    nbf: int
    exp: int
    roles: Sequence[str]
    max_ttl: int = 43200
    bearer: bool = False


def keyring(
    root: PrivateCoseKey, *, site: str, version: int, iat: int, exp: int, entries: Iterable[KeyringEntry]
) -> bytes:
    payload: dict[str, cbor.CborValue] = {
        "site": site,
        "version": version,
        "iat": iat,
        "exp": exp,
        "keys": [
            {
                "kid": e.key.kid,
                "key": e.key.to_cbor(with_kid=False),
                "nbf": e.nbf,
                "exp": e.exp,
                "roles": list(e.roles),
                "max_ttl": e.max_ttl,
                "bearer": e.bearer,
            }
            for e in entries
        ],
    }
    return sign1(cbor.dumps(payload), root, ContentType.KEYRING, kid=root.public.kid)


def revocations(
    signer: PrivateCoseKey,
    *,
    site: str,
    version: int,
    iat: int,
    exp: int,
    cti: Iterable[bytes] = (),
    sub: Iterable[tuple[str, int]] = (),
) -> bytes:
    payload: dict[str, cbor.CborValue] = {
        "site": site,
        "version": version,
        "iat": iat,
        "exp": exp,
        "cti": list(cti),
        "sub": [[s, t] for s, t in sub],
    }
    return sign1(cbor.dumps(payload), signer, ContentType.REVOCATIONS, kid=signer.public.kid)


def time_statement(signer: PrivateCoseKey, *, site: str, t: int, reset: bool = False) -> bytes:
    """``{"site", "t"}``; ``reset=True`` adds ``"reset": true``, which gateways accept only from a
    root key: it sets their time floor to ``t`` even when lower (CONTRACT §8.7)."""
    payload: dict[str, cbor.CborValue] = {"site": site, "t": t}
    if reset:
        payload["reset"] = True
    return sign1(cbor.dumps(payload), signer, ContentType.TIME, kid=signer.public.kid)


def token(
    signer: PrivateCoseKey,
    *,
    iss: str,
    sub: str,
    aud: str,
    iat: int,
    exp: int,
    locks: Sequence[str],
    act: Sequence[str] = ("unlock",),
    role: str = "staff",
    holder: CoseKey | None = None,
    alarm: str | None = None,
    nbf: int | None = None,
    rng: Callable[[int], bytes],
) -> bytes:
    """A CWT unlock token; ``holder`` binds it to the phone key (cnf), else it is a bearer token."""
    claims: dict[object, cbor.CborValue] = {
        1: iss,
        2: sub,
        3: aud,
        4: exp,
        6: iat,
        7: rng(16),
        "locks": list(locks),
        "act": list(act),
        "role": role,
    }
    if nbf is not None:
        claims[5] = nbf
    if holder is not None:
        claims[8] = {1: holder.to_cbor(with_kid=False)}
    if alarm is not None:
        claims["alarm"] = alarm
    return sign1(cbor.dumps(claims), signer, ContentType.TOKEN, kid=signer.public.kid)


def proof(holder: PrivateCoseKey, *, token_bytes: bytes, nonce: bytes, gw: str, lock: str, act: str) -> bytes:
    """The phone's answer to a challenge (CONTRACT §3.4): signed by the cnf key, no kid."""
    payload: dict[str, cbor.CborValue] = {
        "nonce": nonce,
        "gw": gw,
        "lock": lock,
        "act": act,
        "th": hashlib.sha256(token_bytes).digest(),
    }
    return sign1(cbor.dumps(payload), holder, ContentType.PROOF, kid=None)
