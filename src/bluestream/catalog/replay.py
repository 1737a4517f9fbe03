"""Documents back out: a stored run replayed (``documents()``) or followed live
(``follow()``), in an order any event-model consumer accepts.

Order: ``start``; resources and stream resources; then, merged by time across
descriptors, each descriptor (followed by its stream datums) before its event pages,
and every datum just before the first page that references it; datums no page
references; ``stop`` last. Event pages are rebuilt from Zarr in pages of at most
``page_events`` events and ``page_bytes`` bytes (what was published as single events
comes back as pages unless ``pages=False``).

Snapshot rule: the stop document is read *before* the arrays' lengths. The writer
stores a run's events (Zarr, then ``event_stream``) before its stop, so when a stop is
seen every event of the run is covered by what is read next.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
import numpy as np
from numpy.typing import NDArray

from bluestream.catalog._tasks import task_group
from bluestream.catalog.arrays import Rows, row_bytes
from bluestream.catalog.context import CatalogContext
from bluestream.errors import NotFound
from bluestream.layout import column_names, reader_specs
from bluestream.schemas.normalise import page_to_event_page, page_to_events

__all__ = ["PAGE_BYTES", "PAGE_EVENTS", "follow", "replay"]

Array = NDArray[Any]
Doc = dict[str, Any]
Item = tuple[str, Doc]

PAGE_EVENTS = 1000
PAGE_BYTES = 64 * 1024 * 1024
#: Bytes read from Zarr at once when rebuilding pages (then cut into pages).
_WINDOW_BYTES = 64 * 1024 * 1024


@dataclass
class _RunDocs:
    """The metadata of a run as stored at one moment."""

    start: Doc
    stop: Doc | None
    descriptors: list[Doc]
    records: dict[str, Doc]
    resources: list[Doc]
    stream_resources: list[Doc]
    datums: dict[str, Doc] = field(default_factory=dict)  # by datum_id, grouped by resource
    stream_datums: list[Doc] = field(default_factory=list)


async def _fetch(ctx: CatalogContext, run_uid: str, *, with_datums: bool) -> _RunDocs:
    await ctx.ensure_open()
    store = ctx.store
    stop = await ctx.call("read stop", store.get, "stop", run_uid)  # first: see module doc
    got: dict[str, Any] = {}

    async def get(name: str, what: str, fn: Any, *args: Any) -> None:
        got[name] = await ctx.call(what, fn, *args)

    async with task_group() as tg:
        tg.start_soon(get, "start", "read start", store.get, "start", run_uid)
        tg.start_soon(get, "descriptors", "read descriptors",
                      partial(store.find, "descriptor", run_start=run_uid))
        tg.start_soon(get, "records", "read event_stream", store.streams, run_uid)
        tg.start_soon(get, "resources", "read resources",
                      partial(store.find, "resource", run_start=run_uid))
        tg.start_soon(get, "stream_resources", "read stream resources",
                      partial(store.find, "stream_resource", run_start=run_uid))
    if got["start"] is None:
        raise NotFound(f"no run with uid {run_uid!r} in tenant {ctx.tenant!r}")
    docs = _RunDocs(got["start"], stop,
                    sorted(got["descriptors"], key=lambda d: (d.get("time", 0.0), d["uid"])),
                    {str(r["descriptor_uid"]): r for r in got["records"]},
                    got["resources"], got["stream_resources"])
    if with_datums:
        per_res: dict[str, list[Doc]] = {}
        per_sres: dict[str, list[Doc]] = {}

        async def datums(uid: str) -> None:
            per_res[uid] = await ctx.call("read datums", store.find, "datum", resource=uid)

        async def sdatums(uid: str) -> None:
            per_sres[uid] = await ctx.call("read stream datums", store.find, "stream_datum",
                                           resource=uid)

        async with task_group() as tg:
            for r in docs.resources:
                tg.start_soon(datums, r["uid"])
            for r in docs.stream_resources:
                tg.start_soon(sdatums, r["uid"])
        for r in docs.resources:
            docs.datums.update((d["datum_id"], d) for d in per_res[r["uid"]])
        for r in docs.stream_resources:
            docs.stream_datums.extend(per_sres[r["uid"]])
    return docs


class _Emitter:
    """Tracks what was emitted, so references always come before what uses them."""

    def __init__(self, ctx: CatalogContext, *, pages: bool) -> None:
        self.ctx = ctx
        self.pages = pages
        self.resources: set[str] = set()
        self.datums: set[str] = set()
        self.known_datums: dict[str, Doc] = {}
        self.stream_resources: set[str] = set()
        self.stream_datums: set[str] = set()
        self.descriptors: set[str] = set()

    def resource(self, doc: Doc, kind: str = "resource") -> list[Item]:
        seen = self.resources if kind == "resource" else self.stream_resources
        if doc["uid"] in seen:
            return []
        seen.add(doc["uid"])
        return [(kind, doc)]

    async def datums_for(self, rows: Rows, descriptor: Mapping[str, Any]) -> list[Item]:
        """Datums (and unseen resources) referenced by ``rows``, not emitted yet."""
        specs = reader_specs(descriptor)
        ids: list[str] = []
        for key, spec in specs.items():
            dk = descriptor["data_keys"][key]
            if spec.external and key in rows.data and \
                    not str(dk.get("external") or "").startswith("STREAM:"):
                ids.extend(str(v) for v in rows.data[key].tolist())
        new = [i for i in dict.fromkeys(ids) if i and i not in self.datums]
        if not new:
            return []
        missing = [i for i in new if i not in self.known_datums]
        if missing:
            found = await self.ctx.call("read datums", self.ctx.store.find, "datum",
                                        keys=missing)
            self.known_datums.update((d["datum_id"], d) for d in found)
        out: list[Item] = []
        unseen_res = list(dict.fromkeys(
            str(self.known_datums[i]["resource"]) for i in new
            if i in self.known_datums and str(self.known_datums[i]["resource"])
            not in self.resources))
        if unseen_res:
            for res in await self.ctx.call("read resources", self.ctx.store.find, "resource",
                                           keys=unseen_res):
                out.extend(self.resource(res))
        for i in new:
            datum = self.known_datums.get(i)
            if datum is not None:  # a reference to a datum never stored is left dangling
                self.datums.add(i)
                out.append(("datum", datum))
        return out

    def page_items(self, rows: Rows, descriptor: Mapping[str, Any]) -> list[Item]:
        page = rows.to_page()
        if self.pages:
            return [("event_page", page_to_event_page(page, descriptor))]
        return [("event", ev) for ev in page_to_events(page, descriptor)]

    def stream_datum_items(self, docs: Iterable[Doc], descriptor_uid: str) -> list[Item]:
        mine = [d for d in docs if d.get("descriptor") == descriptor_uid
                and d["uid"] not in self.stream_datums]
        mine.sort(key=lambda d: (d["seq_nums"]["start"], d["uid"]))
        self.stream_datums.update(d["uid"] for d in mine)
        return [("stream_datum", d) for d in mine]


def _zarr_keys(descriptor: Mapping[str, Any], record: Mapping[str, Any]) -> list[str]:
    written = record.get("data_keys")
    if isinstance(written, list | tuple) and written:
        return [str(k) for k in written]
    return list(descriptor.get("data_keys", {}))


async def _pages(ctx: CatalogContext, record: Doc, keys: Sequence[str], *,
                 page_events: int, page_bytes: int,
                 positions: Array | None = None) -> AsyncIterator[Rows]:
    """Rows of one descriptor cut into pages; only ``positions`` if given."""
    arrays = await ctx.arrays.open_arrays(record, column_names(keys))
    n = min(int(record["length"]), *(int(a.shape[0]) for a in arrays.values()))
    per_row = row_bytes(list(arrays.values()))
    per_page = max(1, min(page_events, page_bytes // per_row))
    window = max(per_page, (_WINDOW_BYTES // per_row) // per_page * per_page)
    lo, hi = 0, n
    if positions is not None:
        if positions.size == 0:
            return
        lo, hi = int(positions[0]), min(n, int(positions[-1]) + 1)
    for w0 in range(lo, hi, window):
        rows = await ctx.arrays.read_rows(record, keys, start=w0, stop=min(hi, w0 + window),
                                          arrays=arrays)
        if positions is not None:
            rows = rows.take(np.flatnonzero(np.isin(rows.positions, positions)))
        for p0 in range(0, len(rows), per_page):
            yield rows.take(slice(p0, p0 + per_page))


async def replay(ctx: CatalogContext, run_uid: str, *, pages: bool = True,
                 page_events: int = PAGE_EVENTS,
                 page_bytes: int = PAGE_BYTES) -> AsyncIterator[Item]:
    """Every stored document of a run, in a valid order (see the module docstring)."""
    docs = await _fetch(ctx, run_uid, with_datums=True)
    em = _Emitter(ctx, pages=pages)
    em.known_datums.update(docs.datums)
    yield ("start", docs.start)
    for res in docs.resources:
        for item in em.resource(res):
            yield item
    for res in docs.stream_resources:
        for item in em.resource(res, "stream_resource"):
            yield item
    tie = itertools.count()
    heap: list[tuple[float, int, int, Any]] = [
        (float(d.get("time", 0.0)), 0, next(tie), d) for d in docs.descriptors]
    heapq.heapify(heap)
    iters: dict[str, AsyncIterator[Rows]] = {}
    try:
        while heap:
            _, prio, _, payload = heapq.heappop(heap)
            if prio == 0:
                desc: Doc = payload
                em.descriptors.add(desc["uid"])
                yield ("descriptor", desc)
                for item in em.stream_datum_items(docs.stream_datums, desc["uid"]):
                    yield item
                record = docs.records.get(desc["uid"])
                if record is None:
                    continue
                it = _pages(ctx, record, _zarr_keys(desc, record), page_events=page_events,
                            page_bytes=page_bytes)
                iters[desc["uid"]] = it
                await _push_next(heap, tie, desc, it)
            else:
                desc, rows = payload
                for item in await em.datums_for(rows, desc):
                    yield item
                for item in em.page_items(rows, desc):
                    yield item
                await _push_next(heap, tie, desc, iters[desc["uid"]])
    finally:
        for it in iters.values():
            await it.aclose()  # type: ignore[attr-defined]
    for datum_id, datum in docs.datums.items():
        if datum_id not in em.datums:
            em.datums.add(datum_id)
            yield ("datum", datum)
    if docs.stop is not None:
        yield ("stop", docs.stop)


async def _push_next(heap: list[tuple[float, int, int, Any]], tie: itertools.count[int],
                     desc: Doc, it: AsyncIterator[Rows]) -> None:
    try:
        rows = await it.__anext__()
    except StopAsyncIteration:
        return
    heapq.heappush(heap, (float(rows.time[0]), 1, next(tie), (desc, rows)))


async def follow(ctx: CatalogContext, run_uid: str, *, stream: str | None = None,
                 pages: bool = True, poll_interval: float | None = None,
                 page_events: int = PAGE_EVENTS,
                 page_bytes: int = PAGE_BYTES) -> AsyncIterator[Item]:
    """Documents of a run as they are stored (starting with what is there already),
    ending after the stop once every event was yielded. With ``stream``, only that
    stream's events (other documents still come, so the output stays valid)."""
    interval = ctx.poll_interval if poll_interval is None else poll_interval
    em = _Emitter(ctx, pages=pages)
    done: dict[str, int] = {}  # descriptor uid -> positions below are all yielded
    yielded: dict[str, set[int]] = {}  # positions >= done[...] already yielded
    started = False
    while True:
        docs = await _fetch(ctx, run_uid, with_datums=False)
        if not started:
            started = True
            yield ("start", docs.start)
        for res in docs.resources:
            for item in em.resource(res):
                yield item
        for res in docs.stream_resources:
            for item in em.resource(res, "stream_resource"):
                yield item
        sdatums: list[Doc] | None = None
        for desc in docs.descriptors:
            uid = desc["uid"]
            if uid not in em.descriptors:
                em.descriptors.add(uid)
                yield ("descriptor", desc)
            if any(str(dk.get("external") or "").startswith("STREAM:")
                   for dk in desc.get("data_keys", {}).values()):
                if sdatums is None:
                    sdatums = await _stream_datums(ctx, docs.stream_resources)
                for item in em.stream_datum_items(sdatums, uid):
                    yield item
            record = docs.records.get(uid)
            if record is None or (stream is not None and desc.get("name") != stream):
                continue
            low = done.setdefault(uid, 0)
            seen = yielded.setdefault(uid, set())
            written = await ctx.arrays.written_positions(record, start=low)
            new = np.array([p for p in written.tolist() if p not in seen], dtype=np.int64)
            if new.size == 0:
                continue
            async for rows in _pages(ctx, record, _zarr_keys(desc, record),
                                     page_events=page_events, page_bytes=page_bytes,
                                     positions=new):
                for item in await em.datums_for(rows, desc):
                    yield item
                for item in em.page_items(rows, desc):
                    yield item
                seen.update(rows.positions.tolist())
            while low in seen:  # advance the watermark, keep the set small
                seen.discard(low)
                low += 1
            done[uid] = low
        if docs.stop is not None:
            yield ("stop", docs.stop)
            return
        await anyio.sleep(interval)


async def _stream_datums(ctx: CatalogContext, resources: Sequence[Doc]) -> list[Doc]:
    out: list[Doc] = []
    for res in resources:
        out.extend(await ctx.call("read stream datums", ctx.store.find, "stream_datum",
                                  resource=res["uid"]))
    return out
