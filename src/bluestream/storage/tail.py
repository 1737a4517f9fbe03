"""The tail of a stream: its newest rows, kept in the metadata store instead of Zarr.

Why: every batch that appends to a stream rewrote the end chunk of each of its arrays
(23 files for 10 scalar fields) and synced them; on a disk where replacing a small file
costs ~1.5 ms that was the whole of a live reader's wait, and a run of one event cost
~15 files. Rows are now stored in Zarr block by block: the rows of the block that holds
the highest position seen (``start = top // block * block`` onwards) live in one record
of the metadata store (``event_tail``), rewritten as a whole by each batch; the rows
below ``start`` are in the arrays. A short run (fewer rows than a block) never creates
a Zarr group at all.

Deterministic: where a row is stored depends only on the rows stored and the highest
position, never on how batches were cut, so replays store identical bytes (DESIGN I1).
The tail is dense: row ``i`` holds position ``start + i``; rows never written hold
``seq_num`` 0, as in the arrays. Later rows with the same position win (DESIGN I2).

Pure: no I/O. The pipeline reads the tails of a batch's descriptors, calls
:func:`merge`, writes the rows it returns for Zarr, and stores the new tail with the
stream's record, all under the descriptors' locks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from bluestream.errors import Reason, ValidationError
from bluestream.layout import SEQ_NUM, STRING, TIME, UID, Column, FieldSpec, Page, fill_for

__all__ = ["DEFAULT_BLOCK", "Tail", "block_for", "last_wins_order", "merge", "page_values"]

#: Rows per block (``storage.tail_rows``): a stream's newest rows up to this many stay in
#: the metadata store. 0 turns the tail off.
DEFAULT_BLOCK = 256
#: A descriptor whose block of rows would exceed this keeps no tail (images, wide rows):
#: each batch rewrites its tail record whole.
MAX_TAIL_BYTES = 512 * 1024
_STRING_ITEM_BYTES = 64  # a guess, as for chunking
_FORMAT = 1


@dataclass(frozen=True)
class Tail:
    """Dense rows ``start .. start + n - 1`` of every column of one descriptor."""

    start: int
    columns: dict[str, np.ndarray]

    def __len__(self) -> int:
        return int(self.columns[SEQ_NUM].shape[0])

    @property
    def top(self) -> int:
        """The highest position that holds a row (-1 when none does)."""
        written = np.flatnonzero(self.columns[SEQ_NUM] > 0)
        return self.start + int(written[-1]) if written.size else -1

    def page(self, descriptor: str) -> Page | None:
        """The rows written, as a page (``None`` when there are none)."""
        written = np.flatnonzero(self.columns[SEQ_NUM] > 0)
        if not written.size:
            return None
        return _page_of(descriptor, {n: a[written] for n, a in self.columns.items()})

    def encode(self) -> bytes:
        cols: dict[str, list[Any]] = {}
        for name in sorted(self.columns):
            arr = self.columns[name]
            if arr.dtype.kind == "T":
                cols[name] = ["str", list(arr.shape), arr.tolist()]
            else:
                cols[name] = [arr.dtype.str, list(arr.shape),
                              np.ascontiguousarray(arr).tobytes()]
        return bytes(msgpack.packb({"format": _FORMAT, "start": self.start, "columns": cols},
                                   use_bin_type=True))

    @classmethod
    def decode(cls, blob: bytes) -> Tail:
        raw = msgpack.unpackb(blob, raw=False)
        if raw.get("format") != _FORMAT:
            raise ValueError(f"unknown tail format {raw.get('format')!r}")
        columns: dict[str, np.ndarray] = {}
        for name, (dtype, shape, data) in raw["columns"].items():
            if dtype == "str":
                columns[name] = np.array(data, dtype=STRING).reshape(shape)
            else:
                columns[name] = np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape).copy()
        return cls(int(raw["start"]), columns)


def block_for(specs: Mapping[str, FieldSpec], block: int) -> int:
    """The block size for a descriptor: 0 (no tail) when a block of its rows could be
    large. Decided from the descriptor alone (never from a page), so every batch and every
    replay of a stream makes the same choice. Strings of unknown length (string keys, JSON
    text of variable values) keep no tail: one of them may be megabytes."""
    if block <= 0:
        return 0
    row = 8 + 8 + _STRING_ITEM_BYTES  # time, seq_num, uid
    for spec in specs.values():
        if spec.external:  # a datum id and its filled flag
            row += _STRING_ITEM_BYTES + 1 + 8
            continue
        if spec.variable or spec.kind == "string":
            return 0
        item = spec.dtype.itemsize if spec.dtype is not None else 16  # widest number
        row += item * math.prod(spec.shape) + 8
    return block if row * block <= MAX_TAIL_BYTES else 0


def _fill(dtype: np.dtype[Any]) -> Any:
    """The fill value the layout gives a data column of ``dtype`` (layout.stored_columns)."""
    return "" if dtype.kind == "T" else fill_for(dtype)


def last_wins_order(seq_num: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row order that keeps the last occurrence of each seq_num, sorted by position."""
    if len(seq_num) == 1 or bool((seq_num[1:] > seq_num[:-1]).all()):  # the usual case
        return np.arange(len(seq_num), dtype=np.intp), (seq_num - 1).astype(np.int64)
    rev = seq_num[::-1]
    _, idx = np.unique(rev, return_index=True)  # first occurrence in reversed = last
    order = (len(seq_num) - 1 - idx).astype(np.intp)  # sorted by seq_num already
    return order, (seq_num[order] - 1).astype(np.int64)


def page_values(page: Page, order: np.ndarray | slice) -> dict[str, np.ndarray]:
    """Every column of ``page`` by its array name, rows taken in ``order``."""
    vals: dict[str, np.ndarray] = {
        TIME: page.time[order],
        SEQ_NUM: page.seq_num[order],
        UID: page.uid[order],
    }
    for key, arr in page.data.items():
        vals[f"data/{key}"] = arr[order]
        vals[f"timestamps/{key}"] = page.timestamps[key][order]
    for key, arr in page.filled.items():
        vals[f"filled/{key}"] = arr[order]
    return vals


def _page_of(descriptor: str, values: Mapping[str, np.ndarray]) -> Page:
    data, stamps, filled = {}, {}, {}
    for name, arr in values.items():
        sub, _, key = name.partition("/")
        if sub == "data":
            data[key] = arr
        elif sub == "timestamps":
            stamps[key] = arr
        elif sub == "filled":
            filled[key] = arr
    return Page(descriptor=descriptor, uid=values[UID], seq_num=values[SEQ_NUM],
                time=values[TIME], data=data, timestamps=stamps, filled=filled)


def _check(name: str, have: np.ndarray, want: np.ndarray) -> None:
    """The checks the arrays make (zarr_store._check_dtypes), for rows kept here."""
    strings = (have.dtype.kind == "T", want.dtype.kind == "T")
    if strings[0] != strings[1] or (
            not strings[0] and have.dtype != want.dtype
            and not np.can_cast(want.dtype, have.dtype, "safe")):
        raise ValidationError(
            f"{name}: values of dtype {want.dtype} cannot be stored in the existing "
            f"array of dtype {have.dtype}", reason=Reason.DTYPE_MISMATCH)
    if have.shape[1:] != want.shape[1:]:
        raise ValidationError(
            f"{name}: per-event shape {want.shape[1:]} differs from the stored "
            f"{have.shape[1:]}", reason=Reason.SHAPE_MISMATCH)


def merge(old: Tail | None, page: Page, columns: Sequence[Column],
          block: int) -> tuple[Page | None, Tail]:
    """Add ``page`` (later rows win) to the stream whose tail is ``old``.

    Returns the rows that now belong in Zarr (those below the new tail's start, from the
    old tail and from ``page``; ``None`` when there are none) and the new tail."""
    if block <= 0 or len(page) == 0:
        raise ValueError("merge needs a block size and rows")
    order, positions = last_wins_order(page.seq_num)
    new = page_values(page, order)
    top = int(positions[-1])
    if old is None and int(positions[0]) == top // block * block \
            and int(positions[-1]) - int(positions[0]) + 1 == len(positions):
        # A stream's first rows, contiguous from the start of their block (a short run):
        # the page is the tail as it is.
        return None, Tail(int(positions[0]), {
            col.name: np.ascontiguousarray(new[col.name], dtype=np.dtype(col.dtype))
            for col in columns})
    if old is not None:
        top = max(top, old.top)
        for name, arr in old.columns.items():
            if name in new:
                _check(name, arr, new[name])
    start = top // block * block
    # Rows of the old tail below the new start go to Zarr with the page's rows there.
    to_zarr: list[dict[str, np.ndarray]] = []
    if old is not None and old.start < start:
        cut = min(start - old.start, len(old))
        written = np.flatnonzero(old.columns[SEQ_NUM][:cut] > 0)
        if written.size:
            to_zarr.append({n: a[written] for n, a in old.columns.items()})
    low = positions < start
    if low.any():
        to_zarr.append({n: a[low] for n, a in new.items()})
    # The new tail: dense from start to top; old rows first, the page's over them.
    n = top - start + 1
    tail: dict[str, np.ndarray] = {}
    for col in columns:
        base = old.columns.get(col.name) if old is not None else None
        dtype = base.dtype if base is not None else np.dtype(col.dtype)
        # Rows never written hold the fill of the tail's own dtype, whatever the page's
        # (a data key whose dtype a page decides: an int page over a float tail).
        fill = col.fill_value if base is None or np.dtype(col.dtype) == dtype \
            else _fill(dtype)
        out = np.full((n, *col.shape), fill, dtype=dtype)
        if base is not None and old is not None and old.start + len(old) > start:
            lo = max(old.start, start)
            out[lo - start:old.start + len(old) - start] = base[lo - old.start:]
        high = ~low
        if high.any():
            out[positions[high] - start] = new[col.name][high]
        tail[col.name] = out
    zarr_page = None
    if to_zarr:
        zarr_page = _page_of(page.descriptor, {
            name: np.concatenate([part[name] for part in to_zarr]) for name in to_zarr[0]})
    return zarr_page, Tail(start, tail)
