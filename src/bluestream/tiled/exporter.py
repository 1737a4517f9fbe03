"""``run.documents()`` of a Tiled client: the stored documents, replayed.

Registered for the spec ``BlueskyRun`` and ``application/json-seq`` in the server's
configuration (``media_types``): each record is ``\\x1e{"name": ..., "doc": ...}\\n``
(RFC 7464), what bluesky-tiled-plugins reads. The documents are those the Python
catalog's ``run.documents()`` gives (event pages included), not a re-synthesis from
tables: event uids and every field come back as they were stored.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from bluestream.tiled.adapters import RunNode, _default

__all__ = ["json_seq"]


async def json_seq(mimetype: str, adapter: Any, metadata: Any = None,
                   filter_for_access: Any = None) -> AsyncIterator[str]:
    if not isinstance(adapter, RunNode):
        raise ValueError("documents are exported for runs only")
    async for name, doc in adapter.run.documents():
        yield "\x1e" + json.dumps({"name": name, "doc": doc}, default=_default) + "\n"
