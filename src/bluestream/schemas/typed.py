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
integer ``time`` or timestamp arrives as a float (both are stored as float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import msgspec

__all__ = ["STRUCTS", "decode_typed"]

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
    descriptor: str
    seq_num: list[int]
    uid: list[str]
    time: list[float]
    data: dict[str, list[Scalar]]
    timestamps: dict[str, list[float]]
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


def _event_page(raw: msgspec.Raw) -> dict[str, Any] | None:
    doc = _ASDICT(_EVENT_PAGE.decode(raw))
    if doc["filled"] is msgspec.UNSET:
        del doc["filled"]
    return doc


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
