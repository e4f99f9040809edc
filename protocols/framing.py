"""Frames on the lock link, and their fragmentation into ATT-sized pieces.

A frame is ``version (1) | type (1) | length (2, big endian) | body (length)``. The gateway
writes frames to the lock's RX characteristic and the lock notifies frames on TX; each ATT
write or notification carries at most ``mtu - 3`` bytes, so a frame travels as one or more
pieces that are simply concatenated: the receiver treats the characteristic as a byte stream.

:class:`FrameDecoder` is incremental (wsproto's buffer): it accepts pieces of any size, keeps a
partial frame until it is complete, and never buffers more than one maximal frame plus one
piece. A length over :data:`~protocols.limits.MAX_FRAME_BODY`, an unknown version or an unknown
type is a :class:`~protocols.errors.FramingError` the moment its header is seen, so a hostile
peer claiming a megabyte costs us four bytes.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from protocols.errors import FramingError
from protocols.limits import (
    ATT_OVERHEAD,
    FRAME_HEADER_LEN,
    MAX_ATT_MTU,
    MAX_FRAME_BODY,
    MIN_ATT_MTU,
)

__all__ = ["PROTOCOL_VERSION", "Frame", "FrameDecoder", "FrameType", "encode_frame", "fragment"]

#: Wire version; a lock that sees another version closes the link.
PROTOCOL_VERSION = 1


class FrameType(enum.IntEnum):
    """Frame types. Plaintext frames before the session, ``DATA`` (AEAD) after it."""

    PAIR_REQUEST = 0x01
    PAIR_RESPONSE = 0x02
    PAIR_CONFIRM = 0x03
    PAIR_DONE = 0x04
    ERROR = 0x0F
    HELLO = 0x10
    HELLO_REPLY = 0x11
    AUTH = 0x12
    DATA = 0x20


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    body: bytes

    def header(self) -> bytes:
        """The 4 header bytes; also the AEAD associated data of ``DATA`` frames."""
        return struct.pack(">BBH", PROTOCOL_VERSION, self.type, len(self.body))


def encode_frame(frame_type: FrameType, body: bytes) -> bytes:
    if len(body) > MAX_FRAME_BODY:
        raise FramingError(f"frame body of {len(body)} bytes exceeds {MAX_FRAME_BODY}")
    return struct.pack(">BBH", PROTOCOL_VERSION, frame_type, len(body)) + body


def fragment(data: bytes, mtu: int) -> list[bytes]:
    """Split encoded frames into pieces of at most ``mtu - 3`` bytes."""
    if not MIN_ATT_MTU <= mtu <= MAX_ATT_MTU:
        raise FramingError(f"ATT MTU {mtu} outside {MIN_ATT_MTU}..{MAX_ATT_MTU}")
    size = mtu - ATT_OVERHEAD
    return [data[i : i + size] for i in range(0, len(data), size)]


_FRAME_TYPES = frozenset(int(t) for t in FrameType)


class FrameDecoder:
    """Reassemble frames from pieces of any size."""

    __slots__ = ("_buffer", "_closed")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._closed = False

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def receive_data(self, data: bytes) -> list[Frame]:
        """Add a piece; return every frame it completes. Errors poison the decoder."""
        if self._closed:
            raise FramingError("frame decoder already failed; the link must be reset")
        self._buffer += data
        frames: list[Frame] = []
        try:
            while len(self._buffer) >= FRAME_HEADER_LEN:
                version, ftype, length = struct.unpack_from(">BBH", self._buffer)
                if version != PROTOCOL_VERSION:
                    raise FramingError(f"unsupported protocol version {version}")
                if ftype not in _FRAME_TYPES:
                    raise FramingError(f"unknown frame type 0x{ftype:02x}")
                if length > MAX_FRAME_BODY:
                    raise FramingError(f"frame claims {length} bytes, limit {MAX_FRAME_BODY}")
                end = FRAME_HEADER_LEN + length
                if len(self._buffer) < end:
                    break  # wait for the rest; the header stays buffered (rollback)
                frames.append(Frame(FrameType(ftype), bytes(self._buffer[FRAME_HEADER_LEN:end])))
                del self._buffer[:end]  # commit
        except FramingError:
            self._closed = True
            self._buffer.clear()
            raise
        return frames
