"""``lockgw-sim``: simulated lock units on a real BLE host stack.

``lockgw-sim serve --locks N [--seed N] [--state DIR] [--transport tcp-server:HOST:PORT]
[--radio flat|typical|slow] [--radio-set FIELD=VALUE ...]`` prints one JSON line per lock (``{"lock", "address", "setup_code"}``), then a line
``{"ready": true, "transport": ..., "radio": PROFILE}``, and serves until SIGINT/SIGTERM or end of input.

Fault commands are JSON lines on standard input, answered by one JSON line on standard output
(docs/simulator.md lists them)::

    {"lock": "lk-1a2b3c4d", "fault": "jam"}
    {"lock": "lk-1a2b3c4d", "fault": "battery", "value": 12}
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import stat
import sys
from pathlib import Path
from typing import Any

from imgtool import keys as imgkeys

from firmware_sim.bumble_peripheral import RadioTiming, SimRadio
from firmware_sim.radio import PROFILES, RadioProfile, parse_overrides, profile_named
from firmware_sim.smp_gatt import imgtool_verifier

__all__ = ["main"]


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


async def _read_commands(radio: SimRadio, stop: asyncio.Event) -> None:
    # Commands come from a pipe or a terminal. With stdin at /dev/null or a file (a service or a
    # script running us in the background) there is nothing to read: serve until a signal.
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError, AttributeError):
        return
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or sys.stdin.isatty()):
        return
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while not stop.is_set():
        try:
            line = await reader.readline()
        except (ValueError, asyncio.LimitOverrunError):
            _emit({"ok": False, "error": "command line too long (limit 64 KiB)"})
            continue
        if not line:
            stop.set()  # end of input: the controlling process is gone
            return
        if not line.strip():
            continue
        try:
            command = json.loads(line)
            if not isinstance(command, dict):
                raise TypeError("a command is a JSON object")
            result = await radio.apply_fault(
                str(command["lock"]), str(command["fault"]), command.get("value")
            )
            _emit(result)
        except (ValueError, KeyError, TypeError, OSError) as exc:  # OSError: the state file
            _emit({"ok": False, "error": str(exc)})


async def serve(args: argparse.Namespace) -> int:
    profile: RadioProfile = args.profile
    timing = RadioTiming(
        advertising_interval_ms=profile.adv_interval_ms, response_delay_s=args.response_delay_ms / 1000
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with SimRadio(timing=timing, profile=profile, seed=args.seed) as radio:
        locks = await radio.add_locks(args.locks, seed=args.seed, state_dir=args.state)
        if args.firmware_key:
            verifier = imgtool_verifier([imgkeys.load(str(path)) for path in args.firmware_key])
            try:
                for sim in locks:
                    radio.enable_firmware(sim.model.lock_id, verifier)
            except ValueError as exc:  # a bootloader state file that is not one
                print(f"lockgw-sim: {exc}", file=sys.stderr)
                return 2
        if args.transport:
            try:
                await radio.serve_hci(args.transport)
            except (OSError, ValueError) as exc:
                print(f"lockgw-sim: cannot open transport {args.transport!r}: {exc}", file=sys.stderr)
                return 2
        for sim in locks:
            _emit(
                {
                    "lock": sim.model.lock_id,
                    "address": str(sim.address).split("/")[0],
                    "setup_code": sim.model.setup_code,
                }
            )
        _emit({"ready": True, "transport": args.transport, "radio": profile.name})
        reader = asyncio.create_task(_read_commands(radio, stop), name="sim-commands")
        try:
            await stop.wait()
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lockgw-sim", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="serve simulated locks until stopped")
    p.add_argument("--locks", type=int, default=3, help="number of locks (1..500)")
    p.add_argument("--seed", type=int, default=None, help="deterministic lock ids and setup codes")
    p.add_argument("--state", type=Path, default=None, help="directory that persists lock state")
    p.add_argument(
        "--transport",
        default=None,
        help="HCI transport for the gateway, e.g. tcp-server:127.0.0.1:9100",
    )
    p.add_argument(
        "--adv-interval-ms",
        type=float,
        default=None,
        help="advertising interval (20..10240); the same as --radio-set adv_interval_ms=…",
    )
    p.add_argument(
        "--radio",
        default="flat",
        choices=sorted(PROFILES),
        help="radio timing profile (docs/simulator.md); flat: no radio delays (the default)",
    )
    p.add_argument(
        "--radio-set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override one profile field, e.g. conn_interval_ms=15 (repeatable)",
    )
    p.add_argument("--response-delay-ms", type=float, default=0.0, help="delay before each lock answer")
    p.add_argument(
        "--firmware-key",
        type=Path,
        action="append",
        default=[],
        help="an imgtool key (PEM) the locks' bootloader trusts: enables the SMP service (repeatable)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.locks <= 500:
        parser.error("--locks must be between 1 and 500")
    overrides = list(args.radio_set)
    if args.adv_interval_ms is not None:
        overrides.insert(0, f"adv_interval_ms={args.adv_interval_ms}")
    try:
        args.profile = parse_overrides(profile_named(args.radio), overrides)
    except ValueError as exc:
        parser.error(f"--radio-set: {exc}")
    if args.response_delay_ms < 0:
        parser.error("--response-delay-ms must not be negative")
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
