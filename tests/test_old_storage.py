"""Storage written by an older version stays readable (README, "Upgrade": "Storage
written by an older version stays readable: every Zarr group and ``event_stream``
record carries a ``schema_version``").

``tests/data/storage-v1/`` holds a SQLite file and a Zarr tree written by the previous
released version of the code (commit 9f32a8e, ``bluestream ingest`` of that commit) from
``documents.jsonl`` next to them: a scalar run with a second (baseline) stream, an image
run and a run published as one event_page (``README.md`` there says how it was made).
Today's catalog opens a copy of it and must give back what the documents say: runs,
searches, ``read()`` and ``documents()``, without writing to the storage.

The layout's ``schema_version`` is 1 both in 9f32a8e and today (the test checks that the
fixture says 1), so today this guards against readers drifting from what was actually
written (that version's SQLite file, for instance, has no ``tenant`` table: today's
reader finds the tenant from ``run_start`` instead). When the layout changes and the
version is raised, this test must stay green: old storage keeps being read as it is.

How it was shown to fail: in a copy of the tree (``/tmp/bs-break``, run with
``PYTHONPATH=/tmp/bs-break/src`` so the copy's code wins), one break at a time:
(1) ``_tenant_known``/``_tenants`` in ``storage/sqlite.py`` made to look only at the
``tenant`` table, as if every file had one: 9 tests errored with ``NotFound: tenant 'v1'
does not exist ...; tenants there: (none)`` and the other-tenant test failed;
(2) ``SEQ_NUM`` in ``layout.py`` renamed to ``seq_number`` (a layout change without a
fallback for old groups): every ``read()``/``documents()`` test failed with
``ArrayNotFoundError ... seq_number``; (3) ``catalog/replay.py`` made to drop the last
event of each page and to repeat the first time of an event_page: the three
``documents()`` tests failed; (4) the catalog's store opened with ``readonly=False``: the
teardown check failed with "reading changed the stored files" (the writer's schema
update rewrote ``bluestream.db``); (5) ``links("event_stream")`` of the SQLite store
without its fallback for a file that has no ``event_tail`` table (this one): the verify
and completeness test failed with ``no such table: event_tail``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import event_model
import numpy as np
import pytest
import zarr

import bluestream
from bluestream.catalog import Catalog
from bluestream.errors import NotFound
from bluestream.queries import Contains, Eq, PartialUID, ScanID, TimeRange

FIXTURE = Path(__file__).parent / "data" / "storage-v1"
TENANT = "v1"
Doc = dict[str, Any]
Docs = list[tuple[str, Doc]]


def _source_documents() -> Docs:
    with (FIXTURE / "documents.jsonl").open(encoding="utf-8") as f:
        return [(name, doc) for name, doc in (json.loads(line) for line in f if line.strip())]


def _runs(docs: Docs) -> dict[int, Docs]:
    """The source documents per run, keyed by the start's scan_id."""
    runs: dict[int, Docs] = {}
    current: Docs = []
    for name, doc in docs:
        if name == "start":
            current = runs.setdefault(doc["scan_id"], [])
        current.append((name, doc))
    return runs


def plain(obj: Any) -> Any:
    """numpy values as the lists and Python numbers that JSON documents hold."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    return obj


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def docs() -> Docs:
    return _source_documents()


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[Path]:
    """A copy of the fixture (a test must never be able to change the committed one);
    after the test, the copy must be byte-identical: readers do not write (SQLite's own
    -wal/-shm side files of a WAL-mode database excepted)."""
    copy = tmp_path / "storage-v1"
    shutil.copytree(FIXTURE, copy, ignore=shutil.ignore_patterns("bluestream.sql"))
    # The database is committed as the SQL text of the file 9f32a8e wrote (a binary
    # database file is not something to keep in git); rebuilt here, rows unchanged.
    db = sqlite3.connect(copy / "bluestream.db")
    try:
        db.executescript((FIXTURE / "bluestream.sql").read_text(encoding="utf-8"))
    finally:
        db.close()
    before = _tree_digest(copy)
    yield copy
    after = {k: v for k, v in _tree_digest(copy).items()
             if not k.endswith(("bluestream.db-wal", "bluestream.db-shm"))}
    assert after == before, "reading changed the stored files"


@pytest.fixture
def cat(storage: Path) -> Iterator[Catalog]:
    catalog = bluestream.open_catalog(TENANT, metadata=f"sqlite:///{storage / 'bluestream.db'}",
                                      zarr_root=storage / "zarr")
    try:
        yield catalog
    finally:
        catalog.close()


def test_fixture_is_what_9f32a8e_wrote(storage: Path, docs: Docs) -> None:
    """The fixture is the old layout (no ``tenant`` table, schema_version 1 in every
    group), so the other tests really read old storage."""
    conn = sqlite3.connect(f"{(storage / 'bluestream.db').as_uri()}?mode=ro", uri=True)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        versions = {r[0] for r in conn.execute("SELECT schema_version FROM event_stream")}
        n_streams = conn.execute("SELECT count(*) FROM event_stream").fetchone()[0]
    finally:
        conn.close()
    assert "tenant" not in tables and {"run_start", "event_stream"} <= tables
    assert "event_tail" not in tables  # tails came later (see test_verify_and_completeness)
    assert versions == {1}
    n_descriptors = sum(1 for name, _ in docs if name == "descriptor")
    assert n_streams == n_descriptors == 4
    root = zarr.open_group(str(storage / "zarr"), mode="r")
    groups = [root[f"{TENANT}/{d['run_start'][:2]}/{d['run_start']}/{d['uid']}"]
              for name, d in docs if name == "descriptor"]
    assert [g.attrs["schema_version"] for g in groups] == [1] * 4


def test_runs_and_metadata(cat: Catalog, docs: Docs) -> None:
    runs = _runs(docs)
    starts = sorted((d for n, d in docs if n == "start"), key=lambda d: -d["time"])
    assert list(cat) == [d["uid"] for d in starts]
    assert len(cat) == 3
    for scan_id, run_docs in runs.items():
        run = cat[scan_id]
        assert run.metadata["start"] == run_docs[0][1]
        assert run.metadata["stop"] == run_docs[-1][1]
        assert sorted(run.streams) == sorted({d["name"] for n, d in run_docs
                                              if n == "descriptor"})
    assert cat[-1].uid == starts[0]["uid"]
    assert cat["b2000"].uid == runs[102][0][1]["uid"]


def test_search(cat: Catalog, docs: Docs) -> None:
    uid = {d["scan_id"]: d["uid"] for n, d in docs if n == "start"}
    assert list(cat.search(Eq("plan_name", "scan"))) == [uid[103]]
    assert list(cat.search(Eq("sample.name", "Ge"))) == [uid[102]]
    assert list(cat.search(Eq("plan_name", "count")).search(ScanID(101))) == [uid[101]]
    assert list(cat.search(TimeRange(since=1_700_000_050.0, until=1_700_000_150.0))) == [
        uid[102]]
    assert list(cat.search(Contains("motors", "motor"))) == [uid[103]]
    assert list(cat.search(PartialUID("a1000"))) == [uid[101]]
    assert list(cat.search({"scan_id": {"$gte": 102}})) == [uid[103], uid[102]]
    assert len(cat.search(Eq("plan_name", "fly"))) == 0


def _expected_columns(run_docs: Docs, stream: str) -> tuple[list[Doc], list[str]]:
    descs = {d["uid"] for n, d in run_docs if n == "descriptor" and d["name"] == stream}
    events: list[Doc] = []
    for name, doc in run_docs:
        if name == "event" and doc["descriptor"] in descs:
            events.append(doc)
        elif name == "event_page" and doc["descriptor"] in descs:
            events.extend(event_model.unpack_event_page(doc))
    keys = sorted(events[0]["data"])
    return sorted(events, key=lambda e: e["seq_num"]), keys


@pytest.mark.parametrize(("scan_id", "stream"), [(101, "primary"), (101, "baseline"),
                                                 (102, "primary"), (103, "primary")])
def test_read(cat: Catalog, docs: Docs, scan_id: int, stream: str) -> None:
    run_docs = _runs(docs)[scan_id]
    events, keys = _expected_columns(run_docs, stream)
    ds = cat[scan_id][stream].read()
    assert sorted(ds.data_vars) == keys
    assert ds["seq_num"].values.tolist() == [e["seq_num"] for e in events]
    assert ds["uid"].values.tolist() == [e["uid"] for e in events]
    np.testing.assert_array_equal(ds["time"].values, [e["time"] for e in events])
    desc = next(d for n, d in run_docs if n == "descriptor" and d["name"] == stream)
    for key in keys:
        expected = np.array([e["data"][key] for e in events])
        got = ds[key].values
        assert got.tolist() == expected.tolist(), key
        assert got.shape == (len(events), *desc["data_keys"][key]["shape"]), key
        if "dtype_numpy" in desc["data_keys"][key]:
            assert got.dtype == np.dtype(desc["data_keys"][key]["dtype_numpy"]), key
    lazy = cat[scan_id][stream].to_dask()
    for key in keys:
        assert lazy[key].values.tolist() == ds[key].values.tolist(), key


@pytest.mark.parametrize("scan_id", [101, 102, 103])
def test_documents_replay_what_went_in(cat: Catalog, docs: Docs, scan_id: int) -> None:
    """Runs published as single events come back as the same events (``pages=False``);
    the run published as an event_page comes back as that event_page. Across streams
    the replay order is by page (``catalog/replay.py``), not the publication order, so
    for the two-stream run the order is checked per descriptor."""
    run_docs = _runs(docs)[scan_id]
    published_pages = any(n == "event_page" for n, _ in run_docs)
    out = [(n, plain(d)) for n, d in cat[scan_id].documents(pages=published_pages)]
    _assert_same_documents(out, run_docs)
    if not published_pages:  # packed into pages by default, with the same content
        paged = [(n, plain(d)) for n, d in cat[scan_id].documents()]
        assert {n for n, _ in paged} == {"start", "descriptor", "event_page", "stop"}
        _assert_same_documents(list(_unpack(paged)), run_docs)


def _assert_same_documents(out: Docs, expected: Docs) -> None:
    """The same documents; start first, stop last, each descriptor before its events,
    and each descriptor's events in the order they were published."""
    def key(item: tuple[str, Doc]) -> str:
        return json.dumps(item, sort_keys=True)

    assert sorted(map(key, out)) == sorted(map(key, expected))
    assert out[0] == expected[0] and out[-1] == expected[-1]
    by_descriptor: dict[str, list[Doc]] = {}
    for name, doc in out:
        if name == "descriptor":
            by_descriptor[doc["uid"]] = []
        elif name in ("event", "event_page"):
            by_descriptor[doc["descriptor"]].append(doc)  # KeyError: event first
    for uid, got in by_descriptor.items():
        assert got == [d for n, d in expected
                       if n in ("event", "event_page") and d["descriptor"] == uid]


def _unpack(docs: Iterable[tuple[str, Doc]]) -> Iterator[tuple[str, Doc]]:
    for name, doc in docs:
        if name == "event_page":
            yield from (("event", ev) for ev in event_model.unpack_event_page(doc))
        else:
            yield name, doc


def test_verify_and_completeness(cat: Catalog, docs: Docs) -> None:
    """``verify`` and completeness list the ``event_stream`` links, which the SQLite store
    joins with ``event_tail``; the old file has no such table and a read-only reader must
    not create one, so the records are read as having no tail: every level finds nothing
    wrong and every run is complete."""
    for level in (1, 2, 3, 4):
        assert cat.verify(level=level) == [], level
    assert list(cat.incomplete()) == []
    assert list(cat.incomplete(exact=True)) == []
    uids = [str(d["uid"]) for name, d in docs if name == "start"]
    assert cat.stored(uids) == dict.fromkeys(uids, True)


def test_other_tenant_not_found(storage: Path) -> None:
    """Opening a tenant the old file does not hold names the one it does (found from
    ``run_start``: the old file has no ``tenant`` table)."""
    with pytest.raises(NotFound, match=r"tenants there: v1"):
        bluestream.open_catalog("v2", metadata=f"sqlite:///{storage / 'bluestream.db'}",
                                zarr_root=storage / "zarr")
