"""Statistical summaries (issue 15, item 6): stored at ingest, read by ``summary()``.

Every expectation is numpy's, computed from the documents that went in (later rows of a
seq_num win), never from what bluestream stored. Runs on both metadata stores; the tail
layouts (rows in the metadata store, in Zarr, or both) through ``tail_rows``.
"""

from __future__ import annotations

import itertools
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import event_model
import numpy as np
import pytest
import zarr

import bluestream
from bluestream.layout import SUMMARY_WINDOW, descriptor_path
from bluestream.storage.summaries import (
    WindowPlan,
    event_stats,
    merge_windows,
    rows_stats,
    window_stats,
    window_summaries,
)
from bluestream.storage.tail import DEFAULT_BLOCK
from helpers import envelopes, events_by_descriptor, make_ingestor, storage_digest, zarr_files
from test_catalog_support import (  # noqa: F401  (fixtures)
    create_store,
    ingest,
    metadata_uri_fixture,
    mixed_run,
    multi_descriptor_run,
    tail_rows_fixture,
)

pytestmark = pytest.mark.anyio

Doc = dict[str, Any]
Docs = list[tuple[str, Doc]]
W = SUMMARY_WINDOW


# -- documents ------------------------------------------------------------------------------
def numeric_run(n: int, *, seed: int = 0, t0: float | None = None,
                extra: dict[int, float] | None = None, strings: bool = False) -> Docs:
    """``n`` events: ``x`` (float, a NaN every 7th, one window all NaN when n > 600),
    ``k`` (integer), ``flag`` (boolean), and with ``strings`` ``s`` (string: a stream
    with strings keeps no tail). ``extra``: seq_num -> a new ``x`` sent again after all
    others (later rows win)."""
    t0 = time.time() if t0 is None else t0
    bundle = event_model.compose_run(time=t0, metadata={"scan_id": 1, "plan_name": "count"})
    keys = {"x": {"dtype": "number", "shape": [], "source": "sim:x"},
            "k": {"dtype": "integer", "shape": [], "source": "sim:k"},
            "flag": {"dtype": "boolean", "shape": [], "source": "sim:flag"}}
    if strings:
        keys["s"] = {"dtype": "string", "shape": [], "source": "sim:s"}
    desc = bundle.compose_descriptor(name="primary", data_keys=keys, time=t0)
    rng = np.random.default_rng(seed)
    xs = rng.normal(0, 100, n)
    xs[::7] = np.nan
    if n > 600:
        xs[512:768] = np.nan  # a window of NaNs only
    docs: Docs = [("start", bundle.start_doc), ("descriptor", desc.descriptor_doc)]

    def event(i: int, x: float) -> Doc:
        data = {"x": x, "k": int(rng.integers(-1000, 1000)), "flag": bool(i % 3 == 0)}
        if strings:
            data["s"] = f"s{i}"
        return desc.compose_event(
            data=data,
            timestamps={k: t0 + i for k in keys}, seq_num=i, time=t0 + i)

    docs += [("event", event(i, float(xs[i - 1]))) for i in range(1, n + 1)]
    docs += [("event", event(i, x)) for i, x in (extra or {}).items()]
    docs.append(("stop", bundle.compose_stop(time=t0 + n + 1)))
    return docs


def array_run(n: int, shape: tuple[int, ...], dtype: str = "<u2", *, nan_frame: int = -1,
              t0: float | None = None) -> Docs:
    t0 = time.time() if t0 is None else t0
    bundle = event_model.compose_run(time=t0, metadata={"scan_id": 2, "plan_name": "count"})
    keys = {"img": {"dtype": "array", "shape": list(shape), "source": "sim:img",
                    "dtype_numpy": dtype}}
    desc = bundle.compose_descriptor(name="primary", data_keys=keys, time=t0)
    rng = np.random.default_rng(n)
    docs: Docs = [("start", bundle.start_doc), ("descriptor", desc.descriptor_doc)]
    for i in range(1, n + 1):
        img = (rng.random(shape) * 60000).astype(dtype)
        if i == nan_frame:
            img.flat[3] = np.nan
        docs.append(("event", desc.compose_event(data={"img": img}, timestamps={"img": t0 + i},
                                                 seq_num=i, time=t0 + i)))
    docs.append(("stop", bundle.compose_stop(time=t0 + n + 1)))
    return docs


def as_pages(docs: Docs, size: int, order: list[int] | None = None) -> Docs:
    """The events of ``docs`` packed into pages of ``size``, sent in ``order``."""
    events = [d for name, d in docs if name == "event"]
    pages = [("event_page", event_model.pack_event_page(*events[i:i + size]))
             for i in range(0, len(events), size)]
    if order is not None:
        pages = [pages[i] for i in order]
    return [*docs[:2], *pages, docs[-1]]


# -- what numpy says --------------------------------------------------------------------------
def final_column(docs: Docs, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(positions, values) of ``key`` as stored: the last event of each seq_num."""
    (events,) = events_by_descriptor(docs).values()
    positions = np.array([e["seq_num"] - 1 for e in events])
    return positions, np.stack([np.asarray(e["data"][key], dtype=np.float64) for e in events])


def expected_windows(docs: Docs, key: str, per: int = 1) -> dict[str, np.ndarray]:
    positions, values = final_column(docs, key)
    length = int(positions.max()) + 1
    rows = W * per
    out: dict[str, list[float]] = {n: [] for n in ("count", "nan_count", "min", "max", "mean")}
    for start in range(0, length, rows):
        v = values[(positions >= start) & (positions < start + rows)]
        numbers = v[~np.isnan(v)]
        out["count"].append(len(v))
        out["nan_count"].append(int(np.isnan(v).sum()))
        out["min"].append(numbers.min() if numbers.size else np.nan)
        out["max"].append(numbers.max() if numbers.size else np.nan)
        out["mean"].append(numbers.mean() if numbers.size else np.nan)
    return {n: np.array(v) for n, v in out.items()}


def assert_windows(ds: Any, want: dict[str, np.ndarray]) -> None:
    for name in ("count", "nan_count"):
        np.testing.assert_array_equal(ds[name].values, want[name], err_msg=name)
    for name in ("min", "max"):
        np.testing.assert_array_equal(ds[name].values, want[name], err_msg=name)
    np.testing.assert_allclose(ds["mean"].values, want["mean"], rtol=1e-12, atol=1e-12,
                               equal_nan=True)


def expected_events(docs: Docs) -> np.ndarray:
    (events,) = events_by_descriptor(docs).values()
    frames = [np.asarray(e["data"]["img"]) for e in events]
    return np.array([[f.min(), f.max(), f.astype(np.float64).mean(),
                      f.astype(np.float64).sum()] for f in frames])


def assert_events(ds: Any, want: np.ndarray) -> None:
    np.testing.assert_array_equal(ds["min"].values, want[:, 0])
    np.testing.assert_array_equal(ds["max"].values, want[:, 1])
    np.testing.assert_allclose(ds["mean"].values, want[:, 2], rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(ds["sum"].values, want[:, 3], rtol=1e-12, equal_nan=True)


# -- helpers ----------------------------------------------------------------------------------
def store(metadata_uri: str, root: Path, tenant: str, docs: Docs, tail_rows: int,
          offset: int = 0) -> None:
    anyio.run(create_store, metadata_uri, tenant)
    anyio.run(lambda: ingest(metadata_uri, root, tenant, docs, start_offset=offset,
                             tail_rows=tail_rows))


def stream(metadata_uri: str, root: Path, tenant: str, docs: Docs) -> Iterator[Any]:
    with bluestream.open_catalog(tenant, metadata=metadata_uri, zarr_root=root) as cat:
        yield cat[docs[0][1]["uid"]]["primary"]


def group(root: Path, tenant: str, docs: Docs) -> Path:
    return root / descriptor_path(tenant, docs[0][1]["uid"], docs[1][1]["uid"])


# -- pure parts ---------------------------------------------------------------------------------
def test_window_stats_do_not_depend_on_how_windows_are_grouped() -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(size=(40, W)) * 1e6
    values[rng.random(values.shape) < 0.05] = np.nan
    written = rng.random(values.shape) < 0.9
    together = window_stats(values, written)
    for j in range(40):
        alone = window_stats(values[j:j + 1], written[j:j + 1])
        assert alone.tobytes() == together[j:j + 1].tobytes()
    flat = rows_stats(0, values.reshape(-1)[:40 * W - 17], written.reshape(-1)[:40 * W - 17])
    assert flat[:-1].tobytes() == together[:-1].tobytes()


def test_a_partial_write_reads_back_the_rest_of_its_windows() -> None:
    rng = np.random.default_rng(2)
    stored = rng.normal(size=3 * W)
    stored_seq = np.arange(1, 3 * W + 1)
    stored_seq[::5] = 0  # never written
    positions = np.arange(W - 10, 2 * W + 20)  # the end of window 0 .. into window 2
    new = rng.normal(size=positions.size)
    plan = WindowPlan.of(positions)
    assert plan.windows.tolist() == [0, 1, 2]
    assert plan.partial == ((0, 1), (2, 3))

    def read(name: str, a: int, b: int) -> np.ndarray:
        return (stored_seq if name == "seq_num" else stored)[a:b]

    got = window_summaries(plan, {"data/x": new}, read)["data/x"]
    final, written = stored.copy(), stored_seq > 0
    final[positions], written[positions] = new, True
    want = rows_stats(0, final, written)
    assert got.tobytes() == want.tobytes()


def test_whole_windows_give_the_same_bytes_alone_and_beside_partial_ones() -> None:
    """A whole window without NaN is summarised by the short path when alone and by the
    general one beside a window with NaN or unwritten rows: the bytes are the same
    (replays and other batchings must store identical summaries), infinities and
    signed zeros included, and +inf with -inf gives a NaN mean without a warning."""
    rng = np.random.default_rng(5)
    whole = rng.normal(size=(4, W)) * 1e300
    whole[0, :3] = [np.inf, -0.0, 0.0]
    whole[1, :2] = [np.inf, -np.inf]
    whole[2, :] = -0.0
    whole[3, 7] = 5e-324  # subnormal
    partial = rng.normal(size=(1, W))
    partial[0, 5] = np.nan
    ones = np.ones((5, W), bool)
    holes = ones.copy()
    holes[4, 9] = False
    with np.errstate(all="raise"):
        alone = window_stats(whole, ones[:4])
    for other, written in ((partial, ones), (rng.normal(size=(1, W)), holes)):
        beside = window_stats(np.concatenate([whole, other]), written)
        assert beside[:4].tobytes() == alone.tobytes()
    assert np.isnan(alone[1, 3]) and alone[2, 1] == 0.0


@pytest.mark.parametrize("nan", [False, True])
@pytest.mark.parametrize(("start", "n"), [(0, 5 * W), (W - 3, 3 * W + 7), (7, 20), (0, 2)])
def test_writes_equal_numpy_per_window(start: int, n: int, nan: bool) -> None:
    """A contiguous write (the usual one: written as a slice of the windows, whole
    windows summarised without masks) and the same write with a gap (scattered) give
    numpy's figures per window."""
    rng = np.random.default_rng(start + n)
    values = rng.normal(size=n) * 1e3
    if nan:
        values[rng.random(n) < 0.2] = np.nan
    positions = np.arange(start, start + n)

    def nothing(name: str, a: int, b: int) -> np.ndarray:
        return np.zeros(b - a) if name == "seq_num" else np.full(b - a, np.nan)

    keep = np.ones(n, bool)
    keep[n // 2] = False
    for pos, vals in ((positions, values), (positions[keep], values[keep])):
        plan = WindowPlan.of(pos)
        got = window_summaries(plan, {"x": vals}, nothing)["x"]
        for j, w in enumerate(plan.windows.tolist()):
            mine = vals[(pos // W) == w]
            numbers = mine[~np.isnan(mine)]
            assert got[j, 0] == mine.size and got[j, 4] == mine.size - numbers.size
            if numbers.size:
                assert (got[j, 1], got[j, 2]) == (numbers.min(), numbers.max())
                assert got[j, 3] == pytest.approx(numbers.mean(), rel=1e-12)
            else:
                assert np.isnan(got[j, 1:4]).all()


def test_merging_windows_equals_numpy_over_their_rows() -> None:
    rng = np.random.default_rng(3)
    values = rng.normal(size=10 * W + 33)
    values[rng.random(values.size) < 0.1] = np.nan
    values[W:2 * W] = np.nan
    stats = rows_stats(0, values, np.ones(values.size, bool))
    for per in (2, 3, 11):
        merged = merge_windows(stats, per)
        for g in range(merged.shape[0]):
            v = values[g * per * W:(g + 1) * per * W]
            n = v[~np.isnan(v)]
            assert merged[g, 0] == v.size and merged[g, 4] == np.isnan(v).sum()
            if n.size:
                assert (merged[g, 1], merged[g, 2]) == (n.min(), n.max())
                assert merged[g, 3] == pytest.approx(n.mean(), rel=1e-12)


def test_event_stats_equal_numpy() -> None:
    rng = np.random.default_rng(4)
    for dtype, shape in itertools.product(("u2", "i4", "f4", "f8", "u8", "?"),
                                          ((5, 6, 7), (3, 200, 200))):  # small, one by one
        frames = (rng.random(shape) * 1000).astype(dtype)
        got = event_stats(frames)
        for i, f in enumerate(frames):
            want = [f.min(), f.max(), f.astype(np.float64).mean(), f.astype(np.float64).sum()]
            np.testing.assert_allclose(got[i], want, rtol=1e-6 if dtype == "f4" else 1e-12)


# -- scalar fields through ingest and the catalog ------------------------------------------
@pytest.mark.parametrize("n", [1000, 100])
def test_scalar_summaries_equal_numpy(metadata_uri: str, zarr_root: Path, tenant: str,
                                      tail_rows: int, n: int) -> None:
    """Several windows, a partial last one, NaNs and a window of NaNs only; rows in the
    tail, in Zarr, or both; integers and booleans too."""
    docs = numeric_run(n)
    store(metadata_uri, zarr_root, tenant, docs, tail_rows)
    for s in stream(metadata_uri, zarr_root, tenant, docs):
        for key in ("x", "k", "flag"):
            ds = s.summary(key)
            assert ds.sizes["window"] == math.ceil(n / W)
            assert_windows(ds, expected_windows(docs, key))
            assert ds["seq_num"].values.tolist() == list(range(1, n + 1, W))
            assert ds["seq_num_stop"].values[-1] == n + 1
            assert ds.attrs["window"] == W and ds.attrs["field"] == key


def test_summaries_are_stored_at_ingest(metadata_uri: str, zarr_root: Path,
                                        tenant: str) -> None:
    """The stored windows equal numpy's; with the data chunks gone, summary() still
    answers (it reads the summaries, and the tail's rows)."""
    docs = numeric_run(1000)
    store(metadata_uri, zarr_root, tenant, docs, DEFAULT_BLOCK)
    path = group(zarr_root, tenant, docs)
    arr = zarr.open_array(zarr.storage.LocalStore(path / "summary"), mode="r")
    assert arr.attrs["fields"] == ["count", "min", "max", "mean", "nan_count"]
    assert arr.attrs["keys"] == ["flag", "k", "x"] and arr.attrs["window"] == W
    assert arr.metadata.dimension_names == ("window", "key", "field")
    in_zarr = 768 // W  # rows from 768 on are in the tail
    for j, key in enumerate(arr.attrs["keys"]):
        want = expected_windows(docs, key)
        got = np.asarray(arr[:in_zarr, j])
        np.testing.assert_array_equal(got[:, [0, 4]], np.column_stack(
            [want["count"], want["nan_count"]])[:in_zarr])
        np.testing.assert_array_equal(got[:, 1:3], np.column_stack(
            [want["min"], want["max"]])[:in_zarr])
        np.testing.assert_allclose(got[:, 3], want["mean"][:in_zarr], rtol=1e-12,
                                   equal_nan=True)
    assert np.isnan(np.asarray(arr[in_zarr:])).all()  # the tail's window: not stored
    want = expected_windows(docs, "x")
    shutil.rmtree(path / "data" / "x" / "c")
    for s in stream(metadata_uri, zarr_root, tenant, docs):
        assert_windows(s.summary("x"), want)


@pytest.mark.parametrize("what", ["no summary arrays", "unsummarised windows"])
def test_storage_without_summaries_still_answers(metadata_uri: str, zarr_root: Path,
                                                 tenant: str, what: str) -> None:
    """Groups written before summaries existed (no ``summary``), or windows that no
    writer summarised (the NaN fill): computed from the rows."""
    docs = numeric_run(1000)
    store(metadata_uri, zarr_root, tenant, docs, 0)
    path = group(zarr_root, tenant, docs) / "summary"
    if what == "no summary arrays":
        shutil.rmtree(path)
    else:
        shutil.rmtree(path / "c")
    for s in stream(metadata_uri, zarr_root, tenant, docs):
        assert_windows(s.summary("x"), expected_windows(docs, "x"))
        assert_windows(s.summary("x", points=2), expected_windows(docs, "x", per=2))


def test_points_merge_adjacent_windows(metadata_uri: str, zarr_root: Path,
                                       tenant: str) -> None:
    docs = numeric_run(3000)
    store(metadata_uri, zarr_root, tenant, docs, DEFAULT_BLOCK)
    windows = math.ceil(3000 / W)  # 12
    for s in stream(metadata_uri, zarr_root, tenant, docs):
        for points, per in [(1, 12), (2, 6), (5, 3), (7, 2), (12, 1), (1000, 1)]:
            ds = s.summary("x", points=points)
            assert ds.sizes["window"] == math.ceil(windows / per) <= points
            assert ds.attrs["windows_per_point"] == per
            assert_windows(ds, expected_windows(docs, "x", per=per))
            assert ds["seq_num"].values.tolist() == list(range(1, 3001, per * W))
        with pytest.raises(ValueError, match="points"):
            s.summary("x", points=0)


def test_replay_stores_identical_bytes(metadata_uri: str, zarr_root: Path,
                                       tenant: str, tail_rows: int) -> None:
    docs = numeric_run(1000)
    store(metadata_uri, zarr_root, tenant, docs, tail_rows)
    before = storage_digest(metadata_uri, tenant, zarr_root)
    assert any("/summary/c/" in k for k in before)  # 768 rows or more in Zarr
    store(metadata_uri, zarr_root, tenant, docs, tail_rows)  # the same documents again
    assert storage_digest(metadata_uri, tenant, zarr_root) == before
    for s in stream(metadata_uri, zarr_root, tenant, docs):
        assert_windows(s.summary("x"), expected_windows(docs, "x"))


@pytest.mark.parametrize("tail", [0, 3, DEFAULT_BLOCK])
async def test_batching_and_order_do_not_change_the_bytes(tmp_path: Path, tail: int) -> None:
    """The same final rows stored in order in one batch, or as pages out of order over
    many batches with some rows rewritten (later rows win), leave identical files: the
    summaries depend on the rows stored only. Both equal numpy's."""
    t0 = time.time()
    rewritten = {5: 1e9, 300: -1e9, 301: np.nan, 700: 4.0}
    final = numeric_run(1000, t0=t0, extra=rewritten)
    events = {e["seq_num"]: e for e in events_by_descriptor(final).popitem()[1]}
    in_order: Docs = [*final[:2], *[("event", events[i]) for i in sorted(events)], final[-1]]
    pages = as_pages([*final[:-len(rewritten) - 1], final[-1]], 37)
    body = pages[2:-1]
    order = np.random.default_rng(5).permutation(len(body)).tolist()
    shuffled = [*pages[:2], *[body[i] for i in order],
                *[(n, d) for n, d in final[-len(rewritten) - 1:-1]], pages[-1]]
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    roots = {"a": tmp_path / "a", "b": tmp_path / "b"}
    await create_store(uri, "ta")
    await create_store(uri, "tb")
    await ingest(uri, roots["a"], "ta", in_order, tail_rows=tail)
    ing, sink, registry = make_ingestor(uri, roots["b"], tail_rows=tail)
    try:
        envs = envelopes(shuffled, "tb")
        cuts = [0, 1, 3, 4, 9, 10, 17, len(envs)]
        for a, b in itertools.pairwise(cuts):
            await ing.process(envs[a:b])
    finally:
        await registry.aclose()
    assert not sink.letters

    def files(root: Path, tenant: str) -> dict[str, str]:
        return {k.split("/", 1)[1]: v for k, v in zarr_files(root, tenant).items()}

    a, b = files(roots["a"], "ta"), files(roots["b"], "tb")
    assert a == b
    assert any("/summary/c/" in k for k in a)
    async with bluestream.open_catalog_async("tb", metadata=uri, zarr_root=roots["b"]) as cat:
        run = await cat[final[0][1]["uid"]]
        assert_windows(await run["primary"].summary("x"), expected_windows(in_order, "x"))
        assert_windows(await run["primary"].summary("k", points=2),
                       expected_windows(in_order, "k", per=2))


def test_short_runs_create_no_zarr_group(metadata_uri: str, zarr_root: Path,
                                         tenant: str) -> None:
    docs = numeric_run(40)
    store(metadata_uri, zarr_root, tenant, docs, DEFAULT_BLOCK)
    assert [p for p in zarr_root.rglob("*") if p.is_file()
            and ".bluestream-locks" not in p.parts] == []
    for s in stream(metadata_uri, zarr_root, tenant, docs):
        assert_windows(s.summary("x"), expected_windows(docs, "x"))


def test_unknown_and_non_numeric_fields(metadata_uri: str, zarr_root: Path,
                                        tenant: str) -> None:
    docs = numeric_run(300, strings=True)
    store(metadata_uri, zarr_root, tenant, docs, DEFAULT_BLOCK)
    for s in stream(metadata_uri, zarr_root, tenant, docs):
        assert_windows(s.summary("x"), expected_windows(docs, "x"))
        with pytest.raises(KeyError, match="no data key 'nope'"):
            s.summary("nope")
        with pytest.raises(TypeError, match="string type"):
            s.summary("s")


def test_streams_of_several_descriptors_and_mixed_fields(metadata_uri: str, zarr_root: Path,
                                                         tenant: str, tail_rows: int) -> None:
    """Two descriptors (the second continues the first's seq_nums): their windows one
    after the other. Small arrays (a vector, a matrix) are summarised per event; text
    and variable-length values are not."""
    t0 = time.time()
    multi, mixed = multi_descriptor_run(t0), mixed_run(t0 + 100)
    store(metadata_uri, zarr_root, tenant, multi + mixed, tail_rows)
    for s in stream(metadata_uri, zarr_root, tenant, multi):
        ds = s.summary("x")
        assert ds["count"].values.tolist() == [3, 3]
        assert ds["mean"].values.tolist() == [3.0, 7.5]
        assert ds["seq_num"].values.tolist() == [1, 4]
        assert ds["seq_num_stop"].values.tolist() == [4, 7]
        assert len(ds.attrs["descriptors"]) == 2
        one = s.summary("n", points=1)
        assert one["count"].values.tolist() == [6] and one["mean"].values.tolist() == [3.5]
    for s in stream(metadata_uri, zarr_root, tenant, mixed):
        events = [d for n, d in mixed if n == "event"]
        for key in ("vec", "mat"):
            values = [np.asarray(e["data"][key], dtype=np.float64) for e in events]
            assert_events(s.summary(key), np.array(
                [[v.min(), v.max(), v.mean(), v.sum()] for v in values]))
        for key, what in (("mode", "string type"), ("peaks", "JSON text")):
            with pytest.raises(TypeError, match=what):
                s.summary(key)


# -- array fields ------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "shape", "dtype"), [
    (300, (16, 16), "<u2"),  # 256 rows in Zarr, the rest in the tail
    (40, (64, 64), "<u2"),  # too wide for a tail: every row in Zarr
    (30, (8, 8), "<f4"),  # floats, a NaN in one frame
])
def test_array_fields_have_per_event_summaries(metadata_uri: str, zarr_root: Path,
                                               tenant: str, tail_rows: int, n: int,
                                               shape: tuple[int, ...], dtype: str) -> None:
    docs = array_run(n, shape, dtype, nan_frame=7 if dtype == "<f4" else -1)
    store(metadata_uri, zarr_root, tenant, docs, tail_rows)
    want = expected_events(docs)
    for s in stream(metadata_uri, zarr_root, tenant, docs):
        ds = s.summary("img")
        assert ds.sizes["time"] == n
        assert ds["seq_num"].values.tolist() == list(range(1, n + 1))
        np.testing.assert_array_equal(ds["time"].values, s.read()["time"].values)
        assert_events(ds, want)
        merged = s.summary("img", points=4)
        per = math.ceil(n / 4)
        assert merged.sizes["time"] == math.ceil(n / per)
        np.testing.assert_array_equal(merged["max"].values, [
            want[i:i + per, 1].max() for i in range(0, n, per)])
        np.testing.assert_allclose(merged["sum"].values, [
            want[i:i + per, 3].sum() for i in range(0, n, per)], rtol=1e-12)
    if (n, shape) == (40, (64, 64)) and tail_rows in (0, DEFAULT_BLOCK):  # all in Zarr
        arr = zarr.open_array(zarr.storage.LocalStore(
            group(zarr_root, tenant, docs) / "event_summary"), mode="r")
        assert arr.attrs["keys"] == ["img"]
        np.testing.assert_allclose(np.asarray(arr[:n, 0]), want, rtol=1e-12)


def test_replay_of_images_stores_identical_bytes(metadata_uri: str, zarr_root: Path,
                                                 tenant: str) -> None:
    docs = array_run(40, (64, 64))
    store(metadata_uri, zarr_root, tenant, docs, DEFAULT_BLOCK)
    before = storage_digest(metadata_uri, tenant, zarr_root)
    assert any("/event_summary/c/" in k for k in before)
    store(metadata_uri, zarr_root, tenant, docs, DEFAULT_BLOCK)
    assert storage_digest(metadata_uri, tenant, zarr_root) == before


# -- object stores --------------------------------------------------------------------------
@pytest.mark.s3
def test_summaries_on_an_object_store(s3_root: Any, tmp_path: Path, tenant: str) -> None:
    """An ``s3://`` root goes through the same writer (its store's sync calls) and the
    same reader: windows read back, stored, merged; images summarised per event."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    scalars, images = numeric_run(700), array_run(20, (64, 64))
    anyio.run(create_store, uri, tenant)
    for docs, tail in ((scalars, 100), (images, DEFAULT_BLOCK)):
        anyio.run(lambda d=docs, t=tail: ingest(uri, s3_root, tenant, d, tail_rows=t))
    assert any("/summary/c/" in k for k in zarr_files(s3_root, tenant))
    with bluestream.open_catalog(tenant, metadata=uri, zarr_root=s3_root) as cat:
        s = cat[scalars[0][1]["uid"]]["primary"]
        assert_windows(s.summary("x"), expected_windows(scalars, "x"))
        assert_windows(s.summary("x", points=2), expected_windows(scalars, "x", per=2))
        assert_events(cat[images[0][1]["uid"]]["primary"].summary("img"),
                      expected_events(images))
