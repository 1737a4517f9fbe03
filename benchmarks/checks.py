"""The benchmarks' own correctness checks.

A figure measured on a wrong result is no figure: every scenario returns, beside its
measurements, the checks it made of what was stored and read (:class:`Check`). One
failed check fails the scenario and ``python -m benchmarks`` exits 1, while a missed
target does not (the benchmarks measure; whether a speed is good enough is a report).

Pure functions: values in, a :class:`Check` out; nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Check", "equal", "frames_match", "no_data_loss", "same_columns"]


@dataclass(frozen=True)
class Check:
    """One thing a scenario verified; ``detail`` says what was seen."""

    name: str
    ok: bool
    detail: str = ""

    def line(self) -> str:
        verdict = "ok" if self.ok else "CHECK FAILED"
        return f"{verdict}: {self.name}" + (f" ({self.detail})" if self.detail else "")


def _short(value: Any, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def equal(name: str, got: Any, expected: Any) -> Check:
    if got == expected:
        return Check(name, True, _short(got))
    return Check(name, False, f"got {_short(got)}, expected {_short(expected)}")


def no_data_loss(label: str, failures: Sequence[str]) -> Check:
    """``failures``: what :func:`benchmarks.infra.checked_ingest` recorded for attempts
    whose stored counts did not match. A figure from a repeated ingest is still reported,
    but a daemon that lost data once fails the scenario."""
    name = f"no data loss: {label}"
    if not failures:
        return Check(name, True, "stored counts matched on the first attempt")
    return Check(name, False, f"{len(failures)} ingest(s) lost data and were repeated: "
                 + "; ".join(failures))


def _family(dtype: np.dtype[Any]) -> str:
    """Numbers compare with numbers, text with text (str, bytes, or objects holding them)."""
    return "number" if dtype.kind in "biuf" else "text" if dtype.kind in "USO" else dtype.kind


def _differing_rows(got: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Indices (along the first axis) of rows that differ; NaN equals NaN."""
    same = got == expected
    if got.dtype.kind == "f" and expected.dtype.kind == "f":
        same |= np.isnan(got) & np.isnan(expected)
    if same.ndim > 1:
        same = same.reshape(same.shape[0], -1).all(axis=1)
    return np.flatnonzero(~np.asarray(same))


def same_columns(name: str, got: Mapping[str, Any], expected: Mapping[str, Any]) -> Check:
    """Every column of ``expected`` is in ``got`` with the same shape and values, and
    there are no others. The detail names the first differing row."""
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        return Check(name, False, f"columns missing {missing}, unexpected {extra}")
    for key in sorted(expected):
        g, e = np.asarray(got[key]), np.asarray(expected[key])
        if g.shape != e.shape:
            return Check(name, False, f"{key}: shape {g.shape}, expected {e.shape}")
        if _family(g.dtype) != _family(e.dtype):
            return Check(name, False, f"{key}: dtype {g.dtype}, expected {e.dtype}")
        bad = _differing_rows(g, e)
        if bad.size:
            i = int(bad[0])
            return Check(name, False, f"{key}[{i}] = {_short(g[i].tolist())}, expected "
                         f"{_short(e[i].tolist())} ({bad.size} of {len(e)} rows differ)")
    rows = len(next(iter(expected.values()))) if expected else 0
    return Check(name, True, f"{len(expected)} columns x {rows:,} rows equal")


def frames_match(name: str, got: Any, frames: Sequence[np.ndarray], n: int,
                 block: int = 64) -> Check:
    """Row ``i`` of ``got`` (anything sliceable into numpy: an array, a Zarr array) is
    ``frames[i % len(frames)]``, for ``n`` rows; read ``block`` rows at a time, so a
    large stored run is not loaded at once. A stored array may be longer than ``n``
    (the writer grows arrays by whole chunks); rows past ``n`` are not events."""
    shape = getattr(got, "shape", None)
    if shape is None or tuple(shape[1:]) != tuple(frames[0].shape) or shape[0] < n:
        return Check(name, False, f"shape {shape}, expected {(n, *frames[0].shape)}")
    pool = np.stack(frames)
    for start in range(0, n, block):
        part = np.asarray(got[start:min(start + block, n)])
        want = pool[np.arange(start, start + len(part)) % len(frames)]
        bad = _differing_rows(part, want)
        if bad.size:
            return Check(name, False, f"frame {start + int(bad[0])} differs "
                         f"({bad.size} of the {len(part)} frames from {start} differ)")
    return Check(name, True, f"{n:,} frames equal")
