"""Translate :mod:`bluestream.queries` objects into a SQLite ``WHERE`` clause.

The clause is written against the columns of the SQLite store's ``run_start`` table:
``uid``, ``time``, ``scan_id``, ``search_text`` (lower-cased string values, for
FullText) and ``query_doc`` (the start document as strict JSON, read with SQLite's
JSON functions). Values and JSON paths are always bound parameters; keys are checked
against a safe charset first (:func:`~bluestream.storage.mongo_query.check_key`).

The semantics are MongoDB's (see :mod:`bluestream.storage.mongo_query`), so both
backends give the same answers: a predicate on a list field matches when any element
matches; ``Eq`` with ``None`` also matches a missing field; numbers never equal
strings or booleans. Known differences, outside the portable subset: a dotted key does
not reach *through* a list of objects (``"a.b"`` when ``a`` is a list), an all-digit
segment is always a list index, and whole-list equality compares JSON text, so
``[1]`` and ``[1.0]`` differ. Regexes run in Python's :mod:`re` (MongoDB uses PCRE);
the common syntax is the same.

Connections must have :func:`register_functions` applied (for ``bs_regexp``).
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache, singledispatch
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
    check_comparable,
    check_key,
    check_partial_uids,
    check_scan_ids,
    compile_regex,
    full_text_words,
    time_bounds,
)

__all__ = ["PORTABLE_RAW_OPERATORS", "finite", "json_path", "register_functions", "to_sql",
           "uid_prefix"]

Frag = tuple[str, list[Any]]
#: Builds a predicate over one JSON value given its (type, value) SQL expressions.
Pred = Callable[[Frag, Frag], Frag]

PORTABLE_RAW_OPERATORS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin",
                          "$exists", "$regex", "$and", "$or")
_DOC = "query_doc"
_SQL_OPS = {"lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_RAW_CMP = {"$gt": "gt", "$gte": "ge", "$lt": "lt", "$lte": "le"}
_TRUE: Frag = ("1", [])
_FALSE: Frag = ("0", [])


def register_functions(conn: sqlite3.Connection) -> None:
    """Register ``bs_regexp(pattern, flags, value)``, which the Regex clauses call, and
    ``bs_strict_json(text)``: JSON text with NaN/Infinity made strict (see :func:`finite`)."""
    conn.create_function("bs_regexp", 3, _regexp, deterministic=True)
    conn.create_function("bs_strict_json", 1, _strict_json, deterministic=True)


def finite(value: Any) -> Any:
    """Non-finite floats as None, so the JSON is strict (what SQLite's JSON1 accepts)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def _strict_json(text: object) -> str | None:
    try:
        return json.dumps(finite(json.loads(str(text))), allow_nan=False)
    except ValueError:
        return None


@lru_cache(maxsize=256)
def _compiled(pattern: str, flags: str) -> re.Pattern[str]:
    return compile_regex(pattern, flags)


def _regexp(pattern: str, flags: str, value: object) -> int:
    return int(isinstance(value, str) and _compiled(pattern, flags).search(value) is not None)


def json_path(key: str) -> str:
    """The SQLite JSON path for a dotted key (all-digit segments are list indices)."""
    return "$" + "".join(f"[{s}]" if s.isdigit() else f'."{s}"' for s in check_key(key))


def to_sql(q: Query | None) -> tuple[str, list[Any]]:
    """A ``WHERE`` clause (without the keyword) and its parameters for ``q``."""
    if q is None:
        return _TRUE
    sql, params = _translate(q)
    return sql, params


# -- building blocks ---------------------------------------------------------------------


def _join(parts: Sequence[Frag], op: str, empty: Frag) -> Frag:
    if not parts:
        return empty
    sql = f" {op} ".join(f"({s})" for s, _ in parts)
    return sql, [p for _, ps in parts for p in ps]


def _not(frag: Frag) -> Frag:
    return f"NOT ({frag[0]})", frag[1]


def _any(key: str, top: Pred, elem: Pred | None = None) -> Frag:
    """``top`` holds for the value at ``key``, or ``elem`` for an element of that list.

    Never NULL (wrapped in coalesce), so it can safely be negated.
    """
    path = json_path(key)
    t_sql, t_params = top((f"json_type({_DOC}, ?)", [path]), (f"json_extract({_DOC}, ?)", [path]))
    e_sql, e_params = (elem or top)(("je.type", []), ("je.value", []))
    sql = (f"coalesce(({t_sql}) OR (json_type({_DOC}, ?) = 'array' AND EXISTS "
           f"(SELECT 1 FROM json_each({_DOC}, ?) AS je WHERE {e_sql})), 0)")
    return sql, [*t_params, path, path, *e_params]


def _value_pred(v: Any) -> Pred:
    """Equality with one JSON value, type by type (numbers never equal strings/bools)."""

    def pred(typ: Frag, val: Frag) -> Frag:
        if v is None:
            return f"{typ[0]} = 'null'", typ[1]
        if isinstance(v, bool):
            return f"{typ[0]} = '{'true' if v else 'false'}'", typ[1]
        if isinstance(v, int | float):
            return f"{typ[0]} IN ('integer', 'real') AND {val[0]} = ?", [*typ[1], *val[1], v]
        if isinstance(v, str):
            return f"{typ[0]} = 'text' AND {val[0]} = ?", [*typ[1], *val[1], v]
        if isinstance(v, list | tuple | Mapping):
            kind = "object" if isinstance(v, Mapping) else "array"
            text = json.dumps(dict(v) if kind == "object" else list(v), allow_nan=False)
            return f"{typ[0]} = '{kind}' AND {val[0]} = json(?)", [*typ[1], *val[1], text]
        raise ValueError(f"cannot compare with a value of type {type(v).__name__}")

    return pred


def _missing_or_null(typ: Frag, val: Frag) -> Frag:
    return f"{typ[0]} IS NULL OR {typ[0]} = 'null'", [*typ[1], *typ[1]]


def _eq(key: str, v: Any) -> Frag:
    return _any(key, _missing_or_null if v is None else _value_pred(v), _value_pred(v))


def _in(key: str, values: Sequence[Any]) -> Frag:
    if key == "uid" and all(isinstance(v, str) for v in values):
        # The uids that ScanID and annotation queries resolve to, any number of them: the
        # uid column (the start document's uid, always a string) against one JSON list.
        # One predicate per value would be an expression tree SQLite refuses beyond
        # ~1,000 values (and slow long before).
        # doc_key is a start's uid, under the primary-key index.
        return "doc_key IN (SELECT value FROM json_each(?))", [json.dumps(list(values))]
    return _join([_eq(key, v) for v in values], "OR", _FALSE)


def _compare(key: str, operator: str, v: Any) -> Frag:
    if operator == "eq":
        return _eq(key, v)
    if operator == "ne":
        return _not(_eq(key, v))
    sql_op = _SQL_OPS[operator]
    kind = "= 'text'" if isinstance(v, str) else "IN ('integer', 'real')"

    def pred(typ: Frag, val: Frag) -> Frag:
        return f"{typ[0]} {kind} AND {val[0]} {sql_op} ?", [*typ[1], *val[1], v]

    return _any(key, pred)


def _regex(key: str, pattern: str, flags: str) -> Frag:
    compile_regex(pattern, flags)

    def pred(typ: Frag, val: Frag) -> Frag:
        return (f"{typ[0]} = 'text' AND bs_regexp(?, ?, {val[0]})",
                [*typ[1], pattern, flags, *val[1]])

    return _any(key, pred)


def _exists(key: str, exists: bool) -> Frag:
    op = "IS NOT NULL" if exists else "IS NULL"
    return f"json_type({_DOC}, ?) {op}", [json_path(key)]


# -- query objects -----------------------------------------------------------------------


@singledispatch
def _translate(q: Query) -> Frag:
    raise ValueError(f"unsupported query type {type(q).__name__}")


@_translate.register
def _(q: TimeRange) -> Frag:
    since, until = time_bounds(q)
    parts: list[Frag] = []
    if since is not None:
        parts.append(("time >= ?", [since]))
    if until is not None:
        parts.append(("time < ?", [until]))
    return _join(parts, "AND", _TRUE)


@_translate.register
def _(q: ScanID) -> Frag:
    scan_ids = check_scan_ids(q)
    return f"scan_id IN ({', '.join('?' * len(scan_ids))})", list(scan_ids)


def uid_prefix(prefix: str) -> Frag:
    """A start's uid begins with ``prefix``, as a range of ``doc_key`` (a start's key is
    its uid) that the primary-key index serves: ``substr(uid, ...)`` read every row."""
    if not prefix:
        return _TRUE
    last = ord(prefix[-1])
    if last >= 0x10FFFF:
        return "substr(doc_key, 1, ?) = ?", [len(prefix), prefix]
    return "doc_key >= ? AND doc_key < ?", [prefix, prefix[:-1] + chr(last + 1)]


@_translate.register
def _(q: PartialUID) -> Frag:
    return _join([uid_prefix(p) for p in check_partial_uids(q)], "OR", _FALSE)


@_translate.register
def _(q: Eq) -> Frag:
    return _eq(q.key, q.value)


@_translate.register
def _(q: NotEq) -> Frag:
    return _not(_eq(q.key, q.value))


@_translate.register
def _(q: In) -> Frag:
    return _in(q.key, q.values)


@_translate.register
def _(q: NotIn) -> Frag:
    return _not(_in(q.key, q.values))


@_translate.register
def _(q: Contains) -> Frag:
    v = q.value

    def substring(typ: Frag, val: Frag) -> Frag:
        if not isinstance(v, str):
            return _FALSE
        return f"{typ[0]} = 'text' AND instr({val[0]}, ?) > 0", [*typ[1], *val[1], v]

    return _any(q.key, substring, _value_pred(v))


@_translate.register
def _(q: Regex) -> Frag:
    return _regex(q.key, q.pattern, "" if q.case_sensitive else "i")


@_translate.register
def _(q: FullText) -> Frag:
    words = full_text_words(q)
    return _join([("instr(search_text, ?) > 0", [w]) for w in words], "AND", _TRUE)


@_translate.register
def _(q: Comparison) -> Frag:
    check_key(q.key)
    check_comparable(q)
    return _compare(q.key, q.operator, q.value)


@_translate.register
def _(q: And) -> Frag:
    return _join([_translate(c) for c in q.queries], "AND", _TRUE)


@_translate.register
def _(q: Raw) -> Frag:
    return _raw_filter(q.filter)


# -- Raw: the portable subset of MongoDB's filter language ---------------------------------


def _unsupported(op: str) -> ValueError:
    return ValueError(
        f"raw filter operator {op!r} is not supported by the SQLite backend; "
        f"portable operators are {', '.join(PORTABLE_RAW_OPERATORS)}"
    )


def _raw_filter(f: Any) -> Frag:
    if not isinstance(f, Mapping):
        raise ValueError(f"a raw filter must be a mapping, got {type(f).__name__}")
    return _join([_raw_item(str(k), v) for k, v in f.items()], "AND", _TRUE)


def _raw_item(key: str, value: Any) -> Frag:
    if key in ("$and", "$or"):
        if not isinstance(value, list | tuple) or not value:
            raise ValueError(f"{key} needs a non-empty list of filters")
        return _join([_raw_filter(v) for v in value], key[1:].upper(), _TRUE)
    if key.startswith("$"):
        raise _unsupported(key)
    check_key(key)
    if _is_operator_doc(key, value):
        return _raw_operators(key, value)
    return _eq(key, value)


def _is_operator_doc(key: str, value: Any) -> bool:
    if not isinstance(value, Mapping) or not value:
        return False
    ops = [str(k).startswith("$") for k in value]
    if any(ops) and not all(ops):
        raise ValueError(f"raw filter on {key!r} mixes operators and field names")
    return all(ops)


def _raw_operators(key: str, ops: Mapping[str, Any]) -> Frag:
    if "$options" in ops and "$regex" not in ops:
        raise ValueError(f"raw filter on {key!r}: $options needs $regex")
    parts = [_raw_operator(key, op, arg, ops) for op, arg in ops.items() if op != "$options"]
    return _join(parts, "AND", _TRUE)


def _raw_operator(key: str, op: str, arg: Any, ops: Mapping[str, Any]) -> Frag:
    if op == "$eq":
        return _eq(key, arg)
    if op == "$ne":
        return _not(_eq(key, arg))
    if op in _RAW_CMP:
        cmp = Comparison(_RAW_CMP[op], key, arg)
        check_comparable(cmp)
        return _compare(key, cmp.operator, arg)
    if op in ("$in", "$nin"):
        if not isinstance(arg, list | tuple):
            raise ValueError(f"raw filter on {key!r}: {op} needs a list")
        frag = _in(key, arg)
        return frag if op == "$in" else _not(frag)
    if op == "$exists":
        return _exists(key, bool(arg))
    if op == "$regex":
        return _regex(key, arg, str(ops.get("$options", "")))
    raise _unsupported(op)
