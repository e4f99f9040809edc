"""``lockgw-issuer``: the reference issuer (keys, keyrings, revocation lists, time statements,
tokens, proofs). It is what central integrators copy; tests and the demo use it. Documents are
written as raw COSE bytes to ``--out FILE``, or as base64url text on stdout without ``--out``.

Times: an integer (Unix s), ``now``, ``now+30d`` / ``+12h`` / ``-1h`` (relative to now), or ISO
8601 (``2027-01-01T00:00:00Z``). Durations: ``3600``, ``30m``, ``12h``, ``7d``.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final, TypeAlias

from gateway.authz.keyfiles import b64url, read_document, read_private_key, read_public_key, write_atomic
from gateway.errors import ConfigError
from protocols import cbor, issuer
from protocols.cose import ALG_EDDSA, ALG_ES256, generate_private_key
from protocols.credentials import ACTIONS, ROLES

__all__ = ["main", "parse_duration", "parse_time"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    m = re.fullmatch(r"(\d+)([smhd]?)", text.strip())
    if not m:
        raise ValueError(f"bad duration {text!r} (use 3600, 30m, 12h or 7d)")
    return int(m.group(1)) * _UNITS[m.group(2) or "s"]


def parse_time(text: str, now: int | None = None) -> int:
    now = int(time.time()) if now is None else now
    t = text.strip()
    if t == "now":
        return now
    m = re.fullmatch(r"(?:now)?([+-])(\d+[smhd]?)", t)
    if m:
        delta = parse_duration(m.group(2))
        return now + delta if m.group(1) == "+" else now - delta
    if re.fullmatch(r"-?\d+", t):
        return int(t)
    try:
        parsed = dt.datetime.fromisoformat(t)
    except ValueError as exc:
        raise ValueError(f"bad time {text!r} (use Unix seconds, now, now+30d or ISO 8601)") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return int(parsed.timestamp())


def _emit(data: bytes, out: str | None) -> None:
    if out in (None, "-"):
        sys.stdout.write(b64url(data) + "\n")
    else:
        write_atomic(Path(out), data)


def _entry(spec: str, now: int) -> issuer.KeyringEntry:
    """``FILE,roles=staff+emergency,nbf=now,exp=now+90d,max_ttl=12h,bearer=false``."""
    path, *fields = spec.split(",")
    opts = dict(f.split("=", 1) for f in fields if "=" in f)
    unknown = set(opts) - {"roles", "nbf", "exp", "max_ttl", "bearer"}
    if unknown or len(opts) != len(fields):
        raise ValueError(f"--entry {spec!r}: fields are roles, nbf, exp, max_ttl, bearer")
    roles = opts.get("roles", "staff").split("+")
    if not set(roles) <= ROLES:
        raise ValueError(f"--entry roles must be among {sorted(ROLES)}")
    key = read_public_key(Path(path), "--entry")
    if not key.kid:
        raise ValueError(f"--entry {path}: the key has no kid")
    bearer = opts.get("bearer", "false").lower()
    if bearer not in {"true", "false", "yes", "no"}:
        raise ValueError("--entry bearer must be true or false")
    return issuer.KeyringEntry(
        key,
        parse_time(opts.get("nbf", "now"), now),
        parse_time(opts.get("exp", "now+90d"), now),
        roles,
        parse_duration(opts.get("max_ttl", "12h")),
        bearer in {"true", "yes"},
    )


def _keygen(args: argparse.Namespace, _now: int) -> None:
    kid = (args.kid or Path(args.out).name).encode()
    if not 1 <= len(kid) <= 32:
        raise ValueError("--kid must be 1..32 bytes")
    key = generate_private_key(ALG_EDDSA if args.alg == "EdDSA" else ALG_ES256, kid, os.urandom)
    write_atomic(Path(f"{args.out}.key"), b64url(cbor.dumps(key.to_cbor())).encode() + b"\n", mode=0o600)
    write_atomic(Path(f"{args.out}.pub"), b64url(cbor.dumps(key.public.to_cbor())).encode() + b"\n")
    print(
        f"{args.out}.key (private, 0600) and {args.out}.pub written; kid {kid.decode()!r}, "
        f"alg {key.public.alg_name}, role {args.role}",
        file=sys.stderr,
    )


def _keyring(args: argparse.Namespace, now: int) -> None:
    root = read_private_key(Path(args.root), "--root")
    entries = [_entry(spec, now) for spec in args.entry]
    _emit(
        issuer.keyring(
            root,
            site=args.site,
            version=args.version,
            iat=parse_time(args.iat, now),
            exp=parse_time(args.exp, now),
            entries=entries,
        ),
        args.out,
    )


def _revocations(args: argparse.Namespace, now: int) -> None:
    signer = read_private_key(Path(args.signer), "--signer")
    subs = []
    for spec in args.sub:
        sub, _, at = spec.rpartition("@")
        if not sub:
            raise ValueError("--sub takes SUBJECT@TIME")
        subs.append((sub, parse_time(at, now)))
    ctis = [bytes.fromhex(c) for c in args.cti]
    if any(len(c) != 16 for c in ctis):
        raise ValueError("--cti takes 16 bytes as 32 hex digits")
    _emit(
        issuer.revocations(
            signer,
            site=args.site,
            version=args.version,
            iat=parse_time(args.iat, now),
            exp=parse_time(args.exp, now),
            cti=ctis,
            sub=subs,
        ),
        args.out,
    )


def _time(args: argparse.Namespace, now: int) -> None:
    signer = read_private_key(Path(args.signer), "--signer")
    _emit(
        issuer.time_statement(signer, site=args.site, t=parse_time(args.t, now), reset=args.reset), args.out
    )


def _token(args: argparse.Namespace, now: int) -> None:
    signer = read_private_key(Path(args.signer), "--signer")
    holder = read_public_key(Path(args.holder), "--holder") if args.holder else None
    if holder is None and not args.bearer:
        raise ValueError("give --holder PUB (holder-bound) or --bearer")
    if args.role == "emergency" and not args.alarm:
        raise ValueError("--role emergency needs --alarm REF (the safety-alarm reference)")
    iat = parse_time(args.iat, now)
    _emit(
        issuer.token(
            signer,
            iss=args.iss,
            sub=args.sub,
            aud=args.aud,
            iat=iat,
            exp=iat + parse_duration(args.ttl),
            locks=args.lock,
            act=args.act or ["unlock"],
            role=args.role,
            holder=holder,
            alarm=args.alarm,
            nbf=parse_time(args.nbf, now) if args.nbf else None,
            rng=os.urandom,
        ),
        args.out,
    )


def _prove(args: argparse.Namespace, _now: int) -> None:
    holder_key = read_private_key(Path(args.holder_key), "--holder-key")
    token_bytes = read_document(Path(args.token), "--token")
    nonce_text = args.nonce.strip()
    nonce = base64.urlsafe_b64decode(nonce_text + "=" * (-len(nonce_text) % 4))
    if len(nonce) != 32:
        raise ValueError("--nonce must be the challenge's 32 bytes in base64url")
    _emit(
        issuer.proof(
            holder_key, token_bytes=token_bytes, nonce=nonce, gw=args.gw, lock=args.lock, act=args.act
        ),
        args.out,
    )


#: The subcommands (argparse requires one): each name and the function that writes its output.
_SUBCOMMANDS: Final[dict[str, Callable[[argparse.Namespace, int], None]]] = {
    "keygen": _keygen,
    "keyring": _keyring,
    "revocations": _revocations,
    "time": _time,
    "token": _token,
    "prove": _prove,
}


def _run(args: argparse.Namespace) -> int:
    _SUBCOMMANDS[args.command](args, int(time.time()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lockgw-issuer",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    for add_options in _OPTIONS:
        add_options(sub)
    return p


#: What ``add_subparsers()`` returns (generic for type checkers only, hence the quotes).
_Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"  # noqa: SLF001 - argparse's own type


def _keygen_options(sub: _Subparsers) -> None:
    cmd = sub.add_parser(
        "keygen",
        help="make a key pair: PREFIX.key (0600) and PREFIX.pub",
        epilog="example: lockgw-issuer keygen --role root --alg EdDSA --out root-1",
    )
    cmd.add_argument("--role", required=True, choices=["root", "issuer", "holder"])
    cmd.add_argument("--alg", default="EdDSA", choices=["EdDSA", "ES256"])
    cmd.add_argument("--out", required=True, metavar="PREFIX")
    cmd.add_argument("--kid", help="key id (default: the PREFIX's file name)")


def _keyring_options(sub: _Subparsers) -> None:
    cmd = sub.add_parser(
        "keyring",
        help="a keyring signed by a root key",
        epilog="example: lockgw-issuer keyring --root root-1.key --site s1 --version 1 "
        "--exp now+180d --entry issuer-a.pub,roles=staff+emergency,exp=now+90d --out kr.cose",
    )
    cmd.add_argument("--root", required=True, metavar="ROOT.key")
    cmd.add_argument("--site", required=True)
    cmd.add_argument("--version", required=True, type=int)
    cmd.add_argument("--iat", default="now")
    cmd.add_argument("--exp", required=True)
    cmd.add_argument(
        "--entry",
        action="append",
        required=True,
        help="PUB,roles=staff+emergency,nbf=now,exp=now+90d,max_ttl=12h,bearer=false",
    )
    cmd.add_argument("--out")


def _revocations_options(sub: _Subparsers) -> None:
    cmd = sub.add_parser(
        "revocations",
        help="a revocation list",
        epilog="example: lockgw-issuer revocations --signer issuer-a.key --site s1 --version 3 "
        "--exp now+7d --cti 00112233445566778899aabbccddeeff --sub staff-17@now --out rl.cose",
    )
    cmd.add_argument("--signer", required=True)
    cmd.add_argument("--site", required=True)
    cmd.add_argument("--version", required=True, type=int)
    cmd.add_argument("--iat", default="now")
    cmd.add_argument("--exp", required=True)
    cmd.add_argument("--cti", action="append", default=[], help="revoked token id (32 hex digits)")
    cmd.add_argument("--sub", action="append", default=[], help="SUBJECT@TIME: tokens issued before TIME")
    cmd.add_argument("--out")


def _time_options(sub: _Subparsers) -> None:
    cmd = sub.add_parser(
        "time",
        help="a time statement",
        epilog="example: lockgw-issuer time --signer issuer-a.key --site s1 --out time.cose\n"
        "recovery: lockgw-issuer time --signer root-1.key --site s1 --reset --out reset.cose",
    )
    cmd.add_argument("--signer", required=True)
    cmd.add_argument("--site", required=True)
    cmd.add_argument("--t", default="now")
    cmd.add_argument(
        "--reset",
        action="store_true",
        help='add "reset": true: sets gateways\' time floor to --t even when lower and clears their '
        "time alarms (recovery from a floor pushed ahead); gateways accept it only signed by a root key",
    )
    cmd.add_argument("--out")


def _token_options(sub: _Subparsers) -> None:
    cmd = sub.add_parser(
        "token",
        help="an unlock token (CWT)",
        epilog="example: lockgw-issuer token --signer issuer-a.key --iss central --sub staff-17 "
        "--aud s1 --lock lk-1 --act unlock --ttl 8h --holder phone.pub --out t.cwt",
    )
    cmd.add_argument("--signer", required=True)
    cmd.add_argument("--iss", required=True)
    cmd.add_argument("--sub", required=True)
    cmd.add_argument("--aud", required=True, help="site id or gateway id")
    cmd.add_argument("--lock", action="append", required=True)
    cmd.add_argument("--act", action="append", choices=sorted(ACTIONS))
    cmd.add_argument("--ttl", default="8h")
    cmd.add_argument("--iat", default="now")
    cmd.add_argument("--nbf")
    cmd.add_argument("--role", default="staff", choices=["staff", "emergency"])
    cmd.add_argument("--alarm")
    group = cmd.add_mutually_exclusive_group()
    group.add_argument("--holder", metavar="PHONE.pub", help="bind to this phone key (cnf)")
    group.add_argument("--bearer", action="store_true", help="no cnf (needs a bearer key)")
    cmd.add_argument("--out")


def _prove_options(sub: _Subparsers) -> None:
    cmd = sub.add_parser(
        "prove",
        help="a proof of possession for a challenge",
        epilog="example: lockgw-issuer prove --holder-key phone.key --token t.cwt --nonce NONCE "
        "--gw gw-1 --lock lk-1 --act unlock --out proof.cose",
    )
    cmd.add_argument("--holder-key", required=True)
    cmd.add_argument("--token", required=True)
    cmd.add_argument(
        "--nonce",
        required=True,
        help="the challenge nonce (base64url); write --nonce=VALUE, it may start with '-'",
    )
    cmd.add_argument("--gw", required=True)
    cmd.add_argument("--lock", required=True)
    cmd.add_argument("--act", required=True, choices=["unlock", "lock"])
    cmd.add_argument("--out")


#: Each subcommand's options, in the order --help lists them.
_OPTIONS: Final[tuple[Callable[[_Subparsers], None], ...]] = (
    _keygen_options,
    _keyring_options,
    _revocations_options,
    _time_options,
    _token_options,
    _prove_options,
)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except ConfigError as exc:
        print(f"lockgw-issuer: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"lockgw-issuer: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"lockgw-issuer: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
