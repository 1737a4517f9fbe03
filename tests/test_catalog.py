"""Catalog conformance suite, run over every metadata backend (SQLite, MongoDB).

Runs are written through the daemon's own Ingestor (as Kafka messages would be), from
documents a real RunEngine published with ophyd.sim devices, plus handcrafted runs for
the corner cases. What is read back is compared with a small in-memory databroker-style
reference built from the very documents that went in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import dask.array as da
import numpy as np
import pytest
import xarray as xr

import bluestream
from bluestream.catalog import Catalog
from bluestream.errors import AmbiguousUID, NotFound, StorageUnavailable
from bluestream.queries import (
    Contains,
    Eq,
    FullText,
    In,
    Key,
    NotEq,
    NotIn,
    PartialUID,
    Regex,
    ScanID,
    TimeRange,
)
from test_catalog_support import (  # noqa: F401  (fixtures)
    Docs,
    assert_matches_reference,
    assert_valid_order,
    canonical,
    cat_fixture,
    create_store,
    ingest,
    metadata_uri_fixture,
    mixed_run,
    multi_descriptor_run,
    new_uid,
    now,
    plain,
    re_runs,
    reference_stream,
    run_with_uid,
    store_docs_fixture,
    tail_rows_fixture,
)

LABELS = ("count", "scan", "image", "external")


@pytest.fixture
def runs(store_docs: Any) -> dict[str, Docs]:
    """The RunEngine's runs, stored (oldest first: count, scan, image, external)."""
    docs = re_runs()
    for label in LABELS:
        store_docs(docs[label])
    return docs


def uid_of(docs: Docs) -> str:
    return str(docs[0][1]["uid"])


# -- listing and lookup -----------------------------------------------------------------------
def test_len_and_newest_first(runs: dict[str, Docs], cat: Catalog) -> None:
    assert len(cat) == 4
    newest_first = [uid_of(runs[label]) for label in reversed(LABELS)]
    assert list(cat) == newest_first
    assert list(cat.keys()) == newest_first
    assert [uid for uid, _ in cat.items()] == newest_first
    assert [run.uid for run in cat.values()] == newest_first
    assert uid_of(runs["count"]) in cat
    assert "nope-nope" not in cat


def test_negative_index(runs: dict[str, Docs], cat: Catalog) -> None:
    assert cat[-1].uid == uid_of(runs["external"])
    assert cat[-2].uid == uid_of(runs["image"])
    assert cat[-4].uid == uid_of(runs["count"])
    with pytest.raises(NotFound, match="out of range"):
        cat[-5]


def test_scan_id_newest_duplicate(runs: dict[str, Docs], cat: Catalog, store_docs: Any
                                  ) -> None:
    for label in LABELS:
        start = runs[label][0][1]
        assert cat[start["scan_id"]].uid == start["uid"]
    t0 = now()
    older, newer = new_uid(), new_uid()
    store_docs(run_with_uid(older, scan_id=4242, t0=t0 - 100))
    store_docs(run_with_uid(newer, scan_id=4242, t0=t0 - 50))
    assert cat[4242].uid == newer
    with pytest.raises(NotFound, match=r"scan_id 999999 in tenant") as err:
        cat[999999]
    assert cat.tenant in str(err.value)
    assert cat.get(999999) is None


def test_partial_and_full_uid(runs: dict[str, Docs], cat: Catalog, store_docs: Any) -> None:
    uid = uid_of(runs["scan"])
    assert cat[uid].uid == uid
    assert cat[uid[:8]].uid == uid
    t0 = now() - 1000
    a, b = new_uid("abcde1"), new_uid("abcde2")
    store_docs(run_with_uid(a, scan_id=1, t0=t0))
    store_docs(run_with_uid(b, scan_id=2, t0=t0 + 1))
    with pytest.raises(AmbiguousUID) as err:
        cat["abcde"]
    assert a in str(err.value) and b in str(err.value)
    assert isinstance(err.value, KeyError)
    assert cat["abcde1"].uid == a
    with pytest.raises(ValueError, match="at least 5"):
        cat["abcd"]
    with pytest.raises(NotFound) as missing:
        cat["fffff0000"]
    assert "fffff0000" in str(missing.value) and cat.tenant in str(missing.value)


def test_lookup_respects_search(runs: dict[str, Docs], cat: Catalog) -> None:
    scans = cat.search(Eq("plan_name", "scan"))
    assert scans[-1].uid == uid_of(runs["scan"])
    with pytest.raises(NotFound, match="within this search"):
        scans[uid_of(runs["count"])]
    with pytest.raises(NotFound):
        scans[runs["count"][0][1]["scan_id"]]


# -- searching ------------------------------------------------------------------------------
def test_search(runs: dict[str, Docs], cat: Catalog) -> None:
    starts = {label: runs[label][0][1] for label in LABELS}
    t_first = starts["count"]["time"]
    t_last = starts["external"]["time"]
    assert len(cat.search(TimeRange(since=t_first - 1, until=t_last + 1))) == 4
    assert len(cat.search(TimeRange(until=t_first - 1))) == 0
    assert len(cat.search(TimeRange(since=t_last))) == 1
    scans = cat.search(Eq("plan_name", "scan"))
    assert list(scans) == [starts["scan"]["uid"]]
    assert len(scans.search(Key("num_points") > 5)) == 1
    assert len(scans.search(Key("num_points") > 50)) == 0
    counts = cat.search({"plan_name": "count"})
    assert len(counts) == 3
    assert len(counts.search(Key("num_points") >= 4)) == 2  # count(5) and external(4)
    assert len(cat.search({"sample.name": "Si"})) == 2
    assert len(cat.search(NotEq("plan_name", "count"))) == 1
    assert len(cat.search(In("plan_name", ["scan", "nope"]))) == 1
    assert len(cat.search(NotIn("plan_name", ["scan"]))) == 3
    assert len(cat.search(Contains("detectors", "det"))) == 3
    assert len(cat.search(Regex("plan_name", "^sc"))) == 1
    assert list(cat.search(FullText("alignment"))) == [starts["count"]["uid"]]
    assert list(cat.search(ScanID(starts["image"]["scan_id"]))) == [starts["image"]["uid"]]
    assert list(cat.search(PartialUID(starts["image"]["uid"][:7]))) == [starts["image"]["uid"]]
    chained = cat.search(TimeRange(since=t_first - 1)).search(Eq("plan_name", "count")) \
        .search({"sample.name": "Si"})
    assert list(chained) == [starts["image"]["uid"], starts["count"]["uid"]]
    assert chained[-1].uid == starts["image"]["uid"]


# -- metadata -------------------------------------------------------------------------------
def test_metadata_and_streams(runs: dict[str, Docs], cat: Catalog) -> None:
    docs = runs["scan"]
    run = cat[uid_of(docs)]
    assert run.metadata["start"] == plain(docs[0][1])
    assert run.metadata["stop"] == plain(docs[-1][1])
    assert run.streams == ["baseline", "primary"]
    assert "primary" in run
    text = repr(run)
    for part in (uid_of(docs), "scan_id=2", "plan_name='scan'", "primary", "baseline",
                 "exit_status='success'"):
        assert part in text, part
    assert "runs" in repr(cat)


def test_unknown_stream(runs: dict[str, Docs], cat: Catalog) -> None:
    run = cat[uid_of(runs["scan"])]
    with pytest.raises(KeyError, match=r"no stream 'nope'.*baseline.*primary"):
        run["nope"]
    with pytest.raises(KeyError, match="no data key 'nope'"):
        run["primary"].read(fields=["nope"])
    assert run.primary.name == "primary"


# -- reading streams --------------------------------------------------------------------------
@pytest.mark.parametrize(("label", "stream"), [("count", "primary"), ("scan", "primary"),
                                               ("scan", "baseline"), ("image", "primary")])
def test_read_matches_reference(runs: dict[str, Docs], cat: Catalog, label: str,
                                stream: str) -> None:
    docs = runs[label]
    ds = cat[uid_of(docs)][stream].read()
    assert_matches_reference(ds, reference_stream(docs, stream))
    desc = next(d for n, d in docs if n == "descriptor" and d["name"] == stream)
    for key, var in ds.data_vars.items():
        dk = desc["data_keys"][key]
        assert var.attrs["source"] == dk["source"]
        assert var.attrs["dtype"] == dk["dtype"]
        assert var.attrs["shape"] == list(dk["shape"])
        assert var.dims[0] == "time" and len(var.dims) == 1 + len(dk["shape"])


def test_image_dims_and_dtype(runs: dict[str, Docs], cat: Catalog) -> None:
    ds = cat[uid_of(runs["image"])]["primary"].read()
    assert ds["cam"].dims == ("time", "dim_0", "dim_1")
    assert ds["cam"].dtype == np.uint16
    assert ds["cam"].shape == (3, 16, 16)
    assert ds.sizes["time"] == 3


@pytest.mark.parametrize("label", ["scan", "image"])
def test_to_dask_equals_read(runs: dict[str, Docs], cat: Catalog, label: str) -> None:
    stream = cat[uid_of(runs[label])]["primary"]
    lazy = stream.to_dask()
    assert all(isinstance(v.data, da.Array) for k, v in lazy.data_vars.items()
               if v.dtype.kind in "iuf")
    xr.testing.assert_identical(lazy.compute(), stream.read())


@pytest.mark.parametrize("label", LABELS)
def test_without_uids(runs: dict[str, Docs], cat: Catalog, label: str) -> None:
    """``uids=False``: read(), to_dask() and timestamps() as they are, less the ``uid``
    coordinate."""
    stream = cat[uid_of(runs[label])]["primary"]
    whole = stream.read()
    assert "uid" in whole.coords
    xr.testing.assert_identical(stream.read(uids=False), whole.drop_vars("uid"))
    xr.testing.assert_identical(stream.to_dask(uids=False).compute(), whole.drop_vars("uid"))
    xr.testing.assert_identical(stream.timestamps(uids=False),
                                stream.timestamps().drop_vars("uid"))


def test_without_uids_several_descriptors_and_holes(cat: Catalog, store_docs: Any) -> None:
    docs = multi_descriptor_run(now() - 500)
    store_docs(docs)
    stream = cat[uid_of(docs)]["primary"]
    xr.testing.assert_identical(stream.read(uids=False), stream.read().drop_vars("uid"))
    holes = run_with_uid(new_uid(), scan_id=34, t0=now() - 100, n=5)
    store_docs([d for d in holes[:-1] if d[0] != "event" or d[1]["seq_num"] in (1, 2, 5)])
    stream = cat[uid_of(holes)]["primary"]
    ds = stream.read(uids=False)
    assert ds["seq_num"].values.tolist() == [1, 2, 5]
    xr.testing.assert_identical(ds, stream.read().drop_vars("uid"))


def test_fields(runs: dict[str, Docs], cat: Catalog) -> None:
    docs = runs["scan"]
    stream = cat[uid_of(docs)]["primary"]
    ds = stream.read(fields=["det"])
    assert list(ds.data_vars) == ["det"]
    assert_matches_reference(ds, reference_stream(docs, "primary"), fields=["det"])
    xr.testing.assert_identical(stream.to_dask(fields=["det"]).compute(), ds)


def test_multi_descriptor_stream(cat: Catalog, store_docs: Any) -> None:
    docs = multi_descriptor_run(now() - 500)
    store_docs(docs)
    stream = cat[uid_of(docs)]["primary"]
    ds = stream.read()
    assert ds.sizes["time"] == 6
    assert_matches_reference(ds, reference_stream(docs, "primary"))
    assert len(ds.attrs["descriptors"]) == 2
    xr.testing.assert_identical(stream.to_dask().compute(), ds)
    config = stream.config
    assert list(config) == ["dev"]
    np.testing.assert_array_equal(config["dev"]["gain"].values, [1, 1, 1, 5, 5, 5])
    assert len(stream) == 6


@pytest.mark.parametrize("label", LABELS)
def test_timestamps_line_up_with_read(runs: dict[str, Docs], cat: Catalog, label: str
                                      ) -> None:
    """``timestamps()``: each event's timestamps, per key, on read()'s rows (eager and
    lazy alike); what the Tiled server serves as TiledWriter's ``ts_<key>`` columns."""
    docs = runs[label]
    stream = cat[uid_of(docs)]["primary"]
    ds, ts = stream.read(), stream.timestamps()
    np.testing.assert_array_equal(ts["seq_num"].values, ds["seq_num"].values)
    primary = {d["uid"] for n, d in docs if n == "descriptor" and d["name"] == "primary"}
    events = sorted((d for n, d in plain(docs) if n == "event" and d["descriptor"] in primary),
                    key=lambda d: d["seq_num"])
    assert [e["seq_num"] for e in events] == ds["seq_num"].values.tolist()
    assert set(ts.data_vars) == set(events[0]["timestamps"])
    for key in ts.data_vars:
        assert ts[key].dtype == np.float64
        np.testing.assert_array_equal(ts[key].values,
                                      [e["timestamps"][key] for e in events], err_msg=key)
    xr.testing.assert_identical(stream.timestamps(lazy=True).compute(), ts)
    one = next(iter(ts.data_vars))
    assert list(stream.timestamps([one]).data_vars) == [one]


def test_timestamps_of_holes_and_several_descriptors(cat: Catalog, store_docs: Any) -> None:
    docs = multi_descriptor_run(now() - 500)
    store_docs(docs)
    stream = cat[uid_of(docs)]["primary"]
    ts, ds = stream.timestamps(), stream.read()
    np.testing.assert_array_equal(ts["time"].values, ds["time"].values)
    holes = run_with_uid(new_uid(), scan_id=33, t0=now() - 100, n=5)
    store_docs([d for d in holes[:-1] if d[0] != "event" or d[1]["seq_num"] in (1, 2, 5)])
    ts = cat[uid_of(holes)]["primary"].timestamps()
    assert ts["seq_num"].values.tolist() == [1, 2, 5]


# -- documents --------------------------------------------------------------------------------
@pytest.mark.parametrize("label", LABELS)
def test_documents_replay(runs: dict[str, Docs], cat: Catalog, label: str) -> None:
    docs = runs[label]
    run = cat[uid_of(docs)]
    out = list(run.documents())
    assert_valid_order(out)
    assert {n for n, _ in out} <= {"start", "descriptor", "resource", "datum", "event_page",
                                   "stop"}
    assert canonical(out) == canonical(docs)
    single = list(run.documents(pages=False))
    assert_valid_order(single)
    assert "event_page" not in {n for n, _ in single}
    assert canonical(single) == canonical(docs)


def test_documents_small_pages(runs: dict[str, Docs], cat: Catalog) -> None:
    docs = runs["scan"]
    out = list(cat[uid_of(docs)].documents(page_events=3))
    pages = [d for n, d in out if n == "event_page"]
    assert max(len(p["uid"]) for p in pages) == 3
    assert_valid_order(out)
    assert canonical(out) == canonical(docs)
    # One event per page: pages of the streams merge by time, so the baseline's second
    # reading (taken after the scan) comes after the primary's events, as published.
    out = list(cat[uid_of(docs)].documents(page_events=1))
    assert_valid_order(out)
    published = [d["descriptor"] for n, d in docs if n == "event"]
    assert [d["descriptor"] for n, d in out if n == "event_page"] == published


def test_multi_descriptor_documents(cat: Catalog, store_docs: Any) -> None:
    docs = multi_descriptor_run(now() - 400)
    store_docs(docs)
    out = list(cat[uid_of(docs)].documents())
    assert_valid_order(out)
    assert canonical(out) == canonical(docs)
    assert [n for n, _ in out] == ["start", "descriptor", "event_page", "descriptor",
                                   "event_page", "stop"]


# -- open runs ---------------------------------------------------------------------------------
def test_open_run_grows(cat: Catalog, store_docs: Any) -> None:
    docs = run_with_uid(new_uid(), scan_id=31, t0=now() - 300, n=10)
    first, rest = docs[:7], docs[7:]  # start, descriptor, 5 events | 5 events, stop
    store_docs(first)
    run = cat[uid_of(docs)]
    assert run.metadata["stop"] is None
    assert "(open)" in repr(run)
    ds = run["primary"].read()
    assert ds.sizes["time"] == 5
    assert_matches_reference(ds, reference_stream(first, "primary"))
    assert run.wait(0.3) is False  # nothing new
    assert [n for n, _ in run.documents()][-1] == "event_page"  # no stop yet
    store_docs(rest)
    ds = run["primary"].read()
    assert ds.sizes["time"] == 10
    assert_matches_reference(ds, reference_stream(docs, "primary"))
    assert run.metadata["stop"] == plain(docs[-1][1])
    assert run.wait(5) is False  # stopped: nothing more will come
    assert canonical(run.documents()) == canonical(docs)


def test_holes_are_skipped(cat: Catalog, store_docs: Any) -> None:
    """Events 1, 2 and 5 stored (3 and 4 not yet): rows 3 and 4 are not shown."""
    docs = run_with_uid(new_uid(), scan_id=32, t0=now() - 200, n=5)
    store_docs([d for d in docs[:-1] if d[0] != "event" or d[1]["seq_num"] in (1, 2, 5)])
    run = cat[uid_of(docs)]
    ds = run["primary"].read()
    assert ds["seq_num"].values.tolist() == [1, 2, 5]
    xr.testing.assert_identical(run["primary"].to_dask().compute(), ds)
    assert len(run["primary"]) == 3


# -- the asynchronous API -------------------------------------------------------------------------
@pytest.mark.anyio
async def test_async_catalog(metadata_uri: str, zarr_root: Path, tenant: str) -> None:
    docs = re_runs()
    for label in LABELS:
        await ingest(metadata_uri, zarr_root, tenant, docs[label])
    async with bluestream.open_catalog_async(tenant, metadata=metadata_uri,
                                             zarr_root=zarr_root) as acat:
        assert await acat.count() == 4
        assert [uid async for uid in acat] == [uid_of(docs[x]) for x in reversed(LABELS)]
        run = await acat[-1]
        assert run.uid == uid_of(docs["external"])
        scan = await acat.search(Eq("plan_name", "scan"))[-1]
        assert scan.streams == ["baseline", "primary"]
        ds = await scan["primary"].read()
        assert_matches_reference(ds, reference_stream(docs["scan"], "primary"))
        out = [item async for item in scan.documents()]
        assert canonical(out) == canonical(docs["scan"])
        with pytest.raises(KeyError, match="no stream"):
            scan["nope"]
        with pytest.raises(NotFound):
            await acat["fffffffff"]
        assert [r.uid async for r in acat.search({"sample.name": "Si"}).values()] == \
            [uid_of(docs["image"]), uid_of(docs["count"])]


# -- configuration and errors ---------------------------------------------------------------------
def test_storage_from_environment(runs: dict[str, Docs], metadata_uri: str, zarr_root: Path,
                                  tenant: str, monkeypatch: pytest.MonkeyPatch,
                                  tmp_path: Path) -> None:
    monkeypatch.setenv("BLUESTREAM_METADATA", metadata_uri)
    monkeypatch.setenv("BLUESTREAM_ZARR_ROOT", str(zarr_root))
    with bluestream.open_catalog(tenant) as env_cat:
        assert len(env_cat) == 4
    monkeypatch.delenv("BLUESTREAM_METADATA")
    monkeypatch.delenv("BLUESTREAM_ZARR_ROOT")
    config = tmp_path / "bluestream.toml"
    config.write_text(f'[storage]\nmetadata = "{metadata_uri}"\nzarr_root = "{zarr_root}"\n')
    monkeypatch.setenv("BLUESTREAM_CONFIG", str(config))
    with bluestream.open_catalog(tenant) as file_cat:
        ds = file_cat[-2]["primary"].read()
        assert ds.sizes["time"] == 3


def test_missing_zarr_root(runs: dict[str, Docs], metadata_uri: str, tenant: str,
                           tmp_path: Path) -> None:
    gone = tmp_path / "not-mounted"
    with bluestream.open_catalog(tenant, metadata=metadata_uri, zarr_root=gone) as bad:
        run = bad[-1]  # metadata is fine
        with pytest.raises(StorageUnavailable, match="not-mounted"):
            run["primary"].read()


def test_unreachable_mongo() -> None:
    uri = "mongodb://127.0.0.1:9"  # discard port: nothing listens
    with pytest.raises(StorageUnavailable) as err:
        bluestream.open_catalog("csx", metadata=uri + "/?serverSelectionTimeoutMS=300",
                                zarr_root="/nonexistent", timeout=1)
    assert "127.0.0.1:9" in str(err.value)


def test_missing_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "nothing-here.db"
    with pytest.raises(StorageUnavailable, match=r"nothing-here\.db"):
        bluestream.open_catalog("csx", metadata=f"sqlite:///{path}", zarr_root=tmp_path)
    assert not path.exists()


def test_closed_catalog(metadata_uri: str, zarr_root: Path, tenant: str,
                        store_docs: Any) -> None:
    anyio.run(create_store, metadata_uri, tenant)
    catalog = bluestream.open_catalog(tenant, metadata=metadata_uri, zarr_root=zarr_root)
    assert len(catalog) == 0
    catalog.close()
    catalog.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        len(catalog)


def test_value_kinds(cat: Catalog, store_docs: Any) -> None:
    """Strings, vectors and 2-d arrays (each with their own dims), variable-length
    arrays (one array per event) -- read and replayed as they went in."""
    docs = mixed_run(now() - 450)
    store_docs(docs)
    run = cat[uid_of(docs)]
    ds = run["primary"].read()
    events = [d for n, d in docs if n == "event"]
    assert ds["mode"].values.tolist() == [e["data"]["mode"] for e in events]
    np.testing.assert_array_equal(ds["vec"].values, [e["data"]["vec"] for e in events])
    np.testing.assert_array_equal(ds["mat"].values, [e["data"]["mat"] for e in events])
    assert ds["mat"].dtype == np.int32
    assert ds["vec"].attrs["units"] == "V"
    assert ds["mode"].dims == ("time",)
    assert len({*ds["vec"].dims, *ds["mat"].dims}) == 4  # time + 1 + 2 distinct dims
    peaks = ds["peaks"].values
    assert peaks.dtype == object and peaks.shape == (4,)
    for got, ev in zip(peaks, events, strict=True):
        np.testing.assert_array_equal(got, ev["data"]["peaks"])
    lazy = run["primary"].to_dask().compute()
    xr.testing.assert_identical(lazy.drop_vars("peaks"), ds.drop_vars("peaks"))
    for a, b in zip(lazy["peaks"].values, peaks, strict=True):
        np.testing.assert_array_equal(a, b)
    assert canonical(run.documents()) == canonical(docs)


def test_from_uri(runs: dict[str, Docs], metadata_uri: str, zarr_root: Path,
                  tenant: str) -> None:
    if not metadata_uri.startswith("mongodb://"):
        with pytest.raises(ValueError, match="tenant="):
            Catalog.from_uri(metadata_uri, zarr_root=zarr_root)
        with Catalog.from_uri(metadata_uri, zarr_root=zarr_root, tenant=tenant) as by_uri:
            assert len(by_uri) == 4
        return
    with Catalog.from_uri(f"{metadata_uri.rstrip('/')}/{tenant}",
                          zarr_root=zarr_root) as by_uri:
        assert by_uri.tenant == tenant
        assert len(by_uri) == 4
