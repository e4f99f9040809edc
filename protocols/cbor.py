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

__all__ = ["CborValue", "Tag", "bstr_head", "dumps", "loads", "loads_prefix"]


@dataclass(frozen=True, slots=True)
class Tag:
    """A tagged item (major type 6)."""

    number: int
    value: CborValue


# Containers are typed as read-only views so that ``dict[str, int]`` is a CborValue; keys are
# checked at run time (int, str or bytes).
CborValue = int | bytes | str | bool | None | Sequence["CborValue"] | Mapping[Any, "CborValue"] | Tag
CborKey = int | str | bytes

_KEY_TYPES: Final = (int, str, bytes)
_FALSE: Final = 0xF4
_TRUE: Final = 0xF5
_NULL: Final = 0xF6


_TRUNCATED: Final = "truncated CBOR: item runs past the end of the input"


class _Reader:
    """Recursive-descent decoder; hot paths are inlined (it runs on every token and proof).

    :meth:`item` is the reference: it decodes any one item and makes every refusal.
    :meth:`_body` decodes the elements of an array or map with a fast path for the scalars
    tokens and proofs are made of (integers, short byte and text strings, false/true/null,
    empty containers); anything else — and anything malformed — goes to :meth:`item`, so a
    refusal is always :meth:`item`'s, in document order.
    """

    __slots__ = ("data", "items", "max_depth", "n", "pos")

    def __init__(self, data: bytes, max_depth: int) -> None:
        self.data = data
        self.n = len(data)
        self.pos = 0
        self.max_depth = max_depth
        self.items = 0

    def item(self, depth: int) -> CborValue:  # noqa: C901, PLR0912 - the decoder: one branch per CBOR major type and per malformed case
        if depth > self.max_depth:
            raise CborError(f"CBOR nesting deeper than {self.max_depth}")
        data, pos = self.data, self.pos
        if pos >= self.n:
            raise CborError(_TRUNCATED)
        initial = data[pos]
        pos += 1
        major, info = initial >> 5, initial & 0x1F
        if major == 7:
            self.pos = pos
            if initial == _FALSE:
                return False
            if initial == _TRUE:
                return True
            if initial == _NULL:
                return None
            raise CborError(f"CBOR simple value or float 0x{initial:02x} is not accepted")
        if info < 24:
            arg = info
        elif info <= 27:
            size = 1 << (info - 24)
            if pos + size > self.n:
                raise CborError(_TRUNCATED)
            arg = int.from_bytes(data[pos : pos + size], "big")
            pos += size
        elif info == 31:
            raise CborError("indefinite-length CBOR items are not accepted")
        else:
            raise CborError(f"reserved CBOR additional information {info}")
        if major == 0:
            self.pos = pos
            return arg
        if major == 1:
            self.pos = pos
            return -1 - arg
        if major in (2, 3):
            end = pos + arg
            if end > self.n:
                raise CborError(_TRUNCATED)
            self.pos = end
            if major == 2:
                return data[pos:end]
            try:
                return data[pos:end].decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CborError("CBOR text string is not valid UTF-8") from exc
        self.pos = pos
        if major == 4:
            # Each element needs at least one byte: reject absurd counts before looping.
            if arg > self.n - pos:
                raise CborError("truncated CBOR: array longer than the input")
            self._count(arg)
            return self._body(arg, depth + 1, is_map=False)
        if major == 5:
            if 2 * arg > self.n - pos:
                raise CborError("truncated CBOR: map longer than the input")
            self._count(arg)
            return self._body(arg, depth + 1, is_map=True)
        # major == 6: a tag wraps exactly one item.
        return Tag(arg, self.item(depth + 1))

    def _body(self, count: int, depth: int, *, is_map: bool) -> list[CborValue] | dict[CborKey, CborValue]:  # noqa: C901, PLR0912, PLR0915 - the fast path, inlined on purpose: one branch per scalar head it takes from item()
        """``count`` elements (a map: ``count`` key/value pairs) at ``depth``, from ``self.pos``."""
        if count and depth > self.max_depth:  # the first element would be refused by item()
            raise CborError(f"CBOR nesting deeper than {self.max_depth}")
        data, n, pos = self.data, self.n, self.pos
        values: list[CborValue] = []
        out: dict[CborKey, CborValue] = {}
        key: CborValue = None
        for i in range(2 * count if is_map else count):
            value: CborValue
            initial = data[pos] if pos < n else 0xFF  # 0xff (a break): item() refuses it
            if initial < 0x18:  # unsigned 0..23
                value = initial
                pos += 1
            elif initial <= 0x1B:  # unsigned, 1/2/4/8 bytes
                end = pos + 1 + (1 << (initial - 0x18))
                if end > n:
                    self.pos = pos
                    value = self.item(depth)
                else:
                    value = int.from_bytes(data[pos + 1 : end], "big")
                    pos = end
            elif 0x20 <= initial < 0x38:  # negative -1..-24
                value = 0x1F - initial
                pos += 1
            elif 0x40 <= initial < 0x58 or 0x60 <= initial <= 0x78:
                # byte strings of 0..23 bytes (0x40..0x57), text of 0..23 or < 256 bytes (0x60..0x78)
                if initial == 0x78:
                    start = pos + 2
                    end = start + (data[pos + 1] if pos + 1 < n else n)
                else:
                    start = pos + 1
                    end = start + (initial & 0x1F)
                if end > n:
                    self.pos = pos
                    value = self.item(depth)
                elif initial < 0x60:
                    value = data[start:end]
                    pos = end
                else:
                    try:
                        value = data[start:end].decode("utf-8")
                    except UnicodeDecodeError as exc:
                        raise CborError("CBOR text string is not valid UTF-8") from exc
                    pos = end
            elif initial == 0x58:  # byte string of < 256 bytes (keys, nonces, hashes, signatures)
                start = pos + 2
                end = start + (data[pos + 1] if pos + 1 < n else n)
                if end > n:
                    self.pos = pos
                    value = self.item(depth)
                else:
                    value = data[start:end]
                    pos = end
            elif initial == _FALSE:
                value = False
                pos += 1
            elif initial == _TRUE:
                value = True
                pos += 1
            else:  # containers, tags, long strings, null, and every malformed head
                self.pos = pos
                value = self.item(depth)
                pos = self.pos
            if not is_map:
                values.append(value)
            elif i & 1 == 0:
                if type(value) not in _KEY_TYPES:
                    raise CborError("CBOR map key must be an integer, text or byte string")
                if value in out:
                    raise CborError(f"duplicate CBOR map key {value!r}")
                key = value
            else:
                out[key] = value  # type: ignore[index]
        self.pos = pos
        return out if is_map else values

    def _count(self, n: int) -> None:
        self.items += n
        if self.items > MAX_CBOR_ITEMS:
            raise CborError(f"CBOR document has more than {MAX_CBOR_ITEMS} items")


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


def bstr_head(length: int) -> bytes:
    """The head of a byte string of ``length`` bytes (to frame bytes without copying them)."""
    return _head(2, length)


def dumps(value: CborValue) -> bytes:  # noqa: C901 - one branch per CBOR type
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
        try:
            raw = value.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate: not Unicode text (RFC 8949 §3.1)
            raise CborError("CBOR text string is not valid Unicode (lone surrogate)") from exc
        return _head(3, len(raw)) + raw
    if isinstance(value, list | tuple):
        return _head(4, len(value)) + b"".join(dumps(v) for v in value)
    if isinstance(value, Mapping):
        pairs = sorted((dumps(k), dumps(v)) for k, v in value.items())
        return _head(5, len(pairs)) + b"".join(k + v for k, v in pairs)
    if isinstance(value, Tag):
        return _head(6, value.number) + dumps(value.value)
    raise CborError(f"cannot encode {type(value).__name__} as CBOR")
