"""The simulator's ``lie`` fault against the gateway's session, in memory (THREATS B7).

Every mode answers every command with something the gateway must refuse: the link ends with a
ProtocolError carrying a code, never another exception; the lock itself ran the command.
"""

from __future__ import annotations

import pytest
from helpers import SeededRng

from firmware_sim.lock_model import LIE_MODES, LockModel
from firmware_sim.memory_link import MemoryLink
from protocols.errors import ProtocolError
from protocols.messages import LockState, Op, Request, Status
from protocols.session import GatewayConnection, PairingCompleted, ResponseReceived, SessionEstablished, State

NOW = 1_700_000_000.0
ARGS: dict[Op, dict[str, int]] = {
    Op.READ_LOG: {"from": 1, "max": 16},
    Op.ACK_LOG: {"upto": 0},
    Op.SET_TIME: {"t": 5},
}
#: The ops whose results carry values (UNPAIR's is empty: only cmd_id and op can lie there).
VALUED = [Op.UNLOCK, Op.LOCK, Op.STATUS, Op.READ_LOG, Op.ACK_LOG, Op.SET_TIME]


def paired_lock() -> tuple[LockModel, bytes]:
    model = LockModel(lock_id="lk-liar-1", setup_code="123-456-789")
    gw = GatewayConnection(gw_id="gw-test-1", rng=SeededRng("gp"))
    link = MemoryLink(gw, model, rng=SeededRng("lp"), now=NOW)
    gw.start_pairing(model.setup_code)
    done = [e for e in link.roundtrip(NOW) if isinstance(e, PairingCompleted)]
    assert done
    return model, done[0].ltk


def command(model: LockModel, ltk: bytes, op: Op, seed: int = 0) -> list[object]:
    gw = GatewayConnection(gw_id="gw-test-1", rng=SeededRng(f"g{seed}{op}"))
    link = MemoryLink(gw, model, rng=SeededRng(f"l{seed}{op}"), now=NOW)
    gw.start_session(lock_id=model.lock_id, ltk=ltk)
    assert SessionEstablished("gw-test-1", model.lock_id) in link.roundtrip(NOW)
    gw.send_request(Request(op, bytes([seed, int(op)]) * 8, ARGS.get(op, {})))
    try:
        return list(link.roundtrip(NOW))
    finally:
        assert link.driver.error is None  # the lock sealed its lie: no frame too large for it


def test_honest_answers_pass() -> None:
    model, ltk = paired_lock()
    for op in VALUED:
        (event,) = command(model, ltk, op)
        assert isinstance(event, ResponseReceived) and event.response.status is Status.OK


_ALL = frozenset(VALUED)
#: Which answers each mode falsifies (docs/simulator.md); the others stay honest.
LIES_IN: dict[str, frozenset[Op]] = {
    "lock_seq": _ALL - {Op.SET_TIME},
    "battery": frozenset({Op.STATUS}),
    "time": frozenset({Op.STATUS, Op.READ_LOG, Op.SET_TIME}),
    "huge": _ALL,
    "types": _ALL,
    "surrogate": frozenset({Op.UNLOCK, Op.LOCK, Op.STATUS, Op.READ_LOG}),
    "cmd_id": _ALL,
    "op": _ALL,
}


def test_every_lie_mode_is_specified() -> None:
    assert set(LIES_IN) == LIE_MODES


@pytest.mark.parametrize("op", VALUED)
@pytest.mark.parametrize("mode", sorted(LIE_MODES))
def test_B7_every_lie_ends_the_link_with_a_coded_protocol_error(mode: str, op: Op) -> None:
    model, ltk = paired_lock()
    model.set_lie(mode)
    if op not in LIES_IN[mode]:
        (event,) = command(model, ltk, op)
        assert isinstance(event, ResponseReceived)
        return
    with pytest.raises(ProtocolError) as info:
        command(model, ltk, op)
    assert info.value.code == ("response_mismatch" if mode in {"cmd_id", "op"} else "bad_message")


def test_B7_the_lie_comes_after_the_bolt_moved_and_ends_with_null() -> None:
    model, ltk = paired_lock()
    model.set_lie("lock_seq")
    with pytest.raises(ProtocolError, match="lock_seq"):
        command(model, ltk, Op.UNLOCK)
    assert model.state is LockState.UNLOCKED  # it actuated, then lied about it
    model.set_lie(None)
    (event,) = command(model, ltk, Op.LOCK, seed=1)
    assert isinstance(event, ResponseReceived) and event.response.result["state"] == "locked"


def test_lie_rejects_unknown_modes() -> None:
    model, _ = paired_lock()
    with pytest.raises(ValueError, match="lie takes one of"):
        model.set_lie("everything")


def test_B7_a_closed_gateway_side_sends_nothing_more() -> None:
    model, ltk = paired_lock()
    model.set_lie("op")
    gw = GatewayConnection(gw_id="gw-test-1", rng=SeededRng("gx"))
    link = MemoryLink(gw, model, rng=SeededRng("lx"), now=NOW)
    gw.start_session(lock_id=model.lock_id, ltk=ltk)
    link.roundtrip(NOW)
    gw.send_request(Request(Op.STATUS, bytes(16)))
    with pytest.raises(ProtocolError):
        link.roundtrip(NOW)
    assert gw.state is State.CLOSED and gw.data_to_send() == b""
