"""Chunked image staging (``firmware_stage``) through the service's action table, the entry point
of MQTT's ``B/G/request/<action>`` (``Service.handle``, bytes in) and of the control socket's
``request``: a 200 KiB signed image staged in 32 KiB chunks and rolled out to a simulated lock
(Bumble, SMP, MCUboot with imgtool's verifier); interrupted staging resumed from the answered
offset; every attack answered with its code while the gateway keeps opening doors."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from credfix import SITE, T0
from fwfix import FirmwareKey, firmware_keyring, shared_firmware_key, signed_image, signed_manifest
from test_service import Rig, build_rig

from firmware_sim.smp_gatt import SmpService, imgtool_verifier
from gateway.firmware.rollout import Rollouts
from gateway.firmware.staging import MAX_STAGED, STALE_S, Staging
from gateway.firmware.store import FirmwareStore
from protocols.cose import PrivateCoseKey

pytestmark = pytest.mark.ble
CHUNK = 32 * 1024


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


@dataclass
class FwRig:
    rig: Rig
    staging: Staging
    rollouts: Rollouts
    smp: SmpService
    key: FirmwareKey
    cose: PrivateCoseKey
    lock: str
    clock: list[float]

    async def ask(self, action: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.rig.svc.handle(action, json.dumps(body).encode())

    async def stage(self, image: bytes, offset: int, data: bytes, **over: Any) -> dict[str, Any]:
        body = {"sha256": hashlib.sha256(image).hexdigest(), "size": len(image), "offset": offset}
        return await self.ask("firmware_stage", {**body, "data": b64(data), **over})

    async def stage_all(self, image: bytes, start: int = 0) -> dict[str, Any]:
        answer: dict[str, Any] = {}
        for off in range(start, len(image), CHUNK):
            answer = await self.stage(image, off, image[off : off + CHUNK])
            assert answer["status"] == "ok", answer
        return answer

    async def unlocks(self) -> None:
        """The gateway still opens the door (and locks it again)."""
        assert (await self.rig.unlock(self.lock))["status"] == "ok"
        assert (await self.rig.unlock(self.lock, act="lock"))["status"] == "ok"


@contextlib.asynccontextmanager
async def firmware_rig(tmp_path: Path) -> AsyncIterator[FwRig]:
    key, cose = shared_firmware_key()
    async with build_rig(tmp_path, locks=1) as rig:
        svc, lock = rig.svc, rig.locks[0].model.lock_id
        smp = rig.radio.enable_firmware(lock, imgtool_verifier([key.imgtool_key]))
        ring = firmware_keyring(
            rig.w.root, rig.w.issuer_a.public, cose.public, site=SITE, now=T0, version=2, iat_ago=3600
        )
        assert svc.authz.install(ring).installed
        clock = [time.time()]  # the staging's idle clock, against the files' mtimes
        async with (
            FirmwareStore(tmp_path / "firmware.sqlite3") as store,
            Staging(tmp_path / "firmware" / "staging", clock=lambda: clock[0]) as staging,
            Rollouts(
                store,
                svc.links,
                site=SITE,
                lookup=svc.registry.get,
                keys=lambda: svc.authz.core.firmware_keys(int(rig.clock.wall())),
                emit=svc.event,
                clock=rig.clock.wall,
                on_firmware=svc.firmware_changed,
            ) as rollouts,
        ):
            svc.firmware, svc.staging = rollouts, staging
            yield FwRig(rig, staging, rollouts, smp, key, cose, lock, clock)


async def test_a_200_kib_image_staged_in_chunks_rolls_out(tmp_path: Path) -> None:
    async with firmware_rig(tmp_path) as f:
        image = signed_image(f.key, "1.1.0", security_counter=2, size=200 * 1024)
        assert len(image) > 200 * 1024
        sha = hashlib.sha256(image).hexdigest()
        answers = [await f.stage(image, off, image[off : off + CHUNK]) for off in range(0, len(image), CHUNK)]
        assert [a["data"]["offset"] for a in answers] == [
            min(o + CHUNK, len(image)) for o in range(0, len(image), CHUNK)
        ]
        assert [a["data"]["complete"] for a in answers] == [False] * (len(answers) - 1) + [True]
        assert answers[-1]["data"] == {
            "sha256": sha,
            "offset": len(image),
            "size": len(image),
            "complete": True,
        }
        # The last chunk again (its answer was lost): the same answer, nothing changes.
        again = await f.stage(image, len(image) - len(image) % CHUNK, image[-(len(image) % CHUNK) :])
        assert again["data"] == answers[-1]["data"]
        manifest = signed_manifest(f.cose, image, [f.lock], site=SITE, nbf=T0 - 60, exp=T0 + 86400)
        applied = await f.ask("firmware_apply", {"manifest": b64(manifest), "image_sha256": sha})
        assert applied["status"] == "ok" and applied["data"]["rings"] == [[f.lock]], applied
        assert list(f.staging.root.iterdir()) == []  # the rollout keeps its own copy
        await f.unlocks()  # while the upload runs
        await asyncio.wait_for(f.rollouts.wait("ro-1"), 180)
        [rollout] = (await f.ask("firmware_status", {}))["data"]["rollouts"]
        assert rollout["state"] == "done" and rollout["locks"][0]["state"] == "confirmed", rollout
        assert f.smp.boot.primary.data == image and f.smp.boot.confirmed
        # Applied once: the staged image is gone, a second apply of it says so.
        again = await f.ask("firmware_apply", {"manifest": b64(manifest), "image_sha256": sha})
        assert again["error"]["code"] == "not_staged", again
        await f.unlocks()


async def test_interrupted_staging_resumes_from_the_answered_offset(tmp_path: Path) -> None:
    async with firmware_rig(tmp_path) as f:
        image = signed_image(f.key, "1.1.0", security_counter=2, size=150 * 1024)
        for off in range(0, 3 * CHUNK, CHUNK):
            assert (await f.stage(image, off, image[off : off + CHUNK]))["status"] == "ok"
        # The sender died; a kill -9 of the gateway mid-append left part of the next chunk.
        [part] = f.staging.root.glob("*.part")
        with part.open("ab") as out:
            out.write(image[3 * CHUNK : 3 * CHUNK + 1000])
        async with Staging(f.staging.root) as again:  # a restarted gateway over the same directory
            f.rig.svc.staging = again
            await resume(f, image, again)


async def resume(f: FwRig, image: bytes, again: Staging) -> None:
    sha = hashlib.sha256(image).hexdigest()
    probe = await f.stage(image, 0, b"")
    assert probe["data"] == {"sha256": sha, "offset": 3 * CHUNK + 1000, "size": len(image), "complete": False}
    # A sender that resumes at its own idea of the offset (past the gateway's) is told where.
    ahead = await f.stage(image, 4 * CHUNK, image[4 * CHUNK : 5 * CHUNK])
    assert ahead["error"]["code"] == "stage_offset"
    assert f"resume at offset {3 * CHUNK + 1000}" in ahead["error"]["message"]
    # Resending the whole chunk the kill cut: its first 1000 bytes match, the rest is appended.
    resumed = await f.stage(image, 3 * CHUNK, image[3 * CHUNK : 4 * CHUNK])
    assert resumed["data"]["offset"] == 4 * CHUNK
    done = await f.stage_all(image, 4 * CHUNK)
    assert done["data"]["complete"] is True
    assert (f.staging.root / f"{sha}.img").read_bytes() == image
    assert await again.image(sha) == image


async def test_attacks_on_firmware_stage_get_codes_and_doors_keep_opening(tmp_path: Path) -> None:
    async with firmware_rig(tmp_path) as f:
        image = signed_image(f.key, "1.1.0", security_counter=2, size=80 * 1024)
        sha = hashlib.sha256(image).hexdigest()
        good = {"sha256": sha, "size": len(image), "offset": 0, "data": b64(image[:CHUNK])}

        async def code(body: dict[str, Any] | bytes, action: str = "firmware_stage") -> str:
            if isinstance(body, bytes):
                answer = await f.rig.svc.handle(action, body)
            else:
                answer = await f.ask(action, body)
            assert answer["status"] == "error", answer
            return str(answer["error"]["code"])

        assert (await f.ask("firmware_stage", good))["data"]["offset"] == CHUNK
        # Wrong offset: ahead of the gateway's, or not at the start of a new image.
        assert (
            await code({**good, "offset": 2 * CHUNK, "data": b64(image[2 * CHUNK : 3 * CHUNK])})
            == "stage_offset"
        )
        other = signed_image(f.key, "1.2.0", security_counter=2, size=5000)
        osha = hashlib.sha256(other).hexdigest()
        assert (
            await code({"sha256": osha, "size": len(other), "offset": 100, "data": b64(other[100:200])})
            == "stage_offset"
        )
        # Overlap with other bytes than those staged (the same offset, or straddling).
        assert await code({**good, "data": b64(bytes(CHUNK))}) == "stage_conflict"
        assert await code({**good, "offset": CHUNK - 10, "data": b64(bytes(20))}) == "stage_conflict"
        # Over the declared size; a size over the bound; the same image with another size.
        assert await code(
            {**good, "offset": CHUNK, "size": CHUNK + 5, "data": b64(image[CHUNK : 2 * CHUNK])}
        ) in {
            "stage_overrun",
            "stage_size",
        }
        assert await code({**good, "offset": len(image) - 10, "data": b64(bytes(20))}) == "stage_overrun"
        assert await code({**good, "size": 2 * 1024 * 1024}) == "stage_too_large"
        assert await code({**good, "size": len(image) + 1}) == "stage_size"
        # Bad base64; a chunk over 32 KiB; non-hex, short or upper-case SHA-256.
        assert await code({**good, "data": "not base64!"}) == "invalid_request"
        assert await code({**good, "data": b64(image[: CHUNK + 3])}) == "invalid_request"
        for bad_sha in ("zz" * 32, sha[:40], sha.upper(), 7, None):
            assert await code({**good, "sha256": bad_sha}) == "invalid_request", bad_sha
        # Huge, negative, fractional and boolean numbers.
        for field, value in (
            ("size", 10**30),
            ("offset", -1),
            ("offset", 2**63),
            ("size", 1.5),
            ("size", True),
        ):
            assert await code({**good, field: value}) == "invalid_request", (field, value)
        # Lone surrogates, as JSON escapes in the SHA and in the data.
        assert await code(json.dumps({**good, "sha256": "\ud800" * 64}).encode()) == "invalid_request"
        assert await code(json.dumps({**good, "data": "AAAA\udfff"}).encode()) == "invalid_request"
        # SHA-256 mismatch at completion: the bytes of another image under this name.
        fake = os.urandom(len(other))
        assert (
            await code({"sha256": osha, "size": len(fake), "offset": 0, "data": b64(fake)})
            == "stage_hash_mismatch"
        )
        assert not list(f.staging.root.glob(f"{osha}.*"))  # discarded
        # The right SHA-256, but not an MCUboot image.
        junk = os.urandom(3000)
        jsha = hashlib.sha256(junk).hexdigest()
        assert (
            await code({"sha256": jsha, "size": len(junk), "offset": 0, "data": b64(junk)})
            == "stage_bad_image"
        )
        assert not list(f.staging.root.glob(f"{jsha}.*"))
        # Applying an image not (completely) staged; both image forms at once; neither.
        manifest = b64(signed_manifest(f.cose, image, [f.lock], site=SITE, nbf=T0 - 60, exp=T0 + 86400))
        assert await code({"manifest": manifest, "image_sha256": sha}, "firmware_apply") == "not_staged"
        assert (
            await code({"manifest": manifest, "image_sha256": sha, "image": b64(image)}, "firmware_apply")
            == "invalid_request"
        )
        assert await code({"manifest": manifest}, "firmware_apply") == "invalid_request"
        await f.unlocks()
        # Too many staged at once: the bound holds while they are fresh ...
        starts = [
            signed_image(f.key, f"1.{n}.0", security_counter=2, size=40 * 1024)
            for n in range(3, 3 + MAX_STAGED)
        ]
        for img in starts[:-1]:
            assert (await f.stage(img, 0, img[:CHUNK]))["status"] == "ok"
        assert len(list(f.staging.root.iterdir())) == MAX_STAGED
        assert (
            await code(
                {
                    "sha256": hashlib.sha256(starts[-1]).hexdigest(),
                    "size": len(starts[-1]),
                    "offset": 0,
                    "data": b64(starts[-1][:CHUNK]),
                }
            )
            == "stage_full"
        )
        # ... and once one has been idle long enough, the oldest incomplete one makes room.
        f.clock[0] += STALE_S + 1
        assert (await f.stage(starts[-1], 0, starts[-1][:CHUNK]))["status"] == "ok"
        assert not list(f.staging.root.glob(f"{sha}.*"))  # the first, oldest, was dropped
        assert len(list(f.staging.root.iterdir())) == MAX_STAGED
        # The staging of the others goes on where it stood.
        assert (await f.stage(starts[0], 0, b""))["data"]["offset"] == CHUNK
        await f.unlocks()
