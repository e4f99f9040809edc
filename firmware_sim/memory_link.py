"""A lock reached through memory instead of a radio: for pure tests and benchmarks."""

from __future__ import annotations

from firmware_sim.lock_model import LockModel
from firmware_sim.peripheral import LinkDriver
from firmware_sim.persist import LockStore
from protocols.framing import fragment
from protocols.session import Event, GatewayConnection, Rng

__all__ = ["MemoryLink"]


class MemoryLink:
    """One connection between a GatewayConnection and a simulated lock, pieces of ``mtu - 3``."""

    def __init__(
        self,
        gw: GatewayConnection,
        model: LockModel,
        *,
        rng: Rng,
        now: float,
        mtu: int = 247,
        store: LockStore | None = None,
    ) -> None:
        self.gw = gw
        self.driver = LinkDriver(model, rng=rng, now=now, store=store)
        self.mtu = mtu
        self.dropped = False

    def roundtrip(self, now: float) -> list[Event]:
        """Deliver what the gateway queued, then the lock's answer; return gateway events."""
        events: list[Event] = []
        for _ in range(4):
            out = self.gw.data_to_send()
            if not out:
                break
            for piece in fragment(out, self.mtu):
                self.driver.receive(piece, now)
            for piece in fragment(self.driver.data_to_send(), self.mtu) if not self.dropped else []:
                events.extend(self.gw.receive_data(piece))
        return events

    def drop(self) -> None:
        """Lose every lock → gateway byte from now on (a link drop after the write)."""
        self.dropped = True
