"""The simulator's radio timing model (firmware_sim/radio.py): pure, seeded, Core-spec bounds."""

from __future__ import annotations

import random
import statistics

import pytest

from firmware_sim.__main__ import main as sim_main
from firmware_sim.radio import (
    PROFILES,
    TRANSMIT_WINDOW_DELAY_MS,
    LinkClock,
    LockRadio,
    expected_advert_wait_s,
    expected_exchange_s,
    parse_overrides,
    profile_named,
)

TYPICAL = PROFILES["typical"]


def test_named_profiles_are_what_the_issue_and_docs_say() -> None:
    assert PROFILES["flat"].flat
    assert (TYPICAL.adv_interval_ms, TYPICAL.conn_interval_ms, TYPICAL.mtu, TYPICAL.motor_ms) == (
        500.0,
        30.0,
        247,
        400.0,
    )
    slow = PROFILES["slow"]
    assert (slow.adv_interval_ms, slow.conn_interval_ms, slow.mtu, slow.motor_ms) == (1000.0, 50.0, 23, 700.0)
    for profile in PROFILES.values():
        profile.check()
    with pytest.raises(ValueError, match="unknown radio profile"):
        profile_named("fast")


def test_overrides_are_checked_against_the_core_spec_ranges() -> None:
    p = parse_overrides(TYPICAL, ["adv_interval_ms=250", "mtu=185", "conn_interval_ms=7.5"])
    assert (p.adv_interval_ms, p.mtu, p.conn_interval_ms) == (250.0, 185, 7.5)
    for bad in (
        "conn_interval_ms=31",  # not a 1.25 ms step
        "conn_interval_ms=5",  # under 7.5 ms
        "adv_interval_ms=10",
        "mtu=22",
        "mtu=100.5",
        "jitter=0.9",
        "motor_ms=-1",
        "motor_ms=nan",
        "supervision_timeout_ms=50",
        "nope=1",
        "mtu",
        "mtu=abc",
    ):
        with pytest.raises(ValueError):
            parse_overrides(TYPICAL, [bad])


def test_the_same_seed_gives_the_same_draws() -> None:
    def draws(seed: str) -> list[float]:
        radio = LockRadio(TYPICAL, random.Random(seed))
        link = radio.new_link(100.0)
        return [radio.adv_interval_s, radio.next_advert_gap_s(), radio.motor_s(), link.deliver_at(0, 100.0)]

    assert draws("7:lk-1") == draws("7:lk-1")
    assert draws("7:lk-1") != draws("7:lk-2")


def test_per_lock_jitter_stays_within_its_bounds() -> None:
    rng = random.Random(1)
    for _ in range(200):
        radio = LockRadio(TYPICAL, rng)
        assert 0.45 <= radio.adv_interval_s <= 0.55
        gap = radio.next_advert_gap_s()
        assert radio.adv_interval_s <= gap <= radio.adv_interval_s + 0.010
        assert 0.36 * 0.95 <= radio.motor_s() <= 0.44 * 1.05


def test_pdus_wait_for_the_next_connection_event_one_per_direction_per_event() -> None:
    link = LinkClock(TYPICAL, 10.0, random.Random(3))
    ci = 0.030
    assert (
        10.0 + TRANSMIT_WINDOW_DELAY_MS / 1000 <= link.anchor <= 10.0 + TRANSMIT_WINDOW_DELAY_MS / 1000 + ci
    )
    first = link.deliver_at(0, 10.0)
    assert first == link.anchor  # before the anchor: at the anchor
    # Two more PDUs handed over at once in the same direction: one event each.
    assert link.deliver_at(0, 10.0) == pytest.approx(link.anchor + ci)
    assert link.deliver_at(0, 10.0) == pytest.approx(link.anchor + 2 * ci)
    # The other direction is free at the first event after now.
    assert link.deliver_at(1, link.anchor + 0.001) == pytest.approx(link.anchor + ci)
    # A ping-pong: each answer one event after the request it answers.
    t = link.anchor + 10 * ci + 0.0001
    req = link.deliver_at(0, t)
    rsp = link.deliver_at(1, req + 0.0001)
    assert req == pytest.approx(link.anchor + 11 * ci)
    assert rsp - req == pytest.approx(ci)
    assert link.pdus == 6


def test_expected_advert_wait_matches_a_simulated_renewal_process() -> None:
    radio = LockRadio(TYPICAL, random.Random(5))
    rng = random.Random(6)
    waits = []
    t, nxt = 0.0, 0.0
    for _ in range(20000):
        t += rng.uniform(0, 2.0)
        while nxt < t:
            nxt += radio.next_advert_gap_s()
        waits.append(nxt - t)
    assert statistics.fmean(waits) == pytest.approx(
        expected_advert_wait_s(TYPICAL, radio.adv_interval_s), rel=0.03
    )
    assert expected_exchange_s(TYPICAL, 0) == 0
    assert expected_exchange_s(TYPICAL, 3) == pytest.approx(0.015 + 0.060)


def test_the_cli_refuses_a_bad_profile_value(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        sim_main(["serve", "--radio", "typical", "--radio-set", "conn_interval_ms=3"])
    assert exc.value.code == 2
    assert "conn_interval_ms" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sim_main(["serve", "--radio", "warp"])
