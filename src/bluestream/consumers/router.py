"""Per-run routing: which run and descriptor each document belongs to, and parking.

Documents may arrive before their parent (a descriptor before its start, an event before
its descriptor, a datum before its resource). Those are parked, bounded in count and age,
and released when the parent arrives (DESIGN I4). Parents that were stored in an earlier
session are looked up in the metadata store, so a restart needs no in-memory history.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from bluestream.consumers.envelope import Routed
from bluestream.limits import Limits
from bluestream.schemas.normalise import FieldSpec, field_specs

__all__ = ["DescriptorInfo", "Lru", "ParkingLot", "RunIndex"]

#: For each kind that needs a parent: (parent kind, field naming the parent).
PARENT_FIELD: dict[str, tuple[str, str]] = {
    "descriptor": ("start", "run_start"),
    "stop": ("start", "run_start"),
    "event": ("descriptor", "descriptor"),
    "event_page": ("descriptor", "descriptor"),
    "resource": ("start", "run_start"),  # optional in old documents
    "datum": ("resource", "resource"),
    "stream_resource": ("start", "run_start"),
    "stream_datum": ("stream_resource", "stream_resource"),
}


class Lru(OrderedDict[Any, Any]):
    """A bounded mapping that forgets the least recently used entries."""

    def __init__(self, maxsize: int) -> None:
        super().__init__()
        self.maxsize = maxsize

    def get_touch(self, key: Any) -> Any:
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def put(self, key: Any, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.maxsize:
            self.popitem(last=False)


@dataclass
class DescriptorInfo:
    doc: dict[str, Any]
    run_start: str
    specs: dict[str, FieldSpec]


#: Loads a stored parent document: (tenant, kind, key) -> doc or None.
Loader = Callable[[str, str, str], Awaitable[dict[str, Any] | None]]


class RunIndex:
    """What the router knows: stored (or being stored) starts, descriptors, resources.

    Entries are the JSON-compatible documents as stored, so replays and conflicts can be
    told apart by comparing content. Bounded; misses are answered from the store.
    """

    def __init__(self, loader: Loader, limits: Limits, maxsize: int = 20_000) -> None:
        self._load = loader
        self._limits = limits
        self._docs: dict[str, Lru] = {k: Lru(maxsize) for k in
                                      ("start", "descriptor", "resource", "stream_resource")}
        self._descriptors = Lru(maxsize)

    async def lookup(self, tenant: str, kind: str, key: str) -> dict[str, Any] | None:
        cache = self._docs[kind]
        doc: dict[str, Any] | None = cache.get_touch((tenant, key))
        if doc is None:
            doc = await self._load(tenant, kind, key)
            if doc is not None:
                cache.put((tenant, key), doc)
        return doc

    def remember(self, tenant: str, kind: str, key: str, doc: dict[str, Any]) -> None:
        self._docs[kind].put((tenant, key), doc)

    async def descriptor(self, tenant: str, uid: str) -> DescriptorInfo | None:
        info: DescriptorInfo | None = self._descriptors.get_touch((tenant, uid))
        if info is None:
            doc = await self.lookup(tenant, "descriptor", uid)
            if doc is None:
                return None
            info = DescriptorInfo(doc, str(doc["run_start"]), field_specs(doc, self._limits))
            self._descriptors.put((tenant, uid), info)
        return info

    def forget_run(self, tenant: str, run_start: str) -> None:
        """Drop a finished run's descriptors from memory (they reload on demand)."""
        for key in [k for k, v in self._descriptors.items()
                    if k[0] == tenant and v.run_start == run_start]:
            del self._descriptors[key]
            self._docs["descriptor"].pop(key, None)
        self._docs["start"].pop((tenant, run_start), None)


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
