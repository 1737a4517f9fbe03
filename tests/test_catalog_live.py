"""Runs that are still being written: readable, growing, followed as they are stored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

import bluestream
from test_catalog_support import (  # noqa: F401  (fixtures)
    Docs,
    assert_valid_order,
    canonical,
    create_store,
    events_of,
    ingest,
    metadata_uri_fixture,
    now,
    run_with_uid,
)

pytestmark = pytest.mark.anyio

N = 30


def live_run() -> Docs:
    from test_catalog_support import new_uid

    return run_with_uid(new_uid(), scan_id=11, t0=now() - 60, n=N)


async def publish_slowly(metadata_uri: str, zarr_root: Path, tenant: str, docs: Docs,
                         *, chunk: int = 5, pause: float = 0.1) -> None:
    """Store ``docs`` a few at a time, as a running experiment would."""
    for i in range(0, len(docs), chunk):
        await anyio.sleep(pause)
        await ingest(metadata_uri, zarr_root, tenant, docs[i:i + chunk], start_offset=i + 100)


async def test_follow_yields_each_document_once(metadata_uri: str, zarr_root: Path,
                                                tenant: str) -> None:
    docs = live_run()
    await ingest(metadata_uri, zarr_root, tenant, docs[:7])
    got: list[tuple[str, Any]] = []
    async with bluestream.open_catalog_async(tenant, metadata=metadata_uri,
                                             zarr_root=zarr_root, poll_interval=0.05) as acat:
        run = await acat[docs[0][1]["uid"]]
        assert run.metadata["stop"] is None

        async def follow() -> None:
            async for item in run.follow():
                got.append(item)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(follow)
                await publish_slowly(metadata_uri, zarr_root, tenant, docs[7:])
    assert_valid_order(got)
    assert got[-1][0] == "stop"
    uids = [ev["uid"] for ev in events_of(got)]
    assert len(uids) == len(set(uids)) == N
    assert len([n for n, _ in got if n == "event_page"]) > 1  # arrived in several polls
    assert canonical(got) == canonical(docs)


async def test_events_async(metadata_uri: str, zarr_root: Path, tenant: str) -> None:
    docs = live_run()
    await ingest(metadata_uri, zarr_root, tenant, docs[:3])  # start, descriptor, 1 event
    pages: list[dict[str, Any]] = []
    async with bluestream.open_catalog_async(tenant, metadata=metadata_uri,
                                             zarr_root=zarr_root, poll_interval=0.05) as acat:
        run = await acat[-1]

        async def consume() -> None:
            async for page in run.events_async("primary"):
                pages.append(page)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(consume)
                await publish_slowly(metadata_uri, zarr_root, tenant, docs[3:], chunk=7)
    seq = [s for p in pages for s in p["seq_num"]]
    assert seq == list(range(1, N + 1))


async def test_wait(metadata_uri: str, zarr_root: Path, tenant: str) -> None:
    docs = live_run()
    await ingest(metadata_uri, zarr_root, tenant, docs[:5])
    async with bluestream.open_catalog_async(tenant, metadata=metadata_uri,
                                             zarr_root=zarr_root, poll_interval=0.05) as acat:
        run = await acat[-1]
        assert await run.wait(0.3) is False  # nothing new

        async def later(part: Docs) -> None:
            await anyio.sleep(0.2)
            await ingest(metadata_uri, zarr_root, tenant, part, start_offset=5)

        async with anyio.create_task_group() as tg:
            tg.start_soon(later, docs[5:10])
            with anyio.fail_after(10):
                assert await run.wait(10) is True
        ds = await run["primary"].read()
        assert ds.sizes["time"] == 8
        async with anyio.create_task_group() as tg:
            tg.start_soon(later, docs[10:])
            with anyio.fail_after(10):
                while run.metadata["stop"] is None:  # wait() refreshes the metadata
                    assert await run.wait(10) is True
        assert (await run["primary"].read()).sizes["time"] == N
        with anyio.fail_after(1):
            assert await run.wait(30) is False  # stopped: returns at once


async def test_sync_catalog_on_a_running_loop(metadata_uri: str, zarr_root: Path,
                                              tenant: str) -> None:
    """The synchronous catalog works where a loop already runs (as in Jupyter), and its
    blocking calls can wait in a worker thread while this loop stores more data."""
    docs = live_run()
    await ingest(metadata_uri, zarr_root, tenant, docs[:4])
    cat = bluestream.open_catalog(tenant, metadata=metadata_uri, zarr_root=zarr_root,
                                  poll_interval=0.05)
    try:
        run = cat[-1]
        assert run["primary"].read().sizes["time"] == 2
        async with anyio.create_task_group() as tg:
            tg.start_soon(publish_slowly, metadata_uri, zarr_root, tenant, docs[4:])
            with anyio.fail_after(10):
                assert await anyio.to_thread.run_sync(run.wait, 10.0) is True
        assert run["primary"].read().sizes["time"] == N
        assert run.metadata["stop"] is not None
        followed = list(run.follow())
        assert canonical(followed) == canonical(docs)
        assert [s for p in run["primary"].events() for s in p["seq_num"]] == \
            list(range(1, N + 1))
    finally:
        cat.close()


async def test_empty_open_run(metadata_uri: str, zarr_root: Path, tenant: str) -> None:
    """A run with a descriptor but no events yet reads as an empty dataset."""
    docs = live_run()
    await ingest(metadata_uri, zarr_root, tenant, docs[:2])
    async with bluestream.open_catalog_async(tenant, metadata=metadata_uri,
                                             zarr_root=zarr_root) as acat:
        run = await acat[-1]
        assert run.streams == ["primary"]
        ds = await run["primary"].read()
        assert ds.sizes["time"] == 0
        assert list(ds.data_vars) == ["x"]
        assert [n async for n, _ in run.documents()] == ["start", "descriptor"]


async def test_no_runs_yet(metadata_uri: str, zarr_root: Path, tenant: str) -> None:
    await create_store(metadata_uri, tenant)
    async with bluestream.open_catalog_async(tenant, metadata=metadata_uri,
                                             zarr_root=zarr_root) as acat:
        assert await acat.count() == 0
        assert [u async for u in acat] == []
        with pytest.raises(bluestream.errors.NotFound, match="out of range"):
            await acat[-1]
