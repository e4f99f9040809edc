"""Strict, bounded CBOR (RFC 8949) for credentials and lock messages.

Why not a general CBOR library: every document we decode is hostile until verified, and the
contract demands rejections that general decoders do not make (duplicate map keys, indefinite
lengths, nesting beyond 8, trailing bytes). This decoder accepts only the subset we use —
integers, byte and text strings, arrays, maps, tags, false/true/null — and refuses everything
else with :class:`~protocols.errors.CborError` before any allocation larger than the input.

The encoder is deterministic (RFC 8949 §4.2.1): shortest integer and length forms, map keys
sorted by their encoded bytes. Signatures are always computed over the exact bytes received,
never over a re-encoding.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from protocols.errors import CborError
from protocols.limits import MAX_CBOR_DEPTH, MAX_CBOR_ITEMS

__all__ = ["CborValue", "Tag", "dumps", "loads", "loads_prefix"]


@dataclass(frozen=True, slots=True)
class Tag:
    """A tagged item (major type 6)."""

    number: int
    value: CborValue


# Containers are typed as read-only views so that ``dict[str, int]`` is a CborValue; keys are
# checked at run time (int, str or bytes).
CborValue = int | bytes | str | bool | None | Sequence["CborValue"] | Mapping[Any, "CborValue"] | Tag
CborKey = int | str | bytes

_FALSE: Final = 0xF4
_TRUE: Final = 0xF5
_NULL: Final = 0xF6


class _Reader:
    __slots__ = ("data", "items", "max_depth", "pos")

    def __init__(self, data: bytes, max_depth: int) -> None:
        self.data = data
        self.pos = 0
        self.max_depth = max_depth
        self.items = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise CborError("truncated CBOR: item runs past the end of the input")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def argument(self, info: int) -> int:
        if info < 24:
            return info
        if info == 24:
            return self.take(1)[0]
        if info == 25:
            return int(struct.unpack(">H", self.take(2))[0])
        if info == 26:
            return int(struct.unpack(">I", self.take(4))[0])
        if info == 27:
            return int(struct.unpack(">Q", self.take(8))[0])
        if info == 31:
            raise CborError("indefinite-length CBOR items are not accepted")
        raise CborError(f"reserved CBOR additional information {info}")

    def count(self, n: int) -> None:
        self.items += n
        if self.items > MAX_CBOR_ITEMS:
            raise CborError(f"CBOR document has more than {MAX_CBOR_ITEMS} items")

    def item(self, depth: int) -> CborValue:
        if depth > self.max_depth:
            raise CborError(f"CBOR nesting deeper than {self.max_depth}")
        initial = self.take(1)[0]
        major, info = initial >> 5, initial & 0x1F
        if major == 7:
            if initial == _FALSE:
                return False
            if initial == _TRUE:
                return True
            if initial == _NULL:
                return None
            raise CborError(f"CBOR simple value or float 0x{initial:02x} is not accepted")
        arg = self.argument(info)
        if major == 0:
            return arg
        if major == 1:
            return -1 - arg
        if major == 2:
            return self.take(arg)
        if major == 3:
            try:
                return self.take(arg).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CborError("CBOR text string is not valid UTF-8") from exc
        if major == 4:
            # Each element needs at least one byte: reject absurd counts before looping.
            if arg > len(self.data) - self.pos:
                raise CborError("truncated CBOR: array longer than the input")
            self.count(arg)
            return [self.item(depth + 1) for _ in range(arg)]
        if major == 5:
            if 2 * arg > len(self.data) - self.pos:
                raise CborError("truncated CBOR: map longer than the input")
            self.count(arg)
            out: dict[CborKey, CborValue] = {}
            for _ in range(arg):
                key = self.item(depth + 1)
                if not isinstance(key, int | str | bytes) or isinstance(key, bool):
                    raise CborError("CBOR map key must be an integer, text or byte string")
                if key in out:
                    raise CborError(f"duplicate CBOR map key {key!r}")
                out[key] = self.item(depth + 1)
            return out
        # major == 6: a tag wraps exactly one item.
        return Tag(arg, self.item(depth + 1))


def loads_prefix(data: bytes, *, max_depth: int = MAX_CBOR_DEPTH) -> tuple[CborValue, int]:
    """Decode one item from the start of ``data``; return it and the bytes consumed."""
    reader = _Reader(bytes(data), max_depth)
    value = reader.item(1)
    return value, reader.pos


def loads(data: bytes, *, max_depth: int = MAX_CBOR_DEPTH) -> CborValue:
    """Decode exactly one item; trailing bytes are an error (CONTRACT §8.12)."""
    value, used = loads_prefix(data, max_depth=max_depth)
    if used != len(data):
        raise CborError(f"{len(data) - used} trailing bytes after the CBOR item")
    return value


def _head(major: int, arg: int) -> bytes:
    if arg < 24:
        return bytes([major << 5 | arg])
    if arg < 0x100:
        return bytes([major << 5 | 24, arg])
    if arg < 0x10000:
        return bytes([major << 5 | 25]) + struct.pack(">H", arg)
    if arg < 0x1_0000_0000:
        return bytes([major << 5 | 26]) + struct.pack(">I", arg)
    if arg < 0x1_0000_0000_0000_0000:
        return bytes([major << 5 | 27]) + struct.pack(">Q", arg)
    raise CborError("integer does not fit in 64 bits")


def dumps(value: CborValue) -> bytes:
    """Deterministically encode ``value`` (RFC 8949 §4.2.1)."""
    if value is False:
        return bytes([_FALSE])
    if value is True:
        return bytes([_TRUE])
    if value is None:
        return bytes([_NULL])
    if isinstance(value, int):
        return _head(0, value) if value >= 0 else _head(1, -1 - value)
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        return _head(2, len(raw)) + raw
    if isinstance(value, str):
        raw = value.encode("utf-8")
        return _head(3, len(raw)) + raw
    if isinstance(value, list | tuple):
        return _head(4, len(value)) + b"".join(dumps(v) for v in value)
    if isinstance(value, Mapping):
        pairs = sorted((dumps(k), dumps(v)) for k, v in value.items())
        return _head(5, len(pairs)) + b"".join(k + v for k, v in pairs)
    if isinstance(value, Tag):
        return _head(6, value.number) + dumps(value.value)
    raise CborError(f"cannot encode {type(value).__name__} as CBOR")
