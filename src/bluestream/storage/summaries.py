"""Statistical summaries of event columns (BTrDB's stat windows), computed and merged.

Why: a 10-million-event float column is 80 MB, its window summaries (count, min, max,
mean and NaN count per :data:`~bluestream.layout.SUMMARY_WINDOW` rows) 1.2 MB: a plot of
a long run, or a look at its range, reads those instead of the column. Images get one
row of min/max/mean/sum per event, so a frame can be found without reading the frames.
The layout of the arrays is :mod:`bluestream.layout`'s; the Zarr writer stores what is
computed here with the rows it describes, readers merge windows with :func:`merge_windows`.

Deterministic (DESIGN I1): a window's summary is computed from its rows laid out at their
positions in a ``(windows, SUMMARY_WINDOW)`` matrix, always the same way (rows never
written count nothing), so it depends only on the rows stored there, never on which batch
wrote them or how many windows were computed together: replays store identical bytes.
A window that a write covers only in part is computed from the stored rows of that
window with the new ones over them (the writer reads them back: ``Reader``).

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from bluestream.layout import EVENT_SUMMARY_FIELDS, SEQ_NUM, SUMMARY_FIELDS, SUMMARY_WINDOW

__all__ = ["Reader", "WindowPlan", "event_stats", "merge_windows", "rows_stats",
           "window_stats", "window_summaries"]

Array = NDArray[Any]
#: Stored rows ``[start, stop)`` of a column (by its array name), fill where none were
#: written: how the writer reads back the rest of a window it writes only part of.
Reader = Callable[[str, int, int], Array]
_COUNT, _MIN, _MAX, _MEAN, _NANS = range(len(SUMMARY_FIELDS))
#: Events at least this big are summarised one at a time (see :func:`event_stats`).
_PER_EVENT_BYTES = 64 * 1024


def window_stats(values: Array, written: Array) -> Array:
    """``(k, 5)`` summaries of ``k`` windows: ``values`` and ``written`` are
    ``(k, SUMMARY_WINDOW)``, row ``j`` the window's positions in order. NaN values are
    counted (``count`` and ``nan_count``) and left out of min/max/mean; with no number
    in a window those are NaN."""
    v = np.asarray(values, dtype=np.float64)
    if written.all():  # whole windows (nearly every one a long run writes)
        lo, hi = v.min(axis=1), v.max(axis=1)
        if not (np.isnan(lo).any() or np.isnan(hi).any()):  # and no NaN among them
            out = np.empty((v.shape[0], len(SUMMARY_FIELDS)), dtype=np.float64)
            out[:, _COUNT] = v.shape[1]
            out[:, _MIN], out[:, _MAX] = lo, hi
            with np.errstate(invalid="ignore", over="ignore"):  # +inf and -inf: NaN
                out[:, _MEAN] = v.sum(axis=1) / v.shape[1]
            out[:, _NANS] = 0.0
            return out
    nan = np.isnan(v) & written
    valid = written & ~nan
    n_valid = valid.sum(axis=1)
    some = n_valid > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(valid, v, 0.0).sum(axis=1) / n_valid
    out = np.empty((v.shape[0], len(SUMMARY_FIELDS)), dtype=np.float64)
    out[:, _COUNT] = written.sum(axis=1)
    out[:, _MIN] = np.where(some, np.where(valid, v, np.inf).min(axis=1), np.nan)
    out[:, _MAX] = np.where(some, np.where(valid, v, -np.inf).max(axis=1), np.nan)
    out[:, _MEAN] = np.where(some, mean, np.nan)
    out[:, _NANS] = nan.sum(axis=1)
    return out


def rows_stats(start: int, values: Array, written: Array) -> Array:
    """Summaries of the windows that positions ``start .. start + len(values) - 1``
    touch (``start`` a window boundary; rows past the end count as never written)."""
    if start % SUMMARY_WINDOW:
        raise ValueError(f"windows start at multiples of {SUMMARY_WINDOW}, not {start}")
    k = -(-len(values) // SUMMARY_WINDOW)
    v = np.zeros(k * SUMMARY_WINDOW, dtype=np.float64)
    w = np.zeros(k * SUMMARY_WINDOW, dtype=bool)
    v[:len(values)] = values
    w[:len(values)] = written
    return window_stats(v.reshape(k, SUMMARY_WINDOW), w.reshape(k, SUMMARY_WINDOW))


def event_stats(values: Array) -> Array:
    """``(n, 4)`` per-event min, max, mean and sum of ``(n, *shape)`` numeric values,
    as numpy computes them over each event's value (a NaN makes all four NaN); sums and
    means accumulate in float64, integers up to 32 bits exactly (in 64-bit integers).

    Large values (images) are summarised one event at a time: the three passes then read
    an event from the cache, not from memory (a 64 x 512 x 512 uint16 batch: ~8 ms
    instead of ~27 ms; its zstd encoding alone takes ~120 ms)."""
    n = int(values.shape[0])
    flat = values.reshape(n, -1)
    if flat.dtype.kind == "b":
        flat = flat.view(np.uint8)
    out = np.empty((n, len(EVENT_SUMMARY_FIELDS)), dtype=np.float64)
    if n == 0 or flat.shape[1] == 0:
        out[:] = np.nan
        return out
    acc = _accumulator(flat.dtype)
    if flat.shape[1] * flat.dtype.itemsize >= _PER_EVENT_BYTES:
        for i, row in enumerate(flat):
            out[i, 0], out[i, 1], out[i, 3] = row.min(), row.max(), row.sum(dtype=acc)
    else:
        out[:, 0] = flat.min(axis=1)
        out[:, 1] = flat.max(axis=1)
        out[:, 3] = flat.sum(axis=1, dtype=acc)
    out[:, 2] = out[:, 3] / flat.shape[1]
    return out


def _accumulator(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """Exact sums of integers up to 32 bits (2**32 of them at least); float64 else."""
    if dtype.kind in "iu" and dtype.itemsize <= 4:
        return np.dtype(np.uint64 if dtype.kind == "u" else np.int64)
    return np.dtype(np.float64)


@dataclass(frozen=True)
class WindowPlan:
    """Which windows a write of rows at ``positions`` touches, and how."""

    #: The windows touched, sorted.
    windows: Array
    #: Per row written: the index (into ``windows``) of its window, its offset there.
    rows: Array
    cols: Array
    #: Runs ``[j0, j1)`` of indices into ``windows`` of consecutive windows that the
    #: write covers only in part (their other rows are read back).
    partial: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, positions: Array) -> WindowPlan:
        """The plan for sorted unique ``positions``."""
        win = positions // SUMMARY_WINDOW
        windows, counts = np.unique(win, return_counts=True)
        rows = np.repeat(np.arange(windows.size), counts)
        cols = positions - win * SUMMARY_WINDOW
        part = np.flatnonzero(counts < SUMMARY_WINDOW)
        runs: list[tuple[int, int]] = []
        for j in part.tolist():
            if runs and runs[-1][1] == j and windows[j] == windows[j - 1] + 1:
                runs[-1] = (runs[-1][0], j + 1)
            else:
                runs.append((j, j + 1))
        return cls(windows, rows, cols, tuple(runs))

    def ranges(self) -> list[tuple[int, int]]:
        """Positions ``[start, stop)`` to read back: the partly covered windows."""
        return [(int(self.windows[a]) * SUMMARY_WINDOW, int(self.windows[b - 1] + 1)
                 * SUMMARY_WINDOW) for a, b in self.partial]


def window_summaries(plan: WindowPlan, columns: Mapping[str, Array], read: Reader
                     ) -> dict[str, Array]:
    """The ``(len(plan.windows), 5)`` summaries of each column of ``columns`` (array
    name -> the values written, in position order) once the write is stored: rows of
    the write over the stored rows of the windows it covers in part."""
    k = int(plan.windows.size)
    written = np.zeros((k, SUMMARY_WINDOW), dtype=bool)
    stored_seq = [read(SEQ_NUM, a, b) > 0 for a, b in plan.ranges()]
    for (j0, j1), seq in zip(plan.partial, stored_seq, strict=True):
        written[j0:j1] = seq.reshape(j1 - j0, SUMMARY_WINDOW)
    # Positions of one contiguous stretch over consecutive windows (how pages and
    # batches arrive) are a slice of the flattened windows, not a scatter.
    n = int(plan.rows.size)
    span = None
    if k and int(plan.windows[-1] - plan.windows[0]) == k - 1 and n and \
            int(plan.cols[0]) + n == int(plan.cols[-1]) + 1 + (k - 1) * SUMMARY_WINDOW:
        span = slice(int(plan.cols[0]), int(plan.cols[0]) + n)
    if span is not None:
        written.reshape(-1)[span] = True
    else:
        written[plan.rows, plan.cols] = True
    unwritten = None if written.all() else ~written
    out: dict[str, Array] = {}
    for name, values in columns.items():
        matrix = np.zeros((k, SUMMARY_WINDOW), dtype=np.float64)
        for (j0, j1), (a, b) in zip(plan.partial, plan.ranges(), strict=True):
            matrix[j0:j1] = np.asarray(read(name, a, b), dtype=np.float64).reshape(
                j1 - j0, SUMMARY_WINDOW)
        if span is not None:
            matrix.reshape(-1)[span] = values
        else:
            matrix[plan.rows, plan.cols] = values
        # Rows never written hold the column's fill (NaN for floats): count nothing.
        if unwritten is not None:
            matrix[unwritten] = 0.0
        out[name] = window_stats(matrix, written)
    return out


def merge_windows(stats: Array, per: int) -> Array:
    """Adjacent windows merged ``per`` at a time (the last group may be smaller): counts
    added, min of mins, max of maxes, means weighted by the numbers they were taken of."""
    if per <= 1 or stats.shape[0] == 0:
        return stats
    starts = np.arange(0, stats.shape[0], per)
    numbers = stats[:, _COUNT] - stats[:, _NANS]
    with np.errstate(invalid="ignore"):
        sums = np.where(numbers > 0, stats[:, _MEAN] * numbers, 0.0)
    out = np.empty((starts.size, len(SUMMARY_FIELDS)), dtype=np.float64)
    out[:, _COUNT] = np.add.reduceat(stats[:, _COUNT], starts)
    out[:, _NANS] = np.add.reduceat(stats[:, _NANS], starts)
    out[:, _MIN] = np.fmin.reduceat(stats[:, _MIN], starts)
    out[:, _MAX] = np.fmax.reduceat(stats[:, _MAX], starts)
    total = np.add.reduceat(numbers, starts)
    with np.errstate(invalid="ignore", divide="ignore"):
        out[:, _MEAN] = np.where(total > 0, np.add.reduceat(sums, starts) / total, np.nan)
    return out
