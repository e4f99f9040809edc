from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.errors import FramingError
from protocols.framing import Frame, FrameDecoder, FrameType, encode_frame, fragment
from protocols.limits import MAX_FRAME_BODY

frames = st.lists(
    st.tuples(st.sampled_from(list(FrameType)), st.binary(max_size=MAX_FRAME_BODY)),
    min_size=1,
    max_size=4,
)


def feed(decoder: FrameDecoder, data: bytes, cuts: list[int]) -> list[Frame]:
    out: list[Frame] = []
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for a, b in itertools.pairwise(points):
        out += decoder.receive_data(data[a:b])
    return out


@settings(max_examples=500)
@given(frames, st.lists(st.integers(0, 10_000), max_size=20))
def test_roundtrip_under_any_fragmentation(items: list[tuple[FrameType, bytes]], cuts: list[int]) -> None:
    data = b"".join(encode_frame(t, b) for t, b in items)
    assert feed(FrameDecoder(), data, cuts) == [Frame(t, b) for t, b in items]


@pytest.mark.parametrize("mtu", [23, 24, 185, 247, 517])
def test_one_byte_and_mtu_pieces(mtu: int) -> None:
    data = encode_frame(FrameType.DATA, bytes(range(256)) * 4)
    pieces = fragment(data, mtu)
    assert all(len(p) <= mtu - 3 for p in pieces) and b"".join(pieces) == data
    decoder = FrameDecoder()
    out = [f for p in pieces for f in decoder.receive_data(p)]
    assert out == [Frame(FrameType.DATA, bytes(range(256)) * 4)]
    decoder = FrameDecoder()
    assert [f for b in data for f in decoder.receive_data(bytes([b]))] == out


@pytest.mark.parametrize("mtu", [0, 22, 518])
def test_mtu_out_of_range(mtu: int) -> None:
    with pytest.raises(FramingError):
        fragment(b"x", mtu)


def test_B7_huge_claimed_length_fails_on_the_header() -> None:
    decoder = FrameDecoder()
    with pytest.raises(FramingError, match="claims 65535"):
        decoder.receive_data(bytes([1, 0x20, 0xFF, 0xFF]))
    assert decoder.buffered == 0
    with pytest.raises(FramingError):  # poisoned
        decoder.receive_data(encode_frame(FrameType.DATA, b""))


@pytest.mark.parametrize("header", [bytes([2, 0x20, 0, 0]), bytes([1, 0x99, 0, 0])])
def test_bad_version_or_type(header: bytes) -> None:
    with pytest.raises(FramingError):
        FrameDecoder().receive_data(header)


def test_partial_frame_is_held_not_returned() -> None:
    decoder = FrameDecoder()
    data = encode_frame(FrameType.AUTH, b"abc")
    assert decoder.receive_data(data[:-1]) == []
    assert decoder.buffered == len(data) - 1
    assert decoder.receive_data(data[-1:]) == [Frame(FrameType.AUTH, b"abc")]


def test_encode_refuses_oversized_body() -> None:
    with pytest.raises(FramingError):
        encode_frame(FrameType.DATA, bytes(MAX_FRAME_BODY + 1))


@settings(max_examples=500)
@given(st.binary(max_size=3000))
def test_B6_random_bytes_raise_only_framing_errors_and_stay_bounded(data: bytes) -> None:
    decoder = FrameDecoder()
    try:
        for i in range(0, len(data), 20):
            decoder.receive_data(data[i : i + 20])
            assert decoder.buffered < 4 + MAX_FRAME_BODY
    except FramingError:
        pass
