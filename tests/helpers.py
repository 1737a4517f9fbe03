"""Test helpers: document factories, a collecting dead-letter sink, direct Zarr readback.

Readback here deliberately does not use the catalog, so ingestion tests check storage
independently of the read API.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import event_model
import numpy as np
import zarr

from bluestream.consumers.decode import encode_message
from bluestream.consumers.envelope import Envelope
from bluestream.consumers.pipeline import Ingestor
from bluestream.errors import DocumentError
from bluestream.layout import descriptor_path
from bluestream.limits import Limits
from bluestream.storage.backends import open_metadata_store
from bluestream.storage.registry import StoreRegistry
from bluestream.storage.tail import DEFAULT_BLOCK, Tail
from bluestream.storage.zarr_root import ZarrRoot
from bluestream.storage.zarr_store import ZarrEventStore

Doc = dict[str, Any]


@dataclass
class CollectingSink:
    """A dead-letter sink that keeps what it was sent (for file/in-process tests)."""

    letters: list[tuple[Envelope, DocumentError]] = field(default_factory=list)

    async def send(self, env: Envelope, error: DocumentError) -> None:
        self.letters.append((env, error))

    async def flush(self) -> None:
        return None

    @property
    def reasons(self) -> list[str]:
        return [e.reason for _, e in self.letters]


def scalar_run(n_events: int, *, fields: int = 3, scan_id: int = 1, uid: str | None = None,
               t0: float | None = None, stream: str = "primary",
               extra_md: dict[str, Any] | None = None) -> list[tuple[str, Doc]]:
    """A run of ``n_events`` events with ``fields`` float fields plus an int counter."""
    t0 = time.time() if t0 is None else t0
    md = {"scan_id": scan_id, "plan_name": "count", **(extra_md or {})}
    bundle = event_model.compose_run(uid=uid, time=t0, metadata=md)
    keys = {f"f{i}": {"dtype": "number", "shape": [], "source": f"sim:f{i}", "units": "mm"}
            for i in range(fields)}
    keys["counter"] = {"dtype": "integer", "shape": [], "source": "sim:counter"}
    desc = bundle.compose_descriptor(name=stream, data_keys=keys, time=t0)
    docs: list[tuple[str, Doc]] = [("start", bundle.start_doc),
                                   ("descriptor", desc.descriptor_doc)]
    for i in range(1, n_events + 1):
        data: dict[str, Any] = {f"f{k}": float(i * 10 + k) for k in range(fields)}
        data["counter"] = i
        docs.append(("event", desc.compose_event(
            data=data, timestamps={k: t0 + i for k in data}, seq_num=i, time=t0 + i)))
    docs.append(("stop", bundle.compose_stop(time=t0 + n_events + 1)))
    return docs


def page_run(n_events: int, page_events: int, *, fields: int = 3, scan_id: int = 1
             ) -> list[tuple[str, Doc]]:
    """:func:`scalar_run`'s events packed into event pages of ``page_events``."""
    docs = scalar_run(n_events, fields=fields, scan_id=scan_id)
    events = [doc for name, doc in docs if name == "event"]
    pages = [("event_page", event_model.pack_event_page(*events[i:i + page_events]))
             for i in range(0, len(events), page_events)]
    return [*docs[:2], *pages, docs[-1]]


def image_run(n_events: int, shape: tuple[int, int] = (16, 16), *, scan_id: int = 1,
              t0: float | None = None) -> list[tuple[str, Doc]]:
    t0 = time.time() if t0 is None else t0
    bundle = event_model.compose_run(time=t0, metadata={"scan_id": scan_id,
                                                        "plan_name": "count"})
    keys = {"img": {"dtype": "array", "shape": list(shape), "source": "sim:img",
                    "dtype_numpy": "<u2"}}
    desc = bundle.compose_descriptor(name="primary", data_keys=keys, time=t0)
    docs: list[tuple[str, Doc]] = [("start", bundle.start_doc),
                                   ("descriptor", desc.descriptor_doc)]
    rng = np.random.default_rng(n_events)
    for i in range(1, n_events + 1):
        img = rng.integers(0, 65535, size=shape, dtype=np.uint16)
        docs.append(("event", desc.compose_event(data={"img": img}, timestamps={"img": t0 + i},
                                                 seq_num=i, time=t0 + i)))
    docs.append(("stop", bundle.compose_stop(time=t0 + n_events + 1)))
    return docs


def envelopes(docs: Iterable[tuple[str, Doc]], tenant: str, *, topic: str = "file:test",
              start_offset: int = 0) -> list[Envelope]:
    return [Envelope(topic, 0, start_offset + i, encode_message(name, doc), tenant=tenant)
            for i, (name, doc) in enumerate(docs)]


def make_ingestor(metadata_uri: str, zarr_root: Path | ZarrRoot, *, limits: Limits | None = None,
                  park_max_age_s: float = 60.0, tail_rows: int = DEFAULT_BLOCK
                  ) -> tuple[Ingestor, CollectingSink, StoreRegistry]:
    sink = CollectingSink()
    registry = StoreRegistry(metadata_uri)
    ing = Ingestor(store_for=registry, arrays=ZarrEventStore(zarr_root, tail_rows=tail_rows),
                   dlq=sink,
                   limits=limits or Limits(), park_max_age_s=park_max_age_s)
    return ing, sink, registry


def stored_tail(metadata_uri: str, tenant: str, descriptor_uid: str) -> Tail | None:
    """The descriptor's tail (its newest rows, kept in the metadata store), read
    straight from the store (synchronously: callable from async tests too)."""
    if metadata_uri.startswith("sqlite:///"):
        import sqlite3

        from bluestream.storage.sqlite import sqlite_path

        con = sqlite3.connect(f"file:{sqlite_path(metadata_uri)}?mode=ro", uri=True)
        try:
            row = con.execute("SELECT rows FROM event_tail WHERE tenant = ? AND "
                              "descriptor_uid = ?", (tenant, descriptor_uid)).fetchone()
        finally:
            con.close()
        return None if row is None else Tail.decode(bytes(row[0]))
    from pymongo import MongoClient

    client: MongoClient[dict[str, Any]] = MongoClient(metadata_uri)
    try:
        rec = client[tenant]["event_stream"].find_one({"descriptor_uid": descriptor_uid})
    finally:
        client.close()
    return None if rec is None or "tail" not in rec else Tail.decode(bytes(rec["tail"]))


def read_stream_arrays(zarr_root: Path | ZarrRoot, tenant: str, run_uid: str, descriptor_uid: str,
                       metadata_uri: str, *, record: dict[str, Any] | None = None
                       ) -> dict[str, np.ndarray]:
    """Every column of one descriptor up to the last row written, read straight from
    storage: the Zarr group (arrays grow by whole chunks: rows past the last hold
    seq_num 0), with the rows of the stream's tail over it (from ``record``, a MongoDB
    ``event_stream`` document, when given; else read from the store)."""
    out: dict[str, np.ndarray] = {}
    try:
        group = zarr.open_group(ZarrRoot.parse(zarr_root).open_store(read_only=True),
                                path=descriptor_path(tenant, run_uid, descriptor_uid),
                                mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        group = None
    if group is not None:
        for name in ("time", "seq_num", "uid"):
            out[name] = np.asarray(group[name][:])  # type: ignore[index]
        for sub in ("data", "timestamps", "filled"):
            if sub in group:
                for key in group[sub].array_keys():  # type: ignore[union-attr]
                    out[f"{sub}/{key}"] = np.asarray(
                        group[f"{sub}/{key}"][:])  # type: ignore[index]
    if record is not None:
        tail = Tail.decode(bytes(record["tail"])) if record.get("tail") else None
    else:
        tail = stored_tail(metadata_uri, tenant, descriptor_uid)
    assert group is not None or tail is not None, "no rows stored for " + descriptor_uid
    if tail is not None:
        end = tail.start + len(tail)
        written = tail.columns["seq_num"] > 0
        for name, col in tail.columns.items():
            base = out.get(name)
            full = np.zeros((max(end, 0 if base is None else len(base)), *col.shape[1:]),
                            dtype=col.dtype) if col.dtype.kind != "T" else \
                np.full(max(end, 0 if base is None else len(base)), "", dtype=col.dtype)
            if base is not None:
                full[:len(base)] = base
            view = full[tail.start:end]
            view[written] = col[written]
            out[name] = full
    seq = out["seq_num"]
    last = np.flatnonzero(seq)
    n = int(last[-1]) + 1 if last.size else 0
    return {name: arr[:n] for name, arr in out.items()}


def events_by_descriptor(docs: Iterable[tuple[str, Doc]]) -> dict[str, list[Doc]]:
    """Expected events per descriptor (event_pages unpacked), later seq_num wins."""
    out: dict[str, dict[int, Doc]] = {}
    for name, doc in docs:
        evs: Iterator[Doc]
        if name == "event":
            evs = iter([doc])
        elif name == "event_page":
            evs = event_model.unpack_event_page(doc)
        else:
            continue
        for ev in evs:
            out.setdefault(ev["descriptor"], {})[ev["seq_num"]] = ev
    return {d: [evs[k] for k in sorted(evs)] for d, evs in out.items()}


def assert_stored_events(zarr_root: Path | ZarrRoot, tenant: str, docs: list[tuple[str, Doc]],
                         metadata_uri: str) -> None:
    """Every event of ``docs`` is stored at its seq_num, values bit-exact."""
    runs = {doc["uid"]: doc for name, doc in docs if name == "start"}
    desc_run = {doc["uid"]: doc["run_start"] for name, doc in docs if name == "descriptor"}
    assert runs
    for desc_uid, evs in events_by_descriptor(docs).items():
        arrays = read_stream_arrays(zarr_root, tenant, desc_run[desc_uid], desc_uid,
                                    metadata_uri)
        seq = np.array([e["seq_num"] for e in evs])
        assert arrays["seq_num"].shape[0] == seq.max()
        np.testing.assert_array_equal(arrays["seq_num"][seq - 1], seq)
        assert arrays["uid"][seq - 1].tolist() == [e["uid"] for e in evs]
        np.testing.assert_array_equal(arrays["time"][seq - 1], [e["time"] for e in evs])
        for key in evs[0]["data"]:
            expected = np.stack([np.asarray(e["data"][key]) for e in evs])
            got = arrays[f"data/{key}"][seq - 1]
            if got.dtype.kind == "T":
                assert got.tolist() == expected.tolist(), key
                continue
            assert got.dtype == expected.dtype or expected.dtype.kind in "iuf", key
            np.testing.assert_array_equal(got, expected, err_msg=key)


def new_uid() -> str:
    return str(uuid.uuid4())


async def publish_docs(bootstrap: str, topic: str, docs: Iterable[tuple[str, Doc]], *,
                       key: bytes | None = None, **producer_options: Any) -> int:
    """Publish ``docs`` to ``topic`` in order, the bluesky-kafka way (key: the run's start
    uid unless given), and wait until the broker acknowledged every one. Returns the
    number of bytes published (message values)."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", **producer_options)
    await producer.start()
    sent = 0
    run_key = key
    try:
        futures = []
        for name, doc in docs:
            if name == "start" and key is None:
                run_key = doc["uid"].encode()
            value = encode_message(name, doc)
            sent += len(value)
            futures.append(await producer.send(topic, value, key=run_key))
        await producer.flush()
        for f in futures:
            await f
    finally:
        await producer.stop()
    return sent


async def stored_stop(metadata_uri: str, tenant: str, run_uid: str) -> bool:
    """Whether the stop of ``run_uid`` is stored for ``tenant``. Opens the store read-only,
    so asking never creates the tenant (False while it does not exist)."""
    from bluestream.errors import NotFound, StorageUnavailable
    from bluestream.storage.backends import open_metadata_store

    store = open_metadata_store(metadata_uri, tenant, readonly=True)
    try:
        await store.open()
        return await store.get("stop", run_uid) is not None
    except (NotFound, StorageUnavailable):
        return False
    finally:
        await store.close()  # also after a failed open: it may hold a client


def zarr_files(zarr_root: Path | ZarrRoot, prefix: str) -> dict[str, str]:
    """Key -> SHA-256 of every file (or object) under ``prefix`` of a Zarr root, keys
    relative to the root: what a replay must leave byte-identical."""
    import hashlib

    root = ZarrRoot.parse(zarr_root)
    out: dict[str, str] = {}
    if root.local is not None:
        for path in sorted((root.local / prefix).rglob("*")):
            if path.is_file():
                out[str(path.relative_to(root.local))] = hashlib.sha256(
                    path.read_bytes()).hexdigest()
        return out
    import obstore

    store = root.object_store(read_only=True).store
    for batch in obstore.list(store, prefix=prefix.rstrip("/") + "/" if prefix else None):
        for meta in batch:
            data = obstore.get(store, meta["path"]).bytes()
            out[meta["path"]] = hashlib.sha256(bytes(data)).hexdigest()
    return out


def storage_digest(metadata_uri: str, tenant: str, zarr_root: Path | ZarrRoot
                   ) -> dict[str, str]:
    """A digest of everything stored for ``tenant``, for "doing it again changes nothing".

    One entry per file under ``<zarr_root>/<tenant>`` (its path and the SHA-256 of its
    bytes) and one per metadata table (SQLite: the tenant's rows) or collection
    (MongoDB: every document but its ``_id``): the number of rows and a SHA-256 over
    all of them, sorted, so the comparison names what changed and a duplicated row
    shows even when its copy is identical. Provenance (``ingest_log``) is included: an
    identical input replayed from the same offsets must leave it unchanged too, except
    for the list of processes that wrote each run (``extra.sessions``): a replay by
    another process adds itself there, truthfully (``sessions`` of :func:`ingest_sessions`).
    The Zarr writers' lock files live outside the tenant's tree and are not data.
    """
    import hashlib
    import json
    import sqlite3

    def digest(rows: list[str]) -> str:
        rows.sort()
        return f"{len(rows)} rows, sha256 " + hashlib.sha256(
            "\n".join(rows).encode()).hexdigest()

    out = {f"zarr:{key}": digest for key, digest in zarr_files(zarr_root, tenant).items()}
    if metadata_uri.startswith("sqlite:///"):
        from bluestream.storage.sqlite import sqlite_path

        con = sqlite3.connect(f"file:{sqlite_path(metadata_uri)}?mode=ro", uri=True)
        try:
            tables = [t for (t,) in con.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name NOT LIKE 'sqlite_%' ORDER BY name")]
            for table in tables:
                columns = [c[1] for c in con.execute(f'PRAGMA table_info("{table}")')]
                if "tenant" in columns:
                    rows = con.execute(f'SELECT * FROM "{table}" WHERE tenant = ?', (tenant,))
                else:
                    rows = con.execute(f'SELECT * FROM "{table}"')
                if table == "ingest_log":
                    at = columns.index("extra")
                    rows = [(*r[:at], _without_sessions(json.loads(r[at])), *r[at + 1:])
                            for r in rows]
                out[f"sqlite:{table}"] = digest([repr(r) for r in rows])
        finally:
            con.close()
    else:
        from pymongo import MongoClient

        client: MongoClient[dict[str, Any]] = MongoClient(metadata_uri)
        try:
            db = client[tenant]
            for coll in sorted(db.list_collection_names()):
                docs = list(db[coll].find({}, {"_id": 0}))
                if coll == "ingest_log":
                    docs = [{**d, "extra": _without_sessions(d.get("extra") or {})}
                            for d in docs]
                out[f"mongo:{coll}"] = digest([json.dumps(d, sort_keys=True, default=repr)
                                               for d in docs])
        finally:
            client.close()
    return out


def _without_sessions(extra: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in extra.items() if k != "sessions"}


async def ingest_sessions(metadata_uri: str, tenant: str, run_uid: str) -> dict[str, Any]:
    """The processes recorded as writers of a run (all its ingest_log records)."""
    store = open_metadata_store(metadata_uri, tenant, readonly=True)
    await store.open()
    try:
        return {sid: s for rec in await store.ingest_log(run_uid)
                for sid, s in rec["sessions"].items()}
    finally:
        await store.close()


async def group_offsets(bootstrap: str, group: str) -> dict[tuple[str, int], int]:
    """The consumer group's committed offsets, per (topic, partition), from the broker."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {(tp.topic, tp.partition): int(om.offset) for tp, om in offsets.items()}
