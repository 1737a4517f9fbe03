"""Rules every metadata backend applies the same way: names, content identity, text,
and how a store URI is shown (password masked).

MongoDB and SQLite decide INSERTED / SAME / CONFLICT and full-text content by exactly
these functions, and the router decides whether a re-sent document is a replay by
:func:`same_content` too, so a document behaves the same whichever path sees it first.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from bluestream.errors import ConfigError
from bluestream.storage.base import PutOutcome

__all__ = [
    "DEFAULT_SERVER_SELECTION_TIMEOUT_MS",
    "SESSIONS",
    "canonical_json",
    "check_extra",
    "check_tenant",
    "classify_puts",
    "mask_uri",
    "same_content",
    "search_text",
]

#: How long a client waits to find a metadata server before reporting it unavailable.
DEFAULT_SERVER_SELECTION_TIMEOUT_MS = 5_000
_TENANT = re.compile(r"[A-Za-z0-9_-]{1,63}")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def check_tenant(tenant: str) -> str:
    """Tenant names become MongoDB database names: keep them to a portable charset."""
    if not isinstance(tenant, str) or not _TENANT.fullmatch(tenant):
        raise ConfigError(
            f"tenant name {tenant!r} is invalid: use 1-63 letters, digits, '_' or '-'"
        )
    return tenant


#: The key under an ingest_log record's ``extra`` where the writing processes are kept
#: (reserved: :class:`~bluestream.storage.base.IngestSession`).
SESSIONS = "sessions"


def check_extra(extra: Mapping[str, Any]) -> dict[str, Any]:
    """``IngestLogEntry.extra`` keys become MongoDB field names: no dots, no leading $."""
    for k in extra:
        if not isinstance(k, str) or not k or "." in k or k.startswith("$"):
            raise ValueError(f"ingest-log extra key {k!r} must be a non-empty name "
                             "without '.' and not starting with '$'")
        if k == SESSIONS:
            raise ValueError(f"ingest-log extra key {k!r} is reserved for the writing "
                             "processes")
    return dict(extra)


def canonical_json(doc: Any) -> str:
    """Content identity of a document: JSON with sorted keys (NaN allowed, equal to NaN).

    The one equality rule of bluestream: key order and tuple-vs-list do not count;
    int vs float does (``1`` != ``1.0``), because both backends store and return the
    type that was put, so a document that differs only so would read back differently.
    """
    return json.dumps(doc, sort_keys=True, allow_nan=True, separators=(",", ":"))


def same_content(a: Any, b: Any) -> bool:
    """True when ``a`` and ``b`` are the same document under :func:`canonical_json`."""
    return canonical_json(a) == canonical_json(b)


def classify_puts(
    docs: Sequence[Mapping[str, Any]], keys: Sequence[str], stored: Mapping[str, str]
) -> tuple[list[PutOutcome], list[int]]:
    """Outcomes as if ``docs`` were put one after the other, and which ones to insert.

    ``stored`` maps keys already in the store to their :func:`canonical_json`. Returns
    the outcomes in input order and the positions of the documents to insert (the
    first occurrence of each new key).
    """
    known = dict(stored)
    outcomes: list[PutOutcome] = []
    to_insert: list[int] = []
    for i, (key, doc) in enumerate(zip(keys, docs, strict=True)):
        content = canonical_json(doc)
        if key in known:
            same = known[key] == content
            outcomes.append(PutOutcome.SAME if same else PutOutcome.CONFLICT)
        else:
            known[key] = content
            outcomes.append(PutOutcome.INSERTED)
            to_insert.append(i)
    return outcomes, to_insert


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


def search_text(doc: Mapping[str, Any]) -> str:
    """What FullText searches when there is no text index: every string value, lowered."""
    return " ".join(_strings(doc)).lower()


def mask_uri(uri: str) -> str:
    """``uri`` with the password replaced by ``***``, safe to log or show.

    The user-info part ends at the last ``@`` before the query string, so passwords
    that (wrongly) contain ``@`` or ``/`` unescaped are still masked completely.
    Text that is not a URI (an error message quoting one) is masked inside too.
    """
    m = _SCHEME.match(uri)
    if m is None:
        return _mask_inside(uri)
    scheme, rest = m.group(0), uri[m.end():]
    head, sep, query = rest.partition("?")
    userinfo, at, hosts = head.rpartition("@")
    if not at or ":" not in userinfo:
        return uri
    user = userinfo.split(":", 1)[0]
    return f"{scheme}{user}:***@{hosts}{sep}{query}"


def _mask_inside(text: str) -> str:
    """Mask every ``scheme://user:secret@`` found in free text (up to whitespace)."""
    return re.sub(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]+:)\S*@", r"\1***@", text)
