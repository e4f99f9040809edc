"""Round-4 attacks on chunked firmware staging (docs/threat-model.md FW10–FW12): ``lockgw firmware
stage`` against a control socket that lies about the gateway's offset; files planted in
``DATA/firmware/staging`` (a symlink, a FIFO, a directory) by whatever else writes there; staged
files whose mtimes lie in the future (a clock set back). The staging runs on a real directory."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from clifix import Field, start_daemon
from fwfix import shared_firmware_key, signed_image
from test_firmware_staging import b64, firmware_rig

from gateway.firmware.staging import MAX_STAGED, STALE_S, Staging, StagingError
from gateway.runtime.control import call

CHUNK = 32 * 1024
EXE = [sys.executable, "-m", "gateway.cli.main"]

#: A lie per case: the offset the "daemon" answers, from the offset and length of the chunk sent.
LIES: dict[str, Callable[[int, int], object]] = {
    "stuck-at-zero": lambda _off, _n: 0,
    "beyond-the-image": lambda _off, _n: 10**6,
    "negative": lambda _off, _n: -5,
    "one-byte-at-a-time": lambda off, _n: off + 1,
    "not-a-number": lambda _off, _n: "twelve",
    "a-bool": lambda _off, _n: True,
}


async def _lying_daemon(path: Path, lie: Callable[[int, int], object], seen: list[int]) -> asyncio.Server:
    """A control socket that takes every ``firmware_stage`` chunk and answers ``ok`` with an
    offset of its own (never ``complete``)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while line := await reader.readline():
                payload = json.loads(line)["args"]["payload"]
                data = base64.urlsafe_b64decode(payload["data"] + "=" * (-len(payload["data"]) % 4))
                seen.append(len(data))
                staged = {"sha256": payload["sha256"], "size": payload["size"], "complete": False}
                inner = {**staged, "offset": lie(payload["offset"], len(data))}
                answer = {"ok": True, "exit": 0, "data": {"status": "ok", "data": inner}}
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        writer.close()

    return await asyncio.start_unix_server(serve, path=str(path), limit=1 << 20)


@pytest.mark.parametrize("lie", sorted(LIES))
async def test_the_cli_stops_with_the_reason_when_the_daemon_lies_about_the_offset(
    tmp_path: Path, lie: str
) -> None:
    image = os.urandom(100 * 1024)
    (tmp_path / "app.bin").write_bytes(image)
    cfg = tmp_path / "lockgw.toml"
    cfg.write_text(
        f'[gateway]\nid = "gw-lie"\nsite = "site-lie"\ndata_dir = "{tmp_path / "data"}"\n'
        f'[control]\nsocket = "{tmp_path / "ctl.sock"}"\n'
    )
    seen: list[int] = []
    server = await _lying_daemon(tmp_path / "ctl.sock", LIES[lie], seen)
    async with server:
        proc = await asyncio.create_subprocess_exec(
            *EXE,
            "--config",
            str(cfg),
            "firmware",
            "stage",
            str(tmp_path / "app.bin"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    stderr = err.decode()
    assert proc.returncode == 1, (proc.returncode, out, stderr[-2000:], len(seen))
    assert "Traceback" not in stderr, stderr
    assert "offset" in stderr, stderr  # the reason names what the daemon said
    # Bounded: never more requests than an honest staging of the image would take.
    assert len(seen) <= -(-len(image) // CHUNK) + 1, len(seen)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def _unblocked(fifo: Path, work: asyncio.Future[bytes]) -> None:
    """If a read of ``fifo`` hangs (the attack worked), give it an end of file so the test fails
    instead of hanging its worker thread for ever."""
    done, _ = await asyncio.wait({work}, timeout=5)
    if done:
        return
    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    with contextlib.suppress(Exception):
        await work
    pytest.fail(f"reading {fifo.name} hung the staging")


async def test_entries_planted_in_the_staging_dir_are_never_followed_nor_block_it(tmp_path: Path) -> None:
    key, _ = shared_firmware_key()
    image = signed_image(key, "1.1.0", security_counter=2, size=40 * 1024)
    sha, root = _sha(image), tmp_path / "firmware" / "staging"
    victim = tmp_path / "events.sqlite3"  # a file the staging must never write to
    victim.write_bytes(b"acknowledged events")
    async with Staging(root) as staging:
        # A symlink where the part would be: the chunk is not written through it.
        link = root / f"{sha}.{len(image)}.part"
        link.symlink_to(victim)
        # A sender asks where the staging stands and sends from there (as lockgw firmware does).
        with pytest.raises(StagingError) as refused:
            at = (await staging.stage(sha, len(image), 0, b"")).offset
            await staging.stage(sha, len(image), at, image[at : at + CHUNK])
        assert refused.value.code == "stage_io" and "not a regular file" in str(refused.value)
        assert victim.read_bytes() == b"acknowledged events"
        link.unlink()
        # A symlink, a FIFO and a directory where complete images would be: clear refusals,
        # never a read of another file or a read that hangs.
        others = [signed_image(key, f"1.{n}.0", security_counter=2, size=2000) for n in (2, 3, 4)]
        (root / f"{_sha(others[0])}.img").symlink_to(victim)
        fifo = root / f"{_sha(others[1])}.img"
        os.mkfifo(fifo)
        (root / f"{_sha(others[2])}.img").mkdir()
        for other in others:
            read = asyncio.ensure_future(staging.image(_sha(other)))
            if _sha(other) in fifo.name:
                await _unblocked(fifo, read)
            with pytest.raises(StagingError) as refused:
                await read
            assert refused.value.code == "stage_io", (other, refused.value)
            with pytest.raises(StagingError) as refused:
                await staging.stage(_sha(other), len(other), 0, other)
            assert refused.value.code == "stage_io", (other, refused.value)
        assert victim.read_bytes() == b"acknowledged events"
        # Planted entries fill no slot and are never "evicted" (unlinking a directory failed,
        # refusing every new image): all MAX_STAGED images still stage, then the bound holds.
        for n in range(MAX_STAGED):
            (root / f"{n:064x}.{n + 1}.part").mkdir()
        fresh = [signed_image(key, f"2.{n}.0", security_counter=2, size=3000) for n in range(MAX_STAGED + 1)]
        for img in fresh[:MAX_STAGED]:
            assert (await staging.stage(_sha(img), len(img), 0, img)).complete
            assert await staging.image(_sha(img)) == img
        with pytest.raises(StagingError) as refused:
            await staging.stage(_sha(fresh[-1]), len(fresh[-1]), 0, fresh[-1])
        assert refused.value.code == "stage_full"


async def test_staged_files_stamped_in_the_future_do_not_block_staging_for_ever(tmp_path: Path) -> None:
    key, _ = shared_firmware_key()
    now = [time.time()]
    async with Staging(tmp_path / "staging", clock=lambda: now[0]) as staging:
        images = [signed_image(key, f"1.{n}.0", security_counter=2, size=3000) for n in range(MAX_STAGED + 1)]
        for img in images[:MAX_STAGED]:  # four abandoned parts, staged while the clock ran a year ahead
            assert not (await staging.stage(_sha(img), len(img), 0, img[:1000])).complete
        ahead = now[0] + 365 * 86400
        for part in staging.root.iterdir():
            os.utime(part, (ahead, ahead))
        # The clock is right again, an hour later: the year-old-in-the-future parts are idle.
        now[0] += 3600
        done = await staging.stage(_sha(images[-1]), len(images[-1]), 0, images[-1])
        assert done.complete
        assert len(list(staging.root.glob("*.part"))) == MAX_STAGED - 1  # one made room
        # A part stamped now is still never evicted before STALE_S.
        now[0] += STALE_S / 2
        fresh = sorted(staging.root.glob("*.part"))
        for part in fresh:
            os.utime(part, (now[0], now[0]))
        late = signed_image(key, "3.0.0", security_counter=2, size=3000)
        os.utime(staging.root / f"{_sha(images[-1])}.img", (now[0], now[0]))
        with pytest.raises(StagingError) as refused:
            await staging.stage(_sha(late), len(late), 0, late)
        assert refused.value.code == "stage_full"
        assert sorted(staging.root.glob("*.part")) == fresh


@pytest.mark.ble  # the service rig: simulated locks over Bumble
async def test_base64url_with_padding_inside_is_refused_not_cut_short(tmp_path: Path) -> None:
    """``=`` inside the data (or more of it than the length needs) was skipped by the lenient
    decoder: ``XX==`` + 32 KiB was taken as one byte, appended, and answered ``ok``."""
    async with firmware_rig(tmp_path) as f:
        image = signed_image(f.key, "1.1.0", security_counter=2, size=40 * 1024)
        body = {"sha256": _sha(image), "size": len(image), "offset": 0}
        for data in (
            b64(image[:1]) + "==" + b64(image[1 : CHUNK - CHUNK % 3 + 1]),  # one byte, the rest lost
            b64(image[:3]) + "=" + b64(image[3:CHUNK]),
            b64(image[:3]) + "====",
            "=" + b64(image[:CHUNK]),
        ):
            answer = await f.ask("firmware_stage", {**body, "data": data})
            assert answer["status"] == "error" and answer["error"]["code"] == "invalid_request", (
                data[:8],
                answer,
            )
        probe = await f.ask("firmware_stage", {**body, "data": ""})
        assert probe["data"]["offset"] == 0, probe  # nothing was staged
        # Padded and unpadded base64url are both still taken.
        padded = base64.urlsafe_b64encode(image[: CHUNK - 1]).decode()
        assert padded.endswith("=")
        assert (await f.ask("firmware_stage", {**body, "data": padded}))["data"]["offset"] == CHUNK - 1
        await f.unlocks()


@pytest.mark.ble
@pytest.mark.slow
def test_the_daemon_opens_doors_when_the_staging_directory_cannot_be_made(field: Field) -> None:
    """``DATA/firmware/staging`` that cannot be made (here a file where its parent would be; a
    full disk at the first start after the upgrade, a read-only or foreign-owned directory alike)
    stopped the daemon from starting at all: no door opened, for want of an optional feature."""
    f = field
    f.run("trust", "install", str(f.tmp / "keyring.cose"))
    lock = f.run("pair", f.locks[0]["address"], "--code", f.locks[0]["setup_code"]).stdout.strip()
    assert [p.name for p in (f.tmp / "data" / "firmware").iterdir()] == ["staging"]  # empty
    shutil.rmtree(f.tmp / "data" / "firmware")
    (f.tmp / "data" / "firmware").write_bytes(b"not a directory")
    daemon = start_daemon(f)
    try:
        assert f.act("unlock", lock).returncode == 0
        payload = {"sha256": _sha(b"abc"), "size": 3, "offset": 0, "data": b64(b"abc")}
        answer = asyncio.run(
            call(daemon.control, "request", {"action": "firmware_stage", "payload": payload})
        )
        assert answer["ok"] is False and answer["code"] == "stage_io", answer
        assert "staging directory" in str(answer["error"]), answer
        # Once the directory can be made, staging works without a restart.
        (f.tmp / "data" / "firmware").unlink()
        answer = asyncio.run(
            call(daemon.control, "request", {"action": "firmware_stage", "payload": payload})
        )
        assert answer["ok"] is False and answer["code"] == "stage_bad_image", answer  # staged, then checked
        assert f.act("lock", lock).returncode == 0
    finally:
        assert daemon.stop() == 0, daemon.output()
    assert "Traceback" not in daemon.output(), daemon.output()
