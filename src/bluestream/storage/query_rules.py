"""How every metadata backend reads the query objects of :mod:`bluestream.queries`.

Key validation, time parsing, partial-uid, comparison, regex and full-text checks are
backend-neutral: the MongoDB and SQLite translators both call these, so the two can
never read a query differently (the conformance suite holds them to the same answers).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from bluestream.queries import (
    AnnotationQuery,
    Comparison,
    FullText,
    PartialUID,
    ScanID,
    TimeLike,
    TimeRange,
)

__all__ = [
    "COMPARISON_OPERATORS",
    "MIN_PARTIAL_UID",
    "annotation_matches",
    "check_annotation_key",
    "check_comparable",
    "check_key",
    "check_partial_uids",
    "check_scan_ids",
    "compile_regex",
    "epoch_seconds",
    "escape_regex",
    "full_text_words",
    "time_bounds",
]

MIN_PARTIAL_UID = 5
#: Comparison.operator -> MongoDB operator (its keys are the portable operator names).
COMPARISON_OPERATORS = {"lt": "$lt", "le": "$lte", "gt": "$gt", "ge": "$gte",
                        "eq": "$eq", "ne": "$ne"}

# Dotted keys: segments of letters, digits, "_" and "-". Anything else (quotes, "$",
# brackets, spaces) could change the meaning of a JSON path or a Mongo filter.
_SEGMENT = re.compile(r"[A-Za-z0-9_-]{1,128}")
_MAX_KEY_SEGMENTS = 16
_REGEX_META = re.compile(r"([\\^$.|?*+()\[\]{}])")
_PARTIAL_FORMATS = ("%Y", "%Y-%m")
_ANNOTATION_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}")



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


def check_scan_ids(q: ScanID) -> tuple[int, ...]:
    """The scan ids of a ScanID whose ``duplicates`` rule is already applied
    (:meth:`~bluestream.storage.base.MetadataStore.resolve` makes that so)."""
    if not q.scan_ids:
        raise ValueError("ScanID needs at least one scan id")
    if q.duplicates != "all":
        raise ValueError(f"ScanID(duplicates={q.duplicates!r}) must be resolved by the store "
                         "before it is translated")
    return q.scan_ids


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


def check_annotation_key(key: Any) -> str:
    """Annotation keys are short names (letters, digits, ``_ . : -``), the same on
    every backend and safe in any field or column."""
    if not isinstance(key, str) or not _ANNOTATION_KEY.fullmatch(key):
        raise ValueError(f"invalid annotation key {str(key)[:80]!r}: use a name of at most 128 "
                         "letters, digits, '_', '.', ':' or '-' (for example 'quality')")
    return key


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _equal(stored: Any, wanted: Any) -> bool:
    """MongoDB's equality: numbers never equal strings or booleans; 1 == 1.0."""
    if _number(stored) and _number(wanted):
        return bool(stored == wanted)
    return type(stored) is type(wanted) and bool(stored == wanted)


def annotation_matches(q: AnnotationQuery, stored: Any) -> bool:
    """Whether a run whose current value of ``q.key`` is ``stored`` matches ``q``
    (``ne`` is answered by the caller as "not eq", so that runs without the annotation
    match it too)."""
    op = q.operator
    if op == "exists":
        return True
    if op in ("eq", "ne"):
        return _equal(stored, q.value)
    if op == "in":
        return any(_equal(stored, v) for v in q.value)
    comparable = (_number(stored) and _number(q.value)) or (
        isinstance(stored, str) and isinstance(q.value, str))
    if not comparable:
        return False
    return bool({"lt": stored < q.value, "le": stored <= q.value,
                 "gt": stored > q.value, "ge": stored >= q.value}[op])
