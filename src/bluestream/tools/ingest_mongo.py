"""``bluestream ingest-mongo``: import runs from a suitcase-mongo "normalized" database.

The source keeps one document per event (collections ``run_start``,
``event_descriptor``, ``event``, ``run_stop``, ``resource``, ``datum``). Each run is
replayed in a valid order through the daemon's :class:`Ingestor` — start, descriptors,
resources and their datums, events batched per descriptor into event_pages (the unit
bluestream writes), stop — so the result is what the daemon would have stored had the
run come through Kafka.

Resumable: a run whose stop is stored and whose descriptors all reached the source's
highest seq_num is skipped. The Ingestor writes a run's stop after everything before
it, so an interrupted import is resumed by running it again: finished runs are skipped,
the run in progress is re-imported, idempotently.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import event_model
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

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


@dataclass
class MongoImportReport:
    runs: int = 0  # runs in the source
    imported: int = 0
    skipped: int = 0  # already complete in bluestream
    documents: int = 0
    events: int = 0
    seconds: float = 0.0
    rejections: list[Rejection] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.rejections

    def summary(self) -> str:
        return (f"{self.runs} run(s) in the source: {self.imported} imported, "
                f"{self.skipped} already complete (skipped); {self.documents} documents "
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
    """Reads one run at a time from the suitcase-mongo collections."""

    def __init__(self, mds: AsyncDatabase[Doc], assets: AsyncDatabase[Doc]) -> None:
        self.mds = mds
        self.assets = assets

    async def descriptors(self, run: str) -> list[Doc]:
        cursor = self.mds.event_descriptor.find({"run_start": run}, _NO_ID)
        return sorted(await cursor.to_list(None), key=lambda d: (d.get("time", 0), d["uid"]))

    async def max_seq_num(self, descriptor: str) -> int:
        cursor = self.mds.event.find({"descriptor": descriptor}, {"seq_num": True, "_id": False})
        docs = await cursor.sort("seq_num", DESCENDING).limit(1).to_list(1)
        return int(docs[0]["seq_num"]) if docs else 0

    async def documents(self, start: Doc) -> AsyncIterator[Item]:
        """Every document of the run, parents before children."""
        uid = str(start["uid"])
        yield "start", start, f"run_start {uid}"
        for desc in await self.descriptors(uid):
            yield "descriptor", desc, f"event_descriptor {desc['uid']}"
        async for res in self.assets.resource.find({"run_start": uid}, _NO_ID):
            yield "resource", res, f"resource {res['uid']}"
            async for datum in self.assets.datum.find({"resource": res["uid"]}, _NO_ID):
                yield "datum", datum, f"datum {datum['datum_id']}"
        for desc in await self.descriptors(uid):
            async for item in self._pages(desc):
                yield item
        stop = await self.mds.run_stop.find_one({"run_start": uid}, _NO_ID)
        if stop is not None:
            yield "stop", stop, f"run_stop {stop.get('uid')}"

    async def _pages(self, desc: Doc) -> AsyncIterator[Item]:
        """Events as event_pages of one key set, bounded in count and bytes."""
        page: list[Doc] = []
        size = 0
        cursor = self.mds.event.find({"descriptor": desc["uid"]}, _NO_ID)
        async for ev in cursor.sort("time", ASCENDING):
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


def _keys(ev: Doc) -> tuple[frozenset[str], ...]:
    return tuple(frozenset(ev.get(k) or ()) for k in ("data", "timestamps", "filled"))


def _page(events: list[Doc]) -> Item:
    first, last = events[0], events[-1]
    where = (f"event {first['uid']}" if len(events) == 1 else
             f"events {first['uid']}..{last['uid']} (seq_num {first['seq_num']}.."
             f"{last['seq_num']})")
    page: Any = event_model.pack_event_page(*events)  # type: ignore[arg-type]
    return "event_page", dict(page), where


async def _complete(source: _Source, store: MetadataStore, start: Doc) -> bool:
    """True if the run's stop is stored and every stream reached the source's last row."""
    uid = str(start["uid"])
    if await store.get("stop", uid) is None:
        return False
    if await source.mds.run_stop.find_one({"run_start": uid}) is None:
        return False  # open in the source: re-read it, it may have grown
    stored = {str(r["descriptor_uid"]): int(r["seq_num_max"]) for r in await store.streams(uid)}
    for desc in await source.descriptors(uid):
        want = await source.max_seq_num(str(desc["uid"]))
        if want and stored.get(str(desc["uid"]), 0) < want:
            return False
    return True


async def ingest_mongo(uri: str, *, database: str | None = None,
                       assets_database: str | None = None, tenant: str,
                       settings: Settings, progress: Progress | None = None,
                       on_reject: Callable[[Rejection], None] | None = None) -> MongoImportReport:
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
            if progress is not None:
                progress.total = report.runs
            batcher = Batcher(ingestor, max_bytes=settings.limits.batch_max_bytes)
            starts = source.mds.run_start.find({}, _NO_ID).sort("time", ASCENDING)
            async for start in starts:
                if await _complete(source, store, start):
                    report.skipped += 1
                else:
                    report.imported += 1
                    offset = 0
                    async for name, doc, where in source.documents(start):
                        await batcher.add(Envelope(topic, 0, offset, encode_message(name, doc),
                                                   headers=[("where", where.encode())],
                                                   tenant=tenant))
                        offset += 1
                        report.documents += 1
                    await batcher.flush()  # each run durable before the next (resume point)
                if progress is not None:
                    progress.update(1, docs=report.documents, skipped=report.skipped,
                                    rejected=len(sink.rejections))
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
