"""The conformance suite every :class:`~bluestream.storage.base.MetadataStore` passes.

Like zarr-python's ``StoreTests``: a backend's test module subclasses
:class:`MetadataStoreTests` and provides the ``make_store`` fixture, a callable that
builds an (unopened) store for a tenant at that backend's test location; calling it
twice for one tenant must give two views of the same data (reopen tests rely on it).
Every backend must give the same answers to the same queries over :data:`RUNS`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest

from bluestream.queries import (
    And,
    Annotation,
    Comparison,
    Contains,
    Eq,
    FullText,
    In,
    Key,
    NotEq,
    NotIn,
    OnStop,
    PartialUID,
    Query,
    Raw,
    Regex,
    ScanID,
    TimeRange,
)
from bluestream.storage.base import (
    DOC_KINDS,
    IngestLogEntry,
    IngestSession,
    MetadataStore,
    PutOutcome,
    StreamUpdate,
)

__all__ = ["DOCS", "RUNS", "MetadataStoreTests", "uid"]

INSERTED, SAME, CONFLICT = PutOutcome.INSERTED, PutOutcome.SAME, PutOutcome.CONFLICT
DAY = 86_400.0
T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC).timestamp()  # 2024-03-01T12:00Z

_UIDS = {
    1: "0a1b2c3d-1111-4a00-8000-000000000001",
    2: "0a1b2c3d-2222-4a00-8000-000000000002",
    3: "5e6f7a8b-3333-4a00-8000-000000000003",
    4: "5e6f7a8b-4444-4a00-8000-000000000004",
    5: "9c8d7e6f-5555-4a00-8000-000000000005",
    6: "9c8d7e6f-6666-4a00-8000-000000000006",
    7: "abcdef01-7777-4a00-8000-000000000007",
    8: "abcdef02-8888-4a00-8000-000000000008",
    9: "f0f0f0f0-9999-4a00-8000-000000000009",  # not in RUNS: put by single tests
}


def uid(n: int) -> str:
    return _UIDS[n]


def _start(n: int, time: float, scan_id: int, plan_name: str, num_points: int,
           sample: Any, tags: Any, operator: str, dims: list[Any],
           **more: Any) -> dict[str, Any]:
    return {
        "uid": uid(n), "time": time, "scan_id": scan_id, "plan_name": plan_name,
        "plan_type": "generator", "num_points": num_points, "sample": sample, "tags": tags,
        "operator": operator, "beamline_id": "BL-7", "versions": {"bluesky": "1.13.0"},
        "hints": {"dimensions": dims}, **more,
    }


_T = [[["time"], "primary"]]
#: Eight start documents spread over nine days; times are UTC.
RUNS: dict[int, dict[str, Any]] = {
    1: _start(1, T0, 1, "count", 1,
              {"name": "silicon", "formula": "Si", "temperature": 295.0},
              ["calibration", "standard"], "alice", [[["time"], "primary"]],
              detectors=["det1"], purpose="Detector calibration with silicon standard"),
    2: _start(2, T0 + 0.5 * DAY, 2, "scan", 11,
              {"name": "LaB6", "formula": "LaB6", "temperature": 295.0},
              ["calibration"], "bob", [[["motor_x"], "primary"]], motors=["motor_x"]),
    3: _start(3, T0 + 1.25 * DAY, 3, "scan", 21,
              {"name": "ferrocene", "formula": "Fe(C5H5)2", "temperature": 100.0},
              ["kinetics", "cryo"], "alice",
              [[["motor_x"], "primary"], [["motor_y"], "primary"]],
              motors=["motor_x", "motor_y"], comment="first look at the ferrocene crystal"),
    4: _start(4, T0 + 2 * DAY, 3, "rel_scan", 21,
              {"name": "ferrocene", "formula": "Fe(C5H5)2", "temperature": 100.0},
              ["kinetics"], "carol", [[["motor_x"], "primary"]], motors=["motor_x"]),
    5: _start(5, T0 + 3 * DAY, 5, "grid_scan", 121,
              {"name": "silicon wafer", "formula": "Si", "temperature": 80.5},
              [], "bob", [[["motor_x"], "primary"], [["motor_y"], "primary"]],
              shape=[11, 11], note="Dark frame; 50% attenuation (Al)"),
    6: _start(6, T0 + 4.5 * DAY, 6, "count", 5, {"name": "water", "formula": "H2O"},
              ["liquid", "calibration"], "dave", [[["time"], "primary"]]),
    7: _start(7, T0 + 6 * DAY, 7, "list_scan", 3, "unknown sample", "misc", "alice",
              [[["motor_x"], "primary"]]),
    8: _start(8, T0 + 9 * DAY, 8, "scan", 41,
              {"name": "LaB6", "formula": "LaB6", "temperature": 295.0},
              ["standard"], "eve", [[["motor_x"], "primary"]]),
}
NEWEST_FIRST = [8, 7, 6, 5, 4, 3, 2, 1]

#: One realistic document of every kind, all belonging to run 1.
DOCS: dict[str, dict[str, Any]] = {
    "start": RUNS[1],
    "stop": {"uid": "stop-0001", "run_start": uid(1), "time": T0 + 60,
             "exit_status": "success", "reason": "", "num_events": {"primary": 1}},
    "descriptor": {"uid": "desc-0001", "run_start": uid(1), "time": T0 + 1, "name": "primary",
                   "data_keys": {"det1": {"source": "PV:det1", "dtype": "number", "shape": [],
                                          "dtype_numpy": "<f8"}},
                   "configuration": {}, "object_keys": {"det1": ["det1"]},
                   "hints": {"det1": {"fields": ["det1"]}}},
    "resource": {"uid": "res-0001", "run_start": uid(1), "spec": "AD_HDF5", "root": "/data",
                 "resource_path": "2024/03/01/a.h5", "resource_kwargs": {"frame_per_point": 1},
                 "path_semantics": "posix"},
    "datum": {"datum_id": "res-0001/0", "resource": "res-0001",
              "datum_kwargs": {"point_number": 0}},
    "stream_resource": {"uid": "sres-0001", "run_start": uid(1), "data_key": "det2",
                        "mimetype": "application/x-hdf5",
                        "uri": "file://localhost/data/2024/03/01/b.h5",
                        "parameters": {"dataset": "/entry/data/data"}},
    "stream_datum": {"uid": "sres-0001/0", "stream_resource": "sres-0001",
                     "descriptor": "desc-0001", "indices": {"start": 0, "stop": 5},
                     "seq_nums": {"start": 1, "stop": 6}},
}


def _key(kind: str, doc: dict[str, Any]) -> str:
    return str(doc[DOC_KINDS[kind][1]])


def _local(text: str) -> float:
    return datetime.fromisoformat(text).astimezone().timestamp()


def _stream(desc: str, length: int, lo: int, hi: int, t0: float, t1: float,
            run: int = 1) -> StreamUpdate:
    return StreamUpdate(descriptor_uid=desc, run_start=uid(run), stream_name="primary",
                        zarr_path=f"{uid(run)[:2]}/{uid(run)}/{desc}", length=length,
                        seq_num_min=lo, seq_num_max=hi, time_min=t0, time_max=t1,
                        data_keys=("det1", "motor_x"))


def _record(u: StreamUpdate) -> dict[str, Any]:
    rec = dataclasses.asdict(u)
    rec["data_keys"] = list(u.data_keys)
    return rec


# The shared query table: (id, query, expected runs newest first). Every backend must
# return exactly these runs in exactly this order.
_LOCAL_SINCE = "2024-03-02 06:00"
QUERY_CASES: list[tuple[str, Query | None, list[int]]] = [
    ("none", None, NEWEST_FIRST),
    ("time-utc-strings", TimeRange(since="2024-03-02", until="2024-03-04", timezone="UTC"),
     [4, 3, 2]),
    ("time-since-inclusive", TimeRange(since=RUNS[2]["time"]), [8, 7, 6, 5, 4, 3, 2]),
    ("time-until-exclusive", TimeRange(until=RUNS[2]["time"]), [1]),
    ("time-datetimes", TimeRange(since=datetime(2024, 3, 2, 12, tzinfo=UTC),
                                 until=datetime(2024, 3, 4, 12, tzinfo=UTC)), [4, 3]),
    ("time-naive-in-zone", TimeRange(since="2024-03-02 01:00", until="2024-03-02 02:00",
                                     timezone="Europe/Berlin"), [2]),
    ("time-offset-string", TimeRange(since="2024-03-10T00:00:00+02:00"), [8]),
    ("time-year-only", TimeRange(since="2024", until="2025", timezone="UTC"), NEWEST_FIRST),
    ("time-local-zone", TimeRange(since=_LOCAL_SINCE),
     [n for n in NEWEST_FIRST if RUNS[n]["time"] >= _local(_LOCAL_SINCE)]),
    ("scan-id-all", ScanID(3, duplicates="all"), [4, 3]),
    ("scan-ids-all", ScanID(1, 5, 99, duplicates="all"), [5, 1]),
    ("scan-id-latest", ScanID(3), [4]),  # databroker's default: the newest duplicate
    ("scan-ids-latest", ScanID(1, 3, 99, duplicates="latest"), [4, 1]),
    ("scan-id-error-unique", ScanID(5, duplicates="error"), [5]),
    ("partial-uid", PartialUID("5e6f7a8b"), [4, 3]),
    ("partial-uids", PartialUID("9c8d7e6f-5555", "abcdef02"), [8, 5]),
    ("eq", Eq("plan_name", "scan"), [8, 3, 2]),
    ("eq-nested", Eq("sample.name", "LaB6"), [8, 2]),
    ("eq-list-element", Eq("tags", "calibration"), [6, 2, 1]),
    ("eq-whole-list", Eq("tags", ["calibration", "standard"]), [1]),
    ("eq-nested-arrays", Eq("hints.dimensions", [[["time"], "primary"]]), [6, 1]),
    ("eq-dict", Eq("sample", {"name": "water", "formula": "H2O"}), [6]),
    ("eq-int", Eq("num_points", 21), [4, 3]),
    ("eq-int-as-float", Eq("num_points", 21.0), [4, 3]),
    ("eq-number-is-not-string", Eq("num_points", "21"), []),
    ("eq-none-is-missing", Eq("sample.temperature", None), [7, 6]),
    ("eq-missing-key", Eq("no_such_key", 1), []),
    ("ne", NotEq("plan_name", "scan"), [7, 6, 5, 4, 1]),
    ("ne-list", NotEq("tags", "calibration"), [8, 7, 5, 4, 3]),
    ("in", In("plan_name", ["count", "grid_scan"]), [6, 5, 1]),
    ("in-list-field", In("tags", ["cryo", "liquid"]), [6, 3]),
    ("in-empty", In("plan_name", []), []),
    ("not-in", NotIn("operator", ["alice", "bob"]), [8, 6, 4]),
    ("contains-list", Contains("tags", "standard"), [8, 1]),
    ("contains-list-is-not-substring", Contains("tags", "calib"), []),
    ("contains-substring", Contains("comment", "ferrocene"), [3]),
    ("contains-string-field", Contains("tags", "mis"), [7]),
    ("contains-special-chars", Contains("note", "50% attenuation (Al)"), [5]),
    ("contains-number", Contains("shape", 11), [5]),
    ("regex", Regex("sample.name", "^silicon"), [5, 1]),
    ("regex-case-insensitive", Regex("operator", "^ALI", case_sensitive=False), [7, 3, 1]),
    ("regex-case-sensitive", Regex("operator", "^ALI"), []),
    ("regex-list-elements", Regex("tags", "^cal"), [6, 2, 1]),
    ("regex-not-on-numbers", Regex("num_points", "2"), []),
    ("full-text", FullText("silicon"), [5, 1]),
    ("full-text-all-words", FullText("Silicon standard"), [1]),
    ("full-text-case", FullText("CRYO"), [3]),
    ("full-text-nested", FullText("ferrocene"), [4, 3]),
    ("full-text-no-match", FullText("silicon ferrocene"), []),
    ("gt", Key("num_points") > 20, [8, 5, 4, 3]),
    ("le", Key("num_points") <= 5, [7, 6, 1]),
    ("lt-nested", Key("sample.temperature") < 200, [5, 4, 3]),
    ("ge-string", Key("plan_name") >= "scan", [8, 3, 2]),
    ("cmp-eq", Key("num_points") == 21, [4, 3]),
    ("cmp-ne", Key("num_points") != 21, [8, 7, 6, 5, 2, 1]),
    ("cmp-list-elements", Key("shape") > 10, [5]),
    ("raw-implicit-and", Raw({"plan_name": "scan", "num_points": {"$gt": 15}}), [8, 3]),
    ("raw-or", Raw({"$or": [{"scan_id": 1}, {"operator": "eve"}]}), [8, 1]),
    ("raw-and-range", Raw({"$and": [{"scan_id": {"$gte": 3}}, {"scan_id": {"$lt": 6}}]}),
     [5, 4, 3]),
    ("raw-exists-false", Raw({"sample.temperature": {"$exists": False}}), [7, 6]),
    ("raw-exists-true", Raw({"comment": {"$exists": True}}), [3]),
    ("raw-in", Raw({"tags": {"$in": ["cryo"]}}), [3]),
    ("raw-nin", Raw({"plan_name": {"$nin": ["scan", "count"]}}), [7, 5, 4]),
    ("raw-ne", Raw({"operator": {"$ne": "alice"}}), [8, 6, 5, 4, 2]),
    ("raw-eq-lte", Raw({"sample.temperature": {"$eq": 295.0}, "num_points": {"$lte": 11}}),
     [2, 1]),
    ("raw-regex-options", Raw({"operator": {"$regex": "^A", "$options": "i"}}), [7, 3, 1]),
    ("raw-empty", Raw({}), NEWEST_FIRST),
    ("and", And(Eq("plan_name", "scan"), TimeRange(since="2024-03-02T12:00", timezone="UTC")),
     [8, 3]),
    ("and-full-text", And(FullText("calibration"), Eq("operator", "alice")), [1]),
    ("and-two-full-texts", And(FullText("calibration"), FullText("standard")), [1]),
    ("and-empty", And(), NEWEST_FIRST),
]


class MetadataStoreTests:
    """Subclass and provide ``make_store``: ``(tenant) -> MetadataStore`` (unopened)."""

    pytestmark = pytest.mark.anyio

    @pytest.fixture
    def make_store(self) -> Callable[[str], MetadataStore]:
        raise NotImplementedError("backends provide make_store")

    @pytest.fixture
    async def store(self, make_store: Callable[[str], MetadataStore],
                    tenant: str) -> AsyncIterator[MetadataStore]:
        s = make_store(tenant)
        await s.open()
        try:
            yield s
        finally:
            await s.close()

    @pytest.fixture
    async def runs(self, store: MetadataStore) -> MetadataStore:
        """The store with :data:`RUNS` in it, put in an order unlike their times."""
        order = [5, 2, 8, 1, 7, 3, 6, 4]
        assert await store.put_documents("start", [RUNS[n] for n in order]) == [INSERTED] * 8
        return store

    # -- lifecycle ----------------------------------------------------------------------

    async def test_open_is_idempotent_and_ping(self, store: MetadataStore) -> None:
        await store.open()
        await store.ping()
        assert store.tenant
        assert "://" in store.uri

    async def test_reopen_sees_the_data(self, make_store: Callable[[str], MetadataStore],
                                        tenant: str) -> None:
        first = make_store(tenant)
        await first.open()
        await first.put_documents("start", [RUNS[1]])
        await first.put_documents("descriptor", [DOCS["descriptor"]])
        await first.update_streams([_stream("desc-0001", 3, 1, 3, T0, T0 + 2)])
        await first.close()
        again = make_store(tenant)
        await again.open()
        try:
            assert await again.get("start", uid(1)) == RUNS[1]
            assert await again.put_documents("start", [RUNS[1]]) == [SAME]
            assert await again.find("descriptor", run_start=uid(1)) == [DOCS["descriptor"]]
            assert await again.streams(uid(1)) == [_record(_stream("desc-0001", 3, 1, 3, T0,
                                                                   T0 + 2))]
            assert await again.search(FullText("silicon")) == [RUNS[1]]
        finally:
            await again.close()

    async def test_tenants_are_isolated(self, make_store: Callable[[str], MetadataStore],
                                        store: MetadataStore, tenant: str) -> None:
        # (mongo-java-server's dropDatabase("t1") breaks a database named "t1x".)
        other = make_store("o" + tenant[1:])  # not an extension of the name
        await other.open()
        try:
            await store.put_documents("start", [RUNS[1]])
            assert await other.get("start", uid(1)) is None
            assert await other.count(None) == 0
            assert await other.put_documents("start", [RUNS[2] | {"uid": uid(1)}]) == [INSERTED]
            assert await store.get("start", uid(1)) == RUNS[1]
        finally:
            await other.close()

    # -- put / get ------------------------------------------------------------------------

    @pytest.mark.parametrize("kind", list(DOC_KINDS))
    async def test_put_get_each_kind(self, store: MetadataStore, kind: str) -> None:
        doc = DOCS[kind]
        assert await store.get(kind, _key(kind, doc)) is None
        assert await store.put_documents(kind, [doc]) == [INSERTED]
        got = await store.get(kind, _key(kind, doc))
        assert got == doc
        assert got is not None and "_id" not in got
        assert list(got) == list(doc)  # field order kept, as suitcase-mongo stores it

    @pytest.mark.parametrize("kind", list(DOC_KINDS))
    async def test_replay_is_same(self, store: MetadataStore, kind: str) -> None:
        doc = DOCS[kind]
        await store.put_documents(kind, [doc])
        reordered = dict(reversed(list(doc.items())))
        assert await store.put_documents(kind, [doc, reordered]) == [SAME, SAME]

    @pytest.mark.parametrize("kind", list(DOC_KINDS))
    async def test_conflict_leaves_stored_document(self, store: MetadataStore,
                                                   kind: str) -> None:
        doc = DOCS[kind]
        await store.put_documents(kind, [doc])
        changed = {**doc, "extra": "different"}
        assert await store.put_documents(kind, [changed]) == [CONFLICT]
        assert await store.get(kind, _key(kind, doc)) == doc

    async def test_put_does_not_modify_the_callers_documents(self,
                                                             store: MetadataStore) -> None:
        doc = dict(RUNS[1])
        await store.put_documents("start", [doc])
        assert doc == RUNS[1]

    async def test_duplicate_keys_in_one_call(self, store: MetadataStore) -> None:
        a = DOCS["descriptor"]
        b = {**a, "name": "baseline"}
        assert await store.put_documents("descriptor", [a, a, b]) == [INSERTED, SAME, CONFLICT]
        assert await store.get("descriptor", a["uid"]) == a

    async def test_mixed_batch(self, store: MetadataStore) -> None:
        await store.put_documents("start", [RUNS[1], RUNS[2]])
        batch = [RUNS[2], RUNS[3], {**RUNS[1], "plan_name": "other"}, RUNS[3]]
        assert await store.put_documents("start", batch) == [SAME, INSERTED, CONFLICT, SAME]
        assert await store.count(None) == 3

    async def test_empty_put(self, store: MetadataStore) -> None:
        assert await store.put_documents("start", []) == []

    async def test_unknown_kind(self, store: MetadataStore) -> None:
        with pytest.raises(ValueError, match="unknown document kind"):
            await store.put_documents("event", [{"uid": "x"}])

    async def test_stop_with_a_used_uid_conflicts(self, store: MetadataStore) -> None:
        stop = DOCS["stop"]
        await store.put_documents("stop", [stop])
        other_run = {**stop, "run_start": uid(2)}  # new key, but the uid is taken
        assert await store.put_documents("stop", [other_run]) == [CONFLICT]
        assert await store.get("stop", uid(2)) is None
        # Twice in one call: the second copy is no replay of a stored document (the
        # fuzzer found SQLite answering SAME for it: neither stored nor dead-lettered).
        assert await store.put_documents("stop", [other_run, other_run]) == [CONFLICT,
                                                                             CONFLICT]

    async def test_non_finite_floats_round_trip(self, store: MetadataStore) -> None:
        doc = {**RUNS[1], "ring_current": math.nan, "limits": [-math.inf, math.inf]}
        assert await store.put_documents("start", [doc]) == [INSERTED]
        assert await store.put_documents("start", [doc]) == [SAME]
        got = await store.get("start", uid(1))
        assert got is not None and math.isnan(got["ring_current"])
        assert got["limits"] == [-math.inf, math.inf]
        assert [d["uid"] for d in await store.search(Eq("plan_name", "count"))] == [uid(1)]

    async def test_int_and_float_differ(self, store: MetadataStore) -> None:
        await store.put_documents("start", [RUNS[1]])
        assert await store.put_documents("start", [{**RUNS[1], "num_points": 1.0}]) == [CONFLICT]

    async def test_concurrent_puts(self, store: MetadataStore) -> None:
        results: list[list[PutOutcome]] = []

        async def put(n: int) -> None:
            results.append(await store.put_documents("start", [RUNS[n]]))

        async with anyio.create_task_group() as tg:
            for n in (*RUNS, *RUNS):
                tg.start_soon(put, n)
        assert sorted(r[0].value for r in results) == ["inserted"] * 8 + ["same"] * 8
        assert await store.count(None) == 8

    # -- find -----------------------------------------------------------------------------

    async def test_find(self, store: MetadataStore) -> None:
        d1 = DOCS["descriptor"]
        d2 = {**d1, "uid": "desc-0002", "name": "baseline", "time": T0 + 0.5}
        d3 = {**d1, "uid": "desc-0003", "run_start": uid(2), "time": T0}
        await store.put_documents("descriptor", [d1, d3, d2])
        assert await store.find("descriptor", run_start=uid(1)) == [d2, d1]
        assert await store.find("descriptor", keys=["desc-0003", "desc-0001", "nope"]) == [d3, d1]
        assert await store.find("descriptor", run_start=uid(1), keys=["desc-0003"]) == []
        assert await store.find("descriptor", run_start="nope") == []

    async def test_find_by_resource(self, store: MetadataStore) -> None:
        datums = [{"datum_id": f"res-0001/{i}", "resource": "res-0001",
                   "datum_kwargs": {"point_number": i}} for i in (2, 0, 1)]
        other = {"datum_id": "res-0002/0", "resource": "res-0002", "datum_kwargs": {}}
        await store.put_documents("datum", [*datums, other])
        found = await store.find("datum", resource="res-0001")
        assert [d["datum_id"] for d in found] == ["res-0001/0", "res-0001/1", "res-0001/2"]
        await store.put_documents("stream_datum", [DOCS["stream_datum"]])
        assert await store.find("stream_datum", resource="sres-0001") == [DOCS["stream_datum"]]
        with pytest.raises(ValueError):
            await store.find("descriptor", resource="res-0001")
        with pytest.raises(ValueError):
            await store.find("datum")

    async def test_find_start_and_stop_by_run(self, store: MetadataStore) -> None:
        await store.put_documents("start", [RUNS[1], RUNS[2]])
        await store.put_documents("stop", [DOCS["stop"]])
        assert await store.find("start", run_start=uid(1)) == [RUNS[1]]
        assert await store.find("stop", run_start=uid(1)) == [DOCS["stop"]]
        assert await store.get("stop", uid(1)) == DOCS["stop"]

    # -- streams and ingest log -----------------------------------------------------------

    async def test_streams_merge(self, store: MetadataStore) -> None:
        updates = [_stream("desc-a", 10, 1, 10, T0, T0 + 9),
                   _stream("desc-a", 25, 11, 25, T0 + 10, T0 + 24),
                   _stream("desc-a", 5, 3, 5, T0 + 2, T0 + 4)]  # a replayed older batch
        await store.update_streams(updates)
        expected = _record(_stream("desc-a", 25, 1, 25, T0, T0 + 24))
        assert await store.streams(uid(1)) == [expected]
        await store.update_streams(updates)  # idempotent
        assert await store.streams(uid(1)) == [expected]

    async def test_streams_order_independent(self, store: MetadataStore) -> None:
        ups = [(10, 1, 10, T0, T0 + 9), (25, 11, 25, T0 + 10, T0 + 24), (5, 3, 5, T0 + 2, T0 + 4)]
        for i, order in enumerate([(0, 1, 2), (2, 1, 0), (1, 2, 0), (1, 0, 2)]):
            for j in order:
                await store.update_streams([_stream(f"desc-{i}", *ups[j])])
        records = await store.streams(uid(1))
        assert len(records) == 4
        assert all({**r, "descriptor_uid": "x", "zarr_path": "x"}
                   == {**records[0], "descriptor_uid": "x", "zarr_path": "x"} for r in records)
        assert records[0]["length"] == 25 and records[0]["seq_num_min"] == 1

    async def test_streams_per_run_and_sorted(self, store: MetadataStore) -> None:
        base = _stream("desc-b", 1, 1, 1, T0, T0)
        await store.update_streams([
            base, dataclasses.replace(base, descriptor_uid="desc-a", stream_name="baseline"),
            _stream("desc-c", 1, 1, 1, T0, T0, run=2),
        ])
        names = [(r["stream_name"], r["descriptor_uid"]) for r in await store.streams(uid(1))]
        assert names == [("baseline", "desc-a"), ("primary", "desc-b")]
        assert [r["descriptor_uid"] for r in await store.streams(uid(2))] == ["desc-c"]
        assert await store.streams("nope") == []
        await store.update_streams([])

    async def test_ingest_log_merge(self, store: MetadataStore) -> None:
        def entry(lo: int, hi: int, partition: int = 0, **extra: Any) -> IngestLogEntry:
            return IngestLogEntry(run_start=uid(1), topic="bl7.bluesky.runengine.documents",
                                  partition=partition, offset_min=lo, offset_max=hi,
                                  daemon_version="0.1.0", host="ingest-1", extra=extra)

        await store.log_ingest([entry(10, 20, key="k1"), entry(5, 15), entry(18, 30, group="g")])
        await store.log_ingest([entry(100, 100, partition=3)])
        await store.log_ingest([entry(10, 20)])  # replay: nothing changes
        topic = "bl7.bluesky.runengine.documents"
        assert await store.ingest_log(uid(1)) == [
            {"run_start": uid(1), "topic": topic, "partition": 0, "offset_min": 5,
             "offset_max": 30, "daemon_version": "0.1.0", "host": "ingest-1",
             "extra": {"key": "k1", "group": "g"}, "sessions": {}},
            {"run_start": uid(1), "topic": topic, "partition": 3, "offset_min": 100,
             "offset_max": 100, "daemon_version": "0.1.0", "host": "ingest-1", "extra": {},
             "sessions": {}},
        ]
        assert await store.ingest_log(uid(2)) == []
        with pytest.raises(ValueError):
            await store.log_ingest([entry(1, 2, **{"a.b": 1})])

    async def test_ingest_log_sessions(self, store: MetadataStore) -> None:
        """Each writing process keeps its own offset range (a daemon killed and
        restarted names both), merged with min/max like the record's."""
        first = IngestSession("a" * 32, "host-a", 11, T0, "0.1.0")
        second = IngestSession("b" * 32, "host-b", 22, T0 + 60, "0.2.0")

        def entry(lo: int, hi: int, session: IngestSession) -> IngestLogEntry:
            return IngestLogEntry(uid(1), "t", 0, lo, hi, session.daemon_version,
                                  session.host, session=session)

        await store.log_ingest([entry(10, 20, first), entry(5, 12, first)])
        await store.log_ingest([entry(18, 40, second)])
        await store.log_ingest([entry(18, 40, second)])  # replay: nothing changes
        [rec] = await store.ingest_log(uid(1))
        assert (rec["offset_min"], rec["offset_max"], rec["extra"]) == (5, 40, {})
        assert rec["sessions"] == {
            first.id: {"host": "host-a", "pid": 11, "started": T0, "daemon_version": "0.1.0",
                       "offset_min": 5, "offset_max": 20},
            second.id: {"host": "host-b", "pid": 22, "started": T0 + 60,
                        "daemon_version": "0.2.0", "offset_min": 18, "offset_max": 40},
        }
        with pytest.raises(ValueError, match="reserved"):
            await store.log_ingest([IngestLogEntry(uid(1), "t", 0, 1, 2, "v",
                                                   extra={"sessions": 1})])

    # -- annotations and removal ----------------------------------------------------------

    async def test_annotation_versions(self, store: MetadataStore) -> None:
        await store.put_documents("start", [RUNS[1], RUNS[2]])
        assert await store.add_annotation(uid(1), "quality", "good", time=T0,
                                          author="ann", note="first look") == 1
        assert await store.add_annotation(uid(1), "quality", "bad", time=T0 + 1) == 2
        assert await store.add_annotation(uid(1), "dose", 1.5, time=T0 + 2) == 1
        assert await store.add_annotation(uid(2), "quality", {"grade": [1, 2]},
                                          time=T0 + 3) == 1
        history = await store.annotations(uid(1), "quality")
        assert history == [
            {"key": "quality", "version": 1, "value": "good", "time": T0, "author": "ann",
             "note": "first look"},
            {"key": "quality", "version": 2, "value": "bad", "time": T0 + 1, "author": None,
             "note": None},
        ]
        assert [(a["key"], a["version"]) for a in await store.annotations(uid(1))] == [
            ("dose", 1), ("quality", 1), ("quality", 2)]
        assert await store.annotation_values("quality") == {uid(1): "bad",
                                                            uid(2): {"grade": [1, 2]}}
        await store.add_annotation(uid(1), "quality", None, time=T0 + 4)  # cleared
        assert await store.annotation_values("quality") == {uid(2): {"grade": [1, 2]}}
        assert len(await store.annotations(uid(1), "quality")) == 3
        assert await store.get("start", uid(1)) == RUNS[1]  # never modified

    async def test_concurrent_annotations_get_distinct_versions(
            self, store: MetadataStore) -> None:
        versions: list[int] = []

        async def add(i: int) -> None:
            versions.append(await store.add_annotation(uid(1), "k", i, time=T0 + i))

        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(add, i)
        assert sorted(versions) == [1, 2, 3, 4, 5]

    async def test_annotation_queries(self, runs: MetadataStore) -> None:
        await runs.add_annotation(uid(1), "quality", "good", time=T0)
        await runs.add_annotation(uid(2), "quality", "good", time=T0)
        await runs.add_annotation(uid(2), "quality", "bad", time=T0 + 1)  # newest wins
        await runs.add_annotation(uid(3), "quality", "great", time=T0)
        await runs.add_annotation(uid(4), "dose", 3, time=T0)
        await runs.add_annotation(uid(5), "dose", 7.5, time=T0)
        await runs.add_annotation(uid(6), "dose", "7", time=T0)  # a string is no number

        async def uids(q: Query) -> list[str]:
            return sorted(d["uid"] for d in await runs.search(q))

        assert await uids(Annotation("quality") == "good") == [uid(1)]
        assert await uids(Annotation("quality").isin(["bad", "great"])) == [uid(2), uid(3)]
        assert await uids(Annotation("quality").exists()) == [uid(1), uid(2), uid(3)]
        assert await uids(Annotation("dose") > 5) == [uid(5)]
        assert await uids(Annotation("dose") <= 3.0) == [uid(4)]
        assert await uids(Annotation("dose") == 7.5) == [uid(5)]
        assert len(await uids(Annotation("quality") != "good")) == 7  # unannotated too
        assert await uids(And(Annotation("quality").exists(), Eq("plan_name", "count"))) \
            == sorted(d["uid"] for d in await runs.search(Eq("plan_name", "count"))
                      if d["uid"] in (uid(1), uid(2), uid(3)))
        assert await runs.count(Annotation("quality") == "nothing") == 0
        with pytest.raises(ValueError, match="annotation key"):
            await runs.search(Annotation("bad key!") == 1)

    async def test_annotation_query_matching_many_runs(self, store: MetadataStore) -> None:
        """Thousands of annotated runs: the uids an annotation query resolves to are
        one predicate, not one each (SQLite refused ~1,000 as too deep an expression)."""
        n = 2_000
        starts = [{"uid": f"many-{i:05d}", "time": T0 + i, "scan_id": i} for i in range(n)]
        await store.put_documents("start", starts)
        for i, doc in enumerate(starts):
            await store.add_annotation(doc["uid"], "quality", "good" if i % 4 else "bad",
                                       time=T0)
        assert await store.count(Annotation("quality") == "good") == n - n // 4
        assert await store.count(Annotation("quality") != "good") == n // 4
        found = await store.search(And(Annotation("quality") == "bad", ScanID(8)))
        assert [d["uid"] for d in found] == ["many-00008"]

    async def test_removal_hides_then_deletes(self, runs: MetadataStore) -> None:
        desc = {**DOCS["descriptor"], "run_start": uid(1)}
        await runs.put_documents("descriptor", [desc])
        await runs.put_documents("stop", [{**DOCS["stop"], "run_start": uid(1)}])
        await runs.put_documents("resource", [{**DOCS["resource"], "run_start": uid(1)}])
        await runs.put_documents("datum", [{**DOCS["datum"],
                                            "resource": DOCS["resource"]["uid"]}])
        await runs.update_streams([StreamUpdate(desc["uid"], uid(1), "primary", "t/x", 3, 1,
                                                3, T0, T0 + 1, ("x",), tail=b"rows",
                                                tail_start=0)])
        await runs.log_ingest([IngestLogEntry(uid(1), "t", 0, 1, 9, "v")])
        await runs.add_annotation(uid(1), "quality", "good", time=T0)
        total = await runs.count(None)

        await runs.mark_removed([uid(1)], {"time": T0, "by": "test"})
        assert await runs.removal_marks() == [{"uid": uid(1), "time": T0, "by": "test"}]
        assert uid(1) not in [d["uid"] for d in await runs.search(None)]
        assert uid(1) not in await runs.search_uids(None)
        assert await runs.count(None) == total - 1
        assert await runs.uids_with_prefix(uid(1)[:8]) == [uid(2)]
        assert await runs.search(Annotation("quality") == "good") == []

        counts = await runs.delete_run(uid(1))
        assert counts["start"] == 1 and counts["descriptor"] == 1 and counts["datum"] == 1
        assert await runs.removal_marks() == []
        for kind in ("start", "stop"):
            assert await runs.get(kind, uid(1)) is None
        assert await runs.get("descriptor", desc["uid"]) is None
        assert await runs.get("datum", DOCS["datum"]["datum_id"]) is None
        assert await runs.streams(uid(1)) == []
        assert await runs.tails([desc["uid"]]) == {}
        assert await runs.ingest_log(uid(1)) == []
        assert await runs.annotations(uid(1)) == []
        assert await runs.count(None) == total - 1
        assert (await runs.delete_run(uid(1)))["start"] == 0  # a rerun is harmless

    # -- search ---------------------------------------------------------------------------

    @pytest.mark.parametrize(("query", "expected"), [pytest.param(q, e, id=i)
                                                     for i, q, e in QUERY_CASES])
    async def test_search(self, runs: MetadataStore, query: Query | None,
                          expected: Sequence[int]) -> None:
        found = await runs.search(query)
        assert [d["uid"] for d in found] == [uid(n) for n in expected]
        assert found == [RUNS[n] for n in expected]
        assert await runs.count(query) == len(expected)
        # the catalog lists uids through search_uids: same runs, same order
        assert await runs.search_uids(query) == [uid(n) for n in expected]

    async def test_stop_queries(self, runs: MetadataStore) -> None:
        """OnStop: runs whose stop matches (Tiled clients send ``stop.<key>``); open runs
        never match; a stop holding NaN (not JSON to older SQLite) breaks nothing."""
        def stop(n: int, status: str, events: int, **extra: Any) -> dict[str, Any]:
            return {"uid": f"stop-{n:04d}", "run_start": uid(n), "time": T0 + n * DAY + 60,
                    "exit_status": status, "reason": "", "num_events": {"primary": events},
                    **extra}

        await runs.put_documents("stop", [
            stop(1, "success", 1), stop(2, "fail", 11, reason_detail="motor stalled"),
            stop(3, "success", 21), stop(5, "abort", 121, tags=["night", "cryo"]),
            stop(6, "success", 5, temperature=float("nan"))])
        # runs 4, 7 and 8 are open
        cases: list[tuple[Query, list[int]]] = [
            (Eq("exit_status", "success"), [6, 3, 1]),
            (NotEq("exit_status", "success"), [5, 2]),  # open runs are not "not success"
            (Comparison("gt", "num_events.primary", 20), [5, 3]),
            (In("exit_status", ["fail", "abort"]), [5, 2]),
            (NotIn("exit_status", ["fail", "abort"]), [6, 3, 1]),
            (Contains("tags", "night"), [5]),
            (Regex("reason_detail", "^motor"), [2]),
            (TimeRange(since=T0 + 2 * DAY, until=T0 + 5.5 * DAY), [5, 3, 2]),
            (Raw({"reason_detail": {"$exists": True}}), [2]),
            (And(Eq("exit_status", "success"), Comparison("lt", "num_events.primary", 10)),
             [6, 1]),
        ]
        for query, expected in cases:
            got = sorted(await runs.stopped_runs(query))
            assert got == sorted(uid(n) for n in expected), (query, got)
            found = await runs.search(OnStop(query))
            assert [d["uid"] for d in found] == [uid(n) for n in expected], query
            assert await runs.count(OnStop(query)) == len(expected)
        both = And(Eq("plan_name", "scan"), OnStop(Eq("exit_status", "success")))
        assert await runs.search_uids(both) == [uid(3)]
        assert await runs.uids_with_prefix("", OnStop(Eq("exit_status", "fail"))) == [uid(2)]
        with pytest.raises(ValueError, match="OnStop"):
            OnStop(ScanID(3))
        with pytest.raises(ValueError, match="OnStop"):
            OnStop(And(Eq("exit_status", "success"), FullText("silicon")))

    async def test_scan_id_duplicates_error(self, runs: MetadataStore) -> None:
        """databroker's ScanID(..., duplicates="error") refuses a repeated scan id (review
        defect 4: ScanID took no ``duplicates`` and raised TypeError)."""
        with pytest.raises(ValueError, match="scan_id 3 names more than one run"):
            await runs.search(ScanID(3, duplicates="error"))
        with pytest.raises(ValueError, match="duplicates"):
            ScanID(3, duplicates="first")  # type: ignore[arg-type]
        assert await runs.count(And(ScanID(3), Eq("plan_name", "scan"))) == 1

    async def test_search_skip_limit(self, runs: MetadataStore) -> None:
        page = await runs.search(None, skip=2, limit=3)
        assert [d["uid"] for d in page] == [uid(n) for n in (6, 5, 4)]
        assert await runs.search(None, limit=0) == []
        assert await runs.search(None, skip=8) == []
        assert len(await runs.search(Eq("plan_name", "scan"), skip=1)) == 2
        with pytest.raises(ValueError):
            await runs.search(None, skip=-1)
        assert await runs.search_uids(None, skip=2, limit=3) == [uid(n) for n in (6, 5, 4)]
        assert await runs.search_uids(None, limit=0) == []
        assert await runs.search_uids(None, skip=8) == []
        with pytest.raises(ValueError):
            await runs.search_uids(None, skip=-1)

    async def test_newest_first_ties_by_uid(self, store: MetadataStore) -> None:
        same_time = [{**RUNS[n], "time": T0} for n in (3, 1, 2)]
        await store.put_documents("start", same_time)
        assert [d["uid"] for d in await store.search(None)] == [uid(1), uid(2), uid(3)]

    async def test_uids_with_prefix(self, runs: MetadataStore) -> None:
        assert await runs.uids_with_prefix("5e6f7a8b") == [uid(4), uid(3)]
        assert await runs.uids_with_prefix("5e6f7a8b", limit=1) == [uid(4)]
        assert await runs.uids_with_prefix("abcdef0", Eq("operator", "alice")) == [uid(7)]
        assert await runs.uids_with_prefix("ffffff") == []
        assert await runs.uids_with_prefix("0a1b2c3d-1111-4a00-8000-000000000001") == [uid(1)]
        assert len(await runs.uids_with_prefix("", limit=20)) == 8
        # a prefix ending in the highest character: no upper bound of its range exists
        assert await runs.uids_with_prefix("0a1b2c3d\U0010ffff") == []
        assert await runs.search(PartialUID("0a1b2c3d\U0010ffff")) == []

    async def test_full_text_after_later_puts(self, runs: MetadataStore) -> None:
        doc = _start(9, T0 + 10 * DAY, 9, "count", 1, {"name": "Quartz"}, [], "zoe", _T)
        await runs.put_documents("start", [doc])
        assert await runs.search(FullText("quartz")) == [doc]
        assert await runs.count(And(FullText("quartz"), ScanID(9))) == 1

    @pytest.mark.parametrize("query", [
        PartialUID("abcd"), Eq("a'; DROP TABLE run_start; --", 1), Eq("$where", 1),
        Regex("operator", "(unclosed"), FullText("   "), TimeRange(since="yesterday-ish"),
        TimeRange(since="2024-01-01", timezone="Mars/Olympus"), Key("num_points") > None,
    ], ids=repr)
    async def test_bad_queries_raise_value_error(self, runs: MetadataStore,
                                                 query: Query) -> None:
        with pytest.raises(ValueError):
            await runs.search(query)
        with pytest.raises(ValueError):
            await runs.count(query)

    # -- links (integrity checks, completeness) -------------------------------------------

    async def test_links_find_orphans_and_filter_by_run(self, store: MetadataStore) -> None:
        """Every document of a kind, its start gone or not; records without tail rows."""
        await store.put_documents("start", [RUNS[1], RUNS[2]])
        orphan = {**DOCS["descriptor"], "uid": "desc-0009", "run_start": uid(9)}
        await store.put_documents("descriptor", [DOCS["descriptor"], orphan])
        await store.put_documents("stop", [DOCS["stop"]])
        await store.update_streams([
            dataclasses.replace(_stream("desc-0001", 300, 1, 300, T0, T0 + 9),
                                tail=b"\x01" * 10, tail_start=256),
            _stream("desc-gone", 1, 1, 1, T0, T0, run=2)])
        assert await store.links("start") == [
            {"key": uid(1), "uid": uid(1), "run_start": uid(1)},
            {"key": uid(2), "uid": uid(2), "run_start": uid(2)}]
        assert await store.links("descriptor") == [
            {"key": "desc-0001", "uid": "desc-0001", "run_start": uid(1)},
            {"key": "desc-0009", "uid": "desc-0009", "run_start": uid(9)}]
        assert await store.links("stop") == [
            {"key": uid(1), "uid": "stop-0001", "run_start": uid(1)}]
        assert await store.links("descriptor", [uid(9), "nope"]) == [
            {"key": "desc-0009", "uid": "desc-0009", "run_start": uid(9)}]
        assert await store.links("start", [uid(2)]) == [
            {"key": uid(2), "uid": uid(2), "run_start": uid(2)}]
        records = await store.links("event_stream")
        assert [(r["run_start"], r["descriptor_uid"], r["length"], r["tail_start"], r["tail"])
                for r in records] == [(uid(1), "desc-0001", 300, 256, None),
                                      (uid(2), "desc-gone", 1, None, None)]
        assert records[0] == {**(await store.streams(uid(1)))[0], "tail": None}
        assert [r["descriptor_uid"] for r in await store.links("event_stream", [uid(2)])] \
            == ["desc-gone"]
        assert await store.links("stop", []) == []

