"""The storage layout of event data: the one contract the Zarr writer and every reader share.

Zarr v3, one group per run and descriptor::

    <root>/<tenant>/<start_uid[:2]>/<start_uid>/<descriptor_uid>/
        time  seq_num  uid  data/<key>  timestamps/<key>  filled/<key> (external keys)
        summary (numeric scalar keys)  event_summary (numeric array keys)

chunked along the event axis (dimension ``event``, then ``dim_0``, ``dim_1`` ...). Row
``i`` holds the event with ``seq_num == i + 1``; rows never written hold ``seq_num == 0``
and are skipped by readers. ``seq_num`` is written last, so a reader that sees a row's
``seq_num`` sees the whole row. Group attributes record ``descriptor_uid``,
``run_start``, ``stream_name`` and :data:`SCHEMA_VERSION`.

Statistical summaries (BTrDB's stat windows), so a long column can be looked at without
reading it; written with the rows they describe, before ``seq_num``:

* ``summary``, shape ``(windows, keys, 5)``: for each numeric scalar key (attribute
  ``keys``, sorted) and window of :data:`SUMMARY_WINDOW` positions (window ``w`` covers
  rows ``w * SUMMARY_WINDOW`` onwards), the :data:`SUMMARY_FIELDS` of the rows written
  there (``count`` counts rows whose ``seq_num`` is set, NaN values included;
  min/max/mean leave NaNs out and are NaN when no value is a number). A row of NaNs
  (the fill) is a window never summarised: groups written before summaries existed, or
  rows that only ever were in the stream's tail. Its length is :func:`summary_length` of
  the events' and grows with them. One array for all keys: each batch that writes rows
  rewrites one more chunk, not one per key.
* ``event_summary``, shape ``(events, keys, 4)``: for each numeric array key (images)
  and event, the :data:`EVENT_SUMMARY_FIELDS` of its value (numpy's, NaNs propagate).

Readers compute what a summary array does not hold from the rows themselves.

How a descriptor's data key is stored (its :class:`FieldSpec`):

* number / integer / boolean: a numeric column of the descriptor's ``dtype_numpy`` when
  it fits the JSON type (else float64 / int64 / bool), per-event ``shape``.
* string (scalar): a ``StringDType`` column.
* array: ``dtype_numpy`` if numeric, else the dtype of the first page's values.
* external (value is a datum id or similar reference): a string column plus ``filled``.
* variable (a ``None`` or negative dimension), structured ``dtype_numpy`` (list form),
  a non-numeric array dtype, or a string key with a non-scalar shape: every value is
  stored as its JSON text, because Zarr v3 has neither ragged nor portable structured
  or fixed-width-string arrays.

Pure: no I/O. Names that come from documents are checked here before they become paths.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from bluestream.errors import LimitExceeded, Reason, ValidationError
from bluestream.limits import Limits

__all__ = [
    "EVENT_SUMMARY",
    "EVENT_SUMMARY_FIELDS",
    "SCHEMA_VERSION",
    "SEQ_NUM",
    "STRING",
    "SUMMARY",
    "SUMMARY_FIELDS",
    "SUMMARY_WINDOW",
    "TIME",
    "UID",
    "Column",
    "FieldSpec",
    "Page",
    "chunk_events",
    "column_names",
    "data_path",
    "descriptor_path",
    "field_specs",
    "fill_for",
    "filled_path",
    "reader_specs",
    "safe_component",
    "stored_columns",
    "summary_columns",
    "summary_keys",
    "summary_kind",
    "summary_length",
    "timestamps_path",
]

Array = NDArray[Any]

#: Version of this layout, recorded per group and per ``event_stream`` record.
#: 1: every row of a stream in its Zarr arrays. 2: a stream may keep its newest rows in
#: the metadata store (:mod:`bluestream.storage.tail`); readers of 2 read 1 unchanged.
SCHEMA_VERSION = 2
TIME, SEQ_NUM, UID = "time", "seq_num", "uid"
#: The dtype of every string column (uids, string fields, references, JSON text).
STRING = np.dtypes.StringDType()
#: Bytes aimed at per chunk along the event axis.
_CHUNK_TARGET_BYTES = 4 * 1024 * 1024
#: Each batch rewrites the partial chunk at its end, so long chunks of small scalar
#: columns multiply the bytes re-encoded per batch (benchmarks/README.md, profile).
_MAX_CHUNK_EVENTS = 8_192
_STRING_ITEM_BYTES = 64  # a guess, for chunking string columns
#: Rows (positions) per statistical summary window of a numeric scalar column. The
#: stream's tail (:mod:`bluestream.storage.tail`) moves rows to the arrays in blocks of
#: the same size by default, so a window is summarised from the rows being written, with
#: no read-back of stored rows.
SUMMARY_WINDOW = 256
#: The summary arrays of a descriptor's group.
SUMMARY, EVENT_SUMMARY = "summary", "event_summary"
#: The last axis of ``summary``.
SUMMARY_FIELDS = ("count", "min", "max", "mean", "nan_count")
#: The last axis of ``event_summary``.
EVENT_SUMMARY_FIELDS = ("min", "max", "mean", "sum")
#: Bytes aimed at per chunk of ``summary``: each batch that writes rows rewrites one.
_SUMMARY_CHUNK_BYTES = 256 * 1024
_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,254}")
_KINDS = frozenset({"number", "integer", "boolean", "string", "array"})
_MAX_NDIM = 32
_MAX_KEY_LEN = 255
#: Reading applies no size limits: what was stored was already checked when written.
_NO_LIMITS = Limits(max_message_bytes=2**62, max_shape_elements=2**62, max_seq_num=2**62,
                    max_page_events=2**62, max_data_keys=2**62)


# -- paths ----------------------------------------------------------------------------------
def data_path(key: str) -> str:
    return f"data/{key}"


def timestamps_path(key: str) -> str:
    return f"timestamps/{key}"


def filled_path(key: str) -> str:
    return f"filled/{key}"


def safe_component(name: str, what: str) -> str:
    """Names that come from documents become path components; refuse anything else."""
    if not _SAFE.fullmatch(name) or ".." in name:
        raise ValidationError(f"{what} {name[:80]!r} is not safe as a storage path component",
                              reason=Reason.BAD_KEY)
    return name


def descriptor_path(tenant: str, run_start: str, descriptor_uid: str) -> str:
    """The group path of one descriptor's arrays, relative to the Zarr root."""
    run = safe_component(run_start, "run start uid")
    return "/".join((safe_component(tenant, "tenant"), run[:2], run,
                     safe_component(descriptor_uid, "descriptor uid")))


def column_names(keys: Sequence[str], timestamps: bool = True) -> list[str]:
    """The arrays a reader of ``keys`` may open (``filled`` exists for external keys)."""
    names = [SEQ_NUM, TIME, UID]
    for key in keys:
        names.append(data_path(key))
        if timestamps:
            names.append(timestamps_path(key))
        names.append(filled_path(key))
    return names


# -- field specs ----------------------------------------------------------------------------
@dataclass(frozen=True)
class FieldSpec:
    """How one data key of a descriptor is stored; derived once per descriptor."""

    key: str
    #: The descriptor's JSON type: "number" | "integer" | "boolean" | "string" | "array".
    kind: str
    #: Column dtype; None only for "array" without a usable dtype_numpy (first page decides).
    dtype: np.dtype[Any] | None
    #: Per-event shape of the stored value; () for scalars, references and JSON text.
    shape: tuple[int, ...]
    #: Values are references (datum ids) kept as strings, with a ``filled`` column.
    external: bool
    #: Values are stored as JSON text (variable shape, structured or non-numeric array).
    variable: bool


def field_specs(descriptor: Mapping[str, Any], limits: Limits) -> dict[str, FieldSpec]:
    """Storage specs for every data key of ``descriptor``, or a ValidationError.

    Rejects key names that are unsafe as Zarr path components (``bad-key``), unknown
    JSON types or numpy dtype strings (``bad-dtype``), malformed shapes (``bad-shape``)
    and, with :class:`LimitExceeded`, too many keys or too many elements per event
    (computed with Python integers, before anything is allocated).
    """
    return _field_specs(descriptor, limits)


def _field_specs(descriptor: Mapping[str, Any], limits: Limits | None) -> dict[str, FieldSpec]:
    data_keys = descriptor.get("data_keys")
    if not isinstance(data_keys, Mapping):
        raise ValidationError("descriptor has no data_keys mapping", reason=Reason.SCHEMA_VIOLATION)
    if limits is not None and len(data_keys) > limits.max_data_keys:
        raise LimitExceeded(f"descriptor has {len(data_keys)} data keys, more than the limit "
                            f"{limits.max_data_keys}")
    return {key: _spec(_safe_key(key), entry, limits) for key, entry in data_keys.items()}


def _safe_key(key: Any) -> str:
    """Data keys become Zarr path components: nothing that could escape or hide."""
    problem = None
    if not isinstance(key, str) or not key:
        problem = "is empty or not a string"
    elif len(key) > _MAX_KEY_LEN:
        problem = f"is longer than {_MAX_KEY_LEN} characters"
    elif any(c in key for c in "/\\\x00"):
        problem = "contains '/', '\\\\' or NUL"
    elif key.startswith((".", "__")):
        problem = "starts with '.' or '__'"
    if problem:
        raise ValidationError(f"data key {str(key)[:80]!r} {problem}; it cannot name an array",
                              reason=Reason.BAD_KEY)
    return str(key)


def _spec(key: str, entry: Any, limits: Limits | None) -> FieldSpec:
    if not isinstance(entry, Mapping):
        raise ValidationError(f"data key {key!r}: description is not a mapping",
                              reason=Reason.SCHEMA_VIOLATION)
    kind = entry.get("dtype")
    if kind not in _KINDS:
        raise ValidationError(f"data key {key!r}: dtype {kind!r} is not one of "
                              f"{sorted(_KINDS)}", reason=Reason.BAD_DTYPE)
    shape, variable = _shape(key, entry.get("shape"))
    numpy_dtype, structured = _dtype_numpy(key, entry.get("dtype_numpy"))
    if entry.get("external"):
        return FieldSpec(key, kind, STRING, (), external=True, variable=False)
    if not variable and limits is not None:
        elements = math.prod(shape)
        if elements > limits.max_shape_elements:
            raise LimitExceeded(f"data key {key!r}: shape {list(shape)} has {elements} elements "
                                f"per event, more than the limit {limits.max_shape_elements}")
    dtype = _column_dtype(kind, numpy_dtype)
    if variable or structured or (kind == "array" and numpy_dtype is not None and dtype is None) \
            or (kind == "string" and shape != ()):
        return FieldSpec(key, kind, STRING, (), external=False, variable=True)
    return FieldSpec(key, kind, dtype, shape, external=False, variable=False)


def _shape(key: str, raw: Any) -> tuple[tuple[int, ...], bool]:
    """(known dims, variable?) with None or negative dims meaning variable."""
    if not isinstance(raw, list | tuple) or len(raw) > _MAX_NDIM:
        raise ValidationError(f"data key {key!r}: shape {raw!r} is not a list of at most "
                              f"{_MAX_NDIM} dimensions", reason=Reason.BAD_SHAPE)
    dims: list[int] = []
    variable = False
    for dim in raw:
        if dim is None:
            variable = True
        elif isinstance(dim, int | np.integer) and not isinstance(dim, bool | np.bool_):
            dims.append(int(dim))
            variable = variable or int(dim) < 0
        elif isinstance(dim, float) and dim.is_integer():
            dims.append(int(dim))
            variable = variable or dim < 0
        else:
            raise ValidationError(f"data key {key!r}: shape {raw!r} has a dimension that is "
                                  "not an integer or None", reason=Reason.BAD_SHAPE)
    return tuple(dims), variable


def _dtype_numpy(key: str, raw: Any) -> tuple[np.dtype[Any] | None, bool]:
    """(parsed dtype_numpy or None, structured?)."""
    if raw is None or raw == "":
        return None, False
    if isinstance(raw, list | tuple):
        return None, True  # structured dtype, list form: stored as JSON text
    try:
        if not isinstance(raw, str) or len(raw) > 64:
            raise TypeError(raw)
        dtype = np.dtype(raw)
    except (TypeError, ValueError):
        raise ValidationError(f"data key {key!r}: dtype_numpy {str(raw)[:80]!r} is not a numpy "
                              "dtype", reason=Reason.BAD_DTYPE) from None
    if dtype.subdtype is not None or dtype.fields is not None:
        # "(1000000,1000000)f8" is a valid dtype string whose items are huge: refuse it.
        raise ValidationError(f"data key {key!r}: dtype_numpy {raw!r} is a sub-array or "
                              "structured dtype given as a string", reason=Reason.BAD_DTYPE)
    return dtype, False


def _column_dtype(kind: str, given: np.dtype[Any] | None) -> np.dtype[Any] | None:
    storable = given is not None and given.kind in "biufc" and given.itemsize <= (
        16 if given.kind == "c" else 8)
    native = given.newbyteorder("=") if given is not None and storable else None
    if kind == "number":
        return native if native is not None and native.kind in "iufc" else np.dtype(np.float64)
    if kind == "integer":
        return native if native is not None and native.kind in "iu" else np.dtype(np.int64)
    if kind == "boolean":
        return np.dtype(np.bool_)
    if kind == "string":
        return STRING
    return native  # array: None means infer (no dtype_numpy) or JSON (unusable dtype_numpy)


def reader_specs(descriptor: Mapping[str, Any]) -> dict[str, FieldSpec]:
    """How each data key of a stored descriptor was stored (the writer's rules, without
    the size limits that were applied when it was written)."""
    return field_specs(descriptor, _NO_LIMITS)


# -- pages ----------------------------------------------------------------------------------
@dataclass
class Page:
    """A normalised event page: the writer's unit of work. All columns have n rows."""

    descriptor: str
    uid: Array  # (n,) StringDType
    seq_num: Array  # (n,) int64
    time: Array  # (n,) float64
    data: dict[str, Array]  # key -> (n, *spec.shape) of the spec's dtype
    timestamps: dict[str, Array]  # key -> (n,) float64
    filled: dict[str, Array]  # external keys only -> (n,) bool

    def __len__(self) -> int:
        return int(self.uid.shape[0])


# -- columns --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    """One array of a descriptor's group."""

    name: str  # path inside the descriptor group
    dtype: Any
    shape: tuple[int, ...]  # per event
    fill_value: Any
    #: Rows per chunk; 0: from the bytes aimed at per chunk.
    chunk: int = 0
    #: Dimension names; () names them ``event``, ``dim_0``, ``dim_1`` ...
    dims: tuple[str, ...] = ()
    #: The array's attributes (pairs, so that a Column stays hashable).
    attributes: tuple[tuple[str, Any], ...] = ()

    @property
    def dimension_names(self) -> tuple[str, ...]:
        return self.dims or ("event", *(f"dim_{i}" for i in range(len(self.shape))))

    @property
    def attrs(self) -> dict[str, Any] | None:
        """The array's attributes as written to its ``zarr.json`` (None: none)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.attributes} or None

    @property
    def chunk_events(self) -> int:
        if self.chunk > 0:
            return self.chunk
        size = _STRING_ITEM_BYTES if isinstance(self.dtype, np.dtypes.StringDType) \
            else np.dtype(self.dtype).itemsize
        return chunk_events(self.shape, size)


def stored_columns(specs: Mapping[str, FieldSpec], page: Page) -> list[Column]:
    """Every array of a descriptor, in a fixed order; ``page`` decides the dtype of
    array keys without a usable ``dtype_numpy``."""
    cols = [Column(TIME, np.dtype(np.float64), (), 0.0),
            Column(SEQ_NUM, np.dtype(np.int64), (), 0),
            Column(UID, STRING, (), "")]
    for key, spec in sorted(specs.items()):
        if spec.external or spec.variable or spec.kind == "string":
            cols.append(Column(data_path(key), STRING, (), ""))
        else:
            dtype = np.dtype(spec.dtype if spec.dtype is not None else page.data[key].dtype)
            cols.append(Column(data_path(key), dtype, spec.shape, fill_for(dtype)))
        cols.append(Column(timestamps_path(key), np.dtype(np.float64), (), 0.0))
        if spec.external:
            cols.append(Column(filled_path(key), np.dtype(np.bool_), (), False))
    return cols


def summary_kind(spec: FieldSpec, dtype: np.dtype[Any] | None = None) -> str | None:
    """"window" (in ``summary``), "event" (in ``event_summary``) or None (no summary):
    only real numbers (bool, int, uint, float) stored as numbers are summarised.
    ``dtype``: the column's, when the spec leaves it to the first page."""
    if spec.external or spec.variable or spec.kind == "string":
        return None
    dtype = spec.dtype if spec.dtype is not None else dtype
    if dtype is None or np.dtype(dtype).kind not in "biuf":
        return None
    if spec.shape == ():
        return "window"
    return "event" if math.prod(spec.shape) > 0 else None


def summary_length(rows: int) -> int:
    """Windows needed to summarise positions ``0 .. rows - 1``."""
    return -(-rows // SUMMARY_WINDOW)


def summary_keys(specs: Mapping[str, FieldSpec], page: Page) -> tuple[list[str], list[str]]:
    """The keys summarised per window and per event, sorted; ``page`` decides the dtype
    of array keys without a usable ``dtype_numpy``."""
    kinds = {key: summary_kind(spec, page.data[key].dtype if key in page.data else None)
             for key, spec in sorted(specs.items())}
    return ([k for k, kind in kinds.items() if kind == "window"],
            [k for k, kind in kinds.items() if kind == "event"])


def summary_columns(specs: Mapping[str, FieldSpec], page: Page) -> list[Column]:
    """The summary arrays of a descriptor (see the module's docstring): ``summary``
    and ``event_summary``, each when some key is summarised that way."""
    windows, events = summary_keys(specs, page)
    cols = []
    if windows:
        row = len(windows) * len(SUMMARY_FIELDS) * 8
        chunk = 1 << max(6, min(10, (_SUMMARY_CHUNK_BYTES // row).bit_length() - 1))
        cols.append(Column(SUMMARY, np.dtype(np.float64), (len(windows), len(SUMMARY_FIELDS)),
                           np.nan, chunk, ("window", "key", "field"),
                           (("keys", tuple(windows)), ("fields", SUMMARY_FIELDS),
                            ("window", SUMMARY_WINDOW))))
    if events:
        cols.append(Column(EVENT_SUMMARY, np.dtype(np.float64),
                           (len(events), len(EVENT_SUMMARY_FIELDS)), np.nan, 0,
                           ("event", "key", "field"),
                           (("keys", tuple(events)), ("fields", EVENT_SUMMARY_FIELDS))))
    return cols


def chunk_events(spec_shape: tuple[int, ...], itemsize: int) -> int:
    per_event = max(1, int(np.prod(spec_shape, dtype=np.int64)) * max(itemsize, 1))
    return int(max(1, min(_MAX_CHUNK_EVENTS, _CHUNK_TARGET_BYTES // per_event)))


def fill_for(dtype: np.dtype[Any]) -> Any:
    """The fill value of a numeric data column of ``dtype`` (rows never written)."""
    if dtype.kind == "f":
        return np.nan
    if dtype.kind == "c":
        return complex(np.nan, np.nan)
    if dtype.kind == "b":
        return False
    if dtype.kind in "SV":
        return None
    return 0
