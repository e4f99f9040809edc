"""The gateway's authorization service: persistence across restarts, kill -9, and the OS clock."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from credfix import GW, LOCK, SITE, T0, World

from gateway.authz import RELEASE_FLOOR, Authorizer, TrustStore, load_root_keys
from gateway.clock import ManualClock, SystemClock
from gateway.errors import ConfigError
from gateway.keyfiles import b64url
from protocols import cbor, issuer
from protocols.credentials import TimeState
from protocols.errors import TokenError


def open_authz(w: World, data: Path, clock: ManualClock) -> Authorizer:
    return w.authorizer(data, clock, release_floor=T0 - 400 * 86400)


def test_store_asserts_wal_and_full(tmp_path: Path) -> None:
    store = TrustStore(tmp_path / "t.sqlite3")
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2
    store.close()


def test_keyring_revocations_and_floor_survive_restart(tmp_path: Path) -> None:
    w = World()
    clock = ManualClock(T0)
    a = open_authz(w, tmp_path, clock)
    assert a.install(w.keyring()).installed
    tok = w.token()
    cti = cbor.loads(cbor.loads(tok).value[2])[7]  # type: ignore[union-attr, index, call-overload]
    out = a.install(issuer.revocations(w.issuer_a, site=SITE, version=3, iat=T0, exp=T0 + 86400, cti=[cti]))
    assert out.installed and out.kind == "revocations" and out.version == 3
    floor = a.core.time.floor
    a.close()
    b = open_authz(w, tmp_path, clock)
    assert b.trust_summary()["keyring"] == {"version": 1, "exp": T0 + 90 * 86400}
    assert b.trust_summary()["revocations"] == {"version": 3, "exp": T0 + 86400}
    assert b.core.time.floor == floor
    nonce = b.challenge(lock=LOCK, action="unlock")
    proof = issuer.proof(w.holder, token_bytes=tok, nonce=nonce, gw=GW, lock=LOCK, act="unlock")
    with pytest.raises(TokenError) as info:
        b.decide(tok, proof, lock=LOCK, action="unlock")
    assert info.value.code == "token_revoked"  # B11: survives restart


def test_rejected_document_is_reported_not_raised(tmp_path: Path) -> None:
    w = World()
    a = open_authz(w, tmp_path, ManualClock(T0))
    a.install(w.keyring(2))
    out = a.install(w.keyring(1))
    assert (out.rejected, out.kind, out.code) == (True, "keyring", "rollback")
    out = a.install(b"\x00\x01garbage")
    assert out.rejected and out.kind == "unknown"


def test_C5_floor_never_decreases_over_100_restarts_under_random_clocks(tmp_path: Path) -> None:
    w = World()
    rnd = random.Random(5)
    last = 0
    for i in range(100):
        clock = ManualClock(
            rnd.choice([0, T0 - 10**7, T0, T0 + rnd.randint(-(10**6), 10**6)]), is_synced=rnd.random() < 0.5
        )
        a = open_authz(w, tmp_path, clock)
        if i == 0:
            a.install(w.keyring())
        assert a.core.time.floor >= last
        tok = w.token(iat=T0 + rnd.randint(-3000, 3000))
        with contextlib.suppress(TokenError):
            a.decide(tok, w.prove(a.core, tok, mono=clock.mono()), lock=LOCK, action="unlock")
        if rnd.random() < 0.3:
            a.install(issuer.time_statement(w.issuer_a, site=SITE, t=T0 + rnd.randint(-(10**6), 10**6)))
        a.save_wall_clock()
        last = a.core.time.floor
        a.close()


def test_C5_floor_survives_kill_9_mid_write(tmp_path: Path) -> None:
    """A child raises the floor in a loop and is killed; the stored floor is intact and monotonic."""
    script = textwrap.dedent(f"""
        import sys
        from gateway.authz import TrustStore
        store = TrustStore(__import__("pathlib").Path({str(tmp_path / "trust.sqlite3")!r}))
        t = {T0}
        while True:
            t += 1
            store.raise_num("floor", t)
            if t == {T0} + 50:
                print("go", flush=True)
    """)
    last = 0
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline() == "go\n"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        store = TrustStore(tmp_path / "trust.sqlite3")
        floor = store.get_num("floor")
        assert floor is not None and floor >= last
        assert store._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        last = floor
        store.close()


def test_unknown_time_state_on_boot_at_1970(tmp_path: Path) -> None:
    w = World()
    a = open_authz(w, tmp_path, ManualClock(T0))
    a.install(w.keyring())
    a.close()
    clock = ManualClock(0, is_synced=False)
    b = open_authz(w, tmp_path, clock)
    assert b.time_view().state is TimeState.UNKNOWN
    tok = w.token()
    d = b.decide(tok, w.prove(b.core, tok, mono=clock.mono()), lock=LOCK, action="unlock")
    assert d.time_state is TimeState.UNKNOWN
    assert "trust_stale" not in b.alarms


def test_root_key_files(tmp_path: Path) -> None:
    w = World()
    good = tmp_path / "root.pub"
    good.write_text(b64url(cbor.dumps(w.root.public.to_cbor())) + "\n")
    raw = tmp_path / "root.cbor"
    raw.write_bytes(cbor.dumps(w.root.public.to_cbor()))
    assert set(load_root_keys([good])) == {b"root-1"}
    with pytest.raises(ConfigError, match="share kid"):
        load_root_keys([good, raw])
    nokid = tmp_path / "nokid.pub"
    nokid.write_bytes(cbor.dumps(w.root.public.to_cbor(with_kid=False)))
    with pytest.raises(ConfigError, match="no kid"):
        load_root_keys([nokid])
    small = tmp_path / "small.pub"
    small.write_bytes(cbor.dumps({1: 1, 2: b"r", 3: -8, -1: 6, -2: bytes.fromhex("01" + "00" * 31)}))
    with pytest.raises(ConfigError, match="small-order"):
        load_root_keys([small])
    with pytest.raises(ConfigError, match="cannot read"):
        load_root_keys([tmp_path / "absent.pub"])


def test_system_clock_answers() -> None:
    clock = SystemClock()
    assert clock.wall() > RELEASE_FLOOR - 10**9
    assert isinstance(clock.synced(), bool)
