"""Documents waiting for their parent (DESIGN I4).

Documents may arrive before their parent (a descriptor before its start, an event before
its descriptor, a datum before its resource). Those are parked, bounded in count, age
and bytes, and released when the parent arrives; the source never commits past the
oldest parked offset, so a crash loses nothing that waits here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bluestream.consumers.envelope import Routed

__all__ = ["ParkingLot"]


@dataclass
class ParkingLot:
    """Documents waiting for a parent, by (tenant, parent kind, parent key)."""

    max_count: int
    max_age_s: float
    clock: Callable[[], float] = time.monotonic
    #: Most message bytes held parked: images waiting for a descriptor must not grow
    #: memory beyond what the count limit alone would allow for small documents.
    max_bytes: int = 256 * 1024 * 1024
    _waiting: dict[tuple[str, str, str], list[Routed]] = field(default_factory=dict)
    _count: int = 0

    def __len__(self) -> int:
        return self._count

    def park(self, waiting_for: tuple[str, str, str], item: Routed) -> None:
        item.extra["parked_at"] = self.clock()
        item.extra["waiting_for"] = waiting_for
        self._waiting.setdefault(waiting_for, []).append(item)
        self._count += 1

    def release(self, parent: tuple[str, str, str]) -> list[Routed]:
        items = self._waiting.pop(parent, [])
        self._count -= len(items)
        return items

    def evict(self) -> list[Routed]:
        """Items too old, and the oldest beyond the count or byte limit, in arrival order."""
        now = self.clock()
        items = sorted((i for lst in self._waiting.values() for i in lst),
                       key=lambda r: r.extra["parked_at"])
        over = max(0, len(items) - self.max_count)
        excess = sum(len(r.env.value or b"") for r in items) - self.max_bytes
        for n, r in enumerate(items):  # oldest first until the byte budget holds
            if excess <= 0:
                break
            excess -= len(r.env.value or b"")
            over = max(over, n + 1)
        out = [r for n, r in enumerate(items)
               if n < over or now - r.extra["parked_at"] >= self.max_age_s]
        if out:
            self._remove({id(r) for r in out})
        return out

    def drop(self, keep: Callable[[Routed], bool]) -> int:
        """Forget parked items for which ``keep`` is false (revoked partitions)."""
        gone = {id(r) for lst in self._waiting.values() for r in lst if not keep(r)}
        self._remove(gone)
        return len(gone)

    def held_offsets(self) -> dict[tuple[str, int], int]:
        """Lowest parked offset per (topic, partition): commits must stay below it."""
        held: dict[tuple[str, int], int] = {}
        for lst in self._waiting.values():
            for r in lst:
                tp = (r.env.topic, r.env.partition)
                held[tp] = min(held.get(tp, r.env.offset), r.env.offset)
        return held

    def _remove(self, ids: set[int]) -> None:
        if not ids:
            return
        for key in list(self._waiting):
            kept = [r for r in self._waiting[key] if id(r) not in ids]
            if kept:
                self._waiting[key] = kept
            else:
                del self._waiting[key]
        self._count = sum(len(v) for v in self._waiting.values())
