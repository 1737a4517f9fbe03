"""``verify`` (integrity in levels) and completeness, on both metadata stores.

Each test stores a few runs (one longer than the 256-row tail, so its first rows are in
Zarr; a short one wholly in its tail, without a Zarr group; an image run, every row in
Zarr), breaks one thing on purpose and checks that the level meant to see it reports
exactly that, and that the levels below it report nothing.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
import zarr

import bluestream
from bluestream.catalog import Catalog
from bluestream.catalog.problems import Problem
from bluestream.layout import descriptor_path
from bluestream.storage.sqlite import sqlite_path
from helpers import image_run, scalar_run
from test_catalog_support import ingest, metadata_uri_fixture  # noqa: F401
from test_tools_support import cli_fixture  # noqa: F401

Docs = list[tuple[str, dict[str, Any]]]
LONG = 1000  # rows 0-767 in Zarr, 768-999 in the tail


class Stored:
    """The runs of one test's tenant and where their arrays are."""

    def __init__(self, metadata_uri: str, zarr_root: Path, tenant: str) -> None:
        self.uri, self.root, self.tenant = metadata_uri, zarr_root, tenant
        self.runs: dict[str, Docs] = {}

    def add(self, label: str, docs: Docs, **kwargs: Any) -> str:
        offset = sum(len(d) for d in self.runs.values())
        anyio.run(partial(ingest, self.uri, self.root, self.tenant, docs,
                          start_offset=offset, **kwargs))
        self.runs[label] = docs
        return self.uid(label)

    def uid(self, label: str) -> str:
        return str(self.runs[label][0][1]["uid"])

    def descriptor(self, label: str) -> str:
        return next(str(d["uid"]) for n, d in self.runs[label] if n == "descriptor")

    def group(self, label: str) -> Path:
        return self.root / descriptor_path(self.tenant, self.uid(label), self.descriptor(label))

    def key(self, label: str, name: str) -> str:
        return f"{descriptor_path(self.tenant, self.uid(label), self.descriptor(label))}/{name}"

    def delete(self, collection: str, field: str, value: str) -> None:
        """Delete a document straight from the metadata store (no bluestream code)."""
        if self.uri.startswith("sqlite:///"):
            con = sqlite3.connect(sqlite_path(self.uri))
            try:
                con.execute(f"DELETE FROM {collection} WHERE tenant = ? AND doc_key = ?",
                            (self.tenant, value))
                con.commit()
            finally:
                con.close()
            return
        from pymongo import MongoClient

        client: MongoClient[dict[str, Any]] = MongoClient(self.uri)
        try:
            assert client[self.tenant][collection].delete_one({field: value}).deleted_count == 1
        finally:
            client.close()


@pytest.fixture
def stored(metadata_uri: str, zarr_root: Path, tenant: str) -> Stored:
    s = Stored(metadata_uri, zarr_root, tenant)
    s.add("long", scalar_run(LONG, scan_id=1))
    s.add("short", scalar_run(10, scan_id=2))
    s.add("image", image_run(40, (64, 64), scan_id=3))  # 8 kB rows: no tail
    return s


@pytest.fixture
def cat(stored: Stored) -> Iterator[Catalog]:
    catalog = bluestream.open_catalog(stored.tenant, metadata=stored.uri, zarr_root=stored.root)
    yield catalog
    catalog.close()


def only(problems: list[Problem]) -> Problem:
    assert len(problems) == 1, "\n".join(map(str, problems))
    return problems[0]


# -- clean ------------------------------------------------------------------------------
def test_layout_of_the_fixture(stored: Stored) -> None:
    """What the tests below rely on: where each run's rows are."""
    assert (stored.group("long") / "data" / "f0" / "c" / "0").is_file()
    assert not (stored.root / stored.tenant / stored.uid("short")[:2] / stored.uid("short")
                ).exists()
    assert (stored.group("image") / "data" / "img" / "c" / "0" / "0" / "0").is_file()


@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_a_clean_store_verifies_clean(cat: Catalog, level: int) -> None:
    assert cat.verify(level) == []


def test_clean_cli_exits_0(stored: Stored, cli: Any, tmp_path: Path) -> None:
    report = tmp_path / "report.txt"
    result = cli("verify", "--tenant", stored.tenant, "--metadata", stored.uri,
                 "--zarr-root", stored.root, "--report", report, "-q")
    assert result.exit_code == 0, result.output
    assert "3 run(s) checked, 0 problem(s)" in result.output
    assert report.read_text() == ""


# -- level 2: arrays ------------------------------------------------------------------------
def test_a_truncated_array_is_level_2(stored: Stored, cat: Catalog) -> None:
    meta = stored.group("long") / "data" / "f1" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["shape"] = [512]  # the record puts 768 rows in Zarr
    meta.write_text(json.dumps(doc))
    assert cat.verify(1) == []
    p = only(cat.verify(2))
    assert (p.level, p.run, p.stream, p.array) == (2, stored.uid("long"), "primary", "data/f1")
    assert "512 rows" in p.message and "768" in p.message
    assert cat.verify(4) == [p]  # the truncated array is not read further


def test_a_missing_group_and_a_wrong_dtype_are_level_2(stored: Stored, cat: Catalog) -> None:
    meta = stored.group("long") / "data" / "counter" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["data_type"] = "float64"
    meta.write_text(json.dumps(doc))
    for path in sorted(stored.group("image").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    problems = {p.run: p for p in cat.verify(2)}
    assert len(problems) == 2, problems
    dtype, group = problems[stored.uid("long")], problems[stored.uid("image")]
    assert (dtype.array, group.array) == ("data/counter", None)
    assert "float64" in dtype.message and "int64" in dtype.message
    assert "group" in group.message and "missing" in group.message
    assert cat.verify(1) == []


# -- level 3: chunks --------------------------------------------------------------------------
def test_a_deleted_chunk_is_level_3(stored: Stored, cat: Catalog) -> None:
    (stored.group("long") / "data" / "f0" / "c" / "0").unlink()
    assert cat.verify(2) == []
    p = only(cat.verify(3))
    assert (p.level, p.run, p.array, p.chunk) == (
        3, stored.uid("long"), "data/f0", stored.key("long", "data/f0/c/0"))
    assert "missing" in p.message and str(p).startswith("level 3: run ")
    assert cat.verify(4) == [p]


def test_a_deleted_image_chunk_is_level_3(stored: Stored, cat: Catalog) -> None:
    (stored.group("image") / "data" / "img" / "c" / "0" / "0" / "0").unlink()
    p = only(cat.verify(3))
    assert (p.run, p.array, p.chunk) == (stored.uid("image"), "data/img",
                                         stored.key("image", "data/img/c/0/0/0"))


def test_corrupt_chunk_bytes_are_level_3(stored: Stored, cat: Catalog) -> None:
    chunk = stored.group("long") / "time" / "c" / "0"
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2])  # a torn write
    assert cat.verify(2) == []
    p = only(cat.verify(3))
    assert (p.array, p.chunk) == ("time", stored.key("long", "time/c/0"))
    assert "cannot be decoded" in p.message
    assert cat.verify(4) == [p]


# -- level 4: values --------------------------------------------------------------------------
def _zero_seq_num(stored: Stored, label: str, rows: slice) -> None:
    arr = zarr.open_array(stored.group(label) / "seq_num", mode="r+")
    arr[rows] = 0  # events lost: the rows read as never written


def test_dropped_events_are_level_4(stored: Stored, cat: Catalog) -> None:
    _zero_seq_num(stored, "long", slice(100, 200))
    for level in (1, 2, 3):
        assert cat.verify(level) == [], level
    p = only(cat.verify(4))
    assert (p.level, p.run, p.stream) == (4, stored.uid("long"), "primary")
    assert "1000" in p.message and "900" in p.message


def test_shifted_rows_are_level_4(stored: Stored, cat: Catalog) -> None:
    """A row holding another position's seq_num (rows written to the wrong place)."""
    arr = zarr.open_array(stored.group("long") / "seq_num", mode="r+")
    arr[5] = 7
    assert cat.verify(3) == []
    p = only(cat.verify(4))
    assert (p.array, p.chunk) == ("seq_num", stored.key("long", "seq_num/c/0"))
    assert "row 5 holds 7" in p.message


def test_a_stop_counting_more_events_is_level_4(stored: Stored, cat: Catalog) -> None:
    docs = scalar_run(300, scan_id=4)
    docs[-1][1]["num_events"] = {"primary": 310}
    uid = stored.add("short-of-stop", docs)
    assert cat.verify(3) == []
    p = only(cat.verify(4))
    assert (p.run, p.stream) == (uid, "primary")
    assert "310" in p.message and "300" in p.message
    assert cat.verify(4, [uid]) == [p]


def test_times_outside_the_record_are_level_4(stored: Stored, cat: Catalog) -> None:
    arr = zarr.open_array(stored.group("long") / "time", mode="r+")
    arr[3] = 0.0
    assert cat.verify(3) == []
    problems = cat.verify(4)
    assert (problems[0].array, problems[0].chunk) == ("time", stored.key("long", "time/c/0"))
    assert "outside the record's range" in problems[0].message


# -- level 1: metadata ------------------------------------------------------------------------
def test_a_removed_descriptor_is_level_1(stored: Stored, cat: Catalog) -> None:
    desc = stored.descriptor("long")
    stored.delete("event_descriptor", "uid", desc)
    p = only(cat.verify(1))
    assert (p.level, p.run, p.descriptor) == (1, stored.uid("long"), desc)
    assert "no descriptor document" in p.message
    assert cat.verify(4) == [p]
    assert cat.verify(4, [stored.uid("long")]) == [p]


def test_a_removed_start_leaves_orphans_found_at_level_1(stored: Stored, cat: Catalog) -> None:
    uid = stored.uid("short")
    stored.delete("run_start", "uid", uid)
    problems = cat.verify(1)
    assert {(p.run, p.descriptor) for p in problems} == {(uid, None),
                                                         (uid, stored.descriptor("short"))}
    assert all("no start document" in p.message for p in problems)
    assert sorted(map(str, cat.verify(1, [uid]))) == sorted(map(str, problems))


def test_every_layout_verifies(metadata_uri: str, zarr_root: Path, tenant: str) -> None:
    """No tail (every row in Zarr) and a tail of 3 rows: clean, then one dropped chunk."""
    if metadata_uri.startswith("mongodb://"):
        pytest.skip("the layouts are the arrays' business; SQLite is enough")
    s = Stored(metadata_uri, zarr_root, tenant)
    s.add("none", scalar_run(500, scan_id=1), tail_rows=0)
    s.add("three", scalar_run(50, scan_id=2), tail_rows=3)
    with bluestream.open_catalog(tenant, metadata=metadata_uri, zarr_root=zarr_root) as cat:
        assert cat.verify(4) == []
        _zero_seq_num(s, "none", slice(490, 500))  # the last events lost
        assert cat.verify(3) == []
        assert sorted(p.message for p in cat.verify(4)) == [
            "the record says the highest seq_num is 500, the stored rows reach 490",
            "the stop records 500 events, 490 are stored"]


# -- the command line ---------------------------------------------------------------------
def test_cli_names_each_problem_and_exits_1(stored: Stored, cli: Any, tmp_path: Path) -> None:
    (stored.group("long") / "uid" / "c" / "0").unlink()
    report = tmp_path / "problems.json"
    args = ["verify", "--tenant", stored.tenant, "--metadata", stored.uri, "--zarr-root",
            stored.root, "-q"]
    result = cli(*args, "--level", "3", "--report", report, "--json")
    assert result.exit_code == 1
    data = json.loads(report.read_text())
    assert data["ok"] is False and data["runs_checked"] == 3
    assert [p["chunk"] for p in data["problems"]] == [stored.key("long", "uid/c/0")]
    result = cli(*args, "--level", "2")
    assert result.exit_code == 0
    # A uid prefix through its first "-": an all-digit one (2% of uuid4s' first 8
    # characters) would be looked up as a scan_id.
    result = cli(*args, "--run", stored.uid("long")[:9])
    assert result.exit_code == 1
    assert f"array uid chunk {stored.key('long', 'uid/c/0')}: missing" in result.output
    result = cli(*args, "--run", stored.uid("short"))
    assert result.exit_code == 0


def test_cli_usage_errors_exit_2(stored: Stored, cli: Any) -> None:
    args = ["verify", "--tenant", stored.tenant, "--metadata", stored.uri, "--zarr-root",
            stored.root]
    assert cli(*args, "--run", "ffffffff-0000").exit_code == 2
    assert cli(*args, "--level", "5").exit_code == 2


# -- completeness -----------------------------------------------------------------------------
def test_completeness(stored: Stored, cat: Catalog, cli: Any) -> None:
    open_docs = scalar_run(5, scan_id=5)[:-1]  # no stop yet
    short_docs = scalar_run(5, scan_id=6)
    short_docs[-1][1]["num_events"] = {"primary": 8}
    opened, short = stored.add("open", open_docs), stored.add("short-of-stop", short_docs)
    assert cat[opened].complete is False
    assert cat[short].complete is False
    assert cat[stored.uid("long")].complete is True
    uids = [stored.uid("long"), stored.uid("short"), opened, short, "nope"]
    assert cat.stored(uids) == {stored.uid("long"): True, stored.uid("short"): True,
                                opened: False, short: False, "nope": False}
    assert cat.stored(uids, exact=True) == cat.stored(uids)
    missing = {start["uid"]: c.reason for start, c in cat.incomplete()}
    assert missing == {opened: "open: no stop document yet",
                       short: "stream 'primary': 5 of 8 events stored"}
    args = ["status", "--tenant", stored.tenant, "--metadata", stored.uri, "--zarr-root",
            stored.root]
    result = cli(*args, "--incomplete")
    assert result.exit_code == 1
    lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
    assert sorted(ln.split()[0] for ln in lines) == sorted([opened, short])
    assert any("5 of 8 events" in ln for ln in lines)
    data = json.loads(cli(*args, "--json").stdout)
    assert data["runs"] == 5 and {r["uid"] for r in data["incomplete"]} == {opened, short}


def test_exact_completeness_counts_rows(stored: Stored, cat: Catalog) -> None:
    _zero_seq_num(stored, "long", slice(0, 10))
    assert cat.stored([stored.uid("long")]) == {stored.uid("long"): True}
    assert cat.stored([stored.uid("long")], exact=True) == {stored.uid("long"): False}
    assert anyio.run(_async_complete, stored) is False


async def _async_complete(stored: Stored) -> bool:
    async with bluestream.open_catalog_async(stored.tenant, metadata=stored.uri,
                                             zarr_root=stored.root) as cat:
        run = await cat[stored.uid("long")]
        assert await run.complete() is True
        return await run.complete(exact=True)


def test_status_without_tenant_still_asks_the_daemon(cli: Any) -> None:
    result = cli("status", "--url", "http://127.0.0.1:9", "--timeout", "0.5")
    assert result.exit_code == 3
    assert "no bluestream daemon answers" in result.output
    assert cli("status", "--incomplete").exit_code == 2


def test_problem_reads_well() -> None:
    p = Problem(3, "abc", "missing", "primary", "d1", "data/x", "t/ab/abc/d1/data/x/c/4")
    assert str(p) == ("level 3: run abc stream 'primary' descriptor d1 array data/x chunk "
                      "t/ab/abc/d1/data/x/c/4: missing")
    assert Problem(1, "abc", "no start").as_dict()["array"] is None


def test_a_reader_that_disagrees_with_the_arrays_is_level_4(
        stored: Stored, cat: Catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    """The catalog's reader wrapped to return a wrong value (a fault the real reader
    cannot be made to show): the sample re-read names the array and the row."""
    from bluestream.catalog.arrays import ArrayReader

    real = ArrayReader.read_rows

    async def off_by_one(self: ArrayReader, record: dict[str, Any], *args: Any,
                         **kwargs: Any) -> Any:
        rows = await real(self, record, *args, **kwargs)
        if "f0" in rows.data and len(rows):
            rows.data["f0"] = rows.data["f0"] + 1.0
        return rows

    monkeypatch.setattr(ArrayReader, "read_rows", off_by_one)
    assert cat.verify(3) == []
    problems = cat.verify(4)
    assert {(p.run, p.array) for p in problems} == {(stored.uid("long"), "data/f0"),
                                                    (stored.uid("short"), "data/f0")}
    assert all("reads back through the catalog as" in p.message for p in problems)


def test_a_search_verifies_its_own_runs(stored: Stored, cat: Catalog) -> None:
    (stored.group("image") / "time" / "c" / "0").unlink()
    assert cat.search({"scan_id": 1}).verify(4) == []
    p = only(cat.search({"scan_id": 3}).verify(4))
    assert (p.run, p.array) == (stored.uid("image"), "time")


def test_every_kind_of_run_verifies_clean(metadata_uri: str, zarr_root: Path, tenant: str,
                                          tmp_path: Path) -> None:
    """No false alarms: RunEngine runs (baseline stream, in-band images, external NPY
    frames), strings, vectors, variable-length arrays, two descriptors in one stream."""
    from test_catalog_support import mixed_run, multi_descriptor_run, npy_seq_run, re_runs

    s = Stored(metadata_uri, zarr_root, tenant)
    for label, docs in re_runs().items():
        s.add(label, docs)
    s.add("mixed", mixed_run(1_700_000_000.0))
    s.add("multi", multi_descriptor_run(1_700_000_100.0))
    s.add("npy", npy_seq_run(tmp_path / "npy", n=300, t0=1_700_000_200.0), tail_rows=0)
    with bluestream.open_catalog(tenant, metadata=metadata_uri, zarr_root=zarr_root) as cat:
        assert cat.verify(4) == []
        assert all(cat.stored(list(cat)).values())
        sizes = cat.storage_size("field")
        assert sizes.total.events == sum(u.events for u in cat.storage_size("stream").rows)


def test_two_descriptors_of_one_stream_count_once(metadata_uri: str, zarr_root: Path,
                                                  tenant: str) -> None:
    """The second descriptor continues the first one's seq_nums (4-6): 6 events, not 9."""
    from test_catalog_support import multi_descriptor_run

    docs = multi_descriptor_run(1_700_000_100.0)
    docs[-1][1]["num_events"] = {"primary": 7}
    s = Stored(metadata_uri, zarr_root, tenant)
    uid = s.add("multi", docs)
    with bluestream.open_catalog(tenant, metadata=metadata_uri, zarr_root=zarr_root) as cat:
        assert [c.stored for _, c in cat.incomplete()] == [{"primary": 6}]
        assert [c.stored for _, c in cat.incomplete(exact=True)] == [{"primary": 6}]
        assert "the stop records 7 events, 6 are stored" in only(cat.verify(4, [uid])).message


def test_rows_below_the_first_seq_num_need_no_chunks(metadata_uri: str, zarr_root: Path,
                                                     tenant: str) -> None:
    """A descriptor whose seq_nums start at 9001 (continuing another's): its first chunk
    (rows 0-8191) was never written, and that is no problem."""
    if metadata_uri.startswith("mongodb://"):
        pytest.skip("the arrays' business; SQLite is enough")
    docs = scalar_run(20, scan_id=1)
    for name, doc in docs:
        if name == "event":
            doc["seq_num"] += 9000
    docs[-1][1]["num_events"] = {"primary": 20}
    s = Stored(metadata_uri, zarr_root, tenant)
    s.add("late", docs, tail_rows=0)
    assert not (s.group("late") / "seq_num" / "c" / "0").exists()
    with bluestream.open_catalog(tenant, metadata=metadata_uri, zarr_root=zarr_root) as cat:
        assert cat.verify(4) == []
        (s.group("late") / "data" / "f0" / "c" / "1").unlink()
        assert [p.chunk for p in cat.verify(4)] == [s.key("late", "data/f0/c/1")]
