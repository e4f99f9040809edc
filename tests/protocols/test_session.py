"""Both roles of the lock link joined in memory: pairing, handshake, commands, attacks."""

from __future__ import annotations

import contextlib
import itertools

import pytest
from helpers import ConnectionPair, SeededRng
from hypothesis import given, settings
from hypothesis import strategies as st

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
    resp = Response(Op.READ_LOG, CMD, Status.OK, {"entries": [[1, 5, "manual", None, {}]] * 16, "next": 17})
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
    with contextlib.suppress(ProtocolError):
        lock.receive_data(data)


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
    with contextlib.suppress(ProtocolError):
        gw.receive_data(data)
