"""Test helpers: deterministic randomness and two pure endpoints joined in memory."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from protocols.framing import fragment
from protocols.session import Event, GatewayConnection, LockConnection


class SeededRng:
    """Deterministic byte source (SHA-256 in counter mode) standing in for os.urandom."""

    def __init__(self, seed: bytes | str | int) -> None:
        self._seed = str(seed).encode() if not isinstance(seed, bytes) else seed
        self._counter = 0

    def __call__(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += hashlib.sha256(self._seed + self._counter.to_bytes(8, "big")).digest()
            self._counter += 1
        return out[:n]


@dataclass
class ConnectionPair:
    """A gateway-role and a lock-role connection wired back to back (h11's ConnectionPair)."""

    gw: GatewayConnection
    lock: LockConnection
    mtu: int = 247
    transcript: list[tuple[str, bytes]] = field(default_factory=list)

    def to_lock(self) -> list[Event]:
        data = self.gw.data_to_send()
        self.transcript.append(("g2l", data))
        events: list[Event] = []
        for piece in fragment(data, self.mtu) if data else []:
            events.extend(self.lock.receive_data(piece))
        return events

    def to_gw(self) -> list[Event]:
        data = self.lock.data_to_send()
        self.transcript.append(("l2g", data))
        events: list[Event] = []
        for piece in fragment(data, self.mtu) if data else []:
            events.extend(self.gw.receive_data(piece))
        return events

    def transfer(self) -> tuple[list[Event], list[Event]]:
        """Move bytes both ways until quiet; return (lock events, gateway events)."""
        lock_events: list[Event] = []
        gw_events: list[Event] = []
        for _ in range(10):
            le = self.to_lock()
            ge = self.to_gw()
            lock_events += le
            gw_events += ge
            if not le and not ge and not self.gw._out and not self.lock._out:
                break
        return lock_events, gw_events
