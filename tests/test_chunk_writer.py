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
