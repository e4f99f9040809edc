"""The OS clock as the authorization core sees it: wall time, monotonic time, synchronisation.

"Synchronised" is the kernel's own view (``adjtimex``: not ``TIME_ERROR`` and ``STA_UNSYNC``
clear), which chrony, systemd-timesyncd and ntpd all maintain; it needs no network access and
no D-Bus. Tests inject a :class:`ManualClock` instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Clock", "ManualClock", "SystemClock"]

_TIME_ERROR = 5
_STA_UNSYNC = 0x0040


class _Timex(ctypes.Structure):
    # struct timex from <sys/timex.h> (glibc, 64-bit): only `modes` is set, only `status` read;
    # the trailing padding covers the reserved fields.
    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long),
        ("time_usec", ctypes.c_long),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_reserved", ctypes.c_int * 11),
    ]


class Clock(Protocol):
    def wall(self) -> float: ...
    def mono(self) -> float: ...
    def synced(self) -> bool: ...


class SystemClock:
    def __init__(self) -> None:
        name = ctypes.util.find_library("c")
        self._libc = ctypes.CDLL(name, use_errno=True) if name else None

    def wall(self) -> float:
        return time.time()

    def mono(self) -> float:
        return time.monotonic()

    def synced(self) -> bool:
        if self._libc is None:
            return False
        tx = _Timex()
        state = self._libc.adjtimex(ctypes.byref(tx))
        return bool(state >= 0 and state != _TIME_ERROR and not tx.status & _STA_UNSYNC)


@dataclass
class ManualClock:
    """A clock the tests move by hand."""

    wall_s: float
    mono_s: float = 1000.0
    is_synced: bool = True

    def wall(self) -> float:
        return self.wall_s

    def mono(self) -> float:
        return self.mono_s

    def synced(self) -> bool:
        return self.is_synced

    def advance(self, seconds: float) -> None:
        self.wall_s += seconds
        self.mono_s += seconds
