"""The central side: ``lockgw-receiver``, the reference receiver (docs/fleet.md). It consumes
events from the broker (MQTT 5 shared subscription or RabbitMQ over AMQP), stores each exactly
once in PostgreSQL, and only then sends the gateway its receipt. It imports ``protocols`` and
the shared modules at the top of ``gateway`` (wire, log, errors, backoff, tasks) — never the
gateway's runtime, BLE, store, authz or CLI — and nothing of the gateway imports it.
"""

__all__: list[str] = []
