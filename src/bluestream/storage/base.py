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

from bluestream.queries import And, AnnotationQuery, In, NotIn, OnStop, Query, ScanID
from bluestream.storage.query_rules import annotation_matches, check_annotation_key

__all__ = [
    "DOC_KINDS",
    "IngestLogEntry",
    "IngestSession",
    "MetadataStore",
    "PutOutcome",
    "StreamUpdate",
    "key_of",
    "merge_sessions",
    "session_record",
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
class IngestSession:
    """One process that wrote runs (a daemon start, one ``bluestream ingest``): kept
    per run in ``ingest_log`` with the offsets it wrote, so that a run written by a
    daemon that was killed and restarted names both."""

    id: str  # a uuid4 hex, new per process
    host: str
    pid: int
    started: float  # epoch seconds
    daemon_version: str


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
    #: The writing process; its offsets are merged per session under ``sessions``.
    session: IngestSession | None = None


def session_record(e: IngestLogEntry) -> dict[str, Any]:
    """What ``ingest_log`` keeps of ``e``'s session (offsets merge with min/max)."""
    s = e.session
    if s is None:
        return {}
    return {"host": s.host, "pid": s.pid, "started": s.started,
            "daemon_version": s.daemon_version, "offset_min": e.offset_min,
            "offset_max": e.offset_max}


def merge_sessions(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Session records combined as the stores combine offsets (min/max)."""
    out = {k: dict(v) for k, v in old.items()}
    for sid, rec in new.items():
        had = out.get(sid)
        if had is None:
            out[sid] = dict(rec)
            continue
        had.update({k: v for k, v in rec.items() if k not in ("offset_min", "offset_max")})
        had["offset_min"] = min(had.get("offset_min", rec["offset_min"]), rec["offset_min"])
        had["offset_max"] = max(had.get("offset_max", rec["offset_max"]), rec["offset_max"])
    return out


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

    # -- annotations and removal ------------------------------------------------------------
    @abstractmethod
    async def add_annotation(self, run_start: str, key: str, value: Any, *, time: float,
                             author: str | None = None, note: str | None = None) -> int:
        """Store a new version of annotation ``key`` of a run (``value`` None clears
        it) and return its version number (1, 2, ...). Earlier versions are kept as
        they are; concurrent writers get distinct versions."""

    @abstractmethod
    async def annotations(self, run_start: str, key: str | None = None) -> list[Doc]:
        """Every stored version (``key``, ``version``, ``value``, ``time``, ``author``,
        ``note``) of a run's annotations (of one key), by key then version."""

    @abstractmethod
    async def annotation_values(self, key: str) -> dict[str, Any]:
        """Current (newest, not cleared) value of annotation ``key``, per run."""

    @abstractmethod
    async def mark_removed(self, uids: Sequence[str], info: Doc) -> None:
        """Phase one of a removal: from now on searches, counts and uid lookups do
        not see these runs; ``info`` (who, when, why) is kept with the mark."""

    @abstractmethod
    async def removal_marks(self) -> list[Doc]:
        """The runs marked removed whose removal has not finished (``uid`` + info)."""

    @abstractmethod
    async def delete_run(self, uid: str) -> dict[str, int]:
        """The last phase of a removal: delete every metadata record of a run (its
        documents, stream records, tails, provenance and annotations), then its mark.
        Idempotent: a rerun after a crash finishes the job. Returns counts by kind."""

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

    async def search_uids(self, query: Query | None, *, skip: int = 0,
                          limit: int | None = None) -> list[str]:
        """The uids of :meth:`search`'s results, same order; stores override it to
        answer from an index without reading the documents."""
        return [str(d["uid"]) for d in await self.search(query, skip=skip, limit=limit)]

    @abstractmethod
    async def count(self, query: Query | None) -> int: ...

    async def resolve(self, query: Query | None) -> Query | None:
        """``query`` with the parts that need a lookup first made plain: ScanID with
        ``duplicates`` "latest" or "error" becomes the uids it names (one query per scan
        id), judged among the runs the rest of an ``And`` selects. Every search, count
        and uid lookup resolves its query, so translators only see ``duplicates="all"``.
        Annotation queries become the uids (``In`` / ``NotIn``) whose current
        annotation values match (one read of that key's current values); :class:`OnStop`
        the uids of the runs whose stop matches (one query of the stops)."""
        if isinstance(query, AnnotationQuery | OnStop):
            return await self._side_uids(query)
        if isinstance(query, And) and any(isinstance(q, AnnotationQuery | OnStop)
                                          for q in query.queries):
            query = And(*[await self._side_uids(q) if isinstance(q, AnnotationQuery | OnStop)
                          else q for q in query.queries])
        if isinstance(query, And):
            rest = [q for q in query.queries if not _unresolved(q)]
            within = And(*rest) if rest else None
            return And(*[await self._scan_uids(q, within) if _unresolved(q) else q
                         for q in query.queries])
        if isinstance(query, ScanID) and _unresolved(query):
            return await self._scan_uids(query, None)
        return query

    async def _side_uids(self, query: AnnotationQuery | OnStop) -> Query:
        if isinstance(query, OnStop):
            return In("uid", await self.stopped_runs(query.query))
        return await self._annotation_uids(query)

    @abstractmethod
    async def stopped_runs(self, query: Query) -> list[str]:
        """The runs (start uids) whose stop document matches ``query`` (see
        :class:`~bluestream.queries.OnStop`; ``time`` is the stop's time)."""

    async def _annotation_uids(self, query: AnnotationQuery) -> Query:
        values = await self.annotation_values(check_annotation_key(query.key))
        if query.operator == "ne":
            return NotIn("uid", sorted(u for u, v in values.items()
                                       if annotation_matches(query, v)))
        return In("uid", sorted(u for u, v in values.items() if annotation_matches(query, v)))

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

    # -- integrity and completeness (catalog/integrity.py) ----------------------------------
    @abstractmethod
    async def links(self, kind: str, run_starts: Sequence[str] | None = None) -> list[Doc]:
        """How the documents of ``kind`` of the whole tenant (or of the runs
        ``run_starts``) point at each other, in one query: per-run lookups cannot find a
        stop or descriptor whose start is gone, and completeness of many runs must not
        cost a query per run.

        ``kind`` is a key of :data:`DOC_KINDS`: one ``{"key", "uid", "run_start"}`` per
        document (its key field, its ``uid`` or None, the run it names or None; a start
        names itself). ``"event_stream"``: the records as :meth:`streams` gives them,
        without the tail rows (``tail`` None; ``tail_start`` kept). Ordered by
        (run_start, key)."""


def _unresolved(query: Query | None) -> bool:
    return isinstance(query, ScanID) and query.duplicates != "all"
