"""Stored columns -> per-descriptor parts -> one ``xarray.Dataset``. Pure, no I/O.

A stream with several descriptors (a configuration change mid-run) is read as one
dataset, as databroker does: parts are concatenated and, when there is more than one,
ordered by event time (then seq_num). A data key missing from one descriptor is filled
with NaN (numbers), "" (strings) or None (anything else) there.

Extra dimensions are named ``dim_0``, ``dim_1``, ... with one counter across the
stream's keys (databroker's convention), so keys of different shapes never share a
dimension name; a data key's ``dims`` in the descriptor takes precedence.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    import xarray

__all__ = ["ATTR_FIELDS", "Part", "build_dataset", "decode_json_column", "to_str"]

Array = NDArray[Any]

#: Data-key fields copied into a variable's attrs (when present).
ATTR_FIELDS = ("source", "dtype", "dtype_numpy", "shape", "units", "external", "precision",
               "object_name", "dims")


@dataclass
class Part:
    """One descriptor's contribution to a stream: rows in seq_num order."""

    descriptor: Mapping[str, Any]
    seq_num: Array
    time: Array
    uid: Array
    #: key -> (n, *shape) numpy or dask array (or an object array of per-event values).
    columns: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.seq_num.shape[0])


def to_str(arr: Array) -> Array:
    """StringDType columns as fixed-width unicode (what xarray and users expect)."""
    if arr.dtype.kind == "T":
        width = int(np.strings.str_len(arr).max()) if arr.size else 0
        return arr.astype(f"<U{max(width, 1)}")
    return arr


def decode_json_column(column: Array) -> Array:
    """Values stored as JSON text: one array per event, stacked when they agree."""
    values = [np.asarray(json.loads(text)) for text in column.tolist()]
    shapes = {v.shape for v in values}
    if values and len(shapes) == 1 and all(v.dtype.kind in "biufcU" for v in values):
        return np.stack(values)
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def _is_dask(arr: Any) -> bool:
    return type(arr).__module__.startswith("dask")


def _missing(n: int, template: Any) -> Any:
    """A block of ``n`` missing values shaped and typed like ``template``'s rows."""
    shape = (n, *template.shape[1:])
    kind = template.dtype.kind
    fill: Any
    if kind in "fc":
        dtype, fill = template.dtype, np.nan
    elif kind in "iub":
        dtype, fill = np.dtype(np.float64), np.nan
    elif kind == "U":
        dtype, fill = template.dtype, ""
    else:
        dtype, fill = np.dtype(object), None
    if _is_dask(template):
        import dask.array as da

        return da.full(shape, fill, dtype=dtype)  # type: ignore[no-untyped-call]
    return np.full(shape, fill, dtype=dtype)


def _as_object_rows(block: Any) -> Array:
    arr = np.asarray(block)
    if arr.dtype == object and arr.ndim == 1:
        return arr
    out = np.empty(arr.shape[0], dtype=object)
    for i in range(arr.shape[0]):
        out[i] = arr[i]
    return out


def _concat(blocks: Sequence[Any]) -> Any:
    if len(blocks) == 1:
        return blocks[0]
    if any(_is_dask(b) for b in blocks):
        import dask.array as da

        if len({b.shape[1:] for b in blocks}) == 1:
            return da.concatenate(  # type: ignore[no-untyped-call]
                [da.asarray(b) for b in blocks], axis=0)  # type: ignore[no-untyped-call]
        blocks = [np.asarray(b) for b in blocks]  # rare: shapes changed between descriptors
    if len({b.shape[1:] for b in blocks}) == 1:
        return np.concatenate(blocks, axis=0)
    return np.concatenate([_as_object_rows(b) for b in blocks])


def _order(parts: Sequence[Part]) -> Array | None:
    """Row order across parts (None when it is the concatenation order)."""
    if len(parts) < 2:
        return None
    time = np.concatenate([p.time for p in parts])
    seq = np.concatenate([p.seq_num for p in parts])
    order = np.lexsort((seq, time))
    if np.array_equal(order, np.arange(order.size)):
        return None
    return order


def _take(arr: Any, order: Array | None) -> Any:
    return arr if order is None else arr[order]


def build_dataset(parts: Sequence[Part], data_keys: Mapping[str, Mapping[str, Any]],
                  *, attrs: Mapping[str, Any] | None = None, uids: bool = True
                  ) -> xarray.Dataset:
    """One Dataset over ``parts``; ``data_keys`` gives the variables' order and attrs.
    ``uids=False``: no ``uid`` coordinate (the parts' uids are not looked at)."""
    import xarray

    order = _order(parts)
    time = _take(np.concatenate([p.time for p in parts]) if parts else np.zeros(0), order)
    seq = _take(np.concatenate([p.seq_num for p in parts]) if parts
                else np.zeros(0, dtype=np.int64), order)
    uid = _take(np.concatenate([to_str(p.uid) for p in parts]) if parts and uids
                else np.zeros(0, dtype="<U1"), order if uids else None)
    counter = itertools.count()
    variables: dict[str, Any] = {}
    for key, dk in data_keys.items():
        present = [p.columns[key] for p in parts if key in p.columns]
        if not present:
            continue
        template = present[0]
        blocks = [p.columns[key] if key in p.columns else _missing(len(p), template)
                  for p in parts]
        values = _take(_concat(blocks), order)
        extra = values.ndim - 1
        given = dk.get("dims")
        if isinstance(given, list | tuple) and len(given) == extra and \
                all(isinstance(d, str) for d in given):
            dims = tuple(given)
        else:
            dims = tuple(f"dim_{next(counter)}" for _ in range(extra))
        variables[key] = (("time", *dims), values, _attrs(dk))
    coords = {"time": ("time", np.asarray(time, dtype=np.float64)),
              "seq_num": ("time", np.asarray(seq, dtype=np.int64)),
              "uid": ("time", uid)}
    if not uids:
        del coords["uid"]
    for name in ("seq_num", "uid"):
        if name in variables and name in coords:  # a data key of that name wins
            del coords[name]
    return xarray.Dataset(variables, coords=coords, attrs=dict(attrs or {}))


def _attrs(data_key: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ATTR_FIELDS:
        value = data_key.get(name)
        if value is None:
            continue
        out[name] = list(value) if isinstance(value, tuple) else value
    return out
