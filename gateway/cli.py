"""``lockgw``: the daemon and the technician/operator CLI (CONTRACT §6).

Exit codes: 0 done; 1 refused or failed; 2 usage or configuration error (the message names the
flag or key); 3 the daemon or adapter is busy or unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path

from gateway.config import config_path, load_config
from gateway.errors import AdapterUnavailable, ConfigError, LockgwError, OutboxError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lockgw", description="lockgw gateway and CLI")
    parser.add_argument("--config", default=None, help="configuration file (TOML); else $LOCKGW_CONFIG")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser(
        "run", help="run the gateway daemon", epilog="example: lockgw --config /etc/lockgw/lockgw.toml run"
    )
    demo = sub.add_parser(
        "demo", help="simulated locks, a broker and a scripted shift", epilog="example: lockgw demo"
    )
    demo.add_argument("--locks", type=int, default=3)
    demo.add_argument("--seed", type=int, default=None)
    cc = sub.add_parser("config", help="configuration commands")
    ccs = cc.add_subparsers(dest="config_command", required=True, parser_class=_Parser)
    check = ccs.add_parser(
        "check", help="validate a configuration file", epilog="example: lockgw config check lockgw.toml"
    )
    check.add_argument("path", nargs="?", default=None)
    return parser


async def _run_daemon(config_file: Path) -> int:
    from gateway.app import Gateway  # noqa: PLC0415 - keeps CLI start-up light

    config = load_config(config_file)
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
        if args.command == "run":
            return asyncio.run(_run_daemon(config_path(args.config)))
    except ConfigError as exc:
        print(f"lockgw: {exc}", file=sys.stderr)
        return 2
    except AdapterUnavailable as exc:
        print(f"lockgw: {exc}", file=sys.stderr)
        return 3
    except OutboxError as exc:
        print(f"lockgw: {exc}", file=sys.stderr)
        return 1
    except LockgwError as exc:
        print(f"lockgw: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
