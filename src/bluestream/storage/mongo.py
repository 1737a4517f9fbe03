"""Run metadata in MongoDB, in suitcase-mongo's "normalized" layout (one database per tenant).

Documents are stored as they are (plus MongoDB's ``_id``, never returned), in the
collections and with the indexes suitcase-mongo uses, so existing databroker readers
keep working. Two collections are ours: ``event_stream`` (one summary per descriptor,
events themselves live in Zarr) and ``ingest_log`` (Kafka provenance per run).

Full-text search is feature-detected at :meth:`MongoMetadataStore.open`: a probe
``$text`` query on a scratch collection tells a server that knows ``$text`` (it
complains about the missing text index) from one that does not (mongo-java-server,
used for local development, accepts a text index but rejects ``$text`` queries — and a
text index there even breaks ``dropDatabase``, so it is never created). Without
``$text`` the store keeps a side collection ``run_search`` ``{uid, text}`` with the
lower-cased string values of each start document, filled when start documents are put
(and back-filled at open), and answers FullText with one ``$regex`` per word there.
Start documents themselves are never given extra fields.

Only standard CRUD, ``bulk_write`` and index commands are used: no transactions, no
aggregation, no collations. Every pymongo error is translated at this edge into
:class:`~bluestream.errors.StorageUnavailable` (outages, timeouts: retry later) or
:class:`~bluestream.errors.StorageError`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import anyio
from bson.binary import Binary
from bson.errors import BSONError
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, IndexModel, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import (
    BulkWriteError,
    ConfigurationError,
    ConnectionFailure,
    ExecutionTimeout,
    OperationFailure,
    PyMongoError,
    WTimeoutError,
)

from bluestream.errors import ConfigError, NotFound, StorageError, StorageUnavailable
from bluestream.log import get_logger
from bluestream.queries import And, FullText, Query, check_stop_query
from bluestream.storage.base import (
    DOC_KINDS,
    IngestLogEntry,
    MetadataStore,
    PutOutcome,
    StreamUpdate,
    key_of,
    session_record,
)
from bluestream.storage.mongo_query import to_mongo
from bluestream.storage.query_rules import escape_regex, full_text_words
from bluestream.storage.rules import (
    DEFAULT_SERVER_SELECTION_TIMEOUT_MS,
    SESSIONS,
    canonical_json,
    check_extra,
    check_tenant,
    classify_puts,
    mask_uri,
    search_text,
)

__all__ = ["DEFAULT_OPERATION_TIMEOUT_MS", "INDEXES", "MongoMetadataStore"]

Doc = dict[str, Any]
Collection = AsyncCollection[Doc]

log = get_logger("bluestream.storage.mongo")

#: How long one network read may wait for the server (a big bulk write included).
DEFAULT_OPERATION_TIMEOUT_MS = 60_000
_DUPLICATE_KEY = 11000
_INDEX_CONFLICT_CODES = (85, 86)  # IndexOptionsConflict, IndexKeySpecsConflict
_UNAUTHORIZED = 13
_INDEX_NOT_FOUND = 27
_UNIQUE = {"unique": True}
_NEWEST_FIRST = [("time", DESCENDING), ("uid", ASCENDING)]
_RESOURCE_FIELD = {"datum": "resource", "stream_datum": "stream_resource"}
_TEXT_INDEX = IndexModel([("$**", "text")], name="$**_text", default_language="none",
                         language_override="_bluestream_language")


def _ix(keys: str | list[tuple[str, int]], **options: Any) -> IndexModel:
    return IndexModel(keys, **options)


#: suitcase-mongo's indexes (same keys, hence the same names), plus ours. The text index
#: on run_start is feature-detected separately.
INDEXES: dict[str, list[IndexModel]] = {
    "run_start": [
        _ix("uid", **_UNIQUE), _ix("scan_id"),
        _ix([("scan_id", DESCENDING), ("_id", DESCENDING)], **_UNIQUE),
        _ix([("time", ASCENDING), ("_id", DESCENDING)], **_UNIQUE),
        _ix([("time", DESCENDING), ("_id", DESCENDING)], **_UNIQUE),
        _ix([("time", DESCENDING), ("scan_id", DESCENDING)]),
        _ix("data_session"), _ix("data_groups"),
    ],
    "run_stop": [_ix("run_start", **_UNIQUE), _ix("uid", **_UNIQUE),
                 _ix([("time", DESCENDING)])],
    "event_descriptor": [_ix("uid", **_UNIQUE),
                         _ix([("run_start", DESCENDING), ("time", DESCENDING)]),
                         _ix([("time", DESCENDING)])],
    "resource": [_ix("uid", **_UNIQUE), _ix("resource_id"), _ix("run_start")],
    "datum": [_ix("datum_id", **_UNIQUE), _ix("resource")],
    "stream_resource": [_ix("uid", **_UNIQUE), _ix("run_start")],
    "stream_datum": [_ix("uid", **_UNIQUE), _ix("stream_resource")],
    "event_stream": [_ix("descriptor_uid", **_UNIQUE), _ix("run_start")],
    "ingest_log": [_ix([("run_start", ASCENDING), ("topic", ASCENDING),
                        ("partition", ASCENDING)], **_UNIQUE)],
    "run_annotation": [_ix([("run_start", ASCENDING), ("key", ASCENDING),
                            ("version", ASCENDING)], **_UNIQUE),
                       _ix([("key", ASCENDING), ("run_start", ASCENDING)])],
    "run_removed": [_ix("uid", **_UNIQUE)],
}
_RUN_SEARCH_INDEXES = [_ix("uid", **_UNIQUE)]


#: Databases whose collections are listed at once when looking for tenants.
_LISTING_CONCURRENCY = 32
#: Tenants named in the error for an unknown one (a server may hold thousands), and the
#: time spent finding them.
_NAMED_IN_ERRORS = 20
_LISTING_SECONDS = 1.0


def _kind(kind: str) -> tuple[str, str]:
    try:
        return DOC_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown document kind {kind!r}: one of {sorted(DOC_KINDS)}") from None


def _why(exc: BaseException) -> str:
    text = str(exc).split(", Timeout:", 1)[0]  # drop the topology dump
    return text if len(text) <= 300 else text[:297] + "..."


class MongoMetadataStore(MetadataStore):
    """Run metadata for one tenant in a MongoDB database named after the tenant.

    Pass ``client`` to share one :class:`~pymongo.AsyncMongoClient` (connection pool)
    between tenants; the store then leaves closing it to the caller. Otherwise it makes
    its own with a short server-selection timeout (an outage surfaces quickly as
    StorageUnavailable) and a socket timeout (a server that stops answering cannot hang
    a writer forever). Not ``timeoutMS``: with it pymongo stretches server selection
    to the whole operation budget, and an outage would take that long to report.
    """

    def __init__(self, uri: str, tenant: str, *,
                 client: AsyncMongoClient[Doc] | None = None,
                 server_selection_timeout_ms: int = DEFAULT_SERVER_SELECTION_TIMEOUT_MS,
                 operation_timeout_ms: int = DEFAULT_OPERATION_TIMEOUT_MS,
                 readonly: bool = False) -> None:
        self.uri = mask_uri(uri)
        self.tenant = check_tenant(tenant)
        self.readonly = readonly
        #: FullText without $text: whether run_search covers every start document.
        self._run_search_complete = True
        self._raw_uri = uri
        self._client = client
        self._owns_client = client is None
        self._timeout_ms = server_selection_timeout_ms
        self._operation_timeout_ms = operation_timeout_ms
        self._db: AsyncDatabase[Doc] | None = None
        self._native_text = False

    # -- error translation --------------------------------------------------------------

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Translate driver errors into ours, saying which server, database and action."""
        try:
            yield
        except ConnectionFailure as exc:  # also AutoReconnect, NetworkTimeout, selection
            raise StorageUnavailable(f"MongoDB at {self.uri} is unreachable: {_why(exc)}") from exc
        except (ExecutionTimeout, WTimeoutError) as exc:
            raise StorageUnavailable(
                f"MongoDB at {self.uri} timed out while trying to {action}: {_why(exc)}"
            ) from exc
        except PyMongoError as exc:
            if exc.timeout:
                raise StorageUnavailable(
                    f"MongoDB at {self.uri} timed out while trying to {action}: {_why(exc)}"
                ) from exc
            raise StorageError(
                f"MongoDB at {self.uri} (database {self.tenant!r}) could not {action}: "
                f"{_why(exc)}"
            ) from exc
        except (BSONError, OverflowError) as exc:
            raise StorageError(f"cannot {action} in MongoDB: a value cannot be stored "
                               f"as BSON: {exc}") from exc

    @property
    def db(self) -> AsyncDatabase[Doc]:
        if self._db is None:
            raise StorageError(f"metadata store {self.uri} ({self.tenant}) is not open")
        return self._db

    def _col(self, name: str) -> Collection:
        return self.db[name]

    # -- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        if self._db is not None:
            return
        if self._client is None:
            self._client = self._make_client()
        db = self._client[self.tenant]
        if self.readonly:
            await self._open_readonly(db)
        else:
            with self._errors("create indexes"):
                writable = await self._ensure_indexes(db, INDEXES)
                self._native_text = await self._detect_text_search(db, writable)
                if not self._native_text:
                    await self._ensure_indexes(db, {"run_search": _RUN_SEARCH_INDEXES})
                    await self._backfill_run_search(db)
        log.debug("mongo store opened", uri=self.uri, tenant=self.tenant,
                  readonly=self.readonly,
                  full_text="$text" if self._native_text else "run_search")
        self._db = db

    async def _open_readonly(self, db: AsyncDatabase[Doc]) -> None:
        """Check the tenant exists and how FullText can be answered, writing nothing.
        One query for its own database; every database is listed only to say which
        tenants exist when it does not."""
        with self._errors("open"):
            exists = "run_start" in await db.list_collection_names()
        if not exists:
            # The names are a courtesy: bounded in count and in time (listing the
            # databases of a server that holds thousands takes seconds).
            tenants = await self._tenants(limit=_NAMED_IN_ERRORS + 1,
                                          seconds=_LISTING_SECONDS)
            named = ", ".join(tenants[:_NAMED_IN_ERRORS]) or "(none found)"
            named += ", ..." if len(tenants) > _NAMED_IN_ERRORS else ""
            raise NotFound(f"tenant {self.tenant!r} does not exist at MongoDB {self.uri}; "
                           f"tenants there: {named}")
        with self._errors("open"):
            self._native_text = await self._has_text_index(db["run_start"])
            if not self._native_text:
                self._run_search_complete = (await db["run_search"].count_documents({})
                                             >= await db["run_start"].count_documents({}))

    async def tenants(self) -> list[str]:
        return await self._tenants()

    async def _tenants(self, limit: int | None = None,
                       seconds: float | None = None) -> list[str]:
        """Databases holding a ``run_start`` collection, in name order (the first
        ``limit``; those found within ``seconds``, checked between steps: an operation
        of the driver is never cancelled, which would leave its socket open): one
        listing of the databases, then their collections looked at
        :data:`_LISTING_CONCURRENCY` at a time (a server may hold many databases)."""
        deadline = None if seconds is None else time.monotonic() + seconds
        if self._client is None:
            self._client = self._make_client()
        client = self._client
        with self._errors("list tenants"):
            names = [n for n in sorted(await client.list_database_names())
                     if n not in ("admin", "local", "config")]
            out: list[str] = []
            for i in range(0, len(names), _LISTING_CONCURRENCY):
                part = names[i:i + _LISTING_CONCURRENCY]
                found: dict[str, bool] = {}
                failed: list[PyMongoError] = []

                async def look(name: str, found: dict[str, bool] = found,
                               failed: list[PyMongoError] = failed) -> None:
                    try:
                        collections = await client[name].list_collection_names()
                    except PyMongoError as exc:  # raised below, as itself (not a group)
                        failed.append(exc)
                    else:
                        found[name] = "run_start" in collections

                async with anyio.create_task_group() as tg:
                    for name in part:
                        tg.start_soon(look, name)
                if failed:
                    raise failed[0]
                out += [n for n in part if found[n]]
                if limit is not None and len(out) >= limit:
                    return out[:limit]
                if deadline is not None and time.monotonic() > deadline:
                    return out
        return out

    def _make_client(self) -> AsyncMongoClient[Doc]:
        try:
            return AsyncMongoClient(self._raw_uri, document_class=dict, tz_aware=False,
                                    serverSelectionTimeoutMS=self._timeout_ms,
                                    connectTimeoutMS=self._timeout_ms,
                                    socketTimeoutMS=self._operation_timeout_ms)
        except (ConfigurationError, ValueError, TypeError) as exc:
            raise ConfigError(f"invalid MongoDB URI {self.uri!r}: {exc}") from exc

    async def close(self) -> None:
        self._db = None
        client, self._client = self._client, (None if self._owns_client else self._client)
        if client is not None and self._owns_client:
            with self._errors("close the connection"):
                await client.close()

    async def ping(self) -> None:
        if self._client is None:
            raise StorageUnavailable(f"MongoDB at {self.uri} is unreachable: store not open")
        with self._errors("ping"):
            await self._client.admin.command("ping")

    async def _ensure_indexes(self, db: AsyncDatabase[Doc],
                              indexes: Mapping[str, list[IndexModel]]) -> bool:
        """Create indexes; False if the user may not (a read-only reader)."""
        for name, models in indexes.items():
            try:
                await db[name].create_indexes(models)
            except OperationFailure as exc:
                if exc.code == _UNAUTHORIZED:
                    log.warning("mongo_indexes_not_created", tenant=self.tenant,
                                reason="not authorized: read-only user?")
                    return False
                if exc.code not in _INDEX_CONFLICT_CODES:
                    raise
                await self._ensure_indexes_one_by_one(db[name], models)
        return True

    async def _ensure_indexes_one_by_one(self, col: Collection, models: list[IndexModel]) -> None:
        """An index that exists with other options (suitcase's non-unique resource.uid,
        by default) is kept as it is: put_documents checks keys before inserting anyway."""
        for model in models:
            try:
                await col.create_indexes([model])
            except OperationFailure as exc:
                if exc.code not in _INDEX_CONFLICT_CODES:
                    raise
                log.warning("mongo_index_kept", tenant=self.tenant, collection=col.name,
                            index=model.document["name"], reason=_why(exc))

    async def _detect_text_search(self, db: AsyncDatabase[Doc], writable: bool) -> bool:
        """Use ``$text`` only if the server really answers it (see the module docstring)."""
        run_start = db["run_start"]
        has_index = await self._has_text_index(run_start)
        if not writable:
            return has_index
        if not await self._server_knows_text(db):
            return False
        if not has_index:
            try:
                await run_start.create_indexes([_TEXT_INDEX])
            except OperationFailure as exc:
                if exc.code not in _INDEX_CONFLICT_CODES:
                    raise
        return True

    @staticmethod
    async def _has_text_index(col: Collection) -> bool:
        async for index in await col.list_indexes():
            if "text" in dict(index["key"]).values():
                return True
        return False

    @staticmethod
    async def _server_knows_text(db: AsyncDatabase[Doc]) -> bool:
        """Probe ``$text`` on a throw-away collection that has no text index: a server
        with text search answers "text index required" (code 27); one without rejects
        the operator. (On an empty collection some servers never evaluate the filter.)"""
        probe = db[f"_bluestream_probe_{uuid.uuid4().hex[:12]}"]
        try:
            await probe.insert_one({"probe": "probe"})
            await probe.find_one({"$text": {"$search": "probe"}})
            return True
        except OperationFailure as exc:
            return exc.code == _INDEX_NOT_FOUND or "text index required" in str(exc)
        finally:
            await probe.drop()

    async def _backfill_run_search(self, db: AsyncDatabase[Doc]) -> None:
        """Index start documents written by others (suitcase, older versions) for FullText."""
        run_start, run_search = db["run_start"], db["run_search"]
        if await run_search.count_documents({}) >= await run_start.count_documents({}):
            return
        have = set(await run_search.distinct("uid"))
        batch: list[Doc] = []
        async for doc in run_start.find({}, {"_id": 0}):
            if doc.get("uid") not in have:
                batch.append(doc)
            if len(batch) >= 500:
                await self._index_search_text(run_search, batch)
                batch = []
        await self._index_search_text(run_search, batch)

    @staticmethod
    async def _index_search_text(run_search: Collection, docs: Sequence[Doc]) -> None:
        ops = [UpdateOne({"uid": d["uid"]}, {"$set": {"text": search_text(d)}}, upsert=True)
               for d in docs if isinstance(d.get("uid"), str)]
        if ops:
            await _bulk_upsert(run_search, ops)

    # -- writes -------------------------------------------------------------------------

    async def put_documents(self, kind: str, docs: Sequence[Doc]) -> list[PutOutcome]:
        name, key_field = _kind(kind)
        if not docs:
            return []
        keys = [key_of(kind, d) for d in docs]
        col = self._col(name)
        with self._errors(f"store {kind} documents"):
            # Read first: a collection may lack the unique index on its key (kept from a
            # suitcase database, or not creatable with the user's rights), so an insert
            # alone would not catch a replayed document.
            stored = await self._stored_content(col, key_field, keys)
            outcomes, positions = classify_puts(docs, keys, stored)
            raced = await self._insert(col, [docs[i] for i in positions])
            if raced:
                lost = {keys[positions[j]] for j in raced}
                await self._reclassify(col, key_field, docs, keys, lost, outcomes)
            if kind == "start" and not self._native_text:
                kept = [d for d, o in zip(docs, outcomes, strict=True)
                        if o is not PutOutcome.CONFLICT]
                await self._index_search_text(self._col("run_search"), kept)
        return outcomes

    @staticmethod
    async def _stored_content(col: Collection, key_field: str,
                              keys: Sequence[str]) -> dict[str, str]:
        """Canonical content of the stored documents with these keys (first one wins)."""
        found: dict[str, str] = {}
        cursor = col.find({key_field: {"$in": sorted(set(keys))}}, {"_id": 0}).sort("_id", 1)
        async for doc in cursor:
            found.setdefault(str(doc.get(key_field)), canonical_json(doc))
        return found

    @staticmethod
    async def _insert(col: Collection, docs: Sequence[Doc]) -> list[int]:
        """Insert (copies: pymongo would add ``_id`` to the caller's dicts); return the
        positions that lost a duplicate-key race to another writer."""
        if not docs:
            return []
        try:
            await col.insert_many([dict(d) for d in docs], ordered=False)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(e.get("code") != _DUPLICATE_KEY for e in errors) or not errors:
                raise
            return [int(e["index"]) for e in errors]
        return []

    async def _reclassify(self, col: Collection, key_field: str, docs: Sequence[Doc],
                          keys: Sequence[str], lost: set[str],
                          outcomes: list[PutOutcome]) -> None:
        """After losing a race, compare with what the other writer stored. A key that is
        still absent clashed on another unique field (a stop's uid): CONFLICT."""
        stored = await self._stored_content(col, key_field, sorted(lost))
        for i, key in enumerate(keys):
            if key in lost:
                same = stored.get(key) == canonical_json(docs[i])
                outcomes[i] = PutOutcome.SAME if same else PutOutcome.CONFLICT

    async def update_streams(self, updates: Sequence[StreamUpdate]) -> None:
        ops = [UpdateOne({"descriptor_uid": u.descriptor_uid}, _stream_update(u), upsert=True)
               for u in updates]
        if ops:
            with self._errors("update event_stream"):
                await _bulk_upsert(self._col("event_stream"), ops)

    async def tails(self, descriptor_uids: Sequence[str]) -> dict[str, tuple[int, bytes]]:
        if not descriptor_uids:
            return {}
        flt = {"descriptor_uid": {"$in": list(descriptor_uids)}}
        with self._errors("read event_stream tails"):
            recs = await self._col("event_stream").find(
                flt, {"_id": 0, "descriptor_uid": 1, "tail": 1, "tail_start": 1}).to_list(None)
        return {str(r["descriptor_uid"]): (int(r.get("tail_start") or 0), bytes(r["tail"]))
                for r in recs if r.get("tail")}

    async def log_ingest(self, entries: Sequence[IngestLogEntry]) -> None:
        ops = [UpdateOne({"run_start": e.run_start, "topic": e.topic, "partition": e.partition},
                         _ingest_update(e), upsert=True) for e in entries]
        if ops:
            with self._errors("update ingest_log"):
                await _bulk_upsert(self._col("ingest_log"), ops)

    # -- annotations and removal ----------------------------------------------------------

    async def add_annotation(self, run_start: str, key: str, value: Any, *, time: float,
                             author: str | None = None, note: str | None = None) -> int:
        col = self._col("run_annotation")
        for _ in range(20):  # a concurrent writer took the version: take the next one
            with self._errors("read annotations"):
                newest = await col.find_one({"run_start": run_start, "key": key},
                                            {"_id": 0, "version": 1},
                                            sort=[("version", DESCENDING)])
            version = 1 + int(newest["version"]) if newest else 1
            try:
                with self._errors("store an annotation"):
                    await col.insert_one({"run_start": run_start, "key": key,
                                          "version": version, "value": value, "time": time,
                                          "author": author, "note": note})
                return version
            except StorageError as exc:
                cause = exc.__cause__
                if not (isinstance(cause, OperationFailure) and cause.code == _DUPLICATE_KEY):
                    raise
        raise StorageUnavailable(f"MongoDB at {self.uri}: annotation {key!r} of run "
                                 f"{run_start} is being written by others; try again")

    async def annotations(self, run_start: str, key: str | None = None) -> list[Doc]:
        flt: Doc = {"run_start": run_start} if key is None else \
            {"run_start": run_start, "key": key}
        with self._errors("read annotations"):
            recs = await self._col("run_annotation").find(flt, {"_id": 0, "run_start": 0}) \
                .sort([("key", ASCENDING), ("version", ASCENDING)]).to_list(None)
        return [{f: r.get(f) for f in ("key", "version", "value", "time", "author", "note")}
                for r in recs]

    async def annotation_values(self, key: str) -> dict[str, Any]:
        current: dict[str, tuple[int, Any]] = {}
        with self._errors("read annotations"):
            async for r in self._col("run_annotation").find(
                    {"key": key}, {"_id": 0, "run_start": 1, "version": 1, "value": 1}):
                run, version = str(r["run_start"]), int(r["version"])
                if run not in current or current[run][0] < version:
                    current[run] = (version, r.get("value"))
        return {run: value for run, (_, value) in current.items() if value is not None}

    async def mark_removed(self, uids: Sequence[str], info: Doc) -> None:
        ops = [UpdateOne({"uid": u}, {"$setOnInsert": {"uid": u, **info}}, upsert=True)
               for u in uids]
        if ops:
            with self._errors("mark runs removed"):
                await _bulk_upsert(self._col("run_removed"), ops)

    async def removal_marks(self) -> list[Doc]:
        with self._errors("read removal marks"):
            return await self._col("run_removed").find({}, {"_id": 0}).sort(
                "uid", ASCENDING).to_list(None)

    async def delete_run(self, uid: str) -> dict[str, int]:
        """Children before parents, the start document and then the mark last: a
        crash anywhere leaves the mark, and a rerun deletes what is left."""
        counts: dict[str, int] = {}
        with self._errors(f"delete run {uid}"):
            for kind, child in (("resource", "datum"), ("stream_resource", "stream_datum")):
                parents = await self._col(DOC_KINDS[kind][0]).distinct(
                    "uid", {"run_start": uid})
                res = await self._col(DOC_KINDS[child][0]).delete_many(
                    {_RESOURCE_FIELD[child]: {"$in": parents}})
                counts[child] = res.deleted_count
            for kind in ("resource", "stream_resource", "descriptor", "stop"):
                res = await self._col(DOC_KINDS[kind][0]).delete_many({"run_start": uid})
                counts[kind] = res.deleted_count
            for name in ("event_stream", "ingest_log", "run_annotation"):
                counts[name] = (await self._col(name).delete_many({"run_start": uid})
                                ).deleted_count
            await self._col("run_search").delete_many({"uid": uid})
            counts["start"] = (await self._col("run_start").delete_many({"uid": uid})
                               ).deleted_count
            counts["mark"] = (await self._col("run_removed").delete_many({"uid": uid})
                              ).deleted_count
        return counts

    # -- reads --------------------------------------------------------------------------

    async def get(self, kind: str, key: str) -> Doc | None:
        name, key_field = _kind(kind)
        with self._errors(f"read a {kind} document"):
            return await self._col(name).find_one({key_field: key}, {"_id": 0}, sort=[("_id", 1)])

    async def find(self, kind: str, *, run_start: str | None = None,
                   keys: Sequence[str] | None = None,
                   resource: str | None = None) -> list[Doc]:
        name, key_field = _kind(kind)
        flt = _find_filter(kind, key_field, run_start, keys, resource)
        with self._errors(f"read {kind} documents"):
            cursor = self._col(name).find(flt, {"_id": 0})
            return await cursor.sort([("time", ASCENDING), (key_field, ASCENDING)]).to_list(None)

    async def streams(self, run_start: str) -> list[Doc]:
        with self._errors("read event_stream"):
            cursor = self._col("event_stream").find({"run_start": run_start}, {"_id": 0})
            recs = await cursor.sort([("stream_name", 1), ("descriptor_uid", 1)]).to_list(None)
        return [_stream_record(r) for r in recs]

    async def ingest_log(self, run_start: str) -> list[Doc]:
        with self._errors("read ingest_log"):
            cursor = self._col("ingest_log").find({"run_start": run_start}, {"_id": 0})
            recs = await cursor.sort([("topic", 1), ("partition", 1)]).to_list(None)
        return [_ingest_record(r) for r in recs]

    async def search(self, query: Query | None, *, skip: int = 0,
                     limit: int | None = None) -> list[Doc]:
        return await self._search({"_id": 0}, query, skip, limit)

    async def search_uids(self, query: Query | None, *, skip: int = 0,
                          limit: int | None = None) -> list[str]:
        return [str(d["uid"]) for d in await self._search({"_id": 0, "uid": 1}, query,
                                                          skip, limit)]

    async def _search(self, projection: Doc, query: Query | None, skip: int,
                      limit: int | None) -> list[Doc]:
        """The runs matching ``query`` (``projection`` of each), newest first."""
        _check_window(skip, limit)
        if limit == 0:
            return []
        with self._errors("search runs"):
            cursor = self._col("run_start").find(await self._filter(query), projection)
            cursor = cursor.sort(_NEWEST_FIRST).skip(skip)
            if limit is not None:
                cursor = cursor.limit(limit)
            return await cursor.to_list(None)

    async def count(self, query: Query | None) -> int:
        with self._errors("count runs"):
            return await self._col("run_start").count_documents(await self._filter(query))

    async def stopped_runs(self, query: Query) -> list[str]:
        check_stop_query(query)
        with self._errors("search stop documents"):
            docs = await self._col("run_stop").find(
                to_mongo(query), {"_id": 0, "run_start": 1}).to_list(None)
        return [str(d["run_start"]) for d in docs]

    async def uids_with_prefix(self, prefix: str, query: Query | None = None,
                               limit: int = 10) -> list[str]:
        _check_window(0, limit)
        if limit == 0:
            return []
        with self._errors("look up uids"):
            flt: Doc = {"uid": {"$regex": "^" + escape_regex(prefix)}}
            rest = await self._filter(query)
            cursor = self._col("run_start").find({"$and": [flt, rest]} if rest else flt,
                                                 {"_id": 0, "uid": 1})
            docs = await cursor.sort(_NEWEST_FIRST).limit(limit).to_list(None)
        return [str(d["uid"]) for d in docs]

    async def _filter(self, query: Query | None) -> Doc:
        """The run_start filter, leaving out runs marked removed; without ``$text``,
        FullText parts are first resolved to uids through ``run_search``."""
        query = await self.resolve(query)
        if self._native_text or query is None:
            flt = to_mongo(query)
        else:
            resolved = {q: await self._full_text_uids(q) for q in _full_text_parts(query)}
            flt = to_mongo(query, full_text=lambda q: {"uid": {"$in": resolved[q]}})
        removed = await self._removed_uids()
        if not removed:
            return flt
        hide: Doc = {"uid": {"$nin": removed}}
        return {"$and": [flt, hide]} if flt else hide

    async def _removed_uids(self) -> list[str]:
        """Usually none: marks live only while a removal runs (one indexed read)."""
        with self._errors("read removal marks"):
            return [str(d["uid"]) for d in await self._col("run_removed").find(
                {}, {"_id": 0, "uid": 1}).to_list(None)]

    async def _full_text_uids(self, q: FullText) -> list[str]:
        words = full_text_words(q)
        if not self._run_search_complete:  # read-only over starts nobody indexed: scan
            cursor = self._col("run_start").find({}, {"_id": 0})
            return [str(d["uid"]) async for d in cursor
                    if all(w in search_text(d) for w in words)]
        flt = {"$and": [{"text": {"$regex": escape_regex(w)}} for w in words]}
        docs = await self._col("run_search").find(flt, {"_id": 0, "uid": 1}).to_list(None)
        return [str(d["uid"]) for d in docs]

    # -- integrity and completeness -------------------------------------------------------

    async def links(self, kind: str, run_starts: Sequence[str] | None = None) -> list[Doc]:
        if kind == "event_stream":
            name, key_field, run_field = "event_stream", "descriptor_uid", "run_start"
            projection: Doc = {"_id": 0, "tail": 0}
        else:
            name, key_field = _kind(kind)
            run_field = "uid" if kind == "start" else "run_start"
            projection = {"_id": 0, key_field: 1, "uid": 1, "run_start": 1}
        flt: Doc = {} if run_starts is None else \
            {run_field: {"$in": list(dict.fromkeys(run_starts))}}
        with self._errors(f"list {kind} links"):
            recs = await self._col(name).find(flt, projection).to_list(None)
        if kind == "event_stream":
            out = [_stream_record(r) for r in recs]
            return sorted(out, key=lambda d: (d["run_start"] or "", d["descriptor_uid"]))
        found = [{"key": str(r.get(key_field)), "uid": r.get("uid"),
                  "run_start": r.get("uid") if kind == "start" else r.get("run_start")}
                 for r in recs]
        return sorted(found, key=lambda d: (d["run_start"] or "", d["key"]))


# -- pure helpers --------------------------------------------------------------------------


async def _bulk_upsert(col: Collection, ops: list[UpdateOne]) -> None:
    """Apply upserts in order. Two writers upserting the same new key can both try to
    insert; the loser gets a duplicate-key error, and running the (idempotent) batch
    again then updates the winner's record."""
    try:
        await col.bulk_write(ops, ordered=True)
    except BulkWriteError as exc:
        errors = exc.details.get("writeErrors", [])
        if not errors or any(e.get("code") != _DUPLICATE_KEY for e in errors):
            raise
        await col.bulk_write(ops, ordered=True)


def _stream_update(u: StreamUpdate) -> Doc:
    """Combine with max/min so that replays and reordering give the same record; the
    tail (kept in the same document, so it changes atomically with the record) is set
    or removed as the writer merged it."""
    update: Doc = {
        "$set": {"run_start": u.run_start, "stream_name": u.stream_name,
                 "zarr_path": u.zarr_path, "data_keys": list(u.data_keys)},
        "$max": {"length": u.length, "seq_num_max": u.seq_num_max, "time_max": u.time_max,
                 "schema_version": u.schema_version},
        "$min": {"seq_num_min": u.seq_num_min, "time_min": u.time_min},
    }
    if u.tail:
        update["$set"].update(tail=Binary(u.tail), tail_start=u.tail_start or 0)
    elif u.tail == b"":
        update["$unset"] = {"tail": "", "tail_start": ""}
    return update


def _stream_record(rec: Mapping[str, Any]) -> Doc:
    out = {f: rec.get(f) for f in StreamUpdate.__dataclass_fields__}
    out["data_keys"] = list(rec.get("data_keys") or [])
    if out["tail"] is not None:
        out["tail"] = bytes(out["tail"])
    return out


def _ingest_update(e: IngestLogEntry) -> Doc:
    extra = {f"extra.{k}": v for k, v in check_extra(e.extra).items()}
    update: Doc = {
        "$min": {"offset_min": e.offset_min},
        "$max": {"offset_max": e.offset_max},
        "$set": {"daemon_version": e.daemon_version, "host": e.host, **extra},
    }
    if e.session is not None:  # merged per writing process, as the offsets above
        at = f"extra.{SESSIONS}.{e.session.id}"
        rec = session_record(e)
        update["$min"][f"{at}.offset_min"] = rec.pop("offset_min")
        update["$max"][f"{at}.offset_max"] = rec.pop("offset_max")
        update["$set"].update({f"{at}.{k}": v for k, v in rec.items()})
    return update


def _ingest_record(rec: Mapping[str, Any]) -> Doc:
    out = {f: rec.get(f) for f in IngestLogEntry.__dataclass_fields__ if f != "session"}
    extra = dict(rec.get("extra") or {})
    out["sessions"] = dict(extra.pop(SESSIONS, None) or {})
    out["extra"] = extra
    return out


def _find_filter(kind: str, key_field: str, run_start: str | None,
                 keys: Sequence[str] | None, resource: str | None) -> Doc:
    parts: list[Doc] = []
    if run_start is not None:
        parts.append({"uid" if kind == "start" else "run_start": run_start})
    if keys is not None:
        parts.append({key_field: {"$in": list(keys)}})
    if resource is not None:
        if kind not in _RESOURCE_FIELD:
            raise ValueError(f"find(resource=...) applies to datum and stream_datum, not {kind}")
        parts.append({_RESOURCE_FIELD[kind]: resource})
    if not parts:
        raise ValueError("find() needs run_start, keys or resource")
    return parts[0] if len(parts) == 1 else {"$and": parts}


def _check_window(skip: int, limit: int | None) -> None:
    if skip < 0 or (limit is not None and limit < 0):
        raise ValueError(f"skip and limit must not be negative (skip={skip}, limit={limit})")


def _full_text_parts(q: Query) -> list[FullText]:
    if isinstance(q, FullText):
        return [q]
    if isinstance(q, And):
        return [c for c in q.queries if isinstance(c, FullText)]
    return []

