"""The control commands' arguments are parsed once, into one strict model per command, and
refused with the same messages and exit codes as before the models (issue 11); answers are one
typed ControlAnswer, encoded and parsed in one place."""

from __future__ import annotations

import pytest

from gateway.cli.commands import EventsArgs, PairArgs, ScanArgs, UnpairArgs, dispatch
from gateway.wire import ControlAnswer, WireError

#: Malformed arguments are answered before the command touches the gateway.
NO_GATEWAY = None

BOUNDS = "events takes 1 ≤ since ≤ 2^63-1 and 1 ≤ limit ≤ 10000"
TYPE_FILTER = "events: type is an event type (access.granted) or a prefix (access.*)"
PAIR_USAGE = "pair needs an address and a setup code"
PAIR_TEXTS = "pair: the setup code and the name are short, non-empty texts"
ADDRESS = "AA:BB:CC:DD:EE:FF"


@pytest.mark.parametrize(
    ("cmd", "args", "exit_code", "error"),
    [
        ("events", {"since": 0}, 2, BOUNDS),
        ("events", {"since": True}, 2, BOUNDS),
        ("events", {"since": 1.0}, 2, BOUNDS),
        ("events", {"limit": 10_001}, 2, BOUNDS),
        ("events", {"since": 2**63}, 2, BOUNDS),
        ("events", {"lock": ""}, 2, "events: lock must be a non-empty string"),
        ("events", {"sub": 7}, 2, "events: sub must be a non-empty string"),
        ("events", {"from": "x" * 257}, 2, "events: from must be a non-empty string"),
        ("events", {"until": ["x"]}, 2, "events: until must be a non-empty string"),
        ("events", {"type": "Access"}, 2, TYPE_FILTER),
        ("events", {"type": "access.*\n"}, 2, TYPE_FILTER),
        # every filter is checked for being text before the type's pattern, as before
        ("events", {"type": "Access", "sub": 7}, 2, "events: sub must be a non-empty string"),
        ("events", {"since": 0, "lock": ""}, 2, BOUNDS),
        ("request", {"action": "unlock"}, 2, "request needs an action and a payload object"),
        ("request", {"action": 1, "payload": {}}, 2, "request needs an action and a payload object"),
        ("request", {"action": "unlock", "payload": []}, 2, "request needs an action and a payload object"),
        ("trust_install", {}, 2, "document must be base64 text"),
        ("trust_install", {"document": ""}, 2, "document must be base64 text"),
        ("trust_install", {"document": "not base64!"}, 2, "document must be base64 text"),
        ("pair", {"address": ADDRESS}, 2, PAIR_USAGE),
        ("pair", {"address": ADDRESS, "code": 123}, 2, PAIR_USAGE),
        ("pair", {"address": ADDRESS, "code": "1", "name": 5}, 2, PAIR_USAGE),
        (
            "pair",
            {"address": "AA:BB", "code": "1"},
            2,
            "ADDRESS 'AA:BB' is not a BLE address (AA:BB:CC:DD:EE:FF)",
        ),
        ("pair", {"address": ADDRESS, "code": ""}, 2, PAIR_TEXTS),
        ("pair", {"address": ADDRESS, "code": "1", "name": "n" * 257}, 2, PAIR_TEXTS),
        ("unpair", {}, 2, "unpair needs a lock id"),
        ("unpair", {"lock": 5}, 2, "unpair needs a lock id"),
        # found by attack (round 2): any truthy value forced the unpair, "false" too
        ("unpair", {"lock": "lk-1", "force": "false"}, 2, "unpair: force is true or false"),
        ("unpair", {"lock": "lk-1", "force": "no"}, 2, "unpair: force is true or false"),
        ("unpair", {"lock": "lk-1", "force": [0]}, 2, "unpair: force is true or false"),
        ("unpair", {"lock": "lk-1", "force": 2}, 2, "unpair: force is true or false"),
        ("scan", {"timeout": 0.1}, 2, "scan timeout must be 0.5..60 s"),
        ("scan", {"timeout": "5"}, 2, "scan timeout must be 0.5..60 s"),
        ("open_sesame", {}, 2, "unknown control command 'open_sesame'"),
    ],
)
async def test_malformed_arguments_are_refused_with_the_commands_message(
    cmd: str, args: dict[str, object], exit_code: int, error: str
) -> None:
    assert await dispatch(NO_GATEWAY, cmd, args) == {"ok": False, "exit": exit_code, "error": error}  # type: ignore[arg-type]


async def test_a_malformed_lock_id_for_status_is_invalid_request_exit_1() -> None:
    answer = await dispatch(NO_GATEWAY, "status", {"lock": 17})  # type: ignore[arg-type]
    assert answer == {
        "ok": False,
        "exit": 1,
        "error": "field 'lock': Input should be a valid string",
        "code": "invalid_request",
    }


def test_arguments_parse_into_typed_values() -> None:
    events = EventsArgs.model_validate({"type": "access.*", "from": "2026-11-22", "extra": 1})
    assert (events.since, events.limit, events.type_glob(), events.ts_from) == (
        1,
        100,
        "access.*",
        "2026-11-22",
    )
    assert EventsArgs.model_validate({"type": "lock.paired"}).type_glob() == "lock.paired"
    pair = PairArgs.model_validate({"address": ADDRESS, "code": "1", "name": None})
    assert pair.name == ""  # no name: the lock id names the door
    assert UnpairArgs.model_validate({"lock": "lk-1", "force": 1}).force is True
    assert UnpairArgs.model_validate({"lock": "lk-1", "force": None}).force is False
    assert UnpairArgs.model_validate({"lock": "lk-1", "force": False}).force is False
    assert ScanArgs.model_validate({"timeout": 2}).timeout == 2.0


def test_answers_encode_and_parse_in_one_place() -> None:
    done = ControlAnswer.done({"lock": "lk-1"})
    assert done.as_json() == {"ok": True, "exit": 0, "data": {"lock": "lk-1"}}
    refused = ControlAnswer.refused("no", exit_code=3, code="busy")
    assert refused.as_json() == {"ok": False, "exit": 3, "error": "no", "code": "busy"}
    assert ControlAnswer.refused("no", code="").as_json() == {"ok": False, "exit": 1, "error": "no"}
    for answer in (done, refused):
        assert ControlAnswer.parse(answer.as_json()) == answer
    for bad in ({"ok": "yes", "exit": 0}, {"ok": True}, {"ok": True, "exit": 256}, []):
        with pytest.raises(WireError):
            ControlAnswer.parse(bad)
