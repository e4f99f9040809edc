"""Chunked staging on the running daemon: `lockgw firmware apply` stages a 200 KiB signed image
through the control socket (resuming from the gateway's offset) and rolls it out to a lock of a
`lockgw-sim` process with SMP (`--firmware-key`); attacks on ``firmware_stage`` over MQTT (a real
mosquitto) and over the control socket, each answered with its code, the door still opening."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from broker import Broker
from clifix import make_field, start_daemon
from credfix import SITE
from daemonfix import BASE, GW, Site
from fwfix import FirmwareKey, firmware_keyring, shared_firmware_key, signed_image, signed_manifest

from gateway.firmware.staging import MAX_STAGED
from gateway.runtime.control import call
from protocols.cose import PrivateCoseKey

pytestmark = [pytest.mark.ble, pytest.mark.slow]
CHUNK = 32 * 1024


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


@pytest.fixture(scope="module")
def fw_site(
    tmp_path_factory: pytest.TempPathFactory, broker: Broker
) -> Iterator[tuple[Site, FirmwareKey, PrivateCoseKey]]:
    if broker.proc is None or broker.proc.poll() is not None:
        broker.start()
    tmp = tmp_path_factory.mktemp("fwstage")
    key, cose = shared_firmware_key()
    key.imgtool_key.export_public(str(tmp / "boot.pem"))  # the simulated bootloader's key
    f = make_field(
        tmp,
        gw=GW,
        seed=83,
        extra_config=f'[mqtt]\nurl = "{broker.url}"\nbase_topic = "{BASE}"\n',
        sim_args=("--firmware-key", str(tmp / "boot.pem")),
    )
    try:
        now = int(time.time())
        (tmp / "keyring.cose").write_bytes(  # make_field's keyring, plus the firmware key
            firmware_keyring(
                f.w.root, f.w.issuer_a.public, cose.public, site=SITE, now=now, version=1, iat_ago=10
            )
        )
        f.run("trust", "install", str(tmp / "keyring.cose"))
        ids = [f.run("pair", lk["address"], "--code", lk["setup_code"]).stdout.strip() for lk in f.locks]
        daemon = start_daemon(f)
        site = Site(f, daemon, broker, ids, tmp / "data" / "events.sqlite3")
        try:
            yield site, key, cose
            assert daemon.stop() == 0, daemon.output()
            assert "Traceback" not in daemon.output()
        finally:
            with contextlib.suppress(Exception):
                daemon.stop()
    finally:
        f.sim.terminate()
        f.sim.communicate(timeout=10)


async def _unlock_over_mqtt(site: Site) -> None:
    c = await site.session()
    try:
        answer = await site.unlock(c, site.locks[0])
        assert answer["status"] == "ok", answer
    finally:
        await c.__aexit__(None, None, None)


def test_cli_stages_a_200_kib_image_resuming_and_rolls_it_out(
    fw_site: tuple[Site, FirmwareKey, PrivateCoseKey],
) -> None:
    site, key, cose = fw_site
    f, lock = site.field, site.locks[0]
    image = signed_image(key, "1.1.0", security_counter=2, size=200 * 1024)
    (f.tmp / "app.bin").write_bytes(image)
    (f.tmp / "manifest.cose").write_bytes(signed_manifest(cose, image, [lock], site=SITE))
    # An earlier command was interrupted after two chunks (sent here through the socket).
    sha = hashlib.sha256(image).hexdigest()
    for off in (0, CHUNK):
        payload = {"sha256": sha, "size": len(image), "offset": off, "data": b64(image[off : off + CHUNK])}
        answer = asyncio.run(
            call(site.daemon.control, "request", {"action": "firmware_stage", "payload": payload})
        )
        assert answer["ok"] is True, answer
    out = f.run("firmware", "apply", str(f.tmp / "manifest.cose"), str(f.tmp / "app.bin"), "--wait")
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("staging ")]
    # Not a terminal: plain lines, the first where the gateway stood (the rest only was sent).
    assert lines[0].endswith(f": {2 * CHUNK}/{len(image)} bytes"), out.stderr
    assert lines[-1].endswith(f": {len(image)}/{len(image)} bytes"), out.stderr
    assert len(lines) == -(-(len(image) - 2 * CHUNK) // CHUNK) + 1, out.stderr
    status = json.loads(f.run("--json", "firmware", "status").stdout)
    [rollout] = status["rollouts"]
    assert rollout["state"] == "done" and rollout["locks"][0]["state"] == "confirmed", rollout
    [view] = [v for v in json.loads(f.run("--json", "locks").stdout)["locks"] if v["lock"] == lock]
    assert view["firmware"] == "sim-1.1.0"
    assert not list((f.tmp / "data" / "firmware" / "staging").iterdir())  # removed once applied
    asyncio.run(_unlock_over_mqtt(site))


def _cases(sha: str, size: int, first: bytes) -> list[tuple[str, bytes, str]]:
    good = {"sha256": sha, "size": size, "offset": 0, "data": b64(first)}

    def j(**over: Any) -> bytes:
        return json.dumps({**good, **over}).encode()

    return [
        ("wrong offset", j(offset=2 * CHUNK), "stage_offset"),
        ("overlap with other bytes", j(data=b64(bytes(len(first)))), "stage_conflict"),
        ("over size", j(offset=size - 10, data=b64(bytes(20))), "stage_overrun"),
        ("size over the bound", j(size=2 * 1024 * 1024), "stage_too_large"),
        ("bad base64", j(data="no*base64"), "invalid_request"),
        ("chunk over 32 KiB", j(data=b64(os.urandom(CHUNK + 1))), "invalid_request"),
        ("non-hex sha", j(sha256="g" * 64), "invalid_request"),
        ("huge int", j(size=10**40), "invalid_request"),
        ("negative offset", j(offset=-5), "invalid_request"),
        ("lone surrogate", j(sha256="\udc00" * 64), "invalid_request"),
        ("lone surrogate in data", j(data="\ud800AAA"), "invalid_request"),
        ("not JSON", b'{"sha256": ', "invalid_request"),
    ]


async def _mqtt_answers(site: Site, cases: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    c = await site.session()
    try:
        return [await site.request(c, "firmware_stage", payload) for _name, payload in cases]
    finally:
        await c.__aexit__(None, None, None)


async def _socket_answers(site: Site, cases: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    """Each case as the payload of a control ``request`` line (a raw line: lone surrogates and
    broken JSON go over the socket as they are)."""
    answers = []
    for _name, payload in cases:
        reader, writer = await asyncio.open_unix_connection(str(site.daemon.control))
        try:
            writer.write(
                b'{"cmd": "request", "args": {"action": "firmware_stage", "payload": ' + payload + b"}}\n"
            )
            await writer.drain()
            answers.append(json.loads(await asyncio.wait_for(reader.readline(), 20)))
        finally:
            writer.close()
    return answers


def test_attacks_on_firmware_stage_over_mqtt_and_the_control_socket(
    fw_site: tuple[Site, FirmwareKey, PrivateCoseKey],
) -> None:
    site, key, _cose = fw_site
    image = signed_image(key, "1.2.0", security_counter=3, size=100 * 1024)
    sha = hashlib.sha256(image).hexdigest()
    first = image[:CHUNK]
    start = [
        (
            "first chunk",
            json.dumps({"sha256": sha, "size": len(image), "offset": 0, "data": b64(first)}).encode(),
        )
    ]
    [ok] = asyncio.run(_mqtt_answers(site, start))
    assert ok["status"] == "ok" and ok["data"]["offset"] == CHUNK, ok
    cases = _cases(sha, len(image), first)
    # A mismatch at completion: another image's bytes under a SHA-256 that is not theirs.
    fake = os.urandom(4000)
    cases.append(
        (
            "sha mismatch at completion",
            json.dumps({"sha256": "ab" * 32, "size": len(fake), "offset": 0, "data": b64(fake)}).encode(),
            "stage_hash_mismatch",
        )
    )
    over_mqtt = asyncio.run(_mqtt_answers(site, [(n, p) for n, p, _c in cases]))
    for (name, _p, code), answer in zip(cases, over_mqtt, strict=True):
        assert answer["status"] == "error" and answer["error"]["code"] == code, (name, answer)
    over_socket = asyncio.run(_socket_answers(site, [(n, p) for n, p, _c in cases]))
    for (name, _p, code), answer in zip(cases, over_socket, strict=True):
        # A line that is no valid JSON text at all (lone surrogates, cut off) is refused by the
        # socket itself, before any command: usage error, exit 2.
        malformed = answer.get("exit") == 2 and "malformed control request" in str(answer.get("error"))
        assert answer["ok"] is False, (name, answer)
        assert answer.get("code") == code or (code == "invalid_request" and malformed), (name, answer)
    # Too many staged at once: three more starts fill the bound, the next is refused.
    starts = [
        (
            f"start {n}",
            json.dumps({"sha256": f"{n:064x}", "size": 50000, "offset": 0, "data": b64(b"x" * 100)}).encode(),
        )
        for n in range(1, MAX_STAGED + 1)
    ]
    filled = asyncio.run(_mqtt_answers(site, starts))
    assert [a["status"] for a in filled[:-1]] == ["ok"] * (MAX_STAGED - 1), filled
    assert filled[-1]["error"]["code"] == "stage_full", filled[-1]
    [full] = asyncio.run(_socket_answers(site, starts[-1:]))
    assert full["code"] == "stage_full", full
    # The staging of the first image still stands where it was; doors still open.
    [probe] = asyncio.run(
        _mqtt_answers(
            site,
            [("probe", json.dumps({"sha256": sha, "size": len(image), "offset": 0, "data": ""}).encode())],
        )
    )
    assert probe["data"]["offset"] == CHUNK, probe
    assert site.alive(), site.daemon.output()
    asyncio.run(_unlock_over_mqtt(site))
    site.check_store()
