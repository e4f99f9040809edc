"""The receiver daemon: consume, batch, commit, THEN receipt, THEN ack (docs/fleet.md).

One :class:`Receiver` owns one TaskGroup with three tasks:

* ``connect`` — keeps the transport connected (reconnects with backoff; a lost connection is
  one log line);
* ``consume`` — takes the first delivery, then more for ``batch_linger_s`` up to ``batch_max``;
  parses each (a malformed one becomes a quarantine row with its raw bytes); commits the whole
  batch in one PostgreSQL transaction (retried with backoff while PostgreSQL is down: nothing
  is acked meanwhile); then publishes each touched stream's receipt (its highest gap-free seq),
  then acks the batch to the broker. Killed between commit and ack, the broker delivers again,
  the store deduplicates by id, and the receipt goes out again;
* ``sweep`` — asks for a replay of exactly each missing range that did not fill within
  ``gap_replay_after_s`` (claimed in PostgreSQL: one receiver asks).

:meth:`stop` (SIGTERM) drains: the batch in hand is committed, receipted and acked, then the
tasks end and the connections close; exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Self

from gateway import log
from gateway.errors import ConfigError
from gateway.receiver.config import ReceiverConfig
from gateway.receiver.messages import Availability, BridgeState, Event, Heartbeat, Malformed, parse
from gateway.receiver.metrics import Metrics
from gateway.receiver.store import BatchResult, Quarantined, Store, StoreUnavailable
from gateway.receiver.transport import (
    AmqpTransport,
    Delivery,
    MqttTransport,
    Transport,
    TransportUnavailable,
    replay_request,
)
from gateway.tasks import cancel_and_wait

__all__ = ["Receiver", "retry_wait_s"]

_log = log.get("receiver")

#: Reconnect / retry waits (gateway.backoff): from 0.5 s doubling to 30 s, with jitter so a fleet
#: of receivers does not reconnect in step after a broker restart.
RETRY_BASE_S: Final = 0.5
RETRY_CAP_S: Final = 30.0
#: A broker connection that lasted this long resets the backoff when it is lost.
CONNECTED_RESET_S: Final = 30.0
#: Raw bytes kept per quarantined message at most (a huge message is cut, its size noted).
MAX_QUARANTINE_BYTES: Final = 256 * 1024


@dataclass(slots=True)
class _Parsed:
    """A batch's deliveries, typed."""

    events: list[Event] = field(default_factory=list)
    heartbeats: list[Heartbeat] = field(default_factory=list)
    availability: list[Availability] = field(default_factory=list)
    bridges: list[BridgeState] = field(default_factory=list)
    quarantined: list[Quarantined] = field(default_factory=list)


class Receiver:
    """The daemon (module docstring). An async context manager; not reentrant."""

    def __init__(self, config: ReceiverConfig, *, fault: str | None = None) -> None:
        self.config = config
        section = config.receiver
        self._section = section
        self.transport: Transport = (
            MqttTransport(
                config.mqtt,
                base=section.base_topic,
                instance=section.instance,
                receive_max=2 * section.batch_max,
            )
            if section.transport == "mqtt"
            else AmqpTransport(config.amqp, base=section.base_topic, instance=section.instance)
        )
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._store: Store | None = None
        self._store_cm: object = None
        self._n = itertools.count(1)
        self._commits = 0
        self.metrics = Metrics()
        #: A task that died of an unexpected error (the process then exits 1: systemd restarts it).
        self.failed: BaseException | None = None
        self._kill_after = _parse_fault(
            fault if fault is not None else os.environ.get("LOCKGW_RECEIVER_FAULT")
        )
        self.stats = {
            "batches": 0,
            "stored": 0,
            "duplicates": 0,
            "conflicts": 0,
            "quarantined": 0,
            "replays": 0,
        }

    async def __aenter__(self) -> Self:
        cm = Store.connect(self.config.postgres, migrate=True)
        self._store = await cm.__aenter__()
        self._store_cm = cm
        self._tasks = [
            asyncio.create_task(self._connect(), name="receiver-connect"),
            asyncio.create_task(self._consume(), name="receiver-consume"),
            asyncio.create_task(self._sweep(), name="receiver-sweep"),
        ]
        if self._section.metrics_port:
            self._tasks += [
                asyncio.create_task(
                    self.metrics.serve(self._section.metrics_host, self._section.metrics_port),
                    name="receiver-metrics",
                ),
                asyncio.create_task(self._refresh_metrics(), name="receiver-metrics-refresh"),
            ]
        for t in self._tasks:
            t.add_done_callback(self._task_done)
        _log.info("receiver_started", instance=self._section.instance, transport=self._section.transport)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        consume = self._tasks[1]
        try:
            await asyncio.shield(asyncio.wait({consume}))  # the batch in hand: commit, receipt, ack
        finally:
            await cancel_and_wait(self._tasks)
            cm = self._store_cm
            assert cm is not None
            await cm.__aexit__(None, None, None)  # type: ignore[attr-defined]
            self._stopped.set()
            _log.info("receiver_stopped", **self.stats)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            _log.error("receiver_task_failed", task=task.get_name(), reason=str(exc), exc_info=exc)
            self.failed = exc
            self.stop()

    def stop(self) -> None:
        """Drain and stop (idempotent; safe from a signal handler)."""
        self._stopping.set()

    async def wait_stopping(self) -> None:
        await self._stopping.wait()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)

    # --- tasks -----------------------------------------------------------------------------

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            started = loop.time()
            try:
                await self.transport.run()
            except TransportUnavailable as exc:
                if loop.time() - started > CONNECTED_RESET_S:
                    attempt = 0  # it was up a while: this is a new outage, start the backoff over
                wait = retry_wait_s(attempt, random.random)
                attempt += 1
                _log.warning("broker_unavailable", reason=str(exc), retry_in_s=round(wait, 2))
                await asyncio.sleep(wait)

    async def _next_batch(self) -> list[Delivery]:
        queue = self.transport.queue
        getter = asyncio.ensure_future(queue.get())
        stopper = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            if not getter.done():
                getter.cancel()
        if not getter.done() or getter.cancelled():
            return []
        batch = [getter.result()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._section.batch_linger_s
        while len(batch) < self._section.batch_max:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0 or self._stopping.is_set():
                break
            try:
                async with asyncio.timeout(remaining):
                    batch.append(await queue.get())
            except TimeoutError:
                break
        return batch

    async def _consume(self) -> None:
        while not self._stopping.is_set():
            batch = await self._next_batch()
            if batch:
                await self._handle(batch)
        # Drain: what is already buffered but not yet in a batch stays unacked: the broker
        # delivers it again to whichever receiver runs next.

    def _parse(self, batch: list[Delivery]) -> _Parsed:
        out = _Parsed()
        for d in batch:
            try:
                item = parse(d.topic, d.payload, base=self._section.base_topic)
            except Malformed as exc:
                out.quarantined.append(  # text columns: no NUL (an AMQP routing key may hold one)
                    Quarantined(
                        d.topic[:512].replace("\x00", "\\x00"),
                        str(exc)[:1000].replace("\x00", "\\x00"),
                        d.payload[:MAX_QUARANTINE_BYTES],
                    )
                )
                _log.warning(
                    "message_quarantined", topic=d.topic[:200], reason=str(exc)[:300], size=len(d.payload)
                )
                continue
            if isinstance(item, Event):
                out.events.append(item)
            elif isinstance(item, Heartbeat):
                out.heartbeats.append(item)
            elif isinstance(item, BridgeState):
                out.bridges.append(item)
            else:
                out.availability.append(item)
        return out

    async def _handle(self, batch: list[Delivery]) -> None:
        result = await self._commit(self._parse(batch))
        if result is None:
            return  # stopping while PostgreSQL is down: nothing acked, the broker keeps it all
        self._commits += 1
        if self._kill_after is not None and self._commits >= self._kill_after:
            _log.warning("fault_kill_after_commit", commits=self._commits)
            os.kill(os.getpid(), signal.SIGKILL)
        self._account(result)
        sent = await self._send_receipts(result)
        try:
            await self.transport.ack(batch)
        except TransportUnavailable as exc:
            _log.warning("ack_failed", reason=str(exc), count=len(batch))
        if sent and self._store is not None:
            try:
                await self._store.record_receipts(sent)
            except StoreUnavailable as exc:
                _log.warning("receipt_record_failed", reason=str(exc))

    async def _commit(self, parsed: _Parsed) -> BatchResult | None:
        assert self._store is not None
        for attempt in itertools.count():
            try:
                with self.metrics.commit_s.time():
                    return await self._store.commit_batch(
                        events=parsed.events,
                        heartbeats=parsed.heartbeats,
                        availability=parsed.availability,
                        quarantined=parsed.quarantined,
                        bridges=parsed.bridges,
                    )
            except StoreUnavailable as exc:
                wait = retry_wait_s(attempt, random.random)
                _log.warning("store_unavailable", reason=str(exc)[:500], retry_in_s=round(wait, 2))
                # Stopping: give up the batch at once (nothing of it was acked: it is delivered
                # again); otherwise wait, but wake for a stop.
                if self._stopping.is_set():
                    return None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._stopping.wait()
        return None  # pragma: no cover - the loop above only ends by returning

    def _account(self, result: BatchResult) -> None:
        self.stats["batches"] += 1
        self.stats["stored"] += result.stored
        self.stats["duplicates"] += result.duplicates
        self.stats["conflicts"] += len(result.conflicts)
        self.stats["quarantined"] += result.quarantined
        self.metrics.batches.inc()
        self.metrics.stored.inc(result.stored)
        self.metrics.duplicates.inc(result.duplicates)
        self.metrics.conflicts.inc(len(result.conflicts))
        self.metrics.quarantined.inc(result.quarantined)
        for c in result.conflicts:
            _log.error(
                "alarm_conflict",
                kind=c.kind,
                gw=c.event.gw,
                epoch=c.event.epoch,
                seq=c.event.seq,
                detail=c.detail,
            )
        for gw, epoch in result.new_streams:
            _log.info("stream_new", gw=gw, epoch=epoch)

    async def _send_receipts(self, result: BatchResult) -> dict[tuple[str, str], int]:
        """One receipt per stream, all in flight at once (a batch touches up to ``batch_max``
        gateways; one at a time would cost a broker round trip each)."""
        base = self._section.base_topic

        async def one(gw: str, epoch: str, seq: int) -> tuple[tuple[str, str], int] | None:
            body = json.dumps({"epoch": epoch, "seq": seq}).encode()
            try:
                await self.transport.publish(f"{base}/{gw}/receipt", body)
            except TransportUnavailable as exc:
                _log.warning("receipt_not_sent", gw=gw, seq=seq, reason=str(exc))
                return None
            return (gw, epoch), seq

        done = await asyncio.gather(*(one(gw, epoch, seq) for (gw, epoch), seq in result.receipts.items()))
        return dict(d for d in done if d is not None)

    async def _sweep(self) -> None:
        every = min(self._section.gap_replay_after_s / 2, 5.0)
        base = self._section.base_topic
        while True:
            await asyncio.sleep(every)
            if self._store is None:
                continue
            try:
                replays = await self._store.claim_gaps(
                    after_s=self._section.gap_replay_after_s, retry_s=self._section.replay_retry_s
                ) + await self._store.claim_tails(
                    after_s=self._section.tail_replay_after_s, retry_s=self._section.replay_retry_s
                )
            except StoreUnavailable as exc:
                _log.warning("sweep_failed", reason=str(exc)[:500])
                continue
            for r in replays:
                tx = f"replay-{self._section.instance}-{next(self._n)}"
                try:
                    await self.transport.publish(
                        f"{base}/{r.gw}/request/replay", replay_request(r.from_seq, r.to_seq, tx)
                    )
                except TransportUnavailable as exc:
                    _log.warning("replay_not_sent", gw=r.gw, reason=str(exc))
                    continue
                self.stats["replays"] += 1
                self.metrics.replays.inc()
                _log.info("replay_requested", gw=r.gw, epoch=r.epoch, from_seq=r.from_seq, to_seq=r.to_seq)

    async def _refresh_metrics(self) -> None:
        while True:
            if self._store is not None:
                try:
                    self.metrics.update_gateways(await self._store.status(self._section))
                except StoreUnavailable as exc:
                    _log.warning("metrics_refresh_failed", reason=str(exc)[:500])
            await asyncio.sleep(self._section.metrics_refresh_s)


def retry_wait_s(attempt: int, rng: Callable[[], float]) -> float:
    """Seconds before retry ``attempt + 1`` (attempt ≥ 0): exponential from RETRY_BASE_S,
    capped at RETRY_CAP_S, ±25 % jitter. Pure."""
    return min(RETRY_CAP_S, RETRY_BASE_S * 2.0 ** min(attempt, 16)) * (0.75 + 0.5 * rng())


def _parse_fault(value: str | None) -> int | None:
    """``kill-after-commit:N`` (test-only, docs/fleet.md) → N."""
    if not value:
        return None
    name, _, n = value.partition(":")
    if name != "kill-after-commit" or not n.isdigit() or int(n) < 1:
        raise ConfigError(f"LOCKGW_RECEIVER_FAULT={value[:64]!r}: expected kill-after-commit:N")
    return int(n)
