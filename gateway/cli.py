"""``lockgw``: the daemon and the technician/operator CLI (CONTRACT §6).

While the daemon runs, commands go through its control socket (``[control] socket``); without a
daemon they run directly on the data directory (one process at a time: a second direct user is
refused with exit 3 and told which process holds it).

Exit codes: 0 done; 1 refused or failed; 2 usage or configuration error (the message names the
flag or key); 3 the daemon or adapter is busy or unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Any

from gateway.config import Config, config_path, load_config
from gateway.errors import AdapterUnavailable, ConfigError, LockgwError, OutboxError

__all__ = ["main"]

EXAMPLES = {
    "run": "lockgw --config /etc/lockgw/lockgw.toml run",
    "demo": "lockgw demo",
    "config": "lockgw config check /etc/lockgw/lockgw.toml",
    "scan": "lockgw scan --timeout 10",
    "pair": "lockgw pair C0:12:34:56:78:9A --code 123-456-789 --name 'Front door'",
    "unpair": "lockgw unpair lk-1a2b3c4d",
    "locks": "lockgw --json locks",
    "status": "lockgw status lk-1a2b3c4d",
    "unlock": "lockgw unlock lk-1a2b3c4d --token t.cwt --holder-key phone.key",
    "lock": "lockgw lock lk-1a2b3c4d --token t.cwt --holder-key phone.key",
    "events": "lockgw events --since 100 --follow",
    "trust": "lockgw trust show",
    "doctor": "lockgw doctor",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lockgw", description="lockgw gateway and technician/operator CLI")
    parser.add_argument("--config", default=None, help="configuration file (TOML); else $LOCKGW_CONFIG")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object (JSON lines with --follow)"
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, epilog=f"example: {EXAMPLES[name]}")
        # Also accepted after the command (`lockgw locks --json`); SUPPRESS keeps the global value.
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
        return p

    add("run", "run the gateway daemon")
    demo = add("demo", "simulated locks, a broker and a scripted shift")
    demo.add_argument("--locks", type=int, default=3)
    demo.add_argument("--seed", type=int, default=None)
    cc = add("config", "configuration commands")
    ccs = cc.add_subparsers(dest="config_command", required=True, parser_class=_Parser)
    check = ccs.add_parser(
        "check", help="validate a configuration file", epilog=f"example: {EXAMPLES['config']}"
    )
    check.add_argument("path", nargs="?", default=None)
    scan = add("scan", "list nearby locks")
    scan.add_argument("--timeout", type=float, default=5.0, help="seconds to listen (0.5..60)")
    pair = add("pair", "pair a lock in pairing mode with its setup code")
    pair.add_argument("address")
    pair.add_argument("--code", required=True, help="the setup code printed on the lock unit")
    pair.add_argument("--name", default="")
    unpair = add("unpair", "wipe a lock's key on both ends")
    unpair.add_argument("lock")
    unpair.add_argument("--force", action="store_true", help="forget the lock even if it cannot be reached")
    add("locks", "list paired locks and their state")
    status = add("status", "refresh and show a lock's state (all locks without L)")
    status.add_argument("lock", nargs="?")
    for name in ("unlock", "lock"):
        p = add(name, f"{name} a door with a token (as a phone would)")
        p.add_argument("lock")
        p.add_argument("--token", required=True, help="token file (raw COSE or base64url)")
        p.add_argument("--holder-key", default=None, help="phone key for the proof (COSE_Key or PKCS#8 PEM)")
    ev = add("events", "show events")
    ev.add_argument("--since", type=int, default=1)
    ev.add_argument("--limit", type=int, default=100)
    ev.add_argument("--follow", action="store_true")
    ev.add_argument("--lock", default=None)
    ev.add_argument("--type", default=None)
    ev.add_argument("--sub", default=None)
    tr = add("trust", "keyring, revocation list and time floor")
    trs = tr.add_subparsers(dest="trust_command", required=True, parser_class=_Parser)
    trs.add_parser("show", help="installed documents and the time floor", epilog="example: lockgw trust show")
    ti = trs.add_parser(
        "install",
        help="install a keyring, revocation list or time statement",
        epilog="example: lockgw trust install keyring.cose",
    )
    ti.add_argument("file")
    add("doctor", "check the gateway: configuration, storage, adapter, broker, time, trust, outbox")
    return parser


class _Link:
    """Where a command's calls go: the daemon's control socket, or — without a daemon — one
    direct Gateway held for the whole command (so a challenge and the unlock that answers it
    meet the same in-memory nonce)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._gw: Any = None

    async def call(self, cmd: str, args: dict[str, Any]) -> dict[str, Any]:
        from gateway.control import call  # noqa: PLC0415
        from gateway.control_commands import dispatch  # noqa: PLC0415

        if self._gw is None:
            try:
                return await call(self.config.control.socket, cmd, args)
            except (FileNotFoundError, ConnectionRefusedError):
                from gateway.app import Gateway  # noqa: PLC0415

                gw = Gateway(self.config, direct=True)
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


def _emit(args: argparse.Namespace, answer: dict[str, Any], human: str) -> int:
    if args.json:
        payload = (
            answer.get("data")
            if answer.get("ok")
            else {"error": answer.get("error"), "code": answer.get("code")}
        )
        print(json.dumps(payload, sort_keys=True))
    elif answer.get("ok"):
        print(human)
    else:
        print(f"lockgw: {answer.get('error')}", file=sys.stderr)
    return int(answer.get("exit", 1))


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    if not rows:
        return "(none)"
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in cols)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def _event_line(e: dict[str, Any]) -> str:
    flag = " [replayed]" if e.get("replayed") else ""
    flag += f" [{e['trust_state']}]" if e.get("trust_state") not in (None, "ok") else ""
    reason = f" reason={e['reason']}" if e.get("reason") else ""
    who = f" sub={e['sub']}" if e.get("sub") else ""
    lock = f" lock={e['lock']}" if e.get("lock") else ""
    return f"{e['seq']:>6} {e['ts']} {e['type']:<18}{lock}{who}{reason}{flag}"


async def _actuate(link: _Link, args: argparse.Namespace) -> int:
    from gateway.keyfiles import read_document, read_private_key  # noqa: PLC0415
    from protocols import issuer  # noqa: PLC0415

    token = read_document(Path(args.token), "--token")
    payload: dict[str, Any] = {
        "lock": args.lock,
        "token": base64.urlsafe_b64encode(token).decode().rstrip("="),
    }
    if args.holder_key:
        holder = read_private_key(Path(args.holder_key), "--holder-key")
        ch = await link.call(
            "request", {"action": "challenge", "payload": {"lock": args.lock, "act": args.command}}
        )
        if not ch.get("ok"):
            return _emit(args, ch, "")
        data = ch["data"]["data"]
        nonce = base64.urlsafe_b64decode(data["nonce"] + "==")
        proof = issuer.proof(
            holder, token_bytes=token, nonce=nonce, gw=data["gw"], lock=args.lock, act=args.command
        )
        payload["proof"] = base64.urlsafe_b64encode(proof).decode().rstrip("=")
    answer = await link.call("request", {"action": args.command, "payload": payload})
    if args.json:
        print(json.dumps(answer.get("data"), sort_keys=True))
        return int(answer["exit"])
    if answer.get("ok"):
        d = answer["data"]["data"]
        print(f"{d['lock']}: {d['state']} (event #{d['seq']})")
    else:
        print(f"lockgw: {args.command} refused: {answer.get('code')}: {answer.get('error')}", file=sys.stderr)
    return int(answer["exit"])


async def _events(link: _Link, args: argparse.Namespace) -> int:
    since = args.since
    filters = {k: getattr(args, k) for k in ("lock", "type", "sub") if getattr(args, k)}
    while True:
        answer = await link.call("events", {"since": since, "limit": args.limit, **filters})
        if not answer.get("ok"):
            return _emit(args, answer, "")
        events = answer["data"]["events"]
        if args.json and not args.follow:
            print(json.dumps(events, sort_keys=True))
        else:
            for e in events:
                print(json.dumps(e, sort_keys=True) if args.json else _event_line(e), flush=True)
        if not args.follow:
            if not events and not args.json:
                print(f"(no events since #{since}; last is #{answer['data']['last_seq']})")
            return 0
        since = max([since - 1, *(e["seq"] for e in events)]) + 1
        await asyncio.sleep(1.0)


async def _command(config: Config, args: argparse.Namespace) -> int:
    link = _Link(config)
    try:
        return await _dispatch(link, args)
    finally:
        await link.close()


async def _dispatch(link: _Link, args: argparse.Namespace) -> int:
    c = args.command
    if c in ("unlock", "lock"):
        return await _actuate(link, args)
    if c == "events":
        return await _events(link, args)
    if c == "scan":
        a = await link.call("scan", {"timeout": args.timeout})
        return _emit(
            args,
            a,
            _table(a.get("data") or [], ["lock", "address", "rssi", "paired", "pairing_mode", "paired_here"]),
        )
    if c == "pair":
        print(f"pairing with {args.address} …", file=sys.stderr, flush=True)
        a = await link.call("pair", {"address": args.address, "code": args.code, "name": args.name})
        # CONTRACT §6: pair prints the lock id (alone, so `L=$(lockgw pair …)` works).
        return _emit(args, a, str((a.get("data") or {}).get("lock")))
    if c == "unpair":
        a = await link.call("unpair", {"lock": args.lock, "force": args.force})
        return _emit(args, a, f"unpaired {args.lock}")
    if c == "locks" or (c == "status" and not args.lock):
        a = await link.call("locks" if c == "locks" else "status", {})
        from gateway.service import LockView  # noqa: PLC0415

        return _emit(args, a, _table(a.get("data") or [], list(LockView.FIELDS)))
    if c == "status":
        a = await link.call("status", {"lock": args.lock})
        return _emit(args, a, "\n".join(f"{k:>13}: {v}" for k, v in (a.get("data") or {}).items()))
    if c == "doctor":
        a = await link.call("doctor", {})
        checks = (a.get("data") or {}).get("checks", [])
        lines = [
            f"{ch['status'].upper():<4}  {ch['name']}: {ch['detail']}"
            + (f"\n      fix: {ch['fix']}" if ch["fix"] and ch["status"] != "pass" else "")
            for ch in checks
        ]
        if args.json:
            print(json.dumps(a.get("data"), sort_keys=True))
        else:
            print("\n".join(lines))
        return int(a.get("exit", 1))
    if c == "trust" and args.trust_command == "show":
        a = await link.call("trust_show", {})
        d = a.get("data") or {}
        human = "\n".join(
            [
                f"keyring:     {_doc(d.get('keyring'))}",
                f"revocations: {_doc(d.get('revocations'))}",
                f"time:        state {d.get('time', {}).get('state')}, floor {d.get('time', {}).get('floor')}",
            ]
        )
        if a.get("ok") and args.json:
            for doc in ("keyring", "revocations"):
                if isinstance(d.get(doc), dict):
                    d[doc].pop("days_left", None)
        return _emit(args, a, human)
    if c == "trust":
        raw = Path(args.file).read_bytes()  # noqa: ASYNC240 - one small file, before any I/O we wait on
        a = await link.call("trust_install", {"document": base64.b64encode(raw).decode()})
        dd = a.get("data") or {}
        human = f"{dd.get('kind')} v{dd.get('version')} " + (
            "installed" if dd.get("installed") else "already installed"
        )
        return _emit(args, a, human)
    print(f"lockgw: unknown command {c}", file=sys.stderr)
    return 2


def _doc(doc: Any) -> str:
    if not isinstance(doc, dict):
        return "none"
    return f"v{doc['version']}, exp {doc['exp']} ({doc.get('days_left', '?')} days left)"


async def _run_daemon(config: Config) -> int:
    from gateway.app import Gateway  # noqa: PLC0415 - keeps CLI start-up light

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Gateway(config) as gateway:
        print(f"lockgw: serving {len(gateway.registry.all())} locks as {config.gateway.id}", file=sys.stderr)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1):
                    await stop.wait()
            if not gateway.outbox.healthy:
                print("lockgw: the event store failed; exiting so systemd restarts us", file=sys.stderr)
                return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from gateway.demo import run_demo  # noqa: PLC0415

            if not 1 <= args.locks <= 20:
                print("lockgw: --locks must be between 1 and 20", file=sys.stderr)
                return 2
            return asyncio.run(run_demo(locks=args.locks, seed=args.seed))
        if args.command == "config":
            path = Path(args.path) if args.path else config_path(args.config)
            config = load_config(path)
            if args.json:
                print(json.dumps({"ok": True, "path": str(path), "gateway": config.gateway.id}))
            else:
                print(f"{path}: ok (gateway {config.gateway.id}, site {config.gateway.site})")
            return 0
        config = load_config(config_path(args.config))
        if args.command == "run":
            return asyncio.run(_run_daemon(config))
        return asyncio.run(_command(config, args))
    except ConfigError as exc:
        print(f"lockgw: {exc}", file=sys.stderr)
        return 2
    except AdapterUnavailable as exc:
        print(f"lockgw: {exc}", file=sys.stderr)
        return 3
    except (OutboxError, LockgwError) as exc:
        print(f"lockgw: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"lockgw: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
