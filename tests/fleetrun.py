"""The fleet on real distributed parts, with faults while events flow — one scenario for the
CI fault test (tests/integration/test_fleet_faults.py, reduced size) and bench/fleet_bench.py.

Parts: a 3-node RabbitMQ cluster (tests/rabbit.py), a private PostgreSQL (tests/fleetfix.py),
two or more ``lockgw-receiver`` processes (AMQP, competing consumers on one quorum queue),
real ``lockgw run`` daemons (MQTT 3.1.1, simulated locks on Bumble, unlocks through the CLI)
and simulated gateways (tests/fleetgw.py, the contract's gateway side).

Faults (:func:`run_faults`): SIGKILL of the quorum queue's leader node (then restarted),
SIGKILL of a receiver between commit and ack (its ``kill-after-commit`` hook; restarted),
PostgreSQL restarted, a simulated gateway's connection cut for a while, kill -9 of a real
daemon and of a simulated gateway (both restarted from their outbox), and gaps only a replay
can fill (a simulated gateway "loses" the first send of some events and never re-sends them
by itself within the run).

:func:`check_postgres` then checks **from PostgreSQL alone**, against what each gateway
committed (the daemon's own SQLite; the simulator's memory): every event stored exactly once
with the same hash, every chain verifies, every stream's contiguous seq and receipt_seq at the
gateway's last seq (so every gap healed), no conflicts, nothing quarantined.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from clifix import Daemon, Field, make_field, start_daemon
from fleetfix import Postgres, ReceiverProc, receiver_config
from fleetgw import SimGateway, shift_event
from rabbit import RabbitCluster, RabbitNode

from protocols.event_encoding import verify_chain

#: Bounds the final convergence: a hang guard on a loaded 2-core machine, not a speed goal.
CONVERGE_WITHIN_S = 300.0


@dataclass
class RealSite:
    """One real ``lockgw run`` daemon with its simulator, on one RabbitMQ node."""

    gw: str
    field: Field
    daemon: Daemon
    locks: list[str]
    node: RabbitNode
    unlocks: int = 0
    kills: int = 0

    @property
    def db(self) -> Path:
        return self.field.tmp / "data" / "events.sqlite3"

    def committed(self) -> tuple[list[dict[str, Any]], int]:
        """(every event in the daemon's outbox, its receipt_seq), read-only (WAL)."""
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            events = [json.loads(r[0]) for r in con.execute("SELECT json FROM events ORDER BY seq")]
            row = con.execute("SELECT coalesce(max(seq), 0) FROM events WHERE receipted_at IS NOT NULL")
            return events, int(row.fetchone()[0])
        finally:
            con.close()

    def kill9_and_restart(self) -> None:
        self.daemon.proc.kill()
        self.daemon.proc.wait(30)
        self.kills += 1
        self.daemon = start_daemon(self.field)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.daemon.stop()
        self.field.sim.terminate()
        with contextlib.suppress(Exception):
            self.field.sim.communicate(timeout=10)


def start_real_site(tmp: Path, gw: str, node: RabbitNode, base: str, *, seed: int) -> RealSite:
    tmp.mkdir(parents=True, exist_ok=True)
    f = make_field(
        tmp,
        gw=gw,
        seed=seed,
        extra_config=f'[mqtt]\nurl = "{node.mqtt_url}"\nbase_topic = "{base}"\nprotocol = "3.1.1"\n',
    )
    try:
        f.run("trust", "install", str(tmp / "keyring.cose"))
        ids = [f.run("pair", lk["address"], "--code", lk["setup_code"]).stdout.strip() for lk in f.locks]
        return RealSite(gw, f, start_daemon(f), ids, node)
    except BaseException:
        f.sim.terminate()
        f.sim.communicate(timeout=10)
        raise


@dataclass
class Fleet:
    """Everything of one run; :meth:`close` ends what it started (not the cluster or PG)."""

    tmp: Path
    rc: RabbitCluster
    pg: Postgres
    dsn: str
    base: str
    queue: str
    leader: RabbitNode
    safe_nodes: list[RabbitNode]
    receivers: list[ReceiverProc] = field(default_factory=list)
    receiver_cfgs: list[Path] = field(default_factory=list)
    sims: list[SimGateway] = field(default_factory=list)
    sites: list[RealSite] = field(default_factory=list)
    faults: dict[str, Any] = field(default_factory=dict)

    def receiver(self, i: int, *, env: dict[str, str] | None = None) -> ReceiverProc:
        r = ReceiverProc(self.receiver_cfgs[i], self.tmp / f"receiver-{i}.log", env=env or {}).start()
        r.wait_log("amqp_connected")
        return r

    def expected(self) -> dict[str, tuple[list[dict[str, Any]], int]]:
        """Per gateway: every event it committed, and its own receipt_seq."""
        out: dict[str, tuple[list[dict[str, Any]], int]] = {}
        for s in self.sims:
            out[s.gw] = ([s.event(i) for i in range(1, s.last_seq + 1)], s.receipt_seq)
        for site in self.sites:
            out[site.gw] = site.committed()
        return out


async def open_fleet(
    tmp: Path,
    rc: RabbitCluster,
    pg: Postgres,
    dsn: str,
    *,
    receivers: int = 2,
    batch_max: int = 200,
    gap_replay_after_s: float = 2.0,
    replay_retry_s: float = 4.0,
) -> Fleet:
    """Declare the events queue through node 1, find its leader, and start ``receivers``
    receivers on the other nodes (so the leader's death leaves them running)."""
    base = f"f{secrets.token_hex(3)}"
    queue = f"{base}.central"
    await rc.declare_events_queue(queue, base=base)
    leader = rc.quorum_leader(queue)
    safe = [n for n in rc.nodes if n is not leader]
    fleet = Fleet(tmp, rc, pg, dsn, base, queue, leader, safe)
    for i in range(receivers):
        node = safe[i % len(safe)]
        cfg = receiver_config(
            tmp / f"receiver-{i}.toml", dsn=dsn, instance=f"r{i}", transport="amqp",
            amqp_url=node.amqp_url, base=base, gap_replay_after_s=gap_replay_after_s, replay_retry_s=replay_retry_s,
            batch_max=batch_max, amqp_queue=queue,
        )  # fmt: skip
        fleet.receiver_cfgs.append(cfg)
    return fleet


async def flow_sims(sims: list[SimGateway], stop: asyncio.Event, *, every_s: float, seed: int = 1) -> None:
    """Each simulated gateway commits an event about every ``every_s`` until ``stop``."""
    rng = random.Random(seed)

    async def one(gw: SimGateway) -> None:
        while not stop.is_set():
            gw.commit(shift_event(rng, gw))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(rng.expovariate(1 / every_s)):
                    await stop.wait()

    await asyncio.gather(*(one(g) for g in sims))


def flow_daemon(site: RealSite, stop: threading.Event, *, every_s: float) -> None:
    """Unlock and lock through the daemon's CLI (control socket) until ``stop`` (a thread)."""
    i = 0
    while not stop.is_set():
        lock = site.locks[i % len(site.locks)]
        action = "unlock" if i % 2 == 0 else "lock"
        with contextlib.suppress(Exception):  # refused while it restarts: that is fine here
            if site.field.act(action, lock, ok=None).returncode == 0:
                site.unlocks += 1
        i += 1
        stop.wait(every_s)


async def stored_count(dsn: str, gws: list[str], *, attempts: int = 10) -> int:
    """Events stored for ``gws``; retried (a PostgreSQL restarting, or slow to accept a
    connection on a saturated machine, is not a failure of the run)."""
    for attempt in range(attempts):
        try:
            conn = await asyncpg.connect(dsn, timeout=60)
            try:
                return int(await conn.fetchval("SELECT count(*) FROM events WHERE gw = ANY($1)", gws))
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError):
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(2.0)
    raise AssertionError("unreachable")


async def wait_stored(dsn: str, gws: list[str], at_least: int, *, within_s: float = 120.0) -> int:
    deadline = time.monotonic() + within_s
    n = 0
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            n = await stored_count(dsn, gws)
            if n >= at_least:
                return n
        await asyncio.sleep(0.5)
    raise AssertionError(f"only {n} of {at_least} events stored within {within_s} s")


async def run_faults(fleet: Fleet) -> None:
    """The faults, one after another, while the flows run (module docstring)."""
    rc, pg = fleet.rc, fleet.pg
    gws = [s.gw for s in fleet.sims] + [s.gw for s in fleet.sites]
    f = fleet.faults
    t0 = time.monotonic()
    # 1. A receiver SIGKILLs itself between a commit and its acks (started with the hook).
    victim = fleet.receivers[0]
    deadline = time.monotonic() + 120
    while victim.alive() and time.monotonic() < deadline:  # noqa: ASYNC110 - a process, not a task
        await asyncio.sleep(0.2)
    assert not victim.alive(), "the receiver's kill-after-commit hook never fired"
    f["receiver_killed_after_commit"] = "fault_kill_after_commit" in victim.output()
    fleet.receivers[0] = await asyncio.to_thread(fleet.receiver, 0)
    f["receiver_restarted_at_s"] = round(time.monotonic() - t0, 1)
    # 2. SIGKILL the quorum queue's leader node; it comes back while the other faults go on.
    leader = rc.quorum_leader(fleet.queue)
    f["killed_leader"] = leader.short
    rc.kill(leader)
    await asyncio.sleep(3)
    f["new_leader"] = (await asyncio.to_thread(rc.quorum_leader, fleet.queue)).short

    async def restart_leader() -> None:
        await asyncio.to_thread(rc.start_node, leader)
        f["leader_back_at_s"] = round(time.monotonic() - t0, 1)

    back = asyncio.create_task(restart_leader())
    # 3. A simulated gateway's uplink down for a while, and kill -9 of gateways.
    cut = asyncio.create_task(fleet.sims[1 % len(fleet.sims)].cut(8.0))

    async def kill_daemon() -> None:
        if fleet.sites:
            f["daemon_killed"] = fleet.sites[0].gw
            await asyncio.to_thread(fleet.sites[0].kill9_and_restart)
            f["daemon_back_at_s"] = round(time.monotonic() - t0, 1)

    daemon = asyncio.create_task(kill_daemon())
    await fleet.sims[2 % len(fleet.sims)].kill(2.0)
    # 4. PostgreSQL restarted under the receivers.
    before = await stored_count(fleet.dsn, gws)
    await asyncio.to_thread(pg.stop)
    await asyncio.sleep(2)
    await asyncio.to_thread(pg.start)
    f["pg_restarted_at_stored"] = before
    f["pg_back_at_s"] = round(time.monotonic() - t0, 1)
    await cut
    await daemon
    await back
    f["faults_done_at_s"] = round(time.monotonic() - t0, 1)


async def check_postgres(fleet: Fleet, *, within_s: float = CONVERGE_WITHIN_S) -> dict[str, Any]:
    """Wait until PostgreSQL holds exactly what every gateway committed, receipted to its last
    seq; then the figures. Raises AssertionError naming the first gateway that never got there."""
    deadline = time.monotonic() + within_s
    problems: list[str] = ["not checked yet"]
    while time.monotonic() < deadline:
        problems = await _problems(fleet)
        if not problems:
            break
        await asyncio.sleep(1.0)
    assert not problems, f"after {within_s} s: {problems[:10]}"
    conn = await asyncpg.connect(fleet.dsn)
    try:
        gws = list(fleet.expected())
        stored = int(await conn.fetchval("SELECT count(*) FROM events WHERE gw = ANY($1)", gws))
        replayed = int(
            await conn.fetchval("SELECT count(*) FROM events WHERE gw = ANY($1) AND replayed", gws)
        )
        replays = int(
            await conn.fetchval("SELECT coalesce(sum(replays), 0) FROM streams WHERE gw = ANY($1)", gws)
        )
    finally:
        await conn.close()
    committed = sum(len(ev) for ev, _ in fleet.expected().values())
    return {
        "gateways": len(gws),
        "committed": committed,
        "stored": stored,
        "lost": committed - stored,
        "stored_twice": 0,  # checked per id in _problems: every id once, same hash
        "stored_by_replay": replayed,
        "replay_requests": replays,
        "faults": fleet.faults,
    }


async def _problems(fleet: Fleet) -> list[str]:  # noqa: C901, PLR0912 - one list of checks
    expected = fleet.expected()
    try:
        conn = await asyncpg.connect(fleet.dsn, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        return [f"PostgreSQL: {exc}"]
    try:
        gws = list(expected)
        rows = await conn.fetch(
            "SELECT gw, epoch, seq, id, hash, body FROM events WHERE gw = ANY($1) ORDER BY gw, epoch, seq",
            gws,
        )
        streams = {
            (r["gw"], r["epoch"]): r
            for r in await conn.fetch(
                "SELECT gw, epoch, contiguous_seq, max_seq, gap_since, receipt_seq FROM streams WHERE gw = ANY($1)",
                gws,
            )
        }
        conflicts = int(await conn.fetchval("SELECT count(*) FROM conflicts WHERE gw = ANY($1)", gws))
        quarantined = int(await conn.fetchval("SELECT count(*) FROM quarantine"))
    except (OSError, asyncpg.PostgresError) as exc:
        return [f"PostgreSQL: {exc}"]
    finally:
        with contextlib.suppress(Exception):
            await conn.close()
    out: list[str] = []
    if conflicts:
        out.append(f"{conflicts} conflicts")
    if quarantined:
        out.append(f"{quarantined} quarantined")
    by_gw: dict[str, list[Any]] = {}
    for r in rows:
        by_gw.setdefault(r["gw"], []).append(r)
    for gw, (events, own_receipt) in expected.items():
        got = by_gw.get(gw, [])
        want = {e["id"]: e["hash"] for e in events}
        have: dict[str, str] = {}
        for r in got:
            if r["id"] in have:
                out.append(f"{gw}: {r['id']} stored twice")
            have[r["id"]] = r["hash"].strip()
        if have != want:
            missing = sorted(set(want) - set(have), key=lambda i: int(i.rsplit("/", 1)[1]))
            out.append(
                f"{gw}: {len(missing)} missing ({missing[:3]}), {len(set(have) - set(want))} unexpected"
            )
            continue
        if events:
            try:
                verify_chain([json.loads(r["body"]) for r in got])
            except ValueError as exc:
                out.append(f"{gw}: chain: {exc}")
            last = events[-1]["seq"]
            st = streams.get((gw, events[-1]["epoch"]))
            if st is None or st["contiguous_seq"] != last or st["gap_since"] is not None:
                out.append(f"{gw}: stream not gap-free to {last}: {dict(st) if st else None}")
            elif st["receipt_seq"] != last:
                out.append(f"{gw}: receipt_seq {st['receipt_seq']} (stored) != last seq {last}")
            elif own_receipt != last:
                out.append(f"{gw}: the gateway's own receipt_seq {own_receipt} != last seq {last}")
    return out
