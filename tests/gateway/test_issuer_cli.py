"""`lockgw-issuer` as a subprocess (the docs/credentials.md walk-through, end to end) and how its
key files reach the disk."""

from __future__ import annotations

import base64
import errno
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.authz.authorizer import Authorizer, TrustStore, load_root_keys
from gateway.authz.clock import ManualClock
from gateway.authz.keyfiles import read_document, write_atomic
from gateway.cli.issuer import parse_duration, parse_time
from protocols.credentials import Policy
from protocols.errors import TokenError

EXE = shutil.which("lockgw-issuer") or ""


def issuer(*args: str, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [EXE] if EXE else [sys.executable, "-m", "gateway.cli.issuer"]
    proc = subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_walkthrough(tmp_path: Path) -> None:
    run = lambda *a: issuer(*a, cwd=tmp_path)  # noqa: E731
    run("keygen", "--role", "root", "--alg", "EdDSA", "--out", "root-1")
    run("keygen", "--role", "issuer", "--alg", "EdDSA", "--out", "issuer-a")
    run("keygen", "--role", "issuer", "--alg", "ES256", "--out", "issuer-b")
    run("keygen", "--role", "holder", "--alg", "EdDSA", "--out", "phone-17")
    assert stat.S_IMODE((tmp_path / "root-1.key").stat().st_mode) == 0o600
    run(
        "keyring",
        "--root",
        "root-1.key",
        "--site",
        "site-a",
        "--version",
        "1",
        "--exp",
        "now+180d",
        "--entry",
        "issuer-a.pub,roles=staff+emergency+revocations+time,nbf=now-1d,exp=now+90d",
        "--entry",
        "issuer-b.pub,roles=staff,nbf=now-1d,exp=now+180d,max_ttl=8h",
        "--out",
        "keyring.cose",
    )
    run(
        "token",
        "--signer",
        "issuer-a.key",
        "--iss",
        "central",
        "--sub",
        "staff-17",
        "--aud",
        "site-a",
        "--lock",
        "lk-door-1",
        "--act",
        "unlock",
        "--ttl",
        "8h",
        "--holder",
        "phone-17.pub",
        "--out",
        "t.cwt",
    )
    token_b64 = run(
        "token",
        "--signer",
        "issuer-b.key",
        "--iss",
        "central",
        "--sub",
        "staff-18",
        "--aud",
        "gw-1",
        "--lock",
        "lk-door-1",
        "--holder",
        "phone-17.pub",
    ).stdout.strip()
    (tmp_path / "t2.cwt").write_text(token_b64 + "\n")

    authz = Authorizer(
        gw_id="gw-1",
        site="site-a",
        roots=load_root_keys([tmp_path / "root-1.pub"]),
        policy=Policy(),
        store=TrustStore(tmp_path / "trust.sqlite3"),
        clock=ManualClock(time.time()),
    )
    assert authz.install(read_document(tmp_path / "keyring.cose", "keyring")).installed
    for name in ("t.cwt", "t2.cwt"):
        nonce = authz.challenge(lock="lk-door-1", action="unlock")
        run(
            "prove",
            "--holder-key",
            "phone-17.key",
            "--token",
            name,
            # "=" form: a base64url nonce may start with "-", which argparse would take for a flag.
            "--nonce=" + base64.urlsafe_b64encode(nonce).decode().rstrip("="),
            "--gw",
            "gw-1",
            "--lock",
            "lk-door-1",
            "--act",
            "unlock",
            "--out",
            "proof.cose",
        )
        d = authz.decide(
            read_document(tmp_path / name, "token"),
            (tmp_path / "proof.cose").read_bytes(),
            lock="lk-door-1",
            action="unlock",
        )
        assert d.lock == "lk-door-1"
    run(
        "revocations",
        "--signer",
        "issuer-a.key",
        "--site",
        "site-a",
        "--version",
        "1",
        "--exp",
        "now+7d",
        "--sub",
        "staff-17@now+1m",
        "--out",
        "rl.cose",
    )
    assert authz.install((tmp_path / "rl.cose").read_bytes()).installed
    nonce = authz.challenge(lock="lk-door-1", action="unlock")
    run(
        "prove",
        "--holder-key",
        "phone-17.key",
        "--token",
        "t.cwt",
        "--nonce=" + base64.urlsafe_b64encode(nonce).decode(),
        "--gw",
        "gw-1",
        "--lock",
        "lk-door-1",
        "--act",
        "unlock",
        "--out",
        "proof.cose",
    )
    with pytest.raises(TokenError) as info:
        authz.decide(
            (tmp_path / "t.cwt").read_bytes(),
            (tmp_path / "proof.cose").read_bytes(),
            lock="lk-door-1",
            action="unlock",
        )
    assert info.value.code == "token_revoked"
    run("time", "--signer", "issuer-a.key", "--site", "site-a", "--out", "time.cose")
    assert not authz.install((tmp_path / "time.cose").read_bytes()).rejected


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["keygen", "--role", "boss", "--out", "x"], "--role"),
        (
            [
                "token",
                "--signer",
                "missing.key",
                "--iss",
                "c",
                "--sub",
                "s",
                "--aud",
                "a",
                "--lock",
                "l",
                "--bearer",
            ],
            "--signer",
        ),
        (
            [
                "keyring",
                "--root",
                "missing.key",
                "--site",
                "s",
                "--version",
                "1",
                "--exp",
                "now",
                "--entry",
                "x",
            ],
            "--root",
        ),
        (["time", "--signer", "x", "--site", "s", "--t", "yesterday-ish"], "--signer"),
    ],
)
def test_bad_arguments_exit_2_naming_the_flag(tmp_path: Path, args: list[str], names: str) -> None:
    proc = issuer(*args, cwd=tmp_path, ok=False)
    assert proc.returncode == 2
    assert names in proc.stderr
    assert "Traceback" not in proc.stderr


def test_time_and_duration_parsing() -> None:
    assert parse_duration("12h") == 43200 and parse_duration("90") == 90
    assert parse_time("now+1d", now=100) == 86500 and parse_time("-1h", now=7200) == 3600
    assert parse_time("2027-01-01T00:00:00Z") == 1798761600
    with pytest.raises(ValueError, match="bad time"):
        parse_time("tomorrow")


def test_D9_key_files_are_written_temp_fsync_rename_dir_fsync(
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
    target = tmp_path / "root-1.key"
    write_atomic(target, b"secret\n", mode=0o600)
    assert target.read_bytes() == b"secret\n" and target.stat().st_mode & 0o777 == 0o600
    assert [c[0] for c in calls] == ["fsync", "rename", "fsync"]
    assert calls[0][1].startswith(str(tmp_path / ".root-1.key.tmp"))  # the temp file, before
    assert calls[2][1] == str(tmp_path)  # the directory, after the rename


def test_D9_a_failed_write_leaves_the_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "keyring.cose"
    write_atomic(target, b"old")

    def eio(_fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(OSError, match="Input/output"):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["keyring.cose"]


def test_C6_time_reset_from_the_cli_is_installed_only_when_root_signed(tmp_path: Path) -> None:
    run = lambda *a: issuer(*a, cwd=tmp_path)  # noqa: E731
    run("keygen", "--role", "root", "--alg", "EdDSA", "--out", "root-1")
    run("keygen", "--role", "issuer", "--alg", "EdDSA", "--out", "issuer-a")
    run(
        "keyring", "--root", "root-1.key", "--site", "site-a", "--version", "1", "--iat", "now-1d",
        "--exp", "now+180d", "--entry", "issuer-a.pub,roles=staff+time,nbf=now-1d,exp=now+90d",
        "--out", "keyring.cose",
    )  # fmt: skip
    now = int(time.time())
    run("time", "--signer", "root-1.key", "--site", "site-a", "--t", str(now + 7200), "--out", "ahead.cose")
    for signer, name in (("root-1.key", "reset.cose"), ("issuer-a.key", "bad-reset.cose")):
        run("time", "--signer", signer, "--site", "site-a", "--t", str(now), "--reset", "--out", name)
    authz = Authorizer(
        gw_id="gw-1",
        site="site-a",
        roots=load_root_keys([tmp_path / "root-1.pub"]),
        policy=Policy(),
        store=TrustStore(tmp_path / "trust.sqlite3"),
        clock=ManualClock(now, is_synced=False),  # no NTP: the floor follows signed time
    )
    assert authz.install((tmp_path / "keyring.cose").read_bytes()).installed
    assert authz.install((tmp_path / "ahead.cose").read_bytes()).installed
    assert authz.core.time.floor == now + 7200
    bad = authz.install((tmp_path / "bad-reset.cose").read_bytes())
    assert (bad.rejected, bad.code) == (True, "bad_signature")
    assert authz.core.time.floor == now + 7200
    good = authz.install((tmp_path / "reset.cose").read_bytes())
    assert good.installed and good.kind == "time" and authz.core.time.floor == now
    assert "--reset" in issuer("time", "--help", cwd=tmp_path).stdout
