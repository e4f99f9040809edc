from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from broker import Broker
from hypothesis import HealthCheck, settings
from rabbit import RabbitCluster

# Speed belongs in bench/: no per-example deadline (CI shares two cores with simulators and
# brokers), and no health check that fails a test for being slow to generate.
settings.register_profile("lockgw", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("lockgw")


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(Path(tmp_path_factory.mktemp("mosquitto")))
    b.start()
    yield b
    b.stop()


@pytest.fixture
def live_broker(broker: Broker) -> Broker:
    """The session broker, restarted first if a previous test killed it."""
    if broker.proc is None or broker.proc.poll() is not None:
        broker.start()
    return broker


@pytest.fixture(scope="session")
def rabbit1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    """A private single RabbitMQ node with the MQTT plugin (tests/rabbit.py), once per session."""
    with RabbitCluster(Path(tmp_path_factory.mktemp("rabbit1")), nodes=1) as rc:
        yield rc


@pytest.fixture(scope="session")
def rabbit3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    """A private 3-node RabbitMQ cluster (tests/rabbit.py), once per session (~20 s to form)."""
    with RabbitCluster(Path(tmp_path_factory.mktemp("rabbit3")), nodes=3) as rc:
        yield rc
