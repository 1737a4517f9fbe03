"""Levels 2-4 of :mod:`bluestream.catalog.integrity` for one stream (one descriptor's
``event_stream`` record, its tail and its Zarr group): the arrays the layout gives the
descriptor exist with the record's rows, dtype and shape (2), every chunk that holds
events exists and decodes (3), and the values agree with the record and read back
through the catalog equal (4, the read-back in :mod:`bluestream.catalog.stream_samples`).
Split from the integrity module as the part that reads arrays: levels 3 and 4 read each
chunk once, in windows of whole chunks, and check all they need of it while in memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import anyio
import msgpack
import numpy as np
import zarr
import zarr.api.asynchronous as za
from numpy.typing import NDArray
from zarr.abc.store import Store
from zarr.core.array import AsyncArray
from zarr.core.buffer import default_buffer_prototype

from bluestream.catalog.context import CatalogContext
from bluestream.catalog.problems import Problem
from bluestream.catalog.stream_columns import Column, describe, expected_columns, wrong_type
from bluestream.catalog.stream_samples import SAMPLE_ROWS, SAMPLE_WINDOWS, mismatches, sample
from bluestream.errors import BluestreamError, StorageError
from bluestream.layout import SEQ_NUM, TIME, UID, reader_specs
from bluestream.storage.tail import Tail
from bluestream.storage.zarr_root import IO_ERRORS, brief

__all__ = ["StreamCheck"]

Doc = dict[str, Any]
Array = NDArray[Any]
#: Decoded bytes read per array per request at levels 3-4 (whole chunks, at least one).
_WINDOW_BYTES = 32 * 1024 * 1024
_STRING_ITEM_BYTES = 64
#: Arrays of one stream read at once (zarr reads each one's chunks concurrently too).
_ARRAYS_AT_ONCE = 4
_READ_ERRORS = (*IO_ERRORS, zarr.errors.BaseZarrError, ValueError, TypeError, RuntimeError)


class StreamCheck:
    """Levels 2-4 of one descriptor's stream: its record, its tail, its Zarr group."""

    def __init__(self, ctx: CatalogContext, store: Store, run: str, descriptor: Doc,
                 record: Doc, level: int, note: Callable[[str], None] | None = None) -> None:
        self.ctx, self.store, self.run_uid, self.level = ctx, store, run, level
        self.descriptor, self.record = descriptor, record
        self.note: Callable[[str], None] = note or _quiet
        self.desc_uid = str(descriptor["uid"])
        self.stream = str(descriptor.get("name", "primary"))
        self.path = str(record["zarr_path"])
        self.length = int(record["length"])
        self.problems: list[Problem] = []
        self.tail: Tail | None = None
        #: Rows that live in the arrays: below the tail's start, or all of them.
        self.needed = self.length
        #: Events stored (rows whose seq_num > 0), counted at level 3 and up.
        self.written = 0
        self.written_mask: Array | None = None
        self.samples: Array = np.zeros(0, dtype=np.int64)
        self.sampled: dict[str, dict[int, Any]] = {}

    def problem(self, level: int, message: str, *, array: str | None = None,
                chunk: str | None = None) -> None:
        self.problems.append(Problem(level, self.run_uid, message, self.stream, self.desc_uid,
                                     array, chunk))

    async def run(self) -> list[Problem]:
        try:
            columns = expected_columns(reader_specs(self.descriptor))
        except BluestreamError as exc:
            self.problem(2, f"the descriptor's data_keys cannot be read: {exc}")
            return self.problems
        if not self._load_tail(columns):
            return self.problems
        arrays = await self._check_group(columns)
        if self.level >= 3:
            await self._check_chunks(arrays)
            if self.level >= 4:
                self._check_tail_values()
                self._check_top()
                await self._check_samples(columns)
        elif self.tail is not None:
            self.written = int((self.tail.columns[SEQ_NUM] > 0).sum())
        return sorted(self.problems, key=lambda p: (p.level, p.array or "", p.chunk or "",
                                                    p.message))

    # -- level 2 ------------------------------------------------------------------------
    def _load_tail(self, columns: list[Column]) -> bool:
        blob = self.record.get("tail")
        if not blob:
            return True
        try:
            self.tail = Tail.decode(bytes(blob))
        except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
            self.problem(2, f"the tail kept in the metadata store cannot be decoded: {exc}")
            return False
        tail = self.tail
        self.needed = tail.start
        if self.record.get("tail_start") not in (None, tail.start):
            self.problem(2, f"the tail starts at row {tail.start}, its record says "
                         f"{self.record.get('tail_start')}")
        end = tail.start + len(tail)
        if end < self.length:
            self.problem(2, f"the tail holds rows up to {end}, the record says {self.length}")
        for col in columns:
            have = tail.columns.get(col.name)
            if have is None:
                self.problem(2, "missing from the tail kept in the metadata store",
                             array=col.name)
            elif wrong_type(have.dtype, tuple(have.shape[1:]), col):
                self.problem(2, f"the tail holds {have.dtype} {list(have.shape[1:])} per "
                             f"event, the descriptor gives {describe(col)}", array=col.name)
        return True

    async def _check_group(self, columns: list[Column]) -> dict[str, AsyncArray[Any]]:
        meta = await self._get_json(f"{self.path}/zarr.json")
        if meta is None:
            if self.needed > 0:
                self.problem(2, f"the Zarr group {self.path} is missing (the record puts "
                             f"{self.needed} rows there)")
            return {}
        attrs = meta.get("attributes", {}) if isinstance(meta, dict) else {}
        if attrs.get("descriptor_uid") not in (None, self.desc_uid):
            self.problem(2, f"the Zarr group {self.path} belongs to descriptor "
                         f"{attrs.get('descriptor_uid')}")
        arrays: dict[str, AsyncArray[Any]] = {}

        async def one(col: Column) -> None:
            arr = await self._open(col)
            if arr is not None:
                arrays[col.name] = arr

        async with anyio.create_task_group() as tg:
            for col in columns:
                tg.start_soon(one, col)
        return arrays

    async def _get_json(self, key: str) -> Any:
        try:
            buf = await self.store.get(key, prototype=default_buffer_prototype())
        except FileNotFoundError:
            return None
        except IO_ERRORS as exc:
            raise StorageError(f"reading {self.ctx.zarr_root.join(key)} failed: "
                               f"{brief(exc)}") from exc
        if buf is None:
            return None
        try:
            return json.loads(buf.to_bytes())
        except ValueError:
            return {}

    async def _open(self, col: Column) -> AsyncArray[Any] | None:
        try:
            arr = await za.open_array(store=self.store, path=f"{self.path}/{col.name}",
                                      mode="r", zarr_format=3)
        except FileNotFoundError:
            if self.needed > 0:
                self.problem(2, f"missing from the Zarr group (the record puts "
                             f"{self.needed} rows there)", array=col.name)
            return None
        except _READ_ERRORS as exc:
            self.problem(2, f"its metadata cannot be read: {brief(exc)}", array=col.name)
            return None
        dtype = arr.dtype if isinstance(arr.dtype, np.dtype) else np.dtype(arr.dtype)
        ok = True
        if wrong_type(dtype, tuple(arr.shape[1:]), col):
            self.problem(2, f"holds {dtype} {list(arr.shape[1:])} per event, the descriptor "
                         f"gives {describe(col)}", array=col.name)
            ok = False
        if int(arr.shape[0]) < self.needed:
            self.problem(2, f"has {arr.shape[0]} rows, the record puts {self.needed} there",
                         array=col.name)
            ok = False
        return arr if ok else None

    # -- level 3 (and the level-4 checks made while reading) ------------------------------
    async def _check_chunks(self, arrays: dict[str, AsyncArray[Any]]) -> None:
        if self.needed == 0 or SEQ_NUM not in arrays:
            self.written = self._tail_written()
            if self.needed > 0:  # no seq_num: which rows hold events is unknown
                self.written_mask = np.ones(self.needed, dtype=bool)
            return
        self.written_mask = await self._read_seq_num(arrays[SEQ_NUM])
        self.written = int(self.written_mask.sum()) + self._tail_written()
        self.samples = sample(np.flatnonzero(self.written_mask), SAMPLE_WINDOWS,
                               SAMPLE_ROWS)
        limit = anyio.Semaphore(_ARRAYS_AT_ONCE)

        async def one(name: str, arr: AsyncArray[Any]) -> None:
            async with limit:
                await self._read_array(name, arr)

        async with anyio.create_task_group() as tg:
            for name, arr in arrays.items():
                if name != SEQ_NUM:
                    tg.start_soon(one, name, arr)

    def _tail_written(self) -> int:
        if self.tail is None:
            return 0
        return int((self.tail.columns[SEQ_NUM] > 0).sum())

    async def _present(self, name: str) -> set[str]:
        prefix = f"{self.path}/{name}/c"
        try:
            return {k async for k in self.store.list_prefix(prefix + "/")}
        except FileNotFoundError:
            return set()
        except IO_ERRORS as exc:
            raise StorageError(f"listing {self.ctx.zarr_root.join(prefix)} failed: "
                               f"{brief(exc)}") from exc

    def _windows(self, arr: AsyncArray[Any]) -> list[tuple[int, int, int]]:
        """(first chunk, start row, stop row) windows of whole chunks over the rows the
        arrays hold."""
        chunk = max(1, int(arr.chunks[0]))
        row = int(np.prod(arr.chunks[1:], dtype=np.int64)) * _itemsize(arr)
        per = max(1, _WINDOW_BYTES // max(1, row * chunk))
        out = []
        for first in range(0, -(-self.needed // chunk), per):
            a = first * chunk
            out.append((first, a, min(self.needed, (first + per) * chunk)))
        return out

    def _chunk_key(self, name: str, arr: AsyncArray[Any], index: int) -> str:
        coords = (index, *([0] * (len(arr.shape) - 1)))
        return f"{self.path}/{name}/{arr.metadata.encode_chunk_key(coords)}"

    async def _read_seq_num(self, arr: AsyncArray[Any]) -> Array:
        """Which rows below ``needed`` hold an event; level 4 also checks their seq_num.
        A chunk that is missing or does not decode counts as written where the record
        says events are (its other arrays are then checked there too)."""
        present = await self._present(SEQ_NUM)
        mask = np.zeros(self.needed, dtype=bool)
        chunk = max(1, int(arr.chunks[0]))
        lo = max(0, int(self.record.get("seq_num_min") or 1) - 1)

        def needed(index: int) -> bool:  # rows the record says events may be in
            return (index + 1) * chunk > lo

        for first, a, b in self._windows(arr):
            values = await self._read_window(SEQ_NUM, arr, present, first, a, b, needed)
            for i, (start, stop) in enumerate(_chunk_rows(first, a, b, chunk)):
                got = values.get(first + i)
                if got is None:
                    mask[max(start, lo):stop] = True
                    continue
                seq = np.asarray(got)
                mask[start:stop] = seq > 0
                if self.level >= 4:
                    self._check_positions(arr, first + i, start, seq)
        return mask

    def _check_positions(self, arr: AsyncArray[Any], index: int, start: int,
                         seq: Array) -> None:
        rows = np.flatnonzero(seq > 0)
        bad = rows[seq[rows] != rows + start + 1]
        if bad.size:
            p = int(bad[0]) + start
            self.problem(4, f"{bad.size} row(s) hold a seq_num that is not their position "
                         f"+ 1 (row {p} holds {int(seq[bad[0]])})", array=SEQ_NUM,
                         chunk=self._chunk_key(SEQ_NUM, arr, index))

    async def _read_array(self, name: str, arr: AsyncArray[Any]) -> None:
        assert self.written_mask is not None
        present = await self._present(name)
        chunk = max(1, int(arr.chunks[0]))
        mask = self.written_mask

        def needed(index: int) -> bool:
            return bool(mask[index * chunk:(index + 1) * chunk].any())

        for first, a, b in self._windows(arr):
            values = await self._read_window(name, arr, present, first, a, b, needed)
            for i, (start, stop) in enumerate(_chunk_rows(first, a, b, chunk)):
                got = values.get(first + i)
                if got is not None:
                    self._check_values(name, arr, first + i, start, np.asarray(got),
                                       mask[start:stop])

    async def _read_window(self, name: str, arr: AsyncArray[Any], present: set[str],
                           first: int, a: int, b: int,
                           needed: Callable[[int], bool]) -> dict[int, Array]:
        """Decoded chunks of one window by chunk index; missing or undecodable ones that
        hold events are reported and left out. One request for the window; chunk by
        chunk only when it fails, to name the chunk."""
        chunk = max(1, int(arr.chunks[0]))
        spans = _chunk_rows(first, a, b, chunk)
        ok: dict[int, tuple[int, int]] = {}
        for i, (start, stop) in enumerate(spans):
            index = first + i
            key = self._chunk_key(name, arr, index)
            if key in present:
                ok[index] = (start, stop)
            elif needed(index):
                self.problem(3, f"missing (rows {start}-{stop - 1} hold events)",
                             array=name, chunk=key)
        self.note(f"run {self.run_uid} stream {self.stream!r} {name} rows {b}/{self.needed}")
        if not ok:
            return {}
        try:
            whole = np.asarray(await arr.getitem(slice(a, b)))
            return {index: whole[start - a:stop - a] for index, (start, stop) in ok.items()}
        except _READ_ERRORS:
            pass
        out: dict[int, Array] = {}
        for index, (start, stop) in ok.items():
            try:
                out[index] = np.asarray(await arr.getitem(slice(start, stop)))
            except _READ_ERRORS as exc:
                self.problem(3, f"cannot be decoded: {brief(exc, 200)}", array=name,
                             chunk=self._chunk_key(name, arr, index))
        return out

    def _check_values(self, name: str, arr: AsyncArray[Any], index: int, start: int,
                      values: Array, written: Array) -> None:
        for p in self.samples[(self.samples >= start)
                              & (self.samples < start + len(values))].tolist():
            self.sampled.setdefault(name, {})[p] = values[p - start]
        if self.level < 4 or name not in (TIME, UID) or not written.any():
            return
        rows = values[written[:len(values)]]
        if name == UID:
            bad = int((rows == "").sum())
            what = "an empty uid"
        else:
            lo, hi = float(self.record["time_min"]), float(self.record["time_max"])
            bad = int((~((rows >= lo) & (rows <= hi))).sum())
            what = f"a time outside the record's range [{lo!r}, {hi!r}]"
        if bad:
            self.problem(4, f"{bad} written row(s) hold {what}", array=name,
                         chunk=self._chunk_key(name, arr, index))

    # -- level 4 -------------------------------------------------------------------------
    def _check_tail_values(self) -> None:
        tail = self.tail
        if tail is None:
            return
        seq = tail.columns[SEQ_NUM]
        rows = np.flatnonzero(seq > 0)
        bad = rows[seq[rows] != rows + tail.start + 1]
        if bad.size:
            self.problem(4, f"{bad.size} tail row(s) hold a seq_num that is not their "
                         "position + 1", array=SEQ_NUM)
        uids = tail.columns.get(UID)
        if uids is not None and rows.size and bool((uids[rows] == "").any()):
            self.problem(4, "a written tail row holds an empty uid", array=UID)

    def _check_top(self) -> None:
        """The record's length is the highest seq_num written: the rows must reach it."""
        tops = [self.tail.top] if self.tail is not None else []
        if self.written_mask is not None and self.written_mask.any():
            tops.append(int(np.flatnonzero(self.written_mask)[-1]))
        top = max(tops, default=-1)
        if top + 1 != self.length:
            self.problem(4, f"the record says the highest seq_num is {self.length}, the "
                         f"stored rows reach {top + 1}")

    async def _check_samples(self, columns: list[Column]) -> None:
        """Sample rows read back through the catalog's reader equal what was read here
        (rows from the arrays, and from the tail)."""
        direct = {name: dict(vals) for name, vals in self.sampled.items()}
        positions = set(self.samples.tolist())
        # seq_num was checked row by row above: a written row holds its position + 1.
        direct[SEQ_NUM] = {p: np.int64(p + 1) for p in positions}
        if self.tail is not None:
            rows = np.flatnonzero(self.tail.columns[SEQ_NUM] > 0)
            for i in sample(rows, 1, SAMPLE_ROWS).tolist():
                positions.add(self.tail.start + i)
                for name, col in self.tail.columns.items():
                    direct.setdefault(name, {})[self.tail.start + i] = col[i]
        if not positions:
            return
        if any(p.level < 4 for p in self.problems):
            return  # the catalog would read the chunks reported above
        keys = list(self.descriptor.get("data_keys", {}))
        try:
            async for message, array in mismatches(self.ctx, self.record, keys,
                                                   [c.name for c in columns], positions,
                                                   direct):
                self.problem(4, message, array=array)
        except (BluestreamError, *_READ_ERRORS) as exc:
            self.problem(4, f"reading sample rows through the catalog failed: {brief(exc)}")


# -- small pure helpers ---------------------------------------------------------------------
def _chunk_rows(first: int, a: int, b: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, b)) for s in range(a, b, chunk)]


def _itemsize(arr: AsyncArray[Any]) -> int:
    dtype = arr.dtype
    if getattr(dtype, "kind", "") in "TO":
        return _STRING_ITEM_BYTES
    return int(np.dtype(dtype).itemsize)


def _quiet(what: str) -> None:
    return None
