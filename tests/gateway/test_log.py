"""Structured logs (issue 10 §3; THREATS B13, F3): every line JSON off a terminal — ours,
the libraries' (aiomqtt, bumble log through the stdlib) and asyncio's callback errors — and no
secret value in any of them."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from gateway import log


@pytest.fixture
def out() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    log.configure(stream, json_lines=True)
    yield stream
    structlog.reset_defaults()
    log.configure(json_lines=False)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_F3_library_log_lines_are_json_lines_too(out: io.StringIO) -> None:
    logging.getLogger("aiomqtt").warning("There are %d pending publish calls.", 74)
    (line,) = lines(out)
    assert line["event"] == "There are 74 pending publish calls." and line["level"] == "warning"
    assert line["logger"] == "aiomqtt"


def test_F3_asyncio_callback_errors_are_one_structured_line(out: io.StringIO) -> None:
    loop = asyncio.new_event_loop()
    try:
        try:
            raise OSError(9, "Bad file descriptor")
        except OSError as exc:
            log.loop_exception_handler(loop, {"message": "Exception in callback", "exception": exc})
    finally:
        loop.close()
    (line,) = lines(out)
    assert line["event"] == "asyncio_error" and "Bad file descriptor" in str(line["exception"])


def test_B13_fields_named_like_secrets_are_redacted_wherever_bound(out: io.StringIO) -> None:
    log.get("t").info("x", token="AAAA-token", data={"proof": "BBBB-proof", "lock": "L"}, setup_code="123456")
    (line,) = lines(out)
    text = json.dumps(line)
    assert "AAAA-token" not in text and "BBBB-proof" not in text and "123456" not in text
    assert line["data"] == {"proof": "[redacted]", "lock": "L"}
