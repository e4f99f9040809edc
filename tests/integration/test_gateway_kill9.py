"""Gateway kill -9 at random points (THREATS D1, D11, A8) against one simulator process that
keeps running, as real locks keep running while their gateway restarts.

Each iteration starts a gateway process on the simulator's ``tcp-client`` transport, asks every
lock for its status (the time from process start to each answer is measured and reported, not
asserted), then is killed with SIGKILL at a random moment of one of three kinds, in turn:

* ``idle``: nothing asked, with links still open (the link manager closes them after 1 s) or not;
* ``connect``: one connection slot and two locks, so each command connects anew — the kill lands
  in a connect, a GATT discovery or a handshake;
* ``command``: unlocks and status refreshes, the kill landing anywhere after an answer.

The next gateway must reach every lock again: its HCI Reset drops what the dead one left in the
controller, and each lock drops its orphaned link after its supervision timeout and advertises.
Afterwards every event committed before a kill is kept, every unlock that got an ok response
has its access.granted, numbering stays gapless and chained, and lock-log entries are
forwarded exactly once across restarts. 20 iterations in CI; bench/soak_kill9.py runs the long
version.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import selectors
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from broker import free_port
from simproc import start_sim

from gateway.store.outbox import Outbox
from protocols.event_encoding import verify_chain

pytestmark = [pytest.mark.ble, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
MODES = ("idle", "connect", "command")
#: Hang guard for one line from a gateway process (start-up, a status, an unlock): far above
#: anything a working gateway needs, it only turns a hang into a failure with a message.
LINE_HANG_GUARD_S = 60.0

CHILD = textwrap.dedent("""
    import time
    started = time.monotonic()
    import asyncio, base64, json, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from credfix import SITE, T0, World
    from gateway.authz.authorizer import Authorizer, TrustStore
    from gateway.ble.bumble_backend import BumbleHost
    from gateway.authz.clock import ManualClock
    from gateway.ble.links import LinkManager, Priority
    from gateway.store.outbox import Outbox
    from gateway.ble.registry import LockRecord, Registry
    from gateway.runtime.service import Service
    from protocols import issuer

    data = Path({data!r})
    locks = json.loads({locks!r})
    mode = sys.argv[1]

    async def main():
        w = World(); clock = ManualClock(T0)
        async with BumbleHost(transport="tcp-client:127.0.0.1:{port}") as host:
            authz = Authorizer(gw_id="gw-k", site=SITE, roots={{w.root.public.kid: w.root.public}},
                               policy=w.policy, store=TrustStore(data / "trust.sqlite3"), clock=clock,
                               release_floor=T0 - 10**7)
            registry = Registry(data / "reg.sqlite3")
            slots = 1 if mode == "connect" else 2
            async with Outbox(data / "events.sqlite3", gw="gw-k", site=SITE, wall=clock.wall) as ob, \\
                    LinkManager(gw_id="gw-k", backend=host.client_backend(), max_connections=slots) as links:
                for lk in locks:
                    if registry.get(lk["lock"]) is None:
                        done = await links.pair(lk["address"], lk["setup_code"])
                        registry.put(LockRecord(done.lock_id, lk["address"], "d", done.ltk))
                svc = Service("gw-k", SITE, authz, ob, registry, links)
                svc.authz.install(w.keyring())
                for lk in locks:
                    t = time.monotonic()
                    await svc.refresh(registry.get(lk["lock"]), priority=Priority.INTERACTIVE)
                    now = time.monotonic()
                    print("status", lk["lock"], f"{{now - started:.3f}}", f"{{now - t:.3f}}", flush=True)
                if mode == "idle":
                    print("idle", flush=True)
                    await asyncio.sleep(3600)
                i = 0
                while True:
                    i += 1
                    lock = locks[i % len(locks)]["lock"]
                    if i % 5 == 0:
                        await svc.refresh(registry.get(lock))
                        continue
                    tok = w.token(locks=[lock], iat=T0 - 10)
                    ch = await svc.handle("challenge", json.dumps({{"lock": lock}}).encode())
                    nonce = base64.urlsafe_b64decode(ch["data"]["nonce"] + "==")
                    proof = issuer.proof(w.holder, token_bytes=tok, nonce=nonce, gw="gw-k", lock=lock, act="unlock")
                    b64 = lambda b: base64.urlsafe_b64encode(b).decode().rstrip("=")
                    resp = await svc.handle("unlock", json.dumps({{"lock": lock, "token": b64(tok), "proof": b64(proof)}}).encode())
                    if resp["status"] == "ok":
                        print("ok", resp["data"]["seq"], flush=True)
                    else:
                        print("refused", json.dumps(resp), flush=True)
    asyncio.run(main())
""")


class _Lines:
    """Lines from a child's stdout, each awaited at most LINE_HANG_GUARD_S (a hang guard)."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        assert proc.stdout is not None
        self._proc, self._fd, self._buf, self._log = proc, proc.stdout.fileno(), b"", log
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._fd, selectors.EVENT_READ)

    def next(self, what: str) -> list[str]:
        deadline = time.monotonic() + LINE_HANG_GUARD_S
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sel.select(left):
                raise AssertionError(
                    f"gateway gave no {what} within {LINE_HANG_GUARD_S:.0f} s (hang); {self._tail()}"
                )
            chunk = os.read(self._fd, 65536)
            if not chunk:
                raise AssertionError(f"gateway exited (rc {self._proc.wait()}) before {what}; {self._tail()}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode().split()

    def _tail(self) -> str:
        return "its log ends:\n" + "\n".join(self._log.read_text().splitlines()[-15:])

    def close(self) -> None:
        self._sel.close()


def run_kill9(data: Path, *, iterations: int, seed: int = 9) -> dict[str, Any]:
    """Run ``iterations`` gateways against one simulator process, kill -9 each at a random
    point, then check the store. Returns the report (the measured restart times included)."""
    data.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(seed)
    port = free_port()
    sim_log = data / "sim.log"
    sim, locks = start_sim(port, seed=5, locks=2, stderr=sim_log)
    script = CHILD.format(
        tests=str(ROOT / "tests"),
        data=str(data),
        port=port,
        locks=json.dumps([{k: lk[k] for k in ("lock", "address", "setup_code")} for lk in locks]),
    )
    ok_seqs: list[int] = []
    since_start: list[float] = []
    status_s: list[float] = []
    kills = dict.fromkeys(MODES, 0)
    gw_log = data / "gateway.log"
    try:
        for n in range(iterations):
            mode = MODES[n % len(MODES)]
            with gw_log.open("a") as err:
                err.write(f"--- gateway {n} ({mode})\n")
                err.flush()
                proc = subprocess.Popen(
                    [sys.executable, "-c", script, mode],
                    stdout=subprocess.PIPE,
                    stderr=err,
                    env={**os.environ, "PYTHONWARNINGS": "ignore"},
                )
            lines = _Lines(proc, gw_log)
            try:
                for _ in locks:
                    line = lines.next(f"a status after restart {n}")
                    assert line[0] == "status", line
                    since_start.append(float(line[2]))
                    status_s.append(float(line[3]))
                if mode == "idle":
                    assert lines.next("idle") == ["idle"]
                    time.sleep(rnd.random() * 2.0)  # links still open (idle < 1 s) or closed
                else:
                    for _ in range(rnd.randint(1, 6)):
                        line = lines.next("an unlock answer")
                        assert line[0] == "ok", line
                        ok_seqs.append(int(line[1]))
                    # Land the kill anywhere: in the next connect, its discovery, its handshake,
                    # a command in flight, a log fetch, not only right after a response.
                    time.sleep(rnd.random() * 0.05)
                assert sim.poll() is None, "the simulator died"
                os.kill(proc.pid, signal.SIGKILL)
                kills[mode] += 1
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                lines.close()
                assert proc.stdout is not None
                proc.stdout.close()
        assert sim.poll() is None, "the simulator died"
    finally:
        sim.terminate()
        sim.communicate(timeout=10)
    assert "Traceback" not in sim_log.read_text(), sim_log.read_text()

    async def check() -> int:
        async with Outbox(data / "events.sqlite3", gw="gw-k", site="x", wall=lambda: 0) as ob:
            events = await ob.read(1, limit=10**7)
        seqs = [e["seq"] for e in events]
        assert seqs == list(range(1, len(seqs) + 1)), "a gap in seq"
        verify_chain(events)
        by_seq = {e["seq"]: e for e in events}
        for seq in ok_seqs:  # every ok response: its lock.unlocked and, before it, its access.granted
            done = by_seq[seq]
            assert done["type"] == "lock.unlocked"
            granted = [
                e
                for e in events
                if e["type"] == "access.granted" and e["data"]["cmd_id"] == done["data"]["cmd_id"]
            ]
            assert len(granted) == 1 and granted[0]["seq"] < seq
        forwarded = [
            (e["lock"], e["data"]["lock_seq"])
            for e in events
            if e["type"].startswith("lock.") and "lock_seq" in e.get("data", {})
        ]
        assert len(forwarded) == len(set(forwarded)), "a (lock, lock_seq) was forwarded twice"
        return len(events)

    events = asyncio.run(check())
    first = since_start[len(locks) :]  # restarts only: the first process also paired
    return {
        "iterations": iterations,
        "kills": kills,
        "ok_responses": len(ok_seqs),
        "events": events,
        "lost": 0,
        "gaps": 0,
        "duplicates": 0,
        "restart_to_status_s": _summary(first),
        "status_s": _summary(status_s[len(locks) :]),
    }


def _summary(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {}
    return {
        "median": round(statistics.median(xs), 3),
        "max": round(max(xs), 3),
        "min": round(min(xs), 3),
    }


def test_D1_D11_A8_gateway_kill_9_loop_with_the_simulator_running_on_loses_nothing_and_reaches_every_lock(
    tmp_path: Path,
) -> None:
    report = run_kill9(tmp_path, iterations=20)
    print(json.dumps(report))  # the measured restart times (pytest -s shows them)
    assert report["kills"] == {"idle": 7, "connect": 7, "command": 6}
    assert report["ok_responses"] >= 13


if __name__ == "__main__":  # a quick look at the numbers: python tests/integration/test_gateway_kill9.py
    sys.path.insert(0, str(ROOT / "tests"))
    print(json.dumps(run_kill9(Path(tempfile.mkdtemp(prefix="lockgw-kill9-")), iterations=20), indent=1))
