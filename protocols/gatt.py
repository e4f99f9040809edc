"""GATT layout and advertising format of a lock unit, shared by the gateway and the simulator."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from protocols.errors import ProtocolError
from protocols.messages import validate_id

__all__ = [
    "COMPANY_ID",
    "RX_CHAR_UUID",
    "SERVICE_UUID",
    "TX_CHAR_UUID",
    "Advert",
    "decode_advert",
    "encode_advert",
]

SERVICE_UUID: Final = "6e4c0001-7c39-4d1b-9a3e-1c0d5a4b0001"
#: gateway → lock: write with response
RX_CHAR_UUID: Final = "6e4c0002-7c39-4d1b-9a3e-1c0d5a4b0001"
#: lock → gateway: notify
TX_CHAR_UUID: Final = "6e4c0003-7c39-4d1b-9a3e-1c0d5a4b0001"
#: 0xFFFF is the Bluetooth SIG's id reserved for testing; a product uses its vendor id.
COMPANY_ID: Final = 0xFFFF
ADVERT_VERSION: Final = 1
FLAG_PAIRED: Final = 0x01
FLAG_PAIRING_MODE: Final = 0x02


@dataclass(frozen=True, slots=True)
class Advert:
    """Manufacturer data: version, flags, a state counter (changes on any state change), lock id."""

    lock_id: str
    paired: bool
    pairing_mode: bool
    state_counter: int


def encode_advert(advert: Advert) -> bytes:
    flags = (FLAG_PAIRED if advert.paired else 0) | (FLAG_PAIRING_MODE if advert.pairing_mode else 0)
    return struct.pack(">BBH", ADVERT_VERSION, flags, advert.state_counter & 0xFFFF) + advert.lock_id.encode()


def decode_advert(data: bytes) -> Advert | None:
    """Return None for anything that is not a well-formed lockgw advert (never raises)."""
    if len(data) < 5 or data[0] != ADVERT_VERSION:
        return None
    _, flags, counter = struct.unpack_from(">BBH", data)
    try:
        lock_id = data[4:].decode("ascii")
    except UnicodeDecodeError:
        return None
    try:
        validate_id(lock_id, "lock id")
    except ProtocolError:
        return None
    return Advert(lock_id, bool(flags & FLAG_PAIRED), bool(flags & FLAG_PAIRING_MODE), counter)
