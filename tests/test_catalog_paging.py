"""Listing a large catalog: every uid once, newest first, across page boundaries; the
first results cost one small page (nothing is fetched whole).

Shown to fail: with ``Catalog.keys`` advancing by the next page's size instead of the
length of the page just read, uids go missing at the boundaries; with the whole result
fetched at once, the "first page is small" check fails.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import anyio
import event_model
import pytest

import bluestream
from bluestream.storage.backends import open_metadata_store

N_RUNS = 2_345


async def _build(metadata: str, n: int) -> list[str]:
    store = open_metadata_store(metadata, "many")
    await store.open()
    uids = []
    try:
        starts, stops = [], []
        for i in range(n):
            bundle = event_model.compose_run(time=1_000_000.0 + i,
                                             metadata={"scan_id": i + 1})
            starts.append(bundle.start_doc)
            stops.append(bundle.compose_stop(time=1_000_000.5 + i))
            uids.append(bundle.start_doc["uid"])
        await store.put_documents("start", starts)
        await store.put_documents("stop", stops)
    finally:
        await store.close()
    return uids[::-1]  # newest first


def test_listing_pages_lazily(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    metadata = f"sqlite:///{tmp_path / 'm.db'}"
    newest_first = anyio.run(_build, metadata, N_RUNS)
    with bluestream.open_catalog("many", metadata=metadata, zarr_root=tmp_path / "z") as cat:
        store: Any = cat.aio._ctx.store
        limits: list[int | None] = []
        search = store.search_uids  # uids only, from the index: no document read

        async def counted(query: Any, *, skip: int = 0, limit: int | None = None) -> Any:
            limits.append(limit)
            return await search(query, skip=skip, limit=limit)

        async def no_documents(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("listing uids read start documents")

        monkeypatch.setattr(store, "search_uids", counted)
        monkeypatch.setattr(store, "search", no_documents)
        assert list(itertools.islice(cat, 5)) == newest_first[:5]
        assert limits == [100]  # one small page for the first results
        limits.clear()
        assert list(cat) == newest_first
        assert all(limit is not None and limit <= 1_000 for limit in limits), limits
        assert len(limits) < N_RUNS // 100  # pages grow: fewer calls than 100-row pages
        assert len(cat) == N_RUNS
