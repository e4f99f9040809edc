"""Values a paired lock sends are untrusted too (THREATS B7, CONTRACT §8.13).

Every field of every result either parses into a typed value within range or raises a
ProtocolError with a code: never another exception, never a value the outbox cannot store.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import cbor
from protocols.errors import ProtocolError, RemoteProtocolError
from protocols.limits import MAX_INT64, MIN_INT64
from protocols.messages import (
    DoorState,
    LockState,
    LockStatus,
    LogEntry,
    LogKind,
    Op,
    Response,
    Status,
    check_result,
    decode_response,
    encode_response,
    parse_ack,
    parse_actuation,
    parse_log,
    parse_set_time,
    parse_status,
)

CMD = b"\x07" * 16
ENTRY: list[cbor.CborValue] = [5, 1_700_000_000, "manual", None, {"state": "locked"}]
GOOD: dict[Op, dict[str, cbor.CborValue]] = {
    Op.UNLOCK: {"state": "unlocked", "lock_seq": 4},
    Op.LOCK: {"state": "locked", "lock_seq": 5},
    Op.STATUS: {
        "state": "locked",
        "door": "closed",
        "battery_pct": 80,
        "firmware": "sim-1.0.0",
        "clock": 1_700_000_000,
        "log_first": 1,
        "log_next": 6,
        "name": "Door",
    },
    Op.READ_LOG: {"entries": [ENTRY], "next": 6},
    Op.ACK_LOG: {"first": 6},
    Op.SET_TIME: {"clock": 1_700_000_000},
}
FIELDS = [(op, name) for op, result in GOOD.items() for name in result]

# Any CBOR value, and more: integers beyond 64 bits, lone surrogates, bools, tags, nesting.
surrogates = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3)
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([0, -1, 1, 100, 101, 300, MAX_INT64, MAX_INT64 + 1, MIN_INT64, MIN_INT64 - 1, 2**64 - 1]),
    st.binary(max_size=20),
    st.text(max_size=80),
    surrogates,
    st.sampled_from(["locked", "unlocked", "jammed", "closed", "open", "manual", "x" * 65]),
)
values = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=6),
        st.dictionaries(st.one_of(st.text(max_size=40), surrogates, st.integers()), children, max_size=10),
        st.builds(cbor.Tag, st.integers(0, 2**32), children),
    ),
    max_leaves=20,
)


def _in_int64(v: int, lo: int = MIN_INT64) -> bool:
    return lo <= v <= MAX_INT64 and not isinstance(v, bool)


def _text_ok(v: str) -> bool:
    v.encode("utf-8")  # raises on a lone surrogate
    return isinstance(v, str) and len(v) <= 64


def _entry_ok(e: LogEntry) -> bool:
    return (
        _in_int64(e.lock_seq, 1)
        and _in_int64(e.t)
        and isinstance(e.kind, LogKind)
        and (e.cmd_id is None or len(e.cmd_id) == 16)
        and len(e.data) <= 8
        and all(
            _text_ok(k) and (_text_ok(v) if isinstance(v, str) else _in_int64(v)) for k, v in e.data.items()
        )
    )


def assert_parsed_in_range(op: Op, result: dict[str, Any]) -> None:
    """Parse ``result`` as ``op`` answers; a success must be typed and in range."""
    if op in (Op.UNLOCK, Op.LOCK):
        state, seq = parse_actuation(result)
        assert isinstance(state, LockState) and _in_int64(seq, 1)
    elif op is Op.STATUS:
        s = parse_status(result)
        assert isinstance(s, LockStatus) and isinstance(s.state, LockState) and isinstance(s.door, DoorState)
        assert 0 <= s.battery_pct <= 100 and _in_int64(s.clock)
        assert _in_int64(s.log_first, 0) and _in_int64(s.log_next, 0)
        assert _text_ok(s.firmware) and _text_ok(s.name)
    elif op is Op.READ_LOG:
        entries, nxt = parse_log(result)
        assert len(entries) <= 16 and all(_entry_ok(e) for e in entries) and _in_int64(nxt, 0)
        assert [e.lock_seq for e in entries] == sorted({e.lock_seq for e in entries})
    elif op is Op.ACK_LOG:
        assert _in_int64(parse_ack(result), 0)
    else:
        assert _in_int64(parse_set_time(result))
    check_result(Response(op, CMD, Status.OK, result))  # the session's gate agrees


def _refusal(check: Callable[[], object]) -> ProtocolError | None:
    """The ProtocolError ``check`` raised, or None; any other exception propagates (a bug)."""
    try:
        check()
    except ProtocolError as exc:
        return exc
    return None


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(FIELDS), values)
def test_B7_any_value_in_any_result_field_is_typed_in_range_or_refused(
    where: tuple[Op, str], value: cbor.CborValue
) -> None:
    op, name = where
    result = {**GOOD[op], name: value}
    refused = _refusal(lambda: assert_parsed_in_range(op, result))
    if refused is not None:
        assert refused.code == "bad_message"
        with pytest.raises(ProtocolError):
            check_result(Response(op, CMD, Status.OK, result))


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 4), values, st.integers(0, 3))
def test_B7_any_value_in_any_log_entry_field_is_typed_in_range_or_refused(
    index: int, value: cbor.CborValue, copies: int
) -> None:
    entry = list(ENTRY)
    entry[index] = value
    result = {"entries": [entry] + [[6 + i, 1, "door_opened", None, {}] for i in range(copies)], "next": 9}
    refused = _refusal(lambda: assert_parsed_in_range(Op.READ_LOG, result))
    assert refused is None or refused.code == "bad_message"


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(GOOD)), st.dictionaries(st.text(max_size=12), values, max_size=8))
def test_B7_any_result_map_is_typed_in_range_or_refused(op: Op, result: dict[str, cbor.CborValue]) -> None:
    refused = _refusal(lambda: assert_parsed_in_range(op, result))
    assert refused is None or refused.code == "bad_message"


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(FIELDS), values)
def test_B7_decoded_responses_with_any_field_value_check_or_refuse(
    where: tuple[Op, str], value: cbor.CborValue
) -> None:
    # Through the wire encoding: what decodes either checks or is a ProtocolError.
    op, name = where
    try:
        raw = encode_response(Response(op, CMD, Status.OK, {**GOOD[op], name: value}))
    except ProtocolError:
        return  # not encodable (an integer past 64 bits, a lone surrogate): cannot reach us
    refused = _refusal(lambda: check_result(decode_response(raw)))
    if refused is None:
        assert_parsed_in_range(op, dict(decode_response(raw).result))
    else:
        assert refused.code == "bad_message"


@pytest.mark.parametrize(
    ("op", "name", "value"),
    [
        (Op.UNLOCK, "lock_seq", 2**64 - 1),  # the value that killed the outbox's writer thread
        (Op.UNLOCK, "lock_seq", 2**63),
        (Op.UNLOCK, "lock_seq", 0),
        (Op.UNLOCK, "lock_seq", -1),
        (Op.UNLOCK, "lock_seq", "7"),
        (Op.UNLOCK, "lock_seq", True),
        (Op.UNLOCK, "state", "\ud800"),
        (Op.LOCK, "state", 5),
        (Op.STATUS, "battery_pct", 300),
        (Op.STATUS, "battery_pct", -1),
        (Op.STATUS, "clock", -(2**64)),
        (Op.STATUS, "clock", 2**63),
        (Op.STATUS, "clock", b"\x00"),
        (Op.STATUS, "log_next", 2**64 - 1),
        (Op.STATUS, "log_first", -1),
        (Op.STATUS, "firmware", "x" * 65),
        (Op.STATUS, "firmware", "sim\udfff"),
        (Op.STATUS, "name", ["Door"]),
        (Op.READ_LOG, "next", 2**64 - 1),
        (Op.READ_LOG, "entries", {"0": ENTRY}),
        (Op.READ_LOG, "entries", [[2**64 - 1, 1, "manual", None, {}]]),
        (Op.READ_LOG, "entries", [[5, -(2**63) - 1, "manual", None, {}]]),
        (Op.READ_LOG, "entries", [[5, 1, "manual\ud800", None, {}]]),
        (Op.READ_LOG, "entries", [[5, 1, "manual", None, {"k\ud800": 1}]]),
        (Op.READ_LOG, "entries", [[5, 1, "manual", None, {"k": "v\udc00"}]]),
        (Op.READ_LOG, "entries", [[5, 1, "manual", None, {"k": 2**63}]]),
        (Op.READ_LOG, "entries", [[5, 1, "manual", None, {"k": "x" * 65}]]),
        (Op.READ_LOG, "entries", [[5, 1, "manual", None, {f"k{i}": i for i in range(9)}]]),
        (Op.READ_LOG, "entries", [[5, 1, "manual", None, {"k" * 33: 1}]]),
        (Op.READ_LOG, "entries", [[5, 1, "manual", None, {"": 1}]]),
        (Op.READ_LOG, "entries", [[5, 1, "manual", None, {"k": {"deep": 1}}]]),
        (Op.READ_LOG, "entries", [[5, 1, "manual", None, {"k": True}]]),
        (Op.ACK_LOG, "first", 2**64 - 1),
        (Op.SET_TIME, "clock", -(2**63) - 1),
    ],
)
def test_B7_out_of_range_lock_values_are_refused_with_a_code(
    op: Op, name: str, value: cbor.CborValue
) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        check_result(Response(op, CMD, Status.OK, {**GOOD[op], name: value}))
    assert info.value.code == "bad_message"


def test_B7_the_edges_of_each_range_are_accepted() -> None:
    assert parse_actuation({"state": "unlocked", "lock_seq": MAX_INT64}) == (LockState.UNLOCKED, MAX_INT64)
    assert parse_actuation({"state": "unlocked", "lock_seq": 1})[1] == 1
    for battery in (0, 100):
        assert parse_status({**GOOD[Op.STATUS], "battery_pct": battery}).battery_pct == battery
    for clock in (MIN_INT64, -1, MAX_INT64):  # the lock's clock: any int64 (a reset RTC is early)
        assert parse_status({**GOOD[Op.STATUS], "clock": clock}).clock == clock
        assert parse_set_time({"clock": clock}) == clock
    status = parse_status({**GOOD[Op.STATUS], "name": "ü" * 64, "firmware": ""})
    assert status.name == "ü" * 64
    entry = [MAX_INT64, MIN_INT64, "manual", CMD, {f"k{i}": "v" * 64 for i in range(8)}]
    (parsed,), _ = parse_log({"entries": [entry], "next": MAX_INT64})
    assert (parsed.lock_seq, parsed.t, len(parsed.data)) == (MAX_INT64, MIN_INT64, 8)


@pytest.mark.parametrize("status", [Status.BUSY, Status.DENIED, Status.BAD_REQUEST, Status.FAILED])
def test_refusals_carry_no_values_to_check(status: Status) -> None:
    check_result(Response(Op.STATUS, CMD, status, {"error": "busy"}))
    check_result(Response(Op.UNLOCK, CMD, status, {"error": "busy"}))
    check_result(Response(Op.UNPAIR, CMD, Status.OK, {}))


@pytest.mark.parametrize(
    "raw",
    [
        {0: 99, 1: CMD, 2: 0, 3: {}},
        {0: 1, 1: CMD, 2: 99, 3: {}},
        {0: 1, 1: CMD, 2: True, 3: {}},
        {0: 1, 1: b"short", 2: 0, 3: {}},
        {0: 1, 1: CMD, 2: 0, 3: [1]},
        {0: 1, 1: CMD, 2: 0, 3: {1: "x"}},
        {0: 1, 1: CMD, 2: 0},
    ],
)
def test_malformed_responses_are_refused(raw: cbor.CborValue) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_response(cbor.dumps(raw))
    assert info.value.code == "bad_message"


def test_B7_a_jammed_actuation_is_checked_too() -> None:
    check_result(Response(Op.UNLOCK, CMD, Status.JAMMED, {"state": "jammed", "lock_seq": 9}))
    with pytest.raises(RemoteProtocolError):
        check_result(Response(Op.UNLOCK, CMD, Status.JAMMED, {"state": "jammed", "lock_seq": 2**64 - 1}))


def test_B7_lock_log_data_never_overwrites_the_gateways_fields() -> None:
    hostile = {
        "lock_seq": 1,
        "kind": "unlocked",
        "cmd_id": "00" * 16,
        "source": "gateway",
        "lock_time": 0,
        "alarm": 1,
        "flags": "emergency",
    }
    (entry,), _ = parse_log({"entries": [[42, 1_700_000_000, "manual", None, hostile]], "next": 43})
    data = entry.event_data()
    assert data == {
        "lock_seq": 42,
        "lock_time": 1_700_000_000,
        "kind": "manual",
        "cmd_id": None,
        "lock_data": hostile,
    }
    honest = LogEntry(7, 5, LogKind.UNLOCKED, CMD, {"source": "auto"})
    assert honest.event_data() == {
        "lock_seq": 7,
        "lock_time": 5,
        "kind": "unlocked",
        "cmd_id": CMD.hex(),
        "lock_data": {"source": "auto"},
    }
