"""``bluestream ingest-mongo``: import runs from a suitcase-mongo "normalized" database.

The source keeps one document per event (collections ``run_start``,
``event_descriptor``, ``event``, ``run_stop``, ``resource``, ``datum``). Each run is
replayed in a valid order through the daemon's :class:`Ingestor` — start, descriptors,
resources and their datums, events batched per descriptor into event_pages (the unit
bluestream writes), stop — so the result is what the daemon would have stored had the
run come through Kafka.

Runs are read CHUNK_RUNS at a time, with a few ``$in`` queries per chunk rather than
several per run. Runs whose stops count few events are held in memory together, their
events and datums read in one query each (about EVENTS_IN_MEMORY events per unit of
work; the reader runs one unit ahead of the writer); a longer run, an open one, or one
whose stop gives no counts is streamed page by page, its datums too.

Resumable: a run whose stop is stored and whose descriptors all reached the source's
highest seq_num is skipped. The Ingestor writes a run's stop after everything before
it, and every chunk is durable before the next is read, so an interrupted import is
resumed by running it again: finished runs are skipped, the runs in progress are
re-imported, idempotently.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import event_model
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from pymongo import ASCENDING, AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from bluestream.catalog._tasks import task_group
from bluestream.consumers.decode import encode_message
from bluestream.consumers.envelope import Envelope
from bluestream.errors import ConfigError, StorageUnavailable
from bluestream.settings import Settings
from bluestream.storage.base import MetadataStore
from bluestream.storage.rules import check_tenant, mask_uri
from bluestream.tools.ingest import Batcher, open_ingestor
from bluestream.tools.progress import Progress
from bluestream.tools.rejects import Rejection, ReportingSink, drain_parked

__all__ = ["MongoImportReport", "ingest_mongo", "source_database"]

Doc = dict[str, Any]
Item = tuple[str, Doc, str]  # name, document, where it came from
_NO_ID = {"_id": False}
PAGE_EVENTS = 1000
PAGE_BYTES = 8 * 1024 * 1024
#: Runs read from the source together (a few queries per chunk, not per run).
CHUNK_RUNS = 500
#: Events held in memory at once; a run with more is streamed page by page.
EVENTS_IN_MEMORY = 50_000
#: Values per ``$in`` list.
IN_VALUES = 1000


@dataclass
class MongoImportReport:
    runs: int = 0  # runs in the source
    imported: int = 0
    skipped: int = 0  # already complete in bluestream
    #: Start documents stored more than once in the source (no unique index there):
    #: each run is imported once, its copies are counted here.
    duplicates: int = 0
    documents: int = 0
    events: int = 0
    seconds: float = 0.0
    rejections: list[Rejection] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # e.g. lookups without an index

    @property
    def ok(self) -> bool:
        return not self.rejections

    def summary(self) -> str:
        copies = (f", {self.duplicates} duplicate start document(s) (each run imported "
                  "once)") if self.duplicates else ""
        return (f"{self.runs} run(s) in the source: {self.imported} imported, "
                f"{self.skipped} already complete (skipped){copies}; "
                f"{self.documents} documents "
                f"({self.events} events), {len(self.rejections)} rejected, "
                f"in {self.seconds:.1f} s")


def source_database(uri: str, database: str | None) -> str:
    """``--database`` if given, else the database named in the URI's path."""
    if database:
        return database
    rest = uri.split("://", 1)[-1].split("?", 1)[0]
    _, _, db = rest.partition("/")
    if not db:
        raise ConfigError(f"{mask_uri(uri)} names no database: give --database")
    return db


class _Source:
    """Reads the suitcase-mongo collections a chunk of runs at a time: a handful of
    queries per chunk (``$in`` over its uids), not per run; one-event runs were
    bounded by ~7 round trips each (88 runs/s on the test server)."""

    def __init__(self, mds: AsyncDatabase[Doc], assets: AsyncDatabase[Doc]) -> None:
        self.mds = mds
        self.assets = assets

    async def chunk(self, starts: list[Doc]) -> _Chunk:
        chunk = _Chunk(starts)
        for part in _parts([str(s["uid"]) for s in starts]):
            async for desc in self.mds.event_descriptor.find({"run_start": {"$in": part}},
                                                             _NO_ID):
                descs = chunk.descriptors.setdefault(str(desc["run_start"]), [])
                if all(d["uid"] != desc["uid"] for d in descs):  # a stored duplicate: once
                    descs.append(desc)
            async for stop in self.mds.run_stop.find({"run_start": {"$in": part}}, _NO_ID):
                chunk.stops[str(stop["run_start"])] = stop
        for descs in chunk.descriptors.values():
            descs.sort(key=lambda d: (d.get("time", 0), d["uid"]))
        return chunk

    async def last_seq_nums(self, descriptors: list[str]) -> dict[str, int]:
        """The highest seq_num of each descriptor's events (for judging completeness)."""
        out: dict[str, int] = {}
        for part in _parts(descriptors):
            rows = await self.mds.event.aggregate([
                {"$match": {"descriptor": {"$in": part}}},
                {"$group": {"_id": "$descriptor", "seq_num": {"$max": "$seq_num"}}}])
            async for row in rows:
                out[str(row["_id"])] = int(row["seq_num"] or 0)
        return out

    async def assets_of(self, runs: list[str]) -> _Assets:
        """Resources of ``runs`` and their datums (runs held in memory together)."""
        assets = _Assets()
        resources: list[Doc] = []
        for part in _parts(runs):
            resources += await self.assets.resource.find(
                {"run_start": {"$in": part}}, _NO_ID).to_list(None)
        for res in resources:
            assets.resources.setdefault(str(res["run_start"]), []).append(res)
        for part in _parts([str(r["uid"]) for r in resources]):
            async for datum in self.assets.datum.find({"resource": {"$in": part}}, _NO_ID):
                assets.datums.setdefault(str(datum["resource"]), []).append(datum)
        return assets

    async def stream_assets(self, run: str) -> AsyncIterator[Item]:
        """The resources of one long run and their datums, streamed."""
        async for res in self.assets.resource.find({"run_start": run}, _NO_ID):
            yield _resource(res)
            async for datum in self.assets.datum.find({"resource": res["uid"]}, _NO_ID):
                yield _datum(datum)

    async def events(self, descriptors: list[str]) -> dict[str, list[Doc]] | None:
        """Every event of ``descriptors``, per descriptor in time order; None (and no
        more read) past 2 x EVENTS_IN_MEMORY, should the stops' counts have been wrong."""
        out: dict[str, list[Doc]] = {d: [] for d in descriptors}
        held = 0
        for part in _parts(descriptors):
            cursor = self.mds.event.find({"descriptor": {"$in": part}}, _NO_ID)
            try:
                async for ev in cursor:
                    out[str(ev["descriptor"])].append(ev)
                    held += 1
                    if held > 2 * EVENTS_IN_MEMORY:
                        return None
            finally:
                await cursor.close()
        for events in out.values():
            events.sort(key=_event_order)
        return out

    async def stream_events(self, descriptor: str) -> AsyncIterator[Doc]:
        """The events of one long stream, streamed in time order."""
        cursor = self.mds.event.find({"descriptor": descriptor}, _NO_ID)
        async for ev in cursor.sort("time", ASCENDING):
            yield ev


@dataclass
class _Chunk:
    """What the source holds for a chunk of runs, keyed by run / descriptor / resource."""

    starts: list[Doc]
    descriptors: dict[str, list[Doc]] = field(default_factory=dict)
    stops: dict[str, Doc] = field(default_factory=dict)

    def n_events(self, run: str) -> int | None:
        """The run's events as its stop counts them; None without a stop or counts (an
        open run, an old stop): such a run is streamed rather than held in memory."""
        stop = self.stops.get(run)
        counts = None if stop is None else stop.get("num_events")
        if not isinstance(counts, dict) or not all(
                isinstance(n, int) and n >= 0 for n in counts.values()):
            return None
        return sum(counts.values())

    def head(self, start: Doc) -> Iterator[Item]:
        """A run's start and descriptors."""
        uid = str(start["uid"])
        yield "start", start, f"run_start {uid}"
        for desc in self.descriptors.get(uid, ()):
            yield "descriptor", desc, f"event_descriptor {desc['uid']}"


def _resource(res: Doc) -> Item:
    return "resource", res, f"resource {res['uid']}"


def _datum(datum: Doc) -> Item:
    return "datum", datum, f"datum {datum['datum_id']}"


@dataclass
class _Assets:
    """Resources per run and datums per resource, of runs held in memory together."""

    resources: dict[str, list[Doc]] = field(default_factory=dict)
    datums: dict[str, list[Doc]] = field(default_factory=dict)

    async def of(self, run: str) -> AsyncIterator[Item]:
        for res in self.resources.pop(run, ()):
            yield _resource(res)
            for datum in self.datums.pop(str(res["uid"]), ()):
                yield _datum(datum)


@dataclass
class _Work:
    """A unit handed from the reading to the writing side: runs of a chunk with their
    events (None: streamed from the source while written), or the end of a chunk."""

    chunk: _Chunk
    starts: list[Doc]
    events: dict[str, list[Doc]] | None
    assets: _Assets | None = None  # None: streamed from the source while written
    ends_chunk: int = 0  # the chunk's run count, on its last unit
    imported: int = 0  # of which not already complete
    copies: int = 0  # start documents of the chunk that repeat a run already read

    def held(self, descriptor: str) -> AsyncIterator[Doc]:
        """The events held for ``descriptor``, handed over once."""
        assert self.events is not None
        return _each(self.events.pop(descriptor, []))


#: The lookups every chunk makes, by (database, collection, field): an index whose
#: first key is the field serves them (suitcase-mongo's ``create_indexes()`` makes one
#: for each but resource.run_start, which it leaves unindexed; resources are few).
LOOKUPS = (("mds", "event_descriptor", "run_start"), ("mds", "run_stop", "run_start"),
           ("mds", "event", "descriptor"), ("assets", "datum", "resource"))


async def missing_indexes(source: _Source) -> list[str]:
    """``collection.field`` of every lookup no index of the source serves: without one,
    each chunk reads the whole collection and the import slows as the source grows."""
    missing = []
    for db_name, collection, key in LOOKUPS:
        db = source.mds if db_name == "mds" else source.assets
        info = await db[collection].index_information()
        if not any(spec.get("key") and spec["key"][0][0] == key for spec in info.values()):
            missing.append(f"{collection}.{key}")
    return missing


def _parts(items: list[str]) -> Iterator[list[str]]:
    for i in range(0, len(items), IN_VALUES):
        yield items[i:i + IN_VALUES]


def _event_order(ev: Doc) -> tuple[float, int]:
    return float(ev.get("time") or 0.0), int(ev.get("seq_num") or 0)


def _keys(ev: Doc) -> tuple[frozenset[str], ...]:
    return tuple(frozenset(ev.get(k) or ()) for k in ("data", "timestamps", "filled"))


def _page(events: list[Doc]) -> Item:
    first, last = events[0], events[-1]
    if len(events) == 1:  # as it was published: cheaper than a page of one
        return "event", first, f"event {first['uid']}"
    where = (f"events {first['uid']}..{last['uid']} (seq_num {first['seq_num']}.."
             f"{last['seq_num']})")
    page: Any = event_model.pack_event_page(*events)  # type: ignore[arg-type]
    return "event_page", dict(page), where


async def _each(docs: Iterable[Doc]) -> AsyncIterator[Doc]:
    for doc in docs:
        yield doc


async def _paged(events: AsyncIterator[Doc]) -> AsyncIterator[Item]:
    """Events of one descriptor as event_pages of one key set, bounded in count and
    bytes."""
    page: list[Doc] = []
    size = 0
    async for ev in events:
        ev.setdefault("filled", {})
        n = len(encode_message("event", ev))
        if page and (len(page) >= PAGE_EVENTS or size + n > PAGE_BYTES
                     or _keys(ev) != _keys(page[0])):
            yield _page(page)
            page, size = [], 0
        page.append(ev)
        size += n
    if page:
        yield _page(page)


async def _complete(source: _Source, chunk: _Chunk, store: MetadataStore) -> set[str]:
    """The runs of ``chunk`` whose stop is stored and every stream reached the source's
    last row (two store queries for the chunk; the source's last rows are looked up only
    for runs whose stop is stored, i.e. when resuming)."""
    uids = [str(s["uid"]) for s in chunk.starts]
    # not stored, or open in the source (re-read: it may have grown): not complete
    stopped = {str(r["run_start"]) for r in await store.links("stop", uids)} & set(chunk.stops)
    if not stopped:
        return set()
    stored = {str(r["descriptor_uid"]): int(r["seq_num_max"])
              for r in await store.links("event_stream", sorted(stopped))}
    last = await source.last_seq_nums(
        [str(d["uid"]) for uid in stopped for d in chunk.descriptors.get(uid, ())])
    return {uid for uid in stopped
            if all(stored.get(str(d["uid"]), 0) >= last.get(str(d["uid"]), 0)
                   for d in chunk.descriptors.get(uid, ()))}


class _Import:
    """One import: runs of the source, a chunk at a time, into the Ingestor."""

    def __init__(self, source: _Source, store: MetadataStore, batcher: Batcher,
                 report: MongoImportReport, topic: str, tenant: str,
                 progress: Progress | None, sink: ReportingSink) -> None:
        self.source, self.store, self.batcher = source, store, batcher
        self.report, self.topic, self.tenant = report, topic, tenant
        self.progress, self.sink = progress, sink
        self.offset = 0
        #: Run uids read so far: a start stored twice is one run, whichever chunks the
        #: copies fall into (one uid per run in memory).
        self.seen: set[str] = set()

    async def add(self, item: Item) -> None:
        name, doc, where = item
        await self.batcher.add(Envelope(self.topic, 0, self.offset, encode_message(name, doc),
                                        headers=[("where", where.encode())],
                                        tenant=self.tenant))
        self.offset += 1
        self.report.documents += 1

    async def read(self, starts: AsyncIterator[Doc],
                   out: MemoryObjectSendStream[_Work]) -> None:
        """The reading side: chunks of runs from the source, judged complete or not,
        cut into units of work whose events fit in memory. It runs ahead of the writing
        side by one unit, so the source's queries overlap the writes."""
        async with out:
            chunk: list[Doc] = []
            async for start in starts:
                chunk.append(start)
                if len(chunk) >= CHUNK_RUNS:
                    await self.read_chunk(chunk, out)
                    chunk = []
            if chunk:
                await self.read_chunk(chunk, out)

    async def read_chunk(self, starts: list[Doc], out: MemoryObjectSendStream[_Work]) -> None:
        read = len(starts)
        fresh: list[Doc] = []
        for s in starts:  # a start stored twice (no unique index in the source): once
            uid = str(s["uid"])
            if uid not in self.seen:
                self.seen.add(uid)
                fresh.append(s)
        starts = fresh
        if not starts:  # only copies of runs already read: nothing to ask the source
            await out.send(_Work(_Chunk([]), [], None, copies=read))
            return
        chunk = await self.source.chunk(starts)
        done = await _complete(self.source, chunk, self.store)
        todo = [s for s in starts if str(s["uid"]) not in done]
        group: list[Doc] = []
        held = 0
        for start in todo:
            n = chunk.n_events(str(start["uid"]))
            if group and (n is None or held + n > EVENTS_IN_MEMORY):
                await self.send_group(chunk, group, out)
                group, held = [], 0
            if n is None or n > EVENTS_IN_MEMORY:  # events streamed, page by page
                await out.send(_Work(chunk, [start], None))
                continue
            group.append(start)
            held += n
        if group:
            await self.send_group(chunk, group, out)
        await out.send(_Work(chunk, [], None, ends_chunk=len(starts), imported=len(todo),
                             copies=read - len(starts)))

    async def send_group(self, chunk: _Chunk, starts: list[Doc],
                         out: MemoryObjectSendStream[_Work]) -> None:
        """Runs whose events fit in memory together: one query for all their events
        (streamed run by run instead, should there be far more than their stops said)."""
        events = await self.source.events(
            [str(d["uid"]) for s in starts for d in chunk.descriptors.get(str(s["uid"]), ())])
        if events is None:
            for start in starts:
                await out.send(_Work(chunk, [start], None))
        else:
            assets = await self.source.assets_of([str(s["uid"]) for s in starts])
            await out.send(_Work(chunk, starts, events, assets))

    async def write(self, work: MemoryObjectReceiveStream[_Work]) -> None:
        """The writing side: every unit into the Ingestor, in order."""
        async with work:
            async for unit in work:
                for start in unit.starts:
                    await self.run(unit, start)
                if unit.ends_chunk or unit.copies:
                    await self.end_chunk(unit)

    async def end_chunk(self, unit: _Work) -> None:
        # Every run of the chunk durable before the next one is written: the resume point.
        await self.batcher.flush()
        self.report.imported += unit.imported
        self.report.skipped += unit.ends_chunk - unit.imported
        self.report.duplicates += unit.copies
        if self.progress is not None:
            self.progress.update(unit.ends_chunk + unit.copies, docs=self.report.documents,
                                 skipped=self.report.skipped,
                                 rejected=len(self.sink.rejections))

    async def run(self, unit: _Work, start: Doc) -> None:
        """One run's documents, parents before children: what ``unit`` holds, or
        streamed from the source. Its offsets count from 0, as they did when each run
        was imported alone, so that a resumed run's provenance spans the same range."""
        uid = str(start["uid"])
        self.offset = 0
        for item in unit.chunk.head(start):
            await self.add(item)
        assets = self.source.stream_assets(uid) if unit.assets is None else unit.assets.of(uid)
        async for item in assets:
            await self.add(item)
        events = self.source.stream_events if unit.events is None else unit.held
        for desc in unit.chunk.descriptors.get(uid, ()):
            async for item in _paged(events(str(desc["uid"]))):
                await self.add(item)
        if (stop := unit.chunk.stops.get(uid)) is not None:
            await self.add(("stop", stop, f"run_stop {stop.get('uid')}"))


async def ingest_mongo(uri: str, *, database: str | None = None,
                       assets_database: str | None = None, tenant: str,
                       settings: Settings, progress: Progress | None = None,
                       on_reject: Callable[[Rejection], None] | None = None,
                       on_warning: Callable[[str], None] | None = None) -> MongoImportReport:
    """Import every run of the source database into ``tenant``; see the module doc."""
    check_tenant(tenant)
    t0 = time.monotonic()
    db_name = source_database(uri, database)
    report = MongoImportReport()
    sink = ReportingSink(on_reject=on_reject,
                         locate=lambda env: f"{db_name}: {dict(env.headers)['where'].decode()}")
    client: AsyncMongoClient[Doc] = AsyncMongoClient(
        uri, serverSelectionTimeoutMS=settings.storage.mongo_server_selection_timeout_ms)
    source = _Source(client[db_name], client[assets_database or db_name])
    topic = f"mongo:{db_name}"
    try:
        async with open_ingestor(settings, sink) as (ingestor, registry):
            store = await registry(tenant)
            report.runs = await source.mds.run_start.count_documents({})
            for name in await missing_indexes(source):
                collection, key = name.split(".")
                report.warnings.append(
                    f"the source has no index on {name}: every chunk of runs reads the "
                    f"whole {collection} collection, which gets slower as the source grows; "
                    f"create one in the source (db.{collection}.createIndex({{{key}: 1}}), "
                    "or suitcase-mongo's Serializer.create_indexes())")
                if on_warning is not None:
                    on_warning(report.warnings[-1])
            if progress is not None:
                progress.total = report.runs
            batcher = Batcher(ingestor, max_bytes=settings.limits.batch_max_bytes)
            run = _Import(source, store, batcher, report, topic, tenant, progress, sink)
            starts = source.mds.run_start.find({}, _NO_ID).sort("time", ASCENDING)
            send, receive = anyio.create_memory_object_stream[_Work](1)
            async with task_group() as tg:
                tg.start_soon(run.read, starts, send)
                tg.start_soon(run.write, receive)
            await drain_parked(ingestor)
            report.events = int(ingestor.counters.total("events"))
    except PyMongoError as exc:
        raise StorageUnavailable(f"source database {db_name!r} at {mask_uri(uri)}: "
                                 f"{type(exc).__name__}: {exc}") from None
    finally:
        await client.close()
    report.rejections = sink.rejections
    report.seconds = time.monotonic() - t0
    if progress is not None:
        progress.close()
    return report
