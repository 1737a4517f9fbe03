"""Backend-neutral query objects for :meth:`Catalog.search`.

Queries are small frozen dataclasses and say nothing about any backend. Each metadata
backend translates them (``bluestream.storage.mongo_query``, ``..sqlite_query``).
Keys are dotted paths into the run's start document (``"sample.name"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

__all__ = [
    "ANNOTATION_OPERATORS",
    "DUPLICATES",
    "STOP_QUERY_TYPES",
    "And",
    "Annotation",
    "AnnotationQuery",
    "Comparison",
    "Contains",
    "Eq",
    "FullText",
    "In",
    "Key",
    "NotEq",
    "NotIn",
    "OnStop",
    "PartialUID",
    "Query",
    "Raw",
    "Regex",
    "ScanID",
    "TimeRange",
    "check_stop_query",
]


class Query:
    """Base class of every query object."""


#: ScanID's rules for a scan id that names several runs (databroker's names).
DUPLICATES = ("latest", "all", "error")


TimeLike = str | float | int | datetime | None


@dataclass(frozen=True)
class TimeRange(Query):
    """Runs started in ``[since, until)``. Strings are ISO dates/times, read in ``timezone``
    (default: the machine's local zone, as databroker does); numbers are epoch seconds."""

    since: TimeLike = None
    until: TimeLike = None
    timezone: str | None = None


@dataclass(frozen=True, init=False)
class ScanID(Query):
    """Runs with one of ``scan_ids``, with databroker's rule for repeated scan ids:
    ``duplicates="latest"`` (default) keeps the newest run per scan id, ``"all"`` keeps
    every run, ``"error"`` raises ValueError when a scan id names more than one run."""

    scan_ids: tuple[int, ...]
    duplicates: Literal["latest", "all", "error"] = "latest"

    def __init__(self, *scan_ids: int, duplicates: Literal["latest", "all", "error"] = "latest"
                 ) -> None:
        if duplicates not in DUPLICATES:
            raise ValueError(f"ScanID(duplicates={duplicates!r}): use one of "
                             f"{', '.join(map(repr, DUPLICATES))}")
        object.__setattr__(self, "scan_ids", tuple(int(s) for s in scan_ids))
        object.__setattr__(self, "duplicates", duplicates)


@dataclass(frozen=True, init=False)
class PartialUID(Query):
    partial_uids: tuple[str, ...]

    def __init__(self, *partial_uids: str) -> None:
        object.__setattr__(self, "partial_uids", tuple(partial_uids))


@dataclass(frozen=True)
class Eq(Query):
    key: str
    value: Any


@dataclass(frozen=True)
class NotEq(Query):
    key: str
    value: Any


@dataclass(frozen=True)
class _KeyValues(Query):
    key: str
    values: tuple[Any, ...]

    def __init__(self, key: str, values: Any) -> None:
        if isinstance(values, str | bytes):
            # tuple("scan") would silently search for the letters s, c, a, n.
            raise TypeError(f"{type(self).__name__}({key!r}, ...) takes a list of values, "
                            f"not a single string: use [{values!r}]")
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "values", tuple(values))


@dataclass(frozen=True, init=False)
class In(_KeyValues):
    """The value at ``key`` is one of ``values``."""


@dataclass(frozen=True, init=False)
class NotIn(_KeyValues):
    """The value at ``key`` is none of ``values``."""


@dataclass(frozen=True)
class Contains(Query):
    """The value at ``key`` is a list containing ``value`` (or a string containing it)."""

    key: str
    value: Any


@dataclass(frozen=True)
class Regex(Query):
    key: str
    pattern: str
    case_sensitive: bool = True


@dataclass(frozen=True)
class FullText(Query):
    """Words anywhere in the start document's string values (case-insensitive)."""

    text: str


@dataclass(frozen=True)
class Comparison(Query):
    operator: str  # one of "lt", "le", "gt", "ge", "eq", "ne"
    key: str
    value: Any


@dataclass(frozen=True)
class Raw(Query):
    """A raw Mongo-style filter on the start document (a subset of operators is portable:
    $eq $ne $gt $gte $lt $lte $in $nin $exists $regex $and $or)."""

    filter: Mapping[str, Any]


@dataclass(frozen=True, init=False)
class And(Query):
    queries: tuple[Query, ...]

    def __init__(self, *queries: Query) -> None:
        flat: list[Query] = []
        for q in queries:
            flat.extend(q.queries if isinstance(q, And) else (q,))
        object.__setattr__(self, "queries", tuple(flat))


class Key:
    """``Key("num_points") > 10`` builds a :class:`Comparison`."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __lt__(self, value: Any) -> Comparison:
        return Comparison("lt", self.key, value)

    def __le__(self, value: Any) -> Comparison:
        return Comparison("le", self.key, value)

    def __gt__(self, value: Any) -> Comparison:
        return Comparison("gt", self.key, value)

    def __ge__(self, value: Any) -> Comparison:
        return Comparison("ge", self.key, value)

    def __eq__(self, value: object) -> Comparison:  # type: ignore[override]
        return Comparison("eq", self.key, value)

    def __ne__(self, value: object) -> Comparison:  # type: ignore[override]
        return Comparison("ne", self.key, value)

    __hash__ = None  # type: ignore[assignment]


#: What an :class:`AnnotationQuery` can ask of a run's current annotation value.
ANNOTATION_OPERATORS = ("eq", "ne", "lt", "le", "gt", "ge", "in", "exists")


@dataclass(frozen=True)
class AnnotationQuery(Query):
    """Runs whose *current* annotation ``key`` (the newest version; see
    ``run.annotate``) satisfies ``operator`` with ``value``. Build it with
    :class:`Annotation`: ``Annotation("quality") == "good"``.

    ``ne`` matches runs without the annotation too (as :class:`NotEq` does for start
    keys); ``exists`` matches runs that carry one; numbers never equal strings or
    booleans, and ``<``/``>`` compare numbers with numbers and strings with strings."""

    key: str
    operator: str
    value: Any = None

    def __post_init__(self) -> None:
        if self.operator not in ANNOTATION_OPERATORS:
            raise ValueError(f"annotation operator {self.operator!r}: use one of "
                             f"{', '.join(ANNOTATION_OPERATORS)}")
        if self.operator == "in":
            if isinstance(self.value, str | bytes) or not hasattr(self.value, "__iter__"):
                raise TypeError("Annotation(...).isin() takes a list of values")
            object.__setattr__(self, "value", tuple(self.value))


class Annotation:
    """``Annotation("quality") == "good"`` builds an :class:`AnnotationQuery` (also
    ``!=``, ``<``, ``<=``, ``>``, ``>=``, ``.isin([...])`` and ``.exists()``)."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __eq__(self, value: object) -> AnnotationQuery:  # type: ignore[override]
        return AnnotationQuery(self.key, "eq", value)

    def __ne__(self, value: object) -> AnnotationQuery:  # type: ignore[override]
        return AnnotationQuery(self.key, "ne", value)

    def __lt__(self, value: Any) -> AnnotationQuery:
        return AnnotationQuery(self.key, "lt", value)

    def __le__(self, value: Any) -> AnnotationQuery:
        return AnnotationQuery(self.key, "le", value)

    def __gt__(self, value: Any) -> AnnotationQuery:
        return AnnotationQuery(self.key, "gt", value)

    def __ge__(self, value: Any) -> AnnotationQuery:
        return AnnotationQuery(self.key, "ge", value)

    def isin(self, values: Any) -> AnnotationQuery:
        return AnnotationQuery(self.key, "in", values)

    def exists(self) -> AnnotationQuery:
        return AnnotationQuery(self.key, "exists")

    __hash__ = None  # type: ignore[assignment]


def as_query(q: Query | Mapping[str, Any]) -> Query:
    """Accept a query object or a raw Mongo-style dict."""
    if isinstance(q, Query):
        return q
    if isinstance(q, Mapping):
        return Raw(dict(q))
    raise TypeError(f"expected a bluestream.queries query or a dict, got {type(q).__name__}")


#: What an :class:`OnStop` may hold (with And): keys of the stop document.
STOP_QUERY_TYPES: tuple[type[Query], ...] = (Eq, NotEq, Comparison, In, NotIn, Contains,
                                             Regex, TimeRange, Raw)


@dataclass(frozen=True)
class OnStop(Query):
    """Runs whose *stop* document matches ``query``: ``OnStop(Eq("exit_status",
    "success"))``, ``OnStop(Comparison("gt", "num_events.primary", 100))``,
    ``OnStop(TimeRange(since=...))`` (the time the run ended). Open runs have no stop
    and never match, not even a :class:`NotEq`. ``query`` is built of Eq, NotEq,
    Comparison, In, NotIn, Contains, Regex, TimeRange, Raw and And; scan ids, uids
    prefixes, full text and annotations are start-side and refused."""

    query: Query

    def __post_init__(self) -> None:
        check_stop_query(self.query)


def check_stop_query(q: Query) -> None:
    if isinstance(q, And):
        for part in q.queries:
            check_stop_query(part)
    elif not isinstance(q, STOP_QUERY_TYPES):
        raise ValueError(f"OnStop(...) cannot hold a {type(q).__name__} query: give Eq, "
                         "NotEq, Comparison, In, NotIn, Contains, Regex, TimeRange, Raw "
                         "or And on keys of the stop document")
