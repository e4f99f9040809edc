"""Prometheus metrics of one receiver (``[receiver] metrics_port``; 0 = off), on a small asyncio
HTTP server of its own (no thread): ``GET /metrics`` in the text exposition format.

Counters of this process (``lockgw_receiver_*_total``: events stored, duplicates, conflicts,
quarantined, replay requests, batches) and a histogram of batch commit times; and, refreshed
from PostgreSQL every ``metrics_refresh_s`` (the same report as ``lockgw-receiver status``), per-gateway
gauges: heartbeat age, backlog, the gap-free seq per epoch, and one ``lockgw_receiver_alert``
series per raised alert. Every receiver exports the fleet-wide gauges: scrape one, or use
``max by (gw)``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gateway import log

__all__ = ["Metrics"]

_log = log.get("receiver.metrics")

#: A scrape request is a line and a few headers; anything longer is not one.
MAX_REQUEST_BYTES: Final = 8192
#: A client that sends nothing for this long is dropped.
READ_TIMEOUT_S: Final = 10.0


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.stored = Counter("lockgw_receiver_events_stored", "Events stored (new)", registry=r)
        self.duplicates = Counter("lockgw_receiver_events_duplicate", "Events received again", registry=r)
        self.conflicts = Counter("lockgw_receiver_conflicts", "Seq reuse / chain breaks kept", registry=r)
        self.quarantined = Counter("lockgw_receiver_quarantined", "Malformed messages kept", registry=r)
        self.replays = Counter("lockgw_receiver_replay_requests", "Replay requests sent", registry=r)
        self.batches = Counter("lockgw_receiver_batches", "Batches committed", registry=r)
        self.commit_s = Histogram(
            "lockgw_receiver_commit_seconds",
            "Batch transaction time",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.hb_age = Gauge(
            "lockgw_receiver_heartbeat_age_seconds", "Since the last heartbeat", ["gw"], registry=r
        )
        self.backlog = Gauge(
            "lockgw_receiver_backlog_events", "Backlog the gateway reports", ["gw"], registry=r
        )
        self.stored_seq = Gauge(
            "lockgw_receiver_stored_seq", "Gap-free seq stored", ["gw", "epoch"], registry=r
        )
        self.alert = Gauge(
            "lockgw_receiver_alert", "1 while the alert is raised", ["gw", "alert"], registry=r
        )

    def update_gateways(self, report: dict[str, Any]) -> None:
        for gauge in (self.hb_age, self.backlog, self.stored_seq, self.alert):
            gauge.clear()
        for g in report["gateways"]:
            gw = g["gw"]
            if g["heartbeat_age_s"] is not None:
                self.hb_age.labels(gw).set(g["heartbeat_age_s"])
            if g["backlog"] is not None:
                self.backlog.labels(gw).set(g["backlog"])
            for s in g["streams"]:
                self.stored_seq.labels(gw, s["epoch"]).set(s["stored_seq"])
            for a in g["alerts"]:
                self.alert.labels(gw, a).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def serve(self, host: str, port: int) -> None:
        """Serve ``/metrics`` until cancelled."""
        server = await asyncio.start_server(self._client, host, port, limit=MAX_REQUEST_BYTES)
        _log.info("metrics_listening", host=host, port=port)
        try:
            async with server:
                await server.serve_forever()
        finally:
            server.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            line = head.split(b"\r\n", 1)[0].split()
            if len(line) >= 2 and line[0] == b"GET" and line[1].split(b"?")[0] == b"/metrics":
                body, status, ctype = self.render(), b"200 OK", CONTENT_TYPE_LATEST.encode()
            else:
                body, status, ctype = b"not found\n", b"404 Not Found", b"text/plain"
            writer.write(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype
                + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
            )  # fmt: skip
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # a scraper that went away or sent garbage: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
