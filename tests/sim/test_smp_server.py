"""firmware_sim/smp_server.py: Zephyr's img_mgmt/os_mgmt rules and MCUboot's swap/revert, driven
with the smp package's own request models (what smpclient sends)."""

from __future__ import annotations

import hashlib

import pytest
from fwfix import firmware_key, signed_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from smp import error as smperr
from smp import image_management as img
from smp import os_management as osm

from firmware_sim.smp_server import BUF_SIZE, McuBoot, SlotImage, SmpReassembler, SmpServer
from protocols.errors import FirmwareImageError
from protocols.firmware import ImageVersion, verify_image

KEY = firmware_key()
IMAGE = signed_image(KEY, "1.1.0", security_counter=2)
DIGEST = verify_image(IMAGE, [KEY.cose]).digest


def server() -> SmpServer:
    return SmpServer(
        McuBoot(verifier=lambda data: verify_image(data, [KEY.cose]), primary=SlotImage.factory("lk-1"))
    )


def ask(srv: SmpServer, request, response_cls):
    reply = srv.handle(bytes(request))
    try:
        return response_cls.loads(reply.data), reply.reboot
    except Exception:
        for cls in (img.ImageManagementErrorV2, img.ImageManagementErrorV1):
            try:
                return cls.loads(reply.data), reply.reboot
            except Exception:
                continue
        raise


def upload(
    srv: SmpServer, image: bytes, *, chunk: int = 400, start: int = 0, stop: int | None = None, **first
):
    off = start
    sha = hashlib.sha256(image).digest()
    while off < (stop if stop is not None else len(image)):
        extra = {"len": len(image), "sha": sha, **first} if off == 0 else {}
        rsp, _ = ask(
            srv,
            img.ImageUploadWriteRequest(off=off, data=image[off : off + chunk], **extra),
            img.ImageUploadWriteResponse,
        )
        if not isinstance(rsp, img.ImageUploadWriteResponse):
            return rsp
        off = rsp.off
    return rsp


def states(srv: SmpServer) -> list[img.ImageState]:
    rsp, _ = ask(srv, img.ImageStatesReadRequest(), img.ImageStatesReadResponse)
    return rsp.images


def test_params_answer_the_buffer():
    rsp, _ = ask(server(), osm.MCUMgrParametersReadRequest(), osm.MCUMgrParametersReadResponse)
    assert rsp.buf_size == BUF_SIZE and rsp.buf_count >= 1


def test_upload_test_reset_confirm():
    srv = server()
    last = upload(srv, IMAGE)
    assert last.off == len(IMAGE) and last.match is True
    assert [s.slot for s in states(srv)] == [0, 1]
    rsp, _ = ask(srv, img.ImageStatesWriteRequest(hash=DIGEST), img.ImageStatesWriteResponse)
    assert rsp.images[1].pending
    rsp, reboot = ask(srv, osm.ResetWriteRequest(), osm.ResetWriteResponse)
    assert isinstance(rsp, osm.ResetWriteResponse) and reboot
    srv.reset_ram()
    assert srv.boot.boot().kind == "swapped_test"
    running = states(srv)[0]
    assert running.version == "1.1.0" and running.active and not running.confirmed
    ask(srv, img.ImageStatesWriteRequest(confirm=True), img.ImageStatesWriteResponse)
    assert states(srv)[0].confirmed and srv.boot.security_counter == 2
    assert srv.boot.boot().kind == "normal" and srv.boot.primary.version == ImageVersion(1, 1, 0)


def test_unconfirmed_test_image_reverts():
    srv = server()
    upload(srv, IMAGE)
    ask(srv, img.ImageStatesWriteRequest(hash=DIGEST), img.ImageStatesWriteResponse)
    srv.boot.boot()
    assert srv.boot.boot().kind == "reverted"
    assert srv.boot.primary.version == ImageVersion(1, 0, 0) and srv.boot.confirmed
    assert srv.boot.security_counter == 1  # never raised by an image that was not confirmed


def test_resume_on_the_same_sha_answers_the_offset_reached():
    srv = server()
    upload(srv, IMAGE, stop=1000)
    reached = srv.upload.off
    rsp, _ = ask(
        srv,
        img.ImageUploadWriteRequest(
            off=0, data=IMAGE[:100], len=len(IMAGE), sha=hashlib.sha256(IMAGE).digest()
        ),
        img.ImageUploadWriteResponse,
    )
    assert rsp.off == reached > 0
    assert upload(srv, IMAGE, start=reached).match is True


def test_a_chunk_at_the_wrong_offset_is_corrected():
    srv = server()
    upload(srv, IMAGE, stop=800)
    rsp, _ = ask(
        srv, img.ImageUploadWriteRequest(off=1600, data=IMAGE[1600:1700]), img.ImageUploadWriteResponse
    )
    assert rsp.off == srv.upload.off == 800


def test_overrun_is_an_error():
    srv = server()
    upload(srv, IMAGE, stop=len(IMAGE) - 10)
    off = srv.upload.off
    rsp, _ = ask(srv, img.ImageUploadWriteRequest(off=off, data=bytes(200)), img.ImageUploadWriteResponse)
    assert isinstance(rsp, img.ImageManagementErrorV2)
    assert rsp.err.rc == img.IMG_MGMT_ERR.INVALID_IMAGE_DATA_OVERRUN


def test_upgrade_only_refuses_an_older_version():
    srv = server()
    old = signed_image(KEY, "0.9.0")
    rsp = upload(srv, old, upgrade=True)
    assert (
        isinstance(rsp, img.ImageManagementErrorV2)
        and rsp.err.rc == img.IMG_MGMT_ERR.CURRENT_VERSION_IS_NEWER
    )


def test_not_an_image_is_refused_at_the_first_chunk():
    rsp = upload(server(), bytes(3000))
    assert rsp.err.rc == img.IMG_MGMT_ERR.INVALID_IMAGE_HEADER_MAGIC


@pytest.mark.parametrize(
    "image",
    [
        signed_image(firmware_key(), "1.1.0", security_counter=2),  # wrong key
        signed_image(None, "1.1.0"),  # unsigned
        signed_image(KEY, "1.1.0", security_counter=0),  # counter below the bootloader's 1
    ],
    ids=["wrong-key", "unsigned", "counter"],
)
def test_the_bootloader_refuses_what_the_gateway_would_have(image):
    srv = server()
    upload(srv, image)
    ask(srv, img.ImageStatesWriteRequest(hash=verify_image_digest(image)), img.ImageStatesWriteResponse)
    outcome = srv.boot.boot()
    assert outcome.kind == "refused"
    assert srv.boot.primary.version == ImageVersion(1, 0, 0) and srv.boot.secondary == b""


def verify_image_digest(image: bytes) -> bytes:
    from protocols.firmware import parse_image

    return parse_image(image).digest


def test_erase_and_pending_rules():
    srv = server()
    upload(srv, IMAGE)
    ask(srv, img.ImageStatesWriteRequest(hash=DIGEST), img.ImageStatesWriteResponse)
    rsp, _ = ask(srv, img.ImageEraseRequest(), img.ImageEraseResponse)
    assert isinstance(rsp, img.ImageManagementErrorV2)
    srv2 = server()
    upload(srv2, IMAGE)
    rsp, _ = ask(srv2, img.ImageEraseRequest(), img.ImageEraseResponse)
    assert isinstance(rsp, img.ImageEraseResponse) and len(states(srv2)) == 1


def test_unknown_commands_and_garbage():
    srv = server()
    reply = srv.handle(bytes(osm.TaskStatisticsReadRequest()))
    assert osm.OSManagementErrorV1.loads(reply.data).rc == smperr.MGMT_ERR.ENOTSUP
    assert srv.handle(b"\x00").data == b""
    bad = bytearray(bytes(osm.EchoWriteRequest(d="hi")))
    bad[-1] = 0xFF  # break the CBOR
    rsp = osm.OSManagementErrorV1.loads(srv.handle(bytes(bad)).data)
    assert rsp.rc == smperr.MGMT_ERR.EINVAL


def test_reassembly_by_header_length():
    frames = [bytes(osm.EchoWriteRequest(d="x" * 50)), bytes(img.ImageStatesReadRequest())]
    stream = b"".join(frames)
    r = SmpReassembler()
    got = []
    for i in range(0, len(stream), 7):
        got += r.feed(stream[i : i + 7])
    assert got == frames
    with pytest.raises(ValueError):
        SmpReassembler().feed(bytes([2, 0, 0xFF, 0xFF, 0, 0, 0, 0]))


def test_verifier_errors_are_firmware_errors():
    with pytest.raises(FirmwareImageError):
        server().boot.verifier(b"junk")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_hostile_requests_never_crash_the_server(data):
    srv = server()
    header = data.draw(
        st.sampled_from(
            [
                bytes(img.ImageUploadWriteRequest(off=0, data=b"x", len=1)),
                bytes(img.ImageStatesWriteRequest(hash=b"h")),
                bytes(osm.ResetWriteRequest()),
            ]
        )
    )[:8]
    body = data.draw(st.binary(max_size=64))
    frame = bytearray(header + body)
    frame[2:4] = len(body).to_bytes(2, "big")
    if data.draw(st.booleans()):
        frame[data.draw(st.integers(0, 7))] = data.draw(st.integers(0, 255))
    reply = srv.handle(bytes(frame))
    assert isinstance(reply.data, bytes)
