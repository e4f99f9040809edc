"""Retry and backoff as pure functions (STYLE §8), tested from tables."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from gateway.errors import BleError, LinkLost, LinkTimeout, LockMisbehaved, LockUnreachable, MqttUnavailable

__all__ = ["MAX_COMMAND_ATTEMPTS", "backoff_for", "should_retry"]

#: A command is tried on at most this many links. Each retry reuses the command id, so the lock
#: actuates at most once; three attempts cover a link drop plus one failed reconnect.
MAX_COMMAND_ATTEMPTS: Final = 3

# Base waits (s), each with its reason:
_BASE: Final[dict[type[Exception], float]] = {
    LinkLost: 0.05,  # the lock is there; reconnect at once (a tiny pause lets the controller settle)
    LockUnreachable: 0.5,  # out of range or busy: give it a connection interval or two
    LinkTimeout: 0.25,  # a slow answer; a fresh link usually works
    LockMisbehaved: 2.0,  # protocol trouble: do not hammer a confused (or hostile) lock
    MqttUnavailable: 1.0,  # broker gone: reconnect promptly, then back off
}
_CAP: Final[dict[type[Exception], float]] = {MqttUnavailable: 60.0}
_DEFAULT_CAP: Final = 10.0


def backoff_for(exc: BaseException, attempt: int, rng: Callable[[], float]) -> float:
    """Seconds to wait before attempt ``attempt + 1`` (attempt ≥ 1): exponential, capped,
    with ±25 % jitter so that many gateways or locks do not retry in step."""
    base: float = next((v for k, v in _BASE.items() if isinstance(exc, k)), 1.0)
    cap: float = next((v for k, v in _CAP.items() if isinstance(exc, k)), _DEFAULT_CAP)
    wait = min(cap, base * 2.0 ** (attempt - 1))
    return wait * (0.75 + 0.5 * rng())


def should_retry(exc: BaseException, attempt: int) -> bool:
    """Link-level failures are retried with the same command id; a misbehaving lock is not."""
    return (
        isinstance(exc, BleError) and not isinstance(exc, LockMisbehaved) and attempt < MAX_COMMAND_ATTEMPTS
    )
