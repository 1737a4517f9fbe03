"""Typed decoding of the common documents: msgspec checks the schema while it parses.

Events and event pages are nearly every message, and for them a generic msgpack
decode followed by a JSON-schema call cost ~8 µs of the ~14 µs an event took before it
was routed. msgspec's msgpack decoder, given a struct per document kind, refuses a
wrong type, a missing field or an unknown one in C while it builds the document.

event-model's schemas stay the definition of valid. The structs below accept a
*subset* of what the schemas accept (scalar data values only, no numpy values, no
``1.0`` for an integer, string keys only); whatever they refuse goes the general way
(:func:`bluestream.consumers.decode.decode_message` and
:func:`bluestream.schemas.validate.validate`), which gives the verdict and the error
message. So a document is accepted by the fast path only if the schema accepts it,
and refused only by the general path. ``tests/test_typed_decode.py`` checks both on a
corpus of valid documents and of every bad-input class against event-model's own
validator, and checks the structs' fields against the schemas.

What the fast path gives is the same document as the general one, except that an
integer ``time`` or timestamp arrives as a float (both are stored as float64), and that
an event page's columns of msgpack doubles arrive as float64 arrays: a page is already
columnar, so such a column (every entry a 9-byte float64) is converted by numpy in one
step (a strided view of the bytes, copied to native order) instead of building a Python
float per entry and an array from them (:func:`float_column`). Columns of anything else
are decoded as lists and checked as before.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np

__all__ = ["STRUCTS", "decode_typed", "float_column"]

Scalar = float | int | str | bool


class Event(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    descriptor: str
    seq_num: int
    uid: str
    time: float
    data: dict[str, Scalar]
    timestamps: dict[str, float]
    filled: dict[str, bool | str] | msgspec.UnsetType = msgspec.UNSET


class EventPage(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """The columns are checked by :func:`_event_page` (``seq_num``: list[int],
    ``time``: list[float], ``data``: list[Scalar], ``timestamps``: list[float] each)."""

    descriptor: str
    seq_num: msgspec.Raw
    uid: list[str]
    time: msgspec.Raw
    data: dict[str, msgspec.Raw]
    timestamps: dict[str, msgspec.Raw]
    filled: dict[str, list[bool | str]] | msgspec.UnsetType = msgspec.UNSET


#: Document kind -> the struct that decodes it (kinds not here go the general way).
STRUCTS: dict[str, type[msgspec.Struct]] = {"event": Event, "event_page": EventPage}

_OUTER = msgspec.msgpack.Decoder(tuple[str, msgspec.Raw])
_ASDICT = msgspec.structs.asdict


def _event(raw: msgspec.Raw) -> dict[str, Any] | None:
    doc = _ASDICT(_EVENT.decode(raw))
    if doc["filled"] is msgspec.UNSET:
        del doc["filled"]
    # A non-finite time is refused by validate() with its own reason: go that way.
    return doc if math.isfinite(doc["time"]) else None


_BIG_F64 = np.dtype(">f8")
_F64_MARKER = b"\xcb"


def float_column(raw: msgspec.Raw | bytes) -> np.ndarray | None:
    """The msgpack array ``raw`` as a float64 array if every entry is a msgpack double
    (0xcb and 8 big-endian bytes: what Python floats pack to); None for anything else
    (the caller decodes it)."""
    data = bytes(raw)
    size = len(data)
    if not size:
        return None
    head = data[0]
    if 0x90 <= head <= 0x9F:
        n, start = head & 0x0F, 1
    elif head == 0xDC and size >= 3:
        n, start = int.from_bytes(data[1:3], "big"), 3
    elif head == 0xDD and size >= 5:
        n, start = int.from_bytes(data[1:5], "big"), 5
    else:
        return None
    if not n or size != start + 9 * n or data[start::9] != _F64_MARKER * n:
        return None
    return np.ndarray((n,), _BIG_F64, data, start + 1, (9,)).astype(np.float64)


def _column(raw: msgspec.Raw, as_list: msgspec.msgpack.Decoder[Any]) -> Any:
    """A page column: float64 array when it is all doubles, else ``as_list``'s list."""
    column = float_column(raw)
    return as_list.decode(raw) if column is None else column


def _event_page(raw: msgspec.Raw) -> dict[str, Any] | None:
    page = _EVENT_PAGE.decode(raw)
    doc: dict[str, Any] = {
        "descriptor": page.descriptor, "seq_num": _INT_LIST.decode(page.seq_num),
        "uid": page.uid, "time": _column(page.time, _FLOAT_LIST),
        "data": {k: _column(v, _SCALAR_LIST) for k, v in page.data.items()},
        "timestamps": {k: _column(v, _FLOAT_LIST) for k, v in page.timestamps.items()}}
    if page.filled is not msgspec.UNSET:
        doc["filled"] = page.filled
    return doc


_FLOAT_LIST = msgspec.msgpack.Decoder(list[float])
_SCALAR_LIST = msgspec.msgpack.Decoder(list[Scalar])
_INT_LIST = msgspec.msgpack.Decoder(list[int])
_EVENT = msgspec.msgpack.Decoder(Event)
_EVENT_PAGE = msgspec.msgpack.Decoder(EventPage)
_DECODERS: dict[str, Callable[[msgspec.Raw], dict[str, Any] | None]] = {
    "event": _event, "event_page": _event_page}


def decode_typed(value: bytes) -> tuple[str, dict[str, Any]] | None:
    """``(name, doc)`` if ``value`` is a msgpack event or event page that the schema
    accepts and the fast path can prove it; None for everything else (undecided: the
    general path decides)."""
    try:
        name, raw = _OUTER.decode(value)
        decode = _DECODERS.get(name)
        if decode is None:
            return None
        doc = decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None
    return None if doc is None else (name, doc)
