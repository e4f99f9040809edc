"""The site broker as shipped (config/mosquitto-bridge.conf + config/lockgw.acl, docs/bridge.md):
two real mosquitto instances on loopback — "central" and the site broker running the shipped
file, rendered with test addresses, ports, paths and names only (every rule is the shipped one)
— with TLS on the phones' listener and on the bridge, and a real `lockgw run` daemon that logs
in with a password handed over as a systemd credential.

Checked: nobody is anonymous; a phone's request stays on the site while central's request comes
down and its answer goes up; every event made while the bridge is cut arrives at central after
it is restored, in order, and receipts published at central reach the gateway; when the site
broker dies, central sees the bridge's will ("0" on B/G/bridge) within the keepalive."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import ipaddress
import json
import os
import re
import signal
import sqlite3
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from broker import free_port, mosquitto_binary
from clifix import Daemon, Field, make_field, start_daemon
from credfix import SITE
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from protocols import issuer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_CONF = ROOT / "config" / "mosquitto-bridge.conf"
SHIPPED_ACL = ROOT / "config" / "lockgw.acl"
GW = "gw-bridge-1"
BASE = "lockgw"
PHONE = "phone-17"
WRONG_PASSWORD = "wrong"
#: Bounds every wait (a hang guard on a loaded machine, not a speed requirement).
WITHIN_S = 60.0


# --- a throwaway PKI -------------------------------------------------------------------------


@dataclass
class Ca:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    path: Path


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)
    return path


def make_ca(tmp: Path, name: str) -> Ca:
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
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    path = tmp / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Ca(key, cert, path)


def issue(tmp: Path, ca: Ca, cn: str, *, server: bool) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
    cert = builder.sign(ca.key, hashes.SHA256())
    cert_path = tmp / f"{cn}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, _write_key(key, tmp / f"{cn}.key")


# --- the two brokers -------------------------------------------------------------------------


def _mosquitto(conf: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    exe = mosquitto_binary()
    assert exe is not None, "mosquitto is not installed; ./dev.sh test installs it"
    with log.open("ab") as out:
        proc = subprocess.Popen([exe, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + WITHIN_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"mosquitto refused {conf.name} ({proc.returncode}):\n{log.read_text()}")
        with contextlib.suppress(OSError), socket_to(port):
            return proc
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"mosquitto did not listen on {port}:\n{log.read_text()}")
        time.sleep(0.05)


@contextlib.contextmanager
def socket_to(port: int) -> Iterator[None]:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=2):
        yield


def render_site_conf(tmp: Path, *, local: int, lan: int, uplink: int, certs: dict[str, Path]) -> str:
    """The shipped file with test addresses, ports, paths and names; nothing else changes."""
    text = SHIPPED_CONF.read_text()
    subs = [
        ("listener 1883 127.0.0.1", f"listener {local} 127.0.0.1"),
        ("listener 8883 192.168.1.10", f"listener {lan} 127.0.0.1"),
        ("address central.example.org:8883", f"address 127.0.0.1:{uplink}"),
        ("/etc/mosquitto/lockgw.passwd", str(tmp / "lockgw.passwd")),
        ("/etc/mosquitto/lockgw.acl", str(tmp / "lockgw.acl")),
        ("gw-sandviken-1", GW),
        ("bergen-sandviken", SITE),
    ]
    subs += [(f"/etc/mosquitto/certs/{name}", str(path)) for name, path in certs.items()]
    for old, new in subs:
        assert old in text, old
        text = text.replace(old, new)
    assert "/etc/" not in re.sub(r"#.*", "", text), "a shipped path was not rendered"
    (tmp / "lockgw.acl").write_text(
        SHIPPED_ACL.read_text().replace("gw-sandviken-1", GW).replace("bergen-sandviken", SITE)
    )
    # Debian's mosquitto.conf (which includes conf.d/) sets these; as root, mosquitto would drop
    # to its own user, who cannot read pytest's 0700 directories.
    head = "persistence false\n" + ("user root\n" if os.geteuid() == 0 else "")
    return head + text


def rules(text: str) -> list[str]:
    """The lines that decide who may do what and what crosses the bridge."""
    keep = (
        "topic ",
        "pattern ",
        "allow_anonymous",
        "require_certificate",
        "use_identity_as_username",
        "per_listener_settings",
        "notification",
        "cleansession",
        "bridge_protocol_version",
        "keepalive_interval",
    )
    return [line.strip() for line in text.splitlines() if line.strip().startswith(keep)]


class CutProxy:
    """TCP between the bridge and central that can be cut (every connection closed, new ones
    refused) and restored: the uplink going down and coming back, TLS passing through."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self.up = True
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        self.up = False
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        self.up = True

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if not self.up:
            w.transport.abort()
            return
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            w.transport.abort()
            return
        self._writers |= {w, uw}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(r, uw), pipe(ur, w))
        self._writers -= {w, uw}


@dataclass
class Sites:
    tmp: Path
    central_plain: int
    lan: int
    local: int
    keepalive: int
    site_ca: Path
    phone_cert: tuple[Path, Path]
    proxy: CutProxy
    central: subprocess.Popen[bytes]
    site: subprocess.Popen[bytes]
    site_log: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def observer(self) -> aiomqtt.Client:
        """A consumer at central (the test's own plain listener there)."""
        return aiomqtt.Client(
            "127.0.0.1",
            self.central_plain,
            protocol=aiomqtt.ProtocolVersion.V5,
            identifier=f"central-{time.monotonic_ns()}",
        )

    def phone(self, *, cert: bool = True) -> aiomqtt.Client:
        ctx = ssl.create_default_context(cafile=str(self.site_ca))
        if cert:
            ctx.load_cert_chain(str(self.phone_cert[0]), str(self.phone_cert[1]))
        return aiomqtt.Client(
            "127.0.0.1",
            self.lan,
            protocol=aiomqtt.ProtocolVersion.V5,
            tls_context=ctx,
            identifier=f"{PHONE}-{time.monotonic_ns()}",
            # without a certificate TLS 1.3 completes and the broker then drops the connection:
            # the client learns it waiting for CONNACK
            timeout=10 if cert else 3,
        )


@pytest.fixture
async def sites(tmp_path: Path) -> AsyncIterator[Sites]:
    pki = tmp_path / "pki"
    pki.mkdir()
    central_ca, site_ca = make_ca(pki, "central-ca"), make_ca(pki, "phones-ca")
    central_srv = issue(pki, central_ca, "central", server=True)
    uplink = issue(pki, central_ca, f"bridge-{GW}", server=False)
    gateway_srv = issue(pki, site_ca, "gateway", server=True)
    phone = issue(pki, site_ca, PHONE, server=False)

    # central: a TLS listener for bridges (client certificates), a plain one for the test's consumer
    tls_port, plain_port = free_port(), free_port()
    central_conf = tmp_path / "central.conf"
    central_conf.write_text(
        "per_listener_settings true\npersistence false\n"
        + ("user root\n" if os.geteuid() == 0 else "")
        + f"listener {tls_port} 127.0.0.1\nallow_anonymous false\ncafile {central_ca.path}\n"
        f"certfile {central_srv[0]}\nkeyfile {central_srv[1]}\nrequire_certificate true\nuse_identity_as_username true\n"
        f"listener {plain_port} 127.0.0.1\nallow_anonymous true\n"
    )
    procs: list[subprocess.Popen[bytes]] = []
    proxy = CutProxy(tls_port)
    try:
        procs.append(_mosquitto(central_conf, tls_port, tmp_path / "central.log"))
        await proxy.start()
        yield await _site(
            tmp_path,
            proxy,
            procs,
            plain_port=plain_port,
            site_ca=site_ca,
            central_ca=central_ca.path,
            gateway_srv=gateway_srv,
            uplink=uplink,
            phone=phone,
        )
    finally:
        await proxy.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)


async def _site(
    tmp_path: Path,
    proxy: CutProxy,
    procs: list[subprocess.Popen[bytes]],
    *,
    plain_port: int,
    site_ca: Ca,
    central_ca: Path,
    gateway_srv: tuple[Path, Path],
    uplink: tuple[Path, Path],
    phone: tuple[Path, Path],
) -> Sites:

    local, lan = free_port(), free_port()
    site_conf = tmp_path / "site.conf"
    text = render_site_conf(
        tmp_path,
        local=local,
        lan=lan,
        uplink=proxy.port,
        certs={
            "gateway.pem": gateway_srv[0],
            "gateway.key": gateway_srv[1],
            "phones-ca.pem": site_ca.path,
            "central-ca.pem": central_ca,
            "gateway-uplink.pem": uplink[0],
            "gateway-uplink.key": uplink[1],
        },
    )
    shipped = SHIPPED_CONF.read_text().replace("gw-sandviken-1", GW).replace("bergen-sandviken", SITE)
    assert rules(text) == rules(shipped)  # the rules under test are the shipped ones
    site_conf.write_text(text)
    passwd = ["mosquitto_passwd", "-b", "-c", str(tmp_path / "lockgw.passwd"), GW, "gw-secret"]
    await asyncio.to_thread(subprocess.run, passwd, check=True, timeout=30)
    keepalive = int(re.search(r"^keepalive_interval (\d+)", text, re.MULTILINE).group(1))  # type: ignore[union-attr]
    site = _mosquitto(site_conf, local, tmp_path / "site.log")
    procs.append(site)
    return Sites(
        tmp_path,
        plain_port,
        lan,
        local,
        keepalive,
        site_ca.path,
        phone,
        proxy,
        procs[0],
        site,
        tmp_path / "site.log",
    )


async def _until(c: aiomqtt.Client, pred: Any, what: str, within: float = WITHIN_S) -> aiomqtt.Message:
    try:
        async with asyncio.timeout(within):
            async for m in c.messages:
                if pred(m):
                    return m
    except TimeoutError:
        pass
    raise AssertionError(f"central never saw {what} within {within} s")


async def test_nobody_is_anonymous_on_either_listener(sites: Sites) -> None:
    with pytest.raises(aiomqtt.MqttCodeError, match=r"(?i)not authori[sz]ed|135|bad user"):
        async with aiomqtt.Client(
            "127.0.0.1", sites.local, protocol=aiomqtt.ProtocolVersion.V5, identifier="anon"
        ):
            pass
    with pytest.raises(aiomqtt.MqttCodeError, match=r"(?i)not authori[sz]ed|135|bad user"):
        async with aiomqtt.Client(
            "127.0.0.1",
            sites.local,
            protocol=aiomqtt.ProtocolVersion.V5,
            identifier="guess",
            username=GW,
            password=WRONG_PASSWORD,
        ):
            pass
    with pytest.raises(aiomqtt.MqttError):  # TLS without a phone certificate: the handshake fails
        async with sites.phone(cert=False):
            pass
    async with sites.phone():  # with one it is in
        pass


@pytest.mark.parametrize(
    "how",
    [
        "kill",
        pytest.param(
            "power-cut",
            marks=pytest.mark.skipif(
                not os.environ.get("LOCKGW_BRIDGE_POWER_CUT"),
                reason="waits 1.5 keepalives (22.5 s): LOCKGW_BRIDGE_POWER_CUT=1 runs it",
            ),
        ),
    ],
)
async def test_site_going_dark_shows_at_central_within_the_keepalive(sites: Sites, how: str) -> None:
    """``kill``: the site broker dies, its sockets close, central notices at once. ``power-cut``:
    the site broker freezes (SIGSTOP) with its connection open and silent, as when the power or
    the uplink goes: only the keepalive tells central (MQTT §3.1.2.10: 1.5 × keepalive)."""
    topic = f"{BASE}/{GW}/bridge"
    async with sites.observer() as c:
        await c.subscribe(topic, qos=1)
        await _until(c, lambda m: str(m.topic) == topic and m.payload == b"1", "the bridge up (1)")
        sites.site.send_signal(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        # a bound on the protocol's own timer, with room for a loaded machine (not a speed claim)
        m = await _until(
            c, lambda m: str(m.topic) == topic, "the bridge's will (0)", within=1.5 * sites.keepalive + 30
        )
        assert m.payload == b"0"
    async with sites.observer() as late:  # retained: whoever looks later sees the site dark
        await late.subscribe(topic, qos=1)
        m = await _until(late, lambda m: str(m.topic) == topic, "the retained 0")
        assert m.payload == b"0"


# --- the whole site: a real daemon behind the shipped broker ---------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def _ask(c: aiomqtt.Client, action: str, body: dict[str, Any], reply_to: str) -> dict[str, Any]:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    corr = f"c{time.monotonic_ns()}".encode()
    props.ResponseTopic, props.CorrelationData = reply_to, corr
    await c.publish(f"{BASE}/{GW}/request/{action}", json.dumps(body).encode(), qos=1, properties=props)
    async with asyncio.timeout(WITHIN_S):
        async for m in c.messages:
            if str(m.topic) == reply_to and getattr(m.properties, "CorrelationData", None) == corr:
                answer = json.loads(m.payload)
                assert isinstance(answer, dict)
                return answer
    raise AssertionError(f"no answer to {action}")


async def _phone_unlock(f: Field, c: aiomqtt.Client, lock: str) -> None:
    reply = f"{BASE}/{GW}/response/phone/{PHONE}/r"
    ch = await _ask(c, "challenge", {"lock": lock, "act": "unlock"}, reply)
    assert ch["status"] == "ok", ch
    nonce = base64.urlsafe_b64decode(ch["data"]["nonce"] + "==")
    token = f.w.token(locks=[lock], iat=int(time.time()) - 30)
    proof = issuer.proof(f.w.holder, token_bytes=token, nonce=nonce, gw=GW, lock=lock, act="unlock")
    answer = await _ask(c, "unlock", {"lock": lock, "token": _b64(token), "proof": _b64(proof)}, reply)
    assert answer["status"] == "ok", answer


def _store(db: Path) -> tuple[str, list[int], int]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        epoch = con.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()[0]
        seqs = [r[0] for r in con.execute("SELECT seq FROM events ORDER BY seq")]
        receipt = int(con.execute("SELECT value FROM meta WHERE key = 'receipt_seq'").fetchone()[0])
    finally:
        con.close()
    return str(epoch), seqs, receipt


@pytest.fixture
def site_daemon(sites: Sites, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Field, Daemon]]:
    creds = sites.tmp / "credentials"
    creds.mkdir()
    (creds / "mqtt.password").write_text("gw-secret\n")
    (creds / "mqtt.password").chmod(0o400)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))  # as LoadCredential= hands it over
    work = sites.tmp / "gw"
    work.mkdir()
    f = make_field(
        work,
        gw=GW,
        extra_config=f'[mqtt]\nurl = "mqtt://127.0.0.1:{sites.local}"\nbase_topic = "{BASE}"\n'
        f'username = "{GW}"\npassword_file = "mqtt.password"\n',
    )
    try:
        f.run("trust", "install", str(work / "keyring.cose"))
        first = f.locks[0]  # one paired lock is enough here
        f.locks = [
            {**first, "id": f.run("pair", first["address"], "--code", first["setup_code"]).stdout.strip()}
        ]
        daemon = start_daemon(f)
        try:
            yield f, daemon
        finally:
            daemon.stop()
    finally:
        f.sim.terminate()
        f.sim.communicate(timeout=10)


class Central:
    """Everything central's consumer receives, collected by one reader task."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.got: list[aiomqtt.Message] = []
        self._n = 0

    async def read(self) -> None:
        async for m in self.client.messages:
            self.got.append(m)

    async def wait(self, what: str, pred: Any, within: float = WITHIN_S) -> aiomqtt.Message:
        deadline = time.monotonic() + within
        while True:
            for m in self.got:
                if pred(m):
                    return m
            assert time.monotonic() < deadline, f"central never saw {what} within {within} s"
            await asyncio.sleep(0.05)

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(m.payload) for m in self.got if str(m.topic) == f"{BASE}/{GW}/events"]

    async def ask(self, action: str, body: dict[str, Any]) -> dict[str, Any]:
        """A request from central with its own response topic (docs/bridge.md)."""
        self._n += 1
        reply, corr = f"{BASE}/{GW}/response/central/r{self._n}", f"central-{self._n}".encode()
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic, props.CorrelationData = reply, corr
        await self.client.publish(
            f"{BASE}/{GW}/request/{action}", json.dumps(body).encode(), qos=1, properties=props
        )
        m = await self.wait(
            f"the answer to {action}",
            lambda m: str(m.topic) == reply and getattr(m.properties, "CorrelationData", None) == corr,
        )
        answer = json.loads(m.payload)
        assert isinstance(answer, dict)
        return answer


async def test_events_cross_a_cut_bridge_in_order_receipts_come_back_requests_stay_local(
    sites: Sites, site_daemon: tuple[Field, Daemon]
) -> None:
    f, daemon = site_daemon
    db = f.tmp / "data" / "events.sqlite3"
    lock = f.locks[0]["id"]

    async with sites.observer() as client, sites.phone() as phone, asyncio.TaskGroup() as tg:
        central = Central(client)
        await client.subscribe(f"{BASE}/#", qos=1)
        await phone.subscribe(f"{BASE}/{GW}/response/phone/{PHONE}/#", qos=1)
        reader = tg.create_task(central.read())
        try:
            await central.wait(
                "the gateway online through the bridge",
                lambda m: (
                    str(m.topic) == f"{BASE}/{GW}/availability"
                    and json.loads(m.payload) == {"state": "online"}
                ),
            )
            # central's request comes down; the answer to its own response topic goes up
            answer = await central.ask("locks", {"transaction": "central-locks"})
            assert answer["status"] == "ok" and answer["transaction"] == "central-locks"

            async def receipted(seq: int) -> None:
                deadline = time.monotonic() + WITHIN_S
                while _store(db)[2] < seq:
                    assert time.monotonic() < deadline, f"no receipt #{seq}:\n{daemon.output()[-3000:]}"
                    assert daemon.proc.poll() is None, daemon.output()[-3000:]
                    await asyncio.sleep(0.1)

            def bridge_ups() -> int:
                return sum(str(m.topic) == f"{BASE}/{GW}/bridge" and m.payload == b"1" for m in central.got)

            # a phone's unlock at the site (tokens and proofs in the requests); its events go up
            # and central's receipt for them comes down
            await _phone_unlock(f, phone, lock)
            epoch, seqs, _ = _store(db)
            await central.wait(
                f"event #{seqs[-1]}", lambda _m: any(e["seq"] == seqs[-1] for e in central.events())
            )
            before_cut = seqs[-1]
            await client.publish(
                f"{BASE}/{GW}/receipt", json.dumps({"epoch": epoch, "seq": before_cut}), qos=1
            )
            await receipted(before_cut)

            # the uplink goes down; doors keep opening and events keep being made
            ups = bridge_ups()
            sites.proxy.cut()
            for _ in range(3):
                await _phone_unlock(f, phone, lock)
            _, seqs, receipt = _store(db)
            assert seqs[-1] >= before_cut + 3 and receipt == before_cut
            sites.proxy.restore()
            last = seqs[-1]
            await central.wait(
                f"event #{last} after the bridge came back",
                lambda _m: any(e["seq"] == last for e in central.events()),
            )

            # every event, in order (at least once: repeats allowed, gaps and reordering not)
            first: list[int] = []
            for e in central.events():
                assert e["epoch"] == epoch and e["gw"] == GW
                if e["seq"] not in first:
                    first.append(e["seq"])
            assert first == list(range(first[0], last + 1)), first

            # the bridge said it is back (B/G/bridge = 1 again): central's receipt reaches the gateway
            await central.wait("the bridge back up (1)", lambda _m: bridge_ups() > ups)
            await client.publish(f"{BASE}/{GW}/receipt", json.dumps({"epoch": epoch, "seq": last}), qos=1)
            await receipted(last)

            # a phone's request at the site, then central's: central's answer passes the bridge
            # after the phone's request would have, had it been forwarded
            await phone.publish(f"{BASE}/{GW}/request/locks", b'{"transaction": "phone-locks"}', qos=1)
            assert (await central.ask("locks", {"transaction": "central-after"}))["status"] == "ok"
        finally:
            reader.cancel()

    requests_at_central = [m for m in central.got if "/request/" in str(m.topic)]
    assert requests_at_central, "central's own requests echo back to it"
    # only central's own requests: no phone request, token or proof ever crossed the bridge
    foreign = [
        m.payload for m in requests_at_central if not m.payload.startswith(b'{"transaction": "central-')
    ]
    assert not foreign, f"requests from the site reached central: {foreign[:3]}"
    assert not [m for m in central.got if b'"token"' in m.payload or "/response/phone/" in str(m.topic)]
    # answers to requests that named no central response topic stay on the site too
    assert not [m for m in central.got if re.fullmatch(rf"{BASE}/{GW}/response/[^/]+", str(m.topic))]
