"""The incumbent: bluesky-kafka's ``MongoConsumer`` writing through suitcase-mongo's
``mongo_normalized.Serializer`` (one ``insert_one`` per event, ``insert_many`` per
event_page), and a reader of that layout.

databroker (v1 with intake, or v2 = a tiled client) does not fit this environment's pins,
so the incumbent's read is a plain PyMongo query of the ``event`` collection turned into
numpy columns - less work than databroker does, so the comparison flatters the incumbent.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import bson
import numpy as np
from bson.raw_bson import RawBSONDocument
from pymongo import MongoClient

__all__ = [
    "COLLECTIONS",
    "SUITCASE_INDEXES",
    "bulk_suitcase_database",
    "client_side_ingest",
    "client_side_seconds",
    "consume_into_mongo",
    "count_documents",
    "create_suitcase_indexes",
    "expected_counts",
    "read_events",
    "write_with_suitcase",
]

Doc = dict[str, Any]


def _base(mongo_uri: str) -> str:
    """The server part of a URI (bluesky-kafka appends ``/<db>?authSource=...``)."""
    head = mongo_uri.split("?", 1)[0].rstrip("/")
    scheme, _, rest = head.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


def _events_in(name: str, doc: Doc) -> int:
    if name == "event":
        return 1
    if name == "event_page":
        return len(doc["seq_num"])
    return 0


def consume_into_mongo(bootstrap: str, topic: str, mongo_uri: str, database: str,
                       runs: int, timeout: float = 600.0) -> tuple[int, float]:
    """Consume ``topic`` from the start with ``MongoConsumer`` until ``runs`` stop
    documents are stored. Returns (events, seconds from first to last document)."""
    from bluesky_kafka import MongoConsumer

    state = {"events": 0, "stops": 0, "t0": 0.0, "t1": 0.0}

    class Counting(MongoConsumer):  # type: ignore[misc]
        def process_document(self, topic: str, name: str, doc: Doc) -> bool:
            if not state["t0"]:
                state["t0"] = time.perf_counter()
            super().process_document(topic, name, doc)
            state["events"] += _events_in(name, doc)
            if name == "stop":
                state["stops"] += 1
                state["t1"] = time.perf_counter()
            return True

    deadline = time.monotonic() + timeout
    consumer = Counting(
        _base(mongo_uri), {topic: database},
        topics=[topic], bootstrap_servers=bootstrap, group_id=f"incumbent-{topic}",
        consumer_config={"auto.offset.reset": "earliest"}, polling_duration=0.05,
    )
    consumer.start(continue_polling=lambda: state["stops"] < runs
                   and time.monotonic() < deadline)
    if state["stops"] < runs:
        raise TimeoutError(f"incumbent stored {state['stops']} of {runs} runs in time")
    return int(state["events"]), state["t1"] - state["t0"]


def client_side_ingest(values: list[bytes]) -> tuple[int, float]:
    """The incumbent's own per-document work with an infinitely fast Mongo server:
    bluesky-kafka's deserializer (msgpack + msgpack-numpy), suitcase-mongo's
    ``sanitize_doc`` and the BSON encoding PyMongo does for ``insert_one``/``insert_many``.
    Returns (events, seconds): a ceiling on the incumbent's rate on any server."""
    import bluesky_kafka  # noqa: F401  (patches msgpack the way the incumbent runs)
    import event_model
    import msgpack

    events = 0
    started = time.perf_counter()
    for value in values:
        name, doc = msgpack.loads(value)
        doc = event_model.sanitize_doc(doc)
        if name == "event_page":
            for event in event_model.unpack_event_page(doc):
                bson.encode(event)
                events += 1
        else:
            bson.encode(doc)
            events += name == "event"
    return events, time.perf_counter() - started


def write_with_suitcase(mongo_uri: str, database: str, docs: Iterable[tuple[str, Doc]]
                        ) -> float:
    """Store documents the way the incumbent does; returns seconds taken."""
    from suitcase.mongo_normalized import Serializer

    uri = f"{_base(mongo_uri)}/{database}"
    started = time.perf_counter()
    serializer = Serializer(uri, uri)
    for name, doc in docs:
        serializer(name, doc)
    return time.perf_counter() - started


#: suitcase-mongo's ``create_indexes()`` without its text indexes (mongo-java-server
#: refuses ``$**`` text indexes): (collection, keys, unique).
SUITCASE_INDEXES: tuple[tuple[str, list[tuple[str, int]], bool], ...] = (
    ("run_start", [("uid", 1)], True), ("run_start", [("scan_id", 1)], False),
    ("run_start", [("scan_id", -1), ("_id", -1)], True),
    ("run_start", [("time", 1), ("_id", -1)], True),
    ("run_start", [("time", -1), ("_id", -1)], True),
    ("run_start", [("time", -1), ("scan_id", -1)], False),
    ("run_stop", [("run_start", 1)], True), ("run_stop", [("uid", 1)], True),
    ("run_stop", [("time", -1)], False),
    ("event_descriptor", [("uid", 1)], True),
    ("event_descriptor", [("run_start", -1), ("time", -1)], False),
    ("event_descriptor", [("time", -1)], False),
    ("event", [("uid", 1)], True), ("event", [("descriptor", -1), ("time", 1)], False),
    ("resource", [("uid", 1)], False), ("resource", [("resource_id", 1)], False),
    ("datum", [("datum_id", 1)], True), ("datum", [("resource", 1)], False),
)
_KIND_COLLECTIONS = {"start": "run_start", "descriptor": "event_descriptor", "event": "event",
                     "stop": "run_stop", "resource": "resource", "datum": "datum"}


def create_suitcase_indexes(mongo_uri: str, database: str) -> None:
    """:data:`SUITCASE_INDEXES` in ``database`` (bluesky-kafka's MongoConsumer creates
    none: a database it fills from scratch has only ``_id``)."""
    client: MongoClient[Doc] = MongoClient(_base(mongo_uri))
    try:
        db = client[database]
        for collection, keys, unique in SUITCASE_INDEXES:
            db[collection].create_index(keys, unique=unique)
    finally:
        client.close()


def bulk_suitcase_database(mongo_uri: str, database: str, docs: Iterable[tuple[str, Doc]],
                           batch: int = 5_000) -> float:
    """A suitcase-mongo database as its Serializer lays it out (one document per event,
    ``sanitize_doc``-ed, its indexes but the text ones), written with ``insert_many`` so
    that a source of 100,000 runs takes minutes, not the Serializer's ~4 min per 100,000
    documents. Returns seconds taken."""
    import event_model

    started = time.perf_counter()
    create_suitcase_indexes(mongo_uri, database)
    client: MongoClient[Doc] = MongoClient(_base(mongo_uri))
    try:
        db = client[database]
        pending: dict[str, list[Doc]] = {c: [] for c in _KIND_COLLECTIONS.values()}
        for name, doc in docs:
            if name == "event_page":
                raise ValueError("bulk_suitcase_database takes events, not pages")
            out = pending[_KIND_COLLECTIONS[name]]
            out.append(event_model.sanitize_doc(doc))
            if len(out) >= batch:
                db[_KIND_COLLECTIONS[name]].insert_many(out, ordered=False)
                out.clear()
        for collection, out in pending.items():
            if out:
                db[collection].insert_many(out, ordered=False)
    finally:
        client.close()
    return time.perf_counter() - started


#: suitcase-mongo's collections, in the order a run fills them.
COLLECTIONS = ("run_start", "event_descriptor", "event", "run_stop")


def count_documents(mongo_uri: str, database: str) -> dict[str, int]:
    """Documents the incumbent stored, per collection of :data:`COLLECTIONS`: what it
    really wrote, as opposed to what its consumer callback saw (bluesky-kafka's polling
    loop logs and swallows a document whose write raised)."""
    client: MongoClient[Doc] = MongoClient(_base(mongo_uri))
    try:
        db = client[database]
        return {name: int(db[name].count_documents({})) for name in COLLECTIONS}
    finally:
        client.close()


def expected_counts(runs: int, events: int) -> dict[str, int]:
    """What :func:`count_documents` should find after ``runs`` runs of one descriptor
    each, ``events`` events in all."""
    return {"run_start": runs, "event_descriptor": runs, "event": events, "run_stop": runs}


def _fetch(mongo_uri: str, database: str, descriptor_uid: str, batch_size: int,
           raw: bool) -> list[Any]:
    kwargs: dict[str, Any] = {"document_class": RawBSONDocument} if raw else {}
    client: MongoClient[Any] = MongoClient(_base(mongo_uri), **kwargs)
    try:
        cursor = client[database]["event"].find({"descriptor": descriptor_uid},
                                                {"_id": 0, "timestamps": 0, "filled": 0}
                                                ).sort("seq_num", 1)
        if batch_size:
            cursor = cursor.batch_size(batch_size)
        return list(cursor)
    finally:
        client.close()


def _columns(docs: list[Doc], dtypes: dict[str, str] | None) -> dict[str, np.ndarray]:
    if not docs:
        return {}
    out = {"time": np.array([d["time"] for d in docs], dtype=np.float64),
           "seq_num": np.array([d["seq_num"] for d in docs], dtype=np.int64),
           "uid": np.array([d["uid"] for d in docs])}
    for key in docs[0]["data"]:
        dtype = (dtypes or {}).get(key)
        out[f"data/{key}"] = np.array([d["data"][key] for d in docs], dtype=dtype)
    return out


def read_events(mongo_uri: str, database: str, descriptor_uid: str,
                dtypes: dict[str, str] | None = None, batch_size: int = 0
                ) -> dict[str, np.ndarray]:
    """All events of a descriptor in seq_num order, as numpy columns: what a
    databroker-v1 ``get_table`` amounts to, without pandas. Like bluestream's ``read()``
    it returns data, time, seq_num and uid (timestamps are not fetched). ``batch_size``
    keeps replies under the wire limit where the server would not (mongo-java-server
    answers with one reply as large as the result; mongod caps replies at 16 MB)."""
    return _columns(_fetch(mongo_uri, database, descriptor_uid, batch_size, raw=False),
                    dtypes)


def client_side_seconds(mongo_uri: str, database: str, descriptor_uid: str,
                        dtypes: dict[str, str] | None = None, batch_size: int = 0) -> float:
    """The incumbent's read with an infinitely fast server: only the client's work
    (BSON decoding of the same replies + building the columns) is timed. The Mongo
    server used here (mongo-java-server on H2) is much slower than mongod, so this bounds
    what the incumbent could do on the best server."""
    raw = _fetch(mongo_uri, database, descriptor_uid, batch_size, raw=True)
    started = time.perf_counter()
    _columns([bson.decode(d.raw) for d in raw], dtypes)
    return time.perf_counter() - started
