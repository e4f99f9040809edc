"""What central has not confirmed: the stall alarm (THREATS D10) and the re-send backoff (D6)."""

from __future__ import annotations

from gateway.mqtt.bridge import ReceiptWatch, republish_wait


def test_D10_stall_is_raised_after_the_period_and_cleared_by_progress() -> None:
    w = ReceiptWatch(600)
    assert not w.stalled(published_seq=5, receipt_seq=5, now=0)  # nothing outstanding
    assert not w.stalled(published_seq=9, receipt_seq=5, now=10)  # outstanding: the clock starts
    assert not w.stalled(published_seq=12, receipt_seq=5, now=609)  # new publishes do not reset it
    assert w.stalled(published_seq=12, receipt_seq=5, now=610)
    assert not w.stalled(published_seq=12, receipt_seq=8, now=611)  # progress starts over
    assert not w.stalled(published_seq=12, receipt_seq=8, now=1210)
    assert w.stalled(published_seq=12, receipt_seq=8, now=1211)
    assert not w.stalled(published_seq=12, receipt_seq=12, now=1212)  # all confirmed
    assert not w.stalled(published_seq=13, receipt_seq=12, now=5000)  # a fresh start


def test_D10_a_receipt_stuck_below_a_gap_stays_stalled() -> None:
    # Central lost seq 7: it can receipt 6 but never past the gap, however long events flow.
    w = ReceiptWatch(600)
    w.stalled(published_seq=7, receipt_seq=6, now=0)
    for t in range(60, 600, 60):
        assert not w.stalled(published_seq=7 + t, receipt_seq=6, now=t)
    assert w.stalled(published_seq=700, receipt_seq=6, now=600)


def test_D6_re_sends_back_off_while_receipts_do_not_move() -> None:
    waits, wait = [], 60.0
    for _ in range(8):
        wait = republish_wait(wait, base=60, stalled=True)
        waits.append(wait)
    assert waits == [120, 240, 480, 960, 1920, 3600, 3600, 3600]
    assert republish_wait(3600, base=60, stalled=False) == 60  # receipts moved: back to the base
    assert republish_wait(0.5, base=0.5, stalled=True) == 1.0
