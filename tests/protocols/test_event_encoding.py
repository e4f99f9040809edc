"""Event sealing: the stored JSON text is the sealed event, and the chain verifies."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from protocols.event_encoding import GENESIS, seal_event, seal_event_json, verify_chain


@given(
    st.dictionaries(
        st.sampled_from(["type", "lock", "sub", "reason", "data", "outcome"]),
        st.one_of(st.none(), st.text(max_size=20), st.dictionaries(st.text(max_size=5), st.integers())),
    )
)
def test_seal_event_json_is_the_sealed_event_and_verifies(fields: dict[str, object]) -> None:
    kwargs = {"gw": "gw-1", "site": "s", "epoch": "e" * 16, "seq": 1, "prev": GENESIS, "wall": 1.8e9}
    event, text = seal_event_json(fields, **kwargs)  # type: ignore[arg-type]
    assert json.loads(text) == event == seal_event(fields, **kwargs)  # type: ignore[arg-type]
    verify_chain([json.loads(text)])
