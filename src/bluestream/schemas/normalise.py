"""Events <-> column pages, and numpy -> JSON for metadata documents. Pure, no I/O.

Why pages: events are stored by position, one column per data key (DESIGN I2), so
the unit a writer can store in one assignment is a page of columns whose shapes and
dtypes are already checked against the descriptor's :class:`~bluestream.layout.FieldSpec`
(how each key is typed is defined once, in :mod:`bluestream.layout`). Every check that
depends on a size taken from a document runs *before* anything is allocated from that
size (DESIGN I5).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import numpy as np
from numpy.typing import NDArray

from bluestream.errors import LimitExceeded, Reason, ValidationError
from bluestream.layout import STRING, FieldSpec, Page, reader_specs
from bluestream.limits import Limits

__all__ = [
    "datum_page_to_datums",
    "page_from_event_page",
    "page_from_events",
    "page_from_typed_events",
    "page_to_event_page",
    "page_to_events",
    "to_jsonable",
]

Array = NDArray[Any]

_DEFAULT_LIMITS = Limits()


# -- pages ----------------------------------------------------------------------------------
@dataclass
class _Columns:
    """A page before conversion: per-key sequences (lists or arrays) of n values."""

    descriptor: Any
    uid: Any
    seq_num: Any
    time: Any
    data: Mapping[str, Any]
    timestamps: Mapping[str, Any]
    filled: Mapping[str, Any]


def page_from_events(events: Sequence[Mapping[str, Any]], specs: Mapping[str, FieldSpec],
                     limits: Limits = _DEFAULT_LIMITS) -> Page:
    """Batch events of one descriptor into a page, checking them like an event page.

    The number of events is the caller's batching choice, not a document's, so
    ``limits.max_page_events`` is not applied here; seq_num limits are.
    """
    if not events:
        raise ValidationError("no events to make a page of", reason=Reason.EMPTY_PAGE)
    descriptor = events[0].get("descriptor")
    keys = set(specs)
    external = {k for k, s in specs.items() if s.external}
    for event in events:
        if event.get("descriptor") != descriptor:
            raise ValidationError(f"event {event.get('uid')!r} belongs to descriptor "
                                  f"{event.get('descriptor')!r}, not {descriptor!r}",
                                  reason=Reason.DESCRIPTOR_MISMATCH)
        for where in ("data", "timestamps"):
            if _mapping(event, where).keys() != keys:
                _same_keys(where, event[where].keys(), keys)
        filled = event.get("filled") or {}
        if not isinstance(filled, Mapping) or not filled.keys() <= external:
            _filled_keys_error(filled, external)
    cols = _Columns(
        descriptor=descriptor,
        uid=[e.get("uid") for e in events],
        seq_num=[e.get("seq_num") for e in events],
        time=[e.get("time") for e in events],
        data={k: [e["data"][k] for e in events] for k in keys},
        timestamps={k: [e["timestamps"][k] for e in events] for k in keys},
        filled={k: [(e.get("filled") or {}).get(k, False) for e in events] for k in external},
    )
    return _build(cols, specs, limits)


def page_from_typed_events(events: Sequence[Mapping[str, Any]],
                           specs: Mapping[str, FieldSpec], limits: Limits) -> Page | None:
    """:func:`page_from_events` for the common case, without per-event Python per key:
    events from the typed decoder (scalar data values, float timestamps) of a
    descriptor whose keys are all float scalars. Each event contributes one tuple of
    values and one of timestamps; numpy converts them all at once. None when anything
    is out of the ordinary (a string value, keys that differ, ...): the caller then uses
    :func:`page_from_events`, which gives the verdict and the error message."""
    keys = tuple(specs)
    if not keys or not all(s.kind == "number" and s.dtype is not None and s.dtype.kind == "f"
                           and not s.external and not s.variable and s.shape == ()
                           for s in specs.values()):
        return None
    descriptor = events[0].get("descriptor")
    keyset = set(keys)
    row = itemgetter(*keys) if len(keys) > 1 else (lambda d: (d[keys[0]],))
    values, stamps = [], []
    for event in events:
        data, times = event["data"], event["timestamps"]
        if data.keys() != keyset or times.keys() != keyset or event.get("filled") or \
                event["descriptor"] != descriptor:
            return None
        values.append(row(data))
        stamps.append(row(times))
    try:
        table = np.array(values)
        seq_num = np.array([e["seq_num"] for e in events], dtype=np.int64)
    except (ValueError, OverflowError, TypeError):
        return None
    time = np.array([e["time"] for e in events], dtype=np.float64)
    stamp_table = np.array(stamps, dtype=np.float64)
    if table.dtype.kind != "f" or table.shape != (len(events), len(keys)) or \
            seq_num.min() < 1 or seq_num.max() > limits.max_seq_num or \
            not np.isfinite(time).all() or not np.isfinite(stamp_table).all():
        return None
    data_cols: dict[str, Array] = {}
    for j, key in enumerate(keys):
        dtype = specs[key].dtype
        assert dtype is not None
        data_cols[key] = _cast(f"data[{key!r}]", np.ascontiguousarray(table[:, j]), dtype)
    return Page(
        descriptor=str(descriptor),
        uid=np.array([e["uid"] for e in events], dtype=STRING),
        seq_num=seq_num,
        time=time,
        data=data_cols,
        timestamps={k: np.ascontiguousarray(stamp_table[:, j]) for j, k in enumerate(keys)},
        filled={},
    )


def page_from_event_page(doc: Mapping[str, Any], specs: Mapping[str, FieldSpec],
                         limits: Limits) -> Page:
    """Normalise an event_page document; lengths are checked before any conversion."""
    uid = doc.get("uid")
    n = _length(uid)
    if n > limits.max_page_events:
        raise LimitExceeded(f"event_page has {n} events, more than the limit "
                            f"{limits.max_page_events}")
    if n <= 0:
        raise ValidationError("event_page has no events (or no uid list)", reason=Reason.EMPTY_PAGE)
    data, timestamps = _mapping(doc, "data"), _mapping(doc, "timestamps")
    filled = doc.get("filled") or {}
    external = {k for k, s in specs.items() if s.external}
    _same_keys("data", data.keys(), specs.keys())
    _same_keys("timestamps", timestamps.keys(), specs.keys())
    if not isinstance(filled, Mapping) or not filled.keys() <= external:
        _filled_keys_error(filled, external)
    columns = {"seq_num": doc.get("seq_num"), "time": doc.get("time")}
    columns.update({f"data[{k!r}]": v for k, v in data.items()})
    columns.update({f"timestamps[{k!r}]": v for k, v in timestamps.items()})
    columns.update({f"filled[{k!r}]": v for k, v in filled.items()})
    for name, column in columns.items():
        length = _length(column)
        if length != n:
            raise ValidationError(f"event_page {name} has {length} entries, uid has {n}",
                                  reason=Reason.PAGE_LENGTH_MISMATCH)
    cols = _Columns(doc.get("descriptor"), uid, doc.get("seq_num"), doc.get("time"), data,
                    timestamps, {k: filled.get(k, [False] * n) for k in external})
    return _build(cols, specs, limits)


def _length(column: Any) -> int:
    """Entries of a page column; -1 for anything that is not a list or a 1+-d array."""
    if isinstance(column, np.ndarray):
        return int(column.shape[0]) if column.ndim else -1
    return len(column) if isinstance(column, list | tuple) else -1


def _mapping(doc: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = doc.get(key)
    if not isinstance(value, Mapping):
        raise ValidationError(f"{key} is not a mapping", reason=Reason.SCHEMA_VIOLATION)
    return value


def _same_keys(where: str, got: Iterable[str], want: Iterable[str]) -> None:
    got, want = set(got), set(want)
    if got != want:
        missing, extra = sorted(want - got), sorted(got - want)
        raise ValidationError(f"{where} keys differ from the descriptor's data_keys: "
                              f"missing {missing[:20]}, unexpected {extra[:20]}",
                              reason=Reason.DATA_KEYS_MISMATCH)


def _filled_keys_error(filled: Any, external: set[str]) -> None:
    extra = sorted(set(filled) - external) if isinstance(filled, Mapping) else filled
    raise ValidationError(f"filled names keys that are not external data keys: {extra!r:.200}",
                          reason=Reason.DATA_KEYS_MISMATCH)


def _build(cols: _Columns, specs: Mapping[str, FieldSpec], limits: Limits) -> Page:
    if not isinstance(cols.descriptor, str):
        raise ValidationError("events have no descriptor uid", reason=Reason.SCHEMA_VIOLATION)
    seq_num = _numbers("seq_num", cols.seq_num, np.dtype(np.int64), Reason.BAD_SEQ_NUM)
    if seq_num.min() < 1:
        raise ValidationError(f"seq_num {int(seq_num.min())} is below 1", reason=Reason.BAD_SEQ_NUM)
    if seq_num.max() > limits.max_seq_num:
        raise LimitExceeded(f"seq_num {int(seq_num.max())} exceeds the limit "
                            f"{limits.max_seq_num}")
    time = _numbers("time", cols.time, np.dtype(np.float64), Reason.BAD_TIME)
    if not np.isfinite(time).all():
        raise ValidationError("event time is not a finite number", reason=Reason.BAD_TIME)
    data: dict[str, Array] = {}
    filled: dict[str, Array] = {}
    for key, spec in specs.items():
        if spec.external:
            data[key], filled[key] = _references(key, cols.data[key], cols.filled[key])
        elif spec.variable:
            data[key] = _json_column(key, cols.data[key])
        elif spec.kind == "string":
            data[key] = _strings(f"data[{key!r}]", cols.data[key])
        elif spec.shape == ():
            data[key] = _scalars(key, spec, cols.data[key])
        else:
            data[key] = _arrays(key, spec, cols.data[key])
    return Page(
        descriptor=cols.descriptor,
        uid=_strings("uid", cols.uid),
        seq_num=seq_num,
        time=time,
        data=data,
        timestamps={k: _timestamps(k, v) for k, v in cols.timestamps.items()},
        filled=filled,
    )


# -- columns --------------------------------------------------------------------------------
def _mismatch(what: str, detail: str) -> ValidationError:
    return ValidationError(f"{what}: {detail}", reason=Reason.DTYPE_MISMATCH)


def _shape_error(key: str, want: tuple[int, ...], got: Any) -> ValidationError:
    return ValidationError(f"data key {key!r}: expected per-event shape {list(want)}, got {got}",
                           reason=Reason.SHAPE_MISMATCH)


def _scalar_array(what: str, column: Any) -> Array:
    """A 1-d array from a column of scalars, refusing nested values before converting."""
    if isinstance(column, np.ndarray):
        if column.ndim != 1:
            raise ValidationError(f"{what}: expected one scalar per event, got an array of "
                                  f"shape {list(column.shape)}", reason=Reason.SHAPE_MISMATCH)
        return column
    types = set(map(type, column))
    for t in types:
        if issubclass(t, np.ndarray):
            shapes = {v.shape for v in column if isinstance(v, np.ndarray)}
            if shapes != {()}:
                raise ValidationError(f"{what}: expected scalars, got arrays of shape "
                                      f"{sorted(map(list, shapes))[:3]}",
                                      reason=Reason.SHAPE_MISMATCH)
        elif issubclass(t, list | tuple):
            raise ValidationError(f"{what}: expected scalars, got a {t.__name__}",
                                  reason=Reason.SHAPE_MISMATCH)
        elif not issubclass(t, int | float | str | np.generic):  # bool is an int
            raise _mismatch(what, f"{t.__name__} is not a scalar value")
    try:
        return np.asarray(column)
    except (ValueError, OverflowError) as exc:
        raise _mismatch(what, str(exc)) from None


def _timestamps(key: str, column: Any) -> Array:
    what = f"timestamps[{key!r}]"
    stamps = _numbers(what, column, np.dtype(np.float64), Reason.DTYPE_MISMATCH)
    if not np.isfinite(stamps).all():
        raise ValidationError(f"{what} is not a finite number", reason=Reason.BAD_TIME)
    return stamps


def _numbers(what: str, column: Any, target: np.dtype[Any], reason: Reason) -> Array:
    arr = _scalar_array(what, column)
    if arr.dtype.kind == "b" and target.kind != "b":
        raise ValidationError(f"{what}: booleans are not numbers here", reason=reason)
    try:
        return _cast(what, arr, target)
    except ValidationError as exc:
        raise ValidationError(str(exc), reason=reason) from None


def _scalars(key: str, spec: FieldSpec, column: Any) -> Array:
    arr = _scalar_array(f"data[{key!r}]", column)
    return _inferred(f"data[{key!r}]", arr) if spec.dtype is None else \
        _cast(f"data[{key!r}]", arr, spec.dtype)


def _inferred(what: str, arr: Array) -> Array:
    """For "array" keys without dtype_numpy: any numeric dtype, in native byte order."""
    if arr.dtype.kind not in "biufc":
        raise _mismatch(what, f"values of dtype {arr.dtype} are not numeric (a dtype_numpy "
                        "in the descriptor would say what they should be)")
    return arr if arr.dtype.isnative else arr.astype(arr.dtype.newbyteorder("="))


def _strings(what: str, column: Any) -> Array:
    if isinstance(column, np.ndarray) and column.ndim == 1 and column.dtype.kind in "UT":
        return column.astype(STRING)
    values = list(column)
    if not all(isinstance(v, str) for v in values):
        bad = next(v for v in values if not isinstance(v, str))
        raise _mismatch(what, f"expected strings, got {type(bad).__name__}")
    return np.array(values, dtype=STRING)


def _cast(what: str, arr: Array, target: np.dtype[Any]) -> Array:
    """``arr`` as ``target``, refusing casts that would invent or lose values."""
    src = arr.dtype
    if src == target:
        return arr
    sk, tk = src.kind, target.kind
    allowed = {"b": "b", "i": "biuf", "u": "biuf", "f": "biuf", "c": "biufc"}
    if sk not in allowed.get(tk, ""):
        raise _mismatch(what, f"values of dtype {src} cannot be stored as {target}")
    if tk in "iu" and arr.size:
        _check_integers(what, arr, target)
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(target)
    if tk in "fc" and sk in "fc" and target.itemsize < src.itemsize and arr.size and \
            not (np.isfinite(out) | ~np.isfinite(arr)).all():
        raise _mismatch(what, f"values overflow {target}")
    return out


def _check_integers(what: str, arr: Array, target: np.dtype[Any]) -> None:
    info = np.iinfo(target)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or not (arr == np.trunc(arr)).all():
            raise _mismatch(what, f"non-integral values cannot be stored as {target}")
        low, high = float(info.min), float(info.max) + 1  # exact powers of two
        if arr.min() < low or arr.max() >= high:
            raise _mismatch(what, f"values out of range for {target}")
    elif arr.dtype.kind in "iu" and (int(arr.min()) < info.min or int(arr.max()) > info.max):
        raise _mismatch(what, f"values out of range for {target}")


def _arrays(key: str, spec: FieldSpec, column: Any) -> Array:
    """(n, *shape) from per-event arrays or nested lists; shapes checked before copying."""
    want = spec.shape
    what = f"data[{key!r}]"
    if isinstance(column, np.ndarray):
        if column.shape[1:] != want:
            raise _shape_error(key, want, list(column.shape[1:]))
        stacked = column
    else:
        parts = [_one_array(key, want, value) for value in column]
        kinds = {p.dtype.kind for p in parts}
        if not kinds <= set("biufc"):  # before stacking: np.stack would stringify numbers
            raise _mismatch(what, f"array values of dtype kinds {sorted(kinds)} are not numeric")
        stacked = np.stack(parts)
    return _inferred(what, stacked) if spec.dtype is None else _cast(what, stacked, spec.dtype)


def _one_array(key: str, want: tuple[int, ...], value: Any) -> Array:
    if isinstance(value, np.ndarray):
        if value.shape != want:
            raise _shape_error(key, want, list(value.shape))
        return value
    if not isinstance(value, list | tuple):
        raise _shape_error(key, want, f"a {type(value).__name__}")
    node: Any = value
    for depth, dim in enumerate(want):  # cheap: the first element of each level only
        if not isinstance(node, list | tuple) or len(node) != dim:
            got = len(node) if isinstance(node, list | tuple) else "a scalar"
            raise _shape_error(key, want, f"length {got} at depth {depth}")
        if dim == 0:
            break
        node = node[0]
    try:
        arr = np.asarray(value)
    except (ValueError, OverflowError, TypeError):
        raise _shape_error(key, want, "a ragged or mixed nested list") from None
    if arr.shape != want:
        raise _shape_error(key, want, list(arr.shape))
    return arr


def _json_column(key: str, column: Any) -> Array:
    return np.array([json.dumps(to_jsonable(v), separators=(",", ":")) for v in column],
                    dtype=STRING)


def _references(key: str, column: Any, flags: Any) -> tuple[Array, Array]:
    values, marks = list(column), [_is_filled(m) for m in flags]
    for value, mark in zip(values, marks, strict=True):
        if not isinstance(value, str):
            if mark:
                raise ValidationError(f"data key {key!r} is external but the event carries its "
                                      "filled value; only references are accepted",
                                      reason=Reason.UNSUPPORTED_FILLED_EXTERNAL)
            raise _mismatch(f"data[{key!r}]", f"external data must be a reference string, got "
                            f"{type(value).__name__}")
    return np.array(values, dtype=STRING), np.array(marks, dtype=np.bool_)


def _is_filled(mark: Any) -> bool:
    """``filled`` holds False (a reference), True, or the reference moved out of data."""
    return isinstance(mark, str) or (isinstance(mark, bool | np.bool_) and bool(mark))


# -- back to documents ----------------------------------------------------------------------
def page_to_event_page(page: Page, descriptor: Mapping[str, Any]) -> dict[str, Any]:
    """An event_page document equal to the page's input (for replay and export).

    Scalars come back as Python values, array fields as lists of per-event numpy arrays,
    JSON-stored fields decoded. The descriptor says which string columns hold JSON.
    """
    specs = reader_specs(descriptor)
    return {
        "descriptor": page.descriptor,
        "uid": page.uid.tolist(),
        "seq_num": page.seq_num.tolist(),
        "time": page.time.tolist(),
        "data": {k: _export(v, specs.get(k)) for k, v in page.data.items()},
        "timestamps": {k: v.tolist() for k, v in page.timestamps.items()},
        "filled": {k: v.tolist() for k, v in page.filled.items()},
    }


def page_to_events(page: Page, descriptor: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Event documents equal to the page's input (see :func:`page_to_event_page`)."""
    doc = page_to_event_page(page, descriptor)
    data, stamps, filled = doc["data"], doc["timestamps"], doc["filled"]
    return [
        {
            "descriptor": page.descriptor,
            "uid": uid,
            "seq_num": seq_num,
            "time": time,
            "data": {k: v[i] for k, v in data.items()},
            "timestamps": {k: v[i] for k, v in stamps.items()},
            "filled": {k: v[i] for k, v in filled.items()},
        }
        for i, (uid, seq_num, time) in enumerate(zip(doc["uid"], doc["seq_num"], doc["time"],
                                                     strict=True))
    ]


def _export(column: Array, spec: FieldSpec | None) -> list[Any]:
    if spec is not None and spec.variable:
        return [json.loads(text) for text in column.tolist()]
    if column.ndim == 1:
        return column.tolist()  # type: ignore[no-any-return]
    return list(column)


# -- metadata documents ---------------------------------------------------------------------
_ATOMS = frozenset({str, float, bool, type(None)})  # int: range-checked


def to_jsonable(obj: Any) -> Any:
    """A copy of ``obj`` made of JSON types only (numpy scalars and arrays converted).

    Metadata documents are stored as plain values (MongoDB, SQLite JSON). Containers
    are always copied, so the result never shares mutable state with the input.
    Raises ValidationError (``not-jsonable``) for values with no JSON form, and for
    integers beyond 64 bits (``int-out-of-range``: neither store can hold them, and a
    document a store refuses must be refused here, not retried as an outage).
    """
    kind = type(obj)
    if kind in _ATOMS:
        return obj
    if kind is int:
        return _int64(obj)
    if kind is dict or isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if type(key) is not str:
                key = _json_key(key)
            out[key] = value if type(value) in _ATOMS else to_jsonable(value)
        return out
    if kind is list or kind is tuple:
        return [v if type(v) in _ATOMS else to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind == "u" and obj.dtype.itemsize == 8 and obj.size:
            _int64(int(obj.max()))
        if obj.dtype.kind in "biufUT":
            return obj.tolist()
        if obj.dtype.kind in "OV":
            return to_jsonable(obj.tolist())
    elif isinstance(obj, np.generic):
        value = obj.item()
        if type(value) is int:
            return _int64(value)
        if type(value) in _ATOMS:
            return value
        if isinstance(value, tuple):  # a structured (void) scalar
            return to_jsonable(value)
    elif isinstance(obj, str):  # subclasses of the atoms, e.g. StrEnum, IntEnum
        return str(obj)
    elif isinstance(obj, int):
        return _int64(int(obj))
    elif isinstance(obj, float):
        return float(obj)
    raise ValidationError(f"a value of type {kind.__name__} cannot be stored as JSON",
                          reason=Reason.NOT_JSONABLE)


def _int64(value: int) -> int:
    if -2**63 <= value < 2**63:
        return value
    raise ValidationError(f"integer {value} does not fit in 64 bits (the metadata stores "
                          "hold 64-bit integers)", reason=Reason.INT_OUT_OF_RANGE)


def _json_key(key: Any) -> str:
    if isinstance(key, str):
        return str(key)
    raise ValidationError(f"mapping key {key!r:.80} is not a string", reason=Reason.NOT_JSONABLE)


def datum_page_to_datums(doc: Mapping[str, Any],
                         limits: Limits = _DEFAULT_LIMITS) -> list[dict[str, Any]]:
    """The datum documents of a datum_page, in order.

    event-model's ``unpack_datum_page`` zips the columns and so silently drops the tail
    of a column that is too long; here unequal lengths are an error.
    """
    ids = doc.get("datum_id")
    kwargs = doc.get("datum_kwargs")
    if _length(ids) < 0 or not isinstance(kwargs, Mapping):
        raise ValidationError("datum_page needs a datum_id list and a datum_kwargs mapping",
                              reason=Reason.SCHEMA_VIOLATION)
    n = _length(ids)
    if n > limits.max_page_events:
        raise LimitExceeded(f"datum_page has {n} datums, more than the limit "
                            f"{limits.max_page_events}")
    columns = {}
    for key, column in kwargs.items():
        if _length(column) != n:
            raise ValidationError(f"datum_page datum_kwargs[{key!r}] does not have {n} entries",
                                  reason=Reason.PAGE_LENGTH_MISMATCH)
        columns[key] = column.tolist() if isinstance(column, np.ndarray) else list(column)
    id_list = ids.tolist() if isinstance(ids, np.ndarray) else list(ids or ())
    return [
        {"resource": doc.get("resource"), "datum_id": datum_id,
         "datum_kwargs": {k: v[i] for k, v in columns.items()}}
        for i, datum_id in enumerate(id_list)
    ]
