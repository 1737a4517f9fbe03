"""The metadata written by :mod:`bluestream.storage.array_meta` in one worker thread is
zarr's own: ``zarr.json`` of groups and arrays byte-identical to what
``open_group(mode="a")``, ``create_array`` and ``resize`` write, for every column kind
the layout uses; arrays grow by a power of two of chunks; nodes of the wrong kind are a
clear error.

Checked to fail: with ``_new_metadata`` passing ``dimension_names=None``, or the group's
attributes left out, the byte comparison fails on that key.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
import zarr.api.asynchronous as za

from bluestream.errors import StorageError
from bluestream.layout import STRING, Column
from bluestream.storage import array_meta
from bluestream.storage.local_store import SyncingLocalStore

pytestmark = pytest.mark.anyio

COLUMNS = [
    Column("time", np.dtype(np.float64), (), 0.0),
    Column("seq_num", np.dtype(np.int64), (), 0),
    Column("uid", STRING, (), ""),
    Column("data/img", np.dtype(">u2"), (4, 5), 0),
    Column("data/flag", np.dtype(bool), (), False),
    Column("data/z", np.dtype(np.complex128), (2,), 0j),
    Column("timestamps/img", np.dtype(np.float64), (), 0.0),
]
GROUP = "tenant/ab/abcd/desc-1"
ATTRS = {"descriptor_uid": "desc-1", "run_start": "abcd", "stream_name": "primary",
         "schema_version": 1}


def metadata_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("zarr.json"))}


async def test_same_bytes_as_zarr(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    store = SyncingLocalStore(ours)
    array_meta.ensure_group(store, GROUP, ATTRS)
    arrays = array_meta.open_or_create(store, GROUP, COLUMNS)

    ref = zarr.storage.LocalStore(theirs)
    group = await za.open_group(store=ref, path=GROUP, mode="a", zarr_format=3,
                                attributes=ATTRS)
    refs = [await group.create_array(
        c.name, shape=(0, *c.shape), chunks=(c.chunk_events, *c.shape), dtype=c.dtype,
        fill_value=c.fill_value,
        dimension_names=("event", *(f"dim_{i}" for i in range(len(c.shape)))))
        for c in COLUMNS]
    assert metadata_files(ours) == metadata_files(theirs)

    grown, elsewhere = array_meta.grow_all(store, arrays, 3 * COLUMNS[0].chunk_events + 1)
    assert elsewhere == []
    for ref_arr, arr in zip(refs, grown, strict=True):
        await ref_arr.resize(arr.shape)
        assert arr.shape[0] == 4 * arr.chunks[0]  # 4 chunks: a power of two
    assert metadata_files(ours) == metadata_files(theirs)

    # Reopened: the handles read the same shapes; growing within them writes nothing.
    again = array_meta.open_or_create(store, GROUP, COLUMNS)
    assert [a.shape for a in again] == [a.shape for a in grown]
    store.take()
    same, _ = array_meta.grow_all(store, again, again[0].shape[0])
    assert store.take() == (set(), set())
    # Data written through a handle reads back through zarr's own API.
    await same[0].setitem(slice(0, 3), np.array([1.0, 2.0, 3.0]))
    read = zarr.open_array(store=zarr.storage.LocalStore(ours), path=f"{GROUP}/time")
    assert read[:3].tolist() == [1.0, 2.0, 3.0]


def test_grown_elsewhere_is_reported(tmp_path: Path) -> None:
    store = SyncingLocalStore(tmp_path)
    array_meta.ensure_group(store, GROUP, ATTRS)
    stale = array_meta.open_or_create(store, GROUP, COLUMNS[:1])
    array_meta.grow_all(store, array_meta.open_or_create(store, GROUP, COLUMNS[:1]), 10)
    out, elsewhere = array_meta.grow_all(store, stale, 10)
    assert elsewhere == [f"{GROUP}/time/zarr.json"] and out[0].shape[0] >= 10


def test_grown_length() -> None:
    g = array_meta.grown_length
    assert [g(n, 10) for n in (1, 10, 11, 20, 21, 40, 41, 81)] == [10, 10, 20, 20, 40, 40,
                                                                    80, 160]


def test_wrong_node_kinds_are_errors(tmp_path: Path) -> None:
    store = SyncingLocalStore(tmp_path)
    array_meta.ensure_group(store, GROUP, ATTRS)
    array_meta.open_or_create(store, GROUP, COLUMNS[:1])
    with pytest.raises(StorageError, match="is an array, expected a group"):
        array_meta.ensure_group(store, f"{GROUP}/time", ATTRS)
    with pytest.raises(StorageError, match="is an array, expected a group"):
        array_meta.ensure_group(store, f"{GROUP}/time/below", ATTRS)
    with pytest.raises(StorageError, match="is a group, expected an array"):
        array_meta.open_or_create(store, "tenant",
                                  [Column("ab", np.dtype(np.float64), (), 0.0)])


def test_created_long_is_created_then_grown(tmp_path: Path) -> None:
    """Arrays created with a length (a new run's first batch) are written once, with the
    same ``zarr.json`` bytes as created empty and then grown to that length."""
    once, twice = SyncingLocalStore(tmp_path / "once"), SyncingLocalStore(tmp_path / "twice")
    rows = 2 * COLUMNS[0].chunk_events + 1
    assert array_meta.ensure_group(once, GROUP, ATTRS) is True
    assert array_meta.ensure_group(once, GROUP, ATTRS) is False
    made = array_meta.open_or_create(once, GROUP, COLUMNS, [rows] * len(COLUMNS),
                                     created=True)
    written, _ = once.take()
    metadata = {k for k in written if k.endswith("zarr.json")}
    # One write per node: the arrays, their group and the groups above and between.
    assert len(metadata) == len(written)
    array_meta.ensure_group(twice, GROUP, ATTRS)
    grown, _ = array_meta.grow_all(twice, array_meta.open_or_create(twice, GROUP, COLUMNS),
                                   rows)
    assert [a.shape for a in made] == [a.shape for a in grown]
    assert all(a.shape[0] == 4 * a.chunks[0] for a in made)
    assert metadata_files(tmp_path / "once") == metadata_files(tmp_path / "twice")
    # Nothing left behind by the writes (temporary files are renamed into place).
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".partial")]
    # Reopened (not created): existing arrays are read, not overwritten.
    again = array_meta.open_or_create(once, GROUP, COLUMNS, [1] * len(COLUMNS))
    assert [a.shape for a in again] == [a.shape for a in made]
    assert once.take() == (set(), set())
