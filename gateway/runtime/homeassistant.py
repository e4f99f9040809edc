"""Home Assistant MQTT discovery (``[homeassistant] discovery = true``; docs/homeassistant.md).

Per paired lock, five **read-only** entities, each a retained config message on
``<prefix>/<component>/<node_id>/<object_id>/config`` (Home Assistant's discovery topic, with
the gateway id as node id), reading the topics the gateway already publishes:

| entity | component | from | device_class |
|---|---|---|---|
| lock state | ``sensor`` (enum) | ``B/G/locks/L/state`` ``.state`` | ``enum`` |
| door | ``binary_sensor`` | ``B/G/locks/L/state`` ``.door`` | ``door`` |
| battery | ``sensor`` | ``B/G/locks/L/state`` ``.battery_pct`` | ``battery`` (%) |
| connectivity | ``binary_sensor`` | ``B/G/locks/L/state`` ``.available`` | ``connectivity`` |
| last access | ``sensor`` | ``B/G/locks/L/last_access`` ``.ts`` | ``timestamp`` |

Each carries the lock's ``device`` block (identifiers, name, manufacturer, model, firmware), a
``unique_id``, and ``availability`` on the gateway's ``B/G/availability`` (its will message says
offline). **Never** a ``lock`` entity and **never** a ``command_topic``: Home Assistant only
watches; a door opens only through a signed token (CONTRACT §3), so discovery opens no path
around authorization. ``B/G/locks/L/last_access`` (retained ``{"lock", "action", "ts"}``: the
time of the last successful unlock or lock, without who) is published only while discovery is
on. Unpairing a lock publishes empty retained configs, which removes its entities.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["COMPONENTS", "Discovery", "LockInfo"]

#: The components this module ever announces (tests check nothing else appears).
COMPONENTS: Final = frozenset({"sensor", "binary_sensor"})
_SAFE: Final = re.compile(r"[^A-Za-z0-9_-]")
_STATES: Final = ("locked", "unlocked", "jammed", "unknown")


@dataclass(frozen=True, slots=True)
class LockInfo:
    lock: str
    name: str
    firmware: str | None = None


def _slug(text: str) -> str:
    """``[A-Za-z0-9_-]`` only (Home Assistant's rule for node and object ids); a changed id gets
    a short hash so two locks never share one."""
    safe = _SAFE.sub("_", text)[:48]
    if safe == text:
        return safe
    return f"{safe}_{hashlib.sha256(text.encode()).hexdigest()[:8]}"


class Discovery:
    """The discovery messages of one gateway."""

    def __init__(self, *, gw: str, base_topic: str, prefix: str, version: str) -> None:
        self.gw, self.base, self.prefix, self.version = gw, base_topic, prefix, version
        self.node = _slug(gw)

    def state_topic(self, lock: str) -> str:
        return f"{self.base}/{self.gw}/locks/{lock}/state"

    def last_access_topic(self, lock: str) -> str:
        return f"{self.base}/{self.gw}/locks/{lock}/last_access"

    def _topic(self, component: str, lock: str, what: str) -> str:
        return f"{self.prefix}/{component}/{self.node}/{_slug(lock)}_{what}/config"

    def messages(self, lock: LockInfo) -> list[tuple[str, dict[str, Any]]]:
        """The five (topic, config payload) pairs of one lock."""
        state = self.state_topic(lock.lock)
        uid = f"lockgw_{self.node}_{_slug(lock.lock)}"
        device: dict[str, Any] = {
            "identifiers": [uid],
            "name": lock.name or lock.lock,
            "manufacturer": "lockgw",
            "model": "door lock unit (read-only via lockgw)",
            "serial_number": lock.lock,
        }
        if lock.firmware:
            device["sw_version"] = lock.firmware
        common = {
            "device": device,
            "origin": {"name": "lockgw", "sw_version": self.version},
            "availability": [
                {
                    "topic": f"{self.base}/{self.gw}/availability",
                    "value_template": "{{ value_json.state }}",
                    "payload_available": "online",
                    "payload_not_available": "offline",
                }
            ],
            "qos": 1,
        }
        entities: list[tuple[str, str, dict[str, Any]]] = [
            (
                "sensor",
                "lock_state",
                {
                    "name": "Lock state",
                    "state_topic": state,
                    "value_template": "{{ value_json.state }}",
                    "device_class": "enum",
                    "options": list(_STATES),
                    "icon": "mdi:lock-question",
                },
            ),
            (
                "binary_sensor",
                "door",
                {
                    "name": "Door",
                    "state_topic": state,
                    "value_template": "{% if value_json.door == 'open' %}ON{% elif value_json.door == 'closed' %}"
                    "OFF{% else %}None{% endif %}",
                    "payload_on": "ON",
                    "payload_off": "OFF",
                    "device_class": "door",
                },
            ),
            (
                "sensor",
                "battery",
                {
                    "name": "Battery",
                    "state_topic": state,
                    "value_template": "{{ value_json.battery_pct if value_json.battery_pct is not none else 'None' }}",
                    "device_class": "battery",
                    "unit_of_measurement": "%",
                    "state_class": "measurement",
                    "entity_category": "diagnostic",
                },
            ),
            (
                "binary_sensor",
                "connectivity",
                {
                    "name": "Connectivity",
                    "state_topic": state,
                    "value_template": "{{ 'ON' if value_json.available else 'OFF' }}",
                    "payload_on": "ON",
                    "payload_off": "OFF",
                    "device_class": "connectivity",
                    "entity_category": "diagnostic",
                },
            ),
            (
                "sensor",
                "last_access",
                {
                    "name": "Last access",
                    "state_topic": self.last_access_topic(lock.lock),
                    "value_template": "{{ value_json.ts }}",
                    "device_class": "timestamp",
                },
            ),
        ]
        return [
            (self._topic(component, lock.lock, what), {**body, **common, "unique_id": f"{uid}_{what}"})
            for component, what, body in entities
        ]

    def encoded(self, locks: Iterable[LockInfo]) -> dict[str, str]:
        """topic → JSON payload for every lock given."""
        return {
            topic: json.dumps(payload, sort_keys=True)
            for lock in locks
            for topic, payload in self.messages(lock)
        }

    def removals(self, lock: str) -> list[str]:
        """The config topics of ``lock`` (an empty retained message on each removes its entities)."""
        return [topic for topic, _ in self.messages(LockInfo(lock, lock))]
