"""THREATS B5: mqtts:// to a broker whose certificate does not chain to the configured CA is
refused; events stay queued and doors keep opening; with the right CA it connects and drains."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
from pathlib import Path

import pytest
from broker import Broker
from credfix import SITE, T0, World
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.authz.clock import ManualClock
from gateway.config import load_config
from gateway.runtime.app import Gateway

pytestmark = [
    pytest.mark.slow,
    # paho leaves the socket of a failed TLS handshake to the garbage collector, which closes
    # it (no descriptor leaks) but warns; that is the failure this test provokes on purpose.
    pytest.mark.filterwarnings("ignore:unclosed <ssl.SSLSocket:ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def make_ca(tmp: Path, name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = tmp / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, path


def make_server(tmp: Path, ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "broker")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "server.pem", tmp / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o644)  # a throwaway test key; mosquitto drops root to its own user and must read it
    return cert_path, key_path


async def test_B5_wrong_ca_is_refused_events_stay_queued_right_ca_drains(tmp_path: Path) -> None:
    ca_key, ca, ca_path = make_ca(tmp_path, "central-ca")
    _, _, wrong_ca = make_ca(tmp_path, "someone-else")
    broker = Broker(tmp_path, tls=make_server(tmp_path, ca_key, ca))
    broker.start()
    w = World()
    try:
        for ca_file, should_connect in ((wrong_ca, False), (ca_path, True)):
            data = tmp_path / "data"
            cfg = tmp_path / "lockgw.toml"
            cfg.write_text(
                f'[gateway]\nid = "gw-tls"\nsite = "{SITE}"\ndata_dir = "{data}"\n[control]\nsocket = "{data}/ctl.sock"\n'
                f'[mqtt]\nurl = "{broker.url}"\nca_file = "{ca_file}"\n'
            )
            gw = Gateway(
                load_config(cfg, env={}), clock=ManualClock(T0), housekeeping_s=3600, heartbeat_s=0.5
            )
            async with gw:
                await gw.service.install(w.keyring())  # an event while (maybe) disconnected
                assert gw.mqtt is not None
                if should_connect:
                    await asyncio.wait_for(gw.mqtt.connected.wait(), 15)
                    await asyncio.wait_for(gw.mqtt.wait_drained(gw.outbox.stats().last_seq), 15)
                else:
                    async with asyncio.timeout(15):  # until a connection attempt has failed
                        while gw.mqtt.last_error is None:  # noqa: ASYNC110 - no event for a failure
                            await asyncio.sleep(0.05)
                    assert not gw.mqtt.connected.is_set() and gw.mqtt.connects == 0
                    assert (
                        "CERTIFICATE_VERIFY_FAILED" in (gw.mqtt.last_error or "")
                        or "certificate" in (gw.mqtt.last_error or "").lower()
                    )
                    assert gw.outbox.stats().backlog == gw.outbox.stats().last_seq  # all queued
                    assert "mqtt_disconnected" in gw.alarms()
    finally:
        broker.stop()
