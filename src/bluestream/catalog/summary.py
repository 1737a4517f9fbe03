"""Statistical summaries of one field of a stream, read from the summary arrays.

Why: ``read()`` of a 10-million-event column reads it whole (with its seq_num, time and
uid columns); its window summaries (:mod:`bluestream.storage.summaries`, layout in
:mod:`bluestream.layout`) are a few hundredths of that. What the summary arrays do not
hold is computed from the rows, so the answer is always the rows' own:

* rows in the stream's tail (its newest rows, kept in the metadata store:
  :mod:`bluestream.storage.tail`): every window that reaches the tail's first row;
* groups written before summaries existed, or windows a writer never summarised (their
  summary row is the NaN fill): those windows, read from the data column.

Only the windows below the tail are trusted from the arrays; each is at most one read
of :data:`_ROWS_PER_READ` rows when computed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from bluestream.catalog.arrays import ArrayReader
from bluestream.layout import (
    EVENT_SUMMARY,
    EVENT_SUMMARY_FIELDS,
    SEQ_NUM,
    SUMMARY,
    SUMMARY_FIELDS,
    SUMMARY_WINDOW,
    TIME,
    FieldSpec,
    data_path,
    reader_specs,
    summary_kind,
    summary_length,
)
from bluestream.storage.summaries import event_stats, merge_windows, rows_stats

if TYPE_CHECKING:
    import xarray

__all__ = ["field_summary"]

Array = NDArray[Any]
Doc = dict[str, Any]
#: Rows computed from per read when a summary is not stored (bounds the memory).
_ROWS_PER_READ = 1 << 20
#: Bytes of array values read at a time when per-event summaries are computed.
_EVENT_BYTES_PER_READ = 64 << 20


@dataclass
class _Part:
    """One descriptor's summaries: of windows (positions ``first .. stop - 1`` each) or
    of events (at positions ``first``, with their times and element counts)."""

    descriptor: str
    first: Array
    stats: Array
    stop: Array | None = None
    time: Array | None = None
    elements: int = 1


def _runs(indices: Array) -> Iterator[tuple[int, int]]:
    """Sorted unique ``indices`` as ``[start, stop)`` runs of consecutive values."""
    if indices.size == 0:
        return
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    for s, e in zip(np.r_[0, breaks].tolist(), np.r_[breaks, indices.size].tolist(),
                    strict=True):
        yield int(indices[s]), int(indices[e - 1]) + 1


def _kind(key: str, spec: FieldSpec, arrays: Mapping[str, Any]) -> str:
    """"window" or "event"; TypeError for a field that has no summary."""
    dtype = arrays[data_path(key)].dtype if data_path(key) in arrays else None
    kind = summary_kind(spec, None if dtype is None else np.dtype(dtype))
    if kind is None:
        what = "external (a reference to data stored elsewhere)" if spec.external else \
            "stored as JSON text" if spec.variable else \
            f"of {spec.kind} type" if spec.kind == "string" else \
            "without numbers in it" if spec.shape and not math.prod(spec.shape) else \
            f"of dtype {dtype or spec.dtype}"
        raise TypeError(f"data key {key!r} is {what}: statistical summaries exist for "
                        "real numbers only (number, integer, boolean, numeric arrays)")
    return kind


async def _getitem(reader: ArrayReader, path: str, arr: Any, start: int, stop: int) -> Array:
    with reader.errors(path):
        return np.asarray(await arr.getitem(slice(start, stop)))


async def _stored(reader: ArrayReader, path: str, arr: Any | None, key: str, stop: int
                  ) -> Array | None:
    """Rows ``[0, stop)`` of ``key``'s summaries in the array ``arr`` (``summary`` or
    ``event_summary``), None when it holds none for ``key``."""
    if arr is None:
        return None
    keys = list((arr.metadata.attributes or {}).get("keys", ()))
    stop = min(stop, int(arr.shape[0]))
    if key not in keys or stop <= 0:
        return None
    with reader.errors(path):
        return np.asarray(await arr.getitem((slice(0, stop), keys.index(key))))


async def _windows(reader: ArrayReader, record: Doc, key: str, arrays: Mapping[str, Any]
                   ) -> Array:
    """``(windows, 5)`` summaries of positions ``0 .. length - 1``."""
    path = str(record["zarr_path"])
    length = int(record["length"])
    stats = np.full((summary_length(length), len(SUMMARY_FIELDS)), np.nan)
    tail = reader.tail_of(record)
    trusted = min(length, tail.start if tail is not None else length) // SUMMARY_WINDOW
    stored = await _stored(reader, path, arrays.get(SUMMARY), key, trusted)
    if stored is not None:
        stats[:len(stored)] = stored
    per_read = _ROWS_PER_READ // SUMMARY_WINDOW
    for w0, w1 in _runs(np.flatnonzero(np.isnan(stats[:, 0]))):
        for b0 in range(w0, w1, per_read):
            b1 = min(w1, b0 + per_read)
            a, b = b0 * SUMMARY_WINDOW, min(b1 * SUMMARY_WINDOW, length)
            seq = await _getitem(reader, path, arrays[SEQ_NUM], a, b)
            values = await _getitem(reader, path, arrays[data_path(key)], a, b)
            n = min(len(seq), len(values))
            stats[b0:b1] = rows_stats(a, values[:n], seq[:n] > 0)[:b1 - b0]
    return stats


async def _events(reader: ArrayReader, record: Doc, key: str, arrays: Mapping[str, Any]
                  ) -> tuple[Array, Array, Array]:
    """Positions, times and ``(n, 4)`` summaries of the events written."""
    path = str(record["zarr_path"])
    n = min(int(record["length"]), int(arrays[SEQ_NUM].shape[0]))
    seq = await _getitem(reader, path, arrays[SEQ_NUM], 0, n)
    time = await _getitem(reader, path, arrays[TIME], 0, n)
    stats = np.full((len(seq), len(EVENT_SUMMARY_FIELDS)), np.nan)
    tail = reader.tail_of(record)
    upto = min(len(seq), tail.start if tail is not None else len(seq))
    stored = await _stored(reader, path, arrays.get(EVENT_SUMMARY), key, upto)
    if stored is not None:
        stats[:len(stored)] = stored
    positions = np.flatnonzero(seq > 0)
    # A summary row of NaNs was never written (or the value holds a NaN: computed again).
    missing = positions[np.isnan(stats[positions]).all(axis=1)]
    data = arrays[data_path(key)]
    row_bytes = max(1, np.dtype(data.dtype).itemsize * math.prod(data.shape[1:]))
    per_read = max(1, _EVENT_BYTES_PER_READ // row_bytes)
    for a, b in _runs(missing):
        for lo in range(a, b, per_read):
            hi = min(b, lo + per_read)
            values = await _getitem(reader, path, data, lo, hi)
            stats[lo:lo + len(values)] = event_stats(values)
    return positions, time[positions], stats[positions]


async def _part(reader: ArrayReader, desc: Doc, record: Doc | None, key: str
                ) -> tuple[str, _Part]:
    spec = reader_specs(desc)[key]
    uid = str(desc["uid"])
    if record is None:  # no events yet
        kind = _kind(key, spec, {}) if spec.dtype is not None else \
            "window" if spec.shape == () else "event"
        none = np.zeros(0, np.int64)
        if kind == "window":
            return kind, _Part(uid, none, np.zeros((0, len(SUMMARY_FIELDS))), stop=none)
        return kind, _Part(uid, none, np.zeros((0, len(EVENT_SUMMARY_FIELDS))),
                           time=np.zeros(0))
    names = [SEQ_NUM, TIME, data_path(key), SUMMARY, EVENT_SUMMARY]
    arrays = await reader.open_arrays(record, names, required=(SEQ_NUM, TIME))
    if data_path(key) not in arrays:
        raise KeyError(f"the stored stream of descriptor {uid!r} has no column for {key!r}")
    kind = _kind(key, spec, arrays)
    if kind == "window":
        stats = await _windows(reader, record, key, arrays)
        first = np.arange(stats.shape[0], dtype=np.int64) * SUMMARY_WINDOW
        stop = np.minimum(first + SUMMARY_WINDOW, int(record["length"]))
        # A descriptor that continues another's seq_nums holds none below its first.
        lowest = max(0, int(record.get("seq_num_min") or 1) - 1)
        return kind, _Part(uid, np.maximum(first, lowest), stats, stop=stop)
    positions, time, stats = await _events(reader, record, key, arrays)
    return kind, _Part(uid, positions, stats, time=time,
                       elements=math.prod(arrays[data_path(key)].shape[1:]))


async def field_summary(reader: ArrayReader, descs: Sequence[Doc], records: Mapping[str, Doc],
                        key: str, points: int | None, attrs: Mapping[str, Any]
                        ) -> xarray.Dataset:
    """The summary of ``key`` over the stream's descriptors (oldest first): see
    :meth:`bluestream.catalog.stream.AsyncEventStream.summary`."""
    if points is not None and (not isinstance(points, int) or points < 1):
        raise ValueError(f"points must be a positive integer or None, not {points!r}")
    having = [d for d in descs if key in d.get("data_keys", {})]
    if not having:
        known = sorted({k for d in descs for k in d.get("data_keys", {})})
        raise KeyError(f"stream {attrs.get('stream_name')!r} of run "
                       f"{attrs.get('run_start')!r} has no data key {key!r}; its keys are "
                       f"{known}")
    found = [await _part(reader, d, records.get(str(d["uid"])), key) for d in having]
    kinds = {kind for kind, _ in found}
    parts = [part for _, part in found]
    info = {**attrs, "field": key, "descriptors": [p.descriptor for p in parts]}
    if kinds == {"window"}:
        return _window_dataset(parts, points, info)
    if kinds == {"event"}:
        return _event_dataset(parts, points, info)
    raise TypeError(f"data key {key!r} is a scalar in some descriptors of the stream and "
                    "an array in others: summarise it per descriptor")


def _groups(total: int, points: int | None) -> int:
    """Rows merged into one point so that at most ``points`` remain."""
    return 1 if points is None or total <= points else -(-total // points)


def _window_dataset(parts: Sequence[_Part], points: int | None, info: dict[str, Any]
                    ) -> xarray.Dataset:
    import xarray

    stats = np.concatenate([p.stats for p in parts])
    first = np.concatenate([p.first for p in parts])
    stop = np.concatenate([p.stop if p.stop is not None else p.first for p in parts])
    per = _groups(stats.shape[0], points)
    starts = np.arange(0, stats.shape[0], per)
    ends = np.r_[starts[1:], stats.shape[0]][:starts.size] - 1
    merged = merge_windows(stats, per)
    coords = {"seq_num": ("window", first[starts] + 1),
              "seq_num_stop": ("window", stop[ends] + 1)}
    data = {name: ("window", merged[:, i].astype(np.int64) if name.endswith("count")
                   else merged[:, i]) for i, name in enumerate(SUMMARY_FIELDS)}
    return xarray.Dataset(data, coords=coords, attrs={
        **info, "window": SUMMARY_WINDOW, "windows_per_point": per})


def _event_dataset(parts: Sequence[_Part], points: int | None, info: dict[str, Any]
                   ) -> xarray.Dataset:
    import xarray

    positions = np.concatenate([p.first for p in parts])
    time = np.concatenate([p.time if p.time is not None else np.zeros(0) for p in parts])
    stats = np.concatenate([p.stats for p in parts])
    elements = np.concatenate([np.full(len(p.first), p.elements, np.float64) for p in parts])
    if len(parts) > 1:  # rows of several descriptors in time order, as read() has them
        order = np.lexsort((positions, time))
        positions, time, stats, elements = (positions[order], time[order], stats[order],
                                            elements[order])
    per = _groups(stats.shape[0], points)
    if per > 1:
        starts = np.arange(0, stats.shape[0], per)
        sums = np.add.reduceat(stats[:, 3], starts)
        stats = np.column_stack([np.minimum.reduceat(stats[:, 0], starts),
                                 np.maximum.reduceat(stats[:, 1], starts),
                                 sums / np.add.reduceat(elements, starts), sums])
        positions, time = positions[starts], time[starts]
    data = {name: ("time", stats[:, i]) for i, name in enumerate(EVENT_SUMMARY_FIELDS)}
    return xarray.Dataset(data, coords={"time": ("time", time),
                                        "seq_num": ("time", positions.astype(np.int64) + 1)},
                          attrs={**info, "events_per_point": per})
