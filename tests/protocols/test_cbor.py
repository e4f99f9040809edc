from __future__ import annotations

import cbor_reference
import pytest
from credfix import World
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import cbor
from protocols.errors import CborError

keys = st.one_of(st.integers(-(2**63), 2**64 - 1), st.text(max_size=8), st.binary(max_size=8))
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64 - 1),
    st.binary(max_size=40),
    st.text(max_size=40),
)
values = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(keys, children, max_size=5),
        st.builds(cbor.Tag, st.integers(0, 2**32), children),
    ),
    max_leaves=20,
)


def depth(v: object) -> int:
    if isinstance(v, list):
        return 1 + max((depth(x) for x in v), default=0)
    if isinstance(v, dict):
        return 1 + max((max(depth(k), depth(x)) for k, x in v.items()), default=0)
    if isinstance(v, cbor.Tag):
        return 1 + depth(v.value)
    return 1


@settings(max_examples=500)
@given(values)
def test_roundtrip(value: cbor.CborValue) -> None:
    encoded = cbor.dumps(value)
    if depth(value) <= 8:
        assert cbor.loads(encoded) == value
    else:
        with pytest.raises(CborError):
            cbor.loads(encoded)


@settings(max_examples=1000)
@given(st.binary(max_size=200))
def test_B6_random_bytes_raise_only_cbor_error(data: bytes) -> None:
    try:
        value = cbor.loads(data)
    except CborError:
        return
    # Accepted: a value of the supported subset, within the nesting limit, that the input held.
    encoded = cbor.dumps(value)
    assert depth(value) <= 8 and cbor.loads(encoded) == value and len(encoded) <= len(data)


@pytest.mark.parametrize(
    ("hexdata", "why"),
    [
        ("5f41014102ff", "indefinite byte string"),
        ("9f01ff", "indefinite array"),
        ("a201010102", "duplicate map key"),
        ("a2616101616102", "duplicate text key"),
        ("0102", "trailing bytes"),
        ("f97c00", "half float"),
        ("fb3ff0000000000000", "double"),
        ("f7", "undefined"),
        ("1c", "reserved additional info"),
        ("5a00010000", "byte string longer than input"),
        ("9b0000000100000000", "array count beyond input"),
        ("62c328", "invalid utf-8"),
        ("a1f601", "null as a map key"),
        ("818181818181818101", "nesting 9"),
    ],
)
def test_rejections(hexdata: str, why: str) -> None:
    with pytest.raises(CborError):
        cbor.loads(bytes.fromhex(hexdata))


def test_nesting_8_is_accepted() -> None:
    assert cbor.loads(bytes.fromhex("8181818181818101")) == [[[[[[[1]]]]]]]


def test_deterministic_map_order() -> None:
    # Keys sort by their encoded bytes: 0x0a (10) < 0x20 (-1) < 0x6161 ("a") < 0x6162 ("b").
    assert cbor.dumps({"b": 1, "a": 2, 10: 3, -1: 4}) == bytes.fromhex("a40a032004616102616201")


def test_shortest_integer_forms() -> None:
    assert [cbor.dumps(n).hex() for n in (23, 24, 255, 256, 65536, -25)] == [
        "17",
        "1818",
        "18ff",
        "190100",
        "1a00010000",
        "3818",
    ]


@pytest.mark.parametrize("text", ["\ud800", "ok\udfff", "\udbff\udc00"[0]])
def test_B7_lone_surrogates_are_not_text_either_way(text: str) -> None:
    # Encoding one is a CborError (never a UnicodeEncodeError), and its surrogatepass bytes
    # (what a hostile lock could send) do not decode as text.
    with pytest.raises(CborError, match="surrogate"):
        cbor.dumps({"name": text})
    raw = text.encode("utf-8", "surrogatepass")
    with pytest.raises(CborError, match="UTF-8"):
        cbor.loads(bytes([0x60 | len(raw)]) + raw)


# --- the optimised decoder against the reference (tests/cbor_reference.py) ----------


def _outcome(decode: object, data: bytes) -> tuple[str, object]:
    try:
        value = decode(data)  # type: ignore[operator]
    except CborError as exc:
        return "refused", str(exc)
    return "value", (type(value).__name__, value)


def _same_as_reference(data: bytes) -> None:
    fast, ref = _outcome(cbor.loads, data), _outcome(cbor_reference.loads, data)
    assert fast == ref, data.hex()
    if fast[0] == "value":  # the same types all the way down (1 == True, b"" == ... aside)
        assert cbor.dumps(cbor.loads(data)) == cbor.dumps(cbor_reference.loads(data))


def _mutations(data: bytes) -> st.SearchStrategy[bytes]:
    """A valid encoding with one byte changed, dropped, inserted, or cut short."""
    n = len(data)
    i = st.integers(0, max(n - 1, 0))
    byte = st.integers(0, 255)
    return st.one_of(
        st.tuples(i, byte).map(lambda t: data[: t[0]] + bytes([t[1]]) + data[t[0] + 1 :]),
        i.map(lambda k: data[:k] + data[k + 1 :]),
        st.tuples(i, byte).map(lambda t: data[: t[0]] + bytes([t[1]]) + data[t[0] :]),
        i.map(lambda k: data[:k]),
    )


@settings(max_examples=800)
@given(st.binary(max_size=120))
def test_B6_random_bytes_decode_exactly_as_the_reference(data: bytes) -> None:
    _same_as_reference(data)


@settings(max_examples=500)
@given(values.map(cbor.dumps).flatmap(_mutations))
def test_B6_mutated_documents_decode_exactly_as_the_reference(data: bytes) -> None:
    _same_as_reference(data)


@pytest.mark.parametrize("max_depth", [1, 2, 3, 8])
@settings(max_examples=120)
@given(values.map(cbor.dumps))
def test_B6_nesting_limits_are_the_reference_s(max_depth: int, data: bytes) -> None:
    fast = _outcome(lambda d: cbor.loads(d, max_depth=max_depth), data)
    assert fast == _outcome(lambda d: cbor_reference.loads(d, max_depth=max_depth), data)


def test_B6_token_and_proof_shapes_and_each_of_their_mutations_decode_as_the_reference() -> None:
    w = World()
    auth = w.authority()
    token = w.token()
    proof = w.prove(auth, token)
    for doc in (token, proof, w.keyring()):
        sign1 = cbor.loads(doc)
        assert isinstance(sign1, cbor.Tag)
        assert isinstance(sign1.value, list)
        for data in (doc, sign1.value[0], sign1.value[2]):
            _same_as_reference(data)
            for k in range(len(data)):  # every byte changed to a few telling values, and every cut
                for b in (0x00, 0x17, 0x18, 0x1F, 0x40, 0x58, 0x5F, 0x78, 0x7F, 0x9F, 0xBF, 0xF6, 0xFF):
                    _same_as_reference(data[:k] + bytes([b]) + data[k + 1 :])
                _same_as_reference(data[:k])


def test_B6_more_items_than_the_limit_is_refused_as_by_the_reference() -> None:
    n = 65_537
    data = b"\x9a" + n.to_bytes(4, "big") + b"\x00" * n
    with pytest.raises(CborError, match="more than 65536 items"):
        cbor.loads(data)
    _same_as_reference(data)
    _same_as_reference(b"\x9a" + (n - 1).to_bytes(4, "big") + b"\x00" * (n - 1))
