"""The gateway's error tree. Third-party errors are mapped into it at one boundary each
(bleak/bumble in :mod:`gateway.ble`, aiomqtt in :mod:`gateway.mqtt.bridge`, sqlite3 in the outbox).

::

    LockgwError                      (code: a contract error code where one applies)
    ├── ConfigError                  a configuration key is missing, wrong or unsafe
    ├── BleError                     anything on the radio side
    │   ├── AdapterUnavailable       no adapter / transport; the fix is on the host
    │   ├── LockUnreachable          connect failed or timed out
    │   ├── LinkLost                 the connection dropped mid-exchange
    │   ├── LinkTimeout              the lock did not answer in time (link poisoned)
    │   ├── LockMisbehaved           the lock broke the protocol or failed authentication
    │   └── PairingFailed            the lock refused pairing (wrong code, not in pairing mode)
    ├── MqttUnavailable              the broker cannot be reached
    └── OutboxError                  the event store could not commit
"""

from __future__ import annotations

__all__ = [
    "AdapterUnavailable",
    "BleError",
    "ConfigError",
    "LinkLost",
    "LinkTimeout",
    "LockMisbehaved",
    "LockUnreachable",
    "LockgwError",
    "MqttUnavailable",
    "OutboxError",
    "PairingFailed",
]


class LockgwError(Exception):
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class ConfigError(LockgwError):
    code = "invalid_config"


class BleError(LockgwError):
    code = "lock_unreachable"


class AdapterUnavailable(BleError):
    pass


class LockUnreachable(BleError):
    pass


class LinkLost(BleError):
    pass


class LinkTimeout(BleError):
    pass


class LockMisbehaved(BleError):
    code = "lock_error"


class PairingFailed(BleError):
    code = "pairing_failed"

    def __init__(self, message: str, *, reason: str, attempts_left: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.attempts_left = attempts_left


class MqttUnavailable(LockgwError):
    code = "mqtt_unavailable"


class OutboxError(LockgwError):
    code = "internal_error"
