"""A faithful publisher of the contract's gateway side, many per process: the simulated part of
a 1,000-site fleet (bench/fleet_bench.py) and of the fault tests.

Written against /work/shared/CONTRACT.md §4–5 and §8.8, not against any receiver:

- **Outbox.** Each gateway keeps every event it commits, in memory, with a gapless ``seq``
  from 1 in its ``epoch`` (a random id made at creation), sealed with the gateway's own pure
  chain code (``protocols.event_encoding.seal_event_json``: ``prev``/``hash`` exactly as the
  real outbox makes them). An event is "committed" when :meth:`SimGateway.commit` returns;
  it is kept until a receipt covers it (the process is the durable medium here: a simulated
  kill -9 keeps the outbox, like the real gateway's SQLite does across a restart).
- **MQTT.** One connection per gateway, MQTT 3.1.1 (RabbitMQ's plugin) or 5, client id
  ``lockgw-G``, clean session off, will ``{"state": "offline"}`` retained on ``B/G/availability``;
  after each connect: subscribe requests and receipts, publish availability online and info
  (retained), then re-publish in seq order every event no receipt covers (QoS 1, a window of
  PUBACKs in flight), then follow new commits. When receipts stop moving while events are
  outstanding, everything uncovered is sent again after ``republish_after_s``, doubling up to
  an hour (the real bridge's rule).
- **Receipts** ``{"epoch", "seq"}``: malformed, other epoch, or beyond ``last_seq`` are ignored
  (§8.8, §8.13); else ``receipt_seq`` only moves forward.
- **Heartbeats** (QoS 0) ``{"ts","epoch","last_seq","receipt_seq","backlog","time_state","alarms"}``.
- **Requests**: ``replay`` (``from_seq``, ``to_seq``?) re-publishes the stored events with
  ``"replayed": true`` and answers ``{"count": n}`` on ``B/G/response/replay`` with the
  request's ``transaction``; ``locks`` answers an empty list; anything else ``unknown_action``
  or ``unknown_lock``; malformed input ``invalid_request``.

Faults: :meth:`SimGateway.cut` drops the connection without DISCONNECT and stays away for a
while (events keep being committed: the backlog after a site outage); :meth:`SimGateway.kill`
is kill -9 (no DISCONNECT, the will fires) followed by a restart from the same outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Self

import aiomqtt

from gateway.mqtt.bridge import quiet_closed_socket_callbacks
from gateway.tasks import cancel_and_wait
from protocols.event_encoding import GENESIS, seal_event_json

PUBLISH_WINDOW = 64
REPUBLISH_MAX_S = 3600.0
_SEQ_MAX = 2**63 - 1


@dataclass
class GatewayStats:
    """What one simulated gateway did, for the bench's report and the tests' checks."""

    committed: int = 0
    published: int = 0  # QoS 1 event publishes the broker acknowledged (re-sends included)
    republished: int = 0  # of those, sends of a seq already sent once
    replays: int = 0
    connects: int = 0
    receipt_latency_s: list[float] = field(default_factory=list)  # commit -> receipt, per event


class SimGateway:
    """One simulated gateway: an in-memory outbox and one MQTT connection (see module doc)."""

    def __init__(
        self,
        gw: str,
        *,
        site: str,
        host: str,
        port: int,
        base: str = "lockgw",
        protocol: str = "3.1.1",
        heartbeat_s: float = 60.0,
        republish_after_s: float = 60.0,
        max_backoff_s: float = 30.0,
        lose_first_send: Iterable[int] = (),
        mono: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.gw, self.site, self.base = gw, site, base
        self.host, self.port, self.protocol = host, port, protocol
        self.heartbeat_s, self.republish_after_s = heartbeat_s, republish_after_s
        self._mono, self._wall = mono, wall
        self.max_backoff_s = max_backoff_s
        #: Seqs whose first publish is "lost on the way" (never sent, as if a broker or bridge
        #: dropped it after the PUBACK): central sees a gap that only a replay or a re-send fills.
        self.lose_first_send = set(lose_first_send)
        self.epoch = secrets.token_hex(8)
        self.events: list[str] = []  # JSON text of seq 1..last_seq (index seq-1)
        self._committed_at: list[float] = []
        self._hashes: list[str] = []
        self.receipt_seq = 0
        self.stats = GatewayStats()
        self._appended = asyncio.Event()
        self._receipted = asyncio.Condition()
        self._online = asyncio.Event()  # clear while cut off / killed
        self._online.set()
        self._cut = asyncio.Event()  # set while cut off: ends the session
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._sent_up_to = 0  # highest seq ever sent (to count re-sends)
        self.connected = asyncio.Event()
        self.t = {
            "availability": f"{base}/{gw}/availability",
            "info": f"{base}/{gw}/info",
            "heartbeat": f"{base}/{gw}/heartbeat",
            "events": f"{base}/{gw}/events",
            "request": f"{base}/{gw}/request/",
            "response": f"{base}/{gw}/response/",
            "receipt": f"{base}/{gw}/receipt",
        }

    # --- the outbox -----------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        return len(self.events)

    @property
    def backlog(self) -> int:
        return self.last_seq - self.receipt_seq

    def commit(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Seal and keep one event (gapless seq, hash chain); it is then owed to central."""
        seq = self.last_seq + 1
        prev = self._hashes[-1] if self._hashes else GENESIS
        event, text = seal_event_json(
            fields, gw=self.gw, site=self.site, epoch=self.epoch, seq=seq, prev=prev, wall=self._wall()
        )
        self.events.append(text)
        self._hashes.append(event["hash"])
        self._committed_at.append(self._mono())
        self.stats.committed += 1
        self._appended.set()
        return event

    def event(self, seq: int) -> dict[str, Any]:
        return dict(json.loads(self.events[seq - 1]))

    async def wait_receipted(self, seq: int) -> None:
        async with self._receipted:
            await self._receipted.wait_for(lambda: self.receipt_seq >= seq)

    # --- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run(), name=f"simgw-{self.gw}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        task, self._task = self._task, None
        if task is not None:
            # Again and again: aiomqtt's exit may swallow one cancellation (gateway.tasks).
            await cancel_and_wait([task])

    def _drop(self) -> None:
        """End the TCP stream without DISCONNECT: to the broker, a lost gateway (will fires)."""
        client = self._client
        if client is not None:
            sock = client._client.socket()  # paho's socket: no API for this
            if isinstance(sock, socket.socket):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    async def cut(self, seconds: float) -> None:
        """The site's uplink is down for ``seconds``; events keep being committed meanwhile."""
        self.go_offline()
        await asyncio.sleep(seconds)
        self.go_online()

    def go_offline(self) -> None:
        self._online.clear()
        self._cut.set()
        self._drop()

    def go_online(self) -> None:
        self._cut.clear()
        self._online.set()

    async def kill(self, down_s: float = 1.0) -> None:
        """kill -9 and restart: nothing graceful is sent; the outbox (durable) survives."""
        await self.cut(down_s)

    # --- the connection -------------------------------------------------------------------

    def _make_client(self) -> aiomqtt.Client:
        v311 = self.protocol != "5"
        kw: dict[str, Any] = {}
        if v311:
            kw["clean_session"] = False
        else:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 7 * 86400
            kw.update(clean_start=False, properties=props)
        client = aiomqtt.Client(
            self.host,
            self.port,
            identifier=f"lockgw-{self.gw}",
            protocol=aiomqtt.ProtocolVersion.V311 if v311 else aiomqtt.ProtocolVersion.V5,
            keepalive=30,
            timeout=30,
            will=aiomqtt.Will(self.t["availability"], json.dumps({"state": "offline"}), qos=1, retain=True),
            **kw,
        )
        client.pending_calls_threshold = PUBLISH_WINDOW * 4
        return client

    async def _run(self) -> None:
        quiet_closed_socket_callbacks(asyncio.get_running_loop())  # the bridge's EBADF race
        attempt = 0
        while True:
            await self._online.wait()
            client = self._make_client()
            try:
                async with client:
                    self._client = client
                    attempt = 0
                    self.stats.connects += 1
                    await self._session(client)
            except (aiomqtt.MqttError, OSError, TimeoutError):
                pass
            finally:
                self._client = None
                self.connected.clear()
                fut = getattr(client, "_disconnected", None)
                if isinstance(fut, asyncio.Future) and fut.done() and not fut.cancelled():
                    fut.exception()
            attempt += 1
            await asyncio.sleep(min(self.max_backoff_s, 0.5 * 2 ** min(attempt, 6)) * (0.5 + random.random()))

    async def _session(self, client: aiomqtt.Client) -> None:
        await client.subscribe(f"{self.t['request']}+", qos=1, timeout=30)
        await client.subscribe(self.t["receipt"], qos=1, timeout=30)
        await client.publish(self.t["availability"], json.dumps({"state": "online"}), qos=1, retain=True)
        await client.publish(self.t["info"], json.dumps(self._info(), sort_keys=True), qos=1, retain=True)
        self.connected.set()
        tasks = [
            asyncio.create_task(self._receive(client)),
            asyncio.create_task(self._drain(client)),
            asyncio.create_task(self._heartbeats(client)),
            asyncio.create_task(self._watch_online()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(tasks)
        for t in done:
            if not t.cancelled() and (exc := t.exception()) is not None:
                raise exc

    async def _watch_online(self) -> None:
        await self._cut.wait()  # a cut ends the session

    def _info(self) -> dict[str, Any]:
        return {
            "gw": self.gw,
            "site": self.site,
            "version": "sim",
            "started_at": int(self._wall()),
            "epoch": self.epoch,
            "locks": [],
            "keyring_version": None,
            "keyring_exp": None,
            "revocations_version": None,
            "revocations_exp": None,
            "time_state": "synced",
        }

    def heartbeat(self) -> dict[str, Any]:
        return {
            "ts": int(self._wall()),
            "epoch": self.epoch,
            "last_seq": self.last_seq,
            "receipt_seq": self.receipt_seq,
            "backlog": self.backlog,
            "time_state": "synced",
            "alarms": [],
        }

    async def _heartbeats(self, client: aiomqtt.Client) -> None:
        while True:
            await client.publish(self.t["heartbeat"], json.dumps(self.heartbeat(), sort_keys=True), qos=0)
            await asyncio.sleep(self.heartbeat_s)

    async def _send(self, client: aiomqtt.Client, seqs: Iterable[int], *, replayed: bool = False) -> int:
        """QoS 1 publishes of ``seqs`` in order, at most a window in flight; returns the count."""
        inflight: list[asyncio.Task[None]] = []
        n = 0
        try:
            for seq in seqs:
                if not replayed and seq in self.lose_first_send:
                    self.lose_first_send.discard(seq)
                    self._sent_up_to = max(self._sent_up_to, seq)
                    n += 1
                    continue
                text = self.events[seq - 1]
                if replayed:
                    text = text[:-1] + ',"replayed":true}'
                inflight.append(
                    asyncio.create_task(client.publish(self.t["events"], text, qos=1, timeout=30))
                )
                if seq <= self._sent_up_to:
                    self.stats.republished += 1
                self._sent_up_to = max(self._sent_up_to, seq)
                n += 1
                if len(inflight) >= PUBLISH_WINDOW:
                    await inflight.pop(0)
                    self.stats.published += 1
            while inflight:
                await inflight.pop(0)
                self.stats.published += 1
        finally:
            for t in inflight:
                t.cancel()
            await asyncio.gather(*inflight, return_exceptions=True)
        return n

    async def _drain(self, client: aiomqtt.Client) -> None:
        next_seq = self.receipt_seq + 1
        quiet = self.republish_after_s
        while True:
            self._appended.clear()
            last = self.last_seq
            if next_seq <= last:
                await self._send(client, range(next_seq, last + 1))
                next_seq = last + 1
                continue
            receipt = self.receipt_seq
            try:
                async with asyncio.timeout(quiet):
                    await self._appended.wait()
            except TimeoutError:
                stalled = self.receipt_seq == receipt and self.backlog > 0
                if stalled:
                    next_seq = self.receipt_seq + 1  # no receipt progress: send again
                quiet = min(quiet * 2, REPUBLISH_MAX_S) if stalled else self.republish_after_s

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for m in client.messages:
            topic, payload = str(m.topic), bytes(m.payload)
            if topic == self.t["receipt"]:
                await self._on_receipt(payload)
            elif topic.startswith(self.t["request"]):
                asyncio.create_task(self._on_request(client, topic[len(self.t["request"]) :], payload))  # noqa: RUF006

    async def _on_receipt(self, payload: bytes) -> None:
        try:
            body = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            return
        if not isinstance(body, dict) or set(body) != {"epoch", "seq"}:
            return
        epoch, seq = body["epoch"], body["seq"]
        if not isinstance(epoch, str) or type(seq) is not int or not 0 <= seq <= _SEQ_MAX:
            return
        if epoch != self.epoch or seq > self.last_seq or seq <= self.receipt_seq:
            return
        now = self._mono()
        self.stats.receipt_latency_s.extend(now - self._committed_at[i] for i in range(self.receipt_seq, seq))
        async with self._receipted:
            self.receipt_seq = seq
            self._receipted.notify_all()

    async def _on_request(self, client: aiomqtt.Client, action: str, payload: bytes) -> None:
        tx: object = None
        try:
            body = json.loads(payload)
            if not isinstance(body, dict):
                raise ValueError("not an object")  # noqa: TRY004 - one "malformed" path
            tx = body.get("transaction")
            if tx is not None and (not isinstance(tx, str) or len(tx) > 128):
                tx = None
                raise ValueError("transaction")
            response = await self._answer(client, action, body)
        except (ValueError, UnicodeDecodeError):
            response = _error("invalid_request", "malformed request")
        except aiomqtt.MqttError:
            return
        response["transaction"] = tx
        with contextlib.suppress(aiomqtt.MqttError):
            await client.publish(
                self.t["response"] + (action if action.isascii() else "invalid")[:64],
                json.dumps(response, sort_keys=True),
                qos=1,
                timeout=30,
            )

    async def _answer(self, client: aiomqtt.Client, action: str, body: dict[str, Any]) -> dict[str, Any]:
        if action == "replay":
            lo, hi = body.get("from_seq"), body.get("to_seq", self.last_seq)
            if type(lo) is not int or type(hi) is not int or not 1 <= lo <= hi <= _SEQ_MAX:
                raise ValueError("from_seq/to_seq")
            hi = min(hi, self.last_seq)
            self.stats.replays += 1
            count = await self._send(client, range(lo, hi + 1), replayed=True) if lo <= hi else 0
            return {"status": "ok", "data": {"count": count}}
        if action == "locks":
            return {"status": "ok", "data": {"locks": []}}
        if action in ("challenge", "unlock", "lock", "status"):
            return _error("unknown_lock", "this simulated gateway has no locks")
        return _error("unknown_action", "no such action")


def _error(code: str, message: str) -> dict[str, Any]:
    return {"status": "error", "error": {"code": code, "message": message}}


# --- a realistic shift ---------------------------------------------------------------------

_KINDS = (
    ("access.granted", "ok"),
    ("lock.unlocked", "ok"),
    ("lock.door_opened", "ok"),
    ("lock.door_closed", "ok"),
    ("lock.locked", "ok"),
    ("access.denied", "denied"),
)


def shift_event(rng: random.Random, gw: SimGateway) -> dict[str, Any]:
    kind, outcome = rng.choice(_KINDS)
    fields: dict[str, Any] = {
        "type": kind,
        "lock": f"lk-{gw.gw[-4:]}-{rng.randrange(4)}",
        "outcome": outcome,
        "time_state": "synced",
        "data": {},
    }
    if kind.startswith("access."):
        fields |= {"sub": f"staff-{rng.randrange(200)}", "role": "staff", "cti": secrets.token_hex(16)}
        if outcome == "denied":
            fields["reason"] = "token_expired"
    return fields


@dataclass
class Shift:
    """A time-compressed care shift for one gateway: ``per_min`` events a simulated minute,
    bursts of ``burst`` events at each shift change (every ``shift_min`` simulated minutes),
    with ``compress`` simulated seconds per real second."""

    per_min: float = 3.0
    burst: int = 20
    shift_min: float = 480.0
    compress: float = 60.0

    async def run(self, gw: SimGateway, *, minutes: float, rng: random.Random) -> None:
        sim_t = 0.0
        next_change = self.shift_min * rng.random()  # sites are not in lock-step
        while sim_t < minutes:
            gap = rng.expovariate(self.per_min)  # simulated minutes to the next event
            await asyncio.sleep(gap * 60.0 / self.compress)
            sim_t += gap
            gw.commit(shift_event(rng, gw))
            if sim_t >= next_change:
                for _ in range(self.burst):
                    gw.commit(shift_event(rng, gw))
                next_change += self.shift_min
