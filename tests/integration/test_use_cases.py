"""The typed use cases (issue 11): pairing lives in the service once, the control commands call
the service's methods, and the MQTT adapter answers through the same methods."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from credfix import SITE, T0

from firmware_sim.bumble_peripheral import SimLock, SimRadio
from gateway.authz.clock import ManualClock
from gateway.ble.bumble_backend import BumbleHost
from gateway.cli.commands import dispatch
from gateway.config import load_config
from gateway.runtime.app import Gateway
from gateway.runtime.service import ACTIONS, Service

pytestmark = pytest.mark.ble


@contextlib.asynccontextmanager
async def direct_gateway(
    tmp_path: Path, *, locks: int = 1
) -> AsyncIterator[tuple[Gateway, SimRadio, list[SimLock]]]:
    """A gateway as a direct CLI command runs it (no daemon), over simulated unpaired locks."""
    cfg = tmp_path / "lockgw.toml"
    cfg.write_text(
        f'[gateway]\nid = "gw-uc"\nsite = "{SITE}"\ndata_dir = "{tmp_path}"\n'
        f'[control]\nsocket = "{tmp_path}/ctl.sock"\n'
    )
    clock = ManualClock(T0)
    async with SimRadio(clock=clock.wall) as radio:
        sims = await radio.add_locks(locks, seed=5)
        async with (
            BumbleHost(controller=radio.open_gateway_controller()) as host,
            Gateway(
                load_config(cfg, env={}), clock=clock, ble_backend=host.client_backend(), direct=True
            ) as gw,
        ):
            yield gw, radio, sims


async def _pair(gw: Gateway, sim: SimLock, name: str = "") -> dict[str, Any]:
    return await dispatch(
        gw, "pair", {"address": str(sim.address), "code": sim.model.setup_code, "name": name}
    )


async def test_a_lock_unpaired_and_paired_again_answers_status(tmp_path: Path) -> None:
    """Found while moving pairing into the service: unpair dropped the lock's view but not when
    it was last refreshed, so a status within 2 s of pairing it again was an internal_error."""
    async with direct_gateway(tmp_path) as (gw, radio, (sim,)):
        lock = sim.model.lock_id
        assert (await _pair(gw, sim))["ok"]
        assert (await dispatch(gw, "status", {"lock": lock}))["ok"]
        unpaired = await dispatch(gw, "unpair", {"lock": lock})
        assert unpaired == {"ok": True, "exit": 0, "data": {"lock": lock, "wiped_on_lock": True}}
        await radio.apply_fault(lock, "pairing_mode")  # the technician presses its button
        again = await _pair(gw, sim, "Back door")
        assert again["ok"], again
        status = await dispatch(gw, "status", {"lock": lock})
        assert status["ok"], status
        assert status["data"]["name"] == "Back door" and status["data"]["available"] is True


async def test_pairing_is_one_use_case_recorded_and_announced(tmp_path: Path) -> None:
    """Service.pair is the one copy (the demo's copy recorded no name and re-published no
    info): the record, ``lock.paired`` with the address and the name, the info re-published;
    Service.unpair undoes it, recorded and announced too."""
    async with direct_gateway(tmp_path) as (gw, _radio, (sim,)):
        announced: list[str] = []
        gw.service.on_info_changed = lambda: announced.append("info")
        record = await gw.service.pair(str(sim.address), sim.model.setup_code, "Front")
        assert (record.lock, record.address, record.name) == (sim.model.lock_id, str(sim.address), "Front")
        assert gw.service.is_paired(record.lock) and announced == ["info"]
        assert [v.as_json()["name"] for v in await gw.service.locks()] == ["Front"]
        assert await gw.service.unpair(record.lock) is True  # wiped on the lock itself
        assert not gw.service.is_paired(record.lock) and announced == ["info", "info"]
        assert await gw.service.locks() == []
        events, _next = await gw.service.history(1, limit=100, type_glob="lock.*")
        assert [(e["type"], e["data"]) for e in events] == [
            ("lock.paired", {"address": str(sim.address), "name": "Front"}),
            ("lock.unpaired", {"forced": False, "wiped_on_lock": True}),
        ]


async def test_the_control_commands_keep_their_answers_and_exit_codes(tmp_path: Path) -> None:
    """CONTRACT §6 shapes through the typed use cases: an unknown lock is a usage error (2)
    with its code, a malformed lock id a refusal (1), a request answered as MQTT answers it."""
    async with direct_gateway(tmp_path) as (gw, _radio, (sim,)):
        unknown = await dispatch(gw, "status", {"lock": "lk-nope"})
        assert (unknown["ok"], unknown["exit"], unknown["code"]) == (False, 2, "unknown_lock")
        malformed = await dispatch(gw, "status", {"lock": 17})
        assert (malformed["exit"], malformed["code"]) == (1, "invalid_request")
        gone = await dispatch(gw, "unpair", {"lock": "lk-nope"})
        assert gone == {
            "ok": False,
            "exit": 2,
            "error": "lock lk-nope is not paired with this gateway",
            "code": "unknown_lock",
        }
        assert (await _pair(gw, sim, "Front"))["data"]["name"] == "Front"
        challenged = await dispatch(
            gw,
            "request",
            {"action": "challenge", "payload": {"lock": sim.model.lock_id, "transaction": "t9"}},
        )
        assert challenged["ok"] and challenged["data"]["transaction"] == "t9"
        assert set(challenged["data"]["data"]) == {"nonce", "expires_in", "gw"}
        nothing = await dispatch(gw, "request", {"action": "open_sesame", "payload": {}})
        assert (nothing["exit"], nothing["code"]) == (2, "unknown_action")
        listed = await dispatch(gw, "locks", {})
        assert [v["name"] for v in listed["data"]["locks"]] == ["Front"]


async def test_mqtt_and_the_control_socket_answer_through_one_action_table(tmp_path: Path) -> None:
    """The same request, as MQTT bytes (handle) and as a parsed value (answer), gets the same
    answer; every action of the contract has a row in the table."""
    async with direct_gateway(tmp_path) as (gw, _radio, (sim,)):
        await gw.service.pair(str(sim.address), sim.model.setup_code)
        svc = gw.service
        for action, value in [
            ("locks", {"transaction": "a"}),
            ("replay", {"from_seq": 1, "transaction": "b"}),
            ("replay", {"from_seq": 0}),
            ("status", {"lock": "lk-nope"}),
            ("unlock", {"lock": sim.model.lock_id, "token": "!!"}),
            ("nope", {}),
        ]:
            assert await svc.handle(action, json.dumps(value).encode()) == await svc.answer(action, value)
        assert set(Service._ROUTES) == ACTIONS
