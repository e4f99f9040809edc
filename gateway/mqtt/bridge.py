"""The MQTT side (CONTRACT §4) over aiomqtt: one persistent session, re-established forever.

Every connect uses clean start off and a one-week session expiry, with the will message
``{"state": "offline"}`` (retained) on ``B/G/availability``; nothing depends on the broker
keeping the session (mosquitto 2.0.11 does not restore MQTT 5 sessions after a restart): after
each connect the gateway re-publishes, in order, every event no receipt covers yet, straight
from the outbox — the outbox is the only queue. The broker's PUBACK marks an event published;
only a ``B/G/receipt`` from central marks it delivered. With ``[mqtt] protocol = "3.1.1"``
(docs/mqtt-3.1.1.md) the session is clean session off instead (3.1.1 has no expiry interval),
nothing carries properties, and answers go to ``B/G/response/<action>``.

Per connection the bridge runs, in one TaskGroup: the receiver (requests, receipts, trust
documents), the event drain (a capped window of QoS 1 publishes in seq order) and the heartbeat
(QoS 0, every 60 s). Requests run as their own tasks, at most ``MAX_CONCURRENT_REQUESTS`` at a
time plus ``MAX_CONCURRENT_ACCESS`` unlock/lock/challenge (beyond that: ``busy``), so a slow
unlock never blocks receipts and a status flood never blocks unlocks. A lost connection ends the
TaskGroup with ``MqttError``; the bridge waits a jittered backoff and reconnects. Unlocks never
wait for the broker: requests arriving through other paths and doors opened meanwhile are
committed to the outbox and drained later.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import json
import random
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, Self, TypedDict

import aiomqtt
from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway import log
from gateway.authz.keyfiles import read_bounded
from gateway.backoff import backoff_for
from gateway.config import MqttConfig, read_password
from gateway.errors import ConfigError, MqttUnavailable
from gateway.events import SealedEvent
from gateway.store.outbox import Outbox
from gateway.tasks import cancel_and_wait
from gateway.wire import (
    ECHO_LEN,
    JsonObject,
    Receipt,
    Response,
    WireError,
    error_response,
    loads_bounded,
    parse_model,
    transaction_of,
)

__all__ = [
    "HEARTBEAT_S",
    "RECEIPT_ALARM_S",
    "GatewayInfo",
    "Heartbeat",
    "MqttBridge",
    "ReceiptWatch",
    "quiet_closed_socket_callbacks",
    "republish_wait",
    "retrieve_disconnect_error",
]

#: Heartbeat period (CONTRACT §4).
HEARTBEAT_S: Final = 60.0
#: Session expiry requested at every connect: survive a day-long broker or uplink outage.
SESSION_EXPIRY_S: Final = 7 * 86400
#: QoS 1 publishes in flight at once while draining; keeps the drain fast without flooding a
#: broker that just came back after a WAN outage (THREATS A4/D5).
PUBLISH_WINDOW: Final = 64
#: Per-publish timeout: a broker that stopped answering is noticed, never waited on forever.
PUBLISH_TIMEOUT_S: Final = 10.0
#: Concurrent requests other than the access path below (status, locks, replay); beyond: ``busy``.
MAX_CONCURRENT_REQUESTS: Final = 32
#: The access path — unlock, lock and the challenge a phone needs first — has a budget of its
#: own (CONTRACT §8.14): a status flood that fills the one above never turns a person at the
#: door away with ``busy``. A challenge never awaits the radio, so it holds this budget only
#: for an instant and a challenge flood cannot fill it against the unlocks.
MAX_CONCURRENT_ACCESS: Final = 32
_ACCESS_ACTIONS: Final = frozenset({"unlock", "lock", "challenge"})
#: Re-send what no receipt covers when receipts stall this long (central may have missed it).
REPUBLISH_AFTER_S: Final = 60.0
#: Each re-send without receipt progress doubles the wait, up to this: a site whose central
#: consumer is down for a day must not push its whole backlog through the broker every minute.
REPUBLISH_MAX_S: Final = 3600.0
KEEPALIVE_S: Final = 15
#: MQTT 5 DISCONNECT reason code "Disconnect with Will Message": the broker publishes the will.
DISCONNECT_WITH_WILL: Final = 0x04
#: Events the broker acknowledged that no receipt has covered for this long raise the
#: ``receipts_stalled`` alarm (THREATS D10: acknowledged at one hop is not stored; an event
#: central lost keeps its receipts from passing the gap). With heartbeats every 60 s, central
#: and the operator see it within 12 minutes — inside the 15-minute goal.
RECEIPT_ALARM_S: Final = 600.0

Handler = Callable[[str, bytes], Awaitable[Response]]


class GatewayInfo(TypedDict):
    """The retained ``B/G/info`` object (CONTRACT §4)."""

    gw: str
    site: str
    version: str
    started_at: int | None
    epoch: str
    locks: list[str]
    keyring_version: int | None
    keyring_exp: int | None
    revocations_version: int | None
    revocations_exp: int | None
    time_state: str


class Heartbeat(TypedDict):
    """The ``B/G/heartbeat`` object (CONTRACT §4, §8.8)."""

    ts: int
    epoch: str
    last_seq: int
    receipt_seq: int
    backlog: int
    time_state: str
    alarms: list[str]


_log = log.get("mqtt")


def republish_wait(current: float, *, base: float, stalled: bool) -> float:
    """Quiet time before the next re-send: doubled (up to ``REPUBLISH_MAX_S``) after a re-send
    that receipts did not follow, back to ``base`` once they move."""
    return min(current * 2, max(REPUBLISH_MAX_S, base)) if stalled else base


class ReceiptWatch:
    """Pure: has central stopped confirming what the broker took?

    Stalled when events up to ``published_seq`` were acknowledged by the broker, some are not
    covered by a receipt, and ``receipt_seq`` has not moved for ``after_s`` since that was first
    seen. Any receipt progress, or nothing outstanding, starts over. ``now`` is monotonic."""

    __slots__ = ("_mark", "after_s")

    def __init__(self, after_s: float) -> None:
        self.after_s = after_s
        self._mark: tuple[int, float] | None = None  # (receipt_seq, since)

    def stalled(self, *, published_seq: int, receipt_seq: int, now: float) -> bool:
        if published_seq <= receipt_seq:
            self._mark = None
            return False
        if self._mark is None or self._mark[0] != receipt_seq:
            self._mark = (receipt_seq, now)
            return False
        return now - self._mark[1] >= self.after_s


class MqttBridge:
    def __init__(
        self,
        config: MqttConfig,
        *,
        gw_id: str,
        site: str,
        outbox: Outbox,
        handle_request: Handler,
        install: Callable[[bytes], Awaitable[object]],
        info: Callable[[], GatewayInfo],
        heartbeat: Callable[[], Heartbeat],
        lock_states: Callable[[], list[JsonObject]],
        retained: Callable[[], dict[str, str]] | None = None,
        heartbeat_s: float = HEARTBEAT_S,
        republish_after_s: float = REPUBLISH_AFTER_S,
        receipt_alarm_s: float = RECEIPT_ALARM_S,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = config
        #: MQTT 3.1.1 (docs/mqtt-3.1.1.md): no properties at all — answers go to
        #: ``B/G/response/<action>`` with the request's ``transaction``.
        self.v311 = config.protocol == "3.1.1"
        self.gw_id, self.site = gw_id, site
        base = config.base_topic
        self.t_availability = f"{base}/{gw_id}/availability"
        self.t_info = f"{base}/{gw_id}/info"
        self.t_heartbeat = f"{base}/{gw_id}/heartbeat"
        self.t_events = f"{base}/{gw_id}/events"
        self.t_request = f"{base}/{gw_id}/request/"
        self.t_response = f"{base}/{gw_id}/response/"
        self.t_receipt = f"{base}/{gw_id}/receipt"
        self.t_site = {f"{base}/{site}/keyring", f"{base}/{site}/revocations", f"{base}/{site}/time"}
        self._outbox = outbox
        self._handle_request = handle_request
        self._install = install
        self._info, self._heartbeat, self._lock_states = info, heartbeat, lock_states
        #: Further retained messages (topic → payload) published at every connect: the Home
        #: Assistant discovery configs (gateway/runtime/homeassistant.py).
        self._retained = retained
        self._heartbeat_s = heartbeat_s
        self.republish_after_s = republish_after_s
        self._receipt_watch = ReceiptWatch(receipt_alarm_s)
        self._mono = mono
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._requests = asyncio.Semaphore(MAX_CONCURRENT_REQUESTS)
        self._access = asyncio.Semaphore(MAX_CONCURRENT_ACCESS)
        self._request_tasks: set[asyncio.Task[None]] = set()
        self.connected = asyncio.Event()
        self.connects = 0
        self.published = 0
        self.published_seq = 0  # highest seq the broker acknowledged in this session
        self._progress = asyncio.Condition()
        self.last_error: str | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._task is not None:
            raise RuntimeError("MqttBridge is not reentrant")
        self._task = asyncio.get_running_loop().create_task(self.run(), name="mqtt-bridge")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close(graceful=True)

    async def close(self, *, graceful: bool) -> None:
        """Stop. When graceful, the retained state left behind is "offline", for certain: published
        as such, or — when that publish did not complete (a slow or failing broker, a session
        still starting, a reconnect meanwhile) — as the will, by disconnecting with MQTT 5 reason
        code 0x04 "Disconnect with Will Message". The normal disconnect that ends the session
        would discard the will and leave "online" retained for ever."""
        client = self._client
        offline = False
        if graceful and client is not None and self.connected.is_set():
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                await client.publish(
                    self.t_availability, json.dumps({"state": "offline"}), qos=1, retain=True, timeout=3
                )
                offline = self._client is client
        current = self._client
        if graceful and current is not None and not offline:
            if self.v311:
                # MQTT 3.1.1 has no such reason code: any DISCONNECT discards the will. Ending
                # the TCP stream without one is a lost connection to the broker, which then
                # publishes the will (MQTT 3.1.1 §3.1.2.5).
                sock = current._client.socket()  # noqa: SLF001 - paho's socket, no API for this
                if isinstance(sock, socket.socket):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
            else:
                # Sent before the session is cancelled (nothing awaits in between): the broker
                # acts on this DISCONNECT and closes, so the normal one from aiomqtt's exit
                # never counts.
                current._client.disconnect(  # noqa: SLF001 - aiomqtt 2.x has no reason code option
                    reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=DISCONNECT_WITH_WILL)
                )
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait([task])
        # Requests still running (the service gave them their grace) end now; an interrupted
        # unlock records its outcome before its task ends.
        await cancel_and_wait(list(self._request_tasks))

    # --- connection loop ----------------------------------------------------------------------

    def _make_client(self) -> aiomqtt.Client:
        host, port = self.cfg.host_port
        props: Properties | None = None
        if not self.v311:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = SESSION_EXPIRY_S
        password = None
        if self.cfg.password_file is not None:
            password = read_password(self.cfg.password_file)
        tls_context = None
        if self.cfg.tls:
            # OpenSSL opens these by name and blocks (the event loop with it) on a FIFO, or
            # reads /dev/zero to the end: each must first be a regular file, bounded.
            for key in ("ca_file", "cert_file", "key_file"):
                tls_file = getattr(self.cfg, key)
                if tls_file is not None:
                    read_bounded(tls_file, f"mqtt.{key}")
            tls_context = ssl.create_default_context(
                cafile=str(self.cfg.ca_file) if self.cfg.ca_file else None
            )
            if self.cfg.cert_file is not None:
                tls_context.load_cert_chain(
                    str(self.cfg.cert_file), str(self.cfg.key_file) if self.cfg.key_file else None
                )
        client = aiomqtt.Client(
            host,
            port,
            identifier=f"lockgw-{self.gw_id}",
            # 3.1.1: clean session off is the persistent session (no expiry interval exists;
            # the broker keeps it until a clean connect). 5: clean start off + session expiry.
            protocol=aiomqtt.ProtocolVersion.V311 if self.v311 else aiomqtt.ProtocolVersion.V5,
            clean_session=False if self.v311 else None,
            clean_start=MQTT_CLEAN_START_FIRST_ONLY if self.v311 else False,
            properties=props,
            keepalive=KEEPALIVE_S,
            timeout=10,
            will=aiomqtt.Will(self.t_availability, json.dumps({"state": "offline"}), qos=1, retain=True),
            username=self.cfg.username,
            password=password,
            tls_context=tls_context,
        )
        # aiomqtt warns once per publish beyond 10 pending calls; our window is deliberate.
        client.pending_calls_threshold = PUBLISH_WINDOW + MAX_CONCURRENT_REQUESTS + MAX_CONCURRENT_ACCESS + 8
        return client

    async def run(self) -> None:
        """Connect, serve, reconnect after a jittered backoff — for ever. Expected faults (the
        broker gone, TLS refused) are one log line each; anything else propagates to whoever
        runs this (the supervisor restarts it). :meth:`close` cancels it."""
        self._task = asyncio.current_task()
        quiet_closed_socket_callbacks(asyncio.get_running_loop())
        attempt = 0
        while True:
            try:
                client = self._make_client()
            except (
                OSError,
                ssl.SSLError,
                ValueError,
                ConfigError,
            ) as exc:  # a password or TLS file unreadable
                self.last_error = f"{type(exc).__name__}: {exc}"
                _log.error("mqtt_client_unusable", reason=self.last_error)
                attempt += 1
                await asyncio.sleep(backoff_for(MqttUnavailable("broker"), min(attempt, 7), random.random))
                continue
            try:
                async with client:
                    attempt = 0
                    self._client = client
                    self.connects += 1
                    _log.info("mqtt_connected", connects=self.connects)
                    await self._session(client)
            except aiomqtt.MqttError as exc:
                self.last_error = str(exc)
            except (OSError, ssl.SSLError, ValueError, MqttUnavailable) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
            finally:
                if self.connected.is_set():
                    _log.warning("mqtt_disconnected", reason=self.last_error)
                self._client = None
                self.connected.clear()
                retrieve_disconnect_error(client)
            attempt += 1
            await asyncio.sleep(backoff_for(MqttUnavailable("broker"), min(attempt, 7), random.random))

    async def _session(self, client: aiomqtt.Client) -> None:
        for topic in (f"{self.t_request}+", self.t_receipt, *sorted(self.t_site)):
            await client.subscribe(topic, qos=1, timeout=10)
        await client.publish(
            self.t_availability, json.dumps({"state": "online"}), qos=1, retain=True, timeout=10
        )
        await self.publish_info()
        for state in self._lock_states():
            await self.publish_lock_state(state)
        for topic, payload in (self._retained() if self._retained is not None else {}).items():
            await self.publish_retained(topic, payload)
        self.connected.set()
        # The three run until one fails (a lost connection fails the receiver first); the
        # others are then cancelled and awaited, and the first error propagates as itself.
        tasks = [
            asyncio.create_task(self._receive(client), name="mqtt-receive"),
            asyncio.create_task(self._drain(client), name="mqtt-drain"),
            asyncio.create_task(self._heartbeats(client), name="mqtt-heartbeat"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(tasks)
        for t in done:
            exc = None if t.cancelled() else t.exception()
            if exc is not None:
                raise exc
        raise MqttUnavailable("MQTT session ended")

    # --- outgoing -----------------------------------------------------------------------------

    async def _publish(
        self,
        topic: str,
        payload: str | bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> None:
        client = self._client
        if client is None:
            raise MqttUnavailable("not connected")
        await client.publish(
            topic, payload, qos=qos, retain=retain, properties=properties, timeout=PUBLISH_TIMEOUT_S
        )

    async def publish_info(self) -> None:
        with contextlib.suppress(aiomqtt.MqttError, MqttUnavailable):
            await self._publish(self.t_info, json.dumps(self._info(), sort_keys=True), retain=True)

    async def publish_lock_state(self, state: JsonObject) -> None:
        with contextlib.suppress(aiomqtt.MqttError, MqttUnavailable):
            topic = f"{self.cfg.base_topic}/{self.gw_id}/locks/{state['lock']}/state"
            await self._publish(topic, json.dumps(state, sort_keys=True), retain=True)

    async def publish_retained(self, topic: str, payload: str) -> None:
        """A retained QoS 1 message (empty ``payload``: clears the topic); dropped when not
        connected (the next connect publishes what ``retained`` then returns)."""
        with contextlib.suppress(aiomqtt.MqttError, MqttUnavailable):
            await self._publish(topic, payload, retain=True)

    async def publish_replayed(self, event: SealedEvent) -> None:
        with contextlib.suppress(aiomqtt.MqttError, MqttUnavailable):
            await self._publish(self.t_events, json.dumps(event, sort_keys=True))

    async def _drain(self, client: aiomqtt.Client) -> None:
        """Publish, in seq order, everything no receipt covers — then follow new commits.

        If central's receipts stop advancing while events are outstanding (central reconnected
        after we published, to a broker that lost its session), the drain starts over from the
        last receipt after ``republish_after_s`` of quiet, then after twice that while receipts
        still do not move, up to ``REPUBLISH_MAX_S``: delivery is at least once, deduplicated by id.
        """
        next_seq = self._outbox.stats().receipt_seq + 1
        quiet_s = self.republish_after_s
        inflight: collections.deque[tuple[int, asyncio.Task[None]]] = collections.deque()

        async def settle(*, keep: int) -> None:
            # Publishes complete in order on one connection; wait on the oldest first.
            while len(inflight) > keep:
                seq, task = inflight.popleft()
                await task  # a failed publish ends the session: reconnect and re-drain
                self.published_seq = seq
            self.receipts_stalled()  # starts the stall clock as soon as something is outstanding
            async with self._progress:
                self._progress.notify_all()

        try:
            while True:
                self._outbox.appended.clear()
                batch = await self._outbox.read(next_seq, limit=PUBLISH_WINDOW * 4)
                for event in batch:
                    if len(inflight) >= PUBLISH_WINDOW:
                        await settle(keep=PUBLISH_WINDOW // 2)
                    payload = json.dumps(event, sort_keys=True)
                    task = asyncio.create_task(
                        client.publish(self.t_events, payload, qos=1, timeout=PUBLISH_TIMEOUT_S)
                    )
                    inflight.append((event["seq"], task))
                    next_seq = event["seq"] + 1
                    self.published += 1
                if len(batch) < PUBLISH_WINDOW * 4 and next_seq > self._outbox.stats().last_seq:
                    await settle(keep=0)
                    receipt = self._outbox.stats().receipt_seq
                    try:
                        async with asyncio.timeout(quiet_s):
                            await self._outbox.appended.wait()
                    except TimeoutError:
                        stats = self._outbox.stats()
                        stalled = stats.receipt_seq == receipt and stats.backlog > 0
                        if stalled:
                            next_seq = stats.receipt_seq + 1  # no receipt progress: send again
                        quiet_s = republish_wait(quiet_s, base=self.republish_after_s, stalled=stalled)
        finally:
            for _, t in inflight:
                t.cancel()
            await asyncio.gather(*(t for _, t in inflight), return_exceptions=True)

    def receipts_stalled(self) -> bool:
        """The ``receipts_stalled`` alarm (see :data:`RECEIPT_ALARM_S`)."""
        return self._receipt_watch.stalled(
            published_seq=self.published_seq, receipt_seq=self._outbox.stats().receipt_seq, now=self._mono()
        )

    async def wait_drained(self, seq: int) -> None:
        """Wait until the broker acknowledged every event up to ``seq``."""
        async with self._progress:
            await self._progress.wait_for(lambda: self.published_seq >= seq)

    async def _heartbeats(self, client: aiomqtt.Client) -> None:
        while True:
            await client.publish(
                self.t_heartbeat,
                json.dumps(self._heartbeat(), sort_keys=True),
                qos=0,
                timeout=PUBLISH_TIMEOUT_S,
            )
            await asyncio.sleep(self._heartbeat_s)

    # --- incoming -----------------------------------------------------------------------------

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            try:
                await self._on_message(str(message.topic), bytes(message.payload), message.properties)
            except Exception as exc:  # noqa: BLE001 - one message never ends the session
                _log.error("message_crashed", topic=str(message.topic)[:128], exc_info=exc)

    async def _on_message(self, topic: str, payload: bytes, props: Properties | None) -> None:
        if topic == self.t_receipt:
            await self._on_receipt(payload)
        elif topic in self.t_site:
            if payload:  # an empty retained message clears the topic: nothing to install
                await self._install(payload)
        elif topic.startswith(self.t_request):
            self._spawn_request(topic[len(self.t_request) :], payload, props)

    async def _on_receipt(self, payload: bytes) -> None:
        """Malformed receipts (CONTRACT §8.13: not an int in 0..2^63-1, invalid text, too deep)
        are ignored and change nothing; one log line says why."""
        try:
            receipt = parse_model(Receipt, loads_bounded(payload, max_bytes=1024, max_depth=4))
        except WireError as exc:
            _log.warning("receipt_ignored", reason=str(exc))
            return
        if await self._outbox.receipt(receipt.epoch, receipt.seq):
            self.receipts_stalled()  # progress restarts the stall clock

    def response_topic(self, action: str, requested: object) -> tuple[str, bool]:
        """Where the answer to a request goes (CONTRACT §8.10), and whether the requested
        Response Topic was refused: it is used unless it holds a wildcard or lies under
        ``B/G/`` outside ``B/G/response/`` (a reply may never land on the gateway's own events,
        state or request topics); then the answer is ``invalid_request`` on ``B/G/response/<action>``.

        Beyond the letter of §8.10 (a decision, docs/architecture.md): the site's trust topics
        (``B/S/keyring``, ``revocations``, ``time``) and any other topic of a gateway than its
        ``response/`` subtree (its requests, receipts, events, state, …) are refused too — else a requester could make the gateway publish, with its own broker
        rights, where only central or phones may (every gateway of the site would then record a
        ``trust.rejected``)."""
        own = (
            self.t_response + (action if action.isascii() and action.isprintable() else "invalid")[:ECHO_LEN]
        )
        if requested is None or requested == "":
            return own, False
        if not isinstance(requested, str):
            return own, True
        base = self.t_request[: -len("request/")]
        levels = requested.split("/")
        root = self.cfg.base_topic
        # Under the base topic only a response topic (any gateway's): never another gateway's
        # requests, receipts, events, state, availability, info or heartbeat.
        foreign = len(levels) >= 3 and levels[0] == root and levels[2] != "response"
        bad = (
            "+" in requested
            or "#" in requested
            or "\x00" in requested
            or len(requested.encode("utf-8", "replace")) > 1024
            or (requested.startswith(base) and not requested.startswith(self.t_response))
            or requested + "/" == base
            or requested in self.t_site
            or foreign
        )
        return (own, True) if bad else (requested, False)

    def _spawn_request(self, action: str, payload: bytes, props: Properties | None) -> None:
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None

        async def run() -> None:
            topic, refused = self.response_topic(action, response_topic)
            if refused:
                response: Response = error_response(
                    _tx(payload),
                    "invalid_request",
                    "Response Topic must not hold a wildcard or lie on this gateway's "
                    "own topics outside response/ (CONTRACT §8.10)",
                )
            elif (budget := self._access if action in _ACCESS_ACTIONS else self._requests).locked():
                response = error_response(_tx(payload), "busy", "too many requests in progress")
            else:
                async with budget:
                    response = await self._handle_request(action, payload)
            out_props = None
            if correlation is not None:
                out_props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                out_props.CorrelationData = correlation
            with contextlib.suppress(aiomqtt.MqttError, MqttUnavailable):
                await self._publish(topic, json.dumps(response, sort_keys=True), properties=out_props)

        task = asyncio.get_running_loop().create_task(run(), name=f"mqtt-request-{action[:32]}")
        self._request_tasks.add(task)
        task.add_done_callback(self._request_tasks.discard)


def _tx(payload: bytes) -> str | None:
    """The request's transaction for an answer given without reading the request, or None."""
    try:
        return transaction_of(loads_bounded(payload))
    except WireError:
        return None


def quiet_closed_socket_callbacks(loop: asyncio.AbstractEventLoop) -> None:
    """Turn one known race into one log line instead of asyncio's "Exception in callback" traceback.

    aiomqtt has paho's socket callbacks, which run on paho's thread, register the socket with the
    loop through ``call_soon_threadsafe(loop.add_writer, sock.fileno(), ...)`` (and add_reader).
    When the broker dies, paho closes the socket before the loop runs that call, and it fails
    with EBADF ("Bad file descriptor"). Nothing is lost (the client's disconnect is already
    noticed and handled by its owner), so it is an expected fault. Any other error in a callback
    still goes to the previous handler (asyncio's default: a logged traceback).
    """
    previous = loop.get_exception_handler()
    if getattr(previous, "quiets_closed_sockets", False):
        return  # installed already (a bridge restarted by the supervisor)

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        callback = getattr(context.get("handle"), "_callback", None)
        if (
            isinstance(exc, OSError)
            and exc.errno == errno.EBADF
            and callback in (loop.add_writer, loop.add_reader)
        ):
            _log.warning("socket_closed_before_registered", reason=f"{exc.strerror} (MQTT broker gone?)")
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    handler.quiets_closed_sockets = True  # type: ignore[attr-defined]
    loop.set_exception_handler(handler)


def retrieve_disconnect_error(client: aiomqtt.Client) -> None:
    """aiomqtt 2.5 stores an unexpected disconnection in a future that its ``__aexit__`` does
    not await; unless the message iterator raised from it, asyncio later logs "Future exception
    was never retrieved". We already handled the loss, so mark it retrieved."""
    future = getattr(client, "_disconnected", None)
    if isinstance(future, asyncio.Future) and future.done() and not future.cancelled():
        future.exception()
