from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import cbor
from protocols.errors import ProtocolError, RemoteProtocolError
from protocols.gatt import Advert, decode_advert, encode_advert
from protocols.messages import (
    LINK_POLICY,
    LinkRole,
    LogEntry,
    LogKind,
    Op,
    Request,
    Response,
    Status,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    is_allowed,
)

CMD = b"\x01" * 16


def test_B4_every_role_and_command_has_an_explicit_policy_entry() -> None:
    missing = [pair for pair in itertools.product(LinkRole, Op) if pair not in LINK_POLICY]
    assert not missing, f"commands without policy: {missing}"


def test_B4_unauthenticated_may_do_nothing() -> None:
    assert not any(is_allowed(LinkRole.UNAUTHENTICATED, op) for op in Op)


@pytest.mark.parametrize(
    "request_",
    [
        Request(Op.UNLOCK, CMD),
        Request(Op.READ_LOG, CMD, {"from": 5, "max": 16}),
        Request(Op.ACK_LOG, CMD, {"upto": 9}),
        Request(Op.SET_TIME, CMD, {"t": -5}),
    ],
)
def test_request_roundtrip(request_: Request) -> None:
    assert decode_request(encode_request(request_)) == request_


@pytest.mark.parametrize(
    "raw",
    [
        {0: 1, 1: CMD},
        {0: 99, 1: CMD, 2: {}},
        {0: 1, 1: b"short", 2: {}},
        {0: 4, 1: CMD, 2: {"from": 1}},
        {0: 4, 1: CMD, 2: {"from": 1, "max": 17}},
        {0: 4, 1: CMD, 2: {"from": -1, "max": 1}},
        {0: 1, 1: CMD, 2: {"extra": 1}},
        {0: True, 1: CMD, 2: {}},
        [1, CMD, {}],
    ],
)
def test_bad_requests_are_refused(raw: cbor.CborValue) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_request(cbor.dumps(raw))


def test_response_roundtrip_and_log_entries() -> None:
    entry = LogEntry(3, 1_700_000_000, LogKind.MANUAL, None, {"state": "locked"})
    resp = Response(Op.READ_LOG, CMD, Status.OK, {"entries": [entry.to_cbor()], "next": 4})
    back = decode_response(encode_response(resp))
    assert back == resp
    assert LogEntry.from_cbor(back.result["entries"][0]) == entry  # type: ignore[index]


@pytest.mark.parametrize(
    "raw",
    [
        [1, 2, "manual", None],
        [1, 2, "nope", None, {}],
        [-1, 2, "manual", None, {}],
        [1, 2, "manual", b"x", {}],
        [1, 2, "manual", None, {"k": [1]}],
        "x",
    ],
)
def test_bad_log_entries(raw: cbor.CborValue) -> None:
    with pytest.raises(RemoteProtocolError):
        LogEntry.from_cbor(raw)


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_B6_decoders_raise_only_protocol_errors(data: bytes) -> None:
    # Accepted: a valid message, which its canonical encoding gives back.
    try:
        request = decode_request(data)
    except ProtocolError:
        pass
    else:
        assert decode_request(encode_request(request)) == request
    try:
        response = decode_response(data)
    except ProtocolError:
        pass
    else:
        assert decode_response(encode_response(response)) == response


def test_advert_roundtrip_and_garbage() -> None:
    a = Advert("lk-00c0ffee", paired=True, pairing_mode=False, state_counter=70000)
    assert decode_advert(encode_advert(a)) == Advert("lk-00c0ffee", True, False, 70000 & 0xFFFF)
    for bad in (
        b"",
        b"\x02\x00\x00\x00x",
        b"\x01\x00\x00\x00\xff",
        b"\x01\x00\x00\x00UPPER",
        b"\x01\x00\x00\x00",
    ):
        assert decode_advert(bad) is None


GOOD_STATUS = {
    "state": "locked",
    "door": "open",
    "battery_pct": 80,
    "firmware": "x",
    "clock": 5,
    "log_first": 1,
    "log_next": 3,
    "name": "Door",
}


def test_parse_status_and_hostile_variants() -> None:
    from protocols.messages import DoorState, LockState, parse_actuation, parse_log, parse_status

    st_ = parse_status(GOOD_STATUS)
    assert st_.state is LockState.LOCKED and st_.door is DoorState.OPEN and st_.battery_pct == 80
    for bad in (
        {**GOOD_STATUS, "state": "melted"},
        {**GOOD_STATUS, "battery_pct": 101},
        {**GOOD_STATUS, "battery_pct": True},
        {k: v for k, v in GOOD_STATUS.items() if k != "door"},
        {**GOOD_STATUS, "name": "x" * 65},
    ):
        with pytest.raises(RemoteProtocolError):
            parse_status(bad)
    assert parse_actuation({"state": "unlocked", "lock_seq": 4}) == (LockState.UNLOCKED, 4)
    with pytest.raises(RemoteProtocolError):
        parse_actuation({"state": "unlocked"})
    entry = LogEntry(3, 1, LogKind.MANUAL).to_cbor()
    assert parse_log({"entries": [entry], "next": 4})[1] == 4
    with pytest.raises(RemoteProtocolError):
        parse_log({"entries": [entry, entry], "next": 4})
    with pytest.raises(RemoteProtocolError):
        parse_log({"entries": [entry] * 17, "next": 4})
