"""Conformance canaries for what the receiver's transports assume of the installed libraries
(STYLE §12): aiomqtt keeps its paho client at ``_client`` and paho offers manual PUBACKs;
aio-pika exposes the aiormq channel and its consumer-cancel callbacks; asyncpg's pool types."""

from __future__ import annotations

import inspect

import aio_pika
import aiomqtt
import aiormq
import asyncpg
import asyncpg.pool
import paho.mqtt.client as paho


async def test_aiomqtt_wraps_a_paho_client_with_manual_ack() -> None:
    client = aiomqtt.Client("127.0.0.1", 1, identifier="canary", protocol=aiomqtt.ProtocolVersion.V5)
    inner = client._client
    assert isinstance(inner, paho.Client)
    assert list(inspect.signature(inner.manual_ack_set).parameters) == ["on"]
    assert list(inspect.signature(inner.ack).parameters) == ["mid", "qos"]
    inner.manual_ack_set(on=True)
    assert inner._manual_ack is True


def test_aio_pika_channel_exposes_consumer_cancel_callbacks() -> None:
    assert hasattr(aio_pika.abc.AbstractChannel, "get_underlay_channel")
    assert "on_consumer_cancel_callbacks" in inspect.getsource(aiormq.Channel.__init__)
    assert "multiple" in inspect.signature(aio_pika.IncomingMessage.ack).parameters


def test_asyncpg_pool_types() -> None:
    assert hasattr(asyncpg.pool, "PoolConnectionProxy")
    assert "min_size" in inspect.signature(asyncpg.create_pool).parameters
