"""Canaries: what our backends assume of the installed bleak, bumble and aiomqtt (no mocks)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import tomllib
from importlib.metadata import version
from pathlib import Path

import aiomqtt
import bleak.exc
import pytest
from bleak import BleakClient
from bleak.backends.client import BaseBleakClient
from bleak.backends.scanner import BaseBleakScanner
from bumble.controller import Controller
from bumble.host import Host
from bumble.link import LocalLink

from firmware_sim.bumble_peripheral import SimRadio
from gateway.ble.bumble_backend import BumbleBleakClient, BumbleBleakScanner, BumbleHost
from gateway.ble.lock_client import LockClient
from gateway.errors import LockUnreachable
from protocols.gatt import RX_CHAR_UUID, TX_CHAR_UUID

ROOT = Path(__file__).resolve().parent.parent


def test_bumble_is_pinned_exactly_and_installed_at_the_pin() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(d for d in deps if d.startswith("bumble"))
    assert pin.split("#")[0].strip().startswith("bumble=="), "bumble must be pinned exactly (pre-1.0)"
    assert version("bumble") == pin.split("==")[1].split()[0].strip()


def test_our_backends_implement_every_abstract_member() -> None:
    for ours, base in ((BumbleBleakClient, BaseBleakClient), (BumbleBleakScanner, BaseBleakScanner)):
        abstract = {name for name, v in vars(base).items() if getattr(v, "__isabstractmethod__", False)}
        assert abstract, "bleak's base class lost its abstract members: re-check the backend"
        missing = {name for name in abstract if name not in _defined_below(ours, base)}
        assert not missing
        assert not inspect.isabstract(ours)


def _defined_below(cls: type, base: type) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is base:
            break
        names |= set(vars(klass))
    return names


def test_write_gatt_char_signature_is_what_we_implement() -> None:
    params = list(inspect.signature(BaseBleakClient.write_gatt_char).parameters)
    assert params == ["self", "characteristic", "data", "response"]
    assert list(inspect.signature(BumbleBleakClient.write_gatt_char).parameters) == params


def test_error_classes_we_map_to_exist() -> None:
    assert issubclass(bleak.exc.BleakGATTProtocolError, bleak.exc.BleakError)
    assert issubclass(aiomqtt.MqttError, Exception)
    assert "clean_start" in inspect.signature(aiomqtt.Client).parameters


@pytest.mark.ble
async def test_bumble_backend_behaves_as_bleak_expects() -> None:
    async with SimRadio() as radio:
        (sim,) = await radio.add_locks(1, seed=3)
        async with BumbleHost(controller=radio.open_gateway_controller(), mtu=185) as host:
            disconnected = asyncio.Event()
            client = BleakClient(
                str(sim.address),
                disconnected_callback=lambda _c: disconnected.set(),
                backend=host.client_backend(),
                timeout=5,
            )
            await client.connect()
            assert client.is_connected
            assert client.mtu_size == 185  # MTU exchange happened during connect
            rx = client.services.get_characteristic(RX_CHAR_UUID)  # services resolved on connect
            tx = client.services.get_characteristic(TX_CHAR_UUID)
            assert rx is not None and "write" in rx.properties
            assert tx is not None and "notify" in tx.properties
            assert tx.max_write_without_response_size == 182
            await radio.apply_fault(sim.model.lock_id, "drop")  # remote disconnect
            await asyncio.wait_for(disconnected.wait(), 5)
            assert not client.is_connected
            with pytest.raises(bleak.exc.BleakError):
                await client.write_gatt_char(rx, b"x", response=True)


@pytest.mark.ble
async def test_connect_to_an_absent_address_is_lock_unreachable() -> None:
    async with SimRadio() as radio, BumbleHost(controller=radio.open_gateway_controller()) as host:
        with pytest.raises(LockUnreachable):
            async with LockClient(
                "C1:22:33:44:55:66", gw_id="gw-x", backend=host.client_backend(), connect_timeout_s=0.5
            ):
                pass


#: Bumble code we re-implement or work around, fingerprinted: a new Bumble release that changes
#: any of it fails here, so the override is reviewed (gateway/ble/bumble_backend.py _GatewayHost,
#: firmware_sim/bumble_peripheral.py GatewayController and SimAir).
BUMBLE_FINGERPRINTS = {
    "Host.send_hci_packet": "c466fa2806dd157f",
    "Host.on_hci_packet": "8a97cd66d5162d55",
    "Host._send_command": "d339d25e05e09273",
    "Controller.on_hci_le_create_connection_cancel_command": "7e2c09af5423fc97",
    "LocalLink.send_advertising_pdu": "e0dfbdb65d461454",
}


def test_bumble_code_we_override_is_unchanged() -> None:
    owners = {"Host": Host, "Controller": Controller, "LocalLink": LocalLink}
    for name, expected in BUMBLE_FINGERPRINTS.items():
        cls, _, attr = name.partition(".")
        source = inspect.getsource(getattr(owners[cls], attr))
        assert hashlib.sha256(source.encode()).hexdigest()[:16] == expected, f"{name} changed in Bumble"


async def test_a_cancelled_hci_command_does_not_steal_the_next_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Cancelling a caller mid-command must not free Bumble's one command slot early (the late
    answer would be taken for the next command's: a mismatch warning, then InvalidStateError)."""
    caplog.set_level(logging.WARNING)
    async with SimRadio() as radio, BumbleHost(controller=radio.open_gateway_controller()) as host:
        device = host.device
        for _ in range(20):
            start = asyncio.ensure_future(device.start_scanning(filter_duplicates=False))
            await asyncio.sleep(0)
            start.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await start
            await device.stop_scanning()
        assert not device.is_scanning
    complaints = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING]
    assert complaints == []
