"""Key and document files (CONTRACT §8.1–8.2): COSE_Key as raw CBOR or base64url text, or a
PKCS#8 PEM private key; private files written 0600 atomically."""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from gateway.errors import ConfigError
from protocols import cbor
from protocols.cose import ALG_EDDSA, ALG_ES256, CoseKey, PrivateCoseKey, decode_key, decode_private_key
from protocols.credentials import load_cbor_or_b64
from protocols.errors import CborError, CredentialError

__all__ = [
    "b64url",
    "check_secret_permissions",
    "load_root_keys",
    "read_document",
    "read_private_key",
    "read_public_key",
    "write_atomic",
]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


#: No key or credential file is larger (a COSE key is ~100 bytes; a keyring a few KiB).
MAX_KEY_FILE: Final = 2 * 1024 * 1024


def read_bounded(path: Path, what: str, limit: int = MAX_KEY_FILE) -> bytes:
    """A regular file's bytes, at most ``limit`` of them read (``/dev/zero`` as a key file
    must be an error, not an endless read)."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever;
        # it has no effect on the regular file read below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise ConfigError(f"{what}: {path} is not a regular file")
            data = fh.read(limit + 1)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from exc
    if len(data) > limit:
        size = f"{limit // (1024 * 1024)} MiB" if limit >= 1024 * 1024 else f"{limit // 1024} KiB"
        raise ConfigError(f"{what}: {path} is larger than {size}")
    return data


def _read(path: Path, what: str) -> bytes:
    return read_bounded(path, what)


def read_document(path: Path, what: str) -> bytes:
    """A signed document (token, keyring, ...) as raw COSE bytes or base64url text."""
    try:
        return load_cbor_or_b64(_read(path, what))
    except CredentialError as exc:
        raise ConfigError(f"{what}: {path} is neither raw COSE nor base64url text") from exc


def read_public_key(path: Path, what: str) -> CoseKey:
    try:
        return decode_key(cbor.loads(load_cbor_or_b64(_read(path, what))))
    except (CredentialError, CborError) as exc:
        raise ConfigError(f"{what}: {path} is not a valid public COSE_Key: {exc}") from exc


def read_private_key(path: Path, what: str) -> PrivateCoseKey:
    data = _read(path, what)
    if data.lstrip().startswith(b"-----BEGIN"):
        return _from_pem(data, path, what)
    try:
        return decode_private_key(cbor.loads(load_cbor_or_b64(data)))
    except (CredentialError, CborError) as exc:
        raise ConfigError(f"{what}: {path} is not a private COSE_Key or PKCS#8 PEM: {exc}") from exc


def _from_pem(data: bytes, path: Path, what: str) -> PrivateCoseKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{what}: {path} is not an unencrypted PKCS#8 PEM key") from exc
    cose: dict[int, cbor.CborValue]
    if isinstance(key, ed25519.Ed25519PrivateKey):
        d = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        pub = key.public_key().public_bytes_raw()
        cose = {1: 1, 3: ALG_EDDSA, -1: 6, -2: pub, -4: d}
    elif isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        nums = key.private_numbers()
        cose = {
            1: 2,
            3: ALG_ES256,
            -1: 1,
            -2: nums.public_numbers.x.to_bytes(32, "big"),
            -3: nums.public_numbers.y.to_bytes(32, "big"),
            -4: nums.private_value.to_bytes(32, "big"),
        }
    else:
        raise ConfigError(f"{what}: {path} holds neither an Ed25519 nor a P-256 key")
    try:
        return decode_private_key(cose)
    except CredentialError as exc:
        raise ConfigError(f"{what}: {path}: {exc}") from exc


def load_root_keys(paths: Iterable[Path]) -> dict[bytes, CoseKey]:
    """Root keys from files (COSE_Key with kid and alg, raw CBOR or base64url; CONTRACT §8.1).

    Raises ConfigError naming ``trust.root_keys`` and the file: unreadable, not a public COSE_Key
    (a small-order or non-canonical Ed25519 point, an invalid P-256 point), no kid, or a kid
    that two files share. ``lockgw run`` and ``lockgw config check`` both call it.
    """
    roots: dict[bytes, CoseKey] = {}
    for path in paths:
        try:
            raw = load_cbor_or_b64(read_bounded(Path(path), "trust.root_keys"))
            key = decode_key(cbor.loads(raw))
        except OSError as exc:
            raise ConfigError(f"trust.root_keys: cannot read {path}: {exc.strerror}") from exc
        except (CredentialError, CborError) as exc:
            raise ConfigError(f"trust.root_keys: {path} is not a valid public COSE_Key: {exc}") from exc
        if not key.kid:
            raise ConfigError(f"trust.root_keys: {path} has no kid (label 2); keyrings name their root by it")
        if key.kid in roots:
            raise ConfigError(f"trust.root_keys: two root keys share kid {key.kid.hex()}")
        roots[key.kid] = key
    return roots


def check_secret_permissions(path: Path, what: str) -> None:
    """Secret files must not be group or world readable (CONTRACT §2)."""
    try:
        mode = Path(path).stat().st_mode
    except OSError as exc:
        raise ConfigError(f"{what}: cannot stat {path}: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{what}: {path} is readable by group or others; run: chmod 600 {path}")


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Temp file, fsync, rename, fsync of the directory (THREATS D9)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]  # a short write is not an error
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # the old file, if any, is untouched
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
