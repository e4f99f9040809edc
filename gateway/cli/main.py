"""``lockgw``: the daemon and the technician/operator CLI (CONTRACT §6), on click.

While the daemon runs, commands go through its control socket (``[control] socket``); without a
daemon they run directly on the data directory (one process at a time: a second direct user is
refused with exit 3 and told which process holds it).

Exit codes: 0 done; 1 refused or failed; 2 usage or configuration error (the message names the
flag or key); 3 the daemon or adapter is busy or unreachable. ``--json`` (before or after the
command) prints one JSON object; with ``events --follow``, one JSON object per line.

Output on a terminal is rich (tables, colour, spinners); piped, it is plain and stable
(:mod:`gateway.cli.ui`). Shell completion: ``eval "$(lockgw completion bash)"`` (or zsh, fish);
lock ids complete from the local registry when it is readable.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import logging
import re
import signal
import sqlite3
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Self, TypeVar, cast

import click
from click.shell_completion import CompletionItem, get_completion_class

from gateway.cli.ui import Ui
from gateway.config import Config, config_path, load_checked, load_config
from gateway.errors import AdapterUnavailable, ConfigError, LockgwError, OutboxError
from gateway.wire import (
    MAX_EVENTS_PAGE,
    MAX_STAGE_CHUNK_BYTES,
    SCAN_S_MAX,
    SCAN_S_MIN,
    ControlAnswer,
    JsonObject,
    WireError,
)
from protocols.event_encoding import INT64_MAX

__all__ = ["cli", "main"]

F = TypeVar("F", bound=Callable[..., Any])

#: Exit codes (CONTRACT §6).
EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_BUSY: Final = 3
#: `events --follow` polls this often; the control socket answers a poll in well under a ms.
FOLLOW_POLL_S: Final = 1.0
#: End a command cleanly (``_Stop``): Ctrl-C, and what systemd, ``timeout`` and ``kill`` send.
STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)

_CONTEXT: Final = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@dataclass
class Opts:
    """What the top-level options set; shared by every command through the click context."""

    config: str | None = None
    json: bool = False
    _ui: Ui | None = field(default=None, repr=False)

    @property
    def ui(self) -> Ui:
        if self._ui is None:
            self._ui = Ui(json_mode=self.json)
        return self._ui

    def load(self) -> Config:
        return load_config(config_path(self.config))


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(Opts).json = True


def json_option(f: F) -> F:
    """``--json`` also after the command (``lockgw locks --json``)."""
    return click.option(
        "--json",
        is_flag=True,
        expose_value=False,
        callback=_set_json,
        help="Print one JSON object (JSON lines with --follow).",
    )(f)


def _example(*lines: str) -> str:
    return "\b\nexample:\n" + "\n".join(f"  {line}" for line in lines)


def _complete_locks(ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Lock ids from the local registry (read-only; nothing when it cannot be read)."""
    root = ctx.find_root()
    try:
        config = load_config(config_path(root.params.get("config")), check_files=False)
        path = config.gateway.data_dir / "locks.sqlite3"
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            rows = db.execute(
                "SELECT lock, name FROM locks WHERE lock LIKE ? || '%'", (incomplete,)
            ).fetchall()
    except (LockgwError, OSError, sqlite3.Error):
        return []
    return [CompletionItem(lock, help=name or None) for lock, name in rows]


# --- where a command goes: the daemon, or the data directory --------------------------------------


#: Direct-mode commands that only read: they never keep ``lockgw run`` from starting.
_READERS: Final = frozenset({"events", "locks", "trust_show", "ping"})


class _DaemonOrDirect:
    """Where a command's calls go: the daemon's control socket, or — without a daemon — one
    direct Gateway held for the whole command (so a challenge and the unlock that answers it
    meet the same in-memory nonce)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._gw: Any = None

    async def call(self, cmd: str, args: JsonObject) -> ControlAnswer:
        """One command's answer, from the daemon or the direct gateway (parsed once, here)."""
        return ControlAnswer.parse(await self._call(cmd, args))

    async def _call(self, cmd: str, args: JsonObject) -> JsonObject:
        from gateway.cli.commands import dispatch  # noqa: PLC0415
        from gateway.runtime.control import call  # noqa: PLC0415 - keeps CLI start-up light

        if self._gw is None:
            try:
                return await call(self.config.control.socket, cmd, args)
            except (FileNotFoundError, ConnectionRefusedError):
                from gateway.runtime.app import Gateway  # noqa: PLC0415

                # Readers hold no lock on the data directory: the daemon always wins it.
                gw = Gateway(self.config, direct=True, readonly=cmd in _READERS)
                await gw.__aenter__()
                self._gw = gw
            except PermissionError as exc:
                raise AdapterUnavailable(
                    f"control socket {self.config.control.socket}: permission denied; "
                    "join the lockgw group or use sudo"
                ) from exc
        return await dispatch(self._gw, cmd, args)

    async def close(self) -> None:
        if self._gw is not None:
            await self._gw.__aexit__(None, None, None)
            self._gw = None


class _Stop:
    """SIGINT and SIGTERM for one command, installed whatever dispositions the process inherited.

    A shell without job control (``cmd &``, ``nohup cmd &``) starts its children with SIGINT and
    SIGQUIT ignored, and Python then installs no Ctrl-C handler: such a ``events --follow`` never
    ended. Here the first signal cancels the command's work (again every ``CANCEL_RETRY_S`` until
    it ended: python/cpython#86296) and its cleanup then runs normally; a second signal while it
    is still ending takes the signal's default action at once (Ctrl-C twice forces).
    """

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None
        self._event = asyncio.Event()

    def __enter__(self) -> Self:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._received, sig)
        return self

    def __exit__(self, *exc: object) -> None:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)

    def _received(self, sig: signal.Signals) -> None:
        if self.signal is not None:
            signal.signal(sig, signal.SIG_DFL)
            signal.raise_signal(sig)
        self.signal = sig
        self._event.set()

    async def run(self, work: Awaitable[int]) -> int | None:
        """``work``'s result, or None once a signal arrived and ``work`` was cancelled and ended."""
        from gateway.tasks import cancel_and_wait  # noqa: PLC0415 - keeps CLI start-up light

        task = asyncio.ensure_future(work)
        waiter = asyncio.ensure_future(self._event.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait([task, waiter])
        return None if task.cancelled() else task.result()  # its own error propagates


def _stopped_by(sig: signal.Signals, *, as_json: bool) -> int:
    """A command other than ``--follow`` ended by a signal: say so; exit 128 + the signal."""
    return _fail(f"stopped by {sig.name}", "failed", 128 + sig.value, as_json=as_json)


def _run_stoppable(
    work: Callable[[], Awaitable[int]],
    *,
    stopped: Callable[[signal.Signals], int],
    cleanup: Callable[[], Awaitable[None]] | None = None,
) -> int:
    """``asyncio.run`` for a long-running command, ended cleanly by SIGINT or SIGTERM (:class:`_Stop`):
    ``cleanup`` runs either way, and a stopped command returns ``stopped(signal)``."""

    async def go() -> int:
        with _Stop() as stop:
            try:
                rc = await stop.run(work())
            finally:
                if cleanup is not None:
                    await cleanup()
            if rc is None:  # only a signal cancels the work
                assert stop.signal is not None
                return stopped(stop.signal)
            return rc

    return asyncio.run(go())


def _with_gateway(
    opts: Opts,
    body: Callable[[_DaemonOrDirect, Ui], Awaitable[int]],
    *,
    stopped: Callable[[signal.Signals], int] | None = None,
) -> int:
    """Run ``body`` against the daemon (or the direct gateway); SIGINT or SIGTERM end it, and
    the direct gateway is closed either way."""
    config = opts.load()
    target = _DaemonOrDirect(config)
    return _run_stoppable(
        lambda: body(target, opts.ui),
        stopped=stopped or (lambda sig: _stopped_by(sig, as_json=opts.json)),
        cleanup=target.close,
    )


def _emit(ui: Ui, answer: ControlAnswer, human: Callable[[Any], None]) -> int:
    """Print an answer: its data (JSON or human), or its error (JSON or stderr)."""
    if ui.json_mode:
        ui.json(answer.data if answer.ok else {"error": answer.error, "code": answer.code})
    elif answer.ok:
        human(answer.data)
    else:
        code = f"{answer.code}: " if answer.code else ""
        ui.error(f"{code}{answer.error}")
    return answer.exit


# --- the command line --------------------------------------------------------------------------------


@click.group(
    context_settings=_CONTEXT,
    epilog="Exit codes: 0 done, 1 refused or failed, 2 usage or configuration error, "
    "3 daemon or adapter busy or unreachable. See `lockgw COMMAND --help`.",
)
@click.option(
    "--config",
    metavar="PATH",
    default=None,
    help="Configuration file (TOML); else $LOCKGW_CONFIG, else /etc/lockgw/lockgw.toml.",
)
@click.option("--json", "json_", is_flag=True, help="Print one JSON object (JSON lines with --follow).")
@click.version_option(package_name="lockgw", prog_name="lockgw")
@click.pass_context
def cli(ctx: click.Context, config: str | None, json_: bool) -> None:
    """lockgw: offline-first gateway for home-care door locks, and its technician/operator CLI."""
    opts = ctx.ensure_object(Opts)
    opts.config = config
    opts.json = opts.json or json_
    if ctx.invoked_subcommand not in ("run", "demo"):
        # A command's own messages say what went wrong, once; the direct gateway's warnings
        # (each retry of a lock out of range) would only repeat them. Errors still show; the
        # previous level is back when the command ends (the CLI also runs in-process).
        import structlog  # noqa: PLC0415 - keeps CLI start-up light

        from gateway import log  # noqa: PLC0415

        log.get("cli")  # the one configuration, made now, so nothing later resets the level
        previous = structlog.get_config()["wrapper_class"]
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
        # The libraries' stdlib loggers too (asyncio's debug-mode "Executing … took" warnings).
        root = logging.getLogger()
        previous_level = root.level
        root.setLevel(logging.ERROR)

        def restore() -> None:
            structlog.configure(wrapper_class=previous)
            root.setLevel(previous_level)

        ctx.call_on_close(restore)


@cli.command(epilog=_example("lockgw --config /etc/lockgw/lockgw.toml run"))
@json_option
@click.pass_obj
def run(opts: Opts) -> int:
    """Run the gateway daemon (systemd: Type=notify)."""
    return asyncio.run(_run_daemon(load_checked(config_path(opts.config)).config))


@cli.command(epilog=_example("lockgw demo", "lockgw demo --locks 5 --seed 7"))
@click.option("--locks", type=click.IntRange(1, 20), default=3, show_default=True, help="Simulated locks.")
@click.option("--seed", type=int, default=None, help="Seed for a repeatable shift.")
@json_option
def demo(locks: int, seed: int | None) -> int:
    """Play a scripted shift: simulated locks, broker, gateway."""
    from gateway.cli.demo import run_demo  # noqa: PLC0415

    return _run_stoppable(
        lambda: run_demo(locks=locks, seed=seed), stopped=lambda sig: _stopped_by(sig, as_json=False)
    )


@cli.group(epilog=_example("lockgw config check /etc/lockgw/lockgw.toml"))
def config() -> None:
    """Configuration commands."""


@config.command("check", epilog=_example("lockgw config check /etc/lockgw/lockgw.toml"))
@click.argument("path", required=False, type=click.Path(dir_okay=False))
@json_option
@click.pass_obj
def config_check(opts: Opts, path: str | None) -> int:
    """Validate a configuration file.

    Every error names the key and the file line; secret values are never printed.
    """
    where = Path(path) if path else config_path(opts.config)
    cfg = load_checked(where).config  # exactly what `run` validates, root key files included
    summary = {
        "ok": True,
        "path": str(where),
        "gateway": cfg.gateway.id,
        "site": cfg.gateway.site,
        "mqtt": cfg.mqtt.url if cfg.mqtt else None,
        "ble": cfg.ble.backend,
    }
    if opts.ui.json_mode:
        opts.ui.json(summary)
    else:
        broker = f"broker {cfg.mqtt.url}" if cfg.mqtt else "no broker (offline: events stay in the outbox)"
        opts.ui.line(f"{where}: ok (gateway {cfg.gateway.id}, site {cfg.gateway.site}, {broker})")
    return EXIT_OK


#: ``scan`` asks the daemon (or the adapter) for this long at a time, and shows what came in.
SCAN_SLICE_S: Final = 1.0
_SCAN_COLS: Final = ("lock", "address", "rssi", "paired", "pairing_mode", "paired_here")


@cli.command(
    epilog=_example("lockgw scan --timeout 10", "lockgw --json scan --follow   # JSON lines as found")
)
@click.option(
    "--timeout",
    type=click.FloatRange(SCAN_S_MIN, SCAN_S_MAX),
    default=5.0,
    show_default=True,
    help="Seconds to listen (0.5..60).",
)
@click.option("--follow", "-f", is_flag=True, help="Print each lock as it is found (JSON lines with --json).")
@json_option
@click.pass_obj
def scan(opts: Opts, timeout: float, follow: bool) -> int:
    """List nearby locks, as they are found.

    Address, lock id, signal strength, and whether each is paired (here or elsewhere) or in
    pairing mode. On a terminal the table fills in live; piped, it is printed at the end (one
    line per lock as found with --follow); --json prints one object at the end, or with
    --follow one JSON line per lock as it is found.
    """

    return _with_gateway(
        opts,
        lambda link, ui: _Scan(link, ui, timeout=timeout, follow=follow).run(),
        # --follow ends with Ctrl-C or SIGTERM as `events --follow` does: that is success.
        stopped=(lambda _sig: EXIT_OK) if follow else None,
    )


class _Scan:
    """``lockgw scan``: asks for ``SCAN_SLICE_S`` at a time and shows what came in, live."""

    def __init__(self, link: _DaemonOrDirect, ui: Ui, *, timeout: float, follow: bool) -> None:
        self.link, self.ui, self.timeout, self.follow = link, ui, timeout, follow
        self.found: dict[str, dict[str, Any]] = {}

    def rows(self) -> list[dict[str, Any]]:
        return sorted(self.found.values(), key=lambda d: -int(d["rssi"] or -999))

    def _streamed(self, new: dict[str, Any]) -> None:
        if self.ui.json_mode:
            self.ui.json(new)
        else:
            self.ui.line("  ".join(f"{c}={new.get(c)}" for c in _SCAN_COLS))

    async def _listen(self, show: Callable[[list[dict[str, Any]]], None] | None) -> ControlAnswer | None:
        """Until the timeout; a failed answer is returned as it came."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while (left := deadline - loop.time()) > 0.05:
            a = await self.link.call("scan", {"timeout": max(0.5, min(SCAN_SLICE_S, left))})
            if not a.ok or a.data is None:
                return a
            for d in cast("list[dict[str, Any]]", a.data["locks"]):
                if d["lock"] not in self.found and self.follow:
                    self._streamed(d)
                self.found[d["lock"]] = d
            if show is not None:
                show(self.rows())
        return None

    async def run(self) -> int:
        ui, title = self.ui, "locks in range"
        if ui.terminal and not self.follow:
            caption = f"scanning for {self.timeout:g} s …"
            with ui.live_table(_SCAN_COLS, title=title, caption=caption) as show:
                failed = await self._listen(show)
        else:
            with ui.progress(f"scanning for {self.timeout:g} s …"):
                failed = await self._listen(None)
        if failed is not None:
            return _emit(ui, failed, lambda _d: None)
        if self.follow:
            return EXIT_OK
        if ui.json_mode:
            ui.json({"locks": self.rows()})
        elif not ui.terminal:
            ui.table(self.rows(), _SCAN_COLS, title=title)
        elif not self.found:
            ui.note("(no locks in range)")
        return EXIT_OK


#: A setup code is a dozen characters; one line of stdin longer than this is not one.
MAX_SETUP_CODE: Final = 256


def _setup_code(code: str | None) -> str:
    """``--code``, else asked for on the terminal (not echoed), else one line of stdin: the code
    never needs to be on a command line (shell history, ``ps``)."""
    if code is not None:
        return code
    if sys.stdin is not None and sys.stdin.isatty():
        return str(click.prompt("setup code (printed on the lock unit)", hide_input=True, err=True)).strip()
    line = sys.stdin.readline(MAX_SETUP_CODE + 1) if sys.stdin is not None else ""
    if len(line) > MAX_SETUP_CODE:
        raise click.BadParameter(f"longer than {MAX_SETUP_CODE} characters", param_hint="'--code' (stdin)")
    if not line.strip():
        raise click.BadParameter(
            "no setup code: give --code, type it at the prompt, or pipe one line to stdin",
            param_hint="'--code'",
        )
    return line.strip()


@cli.command(
    epilog=_example(
        "lockgw pair C0:12:34:56:78:9A --name 'Front door'      # asks for the code, not echoed",
        "lockgw pair C0:12:34:56:78:9A < code.txt              # or one line of stdin",
    )
)
@click.argument("address")
@click.option(
    "--code",
    default=None,
    help="The setup code printed on the lock unit; without it, asked for (not echoed) or read from stdin.",
)
@click.option("--name", default="", help="A name for the door (shown in tables and events).")
@json_option
@click.pass_obj
def pair(opts: Opts, address: str, code: str | None, name: str) -> int:
    """Pair a lock that is in pairing mode; prints the lock id alone."""
    code = _setup_code(code)

    async def body(target: _DaemonOrDirect, ui: Ui) -> int:
        ui.note("put the lock in pairing mode (hold its button until the light blinks blue)")
        with ui.progress(f"pairing with {address} …"):
            a = await target.call("pair", {"address": address, "code": code, "name": name})
        # CONTRACT §6: pair prints the lock id (alone, so `L=$(lockgw pair …)` works).
        code_rc = _emit(ui, a, lambda d: ui.line(str(d["lock"])))
        if a.ok and a.data is not None and not ui.json_mode:
            ui.note(f"paired {a.data['lock']} {a.data.get('name') or ''}".rstrip())
        return code_rc

    return _with_gateway(opts, body)


@cli.command(
    epilog=_example("lockgw unpair lk-1a2b3c4d", "lockgw unpair lk-1a2b3c4d --force   # lock gone for good")
)
@click.argument("lock", shell_complete=_complete_locks)
@click.option("--force", is_flag=True, help="Forget the lock here even if it cannot be reached (recorded).")
@json_option
@click.pass_obj
def unpair(opts: Opts, lock: str, force: bool) -> int:
    """Wipe a lock's key on both ends."""

    async def body(target: _DaemonOrDirect, ui: Ui) -> int:
        with ui.progress(f"unpairing {lock} …"):
            a = await target.call("unpair", {"lock": lock, "force": force})
        return _emit(ui, a, lambda _d: ui.line(f"unpaired {lock}"))

    return _with_gateway(opts, body)


def _lock_table(ui: Ui, answer: ControlAnswer) -> int:
    from gateway.runtime.service import LockView  # noqa: PLC0415

    return _emit(ui, answer, lambda d: ui.table(d["locks"], list(LockView.FIELDS), title="locks"))


@cli.command(epilog=_example("lockgw locks", "lockgw --json locks"))
@json_option
@click.pass_obj
def locks(opts: Opts) -> int:
    """List paired locks and their last known state."""

    async def body(target: _DaemonOrDirect, ui: Ui) -> int:
        return _lock_table(ui, await target.call("locks", {}))

    return _with_gateway(opts, body)


@cli.command(epilog=_example("lockgw status lk-1a2b3c4d", "lockgw status"))
@click.argument("lock", required=False, shell_complete=_complete_locks)
@json_option
@click.pass_obj
def status(opts: Opts, lock: str | None) -> int:
    """Refresh and show a lock's state (every lock without L)."""

    async def body(target: _DaemonOrDirect, ui: Ui) -> int:
        if lock is None:
            with ui.progress("asking every lock …"):
                return _lock_table(ui, await target.call("status", {}))
        with ui.progress(f"asking {lock} …"):
            a = await target.call("status", {"lock": lock})
        return _emit(ui, a, lambda d: ui.line("\n".join(f"{k:>13}: {v}" for k, v in d.items())))

    return _with_gateway(opts, body)


def _actuate_command(action: str) -> click.Command:
    @click.argument("lock", shell_complete=_complete_locks)
    @click.option(
        "--token", required=True, type=click.Path(dir_okay=False), help="Token file (raw COSE or base64url)."
    )
    @click.option(
        "--holder-key",
        type=click.Path(dir_okay=False),
        default=None,
        help="Phone key for the proof of possession (COSE_Key or PKCS#8 PEM).",
    )
    @json_option
    @click.pass_obj
    def command(opts: Opts, lock: str, token: str, holder_key: str | None) -> int:
        return _with_gateway(opts, lambda target, ui: _actuate(target, ui, action, lock, token, holder_key))

    command.__doc__ = (
        f"{action.capitalize()} a door with a token.\n\n"
        "With --holder-key the CLI asks for a challenge and answers it with a proof of possession,\n"
        "exactly as a phone would."
    )
    return cli.command(
        action,
        epilog=_example(f"lockgw {action} lk-1a2b3c4d --token t.cwt --holder-key phone.key"),
    )(command)


async def _actuate(  # noqa: PLR0917 - the command's arguments
    target: _DaemonOrDirect, ui: Ui, action: str, lock: str, token_path: str, holder_key: str | None
) -> int:
    from gateway.authz.keyfiles import read_document, read_private_key  # noqa: PLC0415
    from protocols import issuer  # noqa: PLC0415

    token = read_document(Path(token_path), "--token")
    payload: JsonObject = {"lock": lock, "token": base64.urlsafe_b64encode(token).decode().rstrip("=")}
    with ui.progress(f"{action}ing {lock} …"):
        if holder_key:
            holder = read_private_key(Path(holder_key), "--holder-key")
            ch = await target.call(
                "request", {"action": "challenge", "payload": {"lock": lock, "act": action}}
            )
            if not ch.ok:
                return _emit(ui, ch, lambda _d: None)
            data = _answered(ch)
            nonce = base64.urlsafe_b64decode(str(data["nonce"]) + "==")
            proof = issuer.proof(
                holder, token_bytes=token, nonce=nonce, gw=str(data["gw"]), lock=lock, act=action
            )
            payload["proof"] = base64.urlsafe_b64encode(proof).decode().rstrip("=")
        answer = await target.call("request", {"action": action, "payload": payload})
    if ui.json_mode:
        ui.json(answer.data)
    elif answer.ok:
        d = _answered(answer)
        ui.line(f"{d['lock']}: {d['state']} (event #{d['seq']})")
    else:
        ui.error(f"{action} refused: {answer.code}: {answer.error}")
    return answer.exit


def _answered(answer: ControlAnswer) -> JsonObject:
    """The data of a ``request`` command's ok answer: the MQTT response's own ``data``."""
    inner = (answer.data or {}).get("data")
    if not isinstance(inner, dict):
        raise WireError("the daemon's answer to a request carries no data")
    return inner


_actuate_command("unlock")
_actuate_command("lock")

_DURATION: Final = re.compile(r"(\d+)([smhd])")
_UNITS: Final = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


class _When(click.ParamType[str]):
    """A point in time: ISO 8601 (``2026-11-22``, ``2026-11-22T10:00``, with or without an
    offset; local time without one) or an age (``90s``, ``15m``, ``2h``, ``3d`` ago). Converted to
    the events' ``ts`` format (UTC, milliseconds, ``Z``), which compares as a string."""

    name = "TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip()
        try:
            if m := _DURATION.fullmatch(text):
                when = datetime.now(UTC) - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
            else:
                when = datetime.fromisoformat(text)
                if when.tzinfo is None:
                    when = when.astimezone()
            when = when.astimezone(UTC)
        except (ValueError, OverflowError):  # not a time, or one outside years 1..9999
            self.fail(f"{text!r} is neither ISO 8601 (2026-11-22T10:00) nor an age (15m, 2h, 3d)", param, ctx)
        return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


@cli.command(
    epilog=_example(
        "lockgw events --since 100 --follow",
        "lockgw events --lock lk-1a2b3c4d --type 'access.*' --from 2h",
        "lockgw --json events --sub staff-17 --from 2026-11-22 --until 2026-11-23",
    )
)
@click.option(
    "--since",
    type=click.IntRange(min=1, max=INT64_MAX),
    default=1,
    show_default=True,
    help="First seq to show.",
)
@click.option(
    "--limit", type=click.IntRange(1, MAX_EVENTS_PAGE), default=100, show_default=True, help="Events at most."
)
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events (JSON lines with --json).")
@click.option("--lock", default=None, shell_complete=_complete_locks, help="Only this lock's events.")
@click.option("--type", "type_", metavar="TYPE", default=None, help="Only this type, or a prefix: access.*")
@click.option("--sub", default=None, help="Only this subject (staff id).")
@click.option("--from", "from_", type=_When(), default=None, help="From this time (ISO 8601, or an age: 2h).")
@click.option("--until", type=_When(), default=None, help="Before this time (ISO 8601, or an age).")
@json_option
@click.pass_obj
def events(  # noqa: PLR0917 - click passes one parameter per option
    opts: Opts,
    since: int,
    limit: int,
    follow: bool,
    lock: str | None,
    type_: str | None,
    sub: str | None,
    from_: str | None,
    until: str | None,
) -> int:
    """Show events (history, filters, --follow).

    Replayed events and events decided with a caveat (stale trust documents, unsynchronised
    clock, emergency alarm) are tagged; on a terminal a tick marks what central has receipted.
    """
    filters = {"lock": lock, "type": type_, "sub": sub, "from": from_, "until": until}
    given: JsonObject = {k: v for k, v in filters.items() if v}

    async def body(target: _DaemonOrDirect, ui: Ui) -> int:
        cursor = since
        while True:
            a = await target.call("events", {"since": cursor, "limit": limit, **given})
            if not a.ok or a.data is None:
                return _emit(ui, a, lambda _d: None)
            page: dict[str, Any] = a.data
            if not follow:
                return _show_events(ui, page, cursor)
            _print_followed(ui, page)
            cursor = page["next"]
            if len(page["events"]) < limit:
                await asyncio.sleep(FOLLOW_POLL_S)

    # --follow ends with Ctrl-C or SIGTERM: that is success. (KeyboardInterrupt: a Ctrl-C
    # while the configuration is read, before the command's own handling is installed.)
    try:
        return _with_gateway(
            opts, body, stopped=lambda _sig: EXIT_OK if follow else _stopped_by(_sig, as_json=opts.json)
        )
    except KeyboardInterrupt:
        if follow:
            return EXIT_OK
        raise


def _show_events(ui: Ui, page: dict[str, Any], cursor: int) -> int:
    """One page of history: JSON, a table, or a note that nothing matched."""
    if ui.json_mode:
        ui.json(page)
    elif page["events"]:
        ui.event_table(page["events"], receipt_seq=page["receipt_seq"])
    else:
        ui.note(f"(no matching events from #{cursor}; the last is #{page['last_seq']})")
    return EXIT_OK


def _print_followed(ui: Ui, page: dict[str, Any]) -> None:
    """``--follow``: each event as a JSON line or a line of text."""
    for e in page["events"]:
        if ui.json_mode:
            ui.json(e)
        else:
            ui.event(e, receipt_seq=page["receipt_seq"])


@cli.group(epilog=_example("lockgw trust show", "lockgw trust install keyring.cose"))
def trust() -> None:
    """Keyring, revocation list and time floor."""


def _doc(doc: Any) -> str:
    if not isinstance(doc, dict):
        return "none"
    return f"v{doc['version']}, exp {doc['exp']} ({doc.get('days_left', '?')} days left)"


@trust.command("show", epilog=_example("lockgw trust show", "lockgw --json trust show"))
@json_option
@click.pass_obj
def trust_show(opts: Opts) -> int:
    """Installed keyring and revocation list (versions, days to expiry) and the time floor."""

    async def body(target: _DaemonOrDirect, ui: Ui) -> int:
        a = await target.call("trust_show", {})
        d: dict[str, Any] = a.data or {}
        if a.ok and ui.json_mode:
            for name in ("keyring", "revocations"):
                if isinstance(d.get(name), dict):
                    d[name].pop("days_left", None)
        t = d.get("time", {})
        return _emit(
            ui,
            a,
            lambda _d: ui.line(
                f"keyring:     {_doc(d.get('keyring'))}\n"
                f"revocations: {_doc(d.get('revocations'))}\n"
                f"time:        state {t.get('state')}, floor {t.get('floor')}"
            ),
        )

    return _with_gateway(opts, body)


@trust.command("install", epilog=_example("lockgw trust install keyring.cose"))
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@json_option
@click.pass_obj
def trust_install(opts: Opts, file: str) -> int:
    """Install a keyring, revocation list or time statement (told apart by content type)."""
    raw = Path(file).read_bytes()

    async def body(target: _DaemonOrDirect, ui: Ui) -> int:
        a = await target.call("trust_install", {"document": base64.b64encode(raw).decode()})
        return _emit(
            ui,
            a,
            lambda d: ui.line(
                f"{d.get('kind')} v{d.get('version')} "
                + ("installed" if d.get("installed") else "already installed")
            ),
        )

    return _with_gateway(opts, body)


@cli.group(epilog=_example("lockgw firmware status", "lockgw firmware apply manifest.cose app.signed.bin"))
def firmware() -> None:
    """Firmware rollouts to the locks (docs/firmware.md)."""


def _firmware_answer(a: ControlAnswer) -> ControlAnswer:
    """A control ``request`` answer with the use case's data lifted to ``data``."""
    if a.ok:
        inner = (a.data or {}).get("data")
        return ControlAnswer.done(inner if isinstance(inner, dict) else {})
    return a


def _rollout_rows(data: Any) -> list[dict[str, Any]]:
    return [
        {"rollout": r["rollout"], "version": r["version"], **lk}
        for r in (data or {}).get("rollouts", [])
        for lk in r["locks"]
    ]


async def _firmware_status(link: _DaemonOrDirect) -> ControlAnswer:
    return _firmware_answer(await link.call("request", {"action": "firmware_status", "payload": {}}))


@firmware.command("status", epilog=_example("lockgw firmware status", "lockgw --json firmware status"))
@json_option
@click.pass_obj
def firmware_status(opts: Opts) -> int:
    """Rollouts and each lock's step (pending, uploading %, testing, confirmed, reverted, ...)."""

    async def body(link: _DaemonOrDirect, ui: Ui) -> int:
        a = await _firmware_status(link)
        cols = ["rollout", "version", "lock", "ring", "state", "progress", "reason"]
        return _emit(ui, a, lambda d: ui.table(_rollout_rows(d), cols, title="firmware"))

    return _with_gateway(opts, body)


#: A staging command that is told another offset than it sent asks again this many times at most
#: (another sender of the same image, or a gateway restarted between two chunks).
STAGE_RESYNCS: Final = 8


async def _stage_image(link: _DaemonOrDirect, ui: Ui, image: bytes) -> ControlAnswer:
    """Stage ``image`` with ``firmware_stage`` in chunks (docs/firmware.md §Staging), from where
    the gateway's copy stands: a command run again after an interruption sends only the rest.
    A progress bar on a terminal, a line per chunk otherwise (stderr)."""
    base: JsonObject = {"sha256": hashlib.sha256(image).hexdigest(), "size": len(image)}

    async def stage(offset: int, data: bytes) -> ControlAnswer:
        payload = {**base, "offset": offset, "data": base64.urlsafe_b64encode(data).decode().rstrip("=")}
        return _firmware_answer(await link.call("request", {"action": "firmware_stage", "payload": payload}))

    answer, resyncs = await stage(0, b""), 0  # where the gateway stands
    with ui.transfer(len(image), f"staging {str(base['sha256'])[:12]}") as advance:
        while answer.ok and not (answer.data or {}).get("complete"):
            off = int(str((answer.data or {}).get("offset", 0)))
            advance(off)
            answer = await stage(off, image[off : off + MAX_STAGE_CHUNK_BYTES])
            if not answer.ok and answer.code == "stage_offset" and resyncs < STAGE_RESYNCS:
                resyncs += 1
                answer = await stage(0, b"")
        if answer.ok:
            advance(len(image))
    return answer


@firmware.command("stage", epilog=_example("lockgw firmware stage app.signed.bin"))
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@json_option
@click.pass_obj
def firmware_stage(opts: Opts, image: str) -> int:
    """Stage a signed image on the gateway in chunks (resumes where an interrupted one stopped)."""
    raw = Path(image).read_bytes()

    async def body(link: _DaemonOrDirect, ui: Ui) -> int:
        a = await _stage_image(link, ui, raw)
        return _emit(ui, a, lambda d: ui.line(f"staged {d['sha256']} ({d['size']} bytes)"))

    return _with_gateway(opts, body)


@firmware.command("apply", epilog=_example("lockgw firmware apply manifest.cose app.signed.bin --wait"))
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False))
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.option("--wait", is_flag=True, help="Follow the rollout until it ends (progress on a terminal).")
@json_option
@click.pass_obj
def firmware_apply(opts: Opts, manifest: str, image: str, *, wait: bool) -> int:
    """Stage the signed image in chunks, check the signed rollout manifest, start the rollout."""
    raw = Path(image).read_bytes()
    payload = {
        "manifest": base64.urlsafe_b64encode(Path(manifest).read_bytes()).decode(),
        "image_sha256": hashlib.sha256(raw).hexdigest(),
    }

    async def body(link: _DaemonOrDirect, ui: Ui) -> int:
        staged = await _stage_image(link, ui, raw)
        if not staged.ok:
            return _emit(ui, staged, lambda _d: None)
        a = _firmware_answer(await link.call("request", {"action": "firmware_apply", "payload": payload}))
        if not a.ok or not wait:
            return _emit(
                ui,
                a,
                lambda d: ui.line(f"rollout {d['rollout']} of {d['version']} started: rings {d['rings']}"),
            )
        rollout, last = (a.data or {}).get("rollout"), ""
        while True:
            s = await _firmware_status(link)
            listed = (s.data or {}).get("rollouts")
            mine: list[Any] = [
                r
                for r in (listed if isinstance(listed, list) else [])
                if isinstance(r, dict) and r.get("rollout") == rollout
            ]
            if not s.ok or not mine or mine[0]["state"] != "running":
                break
            done = sum(
                lk["state"] in ("confirmed", "reverted", "refused", "failed", "halted")
                for lk in mine[0]["locks"]
            )
            message = f"rollout {rollout}: {done}/{len(mine[0]['locks'])} locks done"
            if message == last and not ui.err.is_terminal:
                await asyncio.sleep(1.0)  # a pipe gets one line per change, a terminal a spinner
                continue
            last = message
            with ui.progress(message):
                await asyncio.sleep(1.0)
        code = _emit(
            ui, s, lambda _d: ui.table(_rollout_rows({"rollouts": mine}), ["lock", "ring", "state", "reason"])
        )
        halted = bool(mine) and mine[0]["state"] != "done"
        return code or (1 if halted else 0)

    return _with_gateway(opts, body)


@cli.command(epilog=_example("lockgw doctor", "lockgw --json doctor"))
@json_option
@click.pass_obj
def doctor(opts: Opts) -> int:
    """Check the gateway and say how to fix what fails.

    Configuration, secret file permissions, data directory, database integrity, adapter, broker
    and TLS, time state, keyring and revocation expiry, outbox backlog, systemd watchdog.
    """

    async def body(target: _DaemonOrDirect, ui: Ui) -> int:
        with ui.progress("checking …"):
            a = await target.call("doctor", {})
        if ui.json_mode:
            ui.json(a.data)
        elif a.data is not None:
            ui.checks(cast("list[dict[str, Any]]", a.data.get("checks", [])))
        else:
            ui.error(str(a.error))
        return a.exit

    return _with_gateway(opts, body)


def _backup_lines(ui: Ui, verb: str, where: Path, s: Any) -> None:
    ui.line(f"{verb} {where}")
    ui.line(
        f"  gateway {s.gw} (site {s.site}), made {s.created}\n"
        f"  {s.locks} paired locks (their link keys: this file is a secret), {s.trust_entries} trust entries\n"
        f"  outbox epoch {s.epoch}: events #{s.first_seq}..#{s.last_seq} ({s.events} kept), "
        f"receipted up to #{s.receipt_seq}, {s.unreceipted} not yet receipted"
    )


@cli.command(
    epilog=_example("lockgw backup --out /root/lockgw-$(date +%F).tar", "lockgw --json backup --out b.tar")
)
@click.option(
    "--out", "out", required=True, type=click.Path(dir_okay=False), help="The backup file (mode 0600)."
)
@json_option
@click.pass_obj
def backup(opts: Opts, out: str) -> int:
    """Copy the lock registry, trust store and outbox into one file, online.

    Works while the daemon runs (a consistent read-only snapshot of each database, SQLite's
    backup API) or without it. The file holds the locks' link keys: treat it as a secret.
    """
    from gateway.store.backup import backup as make_backup  # noqa: PLC0415 - keeps CLI start-up light

    cfg = opts.load()
    summary = make_backup(cfg.gateway.data_dir, Path(out), gw=cfg.gateway.id, site=cfg.gateway.site)
    if opts.ui.json_mode:
        opts.ui.json({"file": str(Path(out).absolute()), **summary.as_json()})
    else:
        _backup_lines(opts.ui, "wrote", Path(out), summary)
    return EXIT_OK


def _restored_trust_check(cfg: Config, trust: Path) -> None:
    """Refuse a backup whose stored keyring (or list) does not verify against this
    configuration's root keys: started on it, the daemon would use it, marked stale."""
    from gateway.authz.authorizer import load_root_keys, unverified_stored  # noqa: PLC0415
    from gateway.store.backup import BackupError  # noqa: PLC0415
    from protocols.credentials import Policy  # noqa: PLC0415

    bad = unverified_stored(
        trust,
        gw_id=cfg.gateway.id,
        site=cfg.gateway.site,
        roots=load_root_keys(cfg.trust.root_keys),
        policy=Policy(**cfg.policy.model_dump()),
    )
    if bad:
        raise BackupError(
            f"the backup's trust store holds a {', '.join(bad)} that does not verify against this "
            "configuration's [trust] root_keys (another site's backup, or forged); nothing restored"
        )


@cli.command(
    epilog=_example(
        "systemctl stop lockgw && lockgw restore /root/lockgw-2026-11-30.tar && systemctl start lockgw",
        "lockgw restore --check backup.tar   # verify only, change nothing",
    )
)
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "--force", is_flag=True, help="Restore onto a non-empty data directory (moved aside, not deleted)."
)
@click.option("--check", "check_only", is_flag=True, help="Only verify the file and say what it holds.")
@click.option(
    "--new-epoch",
    is_flag=True,
    help="Restore the locks and trust only; start a new event epoch (the backup is older than central's events).",
)
@json_option
@click.pass_obj
def restore(opts: Opts, file: str, force: bool, check_only: bool, new_epoch: bool) -> int:
    """Restore a backup onto the (new, empty) data directory; the daemon must be stopped.

    The file is verified completely first (checksums, SQLite integrity, the events' hash chain);
    a bad file changes nothing. The locks answer without re-pairing; the epoch and the events
    central has not receipted come back and are published again when the daemon starts.
    """
    from gateway.store.backup import read_summary  # noqa: PLC0415
    from gateway.store.backup import restore as do_restore  # noqa: PLC0415

    cfg = opts.load()
    aside = None
    if check_only:
        summary = read_summary(Path(file))
    else:
        summary, aside = do_restore(
            Path(file),
            cfg.gateway.data_dir,
            gw=cfg.gateway.id,
            force=force,
            new_epoch=new_epoch,
            trust_check=functools.partial(_restored_trust_check, cfg),
        )
    if opts.ui.json_mode:
        opts.ui.json(
            {
                "file": file,
                "restored": not check_only,
                "data_dir": str(cfg.gateway.data_dir),
                "moved_aside": str(aside) if aside else None,
                "new_epoch": new_epoch,
                **summary.as_json(),
            }
        )
    else:
        _backup_lines(
            opts.ui,
            "verified" if check_only else f"restored into {cfg.gateway.data_dir} from",
            Path(file),
            summary,
        )
        if new_epoch and not check_only:
            opts.ui.note("events not restored: the daemon starts a new epoch (central sees it in B/G/info)")
        if aside is not None:
            opts.ui.note(
                f"the previous contents are in {aside} (delete it once all is well: it holds link keys)"
            )
    return EXIT_OK


@cli.command(
    epilog=_example(
        'eval "$(lockgw completion bash)"', "lockgw completion fish > ~/.config/fish/completions/lockgw.fish"
    )
)
@click.argument("shell", metavar="SHELL", type=click.Choice(["bash", "zsh", "fish"]))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> int:
    """Print the shell completion script for SHELL."""
    cls = get_completion_class(shell)
    if cls is None:  # pragma: no cover - the choices above are all built in
        raise click.BadParameter(shell, param_hint="SHELL")
    root = ctx.find_root()
    sys.stdout.write(cls(cli, {}, root.info_name or "lockgw", "_LOCKGW_COMPLETE").source() + "\n")
    return EXIT_OK


async def _run_daemon(config: Config) -> int:
    """The daemon: until SIGTERM/SIGINT (exit 0), or until a component whose failure stops it
    fails (exit 1, the reason logged) so that systemd restarts it."""
    from gateway import log  # noqa: PLC0415 - keeps CLI start-up light
    from gateway.cli.commands import dispatch, doctor_report  # noqa: PLC0415
    from gateway.runtime.app import Gateway  # noqa: PLC0415

    log.configure()
    logger = log.get("daemon")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(log.loop_exception_handler)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Gateway(config, control_handler=dispatch, diagnostics=doctor_report) as gateway:
        logger.info("serving", locks=len(gateway.registry.all()), gw=config.gateway.id)
        stopped: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([stopped, gateway.failed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if gateway.failed.done():
            logger.critical("exiting", exit_code=EXIT_FAILED, reason=str(gateway.failed.result()))
            return EXIT_FAILED
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point: click parses; our errors map to the contract's exit codes, never a traceback."""
    args = sys.argv[1:] if argv is None else argv
    as_json = "--json" in args[: args.index("--")] if "--" in args else "--json" in args
    try:
        rv = cli.main(args=args, prog_name="lockgw", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()  # 2 for every usage error; the message names the flag
        if as_json:
            Ui(json_mode=True).json({"error": exc.format_message(), "code": "usage"})
        return exc.exit_code
    except click.exceptions.Abort:
        return 130
    except ConfigError as exc:
        return _fail(str(exc), "config_error", EXIT_USAGE, as_json=as_json)
    except AdapterUnavailable as exc:
        return _fail(str(exc), "busy", EXIT_BUSY, as_json=as_json)
    except (OutboxError, LockgwError) as exc:
        return _fail(str(exc), "failed", EXIT_FAILED, as_json=as_json)
    except OSError as exc:
        message = f"{exc.filename or ''}: {exc.strerror}" if exc.strerror else str(exc)
        return _fail(message, "failed", EXIT_FAILED, as_json=as_json)
    return rv if isinstance(rv, int) else EXIT_OK


def _fail(message: str, code: str, exit_code: int, *, as_json: bool) -> int:
    """The message on stderr; with --json also the error object on stdout, as for any answer."""
    Ui(json_mode=False).error(message)
    if as_json:
        Ui(json_mode=True).json({"error": message, "code": code})
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
