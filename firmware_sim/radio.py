"""The simulator's radio timing model: pure arithmetic over a profile and a seeded rng.

No asyncio, no clock: callers pass "now" in seconds and get back delays or delivery times.
:mod:`firmware_sim.bumble_peripheral` applies them where the simulated air delivers PDUs and
where a lock answers. docs/simulator.md ("Radio profiles") describes the model and its sources
in the Bluetooth Core Specification; in short:

* **Advertising** (Core Vol 6 Part B 4.4.2.2): an advertising event every ``advInterval`` plus a
  pseudo-random ``advDelay`` of 0-10 ms. A central that starts connecting at a random moment
  waits for the lock's next advert: on average half an interval (plus half the mean advDelay).
* **Connection set-up** (Vol 6 Part B 4.5.3): the first connection event (the *anchor*) comes
  ``transmitWindowDelay`` (1.25 ms) + ``transmitWindowOffset`` (0 .. connInterval, drawn
  uniformly here) after the CONNECT_IND.
* **Connection events** (Vol 6 Part B 4.5.1): events every ``connInterval`` (7.5 ms - 4 s in
  1.25 ms steps). The simple model carries **one ATT PDU per direction per event**: a PDU
  handed to the link layer goes out at the next event after now, and after the previous PDU
  in its direction. A request/response pair therefore costs two events in steady state; a
  value longer than ATT_MTU - 3 is several writes or notifications, one event each.
* **ATT_MTU** (Vol 3 Part F 3.4.2): the lock's server accepts at most ``mtu``; the exchange
  itself is one request/response on the link (two events).
* **Motor**: the lock answers an UNLOCK/LOCK only after the bolt moved, ``motor_ms``.
* **Per-lock jitter**: each lock's advertising interval and motor time are scaled once by a
  factor drawn uniformly from ``1 ± jitter`` (real units drift and differ), and every
  actuation's motor time again by ``1 ± jitter/2``.

Everything random is drawn from the rng handed in, so a seeded rng gives the same draws.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Final

__all__ = [
    "ADV_DELAY_MAX_MS",
    "PROFILES",
    "TRANSMIT_WINDOW_DELAY_MS",
    "LinkClock",
    "LockRadio",
    "RadioProfile",
    "expected_advert_wait_s",
    "expected_exchange_s",
    "expected_setup_s",
    "parse_overrides",
    "profile_named",
]

#: advDelay is pseudo-random in 0..10 ms per advertising event (Core Vol 6 Part B 4.4.2.2.1).
ADV_DELAY_MAX_MS: Final = 10.0
#: transmitWindowDelay for a CONNECT_IND on the LE 1M PHY (Core Vol 6 Part B 4.5.3).
TRANSMIT_WINDOW_DELAY_MS: Final = 1.25
#: The connection interval's unit and range (Core Vol 4 Part E 7.8.12).
CONN_INTERVAL_UNIT_MS: Final = 1.25
CONN_INTERVAL_RANGE_MS: Final = (7.5, 4000.0)
#: The advertising interval's range for connectable adverts (Core Vol 4 Part E 7.8.5), 0.625 ms unit.
ADV_INTERVAL_RANGE_MS: Final = (20.0, 10240.0)
SUPERVISION_RANGE_MS: Final = (100.0, 32000.0)
MTU_RANGE: Final = (23, 517)


@dataclass(frozen=True)
class RadioProfile:
    """A radio's timing. ``conn_interval_ms == 0`` is the flat model (no connection events,
    no set-up time, no motor, no jitter): the simulator as it always ran."""

    name: str
    adv_interval_ms: float
    conn_interval_ms: float = 0.0
    #: 0: as the central asks in its CONNECT_IND.
    supervision_timeout_ms: float = 0.0
    #: The lock's largest ATT_MTU; 0: Bumble's default (517).
    mtu: int = 0
    motor_ms: float = 0.0
    jitter: float = 0.0
    adv_delay_max_ms: float = 0.0

    @property
    def flat(self) -> bool:
        return self.conn_interval_ms == 0

    def check(self) -> None:
        """Raise ValueError for a value outside what the Core spec (or physics) allows."""
        lo, hi = ADV_INTERVAL_RANGE_MS
        if not lo <= self.adv_interval_ms <= hi:
            raise ValueError(f"adv_interval_ms must be in {lo:g}..{hi:g}")
        if not self.flat:
            lo, hi = CONN_INTERVAL_RANGE_MS
            steps = self.conn_interval_ms / CONN_INTERVAL_UNIT_MS
            if not lo <= self.conn_interval_ms <= hi or abs(steps - round(steps)) > 1e-9:
                raise ValueError(f"conn_interval_ms must be in {lo:g}..{hi:g} in 1.25 ms steps (or 0: flat)")
        self._check_rest()

    def _check_rest(self) -> None:
        if self.supervision_timeout_ms:
            lo, hi = SUPERVISION_RANGE_MS
            if not lo <= self.supervision_timeout_ms <= hi:
                raise ValueError(f"supervision_timeout_ms must be 0 or in {lo:g}..{hi:g}")
            if not self.flat and self.supervision_timeout_ms <= 2 * self.conn_interval_ms:
                raise ValueError("supervision_timeout_ms must exceed two connection intervals")
        if self.mtu and not MTU_RANGE[0] <= self.mtu <= MTU_RANGE[1]:
            raise ValueError(f"mtu must be 0 or in {MTU_RANGE[0]}..{MTU_RANGE[1]}")
        if not 0 <= self.motor_ms <= 10_000:
            raise ValueError("motor_ms must be in 0..10000")
        if not 0 <= self.jitter <= 0.5:
            raise ValueError("jitter must be in 0..0.5")
        if not 0 <= self.adv_delay_max_ms <= ADV_DELAY_MAX_MS:
            raise ValueError(f"adv_delay_max_ms must be in 0..{ADV_DELAY_MAX_MS:g}")


PROFILES: Final = {
    # Today's simulator: adverts every 20 ms (Bumble's controller fires every 32 ms: it reads the
    # 0.625 ms HCI units as ms), no connection events, no motor.
    "flat": RadioProfile("flat", adv_interval_ms=20.0),
    # A battery lock unit tuned for responsiveness.
    "typical": RadioProfile(
        "typical",
        adv_interval_ms=500.0,
        conn_interval_ms=30.0,
        supervision_timeout_ms=2000.0,
        mtu=247,
        motor_ms=400.0,
        jitter=0.1,
        adv_delay_max_ms=ADV_DELAY_MAX_MS,
    ),
    # A unit tuned for battery life, without the data length/MTU extensions.
    "slow": RadioProfile(
        "slow",
        adv_interval_ms=1000.0,
        conn_interval_ms=50.0,
        supervision_timeout_ms=4000.0,
        mtu=23,
        motor_ms=700.0,
        jitter=0.1,
        adv_delay_max_ms=ADV_DELAY_MAX_MS,
    ),
}

_FIELDS: Final = {f.name: f.type for f in dataclasses.fields(RadioProfile) if f.name != "name"}


def profile_named(name: str) -> RadioProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown radio profile {name!r}; use one of {sorted(PROFILES)}") from None


def parse_overrides(profile: RadioProfile, pairs: list[str]) -> RadioProfile:
    """``["adv_interval_ms=250", "mtu=185"]`` applied to ``profile``, checked (ValueError)."""
    changes: dict[str, float | int] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or key not in _FIELDS:
            raise ValueError(f"expected FIELD=VALUE with FIELD one of {sorted(_FIELDS)}, got {pair!r}")
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{key}: {raw!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{key}: {raw!r} is not a finite number")
        if key == "mtu":
            if value != int(value):
                raise ValueError("mtu must be an integer")
            changes[key] = int(value)
        else:
            changes[key] = value
    out = dataclasses.replace(profile, **changes)  # type: ignore[arg-type]
    out.check()
    return out


class LockRadio:
    """One lock's radio: its own (jittered) advertising interval and motor, its own rng."""

    def __init__(self, profile: RadioProfile, rng: random.Random) -> None:
        self.profile = profile
        self._rng = rng
        j = profile.jitter
        self.adv_interval_s = profile.adv_interval_ms / 1000 * (1 + rng.uniform(-j, j))
        self.motor_base_s = profile.motor_ms / 1000 * (1 + rng.uniform(-j, j))

    def next_advert_gap_s(self) -> float:
        """Time to this lock's next advertising event: advInterval + advDelay."""
        return self.adv_interval_s + self._rng.uniform(0, self.profile.adv_delay_max_ms) / 1000

    def motor_s(self) -> float:
        half = self.profile.jitter / 2
        return self.motor_base_s * (1 + self._rng.uniform(-half, half))

    def new_link(self, now: float) -> LinkClock:
        """The clock of a link whose CONNECT_IND this lock received at ``now``."""
        return LinkClock(self.profile, now, self._rng)


class LinkClock:
    """One link's connection events: anchor + k * connInterval, one PDU per direction per event."""

    def __init__(self, profile: RadioProfile, now: float, rng: random.Random) -> None:
        self.interval_s = profile.conn_interval_ms / 1000
        self.created = now  # the CONNECT_IND
        offset = rng.uniform(0, self.interval_s)
        self.anchor = now + TRANSMIT_WINDOW_DELAY_MS / 1000 + offset
        self._last: dict[int, int] = {}
        self.pdus = 0

    def deliver_at(self, direction: int, now: float) -> float:
        """When a PDU handed over at ``now`` in ``direction`` (0: central → peripheral,
        1: the other way) reaches the peer: at the first free event of its direction after now."""
        event = 0 if now < self.anchor else math.floor((now - self.anchor) / self.interval_s) + 1
        event = max(event, self._last.get(direction, -1) + 1)
        self._last[direction] = event
        self.pdus += 1
        return self.anchor + event * self.interval_s


# --- expectations (the canary and the bench's computed floor) -------------------------------


def expected_advert_wait_s(profile: RadioProfile, adv_interval_s: float | None = None) -> float:
    """Mean wait for the next advert from a random moment: a renewal process whose gaps are
    I + U(0, D) has mean residual E[G²]/(2 E[G])."""
    i = profile.adv_interval_ms / 1000 if adv_interval_s is None else adv_interval_s
    d = profile.adv_delay_max_ms / 1000
    mean = i + d / 2
    second = i * i + i * d + d * d / 3
    return second / (2 * mean)


def expected_setup_s(profile: RadioProfile) -> float:
    """Mean time from CONNECT_IND to the anchor (the first connection event)."""
    return TRANSMIT_WINDOW_DELAY_MS / 1000 + profile.conn_interval_ms / 2000


def expected_exchange_s(profile: RadioProfile, pdus: int) -> float:
    """``pdus`` ATT PDUs in ping-pong on an idle link starting at a random moment: the first
    waits half an interval on average, each later one a whole interval."""
    if pdus <= 0:
        return 0.0
    ci = profile.conn_interval_ms / 1000
    return ci / 2 + (pdus - 1) * ci
