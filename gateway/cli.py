"""``lockgw``: the daemon and the technician/operator CLI (CONTRACT §6)."""

from __future__ import annotations

import argparse
import asyncio
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:  # noqa: RET503 - parser.error exits
    parser = argparse.ArgumentParser(prog="lockgw", description="lockgw gateway and CLI")
    parser.add_argument("--config", default=None, help="configuration file (TOML)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="simulated locks, scripted pairing and unlocks")
    demo.add_argument("--locks", type=int, default=3)
    demo.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from gateway.demo import run_demo  # noqa: PLC0415 - keeps CLI start-up light

        if not 1 <= args.locks <= 20:
            parser.error("--locks must be between 1 and 20")
        return asyncio.run(run_demo(locks=args.locks, seed=args.seed))
    parser.error(f"unknown command {args.command}")  # argparse exits with status 2


if __name__ == "__main__":
    sys.exit(main())
