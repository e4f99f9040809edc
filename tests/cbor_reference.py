"""The strict CBOR decoder as it was before its fast paths (protocols/cbor.py at 0f72d22): one
plain recursive function per item, every refusal in document order. Kept as the reference the
optimised decoder is tested against (tests/protocols/test_cbor.py): the same value, or the same
refusal with the same message, for every input."""

from __future__ import annotations

from protocols.cbor import CborValue, Tag
from protocols.errors import CborError
from protocols.limits import MAX_CBOR_DEPTH, MAX_CBOR_ITEMS

_KEY_TYPES = (int, str, bytes)


class _Reader:
    def __init__(self, data: bytes, max_depth: int) -> None:
        self.data, self.n, self.pos, self.max_depth, self.items = data, len(data), 0, max_depth, 0

    def item(self, depth: int) -> CborValue:  # noqa: C901, PLR0912 - the reference decoder
        if depth > self.max_depth:
            raise CborError(f"CBOR nesting deeper than {self.max_depth}")
        data, pos = self.data, self.pos
        if pos >= self.n:
            raise CborError("truncated CBOR: item runs past the end of the input")
        initial = data[pos]
        pos += 1
        major, info = initial >> 5, initial & 0x1F
        if major == 7:
            self.pos = pos
            if initial == 0xF4:
                return False
            if initial == 0xF5:
                return True
            if initial == 0xF6:
                return None
            raise CborError(f"CBOR simple value or float 0x{initial:02x} is not accepted")
        if info < 24:
            arg = info
        elif info <= 27:
            size = 1 << (info - 24)
            if pos + size > self.n:
                raise CborError("truncated CBOR: item runs past the end of the input")
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
                raise CborError("truncated CBOR: item runs past the end of the input")
            self.pos = end
            if major == 2:
                return data[pos:end]
            try:
                return data[pos:end].decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CborError("CBOR text string is not valid UTF-8") from exc
        self.pos = pos
        if major == 4:
            if arg > self.n - pos:
                raise CborError("truncated CBOR: array longer than the input")
            self._count(arg)
            return [self.item(depth + 1) for _ in range(arg)]
        if major == 5:
            if 2 * arg > self.n - pos:
                raise CborError("truncated CBOR: map longer than the input")
            self._count(arg)
            out: dict[object, CborValue] = {}
            for _ in range(arg):
                key = self.item(depth + 1)
                if type(key) not in _KEY_TYPES:
                    raise CborError("CBOR map key must be an integer, text or byte string")
                if key in out:
                    raise CborError(f"duplicate CBOR map key {key!r}")
                out[key] = self.item(depth + 1)
            return out
        return Tag(arg, self.item(depth + 1))

    def _count(self, n: int) -> None:
        self.items += n
        if self.items > MAX_CBOR_ITEMS:
            raise CborError(f"CBOR document has more than {MAX_CBOR_ITEMS} items")


def loads(data: bytes, *, max_depth: int = MAX_CBOR_DEPTH) -> CborValue:
    reader = _Reader(bytes(data), max_depth)
    value = reader.item(1)
    if reader.pos != len(data):
        raise CborError(f"{len(data) - reader.pos} trailing bytes after the CBOR item")
    return value
