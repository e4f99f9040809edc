"""Signed MCUboot test images, made by imgtool itself (the tool a vendor's build uses)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from imgtool import keys as imgkeys
from imgtool.image import Image
from imgtool.version import decode_version

from protocols import issuer
from protocols.cose import (
    ALG_EDDSA,
    ALG_ES256,
    ContentType,
    CoseKey,
    PrivateCoseKey,
    decode_key,
    generate_private_key,
    sign1,
)
from protocols.firmware import encode_manifest_payload, parse_image


@dataclass
class FirmwareKey:
    """An imgtool signing key and the CoseKey a keyring would carry for it."""

    imgtool_key: Any
    cose: CoseKey


def firmware_key(alg: str = "EdDSA") -> FirmwareKey:
    if alg == "EdDSA":
        key = imgkeys.Ed25519.generate()
        raw = key.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return FirmwareKey(key, decode_key({1: 1, 3: ALG_EDDSA, -1: 6, -2: raw}))
    key = imgkeys.ECDSA256P1.generate()
    numbers = key.key.public_key().public_numbers()
    cose = decode_key(
        {1: 2, 3: ALG_ES256, -1: 1, -2: numbers.x.to_bytes(32, "big"), -3: numbers.y.to_bytes(32, "big")}
    )
    return FirmwareKey(key, cose)


def signed_image(
    key: FirmwareKey | None,
    version: str = "1.1.0",
    *,
    security_counter: int | None = 1,
    body: bytes | None = None,
    size: int = 3000,
) -> bytes:
    """An image of ``size`` body bytes (deterministic from the version) signed with ``key``
    (``None``: hash only, unsigned)."""
    payload = body if body is not None else (version.encode() * (size // len(version) + 1))[:size]
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "app.bin", Path(tmp) / "signed.bin"
        src.write_bytes(payload)
        img = Image(
            version=decode_version(version),
            header_size=32,
            pad_header=True,
            security_counter=security_counter,
        )
        img.load(os.fspath(src))
        with contextlib.redirect_stdout(io.StringIO()):  # imgtool prints "sign the digest"
            img.create(key.imgtool_key if key is not None else None, "hash", None)
        img.save(os.fspath(out))
        return out.read_bytes()


def manifest_key(kid: bytes = b"fw-manifest-1") -> PrivateCoseKey:
    return generate_private_key(ALG_EDDSA, kid, os.urandom)


def signed_manifest(
    key: PrivateCoseKey, image: bytes, locks: list[str] | None = None, **fields: Any
) -> bytes:
    """A rollout manifest as central would sign it (docs/firmware.md §Manifest)."""
    info = parse_image(image)
    now = int(time.time())
    payload: dict[str, Any] = {
        "rollout": "ro-1",
        "site": "site-test",
        "version": str(info.version),
        "sha256": hashlib.sha256(image).digest(),
        "locks": locks,
        "nbf": now - 60,
        "exp": now + 86400,
        **fields,
    }
    payload = {k: v for k, v in payload.items() if v is not None}
    return sign1(encode_manifest_payload(payload), key, ContentType.FIRMWARE_MANIFEST, kid=key.public.kid)


def shared_firmware_key(kid: bytes = b"fw-1") -> tuple[FirmwareKey, PrivateCoseKey]:
    """One Ed25519 key as both tools need it: a COSE key (keyring entry with role firmware,
    manifest signer) and an imgtool key (image signer, and the simulated bootloader's key)."""
    cose = generate_private_key(ALG_EDDSA, kid, os.urandom)
    img = imgkeys.Ed25519(Ed25519PrivateKey.from_private_bytes(cose.d))
    return FirmwareKey(img, cose.public), cose


def firmware_keyring(
    root: PrivateCoseKey,
    staff: CoseKey,
    firmware: CoseKey,
    *,
    site: str,
    now: int,
    version: int,
    iat_ago: int,
) -> bytes:
    """A keyring signed by ``root``: the staff issuer (as the test world's own) plus ``firmware``
    with the role ``firmware``, both valid from a day before ``now`` for 60 days."""
    return issuer.keyring(
        root,
        site=site,
        version=version,
        iat=now - iat_ago,
        exp=now + 90 * 86400,
        entries=[
            issuer.KeyringEntry(staff, now - 86400, now + 60 * 86400, ["staff"]),
            issuer.KeyringEntry(firmware, now - 86400, now + 60 * 86400, ["firmware"]),
        ],
    )
