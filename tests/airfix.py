"""Simulated locks and an in-process gateway controller on one Bumble link."""

from __future__ import annotations

from dataclasses import dataclass

from firmware_sim.bumble_peripheral import SimLock, SimRadio
from gateway.ble.bumble_backend import BumbleHost


@dataclass
class Air:
    radio: SimRadio
    host: BumbleHost
    locks: list[SimLock]
