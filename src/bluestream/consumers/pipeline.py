"""Decode -> validate -> route -> write, one batch of messages at a time.

The batch is the unit of durability: when :meth:`Ingestor.process` returns, every
message of the batch is stored (Zarr, then metadata), dead-lettered (and the dead letter
acknowledged), or parked. The source commits offsets only after that, and never past a
parked message (DESIGN I1, I3, I4). The same code serves Kafka and file ingestion.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
import msgpack
import numpy as np

from bluestream._version import __version__
from bluestream.consumers.decode import decode_document
from bluestream.consumers.envelope import DeadLetterSink, Envelope, Routed
from bluestream.consumers.parking import ParkingLot
from bluestream.consumers.run_index import DescriptorInfo, RunIndex
from bluestream.counters import Counters
from bluestream.documents import PARENT_FIELD
from bluestream.errors import (
    ConflictError,
    DocumentError,
    Reason,
    RoutingError,
    StorageError,
    ValidationError,
)
from bluestream.layout import Page, descriptor_path, field_specs, safe_component, stored_columns
from bluestream.limits import Limits
from bluestream.log import get_logger
from bluestream.schemas.normalise import (
    datum_page_to_datums,
    page_from_event_page,
    page_from_events,
    page_from_typed_events,
    to_jsonable,
)
from bluestream.schemas.typed import decode_typed
from bluestream.schemas.validate import validate
from bluestream.storage.base import (
    IngestLogEntry,
    IngestSession,
    MetadataStore,
    PutOutcome,
    StreamUpdate,
    key_of,
)
from bluestream.storage.rules import same_content
from bluestream.storage.tail import Tail
from bluestream.storage.tail import block_for as tail_block
from bluestream.storage.tail import merge as merge_tail
from bluestream.storage.zarr_store import ZarrEventStore, stream_update

__all__ = ["Batch", "Ingestor", "concat_pages"]

log = get_logger("bluestream.pipeline")

#: Order in which metadata kinds are written at the end of a batch (parents first,
#: stop last so a reader that sees the stop sees the whole run).
WRITE_ORDER = ("start", "descriptor", "resource", "stream_resource", "datum", "stream_datum")
#: Kinds whose uid may be replayed: checked against what is stored when routed.
CHECKED_KINDS = ("start", "descriptor", "resource", "stream_resource")

#: Runs reported as open (``status``); the oldest are forgotten beyond this.
_MAX_OPEN_RUNS = 1_000

StoreFor = Callable[[str], Awaitable[MetadataStore]]


@dataclass
class Batch:
    """One batch, routed: what :meth:`Ingestor.flush` writes."""

    metadata: dict[str, dict[str, list[tuple[Routed, dict[str, Any]]]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    stops: dict[str, list[tuple[Routed, dict[str, Any]]]] = field(
        default_factory=lambda: defaultdict(list))
    events: dict[tuple[str, str], list[Routed]] = field(default_factory=dict)
    provenance: dict[tuple[str, str, str, int], list[int]] = field(default_factory=dict)
    #: Descriptors resolved while routing this batch: (tenant, uid) -> info.
    descriptors: dict[tuple[str, str], DescriptorInfo] = field(default_factory=dict)

    def event_count(self) -> int:
        """Events routed for writing (a page counts its rows): the decoded size."""
        return sum(len(r.doc["seq_num"]) if r.name == "event_page" else 1
                   for routed in self.events.values() for r in routed)

    def note(self, tenant: str, run_start: str, env: Envelope) -> None:
        if not run_start:
            return
        key = (tenant, run_start, env.topic, env.partition)
        span = self.provenance.get(key)
        offset = env.offset
        if span is None:
            self.provenance[key] = [offset, offset]
        elif offset > span[1]:
            span[1] = offset
        elif offset < span[0]:
            span[0] = offset


class Ingestor:
    """Processes batches of envelopes into storage. One per daemon (or file import)."""

    def __init__(self, *, store_for: StoreFor, arrays: ZarrEventStore, dlq: DeadLetterSink,
                 limits: Limits, park_max_count: int = 10_000, park_max_age_s: float = 60.0,
                 park_max_bytes: int = 256 * 1024 * 1024,
                 counters: Counters | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._store_for = store_for
        self.arrays = arrays
        self.dlq = dlq
        self.limits = limits
        self.counters = counters or Counters()
        self.parked = ParkingLot(park_max_count, park_max_age_s, clock,
                                 max_bytes=park_max_bytes)
        self.index = RunIndex(self._load, limits, many=self._load_many)
        self._clock = clock
        self._host = socket.gethostname()
        #: This process, named in the provenance (``ingest_log``) of every run it writes.
        self.session = IngestSession(uuid.uuid4().hex, self._host, os.getpid(), time.time(),
                                     __version__)
        self.open_runs: dict[tuple[str, str], float] = {}  # (tenant, uid) -> last seen

    # -- public -----------------------------------------------------------------------
    async def process(self, envelopes: Iterable[Envelope]) -> None:
        """Store, dead-letter or park every envelope; return when that is durable."""
        await self.flush(await self.prepare(envelopes))

    async def prepare(self, envelopes: Iterable[Envelope]) -> Batch:
        """Decode, check and route a batch: what :meth:`flush` then writes. Bad documents
        are dead-lettered and orphans parked here already. A source may prepare the next
        batch while the previous one is being flushed (never two flushes at once)."""
        batch = Batch()
        self.index.begin_batch()
        tally: Counter[str] = Counter()
        nbytes: Counter[str] = Counter()
        try:
            decoded: list[Routed] = []
            for env in envelopes:
                env.received = env.received or self._clock()
                nbytes[env.topic] += len(env.value or b"")
                routed = self._decode(env)
                if isinstance(routed, DocumentError):
                    await self._dead(env, routed)
                    continue
                tally[routed.name] += 1
                decoded.append(routed)
            await self._prefetch(decoded)
            for routed in decoded:
                if routed.name == "event" and self._route_known_event(routed, batch):
                    continue
                await self._route(routed, batch)
            await self._evict_parked(batch)
        except BaseException:
            # Nothing of this batch may be taken as stored: forget what routing learnt,
            # so a retry of the same messages writes them again.
            self.reset()
            raise
        finally:
            for topic, n in nbytes.items():
                self.counters.inc("bytes", topic, n)
            for name, n in tally.items():
                self.counters.inc("documents", name, n)
        return batch

    async def flush(self, batch: Batch) -> None:
        """Write a prepared batch: arrays (synced), then metadata, then the dead letters'
        acknowledgements. When this returns, the batch is durable."""
        try:
            await self._flush(batch)
        except BaseException:
            self.reset()
            raise

    def reset(self) -> None:
        """Forget cached routing state and parked documents (after a failed batch the
        source rewinds to its committed offsets and everything is read again)."""
        self.index = RunIndex(self._load, self.limits, many=self._load_many)
        self.parked.drop(lambda r: False)
        self.counters.set("parked", "", 0.0)

    async def expire_parked(self) -> None:
        """Dead-letter parked documents that waited too long (called when idle too)."""
        await self.process(())

    async def _evict_parked(self, batch: Batch) -> None:
        """Parked documents past the age, count or byte limits: routed after all if their
        parent was stored meanwhile (by another daemon, say), else dead-lettered."""
        for item in self.parked.evict():
            tenant, kind, key = item.extra["waiting_for"]
            if await self._parent(tenant, kind, key, fresh=True) is not None:
                await self._route(item, batch)
            else:
                await self._dead(item.env, self._orphan_error(item))
        self.counters.set("parked", "", float(len(self.parked)))

    def held_offsets(self) -> dict[tuple[str, int], int]:
        return self.parked.held_offsets()

    def drop_partitions(self, partitions: set[tuple[str, int]]) -> None:
        """Forget parked documents of revoked partitions; their new owner re-reads them."""
        n = self.parked.drop(lambda r: (r.env.topic, r.env.partition) not in partitions)
        if n:
            log.info("dropped parked documents of revoked partitions", count=n)
        self.counters.set("parked", "", float(len(self.parked)))

    # -- decode and validate ------------------------------------------------------------
    def _decode(self, env: Envelope) -> Routed | DocumentError:
        """The document of a message, schema-checked, or the error its dead letter gets."""
        value, max_bytes = env.value, self.limits.max_message_bytes
        # Events and pages the typed decoder proves valid skip the general path.
        typed = decode_typed(value) if value is not None and len(value) <= max_bytes \
            else None
        if typed is not None:
            return Routed(typed[0], typed[1], env, typed=True)
        try:
            name, doc, numpy = decode_document(value, max_bytes=max_bytes)
            validate(name, doc, plain=not numpy)
        except _ABOUT_THE_MESSAGE as exc:
            return _as_document_error(exc, env)
        return Routed(name, doc, env)

    def _route_known_event(self, item: Routed, batch: Batch) -> bool:
        """Route an event whose descriptor this batch already resolved (nearly every
        event): what :meth:`_route_one` does for it, without the lookups. False when
        the descriptor is not known yet (the general way then resolves or parks it)."""
        key = (item.env.tenant, item.doc["descriptor"])
        info = batch.descriptors.get(key)
        if info is None:
            return False
        item.descriptor = info
        events = batch.events.get(key)
        if events is None:
            batch.events[key] = [item]
        else:
            events.append(item)
        batch.note(key[0], info.run_start, item.env)
        return True

    async def _dead(self, env: Envelope, error: DocumentError) -> None:
        self.counters.inc("dead_lettered", error.reason)
        log.warning("dead-lettered", reason=error.reason, error=str(error)[:500],
                    source=env.where(), tenant=env.tenant)
        await self.dlq.send(env, error)

    def _orphan_error(self, item: Routed) -> RoutingError:
        _, kind, key = item.extra["waiting_for"]
        waited = self._clock() - item.extra["parked_at"]
        return RoutingError(
            f"{item.name} refers to {kind} {key!r}, which did not arrive within "
            f"{waited:.0f} s (or the parking lot overflowed)",
            reason=Reason.unknown(kind))

    # -- routing ------------------------------------------------------------------------
    async def _route(self, item: Routed, batch: Batch) -> None:
        try:
            await self._route_one(item, batch)
        except _ABOUT_THE_MESSAGE as exc:  # outages (store, Kafka) propagate: retried
            await self._dead(item.env, _as_document_error(exc, item.env))

    async def _route_one(self, item: Routed, batch: Batch) -> None:
        tenant, name, doc = item.env.tenant, item.name, item.doc
        if name == "datum_page":
            datums = datum_page_to_datums(doc, self.limits)  # checked before it waits
            resource = doc.get("resource")
            if isinstance(resource, str) and await self._parent(tenant, "resource",
                                                                resource) is None:
                self._park(tenant, "resource", resource, item)  # the page waits whole
                return
            for datum in datums:
                await self._route(Routed("datum", datum, item.env, dict(item.extra)), batch)
            return
        run_start = ""
        if name in PARENT_FIELD:
            kind, fld = PARENT_FIELD[name]
            parent_key = doc.get(fld)
            if parent_key is None and name == "resource":
                pass  # old-style resource without run_start: nothing to wait for
            elif not isinstance(parent_key, str):
                raise ValidationError(f"{name} has no {fld}", reason=Reason.SCHEMA_VIOLATION)
            elif kind == "descriptor":
                item.descriptor = await self.index.descriptor(tenant, parent_key)
                if item.descriptor is None:
                    self._park(tenant, kind, parent_key, item)
                    return
                batch.descriptors[(tenant, parent_key)] = item.descriptor
                run_start = item.descriptor.run_start
            else:
                parent = await self._parent(tenant, kind, parent_key)
                if parent is None:
                    self._park(tenant, kind, parent_key, item)
                    return
                run_start = parent_key if kind == "start" else parent
        if name == "start":
            run_start = safe_component(str(doc["uid"]), "run start uid")
        if name in ("event", "event_page"):
            batch.events.setdefault((tenant, str(doc["descriptor"])), []).append(item)
        elif name == "stop":
            batch.stops[tenant].append((item, to_jsonable(doc)))
            self.open_runs.pop((tenant, run_start), None)
        else:
            clean = to_jsonable(doc)
            key = key_of(name, clean)
            specs = None
            if name == "descriptor":
                # Refuse bad data keys and uids that cannot name its Zarr group before
                # the descriptor is remembered as accepted (its events would all fail).
                specs = field_specs(clean, self.limits)
                descriptor_path(tenant, run_start, key)
            if name in CHECKED_KINDS and not await self._accept(tenant, name, key, clean):
                batch.note(tenant, run_start, item.env)
                await self._release(tenant, name, key, batch)
                return  # an identical replay: already stored
            if specs is not None:  # accepted: its events need not compute them again
                self.index.remember_descriptor(tenant, key,
                                               DescriptorInfo(clean, run_start, specs))
            batch.metadata[tenant][name].append((item, clean))
            if name == "start":
                self.open_runs[(tenant, key)] = self._clock()
                if len(self.open_runs) > _MAX_OPEN_RUNS:  # runs whose stop never came
                    del self.open_runs[min(self.open_runs, key=self.open_runs.__getitem__)]
            await self._release(tenant, name, key, batch)
        batch.note(tenant, run_start, item.env)

    def _park(self, tenant: str, kind: str, key: str, item: Routed) -> None:
        self.parked.park((tenant, kind, key), item)
        self.counters.inc("parked_total", item.name)

    async def _parent(self, tenant: str, kind: str, key: str, *,
                      fresh: bool = False) -> str | None:
        """The parent's run uid ("" if unknown but present), or None if absent."""
        if kind == "descriptor":
            info = await self.index.descriptor(tenant, key, fresh=fresh)
            return None if info is None else info.run_start
        doc = await self.index.lookup(tenant, kind, key, fresh=fresh)
        if doc is None:
            return None
        if kind == "start":
            return key
        return str(doc.get("run_start") or "")

    async def _accept(self, tenant: str, kind: str, key: str, doc: dict[str, Any]) -> bool:
        """True for a new document; False for an identical replay; raise on conflict."""
        known = await self.index.lookup(tenant, kind, key)
        if known is None:
            self.index.remember(tenant, kind, key, doc)
            return True
        if same_content(known, doc):
            return False
        raise ConflictError(
            f"{kind} {key!r} was already stored with different content "
            f"(differing fields: {', '.join(_diff_keys(known, doc)) or '?'})",
            reason=Reason.conflicting(kind))

    async def _release(self, tenant: str, kind: str, key: str, batch: Batch) -> None:
        for child in self.parked.release((tenant, kind, key)):
            await self._route(child, batch)

    async def _load(self, tenant: str, kind: str, key: str) -> dict[str, Any] | None:
        store = await self._store_for(tenant)
        return await store.get(kind, key)

    async def _load_many(self, tenant: str, kind: str,
                         keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        store = await self._store_for(tenant)
        return {key_of(kind, doc): doc for doc in await store.find(kind, keys=keys)}

    async def _prefetch(self, items: list[Routed]) -> None:
        """What routing the batch will ask the store about (new starts, descriptors and
        resources, and their parents), loaded one query per tenant and kind, not one
        per document: a batch of 500 one-event runs made 1,000 lookups."""
        wanted: dict[tuple[str, str], list[str]] = defaultdict(list)
        for item in items:
            tenant, name, doc = item.env.tenant, item.name, item.doc
            if name in ("event", "event_page"):
                continue  # their descriptor is known (or one lookup per descriptor)
            if name in CHECKED_KINDS and isinstance(doc.get("uid"), str):
                wanted[(tenant, name)].append(doc["uid"])
            if name in PARENT_FIELD:
                kind, fld = PARENT_FIELD[name]
                parent = doc.get(fld)
                if isinstance(parent, str) and kind in CHECKED_KINDS:
                    wanted[(tenant, kind)].append(parent)
        for (tenant, kind), keys in wanted.items():
            await self.index.prefetch(tenant, kind, keys)

    # -- writing ------------------------------------------------------------------------
    async def _flush(self, batch: Batch) -> None:
        # The descriptors' locks are held from reading their tails to storing the new
        # ones: a read-modify-write across the arrays and the metadata store.
        paths = {descriptor_path(tenant, items[0].descriptor.run_start, desc_uid)
                 for (tenant, desc_uid), items in batch.events.items()
                 if items[0].descriptor is not None}
        async with self.arrays.locked(paths):
            await self._flush_locked(batch)

    async def _flush_locked(self, batch: Batch) -> None:
        updates: dict[str, list[StreamUpdate]] = defaultdict(list)
        tails = await self._stored_tails(batch)

        async def write(tenant: str, desc_uid: str, items: list[Routed]) -> None:
            updates[tenant].extend(await self._write_events(
                tenant, desc_uid, items, tails.get((tenant, desc_uid))))

        async with anyio.create_task_group() as tg:
            for (tenant, desc_uid), items in batch.events.items():
                tg.start_soon(write, tenant, desc_uid, items)
        # Arrays durable (fsync) before the metadata that points at them, and so before
        # the source commits the batch's offsets (DESIGN I1).
        await self.arrays.sync()
        tenants = set(batch.metadata) | set(updates) | set(batch.stops) | \
            {t for t, *_ in batch.provenance}
        for tenant in sorted(tenants):
            store = await self._store_for(tenant)
            for kind in WRITE_ORDER:
                await self._put(store, kind, batch.metadata[tenant].get(kind, []))
            if updates.get(tenant):
                await store.update_streams(updates[tenant])
            entries = [IngestLogEntry(run, topic, part, lo, hi, __version__, self._host,
                                      session=self.session)
                       for (t, run, topic, part), (lo, hi) in batch.provenance.items()
                       if t == tenant]
            if entries:
                await store.log_ingest(entries)
            await self._put(store, "stop", batch.stops.get(tenant, []))
            for item, _ in batch.stops.get(tenant, []):
                self.index.forget_run(tenant, str(item.doc["run_start"]))
                self.arrays.forget(tenant, str(item.doc["run_start"]))
        await self.dlq.flush()

    async def _put(self, store: MetadataStore, kind: str,
                   items: list[tuple[Routed, dict[str, Any]]]) -> None:
        if not items:
            return
        outcomes = await store.put_documents(kind, [doc for _, doc in items])
        for (item, doc), outcome in zip(items, outcomes, strict=True):
            if outcome is PutOutcome.CONFLICT:
                if kind in CHECKED_KINDS:
                    self.index.remember(item.env.tenant, kind, key_of(kind, doc),
                                        await store.get(kind, key_of(kind, doc)) or doc)
                await self._dead(item.env, ConflictError(
                    f"{kind} {key_of(kind, doc)!r} was already stored with different "
                    "content", reason=Reason.conflicting(kind)))

    async def _stored_tails(self, batch: Batch) -> dict[tuple[str, str], Tail]:
        """The stored tails of the batch's descriptors (one query per tenant)."""
        by_tenant: dict[str, list[str]] = defaultdict(list)
        for tenant, desc_uid in batch.events:
            by_tenant[tenant].append(desc_uid)
        out: dict[tuple[str, str], Tail] = {}
        for tenant, uids in by_tenant.items():
            store = await self._store_for(tenant)
            for uid, (start, blob) in (await store.tails(uids)).items():
                try:
                    out[(tenant, uid)] = Tail.decode(blob)
                except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
                    raise StorageError(f"the stored tail of descriptor {uid!r} (tenant "
                                       f"{tenant!r}, from row {start}) cannot be read: "
                                       f"{exc}") from exc
        return out

    async def _write_events(self, tenant: str, desc_uid: str, items: list[Routed],
                            stored: Tail | None) -> list[StreamUpdate]:
        info = items[0].descriptor  # resolved when the events were routed
        if info is None:  # cannot happen: routing attaches it; keep the promise anyway
            for item in items:
                await self._dead(item.env, RoutingError(f"descriptor {desc_uid!r} unknown"))
            return []
        pages: list[tuple[Page, list[Routed]]] = []
        for group in _runs_of_kind(items):
            pages.extend(await self._pages(info, group))
        if not pages:
            return []
        try:
            whole = concat_pages([p for p, _ in pages])
            update, _ = await self._store_page(tenant, info, whole, stored)
            updates, written = [update], len(whole)
        except ValidationError:  # e.g. a dtype that differs from the stored array
            updates, written = await self._write_one_by_one(tenant, info, pages, stored)
        self.counters.inc("events", tenant, written)
        return updates

    async def _write_one_by_one(self, tenant: str, info: DescriptorInfo,
                                pages: list[tuple[Page, list[Routed]]], stored: Tail | None
                                ) -> tuple[list[StreamUpdate], int]:
        """Pages that the array refused together, written apart: only the events of a
        refused page are dead-lettered. The updates, and how many events were written."""
        updates = []
        written = 0
        for page, its in pages:
            try:
                update, stored = await self._store_page(tenant, info, page, stored)
                updates.append(update)
                written += len(page)
            except ValidationError as exc:
                for item in its:
                    await self._dead(item.env, exc)
        return updates, written

    async def _store_page(self, tenant: str, info: DescriptorInfo, page: Page,
                          stored: Tail | None) -> tuple[StreamUpdate, Tail | None]:
        """Rows below the stream's tail to the arrays, the rest into its new tail
        (:mod:`bluestream.storage.tail`); the update carries the tail to store."""
        columns = stored_columns(info.specs, page)
        block = tail_block(info.specs, self.arrays.tail_rows)
        args = (tenant, info.run_start, info.doc, info.specs)
        if block == 0:
            old = stored.page(page.descriptor) if stored is not None else None
            update = await self.arrays.write_page(
                *args, page if old is None else concat_pages([old, page]), lock=False)
            # A tail kept before (tails turned off since) moved to the arrays with the page.
            return (update if stored is None else replace(update, tail=b"")), None
        to_arrays, new = merge_tail(stored, page, columns, block)
        if to_arrays is not None:
            await self.arrays.write_page(*args, to_arrays, lock=False)
        update = replace(stream_update(*args, page), tail=new.encode(), tail_start=new.start)
        return update, new

    async def _pages(self, info: DescriptorInfo,
                     items: list[Routed]) -> list[tuple[Page, list[Routed]]]:
        """Events batch into one page; a bad event is isolated and dead-lettered alone.
        Each page comes with the items it holds."""
        if items[0].name == "event_page":
            out = []
            for item in items:
                try:
                    out.append((page_from_event_page(item.doc, info.specs, self.limits),
                                [item]))
                except _ABOUT_THE_MESSAGE as exc:
                    await self._dead(item.env, _as_document_error(exc, item.env))
            return out
        try:
            page = page_from_typed_events([i.doc for i in items], info.specs, self.limits) \
                if all(i.typed for i in items) else None
            if page is None:
                page = page_from_events([i.doc for i in items], info.specs, self.limits)
            return [(page, items)]
        except _ABOUT_THE_MESSAGE:
            pass  # which event is bad is found out below
        good: list[tuple[Page, list[Routed]]] = []
        for item in items:
            try:
                good.append((page_from_events([item.doc], info.specs, self.limits), [item]))
            except _ABOUT_THE_MESSAGE as exc:
                await self._dead(item.env, _as_document_error(exc, item.env))
        if len(good) < 2:
            return good
        try:  # events valid alone may still not fit one column together (int64 range)
            together = [i for _, its in good for i in its]
            return [(page_from_events([i.doc for i in together], info.specs, self.limits),
                     together)]
        except _ABOUT_THE_MESSAGE:
            return good


#: What handling one message can raise because of that message: our DocumentError, and the
#: errors of code bugs on odd input (no outage of a store or of Kafka is among these).
_ABOUT_THE_MESSAGE = (DocumentError, ValueError, TypeError, LookupError, ArithmeticError,
                      AttributeError, RecursionError)


def _as_document_error(exc: Exception, env: Envelope) -> DocumentError:
    """What pure code raised about one message, as the error its dead letter carries.
    Anything but a DocumentError is a bug of ours: logged with its traceback, and the
    message dead-lettered rather than crashing the service on every restart."""
    if isinstance(exc, DocumentError):
        return exc
    log.error("unexpected error on a message; dead-lettered", source=env.where(),
              error=repr(exc)[:500], exc_info=exc)
    return ValidationError(f"could not be processed: {type(exc).__name__}: {exc}"[:1000],
                           reason=Reason.INVALID)


def _runs_of_kind(items: list[Routed]) -> list[list[Routed]]:
    """Split into consecutive groups of the same kind (events vs event pages)."""
    groups: list[list[Routed]] = []
    for item in items:
        if groups and groups[-1][0].name == item.name:
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


def concat_pages(pages: list[Page]) -> Page:
    """One page from several of the same descriptor, in order (later rows win later)."""
    if len(pages) == 1:
        return pages[0]
    first = pages[0]
    return Page(
        descriptor=first.descriptor,
        uid=np.concatenate([p.uid for p in pages]),
        seq_num=np.concatenate([p.seq_num for p in pages]),
        time=np.concatenate([p.time for p in pages]),
        data={k: _concat([p.data[k] for p in pages]) for k in first.data},
        timestamps={k: np.concatenate([p.timestamps[k] for p in pages])
                    for k in first.timestamps},
        filled={k: np.concatenate([p.filled[k] for p in pages]) for k in first.filled},
    )


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    dtypes = {a.dtype for a in arrays}
    if len(dtypes) > 1:
        return np.concatenate([a.astype(np.result_type(*arrays)) for a in arrays])
    return np.concatenate(arrays)


def _diff_keys(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(a) | set(b)
                  if k not in a or k not in b or not same_content(a[k], b[k]))
