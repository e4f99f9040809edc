"""MCUboot firmware images: bounded parsing, signature check, and the no-downgrade rule.

Pure and sans-I/O, like the rest of :mod:`protocols`. An image is what ``imgtool sign``
writes (MCUboot's format, ``bootutil/include/bootutil/image.h``)::

    header (32 bytes, little endian)   magic 0x96f3b83d, load_addr, hdr_size, protect_tlv_size,
                                       img_size, flags, version (major u8, minor u8,
                                       revision u16, build u32), pad
    body                               img_size bytes, starting at hdr_size
    protected TLVs (optional)          info {0x6908, total}, then TLVs; SEC_CNT (0x50) lives here
    TLVs                               info {0x6907, total}, then TLVs: SHA256 (0x10), KEYHASH
                                       (0x01), ED25519 (0x24) or ECDSA_SIG (0x22), ...

The SHA-256 covers header, body and protected TLVs; Ed25519 signs that digest, ECDSA P-256
signs the same bytes (DER signature). :func:`parse_image` checks every length against the
buffer before it reads (a hostile image is an :class:`FirmwareImageError`, never an
``IndexError`` or a ``struct.error``); :func:`verify_image` accepts an image only when the
digest matches and one of the given keys (those the keyring names with role ``firmware``,
docs/firmware.md) signed it; :func:`check_upgrade` refuses a version or a security counter that
goes down.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from protocols import cbor
from protocols.cose import ALG_EDDSA, ContentType, CoseKey, parse_sign1
from protocols.errors import CborError, CredentialError, FirmwareImageError, RemoteProtocolError
from protocols.messages import validate_id

__all__ = [
    "IMAGE_MAGIC",
    "MAX_IMAGE_BYTES",
    "ImageInfo",
    "ImageVersion",
    "Manifest",
    "check_upgrade",
    "encode_manifest_payload",
    "parse_image",
    "parse_manifest",
    "verify_image",
]

IMAGE_MAGIC: Final = 0x96F3B83D
TLV_INFO_MAGIC: Final = 0x6907
TLV_PROT_INFO_MAGIC: Final = 0x6908
HEADER_LEN: Final = 32
TLV_SHA256: Final = 0x10
TLV_KEYHASH: Final = 0x01
TLV_ECDSA_SIG: Final = 0x22
TLV_ED25519: Final = 0x24
TLV_SEC_CNT: Final = 0x50
#: A secondary slot of an nRF52840 application is < 1 MiB; anything larger is refused unread.
MAX_IMAGE_BYTES: Final = 1024 * 1024
#: TLVs an image may carry; far above what imgtool writes (hash, key hash, signature, counter).
MAX_TLVS: Final = 32


@dataclass(frozen=True, slots=True, order=True)
class ImageVersion:
    """``major.minor.revision+build``; ordered as MCUboot orders it (build number included)."""

    major: int
    minor: int
    revision: int
    build: int = 0

    def __str__(self) -> str:
        # Zephyr's img_mgmt reports "1.2.3" and, with a build number, "1.2.3.4".
        base = f"{self.major}.{self.minor}.{self.revision}"
        return f"{base}.{self.build}" if self.build else base

    @classmethod
    def parse(cls, text: str) -> ImageVersion:
        """``1.2.3``, ``1.2.3.4`` or ``1.2.3+4`` (each part in MCUboot's range)."""
        if len(text) > 32:
            raise FirmwareImageError("version must be text like 1.2.3", code="bad_version")
        main, _, build = text.partition("+")
        parts = main.split(".")
        if build:
            parts.append(build)
        limits = (0xFF, 0xFF, 0xFFFF, 0xFFFFFFFF)
        if not 3 <= len(parts) <= 4 or not all(p.isascii() and p.isdigit() for p in parts):
            raise FirmwareImageError(
                f"version {text[:32]!r} is not major.minor.revision[.build]", code="bad_version"
            )
        values = [int(p) for p in parts] + [0] * (4 - len(parts))
        if any(v > lim for v, lim in zip(values, limits, strict=True)):
            raise FirmwareImageError(f"version {text[:32]!r} out of range", code="bad_version")
        return cls(*values)


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What the header and TLVs of one image say (nothing here is trusted before verify)."""

    version: ImageVersion
    security_counter: int | None
    digest: bytes  # the SHA256 TLV: smp's image "hash"
    size: int  # the whole file, TLVs included: what an upload sends
    hashed_len: int  # header + body + protected TLVs
    signatures: tuple[tuple[int, bytes], ...]  # (tlv type, value)


def _bad(message: str, code: str = "bad_image") -> FirmwareImageError:
    return FirmwareImageError(message, code=code)


def _tlv_area(data: bytes, off: int, magic: int) -> tuple[int, list[tuple[int, bytes]]] | None:
    """The TLVs of the area at ``off`` if it starts with ``magic``: (end offset, TLVs)."""
    if off + 4 > len(data):
        raise _bad("image ends before its TLV area")
    found_magic, total = struct.unpack_from("<HH", data, off)
    if found_magic != magic:
        return None
    end = off + total
    if total < 4 or end > len(data):
        raise _bad("TLV area length runs past the image")
    tlvs: list[tuple[int, bytes]] = []
    pos = off + 4
    while pos < end:
        if pos + 4 > end or len(tlvs) >= MAX_TLVS:
            raise _bad("malformed TLV area")
        kind, _, length = struct.unpack_from("<BBH", data, pos)
        if pos + 4 + length > end:
            raise _bad("TLV value runs past its area")
        tlvs.append((kind, data[pos + 4 : pos + 4 + length]))
        pos += 4 + length
    return end, tlvs


def parse_image(data: bytes) -> ImageInfo:  # noqa: C901, PLR0912 - one refusal per malformed field
    """Parse an MCUboot image, bounded; raises :class:`FirmwareImageError`."""
    if not isinstance(data, bytes | bytearray):
        raise _bad("image must be bytes")
    data = bytes(data)
    if len(data) > MAX_IMAGE_BYTES:
        raise _bad(f"image of {len(data)} bytes exceeds {MAX_IMAGE_BYTES}", code="image_too_large")
    if len(data) < HEADER_LEN:
        raise _bad("image shorter than an MCUboot header")
    magic, _load, hdr_size, prot_size, img_size, _flags = struct.unpack_from("<IIHHII", data, 0)
    major, minor, revision, build = struct.unpack_from("<BBHI", data, 20)
    if magic != IMAGE_MAGIC:
        raise _bad("not an MCUboot image (bad header magic)", code="bad_magic")
    if hdr_size < HEADER_LEN or hdr_size + img_size > len(data):
        raise _bad("header or body length runs past the image")
    off = hdr_size + img_size
    counter: int | None = None
    protected = _tlv_area(data, off, TLV_PROT_INFO_MAGIC)
    if protected is not None:
        off, prot_tlvs = protected
        for kind, value in prot_tlvs:
            if kind == TLV_SEC_CNT:
                if len(value) != 4 or counter is not None:
                    raise _bad("security counter TLV malformed")
                counter = int.from_bytes(value, "little")
    if off - hdr_size - img_size != prot_size:
        raise _bad("protected TLV size disagrees with the header")
    hashed_len = off
    main = _tlv_area(data, off, TLV_INFO_MAGIC)
    if main is None:
        raise _bad("image has no TLV area (unsigned?)", code="unsigned")
    end, tlvs = main
    if end != len(data):
        raise _bad("bytes after the TLV area")
    digests = [v for k, v in tlvs if k == TLV_SHA256]
    if len(digests) != 1 or len(digests[0]) != 32:
        raise _bad("image needs exactly one SHA256 TLV")
    signatures = tuple((k, v) for k, v in tlvs if k in (TLV_ED25519, TLV_ECDSA_SIG))
    return ImageInfo(
        ImageVersion(major, minor, revision, build), counter, digests[0], len(data), hashed_len, signatures
    )


def verify_image(data: bytes, keys: Sequence[CoseKey]) -> ImageInfo:
    """Parse, check the digest, and require a signature by one of ``keys``.

    Raises :class:`FirmwareImageError` with code ``bad_image``/``bad_hash``/``unsigned``/
    ``bad_signature`` (no key signed it: wrong key or tampered), or ``no_firmware_key``.
    """
    info = parse_image(data)
    if hashlib.sha256(bytes(data[: info.hashed_len])).digest() != info.digest:
        raise _bad("image digest does not match its SHA256 TLV", code="bad_hash")
    if not keys:
        raise _bad("the keyring names no key with role firmware", code="no_firmware_key")
    if not info.signatures:
        raise _bad("image carries no Ed25519 or ECDSA signature", code="unsigned")
    hashed = bytes(data[: info.hashed_len])
    for kind, signature in info.signatures:
        for key in keys:
            if (kind == TLV_ED25519) != (key.alg == ALG_EDDSA):
                continue
            try:
                if kind == TLV_ED25519:
                    key.verify(signature, info.digest, code="bad_signature")
                else:
                    key.verify(_der_to_raw(signature), hashed, code="bad_signature")
            except CredentialError:
                continue
            return info
    raise _bad("no firmware key of the keyring signed this image", code="bad_signature")


def _der_to_raw(signature: bytes) -> bytes:
    """imgtool writes ECDSA signatures DER-encoded; CoseKey takes r ‖ s."""
    if len(signature) > 80:
        return b""
    try:
        r, s = decode_dss_signature(signature)
    except ValueError:
        return b""
    if r.bit_length() > 256 or s.bit_length() > 256:
        return b""
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def check_upgrade(
    info: ImageInfo, *, running: ImageVersion, running_counter: int, allow_same: bool = False
) -> None:
    """Refuse a downgrade: the version must rise (or equal with ``allow_same``) and the
    security counter never fall (a missing counter counts as 0)."""
    counter = info.security_counter or 0
    if counter < running_counter:
        raise _bad(
            f"security counter {counter} is below the lock's {running_counter}", code="counter_rollback"
        )
    if info.version < running or (info.version == running and not allow_same):
        raise _bad(f"version {info.version} is not newer than the running {running}", code="downgrade")


# --- rollout manifests -----------------------------------------------------------------------

#: Locks one manifest may name (a site of the Herning kind has ~1000 units).
MAX_MANIFEST_LOCKS: Final = 1000


@dataclass(frozen=True, slots=True)
class Manifest:
    """A rollout plan from central (docs/firmware.md §Manifest), verified."""

    rollout: str
    site: str
    version: ImageVersion
    image_sha256: bytes  # of the whole image file
    rings: tuple[tuple[str, ...], ...]
    min_battery: int
    quiet_hours: tuple[int, int] | None  # [start, end) hours UTC; None: any time
    actuation_check: bool
    nbf: int
    exp: int

    def in_quiet_hours(self, now: float) -> bool:
        if self.quiet_hours is None:
            return False
        start, end = self.quiet_hours
        hour = int(now // 3600) % 24
        return start <= hour < end if start <= end else hour >= start or hour < end


def _m(message: str) -> FirmwareImageError:
    return FirmwareImageError(message, code="bad_manifest")


def parse_manifest(raw: bytes, keys: dict[bytes, CoseKey], *, site: str, now: int) -> Manifest:  # noqa: C901, PLR0912, PLR0915 - one refusal per field
    """Verify a manifest (COSE_Sign1 by a keyring key with role ``firmware``) and parse it.

    Payload: ``{"rollout": id, "site": id, "version": "1.2.3", "sha256": bstr 32, "locks": [ids],
    "canary": uint (default 1), "fraction": 0..100 (percent of the rest in ring 2, default 50),
    "min_battery": 0..100 (default 30), "quiet_hours": [start, end] hours UTC (optional),
    "actuation_check": bool (default false), "nbf": int, "exp": int}``.
    """
    try:
        sign1 = parse_sign1(raw, ContentType.FIRMWARE_MANIFEST, code="bad_manifest")
    except CredentialError as exc:
        raise _m(str(exc)) from exc
    assert sign1.kid is not None
    key = keys.get(sign1.kid)
    if key is None:
        raise FirmwareImageError(f"manifest key {sign1.kid.hex()} has no firmware role", code="unknown_key")
    try:
        sign1.verify_with(key, code="bad_signature")
        body = sign1.payload_map(code="bad_manifest")
    except CredentialError as exc:
        raise FirmwareImageError(str(exc), code=exc.code) from exc
    known = {"rollout", "site", "version", "sha256", "locks", "canary", "fraction", "min_battery"}
    known |= {"quiet_hours", "actuation_check", "nbf", "exp"}
    if not set(body) <= known or not {"rollout", "site", "version", "sha256", "locks", "nbf", "exp"} <= set(
        body
    ):
        raise _m(
            f"manifest fields must be {sorted(known)} (rollout, site, version, sha256, locks, nbf, exp required)"
        )
    try:
        rollout, msite = validate_id(body["rollout"], "rollout"), validate_id(body["site"], "site")
        locks = body["locks"]
        if not isinstance(locks, list) or not 1 <= len(locks) <= MAX_MANIFEST_LOCKS:
            raise _m(f"locks must be a list of 1..{MAX_MANIFEST_LOCKS} lock ids")
        ids = [validate_id(lock, "lock") for lock in locks]
    except RemoteProtocolError as exc:
        raise _m(str(exc)) from exc
    if len(set(ids)) != len(ids):
        raise _m("a lock is named twice")
    if msite != site:
        raise FirmwareImageError(f"manifest is for site {msite}, not {site}", code="wrong_site")
    version = body["version"]
    sha = body["sha256"]
    if not isinstance(version, str) or not isinstance(sha, bytes) or len(sha) != 32:
        raise _m("version must be text and sha256 32 bytes")
    canary, fraction = _uint(body, "canary", 1, 0, len(ids)), _uint(body, "fraction", 50, 0, 100)
    min_battery = _uint(body, "min_battery", 30, 0, 100)
    nbf, exp = _uint(body, "nbf", 0, 0, 2**63 - 1), _uint(body, "exp", 0, 0, 2**63 - 1)
    if not nbf <= now <= exp:
        raise FirmwareImageError("manifest is not valid now (nbf..exp)", code="expired")
    quiet = body.get("quiet_hours")
    hours: tuple[int, int] | None = None
    if quiet is not None:
        if not (isinstance(quiet, list) and len(quiet) == 2 and all(_is_hour(h) for h in quiet)):
            raise _m("quiet_hours must be [start, end] hours 0..23")
        hours = (int(str(quiet[0])), int(str(quiet[1])))
    check = body.get("actuation_check", False)
    if not isinstance(check, bool):
        raise _m("actuation_check must be a boolean")
    rest = ids[canary:]
    second = -(-len(rest) * fraction // 100)
    rings = tuple(r for r in (tuple(ids[:canary]), tuple(rest[:second]), tuple(rest[second:])) if r)
    return Manifest(
        rollout, msite, ImageVersion.parse(version), sha, rings, min_battery, hours, check, nbf, exp
    )


def _is_hour(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 23


def _uint(body: object, name: str, default: int, lo: int, hi: int) -> int:
    assert isinstance(body, dict)
    value = body.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise _m(f"{name} must be an integer in {lo}..{hi}")
    return value


def encode_manifest_payload(fields: dict[str, cbor.CborValue]) -> bytes:
    """The payload bytes a central signs (the reference issuer and tests)."""
    try:
        return cbor.dumps(fields)
    except CborError as exc:
        raise _m(str(exc)) from exc
