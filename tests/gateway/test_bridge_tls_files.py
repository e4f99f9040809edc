"""Attacks on the bridge's TLS files (round 2, 2026-12-01): each test here failed before its fix."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from broker import drain_only_bridge

from gateway.config import MqttConfig
from gateway.errors import ConfigError
from gateway.store.outbox import Outbox


def _client_in_thread(cfg: MqttConfig, tmp_path: Path) -> BaseException | None:
    """Build the bridge's MQTT client in a daemon thread, so a hang fails the test (the
    thread is left behind) instead of hanging the run."""
    outcome: list[BaseException | None] = []
    bridge = drain_only_bridge(cfg.url, Outbox.__new__(Outbox), gw_id="gw-1", site="s-1")
    bridge.cfg = cfg

    def build() -> None:
        try:
            bridge._make_client()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=build, daemon=True)
    t.start()
    t.join(30)  # generous: the read is of a few bytes
    assert not t.is_alive(), "building the MQTT client hung on a TLS file (the event loop would too)"
    return outcome[0]


@pytest.mark.parametrize("key", ["ca_file", "cert_file"])
def test_a_fifo_as_a_tls_file_is_a_clear_error_not_a_hung_daemon(tmp_path: Path, key: str) -> None:
    fifo = tmp_path / "tls.pem"
    os.mkfifo(fifo)
    cfg = MqttConfig(url="mqtts://127.0.0.1:8883", **{key: fifo})
    exc = _client_in_thread(cfg, tmp_path)
    assert isinstance(exc, ConfigError)
    assert "not a regular file" in str(exc)


def test_dev_zero_as_a_ca_file_is_a_clear_error(tmp_path: Path) -> None:
    cfg = MqttConfig(url="mqtts://127.0.0.1:8883", ca_file=Path("/dev/zero"))
    exc = _client_in_thread(cfg, tmp_path)
    assert isinstance(exc, ConfigError)
