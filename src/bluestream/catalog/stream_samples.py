"""Level 4's read-back of sample rows: a few windows of a stream's written rows are read
again through the catalog's own reader (:mod:`bluestream.catalog.arrays`, the path users
read by) and compared with what :mod:`bluestream.catalog.stream_check` read from the
chunks directly, so that a reader drifting from the writer is found too, not only
damaged bytes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from bluestream.catalog.context import CatalogContext
from bluestream.layout import SEQ_NUM, TIME, UID

__all__ = ["SAMPLE_ROWS", "SAMPLE_WINDOWS", "mismatches", "sample"]

Doc = dict[str, Any]
Array = NDArray[Any]
#: Rows of each stream re-read through the catalog's reader at level 4: a few windows of
#: consecutive rows (each window costs one chunk read per array, whatever its rows).
SAMPLE_WINDOWS, SAMPLE_ROWS = 4, 4


def sample(positions: Array, windows: int, rows: int) -> Array:
    """``windows`` runs of ``rows`` consecutive written positions, spread evenly from the
    first to the last (deterministic)."""
    if positions.size <= windows * rows:
        return positions.astype(np.int64)
    starts = np.unique(np.linspace(0, positions.size - rows, windows).round().astype(np.int64))
    idx = np.unique((starts[:, None] + np.arange(rows)).ravel())
    return positions[idx].astype(np.int64)


async def mismatches(ctx: CatalogContext, record: Doc, keys: Sequence[str],
                     names: Sequence[str], positions: set[int],
                     direct: dict[str, dict[int, Any]]) -> AsyncIterator[tuple[str, str | None]]:
    """(message, array or None) for each way the rows at ``positions`` read through the
    catalog differ from ``direct`` (array name -> position -> the value read directly),
    window by window. A failing read raises (the catalog's errors or zarr's) after the
    mismatches of the windows before it."""
    opened = await ctx.arrays.open_arrays(record, list(names))
    for a, b in _windows_of(sorted(positions)):
        rows_read = await ctx.arrays.read_rows(record, keys, start=a, stop=b, arrays=opened)
        got = _row_values(rows_read)
        for p in range(a, b):
            if p in positions:
                for found in _compare(p, got.get(p, {}), direct):
                    yield found


def _compare(p: int, got: dict[str, Any], direct: dict[str, dict[int, Any]]
             ) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    for name, values in sorted(direct.items()):
        if p not in values:
            continue
        if name not in got:
            if name == SEQ_NUM:
                out.append((f"row {p} holds an event, the catalog does not read it", None))
                return out
            continue
        if not _same(np.asarray(values[p]), np.asarray(got[name])):
            out.append((f"row {p} reads back through the catalog as "
                        f"{_brief_value(got[name])}, the stored value is "
                        f"{_brief_value(values[p])}", name))
    return out


def _windows_of(positions: list[int]) -> list[tuple[int, int]]:
    """[start, stop) ranges covering sorted positions, neighbours merged."""
    out: list[tuple[int, int]] = []
    for p in positions:
        if out and p <= out[-1][1] + SAMPLE_ROWS:
            out[-1] = (out[-1][0], p + 1)
        else:
            out.append((p, p + 1))
    return out


def _row_values(rows: Any) -> dict[int, dict[str, Any]]:
    """What the catalog's reader returned, by position and array name."""
    out: dict[int, dict[str, Any]] = {}
    for i, p in enumerate(rows.positions.tolist()):
        row: dict[str, Any] = {SEQ_NUM: rows.seq_num[i], TIME: rows.time[i], UID: rows.uid[i]}
        for prefix, group in (("data", rows.data), ("timestamps", rows.timestamps),
                              ("filled", rows.filled)):
            for key, values in group.items():
                row[f"{prefix}/{key}"] = values[i]
        out[int(p)] = row
    return out


def _same(a: Array, b: Array) -> bool:
    if a.shape != b.shape:
        return False
    if a.dtype.kind in "fc" and b.dtype.kind in "fc":
        return bool(np.array_equal(a, b, equal_nan=True))
    return bool(np.array_equal(a, b))


def _brief_value(value: Any) -> str:
    text = np.array2string(np.asarray(value), threshold=6, max_line_width=60) \
        if np.ndim(value) else repr(value.item() if hasattr(value, "item") else value)
    return text if len(text) <= 80 else text[:77] + "..."
