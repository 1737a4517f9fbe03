"""Tiled's query objects (and bluesky-tiled-plugins' legacy ones) as bluestream queries.

Keys arrive as the client sends them: ``start.<key>`` (the plugin prefixes bare keys
with ``start.``) or ``stop.<key>``. ``start.`` is taken off (bluestream's queries are on
start documents); a ``stop.`` query becomes :class:`~bluestream.queries.OnStop` (runs
whose stop matches; open runs never do). A query type without a translation is refused
(400) with a message saying so: Tiled would otherwise answer every run.
"""

from __future__ import annotations

import re
from typing import Any

import bluesky_tiled_plugins.queries as legacy
from tiled import queries as tq
from tiled.utils import UnsupportedQueryType

from bluestream import queries as bq

__all__ = ["translate"]

_OPERATORS = {"lt": "lt", "le": "le", "gt": "gt", "ge": "ge"}


def _key(key: str) -> str:
    """The key within its document (``start.`` / ``stop.`` taken off)."""
    if key in ("start", "stop", ""):
        raise UnsupportedQueryType(f"query key {key!r} names a whole document")
    for prefix in ("start.", "stop."):
        if key.startswith(prefix):
            return key.removeprefix(prefix)
    return key  # a key without prefix is a start key (as bluesky-tiled-plugins reads it)


def _on_stop(key: str, query: bq.Query) -> bq.Query:
    """``query`` as asked of the stop document when the client's key says so."""
    return bq.OnStop(query) if str(key).startswith("stop.") else query


def _like(pattern: str) -> str:
    """SQL LIKE (``%`` any run, ``_`` one character) as an anchored regex."""
    out = []
    for ch in pattern:
        out.append(".*" if ch == "%" else "." if ch == "_" else re.escape(ch))
    return "^" + "".join(out) + "$"


def translate(query: Any) -> bq.Query | None:
    """The bluestream query for a Tiled query; None when it selects every run (a spec or
    structure-family filter every run passes)."""
    found = _translate(query)
    key = getattr(query, "key", None)
    if found is None or key is None:
        return found
    return _on_stop(key, found)


def _translate(query: Any) -> bq.Query | None:
    if isinstance(query, tq.Eq):
        return bq.Eq(_key(query.key), query.value)
    if isinstance(query, tq.NotEq):
        return bq.NotEq(_key(query.key), query.value)
    if isinstance(query, tq.Comparison):
        op = getattr(query.operator, "value", query.operator)
        if op not in _OPERATORS:
            raise UnsupportedQueryType(f"comparison operator {op!r}")
        return bq.Comparison(_OPERATORS[op], _key(query.key), query.value)
    if isinstance(query, tq.In):
        return bq.In(_key(query.key), list(query.value))
    if isinstance(query, tq.NotIn):
        return bq.NotIn(_key(query.key), list(query.value))
    if isinstance(query, tq.Contains):
        return bq.Contains(_key(query.key), query.value)
    if isinstance(query, tq.Regex):
        try:
            re.compile(query.pattern)
        except re.error as exc:
            raise tq.QueryValueError(f"not a valid regular expression: {exc}") from None
        return bq.Regex(_key(query.key), query.pattern, bool(query.case_sensitive))
    if isinstance(query, tq.FullText):
        return bq.FullText(query.text)
    if isinstance(query, tq.KeyPresent):
        return bq.Raw({_key(query.key): {"$exists": bool(query.exists)}})
    if isinstance(query, tq.Like):
        key = _key(query.key)
        pattern = str(query.pattern)
        head = pattern[:-1]
        if (key == "uid" and not str(query.key).startswith("stop.")
                and pattern.endswith("%") and not any(c in head for c in "%_")):
            return bq.PartialUID(head)
        return bq.Regex(key, _like(pattern))
    if isinstance(query, tq.KeysFilter):
        return bq.In("uid", list(query.keys))
    if isinstance(query, tq.SpecsQuery):
        if set(query.include) <= {"BlueskyRun"} and "BlueskyRun" not in set(query.exclude):
            return None
        return bq.In("uid", [])
    if isinstance(query, tq.StructureFamilyQuery):
        family = getattr(query.value, "value", query.value)
        return None if family == "container" else bq.In("uid", [])
    # What older clients of bluesky-tiled-plugins send (databroker's query kinds).
    if isinstance(query, legacy._ScanID):
        duplicates = getattr(query.duplicates, "value", query.duplicates)
        return bq.ScanID(*query.scan_ids, duplicates=duplicates)
    if isinstance(query, legacy._PartialUID):
        return bq.PartialUID(*query.partial_uids)
    if isinstance(query, legacy.ScanIDRange):
        return bq.And(bq.Comparison("ge", "scan_id", query.start_id),
                      bq.Comparison("lt", "scan_id", query.end_id))
    if isinstance(query, legacy.TimeRange):
        return bq.TimeRange(query.since, query.until, query.timezone)
    raise UnsupportedQueryType(f"{type(query).__name__} queries are not supported by "
                               "bluestream's catalog")
