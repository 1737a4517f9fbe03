"""What the router knows about runs: starts, descriptors and resources it has seen.

Parents that were stored in an earlier session (or by another daemon) are looked up in
the metadata store, so a restart needs no in-memory history. Lookups that find nothing
are remembered until the end of the batch (:meth:`RunIndex.begin_batch`): 20,000 early
events of a descriptor that has not arrived cost one store query, not 20,000.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bluestream.layout import FieldSpec, field_specs
from bluestream.limits import Limits

__all__ = ["DescriptorInfo", "Loader", "Lru", "RunIndex"]


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
        #: (tenant, kind, key) looked up in this batch and not found.
        self._missing: set[tuple[str, str, str]] = set()

    async def lookup(self, tenant: str, kind: str, key: str, *,
                     fresh: bool = False) -> dict[str, Any] | None:
        """The stored (or being stored) document, else None. A miss is remembered
        until :meth:`begin_batch`; ``fresh`` asks the store again regardless."""
        cache = self._docs[kind]
        doc: dict[str, Any] | None = cache.get_touch((tenant, key))
        if doc is None:
            if not fresh and (tenant, kind, key) in self._missing:
                return None
            doc = await self._load(tenant, kind, key)
            if doc is None:
                self._missing.add((tenant, kind, key))
            else:
                cache.put((tenant, key), doc)
        return doc

    def begin_batch(self) -> None:
        """Forget remembered misses: a parent may have been stored since (by another
        daemon, or by this one in the batch that just ended)."""
        self._missing.clear()

    def remember(self, tenant: str, kind: str, key: str, doc: dict[str, Any]) -> None:
        self._docs[kind].put((tenant, key), doc)
        self._missing.discard((tenant, kind, key))

    async def descriptor(self, tenant: str, uid: str, *,
                         fresh: bool = False) -> DescriptorInfo | None:
        info: DescriptorInfo | None = self._descriptors.get_touch((tenant, uid))
        if info is None:
            doc = await self.lookup(tenant, "descriptor", uid, fresh=fresh)
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
