"""The arrays an integrity check expects a stream to hold: those the layout gives its
descriptor (``layout.stored_columns`` without a page to choose the dtype of keys that
leave it open), and whether a stored array or tail column is of that kind. Shared by
the checks of :mod:`bluestream.catalog.stream_check` and the storage report of
:mod:`bluestream.catalog.usage`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from bluestream.layout import (
    SEQ_NUM,
    STRING,
    TIME,
    UID,
    FieldSpec,
    data_path,
    filled_path,
    timestamps_path,
)

__all__ = ["Column", "describe", "expected_columns", "wrong_type"]


@dataclass(frozen=True)
class Column:
    """An array a stream's Zarr group (or tail) must hold, as the descriptor gives it."""

    name: str
    dtype: np.dtype[Any] | None  # None: an array key whose first page chose the dtype
    shape: tuple[int, ...]


def expected_columns(specs: Mapping[str, FieldSpec]) -> list[Column]:
    """The arrays the layout gives a descriptor (layout.stored_columns, without a page)."""
    cols = [Column(TIME, np.dtype(np.float64), ()), Column(SEQ_NUM, np.dtype(np.int64), ()),
            Column(UID, STRING, ())]
    for key, spec in sorted(specs.items()):
        if spec.external or spec.variable or spec.kind == "string":
            cols.append(Column(data_path(key), STRING, ()))
        else:
            cols.append(Column(data_path(key), spec.dtype, spec.shape))
        cols.append(Column(timestamps_path(key), np.dtype(np.float64), ()))
        if spec.external:
            cols.append(Column(filled_path(key), np.dtype(np.bool_), ()))
    return cols


def wrong_type(dtype: np.dtype[Any], shape: tuple[int, ...], col: Column) -> bool:
    """Whether an array (or tail column) of ``dtype`` holding ``shape`` per event is
    not what ``col`` expects: strings are compared by kind only (the layout stores
    them in one dtype whatever the descriptor says), and a key whose first page chose
    the dtype may hold any numeric one."""
    strings = (dtype.kind == "T", col.dtype is not None and col.dtype.kind == "T")
    if col.dtype is None:
        return strings[0] or shape != col.shape
    return strings[0] != strings[1] or (not strings[0] and dtype != col.dtype) \
        or shape != col.shape


def describe(col: Column) -> str:
    """The dtype and per-event shape ``col`` expects, for a problem's message."""
    return f"{col.dtype if col.dtype is not None else 'a numeric dtype'} {list(col.shape)}"
