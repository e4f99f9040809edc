"""The receiver's two transports behind one interface: MQTT 5 shared subscriptions (mosquitto,
small sites) and AMQP 0-9-1 (RabbitMQ, fleets). Both hand the core :class:`Delivery` objects
named by their MQTT topic (``B/G/events``), take :meth:`ack` only after the core committed, and
publish receipts and replay requests by MQTT topic.

* **MQTT** (aiomqtt over paho): client id ``lockgw-receiver-<instance>``, clean start off with a
  one-day session, ``$share/<group>/B/+/events`` and ``…/+/heartbeat`` (competing receivers
  share them), plain ``B/+/availability`` and ``B/+/bridge`` (retained messages are not sent to shared
  subscriptions, and the state is idempotent). PUBACKs are manual (paho's ``manual_ack``): a
  message is acknowledged to the broker only after its batch was committed; one not acked before
  a crash is delivered again when the session resumes.
* **AMQP** (aio-pika): a durable **quorum** queue bound to ``amq.topic`` with ``B.*.events``,
  ``B.*.heartbeat``, ``B.*.availability`` and ``B.*.bridge`` (RabbitMQ's MQTT plugin publishes MQTT topic
  ``a/b/c`` as routing key ``a.b.c``), read by every receiver as competing consumers with a
  bounded prefetch; acks go after the commit (one ``multiple`` ack per batch). Receipts and
  replay requests are published to ``amq.topic`` with the gateway's routing key, with publisher
  confirms, and reach its MQTT session.

A lost connection ends the transport's run loop with :class:`TransportUnavailable`; the caller
reconnects. Deliveries of a dead connection can no longer be acked (their tags belonged to it):
the broker delivers them again, and the store deduplicates them by id.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import aio_pika
import aio_pika.abc
import aiomqtt
import pamqp.exceptions
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway import log
from gateway.errors import LockgwError
from gateway.receiver.config import AmqpConfig, MqttConfig, read_secret

__all__ = [
    "AmqpTransport",
    "Delivery",
    "MqttTransport",
    "Transport",
    "TransportUnavailable",
    "replay_request",
]

_log = log.get("receiver.transport")

#: A receiver's MQTT session outlives a restart by this much (CONTRACT §8.10 uses ≥ 1 day too).
SESSION_EXPIRY_S: Final = 86400
#: Deliveries buffered between the broker client and the core at most.
MAX_BUFFERED: Final = 20_000


class TransportUnavailable(LockgwError):
    code = "broker_unavailable"


@dataclass(frozen=True, slots=True)
class Delivery:
    topic: str
    payload: bytes
    #: The connection it came on (acks of an older connection are dropped).
    generation: int
    #: The transport's ack handle (an MQTT (mid, qos), an AMQP message).
    handle: Any


class Transport(Protocol):
    queue: asyncio.Queue[Delivery]

    async def run(self) -> None: ...
    async def ack(self, deliveries: Sequence[Delivery]) -> None: ...
    async def publish(self, topic: str, payload: bytes) -> None: ...


def replay_request(from_seq: int, to_seq: int, transaction: str) -> bytes:
    """CONTRACT §4's ``replay`` request for exactly the missing range."""
    return json.dumps({"from_seq": from_seq, "to_seq": to_seq, "transaction": transaction}).encode()


class MqttTransport:
    """MQTT 5 (module docstring)."""

    def __init__(self, config: MqttConfig, *, base: str, instance: str, receive_max: int = 1000) -> None:
        self._config, self._base, self._instance = config, base, instance
        self._receive_max = max(1, min(receive_max, 65535))
        self.queue: asyncio.Queue[Delivery] = asyncio.Queue(MAX_BUFFERED)
        self._client: aiomqtt.Client | None = None
        self._generation = 0

    async def run(self) -> None:
        """Connect, subscribe and pass deliveries to :attr:`queue` until the connection is lost
        (:class:`TransportUnavailable`) or the task is cancelled (a clean disconnect)."""
        host, port = self._config.host_port
        password = (
            read_secret(self._config.password_file, "mqtt.password_file")
            if self._config.password_file
            else None
        )
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        # Unacked deliveries the broker may have in flight to us: acks wait for the commit, so
        # this (and mosquitto's max_inflight_messages, default 20) bounds a batch's size.
        props.ReceiveMaximum = self._receive_max
        tls_context = None
        if self._config.tls:
            try:
                tls_context = ssl.create_default_context(
                    cafile=str(self._config.ca_file) if self._config.ca_file else None
                )
            except (OSError, ssl.SSLError) as exc:
                raise TransportUnavailable(f"mqtt.ca_file: {exc}") from exc
        client = aiomqtt.Client(
            host,
            port,
            tls_context=tls_context,
            identifier=f"lockgw-receiver-{self._instance}",
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            properties=props,
            username=self._config.username,
            password=password,
            keepalive=30,
            max_queued_incoming_messages=MAX_BUFFERED,
        )
        client._client.manual_ack_set(on=True)  # noqa: SLF001 - aiomqtt has no manual ack; paho has
        self._generation += 1
        generation = self._generation
        try:
            async with client:
                share = f"$share/{self._config.share_group}/{self._base}"
                await client.subscribe(f"{share}/+/events", qos=1)
                await client.subscribe(f"{share}/+/heartbeat", qos=1)
                await client.subscribe(f"{self._base}/+/availability", qos=1)
                await client.subscribe(f"{self._base}/+/bridge", qos=1)
                self._client = client
                _log.info("mqtt_connected", host=host, port=port)
                async for m in client.messages:
                    payload = bytes(m.payload)
                    await self.queue.put(Delivery(str(m.topic), payload, generation, (m.mid, m.qos)))
        except aiomqtt.MqttError as exc:
            raise TransportUnavailable(f"MQTT: {exc}") from exc
        finally:
            self._client = None
        raise TransportUnavailable("MQTT connection lost")

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        client = self._client
        if client is None:
            return
        for d in deliveries:
            mid, qos = d.handle
            if d.generation == self._generation and qos > 0:
                client._client.ack(mid, qos)  # noqa: SLF001 - see connection()

    async def publish(self, topic: str, payload: bytes) -> None:
        client = self._client
        if client is None:
            raise TransportUnavailable("MQTT not connected")
        try:
            await client.publish(topic, payload, qos=1, timeout=10)
        except aiomqtt.MqttError as exc:
            raise TransportUnavailable(f"MQTT publish: {exc}") from exc


class AmqpTransport:
    """AMQP 0-9-1 to RabbitMQ (module docstring)."""

    def __init__(self, config: AmqpConfig, *, base: str, instance: str) -> None:
        self._config, self._base, self._instance = config, base, instance
        self.queue: asyncio.Queue[Delivery] = asyncio.Queue(MAX_BUFFERED)
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        self._generation = 0

    async def run(self) -> None:
        """As :meth:`MqttTransport.run`, over AMQP."""
        password = (
            read_secret(self._config.password_file, "amqp.password_file")
            if self._config.password_file
            else None
        )
        kwargs: dict[str, Any] = {
            "client_properties": {"connection_name": f"lockgw-receiver-{self._instance}"}
        }
        if self._config.username is not None:
            kwargs["login"] = self._config.username
        if password is not None:
            kwargs["password"] = password
        self._generation += 1
        generation = self._generation
        lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def closed(*_args: object) -> None:
            if not lost.done():
                lost.set_result(None)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            topic = (message.routing_key or "").replace(".", "/")
            await self.queue.put(Delivery(topic, message.body, generation, message))

        nodes = self._config.nodes
        url = nodes[(generation - 1) % len(nodes)]  # the next node of the cluster on each reconnect
        try:
            conn = await aio_pika.connect(url, timeout=15, **kwargs)
            conn.close_callbacks.add(closed)
            async with conn:
                channel = await conn.channel(publisher_confirms=True)
                channel.close_callbacks.add(closed)
                await channel.set_qos(prefetch_count=self._config.prefetch)
                queue = await channel.declare_queue(
                    self._config.queue, durable=True, arguments={"x-queue-type": "quorum"}
                )
                for kind in ("events", "heartbeat", "availability", "bridge"):
                    await queue.bind("amq.topic", routing_key=f"{self._base}.*.{kind}")
                self._exchange = await channel.get_exchange("amq.topic", ensure=False)
                self._channel = channel
                # A consumer the broker cancels (its queue deleted, or moved away) would leave
                # this connection open and silent: treat it as a lost connection.
                (await channel.get_underlay_channel()).on_consumer_cancel_callbacks.add(closed)
                await queue.consume(on_message, no_ack=False)
                _log.info("amqp_connected", queue=self._config.queue, node=url.split("@")[-1])
                await lost
        except (OSError, aio_pika.exceptions.AMQPError, pamqp.exceptions.PAMQPException, TimeoutError) as exc:
            raise TransportUnavailable(f"AMQP: {type(exc).__name__}: {exc}") from exc
        finally:
            self._channel = self._exchange = None
        raise TransportUnavailable("AMQP connection lost")

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        current = [d for d in deliveries if d.generation == self._generation]
        if not current or self._channel is None:
            return
        last: aio_pika.abc.AbstractIncomingMessage = max(current, key=lambda d: d.handle.delivery_tag).handle
        try:
            # Deliveries are taken in order from one channel: everything up to the highest tag
            # of this batch is in it or in a batch acked before.
            await last.ack(multiple=True)
        except (OSError, aio_pika.exceptions.AMQPError, pamqp.exceptions.PAMQPException, RuntimeError) as exc:
            raise TransportUnavailable(f"AMQP ack: {exc}") from exc

    async def publish(self, topic: str, payload: bytes) -> None:
        exchange = self._exchange
        if exchange is None:
            raise TransportUnavailable("AMQP not connected")
        message = aio_pika.Message(payload, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        try:
            await exchange.publish(message, routing_key=topic.replace("/", "."), timeout=10)
        except (OSError, aio_pika.exceptions.AMQPError, pamqp.exceptions.PAMQPException, TimeoutError) as exc:
            raise TransportUnavailable(f"AMQP publish: {exc}") from exc
