"""Both roles of the lock link joined in memory: pairing, handshake, commands, attacks."""

from __future__ import annotations

import itertools

import pytest
from helpers import ConnectionPair, SeededRng
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import cbor
from protocols.errors import AuthenticationError, ProtocolError, RemoteProtocolError
from protocols.framing import FrameType, encode_frame
from protocols.messages import ErrorCode, Op, Request, Response, Status
from protocols.session import (
    GATEWAY_TRANSITIONS,
    LOCK_TRANSITIONS,
    GatewayConnection,
    GatewayInput,
    LockConnection,
    LockInput,
    PairingAttempted,
    PairingCompleted,
    PairingRefused,
    RequestReceived,
    ResponseReceived,
    SessionEstablished,
    State,
)

CODE = "482-913-705"
CMD = bytes(range(16))


def pair_once(
    code: str = CODE, lock_code: str | None = CODE, seed: int = 1
) -> tuple[ConnectionPair, list, list]:
    gw = GatewayConnection(gw_id="gw-test-1", rng=SeededRng(f"gw{seed}"))
    lock = LockConnection(
        lock_id="lock-a1",
        rng=SeededRng(f"lock{seed}"),
        keys={},
        setup_code=lock_code,
        attempts_left=5,
    )
    pair = ConnectionPair(gw, lock)
    gw.start_pairing(code)
    lock_events, gw_events = pair.transfer()
    return pair, lock_events, gw_events


def session(ltk: bytes, *, mtu: int = 247, seed: int = 2) -> ConnectionPair:
    gw = GatewayConnection(gw_id="gw-test-1", rng=SeededRng(f"gws{seed}"))
    lock = LockConnection(lock_id="lock-a1", rng=SeededRng(f"locks{seed}"), keys={"gw-test-1": ltk})
    pair = ConnectionPair(gw, lock, mtu=mtu)
    gw.start_session(lock_id="lock-a1", ltk=ltk)
    lock_events, gw_events = pair.transfer()
    assert SessionEstablished("gw-test-1", "lock-a1") in gw_events
    assert SessionEstablished("gw-test-1", "lock-a1") in lock_events
    return pair


def test_pairing_with_right_code_gives_both_sides_the_same_key() -> None:
    _, lock_events, gw_events = pair_once()
    gw_done = [e for e in gw_events if isinstance(e, PairingCompleted)]
    lock_done = [e for e in lock_events if isinstance(e, PairingCompleted)]
    assert PairingAttempted("gw-test-1") in lock_events
    assert len(gw_done) == 1 and gw_done == lock_done
    assert gw_done[0].lock_id == "lock-a1" and len(gw_done[0].ltk) == 32


def test_pairing_with_wrong_code_is_refused_with_attempts_left() -> None:
    pair, lock_events, gw_events = pair_once(code="000-000-000")
    assert not [e for e in lock_events if isinstance(e, PairingCompleted)]
    refused = [e for e in gw_events if isinstance(e, PairingRefused)]
    assert refused == [PairingRefused(ErrorCode.PAIRING_FAILED, 4, "wrong setup code")]
    assert pair.gw.state is State.CLOSED and pair.lock.state is State.CLOSED


def test_pairing_outside_pairing_mode_is_refused() -> None:
    _, _, gw_events = pair_once(lock_code=None)
    assert isinstance(gw_events[0], PairingRefused)
    assert gw_events[0].code is ErrorCode.NOT_IN_PAIRING_MODE


def test_B1_two_locks_share_no_key_bytes() -> None:
    keys = []
    for seed in range(4):
        _, _, gw_events = pair_once(seed=seed)
        keys.append(next(e for e in gw_events if isinstance(e, PairingCompleted)).ltk)
    assert len(set(keys)) == 4
    for a, b in itertools.combinations(keys, 2):
        assert a != b


def test_lock_impersonator_without_code_is_detected_by_gateway() -> None:
    gw = GatewayConnection(gw_id="gw-test-1", rng=SeededRng("g"))
    fake = LockConnection(lock_id="lock-a1", rng=SeededRng("f"), keys={}, setup_code="guess-1")
    pair = ConnectionPair(gw, fake)
    gw.start_pairing(CODE)
    pair.to_lock()
    pair.to_gw()
    pair.to_lock()  # fake lock refuses our confirm (it cannot check it) ...
    events = pair.to_gw()
    assert isinstance(events[0], PairingRefused)  # ... and we never get a PairingCompleted


@pytest.mark.parametrize(("gw_id", "refused"), [("gw-other", True), ("gw-test-1", False)])
def test_a_paired_lock_in_pairing_mode_refuses_other_gateways(gw_id: str, *, refused: bool) -> None:
    gw = GatewayConnection(gw_id=gw_id, rng=SeededRng("g"))
    lock = LockConnection(
        lock_id="lock-a1", rng=SeededRng("l"), keys={"gw-test-1": bytes(range(32))}, setup_code=CODE
    )
    pair = ConnectionPair(gw, lock)
    gw.start_pairing(CODE)
    pair.to_lock()
    events = pair.to_gw()
    if refused:
        assert isinstance(events[0], PairingRefused) and events[0].code is ErrorCode.ALREADY_PAIRED
        assert "another gateway" in events[0].message and gw.state is State.CLOSED
    else:  # the same gateway may re-pair (its registry was lost): the exchange goes on
        assert not any(isinstance(e, PairingRefused) for e in events)


@pytest.mark.parametrize("mtu", [23, 24, 100, 247, 517])
def test_session_commands_roundtrip_at_every_mtu(mtu: int) -> None:
    ltk = bytes(range(1, 33))
    pair = session(ltk, mtu=mtu)
    pair.gw.send_request(Request(Op.READ_LOG, CMD, {"from": 1, "max": 16}))
    lock_events = pair.to_lock()
    assert lock_events == [RequestReceived(Request(Op.READ_LOG, CMD, {"from": 1, "max": 16}))]
    entries = [[seq, 5, "manual", None, {}] for seq in range(1, 17)]
    resp = Response(Op.READ_LOG, CMD, Status.OK, {"entries": entries, "next": 17})
    pair.lock.send_response(resp)
    assert pair.to_gw() == [ResponseReceived(resp)]


def test_unknown_gateway_gets_not_paired() -> None:
    gw = GatewayConnection(gw_id="gw-other", rng=SeededRng("o"))
    lock = LockConnection(lock_id="lock-a1", rng=SeededRng("l"), keys={"gw-test-1": bytes(range(32))})
    pair = ConnectionPair(gw, lock)
    gw.start_session(lock_id="lock-a1", ltk=bytes(range(1, 33)))
    _, gw_events = pair.transfer()
    assert gw_events[0].code is ErrorCode.NOT_PAIRED
    assert gw.state is State.CLOSED


def test_wrong_ltk_fails_mutual_authentication() -> None:
    gw = GatewayConnection(gw_id="gw-test-1", rng=SeededRng("o"))
    lock = LockConnection(lock_id="lock-a1", rng=SeededRng("l"), keys={"gw-test-1": bytes(range(1, 33))})
    pair = ConnectionPair(gw, lock)
    gw.start_session(lock_id="lock-a1", ltk=bytes(range(2, 34)))
    pair.to_lock()
    with pytest.raises(AuthenticationError):
        pair.to_gw()


def test_all_zero_key_is_refused_locally() -> None:
    gw = GatewayConnection(gw_id="gw-test-1", rng=SeededRng("o"))
    with pytest.raises(ProtocolError):
        gw.start_session(lock_id="lock-a1", ltk=bytes(32))


def _established_with_recording(ltk: bytes) -> tuple[ConnectionPair, bytes]:
    pair = session(ltk)
    pair.gw.send_request(Request(Op.UNLOCK, CMD))
    record = pair.gw.data_to_send()
    assert pair.lock.receive_data(record) == [RequestReceived(Request(Op.UNLOCK, CMD))]
    return pair, record


def test_B2_replayed_unlock_on_same_link_is_refused() -> None:
    pair, record = _established_with_recording(bytes(range(1, 33)))
    with pytest.raises(AuthenticationError):
        pair.lock.receive_data(record)
    assert pair.lock.state is State.CLOSED


def test_B2_replayed_unlock_after_reconnect_is_refused() -> None:
    ltk = bytes(range(1, 33))
    _, record = _established_with_recording(ltk)
    pair = session(ltk, seed=9)  # new connection, new ephemerals
    with pytest.raises(AuthenticationError):
        pair.lock.receive_data(record)


def test_B2_every_bit_flip_of_a_data_frame_is_rejected() -> None:
    ltk = bytes(range(1, 33))
    pair = session(ltk)
    pair.gw.send_request(Request(Op.UNLOCK, CMD))
    frame = pair.gw.data_to_send()
    # The lock state for a fresh copy of the session at this point: re-create per flip.
    for bit in range(len(frame) * 8):
        fresh = session(ltk)
        fresh.gw.send_request(Request(Op.UNLOCK, CMD))
        good = fresh.gw.data_to_send()
        assert good == frame  # deterministic rng: same bytes
        flipped = bytearray(good)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(ProtocolError):
            events = fresh.lock.receive_data(bytes(flipped))
            if not events:  # a length flip may leave the frame incomplete: that is a truncation
                raise RemoteProtocolError("incomplete")
        assert fresh.lock.state in {State.CLOSED, State.ESTABLISHED}
        if fresh.lock.state is State.ESTABLISHED:
            # Incomplete frame pending: nothing was accepted, and any further byte fails.
            assert fresh.lock.data_to_send() == b""


def test_reordered_frames_are_rejected() -> None:
    pair = session(bytes(range(1, 33)))
    pair.gw.send_request(Request(Op.STATUS, CMD))
    first = pair.gw.data_to_send()
    pair.gw.send_request(Request(Op.STATUS, bytes(16)))
    second = pair.gw.data_to_send()
    with pytest.raises(AuthenticationError):
        pair.lock.receive_data(second + first)


def test_plaintext_frame_after_session_closes_it() -> None:
    pair = session(bytes(range(1, 33)))
    with pytest.raises(RemoteProtocolError):
        pair.lock.receive_data(encode_frame(FrameType.HELLO, b"\x80"))
    assert pair.lock.state is State.CLOSED


def test_request_before_session_is_a_local_error() -> None:
    gw = GatewayConnection(gw_id="gw-test-1", rng=SeededRng("x"))
    with pytest.raises(ProtocolError) as info:
        gw.send_request(Request(Op.UNLOCK, CMD))
    assert info.value.code == "bad_state"
    assert gw.state is State.CLOSED


@pytest.mark.parametrize(("state", "inp"), list(itertools.product(State, GatewayInput)))
def test_every_gateway_state_input_pair_moves_or_closes(state: State, inp: GatewayInput) -> None:
    gw = GatewayConnection(gw_id="gw-test-1", rng=SeededRng("x"))
    gw._state = state
    if (state, inp) in GATEWAY_TRANSITIONS:
        gw._process(inp)
        assert gw.state is GATEWAY_TRANSITIONS[(state, inp)]
    else:
        with pytest.raises(ProtocolError):
            gw._process(inp)
        assert gw.state is State.CLOSED


@pytest.mark.parametrize(("state", "inp"), list(itertools.product(State, LockInput)))
def test_every_lock_state_input_pair_moves_or_closes(state: State, inp: LockInput) -> None:
    lock = LockConnection(lock_id="lock-a1", rng=SeededRng("x"), keys={})
    lock._state = state
    if (state, inp) in LOCK_TRANSITIONS:
        lock._process(inp)
        assert lock.state is LOCK_TRANSITIONS[(state, inp)]
    else:
        with pytest.raises(ProtocolError):
            lock._process(inp)
        assert lock.state is State.CLOSED


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600), st.sampled_from(["idle", "established"]))
def test_B6_random_bytes_to_lock_raise_only_protocol_errors(data: bytes, where: str) -> None:
    if where == "idle":
        lock = LockConnection(
            lock_id="lock-a1",
            rng=SeededRng("x"),
            keys={"gw-test-1": bytes(range(1, 33))},
            setup_code=CODE,
        )
    else:
        lock = session(bytes(range(1, 33))).lock
    before = lock.state
    try:
        events = lock.receive_data(data)
    except ProtocolError:
        return
    # Random bytes never make a request, pairing or session: at most a partial frame waits.
    assert events == [] and lock.state is before


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600), st.sampled_from(["pairing", "handshaking", "established"]))
def test_B6_random_bytes_to_gateway_raise_only_protocol_errors(data: bytes, where: str) -> None:
    gw = GatewayConnection(gw_id="gw-test-1", rng=SeededRng("x"))
    if where == "pairing":
        gw.start_pairing(CODE)
    elif where == "handshaking":
        gw.start_session(lock_id="lock-a1", ltk=bytes(range(1, 33)))
    else:
        gw = session(bytes(range(1, 33))).gw
    before = gw.state
    try:
        events = gw.receive_data(data)
    except ProtocolError:
        return
    assert events == [] and gw.state is before


# --- a hostile paired lock or pairing peer (THREATS B7) ------------------------------------

OFF_CURVE = (2).to_bytes(32, "little")  # y = 2 has no x on Ed25519: spake2 raises NotOnCurve
OTHER = bytes(range(16, 32))


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (Response(Op.UNLOCK, OTHER, Status.OK, {"state": "unlocked", "lock_seq": 4}), "cmd_id"),
        (Response(Op.LOCK, CMD, Status.OK, {"state": "locked", "lock_seq": 4}), "op"),
        (Response(Op.STATUS, CMD, Status.OK, {}), "op"),
    ],
)
def test_B7_a_response_that_does_not_match_the_request_ends_the_link(answer: Response, why: str) -> None:
    pair = session(bytes(range(1, 33)))
    pair.gw.send_request(Request(Op.UNLOCK, CMD))
    pair.to_lock()
    pair.lock.send_response(answer)
    with pytest.raises(RemoteProtocolError) as info:
        pair.to_gw()
    assert info.value.code == "response_mismatch", why
    assert pair.gw.state is State.CLOSED
    with pytest.raises(ProtocolError):  # and nothing more is sent on it
        pair.gw.send_request(Request(Op.UNLOCK, CMD))


def test_B7_a_response_to_no_request_ends_the_link() -> None:
    pair = session(bytes(range(1, 33)))
    pair.lock.send_response(Response(Op.UNLOCK, CMD, Status.OK, {"state": "unlocked", "lock_seq": 4}))
    with pytest.raises(RemoteProtocolError) as info:
        pair.to_gw()
    assert info.value.code == "response_mismatch" and pair.gw.state is State.CLOSED


def test_pipelined_requests_are_answered_in_order() -> None:
    pair = session(bytes(range(1, 33)))
    pair.gw.send_request(Request(Op.ACK_LOG, CMD, {"upto": 3}))
    pair.gw.send_request(Request(Op.SET_TIME, OTHER, {"t": 9}))
    assert len(pair.to_lock()) == 2
    first = Response(Op.ACK_LOG, CMD, Status.OK, {"first": 4})
    second = Response(Op.SET_TIME, OTHER, Status.OK, {"clock": 9})
    pair.lock.send_response(first)
    pair.lock.send_response(second)
    assert pair.to_gw() == [ResponseReceived(first), ResponseReceived(second)]


@pytest.mark.parametrize(
    "result",
    [
        {"state": "unlocked", "lock_seq": 2**64 - 1},
        {"state": "unlocked", "lock_seq": 0},
        {"state": "unlocked", "lock_seq": "4"},
        {"state": "molten", "lock_seq": 4},
        {"state": "unlocked"},
    ],
)
def test_B7_an_out_of_range_result_ends_the_link_with_a_code(result: dict) -> None:
    pair = session(bytes(range(1, 33)))
    pair.gw.send_request(Request(Op.UNLOCK, CMD))
    pair.to_lock()
    pair.lock.send_response(Response(Op.UNLOCK, CMD, Status.OK, result))
    with pytest.raises(RemoteProtocolError) as info:
        pair.to_gw()
    assert info.value.code == "bad_message"
    assert pair.gw.state is State.CLOSED


def test_B7_off_curve_spake2_message_from_a_lock_fails_pairing_at_once() -> None:
    gw = GatewayConnection(gw_id="gw-test-1", rng=SeededRng("g"))
    gw.start_pairing(CODE)
    gw.data_to_send()
    hostile = encode_frame(FrameType.PAIR_RESPONSE, cbor.dumps(["lock-a1", b"B" + OFF_CURVE, bytes(16)]))
    with pytest.raises(AuthenticationError, match="invalid SPAKE2 message from lock"):
        gw.receive_data(hostile)
    assert gw.state is State.CLOSED and gw.data_to_send() == b""  # no confirmation goes out


def test_B7_off_curve_spake2_message_from_a_gateway_is_refused_by_the_lock() -> None:
    lock = LockConnection(lock_id="lock-a1", rng=SeededRng("l"), keys={}, setup_code=CODE, attempts_left=5)
    hostile = encode_frame(FrameType.PAIR_REQUEST, cbor.dumps(["gw-test-1", b"A" + OFF_CURVE, bytes(16)]))
    with pytest.raises(AuthenticationError, match="invalid SPAKE2 message from gateway"):
        lock.receive_data(hostile)
    assert lock.state is State.CLOSED


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([b"A", b"B", b"S", b"\x00"]),
    st.one_of(st.binary(min_size=32, max_size=32), st.binary(max_size=40)),
)
def test_B7_any_spake2_message_either_pairs_or_raises_a_protocol_error(side: bytes, point: bytes) -> None:
    msg = side + point
    gw = GatewayConnection(gw_id="gw-test-1", rng=SeededRng("g"))
    gw.start_pairing(CODE)
    # A valid point is answered with a confirmation (pairing completes only on the lock's
    # PAIR_DONE); anything else is a ProtocolError that closes the link.
    try:
        events = gw.receive_data(
            encode_frame(FrameType.PAIR_RESPONSE, cbor.dumps(["lock-a1", msg, bytes(16)]))
        )
    except ProtocolError:
        assert gw.state is State.CLOSED
    else:
        assert events == [] and gw.state is State.PAIR_CONFIRMING
    lock = LockConnection(lock_id="lock-a1", rng=SeededRng("l"), keys={}, setup_code=CODE)
    try:
        events = lock.receive_data(
            encode_frame(FrameType.PAIR_REQUEST, cbor.dumps(["gw-test-1", msg, bytes(16)]))
        )
    except ProtocolError:
        return
    # The lock may answer (it cannot tell a wrong code yet) but pairs only on the confirmation.
    assert not any(isinstance(e, PairingCompleted) for e in events) and lock.state is State.PAIRING
