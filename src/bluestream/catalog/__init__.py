"""The read side: a databroker-style catalog over what bluestream stored.

``open_catalog`` (synchronous) and ``open_catalog_async`` are the entry points; see
:mod:`bluestream.catalog.core`.
"""

from bluestream.catalog.core import (
    AsyncCatalog,
    Catalog,
    from_uri,
    open_catalog,
    open_catalog_async,
)
from bluestream.catalog.run import AsyncBlueskyRun, BlueskyRun, EventStream
from bluestream.catalog.stream import AsyncEventStream

__all__ = [
    "AsyncBlueskyRun",
    "AsyncCatalog",
    "AsyncEventStream",
    "BlueskyRun",
    "Catalog",
    "EventStream",
    "from_uri",
    "open_catalog",
    "open_catalog_async",
]
