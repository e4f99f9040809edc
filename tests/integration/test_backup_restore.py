"""A dead SD card: `lockgw backup` taken while the daemon serves, the data directory wiped,
`lockgw restore` onto the empty one, the daemon started again — on the simulator, a real
mosquitto and `lockgw run` processes. The locks answer without re-pairing, the epoch and the
unreceipted events survive and are published again, seq goes on without a gap. Bad backup
files (truncated, the wrong file, hostile tars, an altered database) are a clear error and
change nothing."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import sqlite3
import tarfile
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from broker import Broker
from clifix import start_daemon
from daemonfix import BASE, GW, Site, make_site

from protocols.event_encoding import verify_chain

pytestmark = [pytest.mark.ble, pytest.mark.slow]

#: Bounds every wait (a hang guard, not a speed requirement).
WITHIN_S = 30.0


def _meta(db: Path, key: str) -> str:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return str(conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])


async def _unlock_all_and_receipt_one(site: Site) -> None:
    c = await site.session()
    try:
        for lock in site.locks:
            answer = await site.unlock(c, lock)
            assert answer["status"] == "ok", answer
        epoch = site.events()[0]["epoch"]
        await c.publish(f"{BASE}/{GW}/receipt", json.dumps({"epoch": epoch, "seq": 3}), qos=1)
    finally:
        await c.__aexit__(None, None, None)
    deadline = time.monotonic() + WITHIN_S
    while _meta(site.db, "receipt_seq") != "3":
        assert time.monotonic() < deadline, "the receipt was never recorded"
        await asyncio.sleep(0.05)


#: Each bad file and the words its refusal must say.
REASONS = {
    "truncated": "truncated",
    "wrong file": "not a lockgw backup",
    "empty": "not a lockgw backup",
    "path traversal": "unexpected member",
    "symlink member": "not a regular file",
    "altered database": "does not match its checksum",
    "lying manifest": "do not hold what the manifest says",
    "deep manifest": "manifest larger than",
}


def _hostile_files(tmp: Path, good: Path) -> dict[str, Path]:
    """Backups that must each be refused with a clear message and no change."""
    raw = good.read_bytes()
    out: dict[str, Path] = {}
    out["truncated"] = tmp / "truncated.tar"
    out["truncated"].write_bytes(raw[: len(raw) // 2])
    out["wrong file"] = tmp / "lockgw.toml"  # the configuration, not a backup
    out["empty"] = tmp / "empty.tar"
    out["empty"].write_bytes(b"")
    with tarfile.open(good) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]

    def build(name: str, edit: Any) -> None:
        path = tmp / f"{name.replace(' ', '-')}.tar"
        with tarfile.open(path, "w") as tar:
            for info, data in edit(members):
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        out[name] = path

    def traversal(ms: list[Any]) -> list[Any]:
        evil = tarfile.TarInfo("../../evil.sqlite3")
        return [*ms[:1], (evil, b"x" * 10), *ms[1:]]

    def symlink(ms: list[Any]) -> list[Any]:
        link = tarfile.TarInfo("locks.sqlite3")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        return [ms[0], (link, b""), *ms[2:]]

    def flipped(ms: list[Any]) -> list[Any]:
        info, data = ms[3]  # events.sqlite3: one byte changed in the middle
        i = len(data) // 2
        return [*ms[:3], (info, data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :])]

    def lying_manifest(ms: list[Any]) -> list[Any]:
        info, data = ms[0]
        body = json.loads(data)
        body["summary"]["last_seq"] += 5  # the checksums still match, the summary does not
        return [(info, json.dumps(body).encode()), *ms[1:]]

    build("path traversal", traversal)
    build("symlink member", symlink)
    build("altered database", flipped)
    build("lying manifest", lying_manifest)
    build("deep manifest", lambda ms: [(ms[0][0], b"[" * 100_000), *ms[1:]])
    return out


async def _collect_events(broker: Broker, start: Any, until_seq: int) -> list[dict[str, Any]]:
    """Subscribe to the events topic, run ``start`` (a blocking daemon start) and collect
    events until ``until_seq`` was seen."""
    got: list[dict[str, Any]] = []
    async with aiomqtt.Client(
        "127.0.0.1", broker.port, identifier="central-restore", protocol=aiomqtt.ProtocolVersion.V5
    ) as c:
        await c.subscribe(f"{BASE}/{GW}/events", qos=1)
        await asyncio.to_thread(start)
        async with asyncio.timeout(WITHIN_S):
            async for m in c.messages:
                event = json.loads(m.payload)
                got.append(event)
                if event["seq"] >= until_seq:
                    return got
    return got


def test_a_gateway_restored_onto_a_new_sd_card_carries_on(tmp_path: Path, live_broker: Broker) -> None:
    site, sim = make_site(tmp_path, live_broker)
    daemons = [site.daemon]
    try:
        asyncio.run(_unlock_all_and_receipt_one(site))
        before = site.check_store()
        epoch, last = before[-1]["epoch"], before[-1]["seq"]
        assert last > 3  # some events stay unreceipted

        # Online backup while the daemon serves.
        file = tmp_path / "backups" / "gw.tar"
        made = json.loads(site.field.run("--json", "backup", "--out", str(file)).stdout)
        assert file.stat().st_mode & 0o777 == 0o600
        assert made["locks"] == 2 and made["epoch"] == epoch and made["last_seq"] == last
        assert made["receipt_seq"] == 3 and made["unreceipted"] == last - 3
        human = site.field.run("backup", "--out", str(tmp_path / "b2.tar")).stdout
        assert "2 paired locks" in human and "secret" in human and epoch in human

        # Restore refuses while the daemon holds the data directory, and onto a non-empty one.
        busy = site.field.run("restore", str(file), ok=False)
        assert busy.returncode == 3 and "in use by the daemon" in busy.stderr
        assert site.daemon.stop() == 0, site.daemon.output()
        full = site.field.run("restore", str(file), ok=False)
        assert full.returncode == 1 and "not empty" in full.stderr and "--force" in full.stderr

        # The SD card dies: a new, empty data directory.
        data = tmp_path / "data"
        shutil.rmtree(data)
        for what, bad in _hostile_files(tmp_path, file).items():
            proc = site.field.run("restore", str(bad), ok=False)
            assert proc.returncode == 1, (what, proc.stderr)
            assert REASONS[what] in proc.stderr, (what, proc.stderr)
            assert proc.stderr.strip() and "Traceback" not in proc.stderr, (what, proc.stderr)
            assert not data.exists(), what  # nothing restored, nothing half-restored
            assert (
                not (tmp_path / "evil.sqlite3").exists() and not (tmp_path.parent / "evil.sqlite3").exists()
            )
            assert not list(tmp_path.glob(".data.restoring-*")), what
        checked = json.loads(site.field.run("--json", "restore", "--check", str(file)).stdout)
        assert checked["restored"] is False and not data.exists()

        done = json.loads(site.field.run("--json", "restore", str(file)).stdout)
        assert done["restored"] is True and done["epoch"] == epoch and done["last_seq"] == last
        assert (data / "locks.sqlite3").stat().st_mode & 0o777 == 0o600

        # The daemon starts on it: everything central had not receipted is published again,
        # in order, then the new gateway.started continues the same epoch without a gap.
        restarted: list[Any] = []
        got = asyncio.run(
            _collect_events(live_broker, lambda: restarted.append(start_daemon(site.field)), last + 1)
        )
        daemons += restarted
        seqs = [e["seq"] for e in got]
        assert seqs[: last - 3] == list(range(4, last + 1)), seqs
        assert got[-1]["seq"] == last + 1 and got[-1]["type"] == "gateway.started"
        assert all(e["epoch"] == epoch for e in got)

        # The locks answer without re-pairing.
        for lock in site.locks:
            out = site.field.act("unlock", lock)
            assert "unlocked" in out.stdout
        after = site.events()
        verify_chain(after)
        assert [e["seq"] for e in after] == list(range(1, len(after) + 1))
        assert after[: len(before)] == before
        assert _meta(site.db, "epoch") == epoch
        assert not any(e["type"] == "lock.paired" for e in after[len(before) :])
    finally:
        for d in daemons:
            d.stop()
        sim.terminate()
        sim.communicate(timeout=10)
