"""The firmware actions through the service's action table (MQTT's B/G/request/<action> and the
control socket's request): refusals with codes and events, a rollout recorded in the outbox in
the contract's event shape, and the lock state's firmware field following."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest
from credfix import SITE, T0
from fwfix import firmware_keyring, shared_firmware_key, signed_image, signed_manifest
from test_service import build_rig

from firmware_sim.smp_gatt import imgtool_verifier
from gateway.firmware.rollout import Rollouts
from gateway.firmware.store import FirmwareStore

pytestmark = pytest.mark.ble


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


async def test_firmware_actions(tmp_path: Path) -> None:
    key, cose = shared_firmware_key()
    async with build_rig(tmp_path, locks=1) as rig:
        svc, lock = rig.svc, rig.locks[0].model.lock_id

        async def ask(action: str, body: dict) -> dict:
            return await svc.handle(action, json.dumps(body).encode())

        assert (await ask("firmware_status", {}))["error"]["code"] == "unavailable"
        rig.radio.enable_firmware(lock, imgtool_verifier([key.imgtool_key]))
        async with (
            FirmwareStore(tmp_path / "firmware.sqlite3") as store,
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
            svc.firmware = rollouts
            image = signed_image(key, "1.1.0", security_counter=2)
            manifest = signed_manifest(cose, image, [lock], site=SITE, nbf=T0 - 60, exp=T0 + 86400)
            # The installed keyring names no firmware key yet: refused, before any radio work.
            answer = await ask("firmware_apply", {"manifest": b64(manifest), "image": b64(image)})
            assert answer["status"] == "error" and answer["error"]["code"] == "firmware_refused"
            assert "firmware role" in answer["error"]["message"]
            ring = firmware_keyring(
                rig.w.root, rig.w.issuer_a.public, cose.public, site=SITE, now=T0, version=2, iat_ago=3600
            )
            assert svc.authz.install(ring).installed
            bad = await ask("firmware_apply", {"manifest": "not base64!", "image": b64(image)})
            assert bad["error"]["code"] == "invalid_request"
            tampered = image[:64] + bytes([image[64] ^ 1]) + image[65:]
            answer = await ask("firmware_apply", {"manifest": b64(manifest), "image": b64(tampered)})
            assert answer["error"]["code"] == "firmware_refused"
            answer = await ask("firmware_apply", {"manifest": b64(manifest), "image": b64(image)})
            assert answer["status"] == "ok" and answer["data"]["rings"] == [[lock]], answer
            await asyncio.wait_for(rollouts.wait("ro-1"), 60)
            status = await ask("firmware_status", {})
            [rollout] = status["data"]["rollouts"]
            [row] = rollout["locks"]
            assert rollout["state"] == "done" and row["state"] == "confirmed", row
            assert svc.views[lock].firmware == "sim-1.1.0"  # the lock state followed
        events = await rig.events()
        fw = [e for e in events if e["type"].startswith("firmware.")]
        refused = [e for e in fw if e["type"] == "firmware.refused"]
        assert [e["reason"] for e in refused] == ["unknown_key", "image_mismatch"]  # bad base64 is no event
        confirmed = next(e for e in fw if e["type"] == "firmware.confirmed")
        assert confirmed["lock"] == lock and confirmed["data"] == {"rollout": "ro-1", "version": "1.1.0"}
        assert {"time_state", "trust_state", "seq", "hash"} <= set(confirmed)
