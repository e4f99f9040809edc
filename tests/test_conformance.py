"""Canaries: what our backends assume of the installed bleak, bumble and aiomqtt (no mocks)."""

from __future__ import annotations

import asyncio
import inspect
import tomllib
from importlib.metadata import version
from pathlib import Path

import aiomqtt
import bleak.exc
import pytest
from bleak import BleakClient
from bleak.backends.client import BaseBleakClient
from bleak.backends.scanner import BaseBleakScanner

from firmware_sim.bumble_peripheral import SimRadio
from gateway.ble.bumble_backend import BumbleBleakClient, BumbleBleakScanner, BumbleHost
from gateway.ble.link import LockClient
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
