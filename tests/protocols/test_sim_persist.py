"""The simulated lock's persistence: a pure model, a state file written before any answer.

THREATS D9 (the file is replaced atomically: short writes continued, a failed write leaves the
old file and no temp file, fsync of the file then of the directory) and D11 (a lock never
answers about an actuation, a pairing or a log entry it has not written: the gateway's
exactly-once log forwarding across kill -9 relies on the lock's own log being durable).
"""

from __future__ import annotations

import ast
import errno
import json
import os
from pathlib import Path

import pytest
from helpers import SeededRng

import firmware_sim.lock_model
from firmware_sim.lock_model import LockModel
from firmware_sim.memory_link import MemoryLink
from firmware_sim.peripheral import LinkDriver
from firmware_sim.persist import LockStore, write_atomic
from protocols.framing import fragment
from protocols.messages import LockState, LogKind, Op, Request, Status
from protocols.session import (
    Event,
    GatewayConnection,
    PairingCompleted,
    ResponseReceived,
    SessionEstablished,
)

NOW = 1_700_000_000.0
GW = "gw-persist-1"
CODE = "123-456-789"


def eio(_fd: int) -> None:
    raise OSError(errno.EIO, "Input/output error")


def on_disk(store: LockStore) -> LockModel:
    return LockModel.from_json(json.loads(store.path.read_text()))


def new_lock(tmp_path: Path, **fields: object) -> tuple[LockModel, LockStore]:
    store = LockStore(tmp_path / "lock-0.json")
    model = store.load_or_create("lk-persist-1", CODE, name="Door 1")
    for name, value in fields.items():
        setattr(model, name, value)
    store.save(model)
    return model, store


def pair(model: LockModel, store: LockStore) -> bytes:
    gw = GatewayConnection(gw_id=GW, rng=SeededRng("gp"))
    link = MemoryLink(gw, model, rng=SeededRng("lp"), now=NOW, store=store)
    gw.start_pairing(CODE)
    (done,) = [e for e in link.roundtrip(NOW) if isinstance(e, PairingCompleted)]
    return done.ltk


def session(
    model: LockModel, store: LockStore, ltk: bytes, seed: str
) -> tuple[GatewayConnection, LinkDriver]:
    """A gateway with an open session on a new link: the lock side driven by hand, so a test
    can look at the state file between the lock's receive and its answer."""
    gw = GatewayConnection(gw_id=GW, rng=SeededRng(f"g{seed}"))
    link = MemoryLink(gw, model, rng=SeededRng(f"l{seed}"), now=NOW, store=store)
    gw.start_session(lock_id=model.lock_id, ltk=ltk)
    assert SessionEstablished(GW, model.lock_id) in link.roundtrip(NOW)
    return gw, link.driver


def deliver(gw: GatewayConnection, driver: LinkDriver, now: float = NOW) -> None:
    for piece in fragment(gw.data_to_send(), 244):
        driver.receive(piece, now)


def answer(gw: GatewayConnection, driver: LinkDriver) -> list[Event]:
    return list(gw.receive_data(driver.data_to_send()))


# --- the model is pure -------------------------------------------------------------------


def test_the_lock_model_imports_nothing_that_does_io() -> None:
    tree = ast.parse(Path(firmware_sim.lock_model.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not imported & {"os", "io", "json", "pathlib", "shutil", "tempfile", "sqlite3"}
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert "open" not in names


def test_each_durable_change_raises_the_revision_and_reads_do_not() -> None:
    model = LockModel(lock_id="lk-persist-1", setup_code=CODE)
    before = model.revision
    model.execute(Request(Op.STATUS, bytes(16)), NOW)
    model.execute(Request(Op.READ_LOG, bytes([1]) * 16, {"from": 1, "max": 8}), NOW)
    model.set_lie("battery")
    assert model.revision == before
    unlock = Request(Op.UNLOCK, bytes([2]) * 16)
    model.execute(unlock, NOW)
    after_unlock = model.revision
    assert after_unlock > before
    model.execute(unlock, NOW)  # answered from the command cache: nothing changed
    assert model.revision == after_unlock
    for change in (model.arm_jam, lambda: model.set_clock_offset(30.0), lambda: model.manual_turn(NOW)):
        mark = model.revision
        change()
        assert model.revision > mark


# --- the atomic writer (D9) ------------------------------------------------------------


def test_D9_sim_state_is_written_temp_fsync_rename_dir_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append(("fsync", str(Path(f"/proc/self/fd/{fd}").readlink())))
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        calls.append(("rename", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "lock-0.json"
    write_atomic(target, b"{}\n")
    assert target.read_bytes() == b"{}\n" and target.stat().st_mode & 0o777 == 0o600  # it holds the key
    assert [c[0] for c in calls] == ["fsync", "rename", "fsync"]
    assert calls[0][1].startswith(str(tmp_path / ".lock-0.json.tmp"))  # the temp file, before
    assert calls[2][1] == str(tmp_path)  # the directory, after the rename


def test_D9_sim_short_writes_are_continued_not_taken_for_the_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, store = new_lock(tmp_path)
    pair(model, store)
    writes: list[int] = []
    real_write = os.write

    def short_write(fd: int, data: bytes | memoryview) -> int:
        written = real_write(fd, bytes(data[:7]))  # the kernel may take less than asked
        writes.append(written)
        return written

    monkeypatch.setattr(os, "write", short_write)
    model.manual_turn(NOW)
    store.save(model)
    assert len(writes) > 1
    assert json.loads(store.path.read_text()) == model.to_json()


def test_D9_sim_failed_write_leaves_the_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, store = new_lock(tmp_path)
    old = store.path.read_bytes()
    model.manual_turn(NOW)
    monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(OSError, match="Input/output"):
        store.sync(model)
    assert store.path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["lock-0.json"]
    assert store.behind(model)  # the next sync tries again
    monkeypatch.undo()
    store.sync(model)
    assert not store.behind(model) and on_disk(store).to_json() == model.to_json()


# --- written before answered (D11) -----------------------------------------------------


def test_D11_an_actuation_and_its_log_entry_are_on_disk_before_the_lock_answers(tmp_path: Path) -> None:
    model, store = new_lock(tmp_path)
    ltk = pair(model, store)
    assert on_disk(store).paired_gw == GW and on_disk(store).ltk == ltk  # the key, before PAIR_DONE
    gw, driver = session(model, store, ltk, "u")
    cmd_id = bytes([7]) * 16
    gw.send_request(Request(Op.UNLOCK, cmd_id))
    deliver(gw, driver)
    saved = on_disk(store)  # the answer is queued, not yet sent
    assert saved.state is LockState.UNLOCKED
    assert saved.log[-1].kind is LogKind.UNLOCKED and saved.log[-1].cmd_id == cmd_id
    assert cmd_id in saved.results
    (event,) = answer(gw, driver)
    assert isinstance(event, ResponseReceived) and event.response.status is Status.OK
    assert event.response.result["lock_seq"] == saved.log[-1].lock_seq


def test_D11_a_failed_pairing_attempt_is_counted_on_disk_before_the_lock_answers(tmp_path: Path) -> None:
    model, store = new_lock(tmp_path)
    gw = GatewayConnection(gw_id=GW, rng=SeededRng("gw"))
    driver = LinkDriver(model, rng=SeededRng("lw"), now=NOW, store=store)
    gw.start_pairing("000-000-000")
    deliver(gw, driver)
    assert on_disk(store).failures == 1  # a kill -9 now cannot refund the guess
    assert driver.data_to_send()  # PAIR_RESPONSE


def test_D11_a_failed_write_answers_nothing_and_the_retry_is_written_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, store = new_lock(tmp_path)
    ltk = pair(model, store)
    first_free = on_disk(store).next_seq
    gw, driver = session(model, store, ltk, "f")
    cmd_id = bytes([9]) * 16
    gw.send_request(Request(Op.UNLOCK, cmd_id))
    monkeypatch.setattr(os, "fsync", eio)
    deliver(gw, driver)
    assert driver.closed and isinstance(driver.error, OSError)
    assert driver.data_to_send() == b""  # nothing about an actuation that is not on disk
    assert on_disk(store).state is LockState.LOCKED and on_disk(store).next_seq == first_free
    assert model.state is LockState.UNLOCKED  # the bolt did move
    monkeypatch.undo()
    # The gateway retries the same command on a new link: the cached answer is written before
    # it goes out, although the retry itself changes nothing.
    gw, driver = session(model, store, ltk, "r")
    gw.send_request(Request(Op.UNLOCK, cmd_id))
    deliver(gw, driver)
    saved = on_disk(store)
    assert saved.state is LockState.UNLOCKED and cmd_id in saved.results
    (event,) = answer(gw, driver)
    assert isinstance(event, ResponseReceived) and event.response.status is Status.OK
    assert model.ran[Op.UNLOCK] == 1


def test_D11_an_auto_relock_and_its_log_entry_are_on_disk(tmp_path: Path) -> None:
    model, store = new_lock(tmp_path, auto_relock_s=5.0)
    ltk = pair(model, store)
    gw, driver = session(model, store, ltk, "a")
    gw.send_request(Request(Op.UNLOCK, bytes([3]) * 16))
    deliver(gw, driver)
    answer(gw, driver)
    gw.send_request(Request(Op.STATUS, bytes([4]) * 16))
    deliver(gw, driver, NOW + 10)  # past the relock: the lock locked itself first
    saved = on_disk(store)
    assert saved.state is LockState.LOCKED
    assert saved.log[-1].kind is LogKind.LOCKED and saved.log[-1].data == {"source": "auto"}
    assert saved.next_seq == model.next_seq
    (event,) = answer(gw, driver)
    assert isinstance(event, ResponseReceived) and event.response.result["log_next"] == saved.next_seq


def test_D11_a_restarted_lock_is_the_same_lock_and_answers_a_retry_from_its_cache(tmp_path: Path) -> None:
    model, store = new_lock(tmp_path)
    ltk = pair(model, store)
    gw, driver = session(model, store, ltk, "s")
    cmd_id = bytes([5]) * 16
    gw.send_request(Request(Op.UNLOCK, cmd_id))
    deliver(gw, driver)
    (first,) = answer(gw, driver)
    # The simulator is killed and restarted on the same state directory.
    again = LockStore(store.path)
    restarted = again.load_or_create("lk-other", "000-000-000")
    assert restarted.to_json() == model.to_json()
    assert not again.behind(restarted)
    gw, driver = session(restarted, again, ltk, "t")
    gw.send_request(Request(Op.UNLOCK, cmd_id))
    deliver(gw, driver)
    (retry,) = answer(gw, driver)
    assert isinstance(first, ResponseReceived) and isinstance(retry, ResponseReceived)
    assert retry.response == first.response and Op.UNLOCK not in restarted.ran
