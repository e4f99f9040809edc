"""The receiver's pure parts: parsing broker messages, chain decisions, configuration, retry waits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fleetfix import chain, payload
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import ConfigError
from gateway.receiver.app import RETRY_CAP_S, retry_wait_s
from gateway.receiver.config import load_receiver_config
from gateway.receiver.messages import Availability, BridgeState, Event, Heartbeat, Malformed, classify, parse
from protocols.event_encoding import event_hash

B = "lockgw"


def ev(e: dict[str, object], **kw: bool) -> Event:
    got = parse(f"{B}/{e['gw']}/events", payload(e, **kw), base=B)
    assert isinstance(got, Event)
    return got


def test_parse_event_keeps_exact_bytes_and_replayed_flag() -> None:
    e = chain("gw-a", n=1)[0]
    got = ev(e, replayed=True)
    assert (got.gw, got.seq, got.id, got.hash, got.replayed) == ("gw-a", 1, e["id"], e["hash"], True)
    assert json.loads(got.body)["replayed"] is True


def _reseal(e: dict[str, object], **changes: object) -> bytes:
    body = dict(e, **changes)
    body["hash"] = event_hash(body)
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("topic", "raw", "reason"),
    [
        ("lockgw/gw-a/events", b"{", "not valid JSON"),
        ("lockgw/gw-a/events", b"[]", "JSON object"),
        ("lockgw/gw-a/events", b'{"s": "\\ud800"}', "lone surrogate"),
        ("lockgw/gw-a/events", b"[" * 50 + b"]" * 50, "nested deeper"),
        ("lockgw/gw-a/events", b"[" * 100_000, "not valid JSON"),
        ("lockgw/gw-a/events", b'{"a": ' * 5000 + b"1" + b"}" * 5000, "nested"),
        ("lockgw/gw-a/events", b'{"v": 1, "k\\udfff": 2}', "lone surrogate"),
        ("lockgw/gw-a/events", b" " * (256 * 1024 + 1), "exceeds"),
        ("lockgw/gw-a/events", b'{"v": 1, "v": 1}', "duplicate key"),
        ("lockgw/gw-a/events", b'{"v": NaN}', "not a JSON number"),
        ("lockgw/GW/events", b"{}", "is not lockgw/G/<kind>"),
        ("other/gw-a/events", b"{}", "is not lockgw/G/<kind>"),
        ("lockgw/gw-a/events/x", b"{}", "is not lockgw/G/<kind>"),
        ("lockgw/gw-a/receipt", b"{}", "not consumed"),
        ("lockgw/gw-a/heartbeat", b'{"epoch": "e", "last_seq": -1, "receipt_seq": 0}', "heartbeat"),
        ("lockgw/gw-a/heartbeat", b'{"epoch": "e", "last_seq": true, "receipt_seq": 0}', "heartbeat"),
        ("lockgw/gw-a/availability", b'{"state": "up"}', "availability"),
    ],
)
def test_malformed_messages_name_the_reason(topic: str, raw: bytes, reason: str) -> None:
    with pytest.raises(Malformed, match=reason):
        parse(topic, raw, base=B)


def test_event_fields_checked_in_contract_order() -> None:
    e = chain("gw-a", n=2)[1]
    cases = {
        "field 'v' must be 1": _reseal(e, v=2),
        "does not name the gateway": _reseal(e, gw="gw-b"),
        "'epoch' is not an epoch id": _reseal(e, epoch="a/b", id="gw-a/a/b/2"),
        "'seq' must be an integer": _reseal(e, seq=True),
        "'id' is not G/E/seq": _reseal(e, id="gw-a/x/2"),
        "64 lowercase hex": _reseal(e, prev="AB" * 32),
        "'replayed' must be a boolean": json.dumps(dict(e, replayed="yes")).encode(),
        "forged or corrupted": json.dumps(dict(e, data={"n": 99})).encode(),
        "seq 1 must have prev": _reseal(dict(e, seq=1, id=e["id"][:-1] + "1"), prev="ab" * 32),
    }
    for reason, raw in cases.items():
        with pytest.raises(Malformed, match=reason):
            parse("lockgw/gw-a/events", raw, base=B)
    big_seq = _reseal(e, seq=2**63, id=f"gw-a/{e['epoch']}/{2**63}")
    with pytest.raises(Malformed, match=r"1\.\.2"):
        parse("lockgw/gw-a/events", big_seq, base=B)


def test_escaped_text_round_trips() -> None:
    """A paired surrogate escape (an emoji written as \\ud83d\\ude00) and escaped backslashes
    are valid text: the event is accepted and its hash verifies."""
    e = chain("gw-a", n=1)[0]
    body = _reseal(e, data={"who": "\U0001f600", "path": "a\\ud800b"})
    raw = json.dumps(json.loads(body), ensure_ascii=True).encode()  # non-ASCII as \\u escapes
    assert b"\\ud83d\\ude00" in raw
    got = parse("lockgw/gw-a/events", raw, base=B)
    assert isinstance(got, Event)
    assert json.loads(got.body)["data"]["who"] == "\U0001f600"


def test_heartbeat_and_availability_take_the_topic_gateway() -> None:
    hb = parse(
        f"{B}/gw-a/heartbeat", b'{"gw": "gw-b", "epoch": "e1", "last_seq": 5, "receipt_seq": 3}', base=B
    )
    assert isinstance(hb, Heartbeat)
    assert (hb.gw, hb.last_seq, hb.receipt_seq) == ("gw-a", 5, 3)
    av = parse(f"{B}/gw-a/availability", b'{"state": "offline"}', base=B)
    assert isinstance(av, Availability)
    assert (av.gw, av.state) == ("gw-a", "offline")


def test_classify_new_duplicate_reuse_and_breaks() -> None:
    events = [ev(e) for e in chain("gw-a", n=5)]
    epoch = events[0].epoch
    stored = {("gw-a", epoch, 2): (events[1].hash, events[1].prev)}
    out = classify(events, stored)
    assert [e.seq for e in out.new] == [1, 3, 4, 5]
    assert [e.seq for e in out.duplicates] == [2]
    assert not out.conflicts
    other = chain("gw-a", n=3, epoch=epoch, site="elsewhere")  # same seqs, other content
    out2 = classify([ev(other[2])], out.known)
    assert [(c.kind, c.event.seq) for c in out2.conflicts] == [("seq_reuse", 3)]
    # A new seq whose prev is not the stored predecessor's hash: chain_break, not stored.
    nxt = chain("gw-a", n=1, epoch=epoch, start=6, prev="cd" * 32)
    out3 = classify([ev(nxt[0])], out.known)
    assert [(c.kind, c.event.seq) for c in out3.conflicts] == [("chain_break", 6)]
    assert not out3.new
    # A seq whose hash is not its stored successor's prev: chain_break too.
    lone = {("gw-a", epoch, 3): (events[2].hash, events[2].prev)}
    fake2 = chain("gw-a", n=2, epoch=epoch, site="x")[1]
    out4 = classify([ev(fake2)], lone)
    assert [c.kind for c in out4.conflicts] == ["chain_break"]


@given(st.permutations(list(range(12))), st.sets(st.integers(0, 11), max_size=4))
def test_classify_any_order_any_stored_subset_stores_each_once(order: list[int], pre: set[int]) -> None:
    events = [ev(e) for e in CHAIN]
    stored = {(e.gw, e.epoch, e.seq): (e.hash, e.prev) for i, e in enumerate(events) if i in pre}
    batch = [events[i] for i in order] + [events[i] for i in order[:3]]  # duplicates in the batch
    out = classify(batch, stored)
    assert not out.conflicts
    assert sorted(e.seq for e in out.new) == [i + 1 for i in range(12) if i not in pre]


CHAIN = chain("gw-p", n=12)


def test_config_defaults_env_and_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "r.toml"
    cfg.write_text('[receiver]\ntransport = "amqp"\nbatch_max = 100\n[amqp]\nprefetch = 200\n')
    c = load_receiver_config(cfg, env={"LOCKGW_RECEIVER_RECEIVER__INSTANCE": "r7", "LOCKGW_MQTT__URL": "x"})
    assert (c.receiver.instance, c.receiver.transport, c.amqp.prefetch) == ("r7", "amqp", 200)
    bad = {
        "receiver.nope: unknown key": "[receiver]\nnope = 1\n",
        "receiver.batch_max": "[receiver]\nbatch_max = 0\n",
        "postgres.dsn: secrets are never inline": '[postgres]\ndsn = "postgresql://u:pw@h/db"\n',
        "amqp.url: secrets are never inline": '[amqp]\nurl = "amqp://guest:guest@h/"\n',
        "amqp.prefetch must be at least": '[receiver]\ntransport = "amqp"\nbatch_max = 600\n',
        "not valid TOML": "[receiver\n",
    }
    for message, text in bad.items():
        cfg.write_text(text)
        with pytest.raises(ConfigError, match=message.replace(".", r"\.", 1)):
            load_receiver_config(cfg, env={})
    secret = tmp_path / "pw"
    secret.write_text("hunter2\n")
    secret.chmod(0o644)
    cfg.write_text(f'[postgres]\npassword_file = "{secret}"\n')
    with pytest.raises(ConfigError, match="readable by group or others"):
        load_receiver_config(cfg, env={})
    secret.chmod(0o600)
    assert load_receiver_config(cfg, env={}).postgres.password_file == secret


@pytest.mark.parametrize(
    ("attempt", "low", "high"), [(0, 0.375, 0.625), (1, 0.75, 1.25), (3, 3.0, 5.0), (40, 22.5, 37.5)]
)
def test_retry_waits_grow_and_cap(attempt: int, low: float, high: float) -> None:
    assert low <= retry_wait_s(attempt, lambda: 0.0) <= retry_wait_s(attempt, lambda: 1.0) <= high
    assert retry_wait_s(attempt, lambda: 0.5) <= RETRY_CAP_S


_json_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
_json_any = st.recursive(
    _json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
)


@given(
    st.sampled_from(["events", "heartbeat", "availability", "bridge", "receipt", "x"]),
    st.binary(max_size=400)
    | _json_any.map(lambda v: json.dumps(v).encode())
    | st.builds(
        lambda e, k, v: json.dumps(dict(e, **{k: v})).encode(),
        st.sampled_from(CHAIN),
        st.sampled_from(["v", "gw", "epoch", "seq", "id", "hash", "prev", "replayed", "data", "type"]),
        _json_any,
    ),
)
def test_any_input_is_typed_or_malformed(kind: str, raw: bytes) -> None:
    """Whatever arrives, parse returns a typed message or raises Malformed — nothing else."""
    try:
        got = parse(f"{B}/gw-p/{kind}", raw, base=B)
    except Malformed:
        return
    assert isinstance(got, Event | Heartbeat | Availability | BridgeState)
    if isinstance(got, Event):  # only an intact event of the topic's gateway gets through
        assert got.gw == "gw-p"
        assert event_hash(json.loads(got.body)) == got.hash
