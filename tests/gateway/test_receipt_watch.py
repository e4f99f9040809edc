"""THREATS D10: what the broker took but central never confirmed is noticed (the pure part)."""

from __future__ import annotations

from gateway.mqtt import ReceiptWatch


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
