"""Seeded mutation fuzzing of the ingestion path with hostile input.

A topic is open to anything that can write to it, so the pipeline promises that every
message, however broken, is stored or dead-lettered, never crashes the service, hangs
it or disappears, and that it does not disturb good runs arriving alongside. These tests
check that promise with mutants of a corpus of valid runs (scalars, event pages, images,
ragged arrays, resource/datum, datum_page, stream_resource/stream_datum): byte-level
damage to the encoded messages, and structural damage to the decoded documents that is
then encoded again, so it reaches validation, routing and the writers.

* ``test_fuzz_ingestor``: ``BLUESTREAM_FUZZ_MESSAGES`` mutants (default 100,000) through
  a real :class:`Ingestor` on SQLite + Zarr, in random batches, with a fake clock so
  parked documents expire during and after the run.
* ``test_fuzz_daemon_on_kafka``: ``BLUESTREAM_FUZZ_KAFKA_MESSAGES`` mutants (default
  2,000) through the real daemon and broker, accounted for from the source offsets, the
  consumer group's committed offset and the ``source-offset`` headers in ``<topic>.dlq``.

Both interleave the mutants with valid runs and read those back through the catalog.
``BLUESTREAM_FUZZ_SEED`` changes the seed; ``make fuzz`` runs the long mode. A failure
names each offending message with its mutation and its bytes (base64): enough to replay it.

Mutants that would hit a known, unfixed bug are redrawn (and counted in the summary line).
The eleven bugs this fuzzer found are fixed; each has a regression test at the end of
this module, reduced to its smallest case (they failed before their fix).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import pickle
import random
import re
import sys
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import anyio
import event_model
import msgpack
import numpy as np
import pytest
import zarr
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

import bluestream
from bluestream.consumers.decode import decode_message, encode_message
from bluestream.consumers.envelope import Envelope
from bluestream.consumers.pipeline import Ingestor
from bluestream.consumers.run_index import DescriptorInfo
from bluestream.daemon.dlq_tool import DeadLetter, read_dead_letters
from bluestream.daemon.service import Daemon
from bluestream.documents import DOCUMENT_NAMES
from bluestream.errors import DocumentError
from bluestream.layout import Page, descriptor_path
from bluestream.limits import Limits
from bluestream.schemas.normalise import datum_page_to_datums, to_jsonable
from bluestream.schemas.validate import validate
from bluestream.storage.backends import open_metadata_store
from bluestream.storage.base import MetadataStore, StreamUpdate, key_of
from bluestream.storage.registry import StoreRegistry
from bluestream.storage.rules import same_content
from bluestream.storage.tail import Tail
from bluestream.storage.zarr_store import ZarrEventStore
from bluestream.tools.rejects import drain_parked
from helpers import image_run, make_ingestor, scalar_run
from test_catalog_support import canonical, mixed_run, multi_descriptor_run, npy_seq_run, plain
from test_ingest_kafka import settings_for, wait_for
from test_ingest_properties import repackage

Doc = dict[str, Any]
Docs = list[tuple[str, Doc]]

SEED = int(os.environ.get("BLUESTREAM_FUZZ_SEED", "20240611"))
N_MESSAGES = int(os.environ.get("BLUESTREAM_FUZZ_MESSAGES", "100000"))
N_KAFKA_MESSAGES = int(os.environ.get("BLUESTREAM_FUZZ_KAFKA_MESSAGES", "2000"))

#: Production limits except where a smaller one makes its check cheap to reach.
LIMITS = Limits(max_message_bytes=512 * 1024, max_page_events=1_000, max_data_keys=200)
PARK_AGE_S = 30.0
T0 = 1_700_000_000.0


# -- the corpus: valid runs of every kind ----------------------------------------------------
def build_corpus(rng: random.Random, directory: Path, t0: float) -> list[Docs]:
    """One run of each kind, with uids drawn from ``rng`` (event-model uses uuid4)."""
    def uid4() -> uuid.UUID:
        return uuid.UUID(int=rng.getrandbits(128), version=4)

    with mock.patch.object(uuid, "uuid4", uid4):
        runs = [
            scalar_run(12, t0=t0, scan_id=1),
            repackage(scalar_run(12, fields=2, t0=t0 + 100, scan_id=2), [6, 10]),
            image_run(4, (8, 8), t0=t0 + 200, scan_id=3),
            mixed_run(t0 + 300),
            multi_descriptor_run(t0 + 400),
            npy_seq_run(directory / "npy", n=3, t0=t0 + 500),
            with_datum_page(npy_seq_run(directory / "npy-pages", n=3, t0=t0 + 600,
                                        pages=True)),
            stream_run(t0 + 700),
        ]
    for run in runs:  # the same bytes wherever the test runs (the files are never read)
        for name, doc in run:
            if name == "resource":
                doc["root"] = f"/fuzz/{directory.name}"
    return runs


def with_datum_page(docs: Docs) -> Docs:
    """The datums of a run as one datum_page, where the first datum was."""
    datums = [d for n, d in docs if n == "datum"]
    first = next(i for i, (n, _) in enumerate(docs) if n == "datum")
    rest = [(n, d) for n, d in docs if n != "datum"]
    return [*rest[:first], ("datum_page", event_model.pack_datum_page(*datums)),
            *rest[first:]]


def stream_run(t0: float) -> Docs:
    """ophyd-async style: frames referenced by stream_datum index ranges, no events."""
    bundle = event_model.compose_run(time=t0, metadata={"scan_id": 8, "plan_name": "fly"})
    desc = bundle.compose_descriptor(
        name="primary", time=t0,
        data_keys={"cam": {"dtype": "array", "shape": [8, 8], "source": "PV:cam",
                           "external": "STREAM:", "dtype_numpy": "<u2"}})
    sres = bundle.compose_stream_resource(
        mimetype="application/x-hdf5", uri="file://localhost/nonexistent/fly.h5",
        data_key="cam", parameters={"dataset": "/entry/data/data"})
    docs: Docs = [("start", bundle.start_doc), ("descriptor", desc.descriptor_doc),
                  ("stream_resource", sres.stream_resource_doc)]
    for i in range(3):
        docs.append(("stream_datum", sres.compose_stream_datum(
            indices={"start": 2 * i, "stop": 2 * i + 2},
            seq_nums={"start": 2 * i + 1, "stop": 2 * i + 3}, descriptor=desc.descriptor_doc)))
    docs.append(("stop", bundle.compose_stop(time=t0 + 10)))
    return docs


# -- hostile values --------------------------------------------------------------------------
TRIPWIRE: list[str] = []


def _tripped(what: str) -> None:
    TRIPWIRE.append(what)


class _Canary:
    """Pickled into object arrays: unpickling it anywhere records that it happened."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return _tripped, ("a pickled msgpack-numpy array was unpickled",)


NAN, INF = math.nan, math.inf
HOSTILE_KEYS = ["", " ", "..", "../../etc/passwd", "a/b", "a\\b", "a.b", "$where", "\x00",
                "x" * 500, "\u03c0", "time", "uid", "__class__", "data/../x", "C:\\x"]
BAD_SHAPES: list[Any] = [[10**9, 10**9], [-1], [0], [2**62, 0], [2**63 - 1], ["a"],
                         [None, None], [1] * 40, [], [1.5], "8x8", None, [[8]], [True]]
BAD_DTYPES: list[Any] = ["<u2", "|O", "O", "bogus", "<M8[s]", "V8", [["a", "<i4"]], "",
                         ">f8", "<c16", "<U4", "|b1", None, 3]
BAD_SEQ_NUMS: list[Any] = [0, -1, -2**63, 2**31, 2**63 - 1, 2**64 - 1, LIMITS.max_seq_num,
                           LIMITS.max_seq_num + 1, 10**12, 1.5, True, "1", None, NAN]
BAD_TIMES: list[Any] = [NAN, INF, -INF, -1e308, 1e308, "now", None, 2**63, -1, True,
                        np.float64(NAN), [1.0]]


def hostile_ndarray(rng: random.Random) -> dict[bytes, Any]:
    """A msgpack-numpy value that must be refused, or decoded without trusting it."""
    obj: dict[bytes, Any] = {b"nd": True, b"type": "<u2", b"kind": b"", b"shape": [2, 2],
                             b"data": bytes(8)}
    variants: list[dict[bytes, Any]] = [
        {b"type": "|O", b"kind": b"O", b"shape": [1], b"data": pickle.dumps(_Canary())},
        {b"type": "|O", b"data": pickle.dumps(_Canary())},
        {b"type": [["a", "|O"]], b"kind": b"V", b"data": pickle.dumps(_Canary())},
        {b"shape": [2**40, 2**40]}, {b"shape": [-1]}, {b"shape": [3, 3]}, {b"shape": [0]},
        {b"shape": [2**62, 0]}, {b"shape": "22"}, {b"shape": None}, {b"shape": [1] * 64},
        {b"type": "bogus"}, {b"type": 7}, {b"type": [["a", "<i2"]], b"kind": b"V"},
        {b"type": "<M8[s]", b"shape": [1]}, {b"type": "<U1", b"shape": [2]},
        {b"type": "|V0"}, {b"type": "|S0"}, {b"data": None}, {b"data": "text"},
        {b"nd": False, b"data": b"\x01"}, {b"nd": False, b"type": "<f8"},
        {b"nd": "yes"}, {b"kind": b"O"},
    ]
    obj.update(rng.choice(variants))
    if rng.random() < 0.1:
        del obj[rng.choice(list(obj))]
    return obj


def hostile_value(rng: random.Random) -> Any:
    pool: list[Callable[[], Any]] = [
        lambda: None, lambda: True, lambda: 0, lambda: -1, lambda: 2**63 - 1,
        lambda: -2**63, lambda: 2**64 - 1, lambda: 0.5, lambda: -0.0, lambda: NAN,
        lambda: INF, lambda: -INF, lambda: 1e308, lambda: "", lambda: "\x00",
        lambda: "x" * rng.choice([10, 70_000]), lambda: "../../etc/passwd",
        lambda: "\u00fcn\u00efc\u00f8de", lambda: b"\xff\x00", lambda: [], lambda: [None],
        lambda: [[1, 2], [3]], lambda: {}, lambda: {"a": {"b": []}}, lambda: {"": 0},
        lambda: {1: "int key"}, lambda: np.float32(NAN), lambda: np.int64(-1),
        lambda: np.uint64(2**64 - 1), lambda: np.array([], "<f8"),
        lambda: np.zeros((2, 2), "<u2"), lambda: np.arange(6, dtype="<i8").reshape(3, 2),
        lambda: np.array(["a", "bc"]), lambda: np.array([1 + 2j]),
        lambda: np.zeros(3, "<M8[s]"), lambda: np.zeros(2, [("a", "<i4"), ("b", "<f8")]),
        lambda: np.zeros((0, 3)), lambda: np.float16(1.5), lambda: complex(1, 2),
        lambda: msgpack.Timestamp(0, 5), lambda: msgpack.ExtType(5, b"xx"),
        lambda: hostile_ndarray(rng), lambda: nested(rng.choice([20, 200]), rng),
    ]
    return rng.choice(pool)()


def nested(depth: int, rng: random.Random) -> Any:
    value: Any = rng.choice([1, None, "x", []])
    for _ in range(depth):
        value = [value] if rng.random() < 0.5 else {"k": value}
    return value


def fresh_uid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


# -- structural mutations: on the decoded (name, doc), then encoded again -------------------
Op = Callable[[random.Random, str, Doc, Doc], tuple[Any, Any]]
STRUCTURAL: dict[str, Op] = {}


def structural(fn: Op) -> Op:
    STRUCTURAL[fn.__name__[2:].replace("_", "-")] = fn
    return fn


def _slots(obj: Any, depth: int = 0, out: list[tuple[Any, Any]] | None = None
           ) -> list[tuple[Any, Any]]:
    """``(container, key)`` of every value down to depth 4: where a mutation can land."""
    out = [] if out is None else out
    if depth > 4:
        return out
    items: Any = obj.items() if isinstance(obj, dict) else (
        enumerate(obj) if isinstance(obj, list) else ())
    for k, v in list(items):
        out.append((obj, k))
        if isinstance(v, dict | list):
            _slots(v, depth + 1, out)
    return out


def _columns(doc: Doc) -> list[list[Any]]:
    """The list-valued columns of a page (top level and one level down)."""
    cols = [v for v in doc.values() if isinstance(v, list)]
    for v in doc.values():
        if isinstance(v, dict):
            cols += [c for c in v.values() if isinstance(c, list)]
    return cols


@structural
def m_wrong_type(rng: random.Random, name: str, doc: Doc, other: Doc) -> tuple[Any, Any]:
    container, key = rng.choice(_slots(doc) or [(doc, "uid")])
    container[key] = hostile_value(rng)
    return name, doc


@structural
def m_delete_field(rng: random.Random, name: str, doc: Doc, other: Doc) -> tuple[Any, Any]:
    slots = _slots(doc)
    if slots:
        container, key = rng.choice(slots)
        del container[key]
    return name, doc


@structural
def m_unknown_key(rng: random.Random, name: str, doc: Doc, other: Doc) -> tuple[Any, Any]:
    dicts = [doc] + [c[k] for c, k in _slots(doc) if isinstance(c[k], dict)]
    rng.choice(dicts)[rng.choice(HOSTILE_KEYS)] = hostile_value(rng)
    return name, doc


@structural
def m_bad_time(rng: random.Random, name: str, doc: Doc, other: Doc) -> tuple[Any, Any]:
    bad = rng.choice(BAD_TIMES)
    times = doc.get("time")
    if isinstance(times, list) and times:
        times[rng.randrange(len(times))] = bad
    elif rng.random() < 0.3 and isinstance(doc.get("timestamps"), dict) and doc["timestamps"]:
        doc["timestamps"][rng.choice(list(doc["timestamps"]))] = bad
    else:
        doc["time"] = bad
    return name, doc


@structural
def m_bad_seq_num(rng: random.Random, name: str, doc: Doc, other: Doc) -> tuple[Any, Any]:
    bad = rng.choice(BAD_SEQ_NUMS)
    seq = doc.get("seq_num")
    if isinstance(seq, list) and seq:
        seq[rng.randrange(len(seq))] = bad
    elif name == "stream_datum":
        doc["seq_nums"] = {"start": bad, "stop": rng.choice(BAD_SEQ_NUMS)}
    else:
        doc["seq_num"] = bad
    return name, doc


@structural
def m_bad_shape(rng: random.Random, name: str, doc: Doc, other: Doc) -> tuple[Any, Any]:
    keys = doc.get("data_keys")
    if isinstance(keys, dict) and keys:
        entry = keys[rng.choice(list(keys))]
        if not isinstance(entry, dict):
            return m_wrong_type(rng, name, doc, other)
        field_ = rng.choice(["shape", "shape", "dtype_numpy", "dtype", "external"])
        entry[field_] = rng.choice({"shape": BAD_SHAPES, "dtype_numpy": BAD_DTYPES,
                                    "dtype": ["array", "number", "string", "integer",
                                              "boolean", "object", "bogus"],
                                    "external": ["FILESTORE:", "STREAM:", "", None]}[field_])
        return name, doc
    data = doc.get("data")
    if isinstance(data, dict) and data:
        shape = tuple(rng.randrange(4) for _ in range(rng.randrange(4)))
        value: Any = np.zeros(shape, rng.choice(["<u2", "<f8", "<i8", "|b1", "<U3", ">f4"]))
        if isinstance(data[next(iter(data))], list) and rng.random() < 0.5:
            value = [value] * len(data[next(iter(data))])  # a page column of wrong rows
        data[rng.choice(list(data))] = value
        return name, doc
    return m_wrong_type(rng, name, doc, other)


@structural
def m_page_length(rng: random.Random, name: str, doc: Doc, other: Doc) -> tuple[Any, Any]:
    cols = _columns(doc)
    if not cols:
        return m_delete_field(rng, name, doc, other)
    col = rng.choice(cols)
    if col and rng.random() < 0.6:
        col.pop(rng.randrange(len(col)))
    else:
        col.append(col[0] if col else 1.0)
    return name, doc


@structural
def m_ndarray(rng: random.Random, name: str, doc: Doc, other: Doc) -> tuple[Any, Any]:
    data = doc.get("data")
    if isinstance(data, dict) and data and rng.random() < 0.7:
        data[rng.choice(list(data))] = hostile_ndarray(rng)
    else:
        container, key = rng.choice(_slots(doc) or [(doc, "uid")])
        container[key] = hostile_ndarray(rng)
    return name, doc


@structural
def m_rename(rng: random.Random, name: str, doc: Doc, other: Doc) -> tuple[Any, Any]:
    junk: list[Any] = ["bulk_events", "bulk_datum", "", "start\x00", "Start", 123, None,
                       b"start", b"\xff\xfe", ["start"], "x" * 1000]
    return rng.choice([*DOCUMENT_NAMES, *DOCUMENT_NAMES, *junk]), doc


@structural
def m_orphan(rng: random.Random, name: str, doc: Doc, other: Doc) -> tuple[Any, Any]:
    for fld in ("run_start", "descriptor", "resource", "stream_resource"):
        if fld in doc:
            doc[fld] = fresh_uid(rng) if rng.random() < 0.9 else rng.choice(HOSTILE_KEYS)
    return name, doc


@structural
def m_new_uid(rng: random.Random, name: str, doc: Doc, other: Doc) -> tuple[Any, Any]:
    """A new, valid-looking document: stored like any other."""
    for fld in ("uid", "datum_id"):
        if isinstance(doc.get(fld), list):
            doc[fld] = [fresh_uid(rng) for _ in doc[fld]]
        elif fld in doc:
            doc[fld] = fresh_uid(rng)
    return name, doc


@structural
def m_conflict(rng: random.Random, name: str, doc: Doc, other: Doc) -> tuple[Any, Any]:
    """Same key, different content: a conflict for metadata, a rewrite for events."""
    candidates = [k for k in doc if k not in ("uid", "datum_id", "run_start", "descriptor",
                                              "resource", "stream_resource")]
    if candidates:
        doc[rng.choice(candidates)] = rng.choice([1, 2.5, "changed", [], {}])
    return name, doc


@structural
def m_data_keys(rng: random.Random, name: str, doc: Doc, other: Doc) -> tuple[Any, Any]:
    for fld in ("data", "timestamps", "filled", "data_keys"):
        mapping = doc.get(fld)
        if isinstance(mapping, dict) and rng.random() < 0.5:
            if mapping and rng.random() < 0.5:
                del mapping[rng.choice(list(mapping))]
            else:
                mapping[rng.choice(["extra", *HOSTILE_KEYS])] = hostile_value(rng)
    return name, doc


@structural
def m_filled(rng: random.Random, name: str, doc: Doc, other: Doc) -> tuple[Any, Any]:
    keys = list(doc.get("data") or {}) if isinstance(doc.get("data"), dict) else []
    values: list[Any] = [False, True, "x", None, 1, [False], np.bool_(False)]
    doc["filled"] = {k: rng.choice(values) for k in (keys or ["x"]) if rng.random() < 0.7}
    return name, doc


@structural
def m_bad_key(rng: random.Random, name: str, doc: Doc, other: Doc) -> tuple[Any, Any]:
    for fld in ("data_keys", "data", "timestamps", "object_keys", "configuration"):
        mapping = doc.get(fld)
        if isinstance(mapping, dict) and mapping:
            old = rng.choice(list(mapping))
            mapping[rng.choice(HOSTILE_KEYS)] = mapping.pop(old)
            return name, doc
    return m_unknown_key(rng, name, doc, other)


@structural
def m_big(rng: random.Random, name: str, doc: Doc, other: Doc) -> tuple[Any, Any]:
    """Just over a count limit: a page of too many rows, a descriptor of too many keys."""
    if name in ("event_page", "datum_page"):
        n = LIMITS.max_page_events + 1
        for col in _columns(doc):
            col[:] = (col * n)[:n] if col else [0] * n
    elif isinstance(doc.get("data_keys"), dict) and doc["data_keys"]:
        entry = next(iter(doc["data_keys"].values()))
        for i in range(LIMITS.max_data_keys + 1):
            doc["data_keys"][f"k{i}"] = entry
    else:
        doc["md"] = {f"k{i}": i for i in range(20_000)}
    return name, doc


@structural
def m_indices(rng: random.Random, name: str, doc: Doc, other: Doc) -> tuple[Any, Any]:
    bad = [(5, 1), (-1, 2), (0, 0), (0, 2**63 - 1), (1.5, 2), ("0", "1"), (None, 1)]
    for fld in ("indices", "seq_nums"):
        if fld in doc or name == "stream_datum":
            start, stop = rng.choice(bad)
            doc[fld] = {"start": start, "stop": stop}
    if name != "stream_datum":
        return m_wrong_type(rng, name, doc, other)
    return name, doc


@structural
def m_splice_docs(rng: random.Random, name: str, doc: Doc, other: Doc) -> tuple[Any, Any]:
    """Fields of another document (often another kind) pasted over this one."""
    for k in rng.sample(list(other), k=rng.randint(1, max(1, len(other)))):
        doc[k] = other[k]
    return name, doc


@structural
def m_replay(rng: random.Random, name: str, doc: Doc, other: Doc) -> tuple[Any, Any]:
    """Unchanged: an identical replay must be accepted as already stored."""
    return name, doc


# -- byte-level mutations: on the encoded message ---------------------------------------------
ByteOp = Callable[[random.Random, bytes, bytes], bytes | None]
INTERESTING = [0x00, 0x7F, 0x80, 0xC0, 0xC1, 0xC2, 0xC3, 0xCB, 0xD9, 0xDB, 0xDC, 0xDD, 0xDE,
               0xDF, 0xC6, 0xC7, 0xD4, 0xFF, 0x90, 0x9F, 0xA0, 0xBF]
HUGE_HEADERS = [b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff",
                b"\xc6\xff\xff\xff\xff", b"\xc9\xff\xff\xff\xff\x01", b"\xdc\xff\xff",
                b"\xde\xff\xff", b"\xda\xff\xff", b"\xc5\xff\xff", b"\xd9\xff"]
LENGTH_HEADER = re.compile(rb"[\xc4-\xc6\xd9-\xdb\xdc-\xdf]")


def _pos(rng: random.Random, data: bytes) -> int:
    return rng.randrange(len(data) + 1)


def _bitflip(rng: random.Random, msg: bytes, other: bytes) -> bytes:
    b = bytearray(msg)
    for _ in range(rng.choice([1, 1, 2, 4, 8])):
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def _interesting(rng: random.Random, msg: bytes, other: bytes) -> bytes:
    b = bytearray(msg)
    b[rng.randrange(len(b))] = rng.choice(INTERESTING)
    return bytes(b)


def _huge_length(rng: random.Random, msg: bytes, other: bytes) -> bytes:
    """A length prefix far beyond the message: a real header bumped, or a new one."""
    headers = [m.start() for m in LENGTH_HEADER.finditer(msg)]
    if headers and rng.random() < 0.5:
        i = rng.choice(headers)
        width = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4, 0xDC: 2, 0xDD: 4,
                 0xDE: 2, 0xDF: 4}[msg[i]]
        return msg[:i + 1] + b"\xff" * width + msg[i + 1 + width:]
    i = _pos(rng, msg)
    return msg[:i] + rng.choice(HUGE_HEADERS) + msg[i:]


def _deep(rng: random.Random, msg: bytes, other: bytes) -> bytes:
    depth = rng.choice([100, 600, 1000, 1025, 100_000])
    if rng.random() < 0.3:
        return b"[" * depth + b"]" * rng.choice([0, depth])
    return b"\x92\xa5start\x81\xa1x" + rng.choice([b"\x91", b"\x81\xa1k"]) * depth + b"\xc0"


def _insert(rng: random.Random, msg: bytes, other: bytes) -> bytes:
    i = _pos(rng, msg)
    return msg[:i] + rng.randbytes(rng.randint(1, 32)) + msg[i:]


def _delete(rng: random.Random, msg: bytes, other: bytes) -> bytes:
    i, j = sorted((_pos(rng, msg), _pos(rng, msg)))
    return msg[:i] + msg[j:]


def _duplicate(rng: random.Random, msg: bytes, other: bytes) -> bytes:
    i, j = sorted((_pos(rng, msg), _pos(rng, msg)))
    return msg[:j] + msg[i:]


def _splice(rng: random.Random, msg: bytes, other: bytes) -> bytes:
    """The head of one message on the tail of another."""
    return msg[:_pos(rng, msg)] + other[_pos(rng, other):]


def _random_pair(rng: random.Random, msg: bytes, other: bytes) -> bytes:
    """Random bytes behind a start that looks right (msgpack pair, JSON list)."""
    head = rng.choice([b"\x92", b"[", b" ", b"\x92\xa5event"])
    return head + rng.randbytes(rng.choice([1, 16, 256]))


def _ext_type(rng: random.Random, msg: bytes, other: bytes) -> bytes:
    """A msgpack extension value (timestamp, unknown ext) where a value was."""
    i = _pos(rng, msg)
    ext = rng.choice([b"\xd6\xff\x00\x00\x00\x01", b"\xd4\x05\x00", b"\xc7\x00\x05",
                      b"\xd7\xff" + bytes(8)])
    return msg[:i] + ext + msg[i:]


def _invalid_utf8(rng: random.Random, msg: bytes, other: bytes) -> bytes:
    return msg.replace(b"\xa5start", b"\xa5st\xffrt", 1).replace(b"\xa3uid", b"\xa3u\xc3(", 1)


BYTE_OPS: dict[str, ByteOp] = {
    "bitflip": _bitflip,
    "interesting-byte": _interesting,
    "truncate": lambda rng, m, o: m[:rng.randrange(len(m))],
    "extend": lambda rng, m, o: m + rng.randbytes(rng.randint(1, 64)),
    "insert": _insert,
    "delete": _delete,
    "duplicate": _duplicate,
    "splice": _splice,
    "random": lambda rng, m, o: rng.randbytes(rng.choice([1, 2, 16, 256, 2048])),
    "random-pair": _random_pair,
    "empty": lambda rng, m, o: b"",
    "tombstone": lambda rng, m, o: None,
    "huge-length": _huge_length,
    "deep-nesting": _deep,
    "ext-type": _ext_type,
    "invalid-utf8": _invalid_utf8,
}
#: Rare: each costs LIMITS.max_message_bytes of memory and broker bandwidth.
TOO_LARGE_RATE = 0.0005
#: Relative weights of mutations that are slow to make and check (default 1).
WEIGHTS = {"big": 0.1, "deep-nesting": 0.3}


# -- the message stream ------------------------------------------------------------------------
@dataclass
class Mutator:
    rng: random.Random
    seeds: list[bytes]  # encoded valid messages: what every mutant starts from
    json_rate: float = 0.05

    def __post_init__(self) -> None:
        self._byte_ops = list(BYTE_OPS)
        self._byte_weights = [WEIGHTS.get(op, 1.0) for op in self._byte_ops]
        self._ops = list(STRUCTURAL)
        self._weights = [WEIGHTS.get(op, 1.0) for op in self._ops]

    def __call__(self) -> tuple[str, bytes | None]:
        rng = self.rng
        msg, other = rng.choice(self.seeds), rng.choice(self.seeds)
        if rng.random() < TOO_LARGE_RATE:
            return "byte:too-large", rng.randbytes(LIMITS.max_message_bytes + 1)
        if rng.random() < 0.4:
            op = rng.choices(self._byte_ops, self._byte_weights)[0]
            if rng.random() < self.json_rate:
                msg = as_json(*decode(msg), rng)
            return f"byte:{op}", BYTE_OPS[op](rng, msg, other)
        for _ in range(10):  # a mutant msgpack cannot encode (too deep, too big) is redrawn
            op = rng.choices(self._ops, self._weights)[0]
            name, doc = decode(msg)
            new_name, new_doc = STRUCTURAL[op](rng, name, doc, decode(other)[1])
            if rng.random() < 0.15:  # and another one on top
                new_name, new_doc = STRUCTURAL[rng.choices(self._ops, self._weights)[0]](
                    rng, new_name, new_doc, decode(other)[1])
            try:
                if rng.random() < self.json_rate:
                    return f"json:{op}/{name}", as_json(new_name, new_doc, rng)
                return f"struct:{op}/{name}", encode_message(new_name, new_doc)
            except (TypeError, ValueError, OverflowError, UnicodeEncodeError):
                continue
        return "struct:replay", msg


def decode(msg: bytes) -> tuple[str, Doc]:
    return decode_message(msg, max_bytes=1 << 30)


def as_json(name: Any, doc: Any, rng: random.Random) -> bytes:
    def default(o: Any) -> Any:
        if isinstance(o, np.ndarray | np.generic):
            return plain(o)
        if isinstance(o, bytes):
            return o.decode("latin-1")
        return repr(o)
    text = json.dumps([name, doc], default=default, allow_nan=True)
    return (rng.choice(["", " ", "\n"]) + text).encode()


def schedule(rng: random.Random, n_mutants: int, n_seed: int, n_witness: int) -> list[int]:
    """Where valid messages go: seed runs within the first 5 % (their mutants then reach
    the writers), witness runs anywhere; the rest are mutants. 0 mutant, 1 seed, 2 witness."""
    total = n_mutants + n_seed + n_witness
    kinds = [0] * total
    for pos in rng.sample(range(max(n_seed, total // 20)), n_seed):
        kinds[pos] = 1
    free = [i for i, k in enumerate(kinds) if k == 0]
    for pos in rng.sample(free, n_witness):
        kinds[pos] = 2
    return kinds


def fuzz_stream(rng: random.Random, n: int, witness: list[Docs], seed: list[Docs],
                skipped: Counter[str]) -> Iterator[tuple[str, bytes | None, bool]]:
    """``(label, value, accepted)`` of ``n`` mutants with both corpora interleaved, each
    in order; ``accepted``: the value decodes and validates. Mutants that hit a known bug
    are redrawn and counted in ``skipped``."""
    seed_msgs = [encode_message(name, doc) for run in seed for name, doc in run]
    witness_msgs = [encode_message(name, doc) for run in witness for name, doc in run]
    mutate = Mutator(rng, seed_msgs)
    screen = Screen({d["uid"]: d["run_start"] for run in seed + witness
                     for name, d in run if name == "stop"})
    queues = {1: iter(seed_msgs), 2: iter(witness_msgs)}
    for kind in schedule(rng, n, len(seed_msgs), len(witness_msgs)):
        if kind == 0:
            label, value = mutate()
            while (verdict := screen(label, value))[0] is not None:
                skipped[str(verdict[0])] += 1
                label, value = mutate()
            yield label, value, verdict[1]
        else:
            yield ("valid:seed" if kind == 1 else "valid:witness"), next(queues[kind]), True


# -- known bugs: each has an xfail(strict=True) test below; the fuzzer steers clear ----------
@dataclass
class Screen:
    """Tells which mutants would hit a known bug, and which decode and validate."""

    stop_runs: dict[str, str]  # the corpus' stop uids -> their run_start

    def __call__(self, label: str, value: bytes | None) -> tuple[str | None, bool]:
        """(the known bug ``value`` would hit, or None; whether it decodes and
        validates). Raises AssertionError, naming the message, for anything else."""
        try:
            try:
                name, doc = decode_message(value, max_bytes=LIMITS.max_message_bytes)
            except DocumentError:
                return None, False
            bug = self.known_bug(name, doc)
            if bug is not None:
                return bug, False
            try:
                validate(name, doc)
            except DocumentError:
                return None, False
        except Exception as exc:
            raise AssertionError(f"decode/validate raised {exc!r} for "
                                 f"{describe(-1, label, value)}") from exc
        return None, True

    def known_bug(self, name: str, doc: Doc) -> str | None:
        """Mutants to redraw because they would hit a known, unfixed bug: none now (the
        eleven this fuzzer found are fixed; their regression tests close this module)."""
        return None


# -- accounting ----------------------------------------------------------------------------------
def describe(offset: int, label: str, value: bytes | None, limit: int = 600) -> str:
    shown = "None" if value is None else base64.b64encode(value[:limit]).decode()
    more = "" if value is None or len(value) <= limit else f"... ({len(value)} bytes)"
    return f"offset {offset} [{label}] value(base64)={shown}{more}"


@dataclass
class Ledger:
    """What was sent, compactly: every label, and the value of each message our own
    decode + validate accepts (the others must all be dead-lettered)."""

    labels: list[str] = field(default_factory=list)
    accepted: dict[int, bytes] = field(default_factory=dict)

    def note(self, offset: int, label: str, value: bytes | None, accepted: bool) -> None:
        while len(self.labels) <= offset:
            self.labels.append("")
        self.labels[offset] = sys.intern(label)  # a million labels, a few hundred distinct
        if accepted and value is not None:
            self.accepted[offset] = value


@dataclass
class Outcome:
    stored: Counter[str] = field(default_factory=Counter)  # by document kind
    dead: Counter[str] = field(default_factory=Counter)  # by mutation family
    reasons: Counter[str] = field(default_factory=Counter)  # of the dead letters
    problems: list[str] = field(default_factory=list)
    datum_page_copies: int = 0  # extra dead letters of datum_pages (one per datum)

    def summary(self) -> str:
        return (f"stored {sum(self.stored.values())} {dict(self.stored.most_common())}; "
                f"dead-lettered {sum(self.dead.values())} {dict(self.dead.most_common())}"
                + (f" (+{self.datum_page_copies} extra copies of datum_pages, one per datum)"
                   if self.datum_page_copies else "")
                + f"; dead letters by reason {dict(self.reasons.most_common())}")


#: descriptor, seq_num, uid, time, timestamps: what tells rows of one position apart
#: (floats as float.hex, so that NaN equals NaN).
Row = tuple[str, int, str, str, tuple[tuple[str, str], ...]]


def row_of(descriptor: Any, seq_num: Any, uid: Any, time_: Any,
           timestamps: Mapping[str, Any]) -> Row:
    return (str(descriptor), int(seq_num), str(uid), _hex(time_),
            tuple(sorted((k, _hex(v)) for k, v in timestamps.items())))


def _hex(value: Any) -> str:
    try:
        return float(value).hex()
    except (TypeError, ValueError):
        return repr(value)


class RecordingIngestor(Ingestor):
    """The real Ingestor, noting every row it handed to storage (arrays or the stream's
    tail): an event overwritten later by another with the same seq_num leaves no trace in
    storage, yet it was stored."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rows: set[Row] = set()

    async def _store_page(self, tenant: str, info: DescriptorInfo, page: Page,
                          stored: Tail | None) -> tuple[StreamUpdate, Tail | None]:
        out = await super()._store_page(tenant, info, page, stored)
        stamps = {k: v.tolist() for k, v in page.timestamps.items()}
        self.rows.update(
            row_of(info.doc["uid"], s, u, t, {k: v[i] for k, v in stamps.items()})
            for i, (s, u, t) in enumerate(zip(page.seq_num.tolist(), page.uid.tolist(),
                                              page.time.tolist(), strict=True)))
        return out


async def account(ledger: Ledger, dead: Counter[int], store: MetadataStore, zarr_root: Path,
                  tenant: str, *, exactly_once: bool, written: set[Row] | None = None
                  ) -> Outcome:
    """Every message is dead-lettered, or stored as it was sent; nothing else. Events are
    checked against ``written`` (rows the Zarr writer wrote) when given, and in any case
    every row in the arrays must come from a message that was not dead-lettered."""
    out = Outcome()
    positions: dict[str, dict[int, set[str]]] = {}  # descriptor -> seq_num -> accepted uids
    pending: list[tuple[int, str, int, str]] = []  # (offset, descriptor, seq_num, uid)
    for offset, label in enumerate(ledger.labels):
        if not label:
            continue  # not one of ours (Kafka: a gap in offsets)
        n_dead = dead.get(offset, 0)
        value = ledger.accepted.get(offset)
        if n_dead:
            out.dead[label.split("/")[0]] += 1
            if n_dead > 1 and exactly_once:
                if value is not None and decode(value)[0] == "datum_page":
                    out.datum_page_copies += n_dead - 1  # one dead letter per bad datum
                else:
                    out.problems.append(f"dead-lettered {n_dead} times: "
                                        f"{describe(offset, label, value)}")
            continue
        if value is None:
            out.problems.append(f"neither stored nor dead-lettered (does not decode): "
                                f"{describe(offset, label, value)}")
            continue
        name, doc = decode(value)
        out.stored[name] += 1
        if name in ("event", "event_page"):
            rows = event_model.unpack_event_page(doc) if name == "event_page" else [doc]
            for ev in rows:
                row = row_of(ev["descriptor"], ev["seq_num"], ev["uid"], ev["time"],
                             ev["timestamps"])
                desc, seq, uid = row[:3]
                positions.setdefault(desc, {}).setdefault(seq, set()).add(uid)
                pending.append((offset, desc, seq, uid))
                if written is not None and row not in written:
                    out.problems.append(f"event {uid!r} (descriptor {desc!r}, seq_num {seq}) "
                                        f"accepted but never written: "
                                        f"{describe(offset, label, value)}")
            continue
        docs = datum_page_to_datums(doc) if name == "datum_page" else [doc]
        kind = "datum" if name == "datum_page" else name
        for d in docs:
            clean = to_jsonable(d)
            got = await store.get(kind, key_of(kind, clean))
            if got is None or not same_content(got, clean):
                state = "missing" if got is None else "different"
                out.problems.append(f"accepted but not stored as sent ({kind} "
                                    f"{key_of(kind, clean)!r} is {state}): "
                                    f"{describe(offset, label, value)}")
    stored_uids = await _stored_uids(positions, store, zarr_root, tenant)
    for offset, desc, seq, uid in pending:
        got_uid = stored_uids.get(desc, {}).get(seq)
        if got_uid is None or got_uid not in positions[desc][seq]:
            out.problems.append(
                f"event {uid!r} (descriptor {desc!r}, seq_num {seq}) accepted but position "
                f"holds {got_uid!r}: "
                f"{describe(offset, ledger.labels[offset], ledger.accepted[offset])}")
    return out


async def _stored_uids(positions: dict[str, dict[int, set[str]]], store: MetadataStore,
                       zarr_root: Path, tenant: str) -> dict[str, dict[int, str | None]]:
    """The uid stored at each of ``positions`` (only those chunks are read: a hostile
    seq_num may have grown an array to 10^8 rows)."""
    out: dict[str, dict[int, str | None]] = {}
    for desc, by_seq in positions.items():
        doc = await store.get("descriptor", desc)
        if doc is None:
            out[desc] = {}
            continue
        found: dict[int, str | None] = {}
        rec = next((r for r in await store.streams(doc["run_start"])
                    if r["descriptor_uid"] == desc), None)
        tail = Tail.decode(rec["tail"]) if rec is not None and rec.get("tail") else None
        rest = set(by_seq)
        if tail is not None:  # the stream's newest rows, kept in the metadata store
            for s in list(rest):
                i = s - 1 - tail.start
                if 0 <= i < len(tail) and tail.columns["seq_num"][i] > 0:
                    found[s] = str(tail.columns["uid"][i])
                    rest.discard(s)
        try:
            group = zarr.open_group(str(zarr_root), mode="r",
                                    path=descriptor_path(tenant, doc["run_start"], desc))
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            group = None  # every row is in the tail (a short stream)
        if group is not None:
            uids = group["uid"]
            seqs = sorted(s for s in rest if 1 <= s <= uids.shape[0])
            values = uids.get_orthogonal_selection((np.array(seqs, dtype=np.int64) - 1,)) \
                if seqs else []
            found.update({s: str(v) if v else None for s, v in zip(seqs, values, strict=True)})
        out[desc] = found
    return out


def kinds_and_keys(docs: Any) -> Counter[tuple[str, str]]:
    """Documents by kind and key, pages unpacked: counts, not only sets, must match."""
    out: Counter[tuple[str, str]] = Counter()
    for name, doc in docs:
        if name == "event_page":
            out.update(("event", ev["uid"]) for ev in event_model.unpack_event_page(doc))
        elif name == "datum_page":
            out.update(("datum", d["datum_id"]) for d in event_model.unpack_datum_page(doc))
        else:
            out[(name, key_of(name, doc) if name != "event" else doc["uid"])] += 1
    return out


def assert_witness_unchanged(tenant: str, metadata: str, zarr_root: Path,
                             witness: list[Docs]) -> None:
    with bluestream.open_catalog(tenant, metadata=metadata, zarr_root=zarr_root) as cat:
        for docs in witness:
            out = list(cat[docs[0][1]["uid"]].documents())
            assert kinds_and_keys(out) == kinds_and_keys(docs), docs[0][1]["uid"]
            assert canonical(out) == canonical(docs), docs[0][1]["uid"]


# -- in process: decode -> validate -> route -> write ----------------------------------------------
@dataclass
class TallySink:
    """A dead-letter sink that keeps only offsets and reasons: a million mutants'
    envelopes (which helpers.CollectingSink keeps) would not fit in memory."""

    offsets: Counter[int] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)

    async def send(self, env: Envelope, error: DocumentError) -> None:
        self.offsets[env.offset] += 1
        self.reasons[str(error.reason)] += 1

    async def flush(self) -> None:
        return None


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


async def run_ingestor(messages: Iterator[tuple[str, bytes | None, bool]], rng: random.Random,
                       tenant: str, metadata: str, zarr_root: Path) -> tuple[Ledger, Outcome]:
    ledger, sink, clock = Ledger(), TallySink(), FakeClock()
    registry = StoreRegistry(metadata)
    ing = RecordingIngestor(store_for=registry, arrays=ZarrEventStore(zarr_root), dlq=sink,
                            limits=LIMITS, park_max_age_s=PARK_AGE_S, clock=clock)
    try:
        batch: list[Envelope] = []
        size = batch_size(rng)
        for offset, (label, value, accepted) in enumerate(messages):
            ledger.note(offset, label, value, accepted)
            batch.append(Envelope("fuzz", 0, offset, value, key=b"k", tenant=tenant))
            if len(batch) >= size:
                await process(ing, batch, ledger)
                clock.now += len(batch) * 0.002  # parked documents expire mid-run too
                batch, size = [], batch_size(rng)
        await process(ing, batch, ledger)
        clock.now += PARK_AGE_S + 1
        await ing.expire_parked()
        assert len(ing.parked) == 0
        assert ing.counters.total("dead_lettered") == sum(sink.offsets.values())
        assert ing.counters.total("documents") == len(ledger.accepted)
        outcome = await account(ledger, sink.offsets, await registry(tenant), zarr_root,
                                tenant, exactly_once=True, written=ing.rows)
    finally:
        await registry.aclose()
    outcome.reasons = sink.reasons
    return ledger, outcome


def batch_size(rng: random.Random) -> int:
    """Mostly large batches, as the daemon fetches them; a quarter tiny ones."""
    return rng.randint(1, 20) if rng.random() < 0.25 else rng.randint(500, 5000)


async def process(ing: Ingestor, batch: list[Envelope], ledger: Ledger) -> None:
    """One batch; on an escaping exception, name the message(s) that raise alone."""
    try:
        with anyio.fail_after(60):
            await ing.process(batch)
    except TimeoutError:
        raise AssertionError(f"process() hung on the batch of offsets {batch[0].offset}.."
                             f"{batch[-1].offset} (seed {SEED})") from None
    except Exception as exc:
        culprits = []
        for env in batch:
            try:
                await ing.process([Envelope(env.topic, 0, env.offset, env.value,
                                            tenant=env.tenant)])
            except Exception as one:
                where = describe(env.offset, ledger.labels[env.offset], env.value)
                culprits.append(f"{one!r}: {where}")
        trace = "".join(traceback.format_exception(exc))
        raise AssertionError(f"process() raised {exc!r} (seed {SEED}); alone, these raise:\n"
                             + "\n".join(culprits or ["(none: only together)"])
                             + f"\n{trace[-4000:]}") from exc


@pytest.mark.timeout(max(300, N_MESSAGES // 300))
def test_fuzz_ingestor(tmp_path: Path, zarr_root: Path, tenant: str,
                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="bluestream.pipeline")  # a warning per dead letter
    started = time.perf_counter()
    rng = random.Random(SEED)
    witness = build_corpus(rng, tmp_path / "witness", T0)
    seed = build_corpus(rng, tmp_path / "seed", T0 + 10_000)
    metadata = f"sqlite:///{tmp_path / 'meta.db'}"
    skipped: Counter[str] = Counter()
    ledger, outcome = anyio.run(run_ingestor, fuzz_stream(rng, N_MESSAGES, witness, seed,
                                                          skipped),
                                rng, tenant, metadata, zarr_root)
    ingested = time.perf_counter() - started
    assert not TRIPWIRE, TRIPWIRE
    assert not outcome.problems, (f"{len(outcome.problems)} problems (seed {SEED}):\n"
                                  + "\n".join(outcome.problems[:20]))
    assert_witness_unchanged(tenant, metadata, zarr_root, witness)
    print(f"fuzz (seed {SEED}): {len(ledger.labels)} messages ({N_MESSAGES} mutants) in "
          f"{ingested:.1f} s, {time.perf_counter() - started:.1f} s with readback; "
          f"{outcome.summary()}; redrawn for known bugs: {dict(skipped)}")
    assert sum(outcome.stored.values()) + sum(outcome.dead.values()) == len(ledger.labels)


# -- through the real daemon and broker ----------------------------------------------------------
@dataclass
class Sent:
    """What the test published, by source offset."""

    ledger: Ledger = field(default_factory=Ledger)
    values: dict[int, bytes | None] = field(default_factory=dict)
    keys: dict[int, bytes | None] = field(default_factory=dict)
    headers: dict[int, list[tuple[str, bytes]]] = field(default_factory=dict)
    end: int = 0  # the topic's end offset once everything is published


async def publish(bootstrap: str, topic: str, rng: random.Random,
                  messages: Iterator[tuple[str, bytes | None, bool]]) -> Sent:
    """Publish everything, with random keys and headers (some spoofing dead-letter ones)."""
    header_sets: list[list[tuple[str, bytes]]] = [
        [], [], [("source-offset", b"-1"), ("reason", b"\xff"), ("error", b"")],
        [("x", b""), ("x", b"\x00" * 100)]]
    sent, pending = Sent(), []
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap,
                                max_request_size=2 * LIMITS.max_message_bytes)
    await producer.start()
    try:
        for label, value, accepted in messages:
            key = rng.choice([b"k", None, b"", rng.randbytes(8)])
            if key is None and value is None:
                key = b"tombstone"  # aiokafka sends no record without both
            headers = rng.choice(header_sets)
            fut = await producer.send(topic, value, key=key, headers=headers)
            pending.append((label, value, accepted, key, headers, fut))
        for label, value, accepted, key, headers, fut in pending:
            offset = (await fut).offset
            sent.ledger.note(offset, label, value, accepted)
            sent.values[offset], sent.keys[offset], sent.headers[offset] = value, key, headers
            sent.end = max(sent.end, offset + 1)
    finally:
        await producer.stop()
    return sent


DLQ_HEADER_NAMES = ("error", "reason", "source-topic", "source-partition", "source-offset")


def dead_letter_offsets(letters: list[DeadLetter], topic: str,
                        sent: Sent) -> tuple[Counter[int], list[str]]:
    """Source offsets of the dead letters, and what is wrong with any of them: each must
    carry one of each dead-letter header and its source's key, value and own headers
    (a spoofed ``source-offset`` sent by the producer must not survive)."""
    dead: Counter[int] = Counter()
    problems: list[str] = []
    for d in letters:
        named = {k: [v for n, v in d.headers if n == k] for k in DLQ_HEADER_NAMES}
        if any(len(v) != 1 for v in named.values()):
            counts = {k: len(v) for k, v in named.items()}
            problems.append(f"dead letter at {d.offset} has dead-letter headers {counts}")
            continue
        offset = int(named["source-offset"][0])
        dead[offset] += 1
        own = [h for h in d.headers if h[0] not in (*DLQ_HEADER_NAMES, "value-omitted")]
        omitted = any(n == "value-omitted" for n, _ in d.headers)
        same = (named["source-topic"][0] == topic.encode()
                and named["source-partition"][0] == b"0"
                and d.key == sent.keys.get(offset)
                and own == [h for h in sent.headers.get(offset, [])
                            if h[0] not in DLQ_HEADER_NAMES]
                and (omitted or d.value == sent.values.get(offset)))
        if not same:
            problems.append(f"dead letter at {d.offset} does not carry the key, value and "
                            f"headers of source offset {offset}")
    return dead, problems


@pytest.mark.kafka
@pytest.mark.anyio
@pytest.mark.timeout(max(300, N_KAFKA_MESSAGES // 20))
async def test_fuzz_daemon_on_kafka(kafka_bootstrap: str, kafka_topic: str, tenant: str,
                                    tmp_path: Path, zarr_root: Path,
                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="bluestream.pipeline")
    started = time.perf_counter()
    rng = random.Random(SEED + 1)
    witness = build_corpus(rng, tmp_path / "witness", T0)
    seed = build_corpus(rng, tmp_path / "seed", T0 + 10_000)
    skipped: Counter[str] = Counter()
    metadata = f"sqlite:///{tmp_path / 'meta.db'}"
    settings = settings_for(kafka_bootstrap, kafka_topic, metadata, zarr_root,
                            max_message_bytes=LIMITS.max_message_bytes,
                            max_page_events=LIMITS.max_page_events,
                            max_data_keys=LIMITS.max_data_keys, park_max_age_s=2.0,
                            batch_max_records=500)
    daemon = Daemon(settings, handle_signals=False)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon.run)
            sent = await publish(kafka_bootstrap, kafka_topic, rng, fuzz_stream(
                rng, N_KAFKA_MESSAGES, witness, seed, skipped))

            async def all_committed() -> bool:
                offsets = await admin.list_consumer_group_offsets(settings.kafka.group_id)
                meta = offsets.get(TopicPartition(kafka_topic, 0))
                return meta is not None and meta.offset >= sent.end

            await wait_for(all_committed, 60 + N_KAFKA_MESSAGES / 50,
                           "the group's committed offset to reach the end of the topic")
            daemon.stop.set()
    finally:
        await admin.close()
    consumed = time.perf_counter() - started
    letters = await read_dead_letters(settings, kafka_topic + settings.kafka.dlq_suffix)
    dead, problems = dead_letter_offsets(letters, kafka_topic, sent)
    store = open_metadata_store(metadata, tenant)
    await store.open()
    try:
        outcome = await account(sent.ledger, dead, store, zarr_root, tenant,
                                exactly_once=False)
    finally:
        await store.close()
    problems += outcome.problems
    outcome.reasons = Counter(d.reason for d in letters)
    assert not TRIPWIRE, TRIPWIRE
    assert not problems, (f"{len(problems)} problems (seed {SEED + 1}):\n"
                          + "\n".join(problems[:20]))
    await anyio.to_thread.run_sync(assert_witness_unchanged, tenant, metadata, zarr_root,
                                   witness)
    assert daemon.counters.total("dead_lettered") >= len(dead)
    print(f"\nkafka fuzz (seed {SEED + 1}): {len(sent.ledger.labels)} messages "
          f"({N_KAFKA_MESSAGES} mutants) stored or dead-lettered and committed in "
          f"{consumed:.1f} s, {time.perf_counter() - started:.1f} s with checks; "
          f"{outcome.summary()}; dead letters {sum(dead.values())} for {len(dead)} offsets; "
          f"redrawn for known bugs: {dict(skipped)}")
    assert sum(outcome.stored.values()) + sum(outcome.dead.values()) == len(sent.ledger.labels)


# -- known bugs, each reduced to its smallest case ----------------------------------------------
# Each case must be stored or dead-lettered exactly once, without process() raising. When
# regression tests of the bugs the fuzzer found (each failed before its fix).
def _case_ledger(values: list[bytes]) -> Ledger:
    ledger = Ledger()
    for offset, value in enumerate(values):
        try:
            validate(*decode_message(value, max_bytes=LIMITS.max_message_bytes))
            ok = True
        except Exception:
            ok = False
        ledger.note(offset, "case", value, ok)
    return ledger


async def run_case(root: Path, *batches: list[bytes]) -> Outcome:
    ing, sink, registry = make_ingestor(f"sqlite:///{root / 'meta.db'}", root / "zarr",
                                        limits=LIMITS)
    values = [v for batch in batches for v in batch]
    try:
        offset = 0
        for batch in batches:
            await ing.process([Envelope("case", 0, offset + i, v, tenant="case")
                               for i, v in enumerate(batch)])
            offset += len(batch)
        await drain_parked(ing)
        dead = Counter(env.offset for env, _ in sink.letters)
        return await account(_case_ledger(values), dead, await registry("case"),
                             root / "zarr", "case", exactly_once=True)
    finally:
        await registry.aclose()


def assert_all_accounted(root: Path, *batches: list[bytes]) -> None:
    outcome = anyio.run(run_case, root, *batches)
    assert not outcome.problems, outcome.problems


def _run(n: int) -> tuple[list[bytes], list[Doc]]:
    """A scalar run's start + descriptor encoded, and its events (to be changed)."""
    docs = scalar_run(n, fields=1, t0=T0)
    return [encode_message(*docs[0]), encode_message(*docs[1])], [d for _, d in docs[2:-1]]


def test_fuzz_found_mixed_key_types_in_event_data(tmp_path: Path) -> None:
    """Event data with a non-string key: _same_keys sorted mixed key types (TypeError escaped
    process). Now refused at decode (undecodable)."""
    head, events = _run(1)
    events[0]["data"].update({0: 0, "x": 1})
    assert_all_accounted(tmp_path, [*head, encode_message("event", events[0])])


def test_fuzz_found_nested_non_string_key(tmp_path: Path) -> None:
    """A nested map with a non-string key: validate() raised TypeError from fastjsonschema. Now
    refused at decode."""
    assert_all_accounted(tmp_path, [encode_message("start", {"uid": "u1", "time": T0,
                                                             "x": {1: "a"}})])


def test_fuzz_found_zero_d_event_page_column(tmp_path: Path) -> None:
    """An event_page column that is a 0-d array: page_from_event_page called len() on it
    (TypeError). Now a page-length-mismatch."""
    head, events = _run(2)
    page = event_model.pack_event_page(*events)
    page["data"]["f0"] = np.array(1.0)
    assert_all_accounted(tmp_path, [*head, encode_message("event_page", page)])


def test_fuzz_found_events_valid_alone_fail_together(tmp_path: Path) -> None:
    """Two events valid alone (1.0 and 2**63-1 in an integer column) failed together and the
    page of the good events was rebuilt unguarded (ValidationError escaped). Now written as
    separate pages."""
    head, events = _run(2)  # data keys f0 (number) and counter (integer)
    events[0]["data"]["counter"], events[1]["data"]["counter"] = 1.0, 2**63 - 1
    assert_all_accounted(tmp_path, [*head, *(encode_message("event", e) for e in events)])


def test_fuzz_found_scan_id_beyond_int64(tmp_path: Path) -> None:
    """scan_id 2**64-1: the SQLite insert raised OverflowError (MongoDB would have retried
    forever as an outage). Now dead-lettered as int-out-of-range."""
    start = scalar_run(1, t0=T0)[0][1]
    start["scan_id"] = 2**64 - 1
    assert_all_accounted(tmp_path, [encode_message("start", start)])


def test_fuzz_found_duplicate_stop_with_reused_uid_is_dropped(tmp_path: Path) -> None:
    """Silent drop: the second of two identical stops (reusing another run's stop uid) in one
    put was classified SAME by SQLite. Now both are conflicts."""
    a, b = scalar_run(1, scan_id=1, t0=T0), scalar_run(1, scan_id=2, t0=T0 + 10)
    stop = dict(b[-1][1], uid=a[-1][1]["uid"])  # run b's stop, with run a's stop uid
    assert_all_accounted(tmp_path, [encode_message(*d) for d in a + b[:-1]],
                         [encode_message("stop", stop), encode_message("stop", stop)])


def test_fuzz_found_empty_giant_array(tmp_path: Path) -> None:
    """A zero-size msgpack-numpy array of shape [2**40, 0]: tolist() never ended (MemoryError).
    Now refused at decode (unsafe-value)."""
    value = msgpack.packb(["datum", {"resource": "r1", "datum_id": "r1/0", "datum_kwargs": {
        "index": {b"nd": True, b"type": "<u2", b"kind": b"", b"shape": [2**40, 0],
                  b"data": b""}}}])
    assert_all_accounted(tmp_path, [value])


def test_fuzz_found_unsafe_descriptor_uid_dead_letters_twice(tmp_path: Path) -> None:
    """A descriptor uid that cannot name a Zarr group was accepted; its events were dead-
    lettered twice. Now the descriptor is refused (bad-key), its events wait for it and die
    once."""
    docs = scalar_run(2, fields=1, t0=T0)
    desc = dict(docs[1][1], uid="a..b")
    events = [dict(d, descriptor="a..b") for _, d in docs[2:4]]
    events[1]["data"] = {"f0": 1.0}  # wrong data keys: dead-lettered by _pages first
    assert_all_accounted(tmp_path, [encode_message(*docs[0]), encode_message("descriptor", desc),
                                    *(encode_message("event", e) for e in events)])


def test_fuzz_found_msgpack_numpy_without_data(tmp_path: Path) -> None:
    """A msgpack-numpy value with data nil decoded as uninitialised memory of any shape. Now
    refused at decode."""
    value = msgpack.packb(["start", {"uid": "u1", "time": T0, "x": {
        b"nd": True, b"type": "<f8", b"kind": b"", b"shape": [4], b"data": None}}])
    try:
        decode_message(value, max_bytes=LIMITS.max_message_bytes)
    except DocumentError:
        pass
    else:
        raise AssertionError("an array without data decoded (to uninitialised memory)")
    assert_all_accounted(tmp_path, [value])


async def _datum_page_letters(root: Path, n: int) -> list[str]:
    """Reasons of the dead letters of one datum_page of ``n`` datums whose resource never
    comes."""
    ing, sink, registry = make_ingestor(f"sqlite:///{root / 'meta.db'}", root / "zarr",
                                        limits=LIMITS)
    page = {"resource": "r1", "datum_id": [f"r1/{i}" for i in range(n)],
            "datum_kwargs": {"index": list(range(n))}}
    try:
        await ing.process([Envelope("case", 0, 0, encode_message("datum_page", page),
                                    tenant="case")])
        await drain_parked(ing)
    finally:
        await registry.aclose()
    return sink.reasons


def test_fuzz_found_datum_page_dead_lettered_once_per_datum(tmp_path: Path) -> None:
    """A datum_page whose resource never came became one dead letter per datum. Now the page
    waits whole and dies once."""
    assert anyio.run(_datum_page_letters, tmp_path, 3) == ["unknown-resource"]


def test_fuzz_found_datum_page_ignores_max_page_events(tmp_path: Path) -> None:
    """A datum_page over limits.max_page_events was split instead of refused. Now one limit-
    exceeded."""
    assert anyio.run(_datum_page_letters, tmp_path, LIMITS.max_page_events + 1) == [
        "limit-exceeded"]
