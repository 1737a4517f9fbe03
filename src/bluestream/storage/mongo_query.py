"""Translate :mod:`bluestream.queries` objects into MongoDB filters on ``run_start``.

The module also holds the small pure helpers every backend shares (key validation, time
parsing, partial-uid and full-text checks), so the SQLite translator reads the query
objects exactly the way this one does and the two backends cannot drift apart.

Semantics (the conformance suite holds the SQLite backend to the same answers):

- ``Eq`` / ``In`` / ``Comparison`` follow MongoDB: on a list field they match when any
  element matches (or when the whole list equals the value, for ``Eq``).
- ``Contains(key, v)``: the list at ``key`` has an element equal to ``v``, or, when ``v``
  is a string and the field is a string (not a list), ``v`` is a substring of it.
- ``Regex`` searches (not anchored) string values, or the string elements of a list.
- ``FullText``: every word must occur (case-insensitive). With a MongoDB text index the
  words are matched as whole words (quoted ``$text`` phrases); the fallback used when
  the server has no ``$text`` (see :class:`~bluestream.storage.mongo.MongoMetadataStore`)
  and the SQLite backend match substrings. Search whole words to get the same answers.
- Values are compared with ``$eq`` (never spliced in as bare values), so a dict value can
  never be read as an operator.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, tzinfo
from functools import singledispatch
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from bluestream.queries import (
    And,
    Comparison,
    Contains,
    Eq,
    FullText,
    In,
    NotEq,
    NotIn,
    PartialUID,
    Query,
    Raw,
    Regex,
    ScanID,
    TimeLike,
    TimeRange,
)

__all__ = [
    "COMPARISON_OPERATORS",
    "MIN_PARTIAL_UID",
    "check_comparable",
    "check_key",
    "check_partial_uids",
    "compile_regex",
    "epoch_seconds",
    "escape_regex",
    "full_text_words",
    "time_bounds",
    "to_mongo",
]

Filter = dict[str, Any]
#: Renders one FullText query; the store swaps in its fallback when there is no $text.
FullTextRenderer = Callable[[FullText], Filter]

MIN_PARTIAL_UID = 5
#: Comparison.operator -> MongoDB operator.
COMPARISON_OPERATORS = {"lt": "$lt", "le": "$lte", "gt": "$gt", "ge": "$gte",
                        "eq": "$eq", "ne": "$ne"}

# Dotted keys: segments of letters, digits, "_" and "-". Anything else (quotes, "$",
# brackets, spaces) could change the meaning of a JSON path or a Mongo filter.
_SEGMENT = re.compile(r"[A-Za-z0-9_-]{1,128}")
_MAX_KEY_SEGMENTS = 16
_REGEX_META = re.compile(r"([\\^$.|?*+()\[\]{}])")
_PARTIAL_FORMATS = ("%Y", "%Y-%m")


# -- shared helpers ----------------------------------------------------------------------


def check_key(key: str) -> list[str]:
    """Split a dotted key into segments, rejecting anything outside the safe charset."""
    segments = key.split(".") if isinstance(key, str) else []
    if not segments or len(segments) > _MAX_KEY_SEGMENTS or not all(
        _SEGMENT.fullmatch(s) for s in segments
    ):
        raise ValueError(
            f"invalid query key {key!r}: use dotted names made of letters, digits, "
            "'_' and '-' (for example 'sample.name')"
        )
    return segments


def check_partial_uids(q: PartialUID) -> tuple[str, ...]:
    """The prefixes of a PartialUID, each at least :data:`MIN_PARTIAL_UID` characters."""
    if not q.partial_uids:
        raise ValueError("PartialUID needs at least one partial uid")
    for p in q.partial_uids:
        if not isinstance(p, str) or len(p) < MIN_PARTIAL_UID:
            raise ValueError(
                f"partial uid {p!r} is too short: give at least {MIN_PARTIAL_UID} "
                "characters so that it is unlikely to match many runs"
            )
    return q.partial_uids


def full_text_words(q: FullText) -> list[str]:
    """The lower-cased words of a FullText query (whitespace-separated)."""
    words = str(q.text).lower().split()
    if not words:
        raise ValueError("FullText needs at least one word")
    return words


def escape_regex(text: str) -> str:
    """Escape regex metacharacters portably (PCRE, Java and Python read it the same)."""
    return _REGEX_META.sub(r"\\\1", text)


def compile_regex(pattern: str, flags: str = "") -> re.Pattern[str]:
    """Check that a pattern compiles, so a bad one fails as ValueError in every backend."""
    if not isinstance(pattern, str):
        raise ValueError(f"regex pattern must be a string, not {type(pattern).__name__}")
    py_flags = 0
    for f in flags:
        try:
            py_flags |= {"i": re.I, "m": re.M, "s": re.S, "x": re.X}[f]
        except KeyError:
            raise ValueError(f"unsupported regex option {f!r}: use i, m, s or x") from None
    try:
        return re.compile(pattern, py_flags)
    except re.error as exc:
        raise ValueError(f"invalid regex {pattern!r}: {exc}") from None


def check_comparable(q: Comparison) -> None:
    """Order comparisons are portable for numbers and strings only."""
    if q.operator not in COMPARISON_OPERATORS:
        raise ValueError(
            f"unknown comparison operator {q.operator!r}: use one of "
            + ", ".join(COMPARISON_OPERATORS)
        )
    ordered = q.operator in ("lt", "le", "gt", "ge")
    if ordered and (isinstance(q.value, bool) or not isinstance(q.value, int | float | str)):
        raise ValueError(
            f"Comparison {q.operator!r} on {q.key!r} needs a number or a string, "
            f"got {type(q.value).__name__}"
        )


def _zone(name: str | None) -> tzinfo | None:
    if name is None:
        return None
    if name.upper() in ("UTC", "Z"):
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (use an IANA name like "
                         "'Europe/Berlin' or 'UTC')") from None


def _parse_time_string(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text.strip())
    except ValueError:
        pass
    for fmt in _PARTIAL_FORMATS:
        try:
            return datetime.strptime(text.strip(), fmt)
        except ValueError:
            continue
    raise ValueError(
        f"cannot read {text!r} as a time: use an ISO date or time such as '2024-05-01', "
        "'2024-05-01 13:30' or '2024-05-01T13:30:00+02:00', epoch seconds, or a datetime"
    )


def epoch_seconds(value: TimeLike, timezone: str | None = None) -> float | None:
    """A TimeRange bound as epoch seconds.

    Naive times (strings without an offset, naive datetimes) are read in ``timezone``,
    or in the machine's local zone when it is None, as databroker does.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("a time bound cannot be a bool")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        value = _parse_time_string(value)
    if not isinstance(value, datetime):
        raise ValueError(f"cannot use {type(value).__name__} as a time bound")
    if value.tzinfo is None:
        zone = _zone(timezone)
        value = value.astimezone() if zone is None else value.replace(tzinfo=zone)
    return value.timestamp()


def time_bounds(q: TimeRange) -> tuple[float | None, float | None]:
    """``(since, until)`` in epoch seconds; ``until`` is exclusive."""
    _zone(q.timezone)  # validate even when both bounds are epoch numbers
    return epoch_seconds(q.since, q.timezone), epoch_seconds(q.until, q.timezone)


# -- translation -------------------------------------------------------------------------


def _native_full_text(q: FullText) -> Filter:
    """``$text`` with every word quoted: quoted phrases must all occur (logical AND)."""
    words = full_text_words(q)
    return {"$text": {"$search": " ".join(f'"{w}"' for w in words)}}


def to_mongo(q: Query | None, *, full_text: FullTextRenderer | None = None) -> Filter:
    """A MongoDB filter on ``run_start`` for ``q`` (``{}`` for no query).

    ``full_text`` renders :class:`FullText` queries; by default they become ``$text``.
    Raises ValueError for queries that no backend could answer (bad keys, short
    partial uids, bad regexes).
    """
    if q is None:
        return {}
    return _translate(q, full_text or _native_full_text)


@singledispatch
def _translate(q: Query, full_text: FullTextRenderer) -> Filter:
    raise ValueError(f"unsupported query type {type(q).__name__}")


@_translate.register
def _(q: TimeRange, full_text: FullTextRenderer) -> Filter:
    since, until = time_bounds(q)
    cond: Filter = {}
    if since is not None:
        cond["$gte"] = since
    if until is not None:
        cond["$lt"] = until
    return {"time": cond} if cond else {}


@_translate.register
def _(q: ScanID, full_text: FullTextRenderer) -> Filter:
    if not q.scan_ids:
        raise ValueError("ScanID needs at least one scan id")
    if len(q.scan_ids) == 1:
        return {"scan_id": {"$eq": q.scan_ids[0]}}
    return {"scan_id": {"$in": list(q.scan_ids)}}


@_translate.register
def _(q: PartialUID, full_text: FullTextRenderer) -> Filter:
    parts = [{"uid": {"$regex": "^" + escape_regex(p)}} for p in check_partial_uids(q)]
    return parts[0] if len(parts) == 1 else {"$or": parts}


@_translate.register
def _(q: Eq, full_text: FullTextRenderer) -> Filter:
    check_key(q.key)
    return {q.key: {"$eq": q.value}}


@_translate.register
def _(q: NotEq, full_text: FullTextRenderer) -> Filter:
    check_key(q.key)
    return {q.key: {"$ne": q.value}}


@_translate.register
def _(q: In, full_text: FullTextRenderer) -> Filter:
    check_key(q.key)
    return {q.key: {"$in": list(q.values)}}


@_translate.register
def _(q: NotIn, full_text: FullTextRenderer) -> Filter:
    check_key(q.key)
    return {q.key: {"$nin": list(q.values)}}


@_translate.register
def _(q: Contains, full_text: FullTextRenderer) -> Filter:
    check_key(q.key)
    in_list: Filter = {q.key: {"$elemMatch": {"$eq": q.value}}}
    if not isinstance(q.value, str):
        return in_list
    # Not on lists: $regex would search their string elements too.
    substring = _regex_filter(q.key, escape_regex(q.value), "", {"$not": {"$type": "array"}})
    return {"$or": [in_list, substring]}


@_translate.register
def _(q: Regex, full_text: FullTextRenderer) -> Filter:
    check_key(q.key)
    options = "" if q.case_sensitive else "i"
    compile_regex(q.pattern, options)
    return _regex_filter(q.key, q.pattern, options, {"$type": "string"})


def _regex_filter(key: str, pattern: str, options: str, guard: Filter) -> Filter:
    """``$regex`` plus a type guard, as separate clauses of an ``$and``.

    On MongoDB the ``{"$type": "string"}`` guard changes nothing ($regex never matches
    numbers); it is there because some MongoDB-wire servers (mongo-java-server) match
    the decimal text of numbers, and they also ignore operators written next to
    ``$regex`` in one document, hence the separate clauses.
    """
    cond: Filter = {"$regex": pattern}
    if options:
        cond["$options"] = options
    return {"$and": [{key: guard}, {key: cond}]}


@_translate.register
def _(q: FullText, full_text: FullTextRenderer) -> Filter:
    return full_text(q)


@_translate.register
def _(q: Comparison, full_text: FullTextRenderer) -> Filter:
    check_key(q.key)
    check_comparable(q)
    return {q.key: {COMPARISON_OPERATORS[q.operator]: q.value}}


@_translate.register
def _(q: Raw, full_text: FullTextRenderer) -> Filter:
    # Passed through untouched: a raw filter is the caller's own MongoDB query.
    return dict(q.filter)


@_translate.register
def _(q: And, full_text: FullTextRenderer) -> Filter:
    children = _merge_full_text(q.queries) if full_text is _native_full_text else q.queries
    parts = [p for p in (_translate(c, full_text) for c in children) if p]
    if not parts:
        return {}
    return parts[0] if len(parts) == 1 else {"$and": parts}


def _merge_full_text(queries: Sequence[Query]) -> list[Query]:
    """MongoDB allows one ``$text`` per query: fold several FullText into one (AND)."""
    texts = [q for q in queries if isinstance(q, FullText)]
    rest = [q for q in queries if not isinstance(q, FullText)]
    if len(texts) <= 1:
        return list(queries)
    return [*rest, FullText(" ".join(t.text for t in texts))]
