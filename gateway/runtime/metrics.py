"""Prometheus metrics (``[metrics]``, off by default; docs/operations.md has the alerting guide).

One private :class:`~prometheus_client.CollectorRegistry` per gateway (never the library's
global one, so tests and a direct CLI never share or leak series). Two kinds of series:

* **counted as it happens** by the service: request → response latency per action
  (``lockgw_request_seconds``), the lock round trip of an unlock or lock
  (``lockgw_lock_round_trip_seconds``: the BLE command, retries included), decisions by reason
  code (``lockgw_decisions_total``);
* **read at scrape time** from a :class:`Snapshot` the gateway fills (outbox backlog and receipt
  lag, link slots and queue depth, trust expiry, time state, alarms, MQTT link).

The endpoint is a small asyncio HTTP/1.0 server on ``127.0.0.1:9108`` or a unix socket
(``unix:/run/lockgw/metrics.sock``), supervised like the other background components: bounded
request size, a read deadline, a few connections at a time; ``GET /metrics`` only. It never
touches a door: if it fails it is restarted, ``metrics_restarting`` is raised, doors open.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from gateway import log
from gateway.errors import ConfigError

__all__ = ["TIME_STATES", "Metrics", "MetricsServer", "Snapshot", "parse_listen"]

#: Latency buckets (s): an unlock is ~0.1–1 s on a good link; the deadline is 15 s.
BUCKETS: Final = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
TIME_STATES: Final = ("synced", "holdover", "unknown")  # protocols.credentials.TimeState
#: The request head a scraper sends is a few hundred bytes.
MAX_REQUEST_HEAD: Final = 8192
READ_DEADLINE_S: Final = 5.0
MAX_CLIENTS: Final = 4

_log = log.get("metrics")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the state gauges show, read by the gateway just before each scrape."""

    last_seq: int = 0
    receipt_seq: int = 0
    #: Seconds since the oldest event no receipt covers was committed (0: none outstanding).
    receipt_lag_s: float = 0.0
    slots_in_use: int = 0
    slots: int = 0
    queue_depth: int = 0
    locks: int = 0
    locks_available: int = 0
    #: Days to each trust document's or key's nearest expiry: {"keyring": d, "key": d, "revocations": d}.
    trust_expiry_days: dict[str, float] = field(default_factory=dict)
    time_state: str = "unknown"
    alarms: tuple[str, ...] = ()
    mqtt_connected: bool | None = None


class _StateCollector(Collector):
    def __init__(self, current: Callable[[], Snapshot]) -> None:
        self._current = current

    def collect(self) -> Iterable[Metric]:
        s = self._current()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        yield gauge("lockgw_outbox_last_seq", "Seq of the last committed event.", s.last_seq)
        yield gauge("lockgw_outbox_receipt_seq", "Seq up to which central has receipted.", s.receipt_seq)
        yield gauge(
            "lockgw_outbox_backlog_events",
            "Events no receipt covers (last_seq - receipt_seq).",
            s.last_seq - s.receipt_seq,
        )
        yield gauge(
            "lockgw_receipt_lag_seconds",
            "Age of the oldest event no receipt covers (0 when none is outstanding).",
            s.receipt_lag_s,
        )
        yield gauge("lockgw_link_slots_in_use", "BLE connection slots in use.", s.slots_in_use)
        yield gauge("lockgw_link_slots", "BLE connection slots ([ble] max_connections).", s.slots)
        yield gauge("lockgw_link_queue_depth", "Commands waiting for a slot or a lock's gate.", s.queue_depth)
        yield gauge("lockgw_locks_paired", "Paired locks.", s.locks)
        yield gauge("lockgw_locks_available", "Paired locks whose last contact succeeded.", s.locks_available)
        expiry = GaugeMetricFamily(
            "lockgw_trust_expiry_days",
            "Days to the nearest expiry of the keyring, of a key in it, and of the revocation list.",
            labels=["what"],
        )
        for what, days in sorted(s.trust_expiry_days.items()):
            expiry.add_metric([what], days)
        yield expiry
        yield gauge(
            "lockgw_trust_nearest_expiry_days",
            "Days to the nearest trust expiry of any kind (-1 without a keyring).",
            min(s.trust_expiry_days.values(), default=-1.0),
        )
        state = GaugeMetricFamily("lockgw_time_state", "1 for the current time state.", labels=["state"])
        for name in TIME_STATES:
            state.add_metric([name], 1.0 if s.time_state == name else 0.0)
        yield state
        alarm = GaugeMetricFamily("lockgw_alarm", "1 for every alarm now raised.", labels=["alarm"])
        for name in s.alarms:
            alarm.add_metric([name], 1.0)
        yield alarm
        yield gauge("lockgw_alarms", "Alarms now raised.", len(s.alarms))
        if s.mqtt_connected is not None:
            yield gauge(
                "lockgw_mqtt_connected", "1 while the broker connection is up.", float(s.mqtt_connected)
            )


class Metrics:
    """The gateway's series, in a private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._snapshot = Snapshot()
        self.request_seconds = Histogram(
            "lockgw_request_seconds",
            "Request received to response ready, per action (MQTT and control socket).",
            ["action"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.lock_round_trip_seconds = Histogram(
            "lockgw_lock_round_trip_seconds",
            "The BLE command of an unlock or lock, from sending to the lock's answer (retries included).",
            ["action"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.decisions = Counter(
            "lockgw_decisions",
            "Answers to unlock and lock requests: granted (reason ok) or the refusal's reason code.",
            ["action", "reason"],
            registry=self.registry,
        )
        self.registry.register(_StateCollector(lambda: self._snapshot))

    def request_done(self, action: str, reason: str | None, seconds: float) -> None:
        """One answered request (its action is one of ours, or "other")."""
        self.request_seconds.labels(action).observe(seconds)
        if action in ("unlock", "lock"):
            self.decisions.labels(action, reason or "ok").inc()

    def lock_round_trip(self, action: str, seconds: float) -> None:
        self.lock_round_trip_seconds.labels(action).observe(seconds)

    def render(self, snapshot: Snapshot) -> bytes:
        self._snapshot = snapshot
        return generate_latest(self.registry)


def parse_listen(listen: str) -> tuple[str, int] | Path:
    """``HOST:PORT`` (``[::1]:9108`` for IPv6) or ``unix:PATH``; ValueError says what is wrong."""
    if listen.startswith("unix:"):
        path = Path(listen[len("unix:") :])
        if not path.is_absolute():
            raise ValueError("unix: needs an absolute path")
        return path
    host, sep, port = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError("must be HOST:PORT (127.0.0.1:9108) or unix:/PATH")
    return host, int(port)


class MetricsServer:
    """``GET /metrics`` on ``listen``; :meth:`run` serves until cancelled."""

    def __init__(self, listen: str, metrics: Metrics, snapshot: Callable[[], Awaitable[Snapshot]]) -> None:
        self._where = parse_listen(listen)
        self._metrics = metrics
        self._snapshot = snapshot
        self._clients = asyncio.Semaphore(MAX_CLIENTS)

    async def run(self) -> None:
        where = self._where
        if isinstance(where, Path):
            with contextlib.suppress(FileNotFoundError):
                if not stat.S_ISSOCK(os.lstat(where).st_mode):
                    # listen = "unix:/var/lib/lockgw/locks.sqlite3" unlinked the lock registry.
                    raise ConfigError(
                        f"[metrics] listen: {where} exists and is not a socket; not removing it"
                    )
                where.unlink()  # a socket left by a previous run
            server = await asyncio.start_unix_server(self._serve, path=where, limit=MAX_REQUEST_HEAD)
            where.chmod(0o660)
        else:
            server = await asyncio.start_server(
                self._serve, host=where[0], port=where[1], limit=MAX_REQUEST_HEAD
            )
        _log.info(
            "metrics_serving", listen=str(where) if isinstance(where, Path) else f"{where[0]}:{where[1]}"
        )
        try:
            async with server:
                await server.serve_forever()
        finally:
            if isinstance(where, Path):
                with contextlib.suppress(OSError):
                    where.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self._clients.locked():
                await self._answer(writer, 503, b"busy\n")
                return
            async with self._clients:
                try:
                    async with asyncio.timeout(READ_DEADLINE_S):
                        head = await reader.readuntil(b"\r\n\r\n")
                except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    await self._answer(writer, 400, b"bad request\n")
                    return
                if len(head) > MAX_REQUEST_HEAD:
                    await self._answer(writer, 431, b"request head too large\n")
                    return
                method, _, rest = head.partition(b" ")
                path = rest.partition(b" ")[0].partition(b"?")[0]
                if method != b"GET":
                    await self._answer(writer, 405, b"GET only\n")
                elif path not in (b"/metrics", b"/"):
                    await self._answer(writer, 404, b"try /metrics\n")
                else:
                    body = self._metrics.render(await self._snapshot())
                    await self._answer(writer, 200, body, CONTENT_TYPE_LATEST)
        except Exception as exc:  # noqa: BLE001 - one scrape never ends the server
            _log.warning("metrics_request_failed", reason=f"{type(exc).__name__}: {exc}")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _answer(
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
    ) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}.get(
            status, "Error"
        )
        writer.write(
            f"HTTP/1.0 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        async with asyncio.timeout(READ_DEADLINE_S):
            await writer.drain()
