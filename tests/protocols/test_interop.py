"""Interoperability with an independent COSE/CWT implementation (the `cwt` package, with
`cbor2` as the independent CBOR encoder): its documents verify here, ours verify there."""

from __future__ import annotations

import hashlib

import cbor2
import pytest
from credfix import GW, LOCK, SITE, T0, World
from cwt import COSE, COSEKey

from protocols import cbor
from protocols.cose import ALG_EDDSA, ALG_ES256, generate_private_key
from protocols.credentials import Authority


def their_sign(payload: bytes, key_cbor: dict, alg: int, ctype: str, kid: bytes | None) -> bytes:
    protected: dict[int, object] = {1: alg, 3: ctype}
    if kid is not None:
        protected[4] = kid
    return COSE.new().encode_and_sign(payload, COSEKey.new(key_cbor), protected=protected, unprotected={})


@pytest.mark.parametrize("alg", [ALG_EDDSA, ALG_ES256])
def test_their_keyring_token_and_proof_are_accepted(alg: int) -> None:
    w = World()
    w.root = generate_private_key(alg, b"root-1", w.rng)
    w.holder = generate_private_key(alg, b"", w.rng)
    issuer_key = generate_private_key(alg, b"iss-x", w.rng)
    keyring = cbor2.dumps(
        {
            "site": SITE,
            "version": 1,
            "iat": T0 - 10,
            "exp": T0 + 86400,
            "keys": [
                {
                    "kid": b"iss-x",
                    "key": issuer_key.public.to_cbor(with_kid=False),
                    "nbf": T0 - 100,
                    "exp": T0 + 86400,
                    "roles": ["staff"],
                    "max_ttl": 43200,
                    "bearer": False,
                }
            ],
        }
    )
    auth = Authority(gw_id=GW, site=SITE, roots={b"root-1": w.root.public}, policy=w.policy, floor=T0 - 10**6)
    assert auth.install(
        their_sign(keyring, w.root.to_cbor(), alg, "application/lockgw-keyring+cbor", b"root-1"),
        wall=T0,
        synced=True,
    ).installed
    claims = cbor2.dumps(
        {
            1: "central",
            2: "staff-9",
            3: SITE,
            4: T0 + 600,
            6: T0 - 5,
            7: bytes(range(16)),
            8: {1: w.holder.public.to_cbor(with_kid=False)},
            "locks": [LOCK],
            "act": ["unlock"],
            "role": "staff",
        }
    )
    token = their_sign(claims, issuer_key.to_cbor(), alg, "application/lockgw-token+cwt", b"iss-x")
    nonce = auth.challenge(lock=LOCK, action="unlock", mono=1.0, rng=w.rng)
    proof_payload = cbor2.dumps(
        {"nonce": nonce, "gw": GW, "lock": LOCK, "act": "unlock", "th": hashlib.sha256(token).digest()}
    )
    proof = their_sign(proof_payload, w.holder.to_cbor(), alg, "application/lockgw-proof+cose", None)
    d = auth.decide(token, proof, lock=LOCK, action="unlock", wall=T0, synced=True, mono=2.0)
    assert d.sub == "staff-9"


@pytest.mark.parametrize("alg", [ALG_EDDSA, ALG_ES256])
def test_our_documents_verify_there(alg: int) -> None:
    w = World()
    signer = generate_private_key(alg, b"iss-a", w.rng)
    w.issuer_a = signer
    token = w.token()
    payload = COSE.new().decode(token, COSEKey.new(signer.public.to_cbor()))
    claims = cbor2.loads(payload)
    assert claims[2] == "staff-17" and claims["locks"] == [LOCK]
    assert cbor2.loads(cbor.dumps(claims)) == claims  # our CBOR and cbor2 agree on the payload
    auth = w.authority()
    proof = w.prove(auth, token)
    assert COSE.new().decode(proof, COSEKey.new(w.holder.public.to_cbor()))
