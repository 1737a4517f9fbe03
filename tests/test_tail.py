"""The tail of a stream (storage/tail.py): its newest rows kept in the metadata store.

What is held here: a tail survives encoding bit-exact for every column dtype the layout
uses; wherever rows end up (arrays or tail) depends only on the rows, never on how they
were batched, and a reader that lays the tail over the arrays gets the last-wins rows
(random batchings, replays, out-of-order and duplicate seq_nums); wide rows keep no
tail; a tail whose dtype differs from a later page is refused like an array would be;
the catalog's reader (``TailedArray``) reads arrays, tail and both, and through dask;
storage written with one block size is read and continued with another (or with tails
off: the tail then moves to the arrays and is removed); a one-event run creates no Zarr
file at all.

Shown to fail: with the tail's start taken from the batch's lowest row instead of the
highest position, ``test_where_rows_go_does_not_depend_on_batching`` fails (tails
differ between batchings); with the old tail's rows not carried into the new tail, it
and ``test_block_size_changes[4-then-256]`` fail; with ``TailedArray`` reading the arrays
only below ``start``, the ``TailedArray`` test and ``[4-then-256]`` fail (rows the arrays
hold above a smaller start vanish).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bluestream
from bluestream.catalog.arrays import TailedArray
from bluestream.consumers.pipeline import concat_pages
from bluestream.errors import ValidationError
from bluestream.layout import STRING, Page, field_specs, stored_columns
from bluestream.limits import Limits
from bluestream.storage.tail import Tail, block_for, last_wins_order, merge, page_values
from helpers import (
    envelopes,
    make_ingestor,
    read_stream_arrays,
    scalar_run,
    stored_tail,
)

pytestmark = pytest.mark.anyio


def _page(seq: list[int], *, value: float = 0.0, desc: str = "d") -> Page:
    s = np.asarray(seq, dtype=np.int64)
    return Page(descriptor=desc, uid=np.array([f"u{i}-{value}" for i in seq], dtype=STRING),
                seq_num=s, time=s.astype(np.float64) + value,
                data={"x": s.astype(np.float64) * 10 + value,
                      "name": np.array([f"n{i}" for i in seq], dtype=STRING)},
                timestamps={"x": s + 0.5, "name": s + 0.25}, filled={})


_DESCRIPTOR = {"uid": "d", "data_keys": {
    "x": {"source": "s", "dtype": "number", "shape": []},
    "name": {"source": "s", "dtype": "string", "shape": []}}}
_SPECS = field_specs(_DESCRIPTOR, Limits())
_COLUMNS = stored_columns(_SPECS, _page([1]))


def test_encode_round_trip_every_dtype() -> None:
    cols = {
        "seq_num": np.array([1, 0, 3], dtype=np.int64),
        "time": np.array([1.5, np.nan, 3.25]),
        "uid": np.array(["a", "", "é"], dtype=STRING),
        "data/f4": np.array([1, 2, 3], dtype="<f4"),
        "data/u2img": np.arange(3 * 2 * 3, dtype=">u2").reshape(3, 2, 3),
        "data/b": np.array([True, False, True]),
        "data/c": np.array([1 + 2j, 0, np.nan], dtype=np.complex128),
    }
    back = Tail.decode(Tail(512, cols).encode())
    assert back.start == 512 and set(back.columns) == set(cols)
    for name, arr in cols.items():
        got = back.columns[name]
        assert got.dtype == arr.dtype and got.shape == arr.shape, name
        if arr.dtype.kind == "T":
            assert got.tolist() == arr.tolist()
        else:
            np.testing.assert_array_equal(got, arr)
        assert got.flags.writeable, name
    assert back.top == 514 and len(back) == 3
    with pytest.raises(ValueError, match="format"):
        Tail.decode(b"\x81\xa6format\x02")


def _specs(**keys: dict[str, Any]) -> Any:
    return field_specs({"uid": "d", "data_keys": {
        k: {"source": "s", **v} for k, v in keys.items()}}, Limits())


def test_which_descriptors_keep_a_tail() -> None:
    """Decided from the descriptor alone: numbers and references do; images (a block
    would be large) and strings of unknown length (string keys, variable arrays kept as
    JSON text: one value may be megabytes) do not."""
    numbers = _specs(x={"dtype": "number", "shape": []}, n={"dtype": "integer", "shape": []})
    assert block_for(numbers, 256) == 256
    assert block_for(numbers, 0) == 0
    assert block_for(_specs(x={"dtype": "number", "shape": []},
                            img={"dtype": "array", "shape": [512, 512],
                                 "dtype_numpy": "<u2"}), 256) == 0
    assert block_for(_specs(s={"dtype": "string", "shape": []}), 256) == 0
    assert block_for(_specs(v={"dtype": "array", "shape": [None]}), 256) == 0
    assert block_for(_specs(ref={"dtype": "array", "shape": [2, 2],
                                 "external": "FILESTORE:"}), 256) == 256


def _replay(batches: list[Page], block: int) -> tuple[dict[int, tuple[float, str]], Tail]:
    """Apply pages as the pipeline does; the "arrays" are a dict position -> row."""
    arrays: dict[int, tuple[float, str]] = {}
    tail: Tail | None = None
    for page in batches:
        to_arrays, tail = merge(tail, page, _COLUMNS, block)
        if to_arrays is not None:  # write_page: later rows with the same seq_num win
            order, positions = last_wins_order(to_arrays.seq_num)
            vals = page_values(to_arrays, order)
            for i, pos in enumerate(positions.tolist()):
                arrays[pos] = (float(vals["data/x"][i]), str(vals["uid"][i]))
    assert tail is not None
    return arrays, tail


def _read(arrays: dict[int, tuple[float, str]], tail: Tail) -> dict[int, tuple[float, str]]:
    rows = dict(arrays)
    for i in np.flatnonzero(tail.columns["seq_num"] > 0).tolist():
        rows[tail.start + i] = (float(tail.columns["data/x"][i]), str(tail.columns["uid"][i]))
    return rows


def _take(page: Page, i: int) -> Page:
    sel = slice(i, i + 1)
    return Page(page.descriptor, page.uid[sel], page.seq_num[sel], page.time[sel],
                {k: v[sel] for k, v in page.data.items()},
                {k: v[sel] for k, v in page.timestamps.items()}, {})


pages_strategy = st.lists(
    st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=12),
    min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(pages=pages_strategy, block=st.sampled_from([1, 2, 3, 8, 64]),
       cut=st.integers(min_value=1, max_value=5))
def test_where_rows_go_does_not_depend_on_batching(pages: list[list[int]], block: int,
                                                   cut: int) -> None:
    """Same rows in the same order, batched two ways: same arrays, same tail bytes, and
    the reader sees every seq_num's last row."""
    stream = [_page(seq, value=k / 100) for k, seq in enumerate(pages)]
    flat = [(s, k / 100) for k, seq in enumerate(pages) for s in seq]
    arrays_a, tail_a = _replay(stream, block)
    # the same rows cut into pages of ``cut`` rows (order kept)
    rows = [_take(p, i) for p in stream for i in range(len(p))]
    regrouped = [concat_pages(rows[i:i + cut]) for i in range(0, len(rows), cut)]
    arrays_b, tail_b = _replay(regrouped, block)
    assert arrays_a == arrays_b
    assert tail_a.encode() == tail_b.encode()
    expected: dict[int, tuple[float, str]] = {}
    for s, v in flat:
        expected[s - 1] = (s * 10 + v, f"u{s}-{v}")
    assert _read(arrays_a, tail_a) == expected
    top = max(s for s, _ in flat) - 1
    assert tail_a.start == top // block * block and tail_a.top == top
    assert all(pos < tail_a.start for pos in arrays_a)
    # a replay of everything changes nothing
    arrays_c, tail_c = _replay(stream + stream, block)
    assert tail_c.encode() == tail_a.encode() and arrays_c == arrays_a


def test_dtype_mismatch_is_refused() -> None:
    _, tail = merge(None, _page([1, 2]), _COLUMNS, 8)
    bad = _page([3])
    bad.data["name"] = np.array([1.5])
    with pytest.raises(ValidationError, match="data/name"):
        merge(tail, bad, _COLUMNS, 8)


async def test_tailed_array_reads_arrays_tail_and_both() -> None:
    import zarr

    base = await zarr.api.asynchronous.create_array(
        store=zarr.storage.MemoryStore(), shape=(16,), chunks=(4,), dtype="f8",
        fill_value=0.0)
    await base.setitem(slice(0, 16), np.arange(16, dtype="f8"))
    tail = np.array([100.0, 0.0, 102.0])
    written = np.array([True, False, True])
    arr = TailedArray(base, tail, 8, written)
    assert arr.shape == (16,)  # the arrays hold rows past the tail: they are read too
    # rows the tail holds nothing for come from the arrays (here: position 9, and 11 on)
    np.testing.assert_array_equal(await arr.getitem(slice(6, 13)),
                                  [6, 7, 100, 9, 102, 11, 12])
    only_tail = TailedArray(None, tail, 0, written)
    np.testing.assert_array_equal(await only_tail.getitem(slice(None)), [100, 0, 102])
    sync = arr.sync()
    np.testing.assert_array_equal(sync[2:10], [2, 3, 4, 5, 6, 7, 100, 9])
    np.testing.assert_array_equal(sync[np.array([10, 0, 8])], [102, 0, 100])
    import dask.array as da
    lazy = da.from_array(sync, chunks=sync.chunks, asarray=True)
    np.testing.assert_array_equal(lazy.compute(), [0, 1, 2, 3, 4, 5, 6, 7, 100, 9, 102,
                                                   11, 12, 13, 14, 15])


async def _ingest(uri: str, root: Path, tenant: str, docs: list[tuple[str, dict[str, Any]]],
                  tail_rows: int, offset: int) -> None:
    ing, sink, registry = make_ingestor(uri, root, tail_rows=tail_rows)
    try:
        await ing.process(envelopes(docs, tenant, start_offset=offset))
    finally:
        await registry.aclose()
    assert not sink.letters


@pytest.mark.parametrize("blocks", [(256, 0), (4, 256), (256, 4), (0, 4)],
                         ids=["tail-then-off", "4-then-256", "256-then-4", "off-then-4"])
async def test_block_size_changes(blocks: tuple[int, int], tmp_path: Path) -> None:
    """Half a run written with one block size, the rest with another: every event read
    back, bit-exact, through the catalog and straight from storage."""
    uri, root, tenant = f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "z", "t"
    docs = scalar_run(41, fields=2)
    half = 2 + 20  # start, descriptor, 20 events
    await _ingest(uri, root, tenant, docs[:half], blocks[0], 0)
    await _ingest(uri, root, tenant, docs[half:], blocks[1], half)
    events = [d for n, d in docs if n == "event"]
    run_uid, desc_uid = docs[0][1]["uid"], docs[1][1]["uid"]
    raw = read_stream_arrays(root, tenant, run_uid, desc_uid, uri)
    assert raw["seq_num"].tolist() == list(range(1, 42))
    tail = stored_tail(uri, tenant, desc_uid)
    assert (tail is None) == (blocks[1] == 0)
    with bluestream.open_catalog(tenant, metadata=uri, zarr_root=root) as cat:
        ds = cat[-1]["primary"].read()
        for key in events[0]["data"]:
            np.testing.assert_array_equal(ds[key].values, [e["data"][key] for e in events])
        lazy = cat[-1]["primary"].to_dask()
        key = next(iter(events[0]["data"]))
        np.testing.assert_array_equal(lazy[key].values, [e["data"][key] for e in events])
        replayed = [d for n, d in cat[-1].documents() if n in ("event", "event_page")]
        assert sum(len(d["seq_num"]) if isinstance(d["seq_num"], list) else 1
                   for d in replayed) == 41


async def test_late_row_below_rows_already_in_the_arrays(tmp_path: Path) -> None:
    """A stream stored wholly in Zarr (tails off, or written by layout version 1) gets a
    tail when a replayed early event arrives: the rows in the arrays past that tail must
    still be read."""
    uri, root, tenant = f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "z", "t"
    docs = scalar_run(30, fields=2)
    await _ingest(uri, root, tenant, docs, 0, 0)
    await _ingest(uri, root, tenant, [docs[6]], 256, len(docs))  # seq_num 5 again
    events = [d for n, d in docs if n == "event"]
    with bluestream.open_catalog(tenant, metadata=uri, zarr_root=root) as cat:
        ds = cat[-1]["primary"].read()
        assert ds.sizes["time"] == 30
        key = next(iter(events[0]["data"]))
        np.testing.assert_array_equal(ds[key].values, [e["data"][key] for e in events])


async def test_one_event_run_writes_no_zarr_file(tmp_path: Path) -> None:
    uri, root, tenant = f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "z", "t"
    docs = scalar_run(1, fields=3)
    await _ingest(uri, root, tenant, docs, 256, 0)
    files = [p for p in root.rglob("*") if p.is_file() and ".bluestream-locks" not in p.parts]
    assert files == []
    with bluestream.open_catalog(tenant, metadata=uri, zarr_root=root) as cat:
        run = cat[-1]
        ds = run["primary"].read()
        event = docs[2][1]
        assert ds.sizes["time"] == 1
        for key, value in event["data"].items():
            assert ds[key].values.tolist() == [value]
        names = [n for n, _ in run.documents()]
        assert names == ["start", "descriptor", "event", "stop"] or \
            names == ["start", "descriptor", "event_page", "stop"]
