"""The credential corpus: every acceptance path and every rejection code of CONTRACT §3/§8.4."""

from __future__ import annotations

import hashlib

import pytest
from credfix import GW, LOCK, SITE, T0, World

from protocols import cbor, credentials, issuer
from protocols.cose import ALG_EDDSA, ContentType, PrivateCoseKey, generate_private_key, sign1
from protocols.credentials import Authority, Challenges, Decision, Policy, TimeState
from protocols.errors import TokenError, TrustDocumentError


def decide(
    auth: Authority,
    token: bytes,
    proof: bytes | None,
    *,
    lock: str = LOCK,
    action: str = "unlock",
    wall: float = T0,
    synced: bool = True,
    mono: float = 101.0,
):
    return auth.decide(token, proof, lock=lock, action=action, wall=wall, synced=synced, mono=mono)


def code_of(auth: Authority, token: bytes, proof: bytes | None = None, **kw) -> str:
    with pytest.raises(TokenError) as info:
        decide(auth, token, proof, **kw)
    return info.value.code


@pytest.fixture
def w() -> World:
    return World()


def test_holder_bound_token_with_proof_is_granted(w: World) -> None:
    auth = w.authority()
    tok = w.token()
    d = decide(auth, tok, w.prove(auth, tok))
    assert (d.lock, d.action, d.sub, d.role, d.trust_state, d.time_state) == (
        LOCK,
        "unlock",
        "staff-17",
        "staff",
        "ok",
        TimeState.SYNCED,
    )
    assert d.priority == "normal" and d.flags == ()


def test_es256_issuer_and_es256_holder(w: World) -> None:
    auth = w.authority()
    w.holder = generate_private_key(-7, b"", w.rng)
    tok = w.token(w.issuer_b)
    assert decide(auth, tok, w.prove(auth, tok)).kid == b"iss-b".hex()


def test_bearer_token_from_bearer_key_needs_no_proof(w: World) -> None:
    auth = w.authority()
    assert decide(auth, w.token(w.bearer_key, holder=False), None).sub == "staff-17"


def test_T4_no_cnf_from_non_bearer_key_is_proof_required(w: World) -> None:
    assert code_of(w.authority(), w.token(holder=False)) == "proof_required"


def test_T4_cnf_token_without_proof_is_proof_required(w: World) -> None:
    assert code_of(w.authority(), w.token()) == "proof_required"


def test_T4_two_challenges_two_proofs_both_accepted_and_replay_refused(w: World) -> None:
    auth = w.authority()
    tok = w.token()
    p1, p2 = w.prove(auth, tok), w.prove(auth, tok)
    decide(auth, tok, p1)
    decide(auth, tok, p2)
    assert code_of(auth, tok, p1) == "nonce_unknown"


def test_T4_nonce_expired_after_30s_and_bound_to_lock_and_action(w: World) -> None:
    auth = w.authority()
    tok = w.token()
    assert code_of(auth, tok, w.prove(auth, tok, mono=100.0), mono=130.5) == "nonce_expired"
    assert code_of(auth, tok, w.prove(auth, tok, act="lock"), action="unlock") == "nonce_unknown"
    assert code_of(auth, tok, w.prove(auth, tok), action="lock") == "nonce_unknown"
    assert code_of(auth, tok, w.prove(auth, tok, nonce=bytes(32))) == "nonce_unknown"


def test_T4_proof_for_other_gateway_lock_action_or_token_is_proof_invalid(w: World) -> None:
    auth = w.authority()
    tok = w.token()
    other = w.token()
    n = auth.challenge(lock=LOCK, action="unlock", mono=100, rng=w.rng)
    assert (
        code_of(
            auth,
            tok,
            issuer.proof(w.holder, token_bytes=tok, nonce=n, gw="gw-other", lock=LOCK, act="unlock"),
        )
        == "proof_invalid"
    )
    n = auth.challenge(lock=LOCK, action="unlock", mono=100, rng=w.rng)
    assert (
        code_of(auth, tok, issuer.proof(w.holder, token_bytes=other, nonce=n, gw=GW, lock=LOCK, act="unlock"))
        == "proof_invalid"
    )
    n = auth.challenge(lock=LOCK, action="unlock", mono=100, rng=w.rng)
    thief = generate_private_key(ALG_EDDSA, b"", w.rng)
    assert (
        code_of(auth, tok, issuer.proof(thief, token_bytes=tok, nonce=n, gw=GW, lock=LOCK, act="unlock"))
        == "proof_invalid"
    )
    n = auth.challenge(lock=LOCK, action="unlock", mono=100, rng=w.rng)
    garbage = sign1(cbor.dumps({"nonce": n}), w.holder, ContentType.PROOF, kid=None)
    assert code_of(auth, tok, garbage) == "proof_invalid"


def test_no_keyring_everything_is_unknown_key(w: World) -> None:
    auth = w.authority(install=False)
    assert auth.trust_state(T0) == "none"
    assert code_of(auth, w.token()) == "unknown_key"


@pytest.mark.parametrize("kid", [b"../x", b"' OR 1=1", b"nope"])
def test_T2_hostile_or_unknown_kid_is_unknown_key(w: World, kid: bytes) -> None:
    rogue = generate_private_key(ALG_EDDSA, kid, w.rng)
    assert code_of(w.authority(), w.token(rogue)) == "unknown_key"


def test_T2_10kB_kid_is_refused_before_crypto(w: World) -> None:
    rogue = generate_private_key(ALG_EDDSA, b"", w.rng)
    tok = issuer.token(rogue, iss="x", sub="y", aud=SITE, iat=T0, exp=T0 + 60, locks=[LOCK], rng=w.rng)
    big = sign1(cbor.loads(tok).value[2], rogue, ContentType.TOKEN, kid=b"k" * 10_000)  # type: ignore[union-attr]
    assert code_of(w.authority(), big) == "token_invalid"


def _resign_with_header(
    doc: bytes, key: PrivateCoseKey, header: dict, unprotected: dict | None = None
) -> bytes:
    arr = cbor.loads(doc).value  # type: ignore[union-attr]
    protected = cbor.dumps(header)
    sig = key.sign(cbor.dumps(["Signature1", protected, b"", arr[2]]))
    return cbor.dumps(cbor.Tag(18, [protected, unprotected or {}, arr[2], sig]))


@pytest.mark.parametrize(
    "header",
    [
        {3: "application/lockgw-token+cwt", 4: b"iss-a"},  # no alg
        {1: 0, 3: "application/lockgw-token+cwt", 4: b"iss-a"},  # alg none-ish
        {1: 5, 3: "application/lockgw-token+cwt", 4: b"iss-a"},  # HS256
        {1: -7, 3: "application/lockgw-token+cwt", 4: b"iss-a"},  # ES256 claimed for an EdDSA key
        {1: -8, 3: 61, 4: b"iss-a"},  # CoAP content-format number instead of the text
        {1: -8, 3: "application/lockgw-proof+cose", 4: b"iss-a"},  # type confusion
        {1: -8, 3: "application/lockgw-token+cwt", 4: b"iss-a", 33: b"x5chain"},
    ],
)
def test_T1_T6_header_attacks_are_token_invalid(w: World, header: dict) -> None:
    assert code_of(w.authority(), _resign_with_header(w.token(), w.issuer_a, header)) == "token_invalid"


def test_T1_alg_in_unprotected_header_is_refused(w: World) -> None:
    hdr = {1: -8, 3: "application/lockgw-token+cwt", 4: b"iss-a"}
    assert code_of(w.authority(), _resign_with_header(w.token(), w.issuer_a, hdr, {1: -8})) == "token_invalid"


def test_forged_truncated_and_bit_flipped_tokens(w: World) -> None:
    auth = w.authority()
    tok = w.token()
    forger = generate_private_key(ALG_EDDSA, b"iss-a", w.rng)
    assert code_of(auth, w.token(forger)) == "token_invalid"
    assert code_of(auth, tok[:-1]) == "token_invalid"
    for i in range(0, len(tok), 7):
        flipped = bytearray(tok)
        flipped[i] ^= 0x01
        with pytest.raises(TokenError):
            decide(auth, bytes(flipped), w.prove(auth, bytes(flipped)))


def test_T6_a_keyring_or_proof_presented_as_token_is_refused(w: World) -> None:
    auth = w.authority()
    assert code_of(auth, w.keyring()) == "token_invalid"
    assert code_of(auth, w.prove(auth, w.token())) == "token_invalid"


def test_T6_oversize_indefinite_duplicate_and_deep_tokens_refused_before_crypto(w: World) -> None:
    auth = w.authority()
    assert code_of(auth, bytes(2049)) == "token_invalid"
    assert code_of(auth, bytes.fromhex("d29f40a040ff")) == "token_invalid"
    assert code_of(auth, bytes.fromhex("a201010102")) == "token_invalid"
    assert code_of(auth, bytes.fromhex("81" * 9 + "01")) == "token_invalid"


def test_trailing_bytes_after_token_refused(w: World) -> None:
    auth = w.authority()
    tok = w.token()
    assert code_of(auth, tok + b"\x00", w.prove(auth, tok + b"\x00")) == "token_invalid"


def test_cwt_tag_61_wrapping_is_accepted(w: World) -> None:
    auth = w.authority()
    tok = cbor.dumps(cbor.Tag(61, cbor.loads(w.token())))
    assert decide(auth, tok, w.prove(auth, tok)).sub == "staff-17"


def test_claims_order_audience_lock_action(w: World) -> None:
    auth = w.authority()
    assert code_of(auth, w.token(aud="site-b")) == "wrong_audience"
    to_gw = w.token(aud=GW)
    assert decide(auth, to_gw, w.prove(auth, to_gw)).lock == LOCK
    assert code_of(auth, w.token(locks=["lk-other"])) == "wrong_lock"
    assert code_of(auth, w.token(act=["lock"])) == "action_not_allowed"
    assert code_of(auth, w.token(act=["status"])) == "action_not_allowed"  # status in act is reserved


def test_time_checks(w: World) -> None:
    auth = w.authority()
    assert code_of(auth, w.token(iat=T0 + 3600)) == "token_not_yet_valid"
    assert code_of(auth, w.token(nbf=T0 + 600)) == "token_not_yet_valid"
    assert code_of(auth, w.token(iat=T0 - 7200, ttl=3600)) == "token_expired"
    t = w.token(iat=T0 - 3600 - 59, ttl=3600)  # expired 59 s ago: within leeway
    assert decide(auth, t, w.prove(auth, t)).exp < T0
    t = w.token(iat=T0 + 59)  # 59 s ahead: within leeway
    assert decide(auth, t, w.prove(auth, t))


def test_lifetime_caps(w: World) -> None:
    auth = w.authority()
    assert code_of(auth, w.token(ttl=43201)) == "token_invalid"
    assert code_of(auth, w.token(w.issuer_b, ttl=8 * 3600 + 1)) == "token_invalid"  # key max_ttl
    w.policy = Policy(max_token_ttl_s=1800)
    assert code_of(w.authority(), w.token(ttl=3600)) == "token_invalid"


def test_emergency_tokens(w: World) -> None:
    auth = w.authority()
    t = w.token(role="emergency", alarm="alarm-2026-991", ttl=1800)
    d = decide(auth, t, w.prove(auth, t))
    assert d.role == "emergency" and d.priority == "high" and d.alarm == "alarm-2026-991"
    assert code_of(auth, w.token(role="emergency", ttl=1800)) == "token_invalid"  # no alarm ref
    assert code_of(auth, w.token(role="emergency", alarm="a", ttl=3601)) == "token_invalid"
    assert code_of(auth, w.token(role="emergency", alarm="a", locks=[LOCK, "lk-2"])) == "token_invalid"
    assert (
        code_of(auth, w.token(w.issuer_b, role="emergency", alarm="a")) == "token_invalid"
    )  # key lacks role
    assert code_of(auth, w.token(role="revocations")) == "token_invalid"


@pytest.mark.parametrize(
    ("claims_patch", "code"),
    [
        # The contract's order checks lock and act membership before claim shapes (§8.4).
        ({"locks": []}, "wrong_lock"),
        ({"locks": ["UPPER"]}, "wrong_lock"),
        ({"act": []}, "action_not_allowed"),
        ({"act": ["open"]}, "action_not_allowed"),
        ({"locks": [LOCK, LOCK]}, "token_invalid"),
        ({"locks": [LOCK, "UPPER"]}, "token_invalid"),
        ({"act": ["unlock", "open"]}, "token_invalid"),
        ({7: b"short"}, "token_invalid"),
        ({2: ""}, "token_invalid"),
        ({"extra": 1}, "token_invalid"),
        ({5: "soon"}, "token_invalid"),
        ({8: {1: {1: 1, 3: -8, -1: 6, -2: bytes(32)}}}, "token_invalid"),
        ({8: b"x"}, "token_invalid"),
        ({1: 5}, "token_invalid"),
    ],
)
def test_malformed_claims_are_refused_in_contract_order(w: World, claims_patch: dict, code: str) -> None:
    tok = w.token()
    claims = dict(cbor.loads(cbor.loads(tok).value[2]))  # type: ignore[union-attr, arg-type]
    claims.update(claims_patch)
    bad = sign1(cbor.dumps(claims), w.issuer_a, ContentType.TOKEN, kid=b"iss-a")
    auth = w.authority()
    assert code_of(auth, bad, w.prove(auth, bad)) == code


def test_T3_small_order_cnf_key_cannot_turn_into_a_bearer_token(w: World) -> None:
    """The identity key with (R = identity, S = 0) verifies any message under OpenSSL."""
    identity = bytes.fromhex("01" + "00" * 31)
    tok = w.token()
    claims = dict(cbor.loads(cbor.loads(tok).value[2]))  # type: ignore[union-attr, arg-type]
    claims[8] = {1: {1: 1, 3: -8, -1: 6, -2: identity}}
    bad = sign1(cbor.dumps(claims), w.issuer_a, ContentType.TOKEN, kid=b"iss-a")
    auth = w.authority()
    n = auth.challenge(lock=LOCK, action="unlock", mono=100, rng=w.rng)
    import hashlib

    payload = cbor.dumps(
        {"nonce": n, "gw": GW, "lock": LOCK, "act": "unlock", "th": hashlib.sha256(bad).digest()}
    )
    protected = cbor.dumps({1: -8, 3: "application/lockgw-proof+cose"})
    forged = cbor.dumps(cbor.Tag(18, [protected, {}, payload, identity + bytes(32)]))
    assert code_of(auth, bad, forged) == "token_invalid"


def test_B11_revocation_by_cti_and_by_subject(w: World) -> None:
    auth = w.authority()
    tok = w.token()
    cti = cbor.loads(cbor.loads(tok).value[2])[7]  # type: ignore[union-attr, index, call-overload]
    auth.install(
        issuer.revocations(w.issuer_a, site=SITE, version=1, iat=T0 - 10, exp=T0 + 86400, cti=[cti]),
        wall=T0,
        synced=True,
    )
    assert code_of(auth, tok, w.prove(auth, tok)) == "token_revoked"
    auth.install(
        issuer.revocations(
            w.issuer_a, site=SITE, version=2, iat=T0 - 5, exp=T0 + 86400, sub=[("staff-17", T0 - 100)]
        ),
        wall=T0,
        synced=True,
    )
    old = w.token(iat=T0 - 200)
    assert code_of(auth, old, w.prove(auth, old)) == "token_revoked"
    fresh = w.token(iat=T0 - 50)  # issued after the subject's revocation: valid again
    assert decide(auth, fresh, w.prove(auth, fresh))


def test_T6_re_encoded_revoked_token_stays_revoked(w: World) -> None:
    auth = w.authority()
    tok = w.token()
    inner = cbor.loads(tok).value  # type: ignore[union-attr]
    cti = cbor.loads(inner[2])[7]  # type: ignore[index, call-overload]
    auth.install(
        issuer.revocations(w.issuer_a, site=SITE, version=1, iat=T0, exp=T0 + 86400, cti=[cti]),
        wall=T0,
        synced=True,
    )
    untagged = cbor.dumps(inner)  # same signature, different bytes
    assert code_of(auth, untagged, w.prove(auth, untagged)) == "token_revoked"


def test_stale_revocations_accept_flags_and_deny_refuses(w: World) -> None:
    auth = w.authority()
    auth.install(
        issuer.revocations(w.issuer_a, site=SITE, version=1, iat=T0 - 100, exp=T0 - 1), wall=T0, synced=True
    )
    t = w.token()
    d = decide(auth, t, w.prove(auth, t))
    assert d.trust_state == "stale" and "stale_revocations" in d.flags
    w.policy = Policy(on_stale_revocations="deny")
    auth = w.authority()
    auth.install(
        issuer.revocations(w.issuer_a, site=SITE, version=1, iat=T0 - 100, exp=T0 - 1), wall=T0, synced=True
    )
    assert code_of(auth, t, w.prove(auth, t)) == "stale_trust"


# --- trust documents ------------------------------------------------------------------------


def trust_code(auth: Authority, raw: bytes) -> str:
    with pytest.raises(TrustDocumentError) as info:
        auth.install(raw, wall=T0, synced=True)
    return info.value.code


def test_T5_keyring_rollback_other_site_and_bad_signature(w: World) -> None:
    auth = w.authority()
    assert auth.install(w.keyring(), wall=T0, synced=True).installed is False  # same again: silent
    assert auth.install(w.keyring(2), wall=T0, synced=True).installed is True
    assert trust_code(auth, w.keyring(1)) == "rollback"
    assert trust_code(auth, w.keyring(3, site="site-b")) == "wrong_site"
    forged_root = generate_private_key(ALG_EDDSA, b"root-1", w.rng)
    assert trust_code(
        auth, issuer.keyring(forged_root, site=SITE, version=9, iat=T0, exp=T0 + 1, entries=[])
    ) in {"bad_signature", "malformed"}
    assert auth.keyring is not None and auth.keyring.version == 2


def test_keyring_with_duplicate_kids_or_bad_keys_is_refused(w: World) -> None:
    auth = w.authority(install=False)
    dup = issuer.keyring(
        w.root,
        site=SITE,
        version=1,
        iat=T0,
        exp=T0 + 86400,
        entries=[
            issuer.KeyringEntry(w.issuer_a.public, T0, T0 + 1, ["staff"]),
            issuer.KeyringEntry(w.issuer_a.public, T0, T0 + 1, ["staff"]),
        ],
    )
    assert trust_code(auth, dup) == "malformed"
    payload = {
        "site": SITE,
        "version": 1,
        "iat": T0,
        "exp": T0 + 1,
        "keys": [
            {
                "kid": b"bad",
                "key": {1: 1, 3: -8, -1: 6, -2: bytes.fromhex("ec" + "ff" * 30 + "7f")},
                "nbf": T0,
                "exp": T0 + 1,
                "roles": ["staff"],
                "max_ttl": 60,
                "bearer": False,
            }
        ],
    }
    assert (
        trust_code(auth, sign1(cbor.dumps(payload), w.root, ContentType.KEYRING, kid=b"root-1")) == "bad_key"
    )


def test_revocation_rollback_and_wrong_signer(w: World) -> None:
    auth = w.authority()
    auth.install(
        issuer.revocations(w.issuer_a, site=SITE, version=5, iat=T0, exp=T0 + 10), wall=T0, synced=True
    )
    assert (
        trust_code(auth, issuer.revocations(w.issuer_a, site=SITE, version=4, iat=T0, exp=T0 + 10))
        == "rollback"
    )
    assert (
        trust_code(auth, issuer.revocations(w.issuer_b, site=SITE, version=6, iat=T0, exp=T0 + 10))
        == "bad_signature"
    )
    assert auth.install(
        issuer.revocations(w.root, site=SITE, version=6, iat=T0, exp=T0 + 10), wall=T0, synced=True
    ).installed


def test_T5_expired_keyring_keeps_working_flagged_stale(w: World) -> None:
    auth = w.authority()
    auth.install(w.keyring(2, exp=T0 - 1), wall=T0, synced=True)  # stale on arrival, still installed
    t = w.token()
    d = decide(auth, t, w.prove(auth, t))
    assert d.trust_state == "stale" and "stale_keyring" in d.flags


def test_A2_rotation_old_key_signs_until_its_exp_and_verifies_after(w: World) -> None:
    """Two overlapping issuer keys; a token signed by A while A was valid stays valid to its exp."""
    auth = w.authority()
    a_exp = T0 + 60 * 86400
    late = w.token(iat=a_exp - 100, ttl=3600)  # signed by A just before A expired
    at = a_exp + 1000  # A has now expired
    assert decide(auth, late, w.prove(auth, late), wall=at).sub == "staff-17"
    after = w.token(iat=a_exp + 10, ttl=3600)  # A signing after its exp: refused
    assert code_of(auth, after, w.prove(auth, after), wall=at) == "token_invalid"
    b = w.token(w.issuer_b, iat=a_exp + 10, ttl=3600)
    assert decide(auth, b, w.prove(auth, b), wall=at)


def test_A2_expiry_warnings_are_announced_ahead(w: World) -> None:
    auth = w.authority()
    assert auth.expiring(T0) == []
    soon = auth.expiring(T0 + 31 * 86400)  # key A expires at T0 + 60 d: inside 30 days now
    assert [(e.what, e.ident) for e in soon] == [("key", b"iss-a".hex())]
    assert soon[0].days_left == 29.0


def test_document_of_wrong_type_and_garbage(w: World) -> None:
    auth = w.authority()
    assert trust_code(auth, w.token()) == "wrong_type"
    assert trust_code(auth, b"\x00garbage") in {"wrong_type", "malformed"}


# --- CONTRACT §8.14: stateless challenges a flood cannot evict ----------------------------------


def test_T7_100000_challenges_for_one_lock_do_not_evict_the_honest_phones_nonce(w: World) -> None:
    auth = w.authority()
    tok = w.token()
    honest = auth.challenge(lock=LOCK, action="unlock", mono=100.0, rng=w.rng)
    replay_me = auth.challenge(lock=LOCK, action="unlock", mono=100.0, rng=w.rng)
    flood = {
        auth.challenge(lock=LOCK, action="unlock", mono=100.0 + i / 10_000, rng=w.rng) for i in range(100_000)
    }
    assert len(flood) == 100_000 and honest not in flood and all(len(n) == 32 for n in flood)
    assert len(auth.challenges) == 0  # issuing stores nothing
    proof = w.prove(auth, tok, nonce=honest)
    assert decide(auth, tok, proof, mono=110.0).sub == "staff-17"
    assert code_of(auth, tok, proof, mono=111.0) == "nonce_unknown"  # replayed proof
    p2 = w.prove(auth, tok, nonce=replay_me)
    decide(auth, tok, p2, mono=112.0)
    assert code_of(auth, tok, p2, mono=129.0) == "nonce_unknown"
    late = auth.challenge(lock=LOCK, action="unlock", mono=200.0, rng=w.rng)
    assert code_of(auth, tok, w.prove(auth, tok, nonce=late), mono=230.5) == "nonce_expired"
    other_lock = auth.challenge(lock="lk-door-2", action="unlock", mono=300.0, rng=w.rng)
    other_act = auth.challenge(lock=LOCK, action="lock", mono=300.0, rng=w.rng)
    assert code_of(auth, tok, w.prove(auth, tok, nonce=other_lock), mono=301.0) == "nonce_unknown"
    assert code_of(auth, tok, w.prove(auth, tok, nonce=other_act), mono=301.0) == "nonce_unknown"


def test_T4_forged_or_altered_nonces_are_nonce_unknown(w: World) -> None:
    auth = w.authority()
    tok = w.token()
    good = auth.challenge(lock=LOCK, action="unlock", mono=100.0, rng=w.rng)
    for i in range(32):  # any flipped bit: time, random or tag
        bad = bytearray(good)
        bad[i] ^= 0x01
        assert code_of(auth, tok, w.prove(auth, tok, nonce=bytes(bad))) == "nonce_unknown"
    other = w.authority()  # another boot: another secret
    assert code_of(other, tok, w.prove(auth, tok, nonce=good)) == "nonce_unknown"
    assert decide(auth, tok, w.prove(auth, tok, nonce=good)).sub == "staff-17"


def test_T7_a_failed_proof_does_not_consume_the_nonce(w: World) -> None:
    auth = w.authority()
    tok = w.token()
    n = auth.challenge(lock=LOCK, action="unlock", mono=100.0, rng=w.rng)
    thief = generate_private_key(ALG_EDDSA, b"", w.rng)
    forged = issuer.proof(thief, token_bytes=tok, nonce=n, gw=GW, lock=LOCK, act="unlock")
    assert code_of(auth, tok, forged) == "proof_invalid"
    assert len(auth.challenges) == 0  # only a proof that verified is remembered
    assert decide(auth, tok, w.prove(auth, tok, nonce=n)).sub == "staff-17"
    assert len(auth.challenges) == 1


def test_T7_a_full_consumed_set_refuses_busy_and_never_forgets_a_consumed_nonce(w: World) -> None:
    auth = w.authority()
    auth.challenges = Challenges(secret=b"s" * 32, max_consumed=3)
    tok = w.token()
    proofs = [w.prove(auth, tok, mono=100.0) for _ in range(5)]
    for p in proofs[:3]:
        decide(auth, tok, p)
    assert code_of(auth, tok, proofs[3]) == "busy"
    for p in proofs[:3]:
        assert code_of(auth, tok, p) == "nonce_unknown"  # still remembered: no replay
    # 30 s after the consumed ones were issued they expire and room is made again.
    fresh = w.prove(auth, tok, mono=131.0)
    assert decide(auth, tok, fresh, mono=131.5).sub == "staff-17"
    assert len(auth.challenges) == 1


def test_nonce_secret_is_an_argument_and_must_be_long_enough() -> None:
    a = Challenges(secret=b"k" * 32)
    b = Challenges(secret=b"k" * 32)
    rng = lambda n: b"\x07" * n  # noqa: E731
    n = a.issue(lock=LOCK, action="unlock", mono=5.0, rng=rng)
    assert n == b.issue(lock=LOCK, action="unlock", mono=5.0, rng=rng)  # pure: same inputs, same nonce
    b.peek(n, lock=LOCK, action="unlock", mono=6.0)
    with pytest.raises(ValueError):
        Challenges(secret=b"short")


def test_the_check_order_is_the_contracts_as_a_list() -> None:
    """CONTRACT §8.4, steps after request shape, lock and carried documents: one function per
    check, in order — the order is visible (and reviewable) as this list."""
    from protocols.credentials import Authority

    assert [check.__name__ for check in Authority.CHECKS] == [
        "_token_shape",  # token parse and size: token_invalid
        "_known_key",  # kid: unknown_key
        "_signature_window_role",  # signature, key window, role: token_invalid
        "_audience",  # aud: wrong_audience
        "_lock_named",  # lock in locks: wrong_lock
        "_action_allowed",  # act: action_not_allowed
        "_valid_yet",  # nbf / iat ahead: token_not_yet_valid
        "_not_expired",  # exp: token_expired
        "_lifetime_and_claims",  # caps, emergency alarm, shapes, cnf: token_invalid
        "_not_revoked",  # revocation: token_revoked
        "_possession",  # proof: proof_required, nonce_unknown, nonce_expired, proof_invalid
    ]


# --- the canonical-proof shortcut decides exactly as the field-by-field path -----------------


def _proof_variants(w: World, token: bytes, nonce: bytes) -> list[bytes]:
    """Proof payloads signed by the holder: the honest one, each field wrong, and encodings of
    the honest fields that are valid but not the deterministic one."""
    th = hashlib.sha256(token).digest()
    good = {"nonce": nonce, "gw": GW, "lock": LOCK, "act": "unlock", "th": th}
    maps: list[dict[str, cbor.CborValue]] = [
        good,
        {**good, "gw": "gw-other"},
        {**good, "lock": "lk-door-2"},
        {**good, "act": "lock"},
        {**good, "th": bytes(32)},
        {**good, "nonce": nonce[:31]},
        {**good, "nonce": nonce + b"\x00"},
        {**good, "nonce": nonce.hex()},
        {**good, "extra": 1},
        {k: v for k, v in good.items() if k != "th"},
    ]
    payloads = [cbor.dumps(m) for m in maps]
    canonical = payloads[0]
    payloads += [
        # keys in insertion order instead of the deterministic one
        b"\xa5" + b"".join(cbor.dumps(k) + cbor.dumps(v) for k, v in good.items()),
        canonical.replace(b"\x58\x20", b"\x59\x00\x20", 1),  # th's length in a longer head
        canonical[:-34] + b"\x58\x21" + nonce + b"\x00",  # a 33-byte nonce at the end
        canonical[:-1],  # cut
        canonical + b"\x00",  # trailing byte
        canonical.replace(b"\xa5", b"\xa6", 1) + cbor.dumps("th") + cbor.dumps(th),  # th twice
    ]
    return [sign1(p, w.holder, ContentType.PROOF, kid=None) for p in payloads]


def test_canonical_proof_shortcut_matches_the_general_path(w: World, monkeypatch: pytest.MonkeyPatch) -> None:
    def fresh() -> Authority:
        auth = Authority(
            gw_id=GW,
            site=SITE,
            roots={w.root.public.kid: w.root.public},
            policy=w.policy,
            floor=T0 - 86400,
            nonce_secret=b"n" * 32,
        )
        auth.install(w.keyring(), wall=T0, synced=True)
        return auth

    token = w.token()
    nonce = fresh().challenge(lock=LOCK, action="unlock", mono=100.0, rng=w.rng)
    good = issuer.proof(w.holder, token_bytes=token, nonce=nonce, gw=GW, lock=LOCK, act="unlock")
    sign1_good = credentials.parse_sign1(good, ContentType.PROOF, code="x", require_kid=False)
    assert (
        credentials._canonical_proof_nonce(
            sign1_good.payload, GW, LOCK, "unlock", hashlib.sha256(token).digest()
        )
        == nonce
    ), "the shortcut must take what our issuer writes"

    def outcome(proof: bytes) -> object:
        try:
            return decide(fresh(), token, proof)
        except TokenError as exc:
            return (exc.code, str(exc))

    variants = [good, *_proof_variants(w, token, nonce)]
    shortcut = [outcome(p) for p in variants]
    monkeypatch.setattr(credentials, "_canonical_proof_nonce", lambda *_: None)
    general = [outcome(p) for p in variants]
    assert shortcut == general
    granted = [isinstance(o, Decision) for o in general]
    # The honest proof twice (issuer and test encoder), the non-deterministic encodings
    # (insertion order, long head) are granted; every wrong field and malformed encoding is not.
    assert granted == [True, True] + [False] * 9 + [True, True] + [False] * 4


# --- trust-document refusals the install steps make (CONTRACT §8.5), one per step ------------


def test_keyring_refusals_in_step_order(w: World) -> None:
    auth = w.authority(install=False)
    stranger = generate_private_key(ALG_EDDSA, b"root-x", w.rng)
    entry = issuer.KeyringEntry(w.issuer_a.public, T0 - 86400, T0 + 86400, ["staff"])

    def keyring(signer: PrivateCoseKey, *entries: issuer.KeyringEntry, site: str = SITE) -> bytes:
        return issuer.keyring(signer, site=site, version=5, iat=T0 - 60, exp=T0 + 86400, entries=entries)

    def code(raw: bytes) -> str:
        with pytest.raises(TrustDocumentError) as info:
            auth.install(raw, wall=T0, synced=True)
        return info.value.code

    assert code(keyring(stranger, entry)) == "unknown_key"  # before the signature and the payload
    forged = bytearray(keyring(w.root, entry))
    forged[-1] ^= 1
    assert code(bytes(forged)) == "bad_signature"
    # A root-signed keyring for another site that also reuses a root kid: the site comes first.
    root_entry = issuer.KeyringEntry(w.root.public, T0 - 86400, T0 + 86400, ["staff"])
    assert code(keyring(w.root, root_entry, site="site-b")) == "wrong_site"
    assert code(keyring(w.root, root_entry)) == "malformed"
    assert auth.keyring is None and auth.version_floor == {}
    assert auth.install(keyring(w.root, entry), wall=T0, synced=True).installed
    assert (
        code(issuer.keyring(w.root, site=SITE, version=4, iat=T0, exp=T0 + 86400, entries=[entry]))
        == "rollback"
    )


def test_an_unparseable_stored_document_is_dropped_and_marked(w: World) -> None:
    auth = w.authority()
    garbage = b"\xd2\x84" + b"\x00" * 20
    assert auth.restore(garbage, kind=ContentType.REVOCATIONS, signer=None) is False
    assert ContentType.REVOCATIONS in auth.unverified and auth.revocations is None
    assert auth.restore(garbage, kind=ContentType.TIME, signer=None) is False
    assert ContentType.TIME not in auth.unverified  # a lost reset record only loses its replay guard
