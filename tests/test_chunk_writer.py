"""The synchronous chunk writer stores exactly the bytes zarr's own ``setitem`` stores."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
import zarr.api.asynchronous as za
from zarr.storage import LocalStore

from bluestream.layout import STRING
from bluestream.storage import chunk_writer

CASES: list[tuple[str, Any, tuple[int, ...], Any]] = [
    ("f8", np.dtype("f8"), (), np.nan),
    ("i8", np.dtype("i8"), (), 0),
    ("bool", np.dtype("bool"), (), False),
    ("c16", np.dtype("c16"), (), complex(np.nan, np.nan)),
    ("str", STRING, (), ""),
    ("u2-frames", np.dtype("u2"), (3, 5), 0),
    ("f4-vectors", np.dtype(">f4"), (4,), np.nan),
]

#: (start, count) of successive writes: partial first chunk, a write spanning three
#: chunks, an overwrite inside one, one at a gap (the chunk in between never written),
#: and a rewrite of a whole chunk.
WRITES = [(0, 3), (3, 20), (5, 2), (40, 4), (8, 8)]


def _values(dtype: Any, shape: tuple[int, ...], start: int, n: int) -> np.ndarray:
    if dtype == STRING:
        return np.array([f"uid-{start + i}-é" for i in range(n)], dtype=STRING)
    base = np.arange(start, start + n, dtype=np.float64).reshape(n, *([1] * len(shape)))
    full = np.broadcast_to(base, (n, *shape)).astype(dtype)
    if dtype.kind == "b":
        full = (np.arange(n) % 2 == 0).reshape(n, *([1] * len(shape)))
        full = np.broadcast_to(full, (n, *shape)).copy()
    return np.ascontiguousarray(full)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "zarr.json"}


@pytest.mark.parametrize(("name", "dtype", "shape", "fill"), CASES, ids=[c[0] for c in CASES])
def test_same_bytes_as_setitem(tmp_path: Path, name: str, dtype: Any,
                               shape: tuple[int, ...], fill: Any) -> None:
    async def run() -> None:
        with zarr.config.set({"array.write_empty_chunks": True}):
            arrays = []
            for which in ("zarr", "ours"):
                group = await za.open_group(store=LocalStore(tmp_path / which), mode="a",
                                            zarr_format=3)
                arrays.append(await group.create_array(
                    "x", shape=(64, *shape), chunks=(8, *shape), dtype=dtype,
                    fill_value=fill))
            theirs, ours = arrays
            assert chunk_writer.supports(ours)
            for start, n in WRITES:
                values = _values(dtype, shape, start, n)
                await theirs.setitem(slice(start, start + n), values)
                chunk_writer.write_all([[chunk_writer.RowWrite(ours, start, values)]])
            a = await theirs.getitem(slice(None))
            b = await ours.getitem(slice(None))
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert _files(tmp_path / "zarr") == _files(tmp_path / "ours")
        assert len(_files(tmp_path / "ours")) == 4  # chunks 0, 1, 2 and 5 only

    asyncio.run(run())


def test_sharded_arrays_are_left_to_setitem(tmp_path: Path) -> None:
    async def run() -> None:
        group = await za.open_group(store=LocalStore(tmp_path), mode="a", zarr_format=3)
        sharded = await group.create_array("s", shape=(64,), chunks=(8,), shards=(32,),
                                           dtype="f8")
        assert not chunk_writer.supports(sharded)

    asyncio.run(run())


def test_a_failed_write_raises(tmp_path: Path) -> None:
    async def run() -> None:
        group = await za.open_group(store=LocalStore(tmp_path / "g"), mode="a",
                                    zarr_format=3)
        arr = await group.create_array("x", shape=(16,), chunks=(8,), dtype="f8")
        (tmp_path / "g" / "x" / "c").write_bytes(b"")  # a file where chunks' folder goes
        with pytest.raises(OSError):
            chunk_writer.write_all([[chunk_writer.RowWrite(arr, 0, np.ones(8))]])

    asyncio.run(run())


def test_runs_of_rows_in_one_chunk_on_two_threads(tmp_path: Path) -> None:
    """A batch with a hole: two runs of rows land in one chunk, and the batch is big
    enough to go through the two chunk threads. Every row of both runs is stored (the
    jobs of one chunk run in order on one thread; on two, each read the chunk before the
    other wrote it and the last write dropped the other's rows)."""
    async def run() -> None:
        group = await za.open_group(store=LocalStore(tmp_path / "g"), mode="a",
                                    zarr_format=3)
        arr = await group.create_array("img", shape=(64, 512, 512), chunks=(8, 512, 512),
                                       dtype="u2", fill_value=0)
        rng = np.random.default_rng(3)
        frames = rng.integers(1, 4096, size=(64, 512, 512), dtype=np.uint16)
        for round_ in range(4):  # rows 0-2, 4-10, 12-13, 15-40: holes inside chunks 0, 1
            runs = [(0, 3), (4, 7), (12, 2), (15, 26)]
            offset = 41 * round_ % 7  # other places of the holes in later rounds
            writes = [chunk_writer.RowWrite(arr, a + offset, frames[a + offset:a + offset + n])
                      for a, n in runs]
            assert sum(w.values.nbytes for w in writes) >= chunk_writer._PARALLEL_BYTES
            chunk_writer.write_all([writes])
            got = np.asarray(await arr.getitem(slice(None)))
            for a, n in runs:
                np.testing.assert_array_equal(got[a + offset:a + offset + n],
                                              frames[a + offset:a + offset + n],
                                              err_msg=f"round {round_}, rows {a + offset}+{n}")
            await arr.setitem(slice(None), np.zeros((64, 512, 512), dtype=np.uint16))

    asyncio.run(run())


def test_an_image_run_with_a_hole_is_stored_whole(tmp_path: Path) -> None:
    """End to end: 40 frames of 512x512 with seq_num 7 missing, no tail (every row to
    Zarr): the ingest's one batch writes two runs of rows into the first chunk, through
    the two chunk threads; the catalog reads back every frame that arrived."""
    import anyio

    from bluestream.catalog.core import AsyncCatalog, make_context
    from helpers import envelopes, image_run, make_ingestor

    async def run() -> None:
        metadata, zarr_root = f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "zarr"
        docs = [d for d in image_run(40, (512, 512))
                if not (d[0] == "event" and d[1]["seq_num"] == 7)]
        ing, sink, registry = make_ingestor(metadata, zarr_root, tail_rows=0)
        try:
            await ing.process(envelopes(docs, "holes"))
        finally:
            await registry.aclose()
        assert not sink.letters, sink.reasons
        frames = np.stack([np.asarray(d["data"]["img"]) for n, d in docs if n == "event"])
        cat = AsyncCatalog(make_context("holes", metadata=metadata, zarr_root=str(zarr_root)))
        try:
            ds = await (await cat.lookup(str(docs[0][1]["uid"])))["primary"].read()
        finally:
            await cat.aclose()
        assert ds["seq_num"].values.tolist() == [i for i in range(1, 41) if i != 7]
        np.testing.assert_array_equal(ds["img"].values, frames)

    anyio.run(run)
