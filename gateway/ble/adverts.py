"""Advertisement watching: refresh a lock when its advertised state counter changes.

A lock's advert carries a counter that changes with every bolt or door change; when it moves
(someone turned the knob inside, the door opened), the gateway fetches status and the lock's log
at housekeeping priority instead of waiting for the next periodic refresh. Adverts are hints
only — nothing is decided from them (THREATS B3) — and a lock that adverts also counts as seen.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Final

from bleak import BleakScanner
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, BaseBleakScanner
from bleak.exc import BleakError

from gateway.errors import BleError
from protocols.gatt import COMPANY_ID, decode_advert

__all__ = ["AdvertWatcher"]

#: Coalesce bursts of adverts: one refresh per lock at most this often.
MIN_REFRESH_INTERVAL_S: Final = 2.0


class AdvertWatcher:
    def __init__(
        self,
        *,
        known: Callable[[str], bool],
        refresh: Callable[[str], Awaitable[None]],
        on_rssi: Callable[[str, int], None],
        backend: type[BaseBleakScanner] | None,
        clock: Callable[[], float],
    ) -> None:
        self._known, self._refresh, self._on_rssi = known, refresh, on_rssi
        self._backend = backend
        self._clock = clock
        self._counters: dict[str, int] = {}
        self._last_refresh: dict[str, float] = {}
        self._pending: asyncio.Queue[str] = asyncio.Queue()

    def on_advert(self, _device: BLEDevice, adv: AdvertisementData) -> None:
        advert = decode_advert(adv.manufacturer_data.get(COMPANY_ID, b""))
        if advert is None or not self._known(advert.lock_id):
            return
        self._on_rssi(advert.lock_id, adv.rssi)
        previous = self._counters.get(advert.lock_id)
        self._counters[advert.lock_id] = advert.state_counter
        if previous is not None and previous != advert.state_counter:
            self._pending.put_nowait(advert.lock_id)

    async def run(self) -> None:
        """Scan forever (restarting after adapter errors) and refresh changed locks."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._scan(), name="adverts-scan")
            tg.create_task(self._refresher(), name="adverts-refresh")

    async def _scan(self) -> None:
        while True:
            try:
                async with BleakScanner(detection_callback=self.on_advert, backend=self._backend):
                    await asyncio.Event().wait()
            except (BleakError, BleError, OSError):
                await asyncio.sleep(5)  # adapter trouble: commands still work; try again later

    async def _refresher(self) -> None:
        while True:
            lock = await self._pending.get()
            now = self._clock()
            if now - self._last_refresh.get(lock, -1e9) < MIN_REFRESH_INTERVAL_S:
                continue
            self._last_refresh[lock] = now
            with contextlib.suppress(Exception):
                await self._refresh(lock)
