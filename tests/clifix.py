"""The `lockgw` executable against `lockgw-sim` in a temporary field: config, keyring, phone key."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from broker import free_port
from credfix import SITE, World
from simproc import start_sim

from gateway.authz.keyfiles import b64url
from protocols import cbor, issuer

__all__ = [
    "EXE",
    "Daemon",
    "Field",
    "default_signals",
    "field",
    "ignoring_signals",
    "make_field",
    "start_daemon",
    "token_file",
]

EXE = [shutil.which("lockgw")] if shutil.which("lockgw") else [sys.executable, "-m", "gateway.cli.main"]


@dataclass
class Field:
    tmp: Path
    cfg: Path
    locks: list[dict[str, str]]
    w: World
    sim: subprocess.Popen[str]

    def run(self, *args: str, ok: bool | None = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*EXE, "--config", str(self.cfg), *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        if ok is True:
            assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    def act(
        self, action: str, lock: str, *flags: str, proof: bool = True, ok: bool | None = True
    ) -> subprocess.CompletedProcess[str]:
        """``lockgw [flags] unlock|lock L`` with a fresh token, and the phone's proof unless told not."""
        holder = ["--holder-key", str(self.tmp / "phone.key")] if proof else []
        return self.run(*flags, action, lock, "--token", str(token_file(self, lock)), *holder, ok=ok)

    def fault(self, lock: str, name: str, value: object = None) -> None:
        """A fault command to the simulator (docs/simulator.md), answered before we go on."""
        assert self.sim.stdin is not None and self.sim.stdout is not None
        self.sim.stdin.write(json.dumps({"lock": lock, "fault": name, "value": value}) + "\n")
        self.sim.stdin.flush()
        assert json.loads(self.sim.stdout.readline())["ok"] is True


#: What a shell without job control (``cmd &``, ``nohup cmd &``) leaves ignored in its children,
#: and SIGTERM besides.
INHERITED: tuple[signal.Signals, ...] = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM)


def _dispositions(handler: signal.Handlers) -> Callable[[], None]:
    def preexec() -> None:
        for sig in INHERITED:
            signal.signal(sig, handler)

    return preexec


#: ``preexec_fn`` for a child that starts with default signal dispositions, however the test run
#: itself was started (``(trap '' INT; pytest …)`` or ``nohup pytest … &`` ignore SIGINT).
default_signals = _dispositions(signal.SIG_DFL)
#: ``preexec_fn`` for a child started as by ``nohup … &``: SIGHUP, SIGINT, SIGQUIT, SIGTERM ignored.
ignoring_signals = _dispositions(signal.SIG_IGN)

#: Bounds the wait for a daemon to serve (not a speed requirement: it fails only a hung start).
READY_WITHIN_S = 60.0


@dataclass
class Daemon:
    """``lockgw run`` with its stdout and stderr in a file (never a pipe nobody reads)."""

    proc: subprocess.Popen[bytes]
    log: Path
    control: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def _answers(self) -> bool:
        with socket.socket(socket.AF_UNIX) as s:
            return s.connect_ex(str(self.control)) == 0

    def wait_ready(self) -> None:
        """Until the daemon's control socket takes connections (it opens last, once the daemon
        serves; whatever its log lines look like); fails with the daemon's output if it exits
        first or never gets there."""
        deadline = time.monotonic() + READY_WITHIN_S
        while not self._answers():
            if self.proc.poll() is not None:
                pytest.fail(f"the daemon exited with {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the daemon did not start serving:\n{self.output()}")
            time.sleep(0.05)

    def stop(self) -> int:
        """SIGTERM, then its exit code; kill -9 if it does not end (the test fails then)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            pytest.fail(f"the daemon did not stop on SIGTERM:\n{self.output()}")


def start_daemon(f: Field, *args: str, preexec: Callable[[], None] | None = None) -> Daemon:
    """``lockgw [args] run`` on the field's config, ready to serve; default signal dispositions
    unless ``preexec`` sets others."""
    log = f.tmp / f"daemon-{time.monotonic_ns()}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*EXE, "--config", str(f.cfg), *args, "run"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
            preexec_fn=preexec or default_signals,  # noqa: PLW1509 - the tests run no threads of their own
        )
    daemon = Daemon(proc, log, f.tmp / "ctl.sock")
    try:
        daemon.wait_ready()
    except BaseException:
        proc.kill()
        proc.wait(timeout=10)
        raise
    return daemon


def make_field(
    tmp: Path, *, gw: str = "gw-cli", seed: int = 51, extra_config: str = "", sim_args: tuple[str, ...] = ()
) -> Field:
    """Two simulated locks (a `lockgw-sim` process), a config naming them and a root key, a
    keyring signed by that root (``keyring.cose``) and the phone's key (``phone.key``) in ``tmp``.
    The caller ends the simulator (``field.sim``)."""
    port = free_port()
    sim, locks = start_sim(port, seed=seed, locks=2, extra=sim_args)
    w = World()
    root = tmp / "root.pub"
    root.write_text(b64url(cbor.dumps(w.root.public.to_cbor())))
    cfg = tmp / "lockgw.toml"
    cfg.write_text(
        f'[gateway]\nid = "{gw}"\nsite = "{SITE}"\ndata_dir = "{tmp / "data"}"\n'
        f'[ble]\nbackend = "bumble"\ntransport = "tcp-client:127.0.0.1:{port}"\n'
        f'[trust]\nroot_keys = ["{root}"]\n[control]\nsocket = "{tmp / "ctl.sock"}"\n' + extra_config
    )
    now = int(time.time())  # the CLI runs on the real clock
    (tmp / "keyring.cose").write_bytes(
        issuer.keyring(
            w.root,
            site=SITE,
            version=1,
            iat=now - 10,
            exp=now + 90 * 86400,
            entries=[issuer.KeyringEntry(w.issuer_a.public, now - 86400, now + 60 * 86400, ["staff"])],
        )
    )
    (tmp / "phone.key").write_text(b64url(cbor.dumps(w.holder.to_cbor())))
    return Field(tmp, cfg, locks, w, sim)


@pytest.fixture
def field(tmp_path: Path) -> Iterator[Field]:
    f = make_field(tmp_path)
    try:
        yield f
    finally:
        f.sim.terminate()
        f.sim.communicate(timeout=10)


def token_file(f: Field, lock: str) -> Path:
    path = f.tmp / f"t-{lock}.cwt"
    path.write_text(b64url(f.w.token(locks=[lock], iat=int(time.time()) - 30)))
    return path
