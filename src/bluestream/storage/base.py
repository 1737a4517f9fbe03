"""The metadata-store extension point: one abstract class, one conformance suite.

Every backend (MongoDB, SQLite) implements :class:`MetadataStore`; the shared
``tests/storage_conformance.py::MetadataStoreTests`` runs against each of them.

Documents handed to a store are already normalised to JSON-compatible Python values
(no numpy; see :func:`bluestream.schemas.normalise.to_jsonable`). Stores never see
event rows: those live in Zarr. They see per-descriptor stream summaries instead.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bluestream.queries import And, In, Query, ScanID

__all__ = [
    "DOC_KINDS",
    "IngestLogEntry",
    "MetadataStore",
    "PutOutcome",
    "StreamUpdate",
    "key_of",
]

Doc = dict[str, Any]

#: Document kinds kept by the metadata store, with the field that identifies each.
#: The collection (or table) names are those of suitcase-mongo's "normalized" layout.
DOC_KINDS: dict[str, tuple[str, str]] = {
    # kind: (collection, key field)
    "start": ("run_start", "uid"),
    "stop": ("run_stop", "run_start"),  # one stop per run; unique index on run_start
    "descriptor": ("event_descriptor", "uid"),
    "resource": ("resource", "uid"),
    "datum": ("datum", "datum_id"),
    "stream_resource": ("stream_resource", "uid"),
    "stream_datum": ("stream_datum", "uid"),
}


def key_of(kind: str, doc: Doc) -> str:
    """The identifying key of a document of ``kind`` (its uid, datum_id, run_start)."""
    return str(doc[DOC_KINDS[kind][1]])


class PutOutcome(enum.Enum):
    INSERTED = "inserted"  # new document stored
    SAME = "same"  # an identical document was already there: a replay, a no-op
    CONFLICT = "conflict"  # a different document with the same key is stored; not written


@dataclass(frozen=True)
class StreamUpdate:
    """What one write batch added to one descriptor's arrays.

    Applying the same update twice, or updates in any order, gives the same record
    (lengths and ranges are combined with max/min), which keeps replays idempotent.
    """

    descriptor_uid: str
    run_start: str
    stream_name: str
    zarr_path: str  # relative to the Zarr root (starts with the tenant)
    length: int  # logical length: the highest seq_num this write reached
    seq_num_min: int
    seq_num_max: int
    time_min: float
    time_max: float
    data_keys: tuple[str, ...] = ()
    schema_version: int = 1
    #: The stream's newest rows (:class:`bluestream.storage.tail.Tail`, encoded), which
    #: replace the stored ones: ``None`` leaves them as they are, ``b""`` removes them.
    #: Not combined like the fields above: the writer merged it with what was stored,
    #: under the descriptor's lock.
    tail: bytes | None = None
    tail_start: int | None = None


@dataclass(frozen=True)
class IngestLogEntry:
    """Provenance: which Kafka records carried documents of a run.

    Upserted on (run_start, topic, partition); offsets combine with min/max.
    For file ingestion ``topic`` is ``file:<name>`` and partition is 0.
    """

    run_start: str
    topic: str
    partition: int
    offset_min: int
    offset_max: int
    daemon_version: str
    host: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class MetadataStore(ABC):
    """Run metadata for one tenant (a Mongo database, or a tenant inside a SQLite file)."""

    uri: str  # where it lives, for messages (credentials masked)
    tenant: str

    # -- lifecycle --------------------------------------------------------------------
    #: A read-only store (the catalog's) creates nothing; opening one for a tenant
    #: that does not exist raises :class:`~bluestream.errors.NotFound`.
    readonly: bool = False

    @abstractmethod
    async def open(self) -> None:
        """Connect and create collections/tables and (unique) indexes. Idempotent.

        A read-only store only connects and checks that its tenant exists."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def tenants(self) -> list[str]:
        """Every tenant at this store's URI (opened by a writer at least once)."""

    @abstractmethod
    async def ping(self) -> None:
        """Raise :class:`~bluestream.errors.StorageUnavailable` if the store is unreachable."""

    # -- writes (all idempotent) --------------------------------------------------------
    @abstractmethod
    async def put_documents(self, kind: str, docs: Sequence[Doc]) -> list[PutOutcome]:
        """Store documents of one kind (a key of :data:`DOC_KINDS`) in one bulk operation.

        A document whose key is already stored with equal content is ``SAME``; with
        different content it is ``CONFLICT`` and the stored one is left untouched.
        Outcomes are in the order of ``docs``. Duplicate keys inside one call are
        resolved as if the documents were put one after the other.
        """

    @abstractmethod
    async def update_streams(self, updates: Sequence[StreamUpdate]) -> None:
        """Merge stream summaries into ``event_stream`` (one record per descriptor)."""

    @abstractmethod
    async def tails(self, descriptor_uids: Sequence[str]) -> dict[str, tuple[int, bytes]]:
        """The stored tails (start, encoded rows) of these descriptors, those that have
        one; one query."""

    @abstractmethod
    async def log_ingest(self, entries: Sequence[IngestLogEntry]) -> None:
        """Merge provenance records into ``ingest_log``."""

    # -- reads ----------------------------------------------------------------------------
    @abstractmethod
    async def get(self, kind: str, key: str) -> Doc | None:
        """One document by its key (for ``stop`` the key is the run's start uid)."""

    @abstractmethod
    async def find(self, kind: str, *, run_start: str | None = None,
                   keys: Sequence[str] | None = None,
                   resource: str | None = None) -> list[Doc]:
        """Documents of ``kind`` belonging to a run (``run_start``), or with the given
        keys, or (for datum / stream_datum) belonging to a resource / stream_resource.
        Returned in insertion-independent, deterministic order (by time, then key)."""

    @abstractmethod
    async def streams(self, run_start: str) -> list[Doc]:
        """The ``event_stream`` records of a run, as dicts with StreamUpdate's fields
        (``tail`` and ``tail_start`` are ``None`` when the stream keeps no tail)."""

    @abstractmethod
    async def ingest_log(self, run_start: str) -> list[Doc]: ...

    @abstractmethod
    async def search(self, query: Query | None, *, skip: int = 0,
                     limit: int | None = None) -> list[Doc]:
        """Start documents matching ``query``, newest first (time descending, uid)."""

    @abstractmethod
    async def count(self, query: Query | None) -> int: ...

    async def resolve(self, query: Query | None) -> Query | None:
        """``query`` with the parts that need a lookup first made plain: ScanID with
        ``duplicates`` "latest" or "error" becomes the uids it names (one query per scan
        id), judged among the runs the rest of an ``And`` selects. Every search, count
        and uid lookup resolves its query, so translators only see ``duplicates="all"``."""
        if isinstance(query, And):
            rest = [q for q in query.queries if not _unresolved(q)]
            within = And(*rest) if rest else None
            return And(*[await self._scan_uids(q, within) if _unresolved(q) else q
                         for q in query.queries])
        if isinstance(query, ScanID) and _unresolved(query):
            return await self._scan_uids(query, None)
        return query

    async def _scan_uids(self, query: Query, within: Query | None) -> Query:
        if not isinstance(query, ScanID):
            return query
        if not query.scan_ids:
            raise ValueError("ScanID needs at least one scan id")
        uids: list[str] = []
        for scan_id in dict.fromkeys(query.scan_ids):
            one = ScanID(scan_id, duplicates="all")
            limit = 1 if query.duplicates == "latest" else 2
            found = await self.search(one if within is None else And(within, one), limit=limit)
            if len(found) > 1:
                raise ValueError(f"scan_id {scan_id} names more than one run in tenant "
                                 f"{self.tenant!r} (ScanID(..., duplicates='error')); "
                                 "give a uid, or use duplicates='latest' or 'all'")
            uids += [str(d["uid"]) for d in found]
        return In("uid", uids)

    @abstractmethod
    async def uids_with_prefix(self, prefix: str, query: Query | None = None,
                               limit: int = 10) -> list[str]:
        """Start uids beginning with ``prefix`` (for partial-uid lookup)."""


def _unresolved(query: Query | None) -> bool:
    return isinstance(query, ScanID) and query.duplicates != "all"
