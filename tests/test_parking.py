"""The parking lot: bounded in count, bytes and age; holds back commits of what it keeps."""

from __future__ import annotations

from bluestream.consumers.envelope import Envelope, Routed
from bluestream.consumers.parking import ParkingLot


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def item(offset: int, size: int = 10) -> Routed:
    return Routed("event", {}, Envelope("t", 0, offset, b"x" * size))


def test_byte_budget_evicts_oldest_first() -> None:
    clock = Clock()
    lot = ParkingLot(max_count=100, max_age_s=60, clock=clock, max_bytes=250)
    for off in range(5):
        clock.now = off
        lot.park(("t", "descriptor", "d"), item(off, 100))
    evicted = lot.evict()
    assert [r.env.offset for r in evicted] == [0, 1, 2]
    assert len(lot) == 2
    assert lot.held_offsets() == {("t", 0): 3}


def test_count_and_age_limits_and_release() -> None:
    clock = Clock()
    lot = ParkingLot(max_count=2, max_age_s=10, clock=clock)
    for off in range(3):
        lot.park(("t", "descriptor", f"d{off}"), item(off))
    assert [r.env.offset for r in lot.evict()] == [0]
    assert [r.env.offset for r in lot.release(("t", "descriptor", "d2"))] == [2]
    clock.now = 11
    assert [r.env.offset for r in lot.evict()] == [1]
    assert len(lot) == 0 and lot.held_offsets() == {}
