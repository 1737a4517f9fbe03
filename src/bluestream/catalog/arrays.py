"""Reading one descriptor's event arrays back from Zarr (the layout of
:mod:`bluestream.layout`).

Row ``i`` holds the event with ``seq_num == i + 1``; rows never written hold
``seq_num == 0`` and are skipped. Lengths are never cached: every read takes the length
from the ``event_stream`` record it is given, which the writer updates only after the
rows it covers are durable, so a reader never sees a half-written page through it.
All arrays of a read are fetched concurrently (zarr's async API reads their chunks
concurrently too); driver errors become :class:`~bluestream.errors.StorageError`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zarr
import zarr.api.asynchronous as za
from numpy.typing import NDArray
from obstore.exceptions import BaseError as ObjectStoreError
from zarr.core.array import AsyncArray

from bluestream.catalog._tasks import task_group
from bluestream.errors import StorageError, StorageUnavailable
from bluestream.layout import SEQ_NUM, STRING, TIME, UID, Page, column_names
from bluestream.storage.tail import Tail
from bluestream.storage.zarr_root import ZarrRoot, brief

__all__ = ["ArrayReader", "Rows", "TailedArray", "row_bytes"]

Array = NDArray[Any]
_STRING_ITEM_BYTES = 64  # a guess for sizing reads of string columns


@dataclass
class Rows:
    """Written rows of one descriptor (a window of them), in seq_num order."""

    descriptor: str
    positions: Array  # (n,) int64: row index in the arrays (seq_num - 1)
    seq_num: Array
    time: Array
    uid: Array
    data: dict[str, Array] = field(default_factory=dict)
    timestamps: dict[str, Array] = field(default_factory=dict)
    filled: dict[str, Array] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.seq_num.shape[0])

    def take(self, sel: slice | Array) -> Rows:
        return Rows(self.descriptor, self.positions[sel], self.seq_num[sel], self.time[sel],
                    self.uid[sel], {k: v[sel] for k, v in self.data.items()},
                    {k: v[sel] for k, v in self.timestamps.items()},
                    {k: v[sel] for k, v in self.filled.items()})

    def to_page(self) -> Page:
        return Page(descriptor=self.descriptor, uid=self.uid, seq_num=self.seq_num,
                    time=self.time, data=self.data, timestamps=self.timestamps,
                    filled=self.filled)


def row_bytes(arrays: Sequence[AsyncArray[Any]]) -> int:
    """Bytes one event takes across ``arrays`` (strings estimated)."""
    total = 0
    for arr in arrays:
        dtype = arr.dtype
        item = _STRING_ITEM_BYTES if getattr(dtype, "kind", "") in "TO" else \
            int(np.dtype(dtype).itemsize)
        total += item * int(np.prod(arr.shape[1:], dtype=np.int64))
    return max(total, 1)


class ArrayReader:
    """Read-only access to the event arrays under one Zarr root."""

    def __init__(self, root: ZarrRoot | Path | str) -> None:
        self.root = ZarrRoot.parse(root)
        self._store = self.root.open_store(read_only=True)

    def errors(self, zarr_path: str) -> AbstractContextManager[None]:
        """Driver errors of reads of the group ``zarr_path`` as the catalog's
        (:class:`~bluestream.errors.StorageError`, ``StorageUnavailable``)."""
        return self._errors(zarr_path)

    @staticmethod
    def tail_of(record: Mapping[str, Any]) -> Tail | None:
        """The rows a stream keeps in its ``event_stream`` record (None: none)."""
        return _tail_of(record)

    def _root_missing(self) -> bool:
        return self.root.local is not None and not self.root.local.is_dir()

    @contextmanager
    def _errors(self, zarr_path: str) -> Iterator[None]:
        try:
            yield
        except FileNotFoundError as exc:
            if self._root_missing():
                raise StorageUnavailable(f"Zarr root {self.root} does not exist (or is not "
                                         f"mounted): {exc}") from exc
            raise StorageError(f"the arrays of {self.root.join(zarr_path)} are missing: "
                               f"{exc}") from exc
        except ObjectStoreError as exc:  # not a missing key: the store did not answer
            raise StorageUnavailable(f"reading Zarr group {self.root.join(zarr_path)} "
                                     f"failed: {brief(exc)}") from exc
        except (OSError, zarr.errors.BaseZarrError, ValueError) as exc:
            raise StorageError(f"reading Zarr group {self.root.join(zarr_path)} failed: "
                               f"{exc}") from exc

    async def open_arrays(self, record: Mapping[str, Any], names: Sequence[str],
                          required: Sequence[str] = (SEQ_NUM,)) -> dict[str, Any]:
        """The arrays ``names`` of a descriptor that exist (those in ``required`` must):
        zarr's, or :class:`TailedArray` when the stream keeps its newest rows in the
        metadata store (:mod:`bluestream.storage.tail`)."""
        path = str(record["zarr_path"])
        tail = _tail_of(record)
        if tail is None:
            return await self._open_zarr(path, names, required)
        if self._root_missing():  # else rows below the tail would read as never written
            raise StorageUnavailable(f"Zarr root {self.root} does not exist (or is not "
                                     "mounted)")
        base: dict[str, AsyncArray[Any]] = {}
        # Rows not in the tail are in the arrays, when any was ever written there (a
        # short run has none; one stat, or one HEAD on an object store, tells).
        if await self._group_exists(path):
            base = await self._open_zarr(path, names, ())
        written = tail.columns[SEQ_NUM] > 0
        out: dict[str, Any] = {}
        for name in dict.fromkeys(names):
            col = tail.columns.get(name)
            if col is not None:
                out[name] = TailedArray(base.get(name), col, tail.start, written)
            elif name in base:
                out[name] = base[name]
            elif name in required:
                raise StorageError(f"the stream of {path} has no column {name!r}")
        return out

    async def _group_exists(self, path: str) -> bool:
        if self.root.local is not None:
            return (self.root.local / path / "zarr.json").is_file()
        with self._errors(path):
            return await self._store.exists(f"{path}/zarr.json")

    async def _open_zarr(self, zarr_path: str, names: Sequence[str],
                         required: Sequence[str]) -> dict[str, AsyncArray[Any]]:
        out: dict[str, AsyncArray[Any]] = {}

        async def one(name: str) -> None:
            try:
                arr = await za.open_array(store=self._store, path=f"{zarr_path}/{name}",
                                          mode="r", zarr_format=3)
            except FileNotFoundError:
                if name in required:
                    raise
                return
            out[name] = arr

        with self._errors(zarr_path):
            async with task_group() as tg:
                for name in dict.fromkeys(names):
                    tg.start_soon(one, name)
        return out

    async def read_rows(self, record: dict[str, Any], keys: Sequence[str], *,
                        start: int = 0, stop: int | None = None,
                        arrays: dict[str, AsyncArray[Any]] | None = None,
                        timestamps: bool = True) -> Rows:
        """Rows ``[start, stop)`` (positions) of one descriptor that were written."""
        path = str(record["zarr_path"])
        if arrays is None:
            arrays = await self.open_arrays(record, column_names(keys, timestamps))
        n = min(int(record["length"]), *(int(a.shape[0]) for a in arrays.values()))
        stop = n if stop is None else min(stop, n)
        start = min(max(start, 0), stop)
        with self._errors(path):
            seq = np.asarray(await arrays[SEQ_NUM].getitem(slice(start, stop)))
            keep = seq > 0
            sel: slice | Array = slice(None) if keep.all() else np.flatnonzero(keep)
            values: dict[str, Array] = {}

            async def one(name: str, arr: AsyncArray[Any]) -> None:
                v = np.asarray(await arr.getitem(slice(start, stop)))
                values[name] = v[sel]

            async with task_group() as tg:
                for name, arr in arrays.items():
                    if name != SEQ_NUM and _wanted(name, keys, timestamps):
                        tg.start_soon(one, name, arr)
        positions = np.arange(start, stop, dtype=np.int64)[sel]
        rows = Rows(str(record["descriptor_uid"]), positions, seq[sel].astype(np.int64),
                    values.get(TIME, np.full(len(positions), np.nan)),
                    values.get(UID, np.full(len(positions), "", dtype=STRING)))
        for name, v in values.items():
            sub, _, key = name.partition("/")
            if sub == "data":
                rows.data[key] = v
            elif sub == "timestamps":
                rows.timestamps[key] = v
            elif sub == "filled":
                rows.filled[key] = v
        return rows

    async def written_positions(self, record: dict[str, Any], start: int = 0) -> Array:
        """Positions ``>= start`` that hold an event (a cheap read: seq_num only)."""
        path = str(record["zarr_path"])
        arrays = await self.open_arrays(record, [SEQ_NUM])
        arr = arrays[SEQ_NUM]
        n = min(int(record["length"]), int(arr.shape[0]))
        if start >= n:
            return np.zeros(0, dtype=np.int64)
        with self._errors(path):
            seq = np.asarray(await arr.getitem(slice(start, n)))
        return np.flatnonzero(seq > 0).astype(np.int64) + start

    def sync_array(self, arr: Any) -> Any:
        """A synchronous handle (for dask) on an array opened here."""
        if isinstance(arr, TailedArray):
            return arr.sync()
        return zarr.Array(arr)


def _tail_of(record: Mapping[str, Any]) -> Tail | None:
    blob = record.get("tail")
    if not blob:
        return None
    try:
        return Tail.decode(bytes(blob))
    except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
        raise StorageError(f"the stored tail of {record.get('zarr_path')} cannot be read: "
                           f"{exc}") from exc


class TailedArray:
    """One column of a stream whose rows from ``start`` on are kept in its tail: rows
    below come from the Zarr array (when one was written), written tail rows over them.
    Offers what the readers use of an ``AsyncArray``: ``shape``, ``dtype``, ``chunks``
    and ``getitem`` of a slice along the event axis."""

    def __init__(self, base: AsyncArray[Any] | None, tail: Array, start: int,
                 written: Array) -> None:
        self.base, self.tail, self.start, self.written = base, tail, start, written
        self.dtype = tail.dtype
        # The arrays may hold rows past the tail (a stream whose rows went to Zarr before
        # it kept a tail, then got a late row below them): the longer of the two.
        end = start + int(tail.shape[0])
        self.shape = (max(end, int(base.shape[0]) if base is not None else 0),
                      *tail.shape[1:])
        self.chunks = tuple(base.chunks) if base is not None else \
            (max(1, int(tail.shape[0])), *tail.shape[1:])

    def _empty(self, n: int) -> Array:
        if self.dtype.kind == "T":
            return np.full((n, *self.shape[1:]), "", dtype=self.dtype)
        return np.zeros((n, *self.shape[1:]), dtype=self.dtype)

    def _overlay(self, out: Array, a: int, b: int) -> Array:
        lo, hi = max(a, self.start), min(b, self.start + int(self.tail.shape[0]))
        if hi > lo:
            w = self.written[lo - self.start:hi - self.start]
            out[lo - a:hi - a][w] = self.tail[lo - self.start:hi - self.start][w]
        return out

    def _bounds(self, sel: slice) -> tuple[int, int, int]:
        a, b, step = sel.indices(self.shape[0])
        if step != 1:
            raise ValueError("only contiguous slices of a tailed array are read")
        # Zarr rows at positions the tail holds nothing for are read too: a block size
        # changed between writers leaves rows there.
        top = min(b, int(self.base.shape[0])) if self.base is not None else a
        return a, max(a, b), max(a, top)

    async def getitem(self, sel: slice) -> Array:
        a, b, top = self._bounds(sel)
        out = self._empty(b - a)
        if self.base is not None and top > a:
            out[:top - a] = np.asarray(await self.base.getitem(slice(a, top)))
        return self._overlay(out, a, b)

    def sync(self) -> _SyncTailed:
        return _SyncTailed(self)


class _SyncTailed:
    """A synchronous view of a :class:`TailedArray` for dask (numpy-style indexing)."""

    def __init__(self, arr: TailedArray) -> None:
        self._arr = arr
        self.dtype, self.shape, self.chunks = arr.dtype, arr.shape, arr.chunks
        self.ndim = len(arr.shape)
        self._base = zarr.Array(arr.base) if arr.base is not None else None

    def __getitem__(self, key: Any) -> Array:
        key = key if isinstance(key, tuple) else (key,)
        first = key[0] if key else slice(None)
        if isinstance(first, slice) and first.step in (None, 1):
            rows = self._rows(first)
            return rows[(slice(None), *key[1:])]
        index = np.arange(self.shape[0])[first]
        lo = int(np.min(index)) if np.size(index) else 0
        hi = int(np.max(index)) + 1 if np.size(index) else 0
        rows = self._rows(slice(lo, hi))
        return np.asarray(rows[(np.asarray(index) - lo, *key[1:])])

    def _rows(self, sel: slice) -> Array:
        arr = self._arr
        a, b, top = arr._bounds(sel)
        out = arr._empty(b - a)
        if self._base is not None and top > a:
            out[:top - a] = np.asarray(self._base[a:top])
        return arr._overlay(out, a, b)


def _wanted(name: str, keys: Sequence[str], timestamps: bool) -> bool:
    sub, _, key = name.partition("/")
    if not key:
        return True
    if sub == "timestamps" and not timestamps:
        return False
    return key in keys
