"""What the router knows about runs: starts, descriptors and resources it has seen.

Parents that were stored in an earlier session (or by another daemon) are looked up in
the metadata store, so a restart needs no in-memory history. Lookups that find nothing
are remembered until the end of the batch (:meth:`RunIndex.begin_batch`): 20,000 early
events of a descriptor that has not arrived cost one store query, not 20,000.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from bluestream.layout import FieldSpec, field_specs
from bluestream.limits import Limits

__all__ = ["DescriptorInfo", "Loader", "Lru", "ManyLoader", "RunIndex"]


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
#: Loads several at once: (tenant, kind, keys) -> {key: doc} for those stored.
ManyLoader = Callable[[str, str, Sequence[str]], Awaitable[dict[str, dict[str, Any]]]]


class RunIndex:
    """What the router knows: stored (or being stored) starts, descriptors, resources.

    Entries are the JSON-compatible documents as stored, so replays and conflicts can be
    told apart by comparing content. Bounded; misses are answered from the store.
    """

    def __init__(self, loader: Loader, limits: Limits, maxsize: int = 20_000,
                 many: ManyLoader | None = None) -> None:
        self._load = loader
        self._load_many = many
        self._limits = limits
        self._docs: dict[str, Lru] = {k: Lru(maxsize) for k in
                                      ("start", "descriptor", "resource", "stream_resource")}
        self._descriptors = Lru(maxsize)
        #: (tenant, run_start) -> keys of its descriptors in ``_descriptors``, so that
        #: forgetting a finished run does not scan every descriptor known.
        self._by_run: dict[tuple[str, str], set[tuple[str, str]]] = {}
        self._maxsize = maxsize
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

    async def prefetch(self, tenant: str, kind: str, keys: Iterable[str]) -> None:
        """Load in one query the documents of ``keys`` that are neither known nor known
        missing (a batch's new starts and descriptors: one query, not one per run)."""
        cache = self._docs[kind]
        want = [k for k in dict.fromkeys(keys)
                if (tenant, k) not in cache and (tenant, kind, k) not in self._missing]
        if not want or self._load_many is None:
            return
        found = await self._load_many(tenant, kind, want)
        for key in want:
            doc = found.get(key)
            if doc is None:
                self._missing.add((tenant, kind, key))
            else:
                cache.put((tenant, key), doc)

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
            self.remember_descriptor(tenant, uid, info)
        return info

    def remember_descriptor(self, tenant: str, uid: str, info: DescriptorInfo) -> None:
        """A descriptor's routing information, computed by the caller (who checked it)."""
        self._descriptors.put((tenant, uid), info)
        self._by_run.setdefault((tenant, info.run_start), set()).add((tenant, uid))
        while len(self._by_run) > self._maxsize:  # runs whose stop never came
            del self._by_run[next(iter(self._by_run))]

    def forget_run(self, tenant: str, run_start: str) -> None:
        """Drop a finished run's descriptors from memory (they reload on demand)."""
        for key in self._by_run.pop((tenant, run_start), ()):
            self._descriptors.pop(key, None)
            self._docs["descriptor"].pop(key, None)
        self._docs["start"].pop((tenant, run_start), None)
