"""Run metadata in one SQLite file: the embedded backend (laptops, tests, no MongoDB).

Layout: one table per MongoDB collection (``run_start``, ``run_stop``,
``event_descriptor``, ``resource``, ``datum``, ``stream_resource``, ``stream_datum``,
``event_stream``, ``ingest_log``). One file holds any number of tenants: every table
has a ``tenant`` column that leads its primary key and indexes. Document tables keep
the document as JSON text (``doc``, exactly as put, NaN included) next to the columns
that are searched or sorted on: ``doc_key`` (its uid / datum_id / run_start),
``uid``, ``run_start``, ``parent`` (the resource / stream_resource of a datum /
stream_datum) and ``time``. ``run_start`` adds ``scan_id``, ``search_text`` (the
lower-cased string values, for FullText by substring; FTS5 is not used so that both
backends match words the same way) and ``query_doc`` (the document as strict JSON with
non-finite floats as null, because SQLite < 3.42 rejects NaN in its JSON functions).

Durability: WAL with ``synchronous=FULL`` fsyncs the log at every commit, so offsets
committed to Kafka after a write can never point past what survives a power cut
(``NORMAL`` in WAL mode may lose the last transactions). Writers in other processes
wait up to ``busy_timeout``; a lock held longer surfaces as StorageUnavailable.

All database work runs in a worker thread (:func:`anyio.to_thread.run_sync`), one
call at a time per store (a lock around a ``check_same_thread=False`` connection), so
the event loop never blocks on disk.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread

from bluestream.errors import ConfigError, NotFound, StorageError, StorageUnavailable
from bluestream.queries import Query, check_stop_query
from bluestream.storage.base import (
    DOC_KINDS,
    IngestLogEntry,
    MetadataStore,
    PutOutcome,
    StreamUpdate,
    key_of,
    merge_sessions,
    session_record,
)
from bluestream.storage.rules import (
    SESSIONS,
    canonical_json,
    check_extra,
    check_tenant,
    classify_puts,
    search_text,
)
from bluestream.storage.sqlite_query import finite, register_functions, to_sql, uid_prefix

__all__ = ["BUSY_TIMEOUT_S", "SqliteMetadataStore", "sqlite_path"]

Doc = dict[str, Any]
T = TypeVar("T")

BUSY_TIMEOUT_S = 10.0
_SCHEME = "sqlite:///"
_CHUNK = 500  # bound parameters per IN (...) list, well under SQLite's limit
_PARENT_FIELD = {"datum": "resource", "stream_datum": "stream_resource"}
_DOC_COLUMNS = ("doc_key", "uid", "run_start", "parent", "time", "doc")
_START_COLUMNS = (*_DOC_COLUMNS, "scan_id", "search_text", "query_doc")
_STREAM_COLUMNS = ("descriptor_uid", "run_start", "stream_name", "zarr_path", "length",
                   "seq_num_min", "seq_num_max", "time_min", "time_max", "data_keys",
                   "schema_version")
_INGEST_COLUMNS = ("run_start", "topic", "partition", "offset_min", "offset_max",
                   "daemon_version", "host", "extra")


def _doc_table(name: str, extra: str = "") -> str:
    return f"""
    CREATE TABLE IF NOT EXISTS {name} (
        tenant TEXT NOT NULL, doc_key TEXT NOT NULL, uid TEXT, run_start TEXT,
        parent TEXT, time REAL, {extra} doc TEXT NOT NULL,
        PRIMARY KEY (tenant, doc_key));
    CREATE INDEX IF NOT EXISTS {name}_run_start ON {name} (tenant, run_start, time, doc_key);
    """


_SCHEMA = "\n".join([
    "CREATE TABLE IF NOT EXISTS tenant (tenant TEXT PRIMARY KEY);",
    _doc_table("run_start", "scan_id INTEGER, search_text TEXT NOT NULL, "
                            "query_doc TEXT NOT NULL,"),
    "CREATE INDEX IF NOT EXISTS run_start_time ON run_start (tenant, time DESC, uid);",
    # cat[scan_id] is "the newest run with it": one index answers both the match and the
    # order (with (tenant, scan_id) alone SQLite walked the time index instead, 20-50 ms
    # at 100,000 runs). It replaces the older two-column index.
    "CREATE INDEX IF NOT EXISTS run_start_scan_time "
    "ON run_start (tenant, scan_id, time DESC, uid);",
    "DROP INDEX IF EXISTS run_start_scan_id;",
    _doc_table("run_stop"),
    "CREATE UNIQUE INDEX IF NOT EXISTS run_stop_uid ON run_stop (tenant, uid);",
    _doc_table("event_descriptor"),
    _doc_table("resource"),
    _doc_table("datum"),
    "CREATE INDEX IF NOT EXISTS datum_parent ON datum (tenant, parent, time, doc_key);",
    _doc_table("stream_resource"),
    _doc_table("stream_datum"),
    "CREATE INDEX IF NOT EXISTS stream_datum_parent "
    "ON stream_datum (tenant, parent, time, doc_key);",
    """
    CREATE TABLE IF NOT EXISTS event_stream (
        tenant TEXT NOT NULL, descriptor_uid TEXT NOT NULL, run_start TEXT NOT NULL,
        stream_name TEXT NOT NULL, zarr_path TEXT NOT NULL, length INTEGER NOT NULL,
        seq_num_min INTEGER NOT NULL, seq_num_max INTEGER NOT NULL,
        time_min REAL NOT NULL, time_max REAL NOT NULL, data_keys TEXT NOT NULL,
        schema_version INTEGER NOT NULL,
        PRIMARY KEY (tenant, descriptor_uid));
    CREATE INDEX IF NOT EXISTS event_stream_run_start ON event_stream (tenant, run_start);
    CREATE TABLE IF NOT EXISTS event_tail (
        tenant TEXT NOT NULL, descriptor_uid TEXT NOT NULL, run_start TEXT NOT NULL,
        start INTEGER NOT NULL, rows BLOB NOT NULL,
        PRIMARY KEY (tenant, descriptor_uid));
    CREATE INDEX IF NOT EXISTS event_tail_run_start ON event_tail (tenant, run_start);
    CREATE TABLE IF NOT EXISTS run_annotation (
        tenant TEXT NOT NULL, run_start TEXT NOT NULL, key TEXT NOT NULL,
        version INTEGER NOT NULL, value TEXT NOT NULL, time REAL NOT NULL,
        author TEXT, note TEXT,
        PRIMARY KEY (tenant, run_start, key, version));
    CREATE INDEX IF NOT EXISTS run_annotation_key
        ON run_annotation (tenant, key, run_start, version);
    CREATE TABLE IF NOT EXISTS run_removed (
        tenant TEXT NOT NULL, uid TEXT NOT NULL, info TEXT NOT NULL,
        PRIMARY KEY (tenant, uid));
    CREATE TABLE IF NOT EXISTS ingest_log (
        tenant TEXT NOT NULL, run_start TEXT NOT NULL, topic TEXT NOT NULL,
        partition INTEGER NOT NULL, offset_min INTEGER NOT NULL,
        offset_max INTEGER NOT NULL, daemon_version TEXT NOT NULL, host TEXT NOT NULL,
        extra TEXT NOT NULL,
        PRIMARY KEY (tenant, run_start, topic, partition));
    """,
])

_STREAM_UPSERT = f"""
    INSERT INTO event_stream (tenant, {', '.join(_STREAM_COLUMNS)})
    VALUES ({', '.join('?' * (len(_STREAM_COLUMNS) + 1))})
    ON CONFLICT (tenant, descriptor_uid) DO UPDATE SET
        run_start = excluded.run_start, stream_name = excluded.stream_name,
        zarr_path = excluded.zarr_path, data_keys = excluded.data_keys,
        length = max(length, excluded.length),
        seq_num_max = max(seq_num_max, excluded.seq_num_max),
        time_max = max(time_max, excluded.time_max),
        schema_version = max(schema_version, excluded.schema_version),
        seq_num_min = min(seq_num_min, excluded.seq_num_min),
        time_min = min(time_min, excluded.time_min)
"""

_TAIL_UPSERT = """
    INSERT INTO event_tail (tenant, descriptor_uid, run_start, start, rows)
    VALUES (?, ?, ?, ?, ?)
    ON CONFLICT (tenant, descriptor_uid) DO UPDATE SET
        run_start = excluded.run_start, start = excluded.start, rows = excluded.rows
"""

_INGEST_UPSERT = f"""
    INSERT INTO ingest_log (tenant, {', '.join(_INGEST_COLUMNS)})
    VALUES ({', '.join('?' * (len(_INGEST_COLUMNS) + 1))})
    ON CONFLICT (tenant, run_start, topic, partition) DO UPDATE SET
        offset_min = min(offset_min, excluded.offset_min),
        offset_max = max(offset_max, excluded.offset_max),
        daemon_version = excluded.daemon_version, host = excluded.host,
        extra = excluded.extra
"""


def sqlite_path(uri: str) -> str:
    """The file of a ``sqlite:///`` URI, SQLAlchemy-style: ``sqlite:///rel/x.db`` is
    relative to the working directory, ``sqlite:////abs/x.db`` absolute, and
    ``sqlite:///:memory:`` a private in-memory database (lost on close)."""
    if not uri.startswith(_SCHEME) or len(uri) == len(_SCHEME):
        raise ConfigError(f"SQLite URI {uri!r} must look like sqlite:///path/to/file.db")
    return uri[len(_SCHEME):]


def _kind(kind: str) -> str:
    if kind not in DOC_KINDS:
        raise ValueError(f"unknown document kind {kind!r}: one of {sorted(DOC_KINDS)}")
    return DOC_KINDS[kind][0]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _row(kind: str, doc: Doc) -> tuple[Any, ...]:
    """The column values of a document, in the order of _DOC_COLUMNS / _START_COLUMNS."""
    key = key_of(kind, doc)
    text = json.dumps(doc, sort_keys=False, allow_nan=True)
    run_start = key if kind == "start" else _text(doc.get("run_start"))
    parent = _text(doc.get(_PARENT_FIELD[kind])) if kind in _PARENT_FIELD else None
    row = (key, _text(doc.get("uid")), run_start, parent, _number(doc.get("time")), text)
    if kind != "start":
        return row
    scan_id = doc.get("scan_id")
    scan_id = scan_id if isinstance(scan_id, int) and not isinstance(scan_id, bool) else None
    strict = json.dumps(finite(doc), allow_nan=False)
    return (*row, scan_id, search_text(doc), strict)


def _chunks(items: Sequence[T], size: int = _CHUNK) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _marks(n: int) -> str:
    return ", ".join("?" * n)


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE takes the write lock up front, so read-compare-insert is atomic
    even against another process writing the same file."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class SqliteMetadataStore(MetadataStore):
    """Run metadata for one tenant inside a SQLite file (see the module docstring)."""

    def __init__(self, uri: str, tenant: str, *, readonly: bool = False) -> None:
        self.uri = uri
        self.tenant = check_tenant(tenant)
        self.readonly = readonly
        self._path = sqlite_path(uri)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        #: Whether the file has removal marks to leave out of searches (files written
        #: before removal existed have no such table; writers always create it).
        self._marks_table = not readonly

    def _visible(self, conn: sqlite3.Connection) -> tuple[str, tuple[str, ...]]:
        """The clause (and its parameter) that hides runs marked removed (see
        :meth:`mark_removed`). A reader of a file without the table looks again each
        time, until a writer has created it: a long-lived reader must see new marks."""
        if not self._marks_table:
            self._marks_table = _has_table(conn, "run_removed")
        if not self._marks_table or conn.execute(
                "SELECT 1 FROM run_removed WHERE tenant = ? LIMIT 1", (self.tenant,)
        ).fetchone() is None:  # marks exist only while a removal runs: usually none
            return "", ()
        return " AND uid NOT IN (SELECT uid FROM run_removed WHERE tenant = ?)", (self.tenant,)

    # -- plumbing -----------------------------------------------------------------------

    async def _run(self, action: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` in a worker thread, one at a time, errors translated."""
        return await anyio.to_thread.run_sync(self._call, action, fn)

    def _call(self, action: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock, self._errors(action):
            if self._conn is None:
                raise StorageError(f"metadata store {self.uri} ({self.tenant}) is not open")
            return fn(self._conn)

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as exc:
            text = str(exc)
            if any(s in text for s in ("locked", "busy", "unable to open", "disk I/O")):
                raise StorageUnavailable(
                    f"SQLite database {self.uri} is unavailable ({action}): {text}"
                ) from exc
            raise StorageError(f"SQLite database {self.uri} could not {action}: {text}") from exc
        except sqlite3.Error as exc:
            raise StorageError(f"SQLite database {self.uri} could not {action}: {exc}") from exc
        except OSError as exc:
            raise StorageUnavailable(
                f"SQLite database {self.uri} is unavailable ({action}): {exc}"
            ) from exc

    # -- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        if self._conn is not None:
            return
        conn = await anyio.to_thread.run_sync(self._connect)
        with self._lock:
            self._conn = conn

    def _connect(self) -> sqlite3.Connection:
        with self._errors("open"):
            if self.readonly:
                conn = self._connect_readonly()
            else:
                if self._path != ":memory:":
                    Path(self._path).parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(self._path, timeout=BUSY_TIMEOUT_S,
                                       isolation_level=None, check_same_thread=False)
            try:
                if self.readonly:
                    self._check_readable(conn)
                    self._marks_table = _has_table(conn, "run_removed")
                else:
                    self._configure(conn, self.tenant)
            except BaseException:
                conn.close()
                raise
            return conn

    def _connect_readonly(self) -> sqlite3.Connection:
        """A connection that cannot write: no file, table or index is ever created."""
        if self._path == ":memory:":
            raise ConfigError("a read-only store needs a SQLite file, not :memory:")
        path = Path(self._path)
        if not path.is_file():
            raise StorageUnavailable(f"metadata store {self.uri}: SQLite file {path} does not "
                                     "exist (wrong path, or nothing was ingested yet)")
        return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True,
                               timeout=BUSY_TIMEOUT_S, isolation_level=None,
                               check_same_thread=False)

    def _check_readable(self, conn: sqlite3.Connection) -> None:
        conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        register_functions(conn)
        if _tenant_known(conn, self.tenant):
            return
        tenants = _tenants(conn)
        if self.tenant not in tenants:
            raise NotFound(f"tenant {self.tenant!r} does not exist in {self.uri}; "
                           f"tenants there: {', '.join(tenants) or '(none)'}")

    async def tenants(self) -> list[str]:
        return await self._run("list tenants", _tenants)

    @staticmethod
    def _configure(conn: sqlite3.Connection, tenant: str) -> None:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        try:
            conn.execute("SELECT json_type('[]')")
        except sqlite3.OperationalError as exc:
            raise StorageError(f"SQLite {sqlite3.sqlite_version} lacks the JSON functions "
                               "bluestream needs") from exc
        register_functions(conn)
        with _transaction(conn):
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT OR IGNORE INTO tenant (tenant) VALUES (?)", (tenant,))

    async def close(self) -> None:
        def _close() -> None:
            with self._lock:
                conn, self._conn = self._conn, None
            if conn is not None:
                with self._errors("close"):
                    conn.close()

        await anyio.to_thread.run_sync(_close)

    async def ping(self) -> None:
        if self._conn is None:
            raise StorageUnavailable(f"SQLite database {self.uri} is unavailable: not open")
        await self._run("ping", lambda c: c.execute("SELECT 1").fetchone())

    # -- writes -------------------------------------------------------------------------

    async def put_documents(self, kind: str, docs: Sequence[Doc]) -> list[PutOutcome]:
        table = _kind(kind)
        if not docs:
            return []
        keys = [key_of(kind, d) for d in docs]
        rows = [_row(kind, d) for d in docs]
        return await self._run(f"store {kind} documents",
                               lambda c: self._put(c, kind, table, docs, keys, rows))

    def _put(self, conn: sqlite3.Connection, kind: str, table: str, docs: Sequence[Doc],
             keys: Sequence[str], rows: Sequence[tuple[Any, ...]]) -> list[PutOutcome]:
        columns = _START_COLUMNS if kind == "start" else _DOC_COLUMNS
        insert = (f"INSERT OR IGNORE INTO {table} (tenant, {', '.join(columns)}) "
                  f"VALUES ({_marks(len(columns) + 1)})")
        with _transaction(conn):
            stored = self._stored_content(conn, table, keys)
            outcomes, positions = classify_puts(docs, keys, stored)
            refused = set()
            for i in positions:
                if conn.execute(insert, (self.tenant, *rows[i])).rowcount == 0:
                    # The key was free, so another unique column (a stop's uid) clashed.
                    outcomes[i] = PutOutcome.CONFLICT
                    refused.add(keys[i])
        # A later copy in this call is "the same" as a document that was never stored.
        return [PutOutcome.CONFLICT if keys[i] in refused else o
                for i, o in enumerate(outcomes)]

    def _stored_content(self, conn: sqlite3.Connection, table: str,
                        keys: Sequence[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for chunk in _chunks(sorted(set(keys))):
            sql = (f"SELECT doc_key, doc FROM {table} WHERE tenant = ? "
                   f"AND doc_key IN ({_marks(len(chunk))})")
            for key, text in conn.execute(sql, (self.tenant, *chunk)):
                found[key] = canonical_json(json.loads(text))
        return found

    async def update_streams(self, updates: Sequence[StreamUpdate]) -> None:
        rows = [(self.tenant, u.descriptor_uid, u.run_start, u.stream_name, u.zarr_path,
                 u.length, u.seq_num_min, u.seq_num_max, u.time_min, u.time_max,
                 json.dumps(list(u.data_keys)), u.schema_version) for u in updates]
        last = {u.descriptor_uid: u for u in updates if u.tail is not None}  # in order
        tails = [(self.tenant, u.descriptor_uid, u.run_start, u.tail_start or 0, u.tail)
                 for u in last.values() if u.tail]
        gone = [(self.tenant, u.descriptor_uid) for u in last.values() if u.tail == b""]

        def write(conn: sqlite3.Connection) -> None:
            with _transaction(conn):  # the tail first: a reader of the record sees it
                conn.executemany(_TAIL_UPSERT, tails)
                conn.executemany("DELETE FROM event_tail WHERE tenant = ? AND "
                                 "descriptor_uid = ?", gone)
                conn.executemany(_STREAM_UPSERT, rows)

        if rows:
            await self._run("update event_stream", write)

    async def tails(self, descriptor_uids: Sequence[str]) -> dict[str, tuple[int, bytes]]:
        def read(conn: sqlite3.Connection) -> dict[str, tuple[int, bytes]]:
            out: dict[str, tuple[int, bytes]] = {}
            for chunk in _chunks(list(descriptor_uids)):
                sql = ("SELECT descriptor_uid, start, rows FROM event_tail WHERE tenant = ? "
                       f"AND descriptor_uid IN ({_marks(len(chunk))})")
                for uid, start, blob in conn.execute(sql, (self.tenant, *chunk)):
                    out[uid] = (int(start), bytes(blob))
            return out

        if not descriptor_uids:
            return {}
        return await self._run("read event_tail", read)

    async def log_ingest(self, entries: Sequence[IngestLogEntry]) -> None:
        checked = [(e, check_extra(e.extra)) for e in entries]
        if checked:
            await self._run("update ingest_log", lambda c: self._log_ingest(c, checked))

    def _log_ingest(self, conn: sqlite3.Connection,
                    entries: Sequence[tuple[IngestLogEntry, Doc]]) -> None:
        """Offsets merge in SQL; ``extra`` merges key by key, like MongoDB's $set."""
        select = ("SELECT extra FROM ingest_log WHERE tenant = ? AND run_start = ? "
                  "AND topic = ? AND partition = ?")
        with _transaction(conn):
            for e, extra in entries:
                old = conn.execute(select, (self.tenant, e.run_start, e.topic,
                                            e.partition)).fetchone()
                before = json.loads(old[0]) if old else {}
                merged = {**before, **extra}
                if e.session is not None:
                    merged[SESSIONS] = merge_sessions(before.get(SESSIONS, {}),
                                                      {e.session.id: session_record(e)})
                conn.execute(_INGEST_UPSERT, (
                    self.tenant, e.run_start, e.topic, e.partition, e.offset_min,
                    e.offset_max, e.daemon_version, e.host, json.dumps(merged, allow_nan=True),
                ))

    # -- annotations and removal ----------------------------------------------------------

    async def add_annotation(self, run_start: str, key: str, value: Any, *, time: float,
                             author: str | None = None, note: str | None = None) -> int:
        text = json.dumps(value, allow_nan=False)
        newest = ("SELECT coalesce(max(version), 0) FROM run_annotation WHERE tenant = ? "
                  "AND run_start = ? AND key = ?")
        insert = ("INSERT INTO run_annotation (tenant, run_start, key, version, value, time, "
                  "author, note) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")

        def add(conn: sqlite3.Connection) -> int:
            with _transaction(conn):  # the write lock: versions cannot collide
                version = int(conn.execute(newest, (self.tenant, run_start, key)
                                           ).fetchone()[0]) + 1
                conn.execute(insert, (self.tenant, run_start, key, version, text, time,
                                      author, note))
            return version

        return await self._run("store an annotation", add)

    async def annotations(self, run_start: str, key: str | None = None) -> list[Doc]:
        sql = ("SELECT key, version, value, time, author, note FROM run_annotation "
               "WHERE tenant = ? AND run_start = ?" + ("" if key is None else " AND key = ?")
               + " ORDER BY key, version")
        args = (self.tenant, run_start) + (() if key is None else (key,))

        def read(conn: sqlite3.Connection) -> list[Doc]:
            if not _has_table(conn, "run_annotation"):
                return []
            return [{"key": k, "version": int(v), "value": json.loads(val), "time": t,
                     "author": a, "note": n}
                    for k, v, val, t, a, n in conn.execute(sql, args)]

        return await self._run("read annotations", read)

    async def annotation_values(self, key: str) -> dict[str, Any]:
        sql = ("SELECT a.run_start, a.value FROM run_annotation a WHERE a.tenant = ? "
               "AND a.key = ? AND a.version = (SELECT max(b.version) FROM run_annotation b "
               "WHERE b.tenant = a.tenant AND b.run_start = a.run_start AND b.key = a.key)")

        def read(conn: sqlite3.Connection) -> dict[str, Any]:
            if not _has_table(conn, "run_annotation"):
                return {}
            found = {str(r): json.loads(v) for r, v in conn.execute(sql, (self.tenant, key))}
            return {r: v for r, v in found.items() if v is not None}

        return await self._run("read annotations", read)

    async def mark_removed(self, uids: Sequence[str], info: Doc) -> None:
        text = json.dumps(info, allow_nan=False)
        rows = [(self.tenant, u, text) for u in uids]

        def mark(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.executemany("INSERT OR IGNORE INTO run_removed (tenant, uid, info) "
                                 "VALUES (?, ?, ?)", rows)

        await self._run("mark runs removed", mark)

    async def removal_marks(self) -> list[Doc]:
        def read(conn: sqlite3.Connection) -> list[Doc]:
            if not _has_table(conn, "run_removed"):
                return []
            sql = "SELECT uid, info FROM run_removed WHERE tenant = ? ORDER BY uid"
            return [{**json.loads(info), "uid": str(uid)}
                    for uid, info in conn.execute(sql, (self.tenant,))]

        return await self._run("read removal marks", read)

    async def delete_run(self, uid: str) -> dict[str, int]:
        t = self.tenant
        children = "SELECT doc_key FROM {} WHERE tenant = ? AND run_start = ?"
        steps = [  # children before parents; the mark last (one transaction anyway)
            ("datum", "DELETE FROM datum WHERE tenant = ? AND parent IN "
                      f"({children.format('resource')})", (t, t, uid)),
            ("stream_datum", "DELETE FROM stream_datum WHERE tenant = ? AND parent IN "
                             f"({children.format('stream_resource')})", (t, t, uid)),
            *[(kind, f"DELETE FROM {DOC_KINDS[kind][0]} WHERE tenant = ? AND run_start = ?",
               (t, uid)) for kind in ("resource", "stream_resource", "descriptor", "stop")],
            *[(table, f"DELETE FROM {table} WHERE tenant = ? AND run_start = ?", (t, uid))
              for table in ("event_tail", "event_stream", "ingest_log", "run_annotation")],
            ("start", "DELETE FROM run_start WHERE tenant = ? AND doc_key = ?", (t, uid)),
            ("mark", "DELETE FROM run_removed WHERE tenant = ? AND uid = ?", (t, uid)),
        ]

        def delete(conn: sqlite3.Connection) -> dict[str, int]:
            with _transaction(conn):
                return {name: conn.execute(sql, args).rowcount for name, sql, args in steps}

        return await self._run("delete a run", delete)

    # -- reads --------------------------------------------------------------------------

    async def get(self, kind: str, key: str) -> Doc | None:
        sql = f"SELECT doc FROM {_kind(kind)} WHERE tenant = ? AND doc_key = ?"

        def _get(conn: sqlite3.Connection) -> Doc | None:
            row = conn.execute(sql, (self.tenant, key)).fetchone()
            return None if row is None else _load(row[0])

        return await self._run(f"read a {kind} document", _get)

    async def find(self, kind: str, *, run_start: str | None = None,
                   keys: Sequence[str] | None = None,
                   resource: str | None = None) -> list[Doc]:
        table = _kind(kind)
        where, params = _find_where(kind, run_start, resource)
        if keys is None and not params:
            raise ValueError("find() needs run_start, keys or resource")
        sql = f"SELECT time, doc_key, doc FROM {table} WHERE tenant = ? {where}"

        def _find(conn: sqlite3.Connection) -> list[Doc]:
            if keys is None:
                rows = list(conn.execute(sql, (self.tenant, *params)))
            else:
                rows = []
                for chunk in _chunks(list(dict.fromkeys(keys))):
                    part = f"{sql} AND doc_key IN ({_marks(len(chunk))})"
                    rows += conn.execute(part, (self.tenant, *params, *chunk)).fetchall()
            # MongoDB's order: missing time first, then by time, then by key.
            rows.sort(key=lambda r: (r[0] is not None, r[0] or 0.0, r[1]))
            return [_load(r[2]) for r in rows]

        return await self._run(f"read {kind} documents", _find)

    async def streams(self, run_start: str) -> list[Doc]:
        sql = ("SELECT descriptor_uid, start, rows FROM event_tail WHERE tenant = ? "
               "AND run_start = ?")

        def read(conn: sqlite3.Connection) -> list[Doc]:
            conn.execute("BEGIN")  # one snapshot of records and tails
            try:
                recs = self._records_sync(conn, "event_stream", _STREAM_COLUMNS, "data_keys",
                                          run_start, "stream_name, descriptor_uid")
                try:
                    tails = {u: (int(st), bytes(b))
                             for u, st, b in conn.execute(sql, (self.tenant, run_start))}
                except sqlite3.OperationalError as exc:  # a file older than tails, read-only
                    if "no such table" not in str(exc):
                        raise
                    tails = {}
            finally:
                conn.execute("COMMIT")
            for rec in recs:
                start, blob = tails.get(rec["descriptor_uid"], (None, None))
                rec["tail_start"], rec["tail"] = start, blob
            return recs

        return await self._run("read event_stream", read)

    async def ingest_log(self, run_start: str) -> list[Doc]:
        recs = await self._records("ingest_log", _INGEST_COLUMNS, "extra", run_start,
                                   "topic, partition")
        for rec in recs:
            rec["sessions"] = rec["extra"].pop(SESSIONS, {})
        return recs

    async def _records(self, table: str, columns: Sequence[str], json_column: str,
                       run_start: str, order: str) -> list[Doc]:
        return await self._run(f"read {table}", lambda c: self._records_sync(
            c, table, columns, json_column, run_start, order))

    def _records_sync(self, conn: sqlite3.Connection, table: str, columns: Sequence[str],
                      json_column: str, run_start: str, order: str) -> list[Doc]:
        """Rows of one of our own tables for a run, one JSON-encoded column decoded."""
        sql = (f"SELECT {', '.join(columns)} FROM {table} WHERE tenant = ? "
               f"AND run_start = ? ORDER BY {order}")
        out = []
        for row in conn.execute(sql, (self.tenant, run_start)):
            rec = dict(zip(columns, row, strict=True))
            rec[json_column] = json.loads(rec[json_column])
            out.append(rec)
        return out

    async def search(self, query: Query | None, *, skip: int = 0,
                     limit: int | None = None) -> list[Doc]:
        return [_load(v) for v in await self._search("doc", query, skip, limit)]

    async def search_uids(self, query: Query | None, *, skip: int = 0,
                          limit: int | None = None) -> list[str]:
        # time and uid only: answered from the run_start_time index, no JSON decoded
        return [str(v) for v in await self._search("uid", query, skip, limit)]

    async def _search(self, column: str, query: Query | None, skip: int,
                      limit: int | None) -> list[Any]:
        """One column of the runs matching ``query``, newest first, in a window."""
        _check_window(skip, limit)
        where, params = to_sql(await self.resolve(query))
        window = (-1 if limit is None else limit, skip)

        def search(conn: sqlite3.Connection) -> list[Any]:
            hide, hide_args = self._visible(conn)
            sql = (f"SELECT {column} FROM run_start WHERE tenant = ? AND ({where}){hide} "
                   "ORDER BY time DESC, uid ASC LIMIT ? OFFSET ?")
            args = (self.tenant, *params, *hide_args, *window)
            return [r[0] for r in conn.execute(sql, args)]

        return await self._run("search runs", search)

    async def count(self, query: Query | None) -> int:
        where, params = to_sql(await self.resolve(query))

        def count(conn: sqlite3.Connection) -> int:
            hide, hide_args = self._visible(conn)
            sql = f"SELECT count(*) FROM run_start WHERE tenant = ? AND ({where}){hide}"
            return int(conn.execute(sql, (self.tenant, *params, *hide_args)).fetchone()[0])

        return await self._run("count runs", count)

    async def stopped_runs(self, query: Query) -> list[str]:
        check_stop_query(query)
        where, params = to_sql(query)
        # The stop rows under the column names the translator reads; a stop holding NaN
        # (not JSON to SQLite < 3.42) is read with NaN as null, as start documents are.
        sql = ("SELECT run_start FROM (SELECT run_start, time, uid, uid AS doc_key, "
               "NULL AS scan_id, '' AS search_text, CASE WHEN json_valid(doc) THEN doc "
               "ELSE bs_strict_json(doc) END AS query_doc FROM run_stop WHERE tenant = ?) "
               f"WHERE {where}")

        def select(conn: sqlite3.Connection) -> list[str]:
            return [str(r[0]) for r in conn.execute(sql, (self.tenant, *params))]

        return await self._run("search stop documents", select)

    async def uids_with_prefix(self, prefix: str, query: Query | None = None,
                               limit: int = 10) -> list[str]:
        _check_window(0, limit)
        where, params = to_sql(await self.resolve(query))
        prefix_sql, prefix_args = uid_prefix(prefix)

        def look_up(conn: sqlite3.Connection) -> list[str]:
            hide, hide_args = self._visible(conn)
            sql = (f"SELECT uid FROM run_start WHERE tenant = ? AND ({prefix_sql}) "
                   f"AND ({where}){hide} ORDER BY time DESC, uid ASC LIMIT ?")
            args = (self.tenant, *prefix_args, *params, *hide_args, limit)
            return [str(r[0]) for r in conn.execute(sql, args)]

        return await self._run("look up uids", look_up)

    # -- integrity and completeness -------------------------------------------------------

    async def links(self, kind: str, run_starts: Sequence[str] | None = None) -> list[Doc]:
        if kind == "event_stream":
            columns = ", ".join(f"s.{c}" for c in _STREAM_COLUMNS)
            sql = (f"SELECT {columns}, t.start FROM event_stream s LEFT JOIN event_tail t "
                   "ON t.tenant = s.tenant AND t.descriptor_uid = s.descriptor_uid "
                   "WHERE s.tenant = ?")
            # A read-only file written before tails existed has no event_tail table
            # (writers always create it): its records have no tail to start.
            untailed: str | None = (f"SELECT {columns}, NULL FROM event_stream s "
                                    "WHERE s.tenant = ?")
            run_column = "s.run_start"
        else:
            sql = f"SELECT doc_key, uid, run_start FROM {_kind(kind)} WHERE tenant = ?"
            untailed, run_column = None, "run_start"

        def select(conn: sqlite3.Connection, query: str) -> list[Any]:
            if run_starts is None:
                return conn.execute(query, (self.tenant,)).fetchall()
            rows = []
            for chunk in _chunks(list(dict.fromkeys(run_starts))):
                part = f"{query} AND {run_column} IN ({_marks(len(chunk))})"
                rows += conn.execute(part, (self.tenant, *chunk)).fetchall()
            return rows

        def read(conn: sqlite3.Connection) -> list[Doc]:
            try:
                rows = select(conn, sql)
            except sqlite3.OperationalError as exc:
                if untailed is None or "no such table: event_tail" not in str(exc):
                    raise
                rows = select(conn, untailed)
            if kind != "event_stream":
                out = [{"key": k, "uid": u, "run_start": r} for k, u, r in rows]
                return sorted(out, key=lambda d: (d["run_start"] or "", d["key"]))
            recs = []
            for row in rows:
                rec = dict(zip(_STREAM_COLUMNS, row[:-1], strict=True))
                rec["data_keys"] = json.loads(rec["data_keys"])
                rec["tail_start"], rec["tail"] = row[-1], None
                recs.append(rec)
            return sorted(recs, key=lambda d: (d["run_start"], d["descriptor_uid"]))

        return await self._run(f"list {kind} links", read)


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                        (name,)).fetchone() is not None


def _tenant_known(conn: sqlite3.Connection, tenant: str) -> bool:
    """One indexed lookup (listing every tenant scans run_start)."""
    for table in ("tenant", "run_start"):
        if _has_table(conn, table) and conn.execute(
                f"SELECT 1 FROM {table} WHERE tenant = ? LIMIT 1", (tenant,)).fetchone():
            return True
    return False


def tenants_at(uri: str) -> list[str]:
    """The tenants of the SQLite file at ``uri``, read without opening a store (none if
    the file does not exist yet). Blocking."""
    path = sqlite_path(uri)
    if path == ":memory:" or not Path(path).exists():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return sorted(_tenants(conn))
    finally:
        conn.close()


def _tenants(conn: sqlite3.Connection) -> list[str]:
    """Tenants a writer has opened, and (for files written before that was recorded)
    tenants with runs."""
    found: set[str] = set()
    if _has_table(conn, "tenant"):
        found.update(str(r[0]) for r in conn.execute("SELECT tenant FROM tenant"))
    if _has_table(conn, "run_start"):
        found.update(str(r[0]) for r in conn.execute("SELECT DISTINCT tenant FROM run_start"))
    return sorted(found)


def _load(text: str) -> Doc:
    doc = json.loads(text)
    if not isinstance(doc, dict):
        raise StorageError("a stored document is not a JSON object")
    return doc


def _find_where(kind: str, run_start: str | None, resource: str | None) -> tuple[str, list[Any]]:
    where, params = "", []
    if run_start is not None:
        where, params = "AND run_start = ?", [run_start]
    if resource is not None:
        if kind not in _PARENT_FIELD:
            raise ValueError(f"find(resource=...) applies to datum and stream_datum, not {kind}")
        where, params = f"{where} AND parent = ?", [*params, resource]
    return where, params


def _check_window(skip: int, limit: int | None) -> None:
    if skip < 0 or (limit is not None and limit < 0):
        raise ValueError(f"skip and limit must not be negative (skip={skip}, limit={limit})")
