"""protocols/firmware.py: MCUboot images parsed bounded, verified against firmware keys."""

from __future__ import annotations

import hashlib
import struct
import time

import pytest
from fwfix import firmware_key, manifest_key, signed_image, signed_manifest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.errors import FirmwareImageError
from protocols.firmware import ImageVersion, check_upgrade, parse_image, parse_manifest, verify_image

ED = firmware_key("EdDSA")
P256 = firmware_key("ES256")
IMAGE = signed_image(ED, "1.2.3+4", security_counter=7)


def test_parse_reads_what_imgtool_wrote():
    info = parse_image(IMAGE)
    assert info.version == ImageVersion(1, 2, 3, 4)
    assert str(info.version) == "1.2.3.4"
    assert info.security_counter == 7
    assert info.size == len(IMAGE)
    assert info.digest == hashlib.sha256(IMAGE[: info.hashed_len]).digest()


@pytest.mark.parametrize("key", [ED, P256], ids=["ed25519", "p256"])
def test_verify_accepts_the_signing_key(key):
    image = signed_image(key, "2.0.0")
    assert verify_image(image, [firmware_key().cose, key.cose]).version == ImageVersion(2, 0, 0)


def test_wrong_key_is_refused():
    with pytest.raises(FirmwareImageError) as err:
        verify_image(IMAGE, [firmware_key().cose, P256.cose])
    assert err.value.code == "bad_signature"


def test_no_keys_is_refused():
    with pytest.raises(FirmwareImageError) as err:
        verify_image(IMAGE, [])
    assert err.value.code == "no_firmware_key"


def test_unsigned_is_refused():
    with pytest.raises(FirmwareImageError) as err:
        verify_image(signed_image(None), [ED.cose])
    assert err.value.code == "unsigned"


def test_a_flipped_body_byte_is_refused():
    bad = bytearray(IMAGE)
    bad[100] ^= 1
    with pytest.raises(FirmwareImageError) as err:
        verify_image(bytes(bad), [ED.cose])
    assert err.value.code == "bad_hash"


def test_a_flipped_signature_byte_is_refused():
    bad = bytearray(IMAGE)
    bad[-5] ^= 1  # the signature is the last TLV imgtool writes
    with pytest.raises(FirmwareImageError) as err:
        verify_image(bytes(bad), [ED.cose])
    assert err.value.code == "bad_signature"


def test_the_version_field_is_covered_by_the_signature():
    bad = bytearray(IMAGE)
    bad[20] = 9  # major version
    with pytest.raises(FirmwareImageError) as err:
        verify_image(bytes(bad), [ED.cose])
    assert err.value.code == "bad_hash"


def test_downgrade_and_counter_rollback_are_refused():
    info = parse_image(IMAGE)
    check_upgrade(info, running=ImageVersion(1, 2, 3), running_counter=7)
    with pytest.raises(FirmwareImageError) as err:
        check_upgrade(info, running=ImageVersion(1, 3, 0), running_counter=1)
    assert err.value.code == "downgrade"
    with pytest.raises(FirmwareImageError) as err:
        check_upgrade(info, running=ImageVersion(1, 0, 0), running_counter=8)
    assert err.value.code == "counter_rollback"
    with pytest.raises(FirmwareImageError) as err:
        check_upgrade(info, running=ImageVersion(1, 2, 3, 4), running_counter=0)
    assert err.value.code == "downgrade"
    check_upgrade(info, running=ImageVersion(1, 2, 3, 4), running_counter=0, allow_same=True)


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("1.2.3", ImageVersion(1, 2, 3)),
        ("1.2.3.4", ImageVersion(1, 2, 3, 4)),
        ("0.0.1+9", ImageVersion(0, 0, 1, 9)),
    ],
)
def test_version_text(text, version):
    assert ImageVersion.parse(text) == version


@pytest.mark.parametrize("text", ["", "1.2", "1.2.3.4.5", "256.0.0", "1.2.x", "１.2.3", "1.2.65536"])
def test_bad_version_text(text):
    with pytest.raises(FirmwareImageError):
        ImageVersion.parse(text)


def test_lengths_that_run_past_the_buffer_are_refused():
    for cut in (0, 16, 31, 32, 100, len(IMAGE) - 1):
        with pytest.raises(FirmwareImageError):
            parse_image(IMAGE[:cut])
    huge = bytearray(IMAGE)
    struct.pack_into("<I", huge, 12, 0xFFFFFFFF)  # img_size
    with pytest.raises(FirmwareImageError):
        parse_image(bytes(huge))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_images_never_crash(data):
    image = bytearray(IMAGE)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(image) - 1))
        image[pos] = data.draw(st.integers(0, 255))
    try:
        info = verify_image(bytes(image), [ED.cose])
    except FirmwareImageError:
        return
    assert info.digest == parse_image(IMAGE).digest  # only changes outside the signed part pass


# --- manifests -------------------------------------------------------------------------------

MKEY = manifest_key()
LOCKS = [f"lk-{i}" for i in range(10)]


def keys():
    return {MKEY.public.kid: MKEY.public}


def test_manifest_rings_canary_fraction_rest():
    m = parse_manifest(
        signed_manifest(MKEY, IMAGE, LOCKS, fraction=30), keys(), site="site-test", now=int(time.time())
    )
    assert m.rings == (("lk-0",), ("lk-1", "lk-2", "lk-3"), tuple(LOCKS[4:]))
    assert m.version == ImageVersion(1, 2, 3, 4) and m.image_sha256 == hashlib.sha256(IMAGE).digest()
    assert m.min_battery == 30 and m.quiet_hours is None and not m.actuation_check


def test_manifest_quiet_hours_wrap_midnight():
    m = parse_manifest(
        signed_manifest(MKEY, IMAGE, LOCKS, quiet_hours=[22, 6]),
        keys(),
        site="site-test",
        now=int(time.time()),
    )
    assert m.in_quiet_hours(23 * 3600) and m.in_quiet_hours(5 * 3600) and not m.in_quiet_hours(12 * 3600)


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"site": "other-site"}, "wrong_site"),
        ({"exp": 10}, "expired"),
        ({"locks": []}, "bad_manifest"),
        ({"locks": ["lk-1", "lk-1"]}, "bad_manifest"),
        ({"locks": ["BAD ID"]}, "bad_manifest"),
        ({"fraction": 101}, "bad_manifest"),
        ({"quiet_hours": [1, 24]}, "bad_manifest"),
        ({"extra": 1}, "bad_manifest"),
        ({"actuation_check": 1}, "bad_manifest"),
        ({"version": "x"}, "bad_version"),
    ],
)
def test_bad_manifests_are_refused(fields, code):
    fields = {"locks": LOCKS, **fields}
    with pytest.raises(FirmwareImageError) as err:
        parse_manifest(signed_manifest(MKEY, IMAGE, **fields), keys(), site="site-test", now=int(time.time()))
    assert err.value.code == code


def test_manifest_by_a_key_without_the_firmware_role_is_refused():
    other = manifest_key(b"other-kid")
    with pytest.raises(FirmwareImageError) as err:
        parse_manifest(signed_manifest(other, IMAGE, LOCKS), keys(), site="site-test", now=int(time.time()))
    assert err.value.code == "unknown_key"
    forged = manifest_key(MKEY.public.kid)  # same kid, another key
    with pytest.raises(FirmwareImageError) as err:
        parse_manifest(signed_manifest(forged, IMAGE, LOCKS), keys(), site="site-test", now=int(time.time()))
    assert err.value.code == "bad_signature"


# --- the keyring role ------------------------------------------------------------------------


def test_firmware_keys_are_the_keyring_keys_with_the_role_valid_now():
    from credfix import T0, World

    from protocols import issuer
    from protocols.cose import ALG_EDDSA, generate_private_key
    from protocols.credentials import TOKEN_ROLES

    w = World()
    fw = generate_private_key(ALG_EDDSA, b"fw-1", w.rng)
    old = generate_private_key(ALG_EDDSA, b"fw-old", w.rng)
    ring = issuer.keyring(
        w.root,
        site="site-a",
        version=1,
        iat=T0 - 86400,
        exp=T0 + 86400,
        entries=[
            issuer.KeyringEntry(w.issuer_a.public, T0 - 86400, T0 + 86400, ["staff"]),
            issuer.KeyringEntry(fw.public, T0 - 86400, T0 + 86400, ["firmware"]),
            issuer.KeyringEntry(old.public, T0 - 10 * 86400, T0 - 5 * 86400, ["firmware"]),
        ],
    )
    auth = w.authority(install=False)
    assert auth.firmware_keys(T0) == {}  # no keyring: no key; root keys never stand in
    auth.install(ring, wall=T0, synced=True)
    assert auth.firmware_keys(T0) == {b"fw-1": fw.public}
    assert "firmware" not in TOKEN_ROLES


# --- SMP_OPEN on the lock link ----------------------------------------------------------------


@pytest.mark.parametrize(
    "args", [{"secs": 0}, {"secs": 601}, {"secs": "60"}, {"secs": True}, {}, {"secs": 1, "x": 1}]
)
def test_smp_open_arguments_are_bounded(args):
    from protocols.errors import RemoteProtocolError
    from protocols.messages import Op, Request, decode_request, encode_request

    with pytest.raises(RemoteProtocolError):
        decode_request(encode_request(Request(Op.SMP_OPEN, bytes(16), args)))


def test_smp_open_policy_and_result():
    from protocols.errors import RemoteProtocolError
    from protocols.messages import LinkRole, Op, Response, Status, check_result, is_allowed

    assert is_allowed(LinkRole.GATEWAY, Op.SMP_OPEN) and not is_allowed(LinkRole.UNAUTHENTICATED, Op.SMP_OPEN)
    check_result(Response(Op.SMP_OPEN, bytes(16), Status.OK, {"secs": 120}))
    with pytest.raises(RemoteProtocolError):
        check_result(Response(Op.SMP_OPEN, bytes(16), Status.OK, {"secs": 10**6}))
