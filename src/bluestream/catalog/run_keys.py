"""How a run named on a command line (or in a list of keys) is looked up.

``-1`` is the newest run, ``42`` a scan id, ``3f2a9c`` a uid prefix. A number of five
digits or more may also be a uid prefix (uids are hex: ~2% of them start with eight
digits), so it is tried as a uid first, then as a scan id. Every command and catalog
call that takes RUN arguments reads them by this one rule.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import TypeVar

from bluestream.errors import NotFound

__all__ = ["MIN_PREFIX", "first_found", "parse_run_key"]

T = TypeVar("T")

MIN_PREFIX = 5
_INT = re.compile(r"-?\d+")


def parse_run_key(key: int | str) -> list[int | str]:
    """Lookup keys to try for a run named ``key``, in order (see the module docstring)."""
    if not isinstance(key, str):
        return [key]
    if _INT.fullmatch(key):
        n = int(key)
        if n < 0 or len(key) < MIN_PREFIX:
            return [n]
        return [key, n]
    return [key]


async def first_found(key: int | str, lookup: Callable[[int | str], Awaitable[T]]) -> T:
    """``lookup`` of the first reading of ``key`` that names a run (NotFound, the
    last one's, if none does)."""
    last: NotFound | None = None
    for candidate in parse_run_key(key):
        try:
            return await lookup(candidate)
        except NotFound as exc:
            last = exc
    assert last is not None
    raise last
