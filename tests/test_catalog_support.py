"""Shared pieces of the catalog tests (no tests here): documents from a real RunEngine,
handcrafted runs, ingestion through the daemon's own Ingestor, and a small in-memory
databroker-style reference that builds the expected stream arrays from the documents.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import event_model
import numpy as np
import pytest

import bluestream
from bluestream.catalog import Catalog
from bluestream.storage.registry import StoreRegistry
from bluestream.storage.tail import DEFAULT_BLOCK
from helpers import envelopes, make_ingestor

Doc = dict[str, Any]
Docs = list[tuple[str, Doc]]

NPY_SHAPE = (16, 16)


# -- documents from a real RunEngine ------------------------------------------------------
@functools.lru_cache(maxsize=1)
def re_runs() -> dict[str, Docs]:
    """count, scan (with a baseline stream), an in-band image detector and an external
    NPY_SEQ detector, as a RunEngine with ophyd.sim devices publishes them."""
    with warnings.catch_warnings():
        # ophyd/bluesky import-time deprecations are not ours to fix.
        warnings.simplefilter("ignore", DeprecationWarning)
        from bluesky import RunEngine
        from bluesky.plans import count, scan
        from bluesky.preprocessors import SupplementalData
        from ophyd.sim import SynAxis, SynSignal, SynSignalWithRegistry, det, motor

    save_dir = Path(tempfile.mkdtemp(prefix="bluestream-npy-"))
    atexit.register(shutil.rmtree, save_dir, True)
    RE = RunEngine({}, call_returns_result=False)
    runs: dict[str, Docs] = {}
    current: Docs = []
    RE.subscribe(lambda name, doc: current.append((name, doc)))

    def record(label: str, plan: Any, **md: Any) -> None:
        current.clear()
        RE(plan, **md)
        runs[label] = list(current)

    counter = iter(range(1, 1_000_000))
    cam = SynSignal(name="cam", func=lambda: np.full(NPY_SHAPE, next(counter) % 65535,
                                                     dtype=np.uint16))
    ext = SynSignalWithRegistry(
        name="ext", save_path=str(save_dir),
        func=lambda: np.arange(256, dtype=np.uint16).reshape(NPY_SHAPE) + next(counter))
    record("count", count([det], 5), sample={"name": "Si"}, purpose="alignment")
    sd = SupplementalData(baseline=[SynAxis(name="slit")])
    RE.preprocessors.append(sd)
    record("scan", scan([det], motor, -1, 1, 10), sample={"name": "Ge"})
    RE.preprocessors.clear()
    record("image", count([cam, det], 3), sample={"name": "Si"})
    record("external", count([ext], 4))
    return runs


# -- handcrafted runs ---------------------------------------------------------------------
def run_with_uid(uid: str, *, scan_id: int, t0: float, n: int = 3,
                 plan_name: str = "count") -> Docs:
    bundle = event_model.compose_run(uid=uid, time=t0,
                                     metadata={"scan_id": scan_id, "plan_name": plan_name})
    desc = bundle.compose_descriptor(
        name="primary", time=t0,
        data_keys={"x": {"dtype": "number", "shape": [], "source": "sim:x", "units": "mm"}})
    docs: Docs = [("start", bundle.start_doc), ("descriptor", desc.descriptor_doc)]
    for i in range(1, n + 1):
        docs.append(("event", desc.compose_event(data={"x": float(i)},
                                                 timestamps={"x": t0 + i}, seq_num=i,
                                                 time=t0 + i)))
    docs.append(("stop", bundle.compose_stop(time=t0 + n + 1)))
    return docs


def multi_descriptor_run(t0: float) -> Docs:
    """One stream, two descriptors (a configuration change: gain 1 -> 5; event-model
    requires equal data keys): events 1-3 then 4-6."""
    bundle = event_model.compose_run(time=t0, metadata={"scan_id": 900, "plan_name": "count"})
    keys = {"x": {"dtype": "number", "shape": [], "source": "sim:x"},
            "n": {"dtype": "integer", "shape": [], "source": "sim:n"}}
    d1 = bundle.compose_descriptor(
        name="primary", data_keys=keys, time=t0, object_keys={"dev": ["x", "n"]},
        configuration={"dev": {"data": {"gain": 1}, "timestamps": {"gain": t0},
                               "data_keys": {"gain": {"dtype": "integer", "shape": [],
                                                      "source": "sim:gain"}}}})
    d2 = bundle.compose_descriptor(
        name="primary", data_keys=keys, time=t0 + 3.5, object_keys={"dev": ["x", "n"]},
        configuration={"dev": {"data": {"gain": 5}, "timestamps": {"gain": t0 + 3.5},
                               "data_keys": {"gain": {"dtype": "integer", "shape": [],
                                                      "source": "sim:gain"}}}})
    docs: Docs = [("start", bundle.start_doc), ("descriptor", d1.descriptor_doc)]
    for i in range(1, 4):
        docs.append(("event", d1.compose_event(data={"x": i * 1.5, "n": i},
                                               timestamps={"x": t0 + i, "n": t0 + i},
                                               seq_num=i, time=t0 + i)))
    docs.append(("descriptor", d2.descriptor_doc))
    for i in range(4, 7):
        docs.append(("event", d2.compose_event(data={"x": i * 1.5, "n": i},
                                               timestamps={"x": t0 + i, "n": t0 + i},
                                               seq_num=i, time=t0 + i)))
    docs.append(("stop", bundle.compose_stop(time=t0 + 10)))
    return docs


def mixed_run(t0: float) -> Docs:
    """Strings, a fixed-shape vector, a 2-d array and a variable-length array."""
    bundle = event_model.compose_run(time=t0, metadata={"scan_id": 901, "plan_name": "count"})
    desc = bundle.compose_descriptor(
        name="primary", time=t0,
        data_keys={"mode": {"dtype": "string", "shape": [], "source": "sim:mode"},
                   "vec": {"dtype": "array", "shape": [3], "source": "sim:vec",
                           "dtype_numpy": "<f8", "units": "V"},
                   "mat": {"dtype": "array", "shape": [2, 4], "source": "sim:mat",
                           "dtype_numpy": "<i4"},
                   "peaks": {"dtype": "array", "shape": [None], "source": "sim:peaks"}})
    docs: Docs = [("start", bundle.start_doc), ("descriptor", desc.descriptor_doc)]
    for i in range(1, 5):
        data = {"mode": "fast" if i % 2 else "slow-mode", "vec": [i, i + 0.5, -i],
                "mat": np.arange(8, dtype=np.int32).reshape(2, 4) * i,
                "peaks": [float(p) for p in range(i)]}
        docs.append(("event", desc.compose_event(data=data, timestamps=dict.fromkeys(data, t0 + i),
                                                 seq_num=i, time=t0 + i)))
    docs.append(("stop", bundle.compose_stop(time=t0 + 10)))
    return docs


def npy_seq_run(directory: Path, *, n: int, t0: float, spec: str = "NPY_SEQ",
                pages: bool = False) -> Docs:
    """External data written by hand: ``<root>/<resource_path>_<i>.npy`` per datum."""
    bundle = event_model.compose_run(time=t0, metadata={"scan_id": 77, "plan_name": "count"})
    directory.mkdir(parents=True, exist_ok=True)
    res = bundle.compose_resource(spec=spec, root=str(directory), resource_path="frames",
                                  resource_kwargs={})
    desc = bundle.compose_descriptor(
        name="primary", time=t0,
        data_keys={"frame": {"dtype": "array", "shape": list(NPY_SHAPE), "source": "sim:f",
                             "external": "FILESTORE:", "dtype_numpy": "<u2"},
                   "temp": {"dtype": "number", "shape": [], "source": "sim:t"}})
    docs: Docs = [("start", bundle.start_doc), ("resource", res.resource_doc),
                  ("descriptor", desc.descriptor_doc)]
    events = []
    for i in range(n):
        np.save(directory / f"frames_{i}.npy",
                (np.arange(256, dtype=np.uint16).reshape(NPY_SHAPE) * (i + 1)),
                allow_pickle=False)
        datum = res.compose_datum(datum_kwargs={"index": i})
        docs.append(("datum", datum))
        ev = desc.compose_event(data={"frame": datum["datum_id"], "temp": 20.0 + i},
                                timestamps={"frame": t0 + i, "temp": t0 + i},
                                filled={"frame": False}, seq_num=i + 1, time=t0 + i + 1)
        if pages:
            events.append(ev)
        else:
            docs.append(("event", ev))
    if pages:
        docs.append(("event_page", event_model.pack_event_page(*events)))
    docs.append(("stop", bundle.compose_stop(time=t0 + n + 2)))
    return docs


def new_uid(prefix: str = "") -> str:
    uid = str(uuid.uuid4())
    return prefix + uid[len(prefix):]


# -- ingestion ----------------------------------------------------------------------------
async def ingest(metadata_uri: str, zarr_root: Path, tenant: str, docs: Sequence[tuple[str, Doc]],
                 *, start_offset: int = 0, tail_rows: int = DEFAULT_BLOCK) -> None:
    """Store ``docs`` exactly as the daemon does; no document may be dead-lettered."""
    ing, sink, registry = make_ingestor(metadata_uri, zarr_root, tail_rows=tail_rows)
    try:
        await ing.process(envelopes(docs, tenant, start_offset=start_offset))
    finally:
        await registry.aclose()
    assert not sink.letters, [(e.where(), str(err)) for e, err in sink.letters]


async def create_store(metadata_uri: str, tenant: str) -> None:
    """Create the tenant's (empty) metadata store, as the daemon does on start."""
    registry = StoreRegistry(metadata_uri)
    try:
        await registry(tenant)
    finally:
        await registry.aclose()


# -- fixtures (imported by the test modules) ---------------------------------------------
@pytest.fixture(name="metadata_uri",
                params=["sqlite", pytest.param("mongo", marks=pytest.mark.mongo)])
def metadata_uri_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'meta.db'}"
    uri: str = request.getfixturevalue("mongo_uri")
    return uri


@pytest.fixture(name="tail_rows", params=[DEFAULT_BLOCK, 0, 3],
                ids=["tail-default", "no-tail", "tail-3"])
def tail_rows_fixture(request: pytest.FixtureRequest, metadata_uri: str) -> int:
    """Where events are stored: short runs wholly in the stream's tail (the default),
    every row in Zarr (tails off), or both (blocks of 3 rows). The two other layouts
    read through the same code on either metadata store (the tail's encoding is the
    store's business, tested with the default): SQLite only, to keep the suite short."""
    rows: int = request.param
    if rows != DEFAULT_BLOCK and metadata_uri.startswith("mongodb://"):
        pytest.skip("non-default tail layouts are read on SQLite only")
    return rows


@pytest.fixture(name="store_docs")
def store_docs_fixture(metadata_uri: str, zarr_root: Path, tenant: str, tail_rows: int) -> Any:
    """``store_docs(docs)`` ingests documents into this test's tenant."""
    offset = [0]

    def store(docs: Docs) -> None:
        anyio.run(partial(ingest, metadata_uri, zarr_root, tenant, docs, start_offset=offset[0],
                          tail_rows=tail_rows))
        offset[0] += len(docs)

    return store


@pytest.fixture(name="cat")
def cat_fixture(metadata_uri: str, zarr_root: Path, tenant: str,
                store_docs: Any) -> Iterator[Catalog]:
    anyio.run(create_store, metadata_uri, tenant)
    catalog = bluestream.open_catalog(tenant, metadata=metadata_uri, zarr_root=zarr_root)
    yield catalog
    catalog.close()


# -- a small databroker-style reference -----------------------------------------------------
def events_of(docs: Iterable[tuple[str, Doc]]) -> list[Doc]:
    out = []
    for name, doc in docs:
        if name == "event":
            out.append(doc)
        elif name == "event_page":
            out.extend(event_model.unpack_event_page(doc))
    return out


def reference_stream(docs: Sequence[tuple[str, Doc]], stream: str,
                     fill: Any = None) -> dict[str, Any]:
    """Expected columns of ``stream``: events grouped by descriptor, later seq_num wins,
    in seq_num order; several descriptors ordered by (time, seq_num). ``fill(key,
    value)`` resolves external values."""
    descs = {d["uid"]: d for n, d in docs if n == "descriptor" and d.get("name") == stream}
    by_desc: dict[str, dict[int, Doc]] = {}
    for ev in events_of(docs):
        if ev["descriptor"] in descs:
            by_desc.setdefault(ev["descriptor"], {})[ev["seq_num"]] = ev
    ordered = sorted(descs.values(), key=lambda d: (d["time"], d["uid"]))
    events = [ev for d in ordered for _, ev in sorted(by_desc.get(d["uid"], {}).items())]
    if len(ordered) > 1:
        events.sort(key=lambda e: (e["time"], e["seq_num"]))
    keys: dict[str, None] = {}
    for d in ordered:
        keys.update(dict.fromkeys(d["data_keys"]))
    external = {k for d in ordered for k, v in d["data_keys"].items() if v.get("external")}
    columns: dict[str, Any] = {}
    for key in keys:
        values = []
        for ev in events:
            v = ev["data"].get(key, np.nan)
            if key in external and fill is not None:
                v = fill(key, v)
            values.append(np.asarray(v))
        columns[key] = np.stack(values) if values else np.zeros(0)
    return {"time": np.array([e["time"] for e in events]),
            "seq_num": np.array([e["seq_num"] for e in events]),
            "uid": np.array([e["uid"] for e in events]),
            "data": columns}


def assert_matches_reference(ds: Any, ref: dict[str, Any], fields: Iterable[str] | None = None
                             ) -> None:
    np.testing.assert_array_equal(ds["time"].values, ref["time"])
    np.testing.assert_array_equal(ds["seq_num"].values, ref["seq_num"])
    np.testing.assert_array_equal(ds["uid"].values, ref["uid"])
    keys = list(ref["data"]) if fields is None else list(fields)
    assert list(ds.data_vars) == keys
    for key in keys:
        got = ds[key].values
        want = ref["data"][key]
        assert got.shape == want.shape, (key, got.shape, want.shape)
        np.testing.assert_array_equal(got, want, err_msg=key)


# -- comparing documents ------------------------------------------------------------------
def plain(obj: Any) -> Any:
    """JSON-comparable form: numpy -> lists/scalars, tuples -> lists."""
    def default(o: Any) -> Any:
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, np.generic):
            return o.item()
        raise TypeError(type(o).__name__)
    return json.loads(json.dumps(obj, default=default))


def _sort_key(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True)


def canonical(docs: Iterable[tuple[str, Doc]]) -> dict[str, Any]:
    """A comparable form of a run's documents that counts duplicates.

    Pages are unpacked (events, datums), so a stream of single events and one of pages
    compare equal, and the order of documents of one kind does not matter; but nothing
    is de-duplicated: every kind is a multiset (its documents sorted, each copy kept),
    ``counts`` gives the number of documents of each kind (events and datums counted
    one by one) and ``repeated`` the uids (datum_ids) seen more than once. A document
    stored or replayed twice therefore makes two canonical forms differ even when the
    copies are identical. Events stay grouped per descriptor, repacked into one page
    in (seq_num, uid) order, repeated seq_nums included.

    Shown on a copy of the tree whose catalog replay yields each descriptor, each event
    page, or each datum twice: the former form (one document per uid or seq_num)
    compared equal and the replay, round-trip and import tests passed; with this one
    they fail, e.g. ``{'counts': {'descriptor': 2, ...}} != {'counts': {'descriptor':
    1, ...}}`` and ``{'repeated': {'event': [...]}} != {'repeated': {}}``.
    """
    kinds: dict[str, list[Any]] = {k: [] for k in ("start", "stop", "descriptor", "resource",
                                                   "datum", "stream_resource",
                                                   "stream_datum")}
    events: dict[str, list[Doc]] = {}
    ids: dict[str, list[str]] = {}
    for name, doc in docs:
        if name in ("event", "event_page"):
            for ev in events_of([(name, doc)]):
                events.setdefault(ev["descriptor"], []).append(ev)
                ids.setdefault("event", []).append(ev["uid"])
            continue
        if name == "datum_page":
            unpacked = [("datum", d) for d in event_model.unpack_datum_page(doc)]
        else:
            unpacked = [(name, doc)]
        for kind, one in unpacked:
            kinds.setdefault(kind, []).append(plain(one))
            ids.setdefault(kind, []).append(one["datum_id"] if kind == "datum" else one["uid"])
    out: dict[str, Any] = {
        "counts": {kind: len(uids) for kind, uids in sorted(ids.items())},
        "repeated": {kind: sorted(u for u, n in Counter(uids).items() if n > 1)
                     for kind, uids in sorted(ids.items())
                     if len(set(uids)) != len(uids)},
    }
    for kind, found in kinds.items():
        out[kind] = sorted(found, key=_sort_key)
    out["events"] = {
        desc: plain(event_model.pack_event_page(
            *sorted(evs, key=lambda e: (e["seq_num"], e["uid"]))))
        for desc, evs in events.items()}
    return out


def assert_valid_order(docs: Sequence[tuple[str, Doc]]) -> None:
    """start first, stop last; parents before children; datums before their events."""
    names = [n for n, _ in docs]
    assert names[0] == "start"
    assert names.count("start") == 1 and names.count("stop") <= 1
    if "stop" in names:
        assert names[-1] == "stop"
    seen: dict[str, set[str]] = {"descriptor": set(), "resource": set(), "datum": set(),
                                 "stream_resource": set()}
    for name, doc in docs:
        if name == "descriptor":
            seen["descriptor"].add(doc["uid"])
        elif name in ("resource", "stream_resource"):
            seen[name].add(doc["uid"])
        elif name == "datum":
            assert doc["resource"] in seen["resource"], "datum before its resource"
            seen["datum"].add(doc["datum_id"])
        elif name == "stream_datum":
            assert doc["stream_resource"] in seen["stream_resource"]
            assert doc["descriptor"] in seen["descriptor"]
        elif name in ("event", "event_page"):
            assert doc["descriptor"] in seen["descriptor"], "event before its descriptor"
            for ev in events_of([(name, doc)]):
                for key, is_filled in (ev.get("filled") or {}).items():
                    if is_filled is False:
                        assert ev["data"][key] in seen["datum"], "event before its datum"


def now() -> float:
    return time.time()
