"""Trusted time (CONTRACT §3.6, THREATS C1–C5) and key loading (THREATS T3)."""

from __future__ import annotations

import contextlib

import pytest
from credfix import GW, LOCK, SITE, T0, World
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import cbor, cose, issuer
from protocols.cose import SMALL_ORDER_ED25519, ContentType, CoseKey, decode_key, parse_sign1, sign1
from protocols.credentials import Authority, TimeKeeper, TimeState, load_cbor_or_b64
from protocols.errors import CredentialError, TokenError, TrustDocumentError

RELEASE = T0 - 200 * 86400  # the starting floor: the release date
P = 2**255 - 19


def grant(w: World, auth: Authority, tok: bytes, *, wall: float, synced: bool, mono: float = 101.0) -> object:
    return auth.decide(
        tok, w.prove(auth, tok, mono=100.0), lock=LOCK, action="unlock", wall=wall, synced=synced, mono=mono
    )


def test_C1_boot_at_1970_without_network_unlocks_fresh_tokens_and_the_floor_refuses_old_ones() -> None:
    w = World()
    auth = w.authority(floor=RELEASE, synced=False)
    tok = w.token(iat=T0 - 60)
    d = grant(w, auth, tok, wall=0, synced=False)
    assert d.time_state is TimeState.UNKNOWN  # type: ignore[attr-defined]
    assert auth.time.floor == T0 - 86400  # the keyring's iat; the token moved nothing
    assert auth.install(
        issuer.time_statement(w.issuer_a, site=SITE, t=T0 - 60), wall=0, synced=False
    ).installed
    assert auth.time.floor == T0 - 60
    stale = w.token(iat=T0 - 60 - 43200 - 10, ttl=60)
    with pytest.raises(TokenError) as info:
        grant(w, auth, stale, wall=0, synced=False)
    assert info.value.code == "token_expired"


def test_C1_boot_at_release_date_unsynced() -> None:
    w = World()
    release = T0 - 3600  # the fixture's keyring (iat T0 - 1 d) is older than the release
    auth = w.authority(floor=release, synced=False)
    d = grant(w, auth, w.token(iat=release + 10), wall=release, synced=False)
    assert d.time_state is TimeState.UNKNOWN  # type: ignore[attr-defined]


def test_C3_far_future_iat_while_synced_does_not_move_the_floor() -> None:
    w = World()
    auth = w.authority(floor=RELEASE)
    floor = auth.time.floor
    future = w.token(iat=T0 + 10 * 365 * 86400)
    # The issuer key's window ends earlier; use a keyring whose key covers the far future.
    with pytest.raises(TokenError) as info:
        grant(w, auth, future, wall=T0, synced=True)
    assert info.value.code == "token_invalid"
    assert auth.time.floor == floor
    ahead = w.token(iat=T0 + 2 * 86400)  # inside the key window, 2 days ahead
    with pytest.raises(TokenError) as info:
        grant(w, auth, ahead, wall=T0, synced=True)
    assert info.value.code == "token_not_yet_valid"
    assert auth.time.floor == floor
    assert "signed_time_far_ahead" in auth.time.alarms


def test_C3_in_unknown_a_fresh_token_ahead_of_the_clock_is_accepted_and_moves_no_floor() -> None:
    w = World()
    auth = w.authority(floor=RELEASE, synced=False)
    floor = auth.time.floor
    tok = w.token(iat=T0 + 2 * 86400)
    assert grant(w, auth, tok, wall=T0, synced=False)
    assert auth.time.floor == floor


def test_time_statement_raises_the_floor_only_forward_and_never_past_a_synced_clock() -> None:
    w = World()
    auth = w.authority(floor=RELEASE)
    r = auth.install(issuer.time_statement(w.issuer_a, site=SITE, t=T0 - 10), wall=T0, synced=True)
    assert r.installed and auth.time.floor == T0 - 10
    r = auth.install(issuer.time_statement(w.issuer_a, site=SITE, t=T0 - 100), wall=T0, synced=True)
    assert not r.installed and auth.time.floor == T0 - 10
    r = auth.install(issuer.time_statement(w.issuer_a, site=SITE, t=T0 + 3600), wall=T0, synced=True)
    assert auth.time.floor == T0  # at most the synchronised clock
    r = auth.install(issuer.time_statement(w.root, site=SITE, t=T0 + 10 * 365 * 86400), wall=T0, synced=True)
    assert not r.installed and r.alarm == "signed_time_far_ahead" and auth.time.floor == T0


@pytest.mark.parametrize("jump", [3600, -3600, 86400, -86400, 10 * 365 * 86400, -10 * 365 * 86400])
def test_C2_clock_jumps_at_runtime(jump: int) -> None:
    w = World()
    auth = w.authority(floor=RELEASE)
    grant(w, auth, w.token(iat=T0 - 60), wall=T0, synced=True)
    auth.time.saved_wall = T0  # the gateway saves its synchronised clock every minute
    floor = auth.time.floor
    view = auth.time.view(wall=T0 + jump, synced=True)
    assert auth.time.floor == floor  # a jump never moves the floor
    if T0 + jump < floor:
        assert view.state is TimeState.UNKNOWN and view.now == floor
    if jump < 0:  # behind the saved clock: unknown and alarmed, so an iat "ahead" is no refusal
        assert view.state is TimeState.UNKNOWN
        assert auth.time.alarms & {"clock_went_backwards", "clock_behind_floor"}
    # A fresh token (real time T0) still unlocks after a backward jump; after a forward jump
    # beyond its lifetime it is expired by the (synchronised) clock.
    tok = w.token(iat=T0 - 30)
    if jump <= 0:
        assert grant(w, auth, tok, wall=T0 + jump, synced=True)


def test_C4_rogue_ntp_step_does_not_poison_the_floor() -> None:
    w = World()
    auth = w.authority(floor=RELEASE)
    grant(w, auth, w.token(iat=T0 - 60), wall=T0, synced=True)
    auth.time.view(wall=T0 + 2 * 86400, synced=True)  # rogue step forward
    grant_floor = auth.time.floor
    assert grant_floor <= T0
    view = auth.time.view(wall=T0 + 10, synced=True)  # and back
    assert view.state is TimeState.SYNCED
    assert grant(w, auth, w.token(iat=T0), wall=T0 + 10, synced=True)


def test_holdover_and_saved_wall_clock() -> None:
    tk = TimeKeeper(floor=100, saved_wall=1000)
    assert tk.view(wall=2000, synced=False).state is TimeState.UNKNOWN  # never synced this boot
    assert tk.view(wall=2000, synced=True).state is TimeState.SYNCED
    assert tk.view(wall=2100, synced=False).state is TimeState.HOLDOVER
    assert tk.view(wall=900, synced=True).state is TimeState.UNKNOWN  # behind the saved value
    assert "clock_went_backwards" in tk.alarms


@settings(max_examples=500)
@given(st.lists(st.tuples(st.integers(0, 2**40), st.booleans(), st.integers(0, 2**40)), max_size=30))
def test_the_floor_never_decreases(steps: list[tuple[int, bool, int]]) -> None:
    tk = TimeKeeper(floor=RELEASE)
    last = tk.floor
    for wall, synced, offered in steps:
        tk.offer(offered, tk.view(wall=wall, synced=synced))
        assert tk.floor >= last
        last = tk.floor


# --- T3: key loading -----------------------------------------------------------------------


def okp(x: bytes) -> dict:
    return {1: 1, 3: -8, -1: 6, -2: x}


NON_CANONICAL = [
    (y + P).to_bytes(32, "little")
    for y in range(19)  # y + p still fits in 255 bits for y < 19
] + [((y + P) | (1 << 255)).to_bytes(32, "little") for y in (0, 1)]


@pytest.mark.parametrize("point", sorted(SMALL_ORDER_ED25519), ids=lambda b: b.hex()[:8])
def test_T3_small_order_points_refused_at_every_key_load(point: bytes) -> None:
    with pytest.raises(CredentialError):
        decode_key(okp(point))


@pytest.mark.parametrize("point", NON_CANONICAL, ids=lambda b: b.hex()[:8])
def test_T3_non_canonical_encodings_refused(point: bytes) -> None:
    with pytest.raises(CredentialError):
        decode_key(okp(point))


def test_T3_identity_signature_forgery_is_refused_by_the_verifier() -> None:
    """Even if a small-order key slipped through, libsodium refuses R = identity, S = 0."""
    key = CoseKey(-8, bytes.fromhex("01" + "00" * 31))
    with pytest.raises(CredentialError):
        key.verify(bytes.fromhex("01" + "00" * 63), b"any message")


def test_T3_invalid_p256_points_refused() -> None:
    good_x = bytes.fromhex("6b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296")
    good_y = bytes.fromhex("4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5")
    assert decode_key({1: 2, 3: -7, -1: 1, -2: good_x, -3: good_y}).alg == -7
    for x, y in ((good_x, bytes(32)), (bytes(32), bytes(32)), (good_x[:31], good_y)):
        with pytest.raises(CredentialError):
            decode_key({1: 2, 3: -7, -1: 1, -2: x, -3: y})


@pytest.mark.parametrize(
    "key",
    [
        {1: 1, -1: 6, -2: b"x" * 32},
        {1: 1, 3: -7, -1: 6, -2: b"x" * 32},
        {1: 2, 3: -8, -1: 1, -2: b"", -3: b""},
        {1: 1, 3: -8, -1: 6, -2: b"x" * 31},
        {1: 1, 3: -8, -1: 6, -2: b"x" * 32, 99: 1},
        {1: 1, 3: True, -1: 6},
        [1, 2],
        {1: 1, 3: -8, -1: 6, -2: "text"},
    ],
)
def test_malformed_keys_refused(key: object) -> None:
    with pytest.raises(CredentialError):
        decode_key(key)  # type: ignore[arg-type]


# --- fuzzing --------------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_B6_random_bytes_to_every_document_parser_raise_only_credential_errors(data: bytes) -> None:
    for ctype in ContentType:
        with contextlib.suppress(CredentialError):
            parse_sign1(data, ctype, code="x")
    with contextlib.suppress(CredentialError):
        load_cbor_or_b64(data)


_w = World()
_auth = _w.authority()
_good = _w.token()


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_B6_mutated_tokens_and_proofs_raise_only_token_errors(data: st.DataObject) -> None:
    tok = bytearray(_good)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(tok) - 1))
        tok[i] = data.draw(st.integers(0, 255))
    proof = data.draw(st.one_of(st.none(), st.binary(max_size=300)))
    try:
        _auth.decide(bytes(tok), proof, lock=LOCK, action="unlock", wall=T0, synced=True, mono=1.0)
    except TokenError:
        return
    assert bytes(tok) == _good, "a mutated token was accepted"


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.one_of(st.integers(-(2**63), 2**63 - 1), st.binary(max_size=20), st.text(max_size=10)),
        lambda c: st.one_of(
            st.lists(c, max_size=4),
            st.dictionaries(st.one_of(st.integers(-(2**63), 2**63 - 1), st.text(max_size=6)), c, max_size=4),
        ),
        max_leaves=12,
    )
)
def test_B6_arbitrary_well_formed_claims_raise_only_token_errors(claims: object) -> None:
    raw = sign1(cbor.dumps(claims), _w.issuer_a, ContentType.TOKEN, kid=b"iss-a")  # type: ignore[arg-type]
    with contextlib.suppress(TokenError):
        _auth.decide(raw, None, lock=LOCK, action="unlock", wall=T0, synced=True, mono=1.0)


def _parsed(data: bytes, ctype: ContentType, *, general: bool) -> object:
    """parse_sign1's outcome: the Sign1, or the refusal's message and code."""
    try:
        if general:  # the general decoder only, without the common-shape path
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(cose, "_common_sign1", lambda *_: None)
                return parse_sign1(data, ctype, code="x", require_kid=ctype is not ContentType.PROOF)
        return parse_sign1(data, ctype, code="x", require_kid=ctype is not ContentType.PROOF)
    except CredentialError as exc:
        return (str(exc), exc.code)


def _variants(doc: bytes) -> list[bytes]:
    out = [doc, b"\xd8\x3d" + doc, b"\xd8\x3d" + doc[1:], doc[1:], b"\xd2" + doc, doc + b"\x00"]
    for k in range(min(len(doc), 80)):  # the envelope and the protected header: every byte, every cut
        out += [
            doc[:k] + bytes([b]) + doc[k + 1 :]
            for b in (0x00, 0x3D, 0x40, 0x57, 0x58, 0x59, 0x5A, 0x84, 0xA0, 0xA1, 0xD2, 0xFF)
        ]
        out.append(doc[:k])
    return out


def test_B6_the_common_shape_path_of_parse_sign1_decides_exactly_as_the_general_decoder() -> None:
    proof = _w.prove(_auth, _good)
    keyring = _w.keyring()
    for doc in (_good, proof, keyring):
        for data in _variants(doc):
            for ctype in ContentType:
                assert _parsed(data, ctype, general=False) == _parsed(data, ctype, general=True), data.hex()


def test_load_cbor_or_b64() -> None:
    import base64

    raw = _good
    assert load_cbor_or_b64(raw) == raw
    assert load_cbor_or_b64(base64.urlsafe_b64encode(raw).rstrip(b"=") + b"\n") == raw
    with pytest.raises(CredentialError):
        load_cbor_or_b64(b"not base64 !")
    assert GW


# --- CONTRACT §8.7 v1.1: only time statements, keyrings and revocation lists move the floor ----


def test_C6_future_dated_tokens_while_unknown_then_20_honest_tokens_all_open() -> None:
    w = World()
    auth = w.authority(floor=RELEASE, synced=False)
    floor = auth.time.floor
    for ahead in (15 * 60, 59 * 86400):  # a skewed issuer, then a leaked key's far-future token
        assert grant(w, auth, w.token(iat=T0 + ahead), wall=T0, synced=False)
        assert auth.time.floor == floor
    for i in range(20):
        assert grant(w, auth, w.token(iat=T0 - 60 + i), wall=T0 + i, synced=False)
    assert auth.time.floor == floor


def test_C6_a_refused_token_moves_no_floor() -> None:
    """Before v1.1 a token refused as wrong_lock still raised the floor."""
    w = World()
    auth = w.authority(floor=RELEASE, synced=False)
    floor = auth.time.floor
    for tok, code in (
        (w.token(iat=T0 + 30 * 86400, locks=["lk-elsewhere"]), "wrong_lock"),
        (w.token(iat=T0 + 30 * 86400, aud="site-other"), "wrong_audience"),
        (w.token(iat=T0 + 30 * 86400, act=["lock"]), "action_not_allowed"),
    ):
        with pytest.raises(TokenError) as info:
            grant(w, auth, tok, wall=T0, synced=False)
        assert info.value.code == code
    assert auth.time.floor == floor


def test_C6_a_refused_document_moves_no_floor() -> None:
    w = World()
    auth = w.authority(floor=RELEASE, synced=False)
    floor = auth.time.floor
    other = World(rng=__import__("helpers").SeededRng(b"other"))
    refused = [
        issuer.time_statement(w.issuer_a, site="site-other", t=T0 + 86400),  # wrong site
        issuer.time_statement(other.issuer_a, site=SITE, t=T0 + 86400),  # unknown key
        issuer.revocations(w.issuer_b, site=SITE, version=1, iat=T0 + 86400, exp=T0 + 2 * 86400),  # role
        w.keyring(1),  # same version, other bytes: rollback
    ]
    auth.install(w.keyring(2), wall=T0, synced=False)
    floor = auth.time.floor
    for doc in refused:
        with pytest.raises(TrustDocumentError):
            auth.install(doc, wall=T0, synced=False)
    assert auth.time.floor == floor


def test_C6_expired_tokens_older_than_the_floor_are_still_refused() -> None:
    w = World()
    auth = w.authority(floor=RELEASE, synced=False)
    auth.install(issuer.time_statement(w.issuer_a, site=SITE, t=T0), wall=0, synced=False)
    old = w.token(iat=T0 - 2 * 3600, ttl=3600)  # expired an hour before the floor
    with pytest.raises(TokenError) as info:
        grant(w, auth, old, wall=0, synced=False)
    assert info.value.code == "token_expired"
    very_old = w.token(iat=T0 - 43200 - 120, ttl=43200 + 600)  # unexpired but issued too early
    with pytest.raises(TokenError) as info:
        grant(w, auth, very_old, wall=0, synced=False)
    assert info.value.code == "token_expired"


def test_C6_root_time_2h_ahead_then_root_reset_honest_tokens_expire_then_open_again() -> None:
    w = World()
    auth = w.authority(floor=RELEASE, synced=False)
    ahead = issuer.time_statement(w.root, site=SITE, t=T0 + 2 * 3600)
    assert auth.install(ahead, wall=T0, synced=False).installed
    honest = w.token(iat=T0 - 60, ttl=3600)
    with pytest.raises(TokenError) as info:
        grant(w, auth, honest, wall=T0, synced=False)
    assert info.value.code == "token_expired"
    auth.time.alarms.add("clock_behind_floor")
    reset = issuer.time_statement(w.root, site=SITE, t=T0, reset=True)
    r = auth.install(reset, wall=T0, synced=False)
    assert r.installed and auth.time.floor == T0 and not auth.time.alarms
    assert grant(w, auth, honest, wall=T0, synced=False)
    assert grant(w, auth, w.token(iat=T0 - 30), wall=T0, synced=False)
    # The same reset again (a retained topic re-delivers it) is silent; an older one is rollback.
    assert not auth.install(reset, wall=T0 + 60, synced=False).installed
    with pytest.raises(TrustDocumentError) as err:
        auth.install(issuer.time_statement(w.root, site=SITE, t=T0 - 10, reset=True), wall=T0, synced=False)
    assert err.value.code == "rollback"


def test_C6_reset_must_be_root_signed_and_literally_true() -> None:
    w = World()
    auth = w.authority(floor=RELEASE, synced=False)
    auth.install(issuer.time_statement(w.root, site=SITE, t=T0 + 86400), wall=T0, synced=False)
    floor = auth.time.floor
    with pytest.raises(TrustDocumentError) as err:  # issuer_a holds role time, but is no root
        auth.install(issuer.time_statement(w.issuer_a, site=SITE, t=T0, reset=True), wall=T0, synced=False)
    assert err.value.code == "bad_signature"
    for value in (False, 1, "true"):
        doc = sign1(
            cbor.dumps({"site": SITE, "t": T0, "reset": value}), w.root, ContentType.TIME, kid=b"root-1"
        )
        with pytest.raises(TrustDocumentError) as err:
            auth.install(doc, wall=T0, synced=False)
        assert err.value.code == "malformed"
    assert auth.time.floor == floor


def test_C6_reset_with_a_synchronised_clock_is_bounded_by_it() -> None:
    w = World()
    auth = w.authority(floor=RELEASE)
    auth.time.saved_wall = T0 + 86400  # a rogue NTP step was saved
    r = auth.install(issuer.time_statement(w.root, site=SITE, t=T0 - 600, reset=True), wall=T0, synced=True)
    assert r.installed and auth.time.floor == T0 - 600 and auth.time.saved_wall == T0 - 600
    assert auth.time.view(wall=T0, synced=True).state is TimeState.SYNCED
    far = issuer.time_statement(w.root, site=SITE, t=T0 + 3 * 86400, reset=True)
    r = auth.install(far, wall=T0, synced=True)
    assert not r.installed and r.alarm == "signed_time_far_ahead" and auth.time.floor == T0 - 600


def test_C3_synced_token_far_ahead_is_not_yet_valid_alarmed_and_moves_no_floor() -> None:
    w = World()
    auth = w.authority(floor=RELEASE)
    floor = auth.time.floor
    with pytest.raises(TokenError) as info:
        grant(w, auth, w.token(iat=T0 + 30 * 86400), wall=T0, synced=True)
    assert info.value.code == "token_not_yet_valid"
    assert "signed_time_far_ahead" in auth.time.alarms and auth.time.floor == floor
    with pytest.raises(TokenError) as info:  # holdover is treated like synced
        grant(w, auth, w.token(iat=T0 + 3600), wall=T0, synced=False)
    assert info.value.code == "token_not_yet_valid"


# --- claims of the wrong CBOR type ----------------------------------------------------------

_CBOR_ANY = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**64), 2**64 - 1),
        st.binary(max_size=40),
        st.text(max_size=20),
        st.sampled_from(["staff", "emergency", LOCK, SITE, "unlock", "central"]),
    ),
    lambda c: st.one_of(
        st.lists(c, max_size=4),
        st.dictionaries(st.one_of(st.integers(-5, 10), st.text(max_size=6)), c, max_size=4),
        st.builds(cbor.Tag, st.sampled_from([1, 18, 61, 2**32]), c),
    ),
    max_leaves=10,
)
_CLAIM_NAMES = [1, 2, 3, 4, 5, 6, 7, 8, "locks", "act", "role", "alarm"]
_CODES = {
    "token_invalid",
    "token_expired",
    "token_not_yet_valid",
    "token_revoked",
    "wrong_audience",
    "wrong_lock",
    "action_not_allowed",
    "unknown_key",
    "proof_required",
    "proof_invalid",
    "nonce_unknown",
    "nonce_expired",
    "stale_trust",
}


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(_CLAIM_NAMES), _CBOR_ANY, st.booleans(), st.booleans())
def test_B6_any_claim_of_any_cbor_type_is_a_token_error_with_a_contract_code(
    name: object, value: object, synced: bool, with_proof: bool
) -> None:
    claims = dict(cbor.loads(cbor.loads(_good).value[2]))  # type: ignore[union-attr, index, call-overload]
    claims[name] = value
    raw = sign1(cbor.dumps(claims), _w.issuer_a, ContentType.TOKEN, kid=b"iss-a")  # type: ignore[arg-type]
    proof = _w.prove(_auth, raw, mono=1.0) if with_proof else None
    with pytest.raises(TokenError) as info:
        _auth.decide(raw, proof, lock=LOCK, action="unlock", wall=T0, synced=synced, mono=1.0)
        raise TokenError("accepted", code="accepted")  # a replaced claim may still be valid
    assert info.value.code in _CODES | {"accepted"}


def test_B6_role_of_the_wrong_type_is_token_invalid_not_a_type_error() -> None:
    for role in (["staff"], {"staff": 1}, b"staff", 1, None, cbor.Tag(1, "staff")):
        claims = dict(cbor.loads(cbor.loads(_good).value[2]))  # type: ignore[union-attr, index, call-overload]
        claims["role"] = role
        raw = sign1(cbor.dumps(claims), _w.issuer_a, ContentType.TOKEN, kid=b"iss-a")  # type: ignore[arg-type]
        with pytest.raises(TokenError) as info:
            _auth.decide(raw, None, lock=LOCK, action="unlock", wall=T0, synced=True, mono=1.0)
        assert info.value.code == "token_invalid"
