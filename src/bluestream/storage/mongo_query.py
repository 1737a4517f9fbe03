"""Translate :mod:`bluestream.queries` objects into MongoDB filters on ``run_start``.

The backend-neutral reading of query objects (key checks, time bounds, partial uids,
full-text words) lives in :mod:`bluestream.storage.query_rules`, shared with SQLite.

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

from collections.abc import Callable, Sequence
from functools import singledispatch
from typing import Any

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
    TimeRange,
)
from bluestream.storage.query_rules import (
    COMPARISON_OPERATORS,
    check_comparable,
    check_key,
    check_partial_uids,
    check_scan_ids,
    compile_regex,
    escape_regex,
    full_text_words,
    time_bounds,
)

__all__ = ["FullTextRenderer", "to_mongo"]

Filter = dict[str, Any]
#: Renders one FullText query; the store swaps in its fallback when there is no $text.
FullTextRenderer = Callable[[FullText], Filter]

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
    scan_ids = check_scan_ids(q)
    if len(scan_ids) == 1:
        return {"scan_id": {"$eq": scan_ids[0]}}
    return {"scan_id": {"$in": list(scan_ids)}}


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
