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

from gateway.authz.authorizer import RELEASE_FLOOR, Authorizer, TrustStore, load_root_keys
from gateway.authz.clock import ManualClock, SystemClock
from gateway.authz.keyfiles import b64url
from gateway.errors import ConfigError
from protocols import cbor, issuer
from protocols.cose import ALG_EDDSA, generate_private_key
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
        from gateway.authz.authorizer import TrustStore
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


# --- trust that survives rotation and restart (issue 10 §4) ---------------------------------


def retiring_keyring(w: World, version: int) -> bytes:
    """A rotation: issuer_a (which signed the revocation list) is retired; issuer_b stays."""
    return issuer.keyring(
        w.root,
        site=SITE,
        version=version,
        iat=T0 - 3600,
        exp=T0 + 90 * 86400,
        entries=[
            issuer.KeyringEntry(w.issuer_b.public, T0 - 86400, T0 + 120 * 86400, ["staff", "revocations"])
        ],
    )


def granted_or_code(a: Authorizer, w: World, tok: bytes) -> str:
    nonce = a.challenge(lock=LOCK, action="unlock")
    proof = issuer.proof(w.holder, token_bytes=tok, nonce=nonce, gw=GW, lock=LOCK, act="unlock")
    try:
        a.decide(tok, proof, lock=LOCK, action="unlock")
    except TokenError as exc:
        return exc.code
    return "granted"


def cti_of(tok: bytes) -> bytes:
    return cbor.loads(cbor.loads(tok).value[2])[7]  # type: ignore[union-attr, index, call-overload, no-any-return]


def test_B11_T8_revocations_survive_a_rotation_retiring_their_signer_and_a_restart(tmp_path: Path) -> None:
    w = World()
    clock = ManualClock(T0)
    a = open_authz(w, tmp_path, clock)
    a.install(w.keyring(1))
    revoked = w.token(w.issuer_b)
    rl = issuer.revocations(
        w.issuer_a, site=SITE, version=5, iat=T0 - 60, exp=T0 + 7 * 86400, cti=[cti_of(revoked)]
    )
    assert a.install(rl).installed
    assert a.install(retiring_keyring(w, 2)).installed  # issuer_a is gone from the keyring
    a.close()
    b = open_authz(w, tmp_path, clock)  # restart
    assert b.trust_summary()["revocations"] == {"version": 5, "exp": T0 + 7 * 86400}
    assert granted_or_code(b, w, revoked) == "token_revoked"
    assert b.trust_state() == "ok" and not b.alarms  # a normal rotation: nothing to alarm
    # The rollback that used to follow: a root-signed older list is refused.
    older = issuer.revocations(w.root, site=SITE, version=4, iat=T0, exp=T0 + 7 * 86400)
    out = b.install(older)
    assert (out.rejected, out.code) == (True, "rollback")
    assert granted_or_code(b, w, revoked) == "token_revoked"
    assert granted_or_code(b, w, w.token(w.issuer_b)) == "granted"
    b.close()
    c = open_authz(w, tmp_path, clock)  # and after one more restart
    assert granted_or_code(c, w, revoked) == "token_revoked"


def test_T8_version_floor_is_kept_apart_from_the_documents_and_never_decreases(tmp_path: Path) -> None:
    w = World()
    clock = ManualClock(T0)
    a = open_authz(w, tmp_path, clock)
    a.install(w.keyring(3))
    a.install(issuer.revocations(w.issuer_a, site=SITE, version=7, iat=T0 - 60, exp=T0 + 86400))
    a.store.commit(raise_nums={"keyring.version": 1, "revocations.version": 2})  # max(): no effect
    a.store._db.execute("DELETE FROM trust WHERE name IN ('revocations', 'revocations.signer')")
    a.close()
    b = open_authz(w, tmp_path, clock)
    assert b.trust_summary()["revocations"] is None
    assert b.store.get_num("revocations.version") == 7 and b.store.get_num("keyring.version") == 3
    for version in (1, 6):
        out = b.install(issuer.revocations(w.root, site=SITE, version=version, iat=T0, exp=T0 + 86400))
        assert (out.rejected, out.code) == (True, "rollback")
    assert (b.install(w.keyring(2)).code) == "rollback"
    # The lost version itself may come back (it is authentic and no older), and newer ones.
    assert b.install(issuer.revocations(w.issuer_a, site=SITE, version=7, iat=T0, exp=T0 + 86400)).installed
    assert b.install(issuer.revocations(w.issuer_a, site=SITE, version=8, iat=T0, exp=T0 + 86400)).installed


def test_T8_a_stored_keyring_whose_root_was_removed_is_kept_alarmed_and_stale(tmp_path: Path) -> None:
    w = World()
    clock = ManualClock(T0)
    a = open_authz(w, tmp_path, clock)
    a.install(w.keyring(4))
    a.close()
    new_root = generate_private_key(ALG_EDDSA, b"root-2", w.rng)
    b = Authorizer(
        gw_id=GW,
        site=SITE,
        roots={new_root.public.kid: new_root.public},  # the operator replaced root-1 in the config
        policy=w.policy,
        store=TrustStore(tmp_path / "trust.sqlite3"),
        clock=clock,
        release_floor=T0 - 400 * 86400,
    )
    assert b.trust_state() == "stale"
    assert "stored_keyring_unverified" in b.alarms and "trust_stale" in b.alarms
    assert granted_or_code(b, w, w.token()) == "granted"  # verified at install: staff are not locked out
    rotated = issuer.keyring(
        new_root,
        site=SITE,
        version=4,
        iat=T0,
        exp=T0 + 90 * 86400,
        entries=[issuer.KeyringEntry(w.issuer_b.public, T0 - 86400, T0 + 120 * 86400, ["staff"])],
    )
    assert b.install(rotated).code == "rollback"  # the version floor holds across roots too
    assert b.install(
        issuer.keyring(
            new_root,
            site=SITE,
            version=5,
            iat=T0,
            exp=T0 + 90 * 86400,
            entries=[issuer.KeyringEntry(w.issuer_b.public, T0 - 86400, T0 + 120 * 86400, ["staff"])],
        )
    ).installed
    assert b.trust_state() == "ok" and not b.alarms


def test_T8_a_damaged_stored_document_is_an_alarm_and_stale_never_silently_ok(tmp_path: Path) -> None:
    w = World()
    clock = ManualClock(T0)
    a = open_authz(w, tmp_path, clock)
    a.install(w.keyring(1))
    a.install(issuer.revocations(w.issuer_a, site=SITE, version=2, iat=T0 - 60, exp=T0 + 86400))
    raw = bytearray(a.store.get_blob("revocations") or b"")
    raw[-1] ^= 0xFF  # a flipped signature byte
    a.store.put_blob("revocations", bytes(raw))
    a.close()
    b = open_authz(w, tmp_path, clock)
    assert b.trust_state() == "stale" and "stored_revocations_unverified" in b.alarms
    assert b.trust_summary()["revocations"] == {"version": 2, "exp": T0 + 86400}  # still in force
    b.store.put_blob("revocations", b"\x00garbage")
    b.close()
    c = open_authz(w, tmp_path, clock)
    assert c.trust_state() == "stale" and "stored_revocations_unverified" in c.alarms
    assert c.trust_summary()["revocations"] is None
    assert c.install(issuer.revocations(w.issuer_a, site=SITE, version=3, iat=T0, exp=T0 + 86400)).installed
    assert c.trust_state() == "ok" and not c.alarms


def test_a_store_from_before_signers_and_version_floors_is_restored(tmp_path: Path) -> None:
    w = World()
    store = TrustStore(tmp_path / "trust.sqlite3")
    store.put_blob("keyring", w.keyring(2))
    store.put_blob(
        "revocations", issuer.revocations(w.issuer_a, site=SITE, version=9, iat=T0, exp=T0 + 86400)
    )
    store.close()
    a = open_authz(w, tmp_path, ManualClock(T0))
    assert a.trust_state() == "ok" and not a.alarms
    assert a.store.get_num("keyring.version") == 2 and a.store.get_num("revocations.version") == 9


def test_C6_tokens_never_move_the_persisted_floor_and_a_root_reset_survives_restart(tmp_path: Path) -> None:
    w = World()
    clock = ManualClock(T0, is_synced=False)
    a = open_authz(w, tmp_path, clock)
    a.install(w.keyring())
    floor = a.core.time.floor
    assert granted_or_code(a, w, w.token(iat=T0 + 59 * 86400)) == "granted"
    assert granted_or_code(a, w, w.token(iat=T0 + 30 * 86400, locks=["lk-other"])) == "wrong_lock"
    a.close()
    a = open_authz(w, tmp_path, clock)
    assert a.core.time.floor == floor
    assert a.install(issuer.time_statement(w.root, site=SITE, t=T0 + 2 * 3600)).installed  # pushed ahead
    assert granted_or_code(a, w, w.token()) == "token_expired"
    a.close()
    b = open_authz(w, tmp_path, clock)
    assert granted_or_code(b, w, w.token()) == "token_expired"
    reset = issuer.time_statement(w.root, site=SITE, t=T0, reset=True)
    out = b.install(reset)
    assert out.installed and out.kind == "time" and b.core.time.floor == T0
    b.close()
    c = open_authz(w, tmp_path, clock)
    assert c.core.time.floor == T0  # the lowered floor was persisted
    assert granted_or_code(c, w, w.token()) == "granted"
    again = c.install(reset)  # re-delivered on the retained topic after a restart: silent
    assert not again.installed and not again.rejected
    older = c.install(issuer.time_statement(w.root, site=SITE, t=T0 - 5, reset=True))
    assert (older.rejected, older.code) == (True, "rollback")
