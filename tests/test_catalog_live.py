"""Runs that are still being written: readable, growing, followed as they are stored.

No test here paces itself with sleeps: more is stored only once the reader has
observably taken in what came before (the documents a follower yielded, or the first look
``wait()`` takes at the run), and every wait has a generous deadline.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

import bluestream
from bluestream.catalog.run import AsyncBlueskyRun
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


#: Deadline of each wait on a reader (generous: a loaded machine is slow, not wrong).
DEADLINE = 30.0


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` (cheap, in-memory) every 10 ms; fail after :data:`DEADLINE`."""
    with anyio.move_on_after(DEADLINE):
        while True:
            if condition():
                return
            await anyio.sleep(0.01)
    pytest.fail(f"timed out after {DEADLINE} s waiting for {what}")


async def publish_in_steps(metadata_uri: str, zarr_root: Path, tenant: str, docs: Docs,
                           delivered: Callable[[], int], *, stored: int,
                           chunk: int = 5) -> None:
    """Store ``docs`` a few at a time, as a running experiment would, each step only once
    the reader has delivered every event stored so far (``delivered()`` counts them;
    ``stored`` were stored before ``docs``): so each step reaches the reader in a poll of
    its own, however slow the machine."""
    await until(lambda: delivered() >= stored, f"the reader to deliver {stored} events")
    for i in range(0, len(docs), chunk):
        part = docs[i:i + chunk]
        await ingest(metadata_uri, zarr_root, tenant, part, start_offset=i + 100)
        stored += len(events_of(part))
        await until(lambda n=stored: delivered() >= n, f"the reader to deliver {stored} events")


class WaitLooks:
    """Counts the looks ``wait()`` takes at a run (``AsyncBlueskyRun._progress``: one at
    the call, the state it compares against, then one per poll), for the synchronous
    catalog too (its runs wrap the async ones). A test stores more only after ``wait()``
    has taken its first look, instead of after a pause that assumes how fast it looks."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        original = AsyncBlueskyRun._progress

        async def counted(run: AsyncBlueskyRun) -> Any:
            result = await original(run)
            self.count += 1
            return result

        monkeypatch.setattr(AsyncBlueskyRun, "_progress", counted)

    async def after_next(self) -> None:
        """Return once the next ``wait()`` has taken its first look (at the run as it was
        when this was called)."""
        seen = self.count
        await until(lambda: self.count > seen, "wait() to look at the run")


@pytest.fixture
def looks(monkeypatch: pytest.MonkeyPatch) -> WaitLooks:
    return WaitLooks(monkeypatch)


async def test_follow_yields_each_document_once(metadata_uri: str, zarr_root: Path,
                                                tenant: str) -> None:
    """Each step is stored once the follower has yielded the events before it (waits on
    what ``follow()`` yielded), so they arrive in several polls."""
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

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                tg.start_soon(follow)
                await publish_in_steps(metadata_uri, zarr_root, tenant, docs[7:],
                                       lambda: len(events_of(got)),
                                       stored=len(events_of(docs[:7])))
    assert_valid_order(got)
    assert got[-1][0] == "stop"
    uids = [ev["uid"] for ev in events_of(got)]
    assert len(uids) == len(set(uids)) == N
    # The events stored first, then at least one page per step that held events.
    steps = [docs[i:i + 5] for i in range(7, len(docs), 5)]
    expected_pages = 1 + sum(1 for step in steps if events_of(step))
    assert len([n for n, _ in got if n == "event_page"]) >= expected_pages
    assert canonical(got) == canonical(docs)


async def test_events_async(metadata_uri: str, zarr_root: Path, tenant: str) -> None:
    """Steps are stored as the pages arrive (waits on the pages ``events_async`` gave)."""
    docs = live_run()
    await ingest(metadata_uri, zarr_root, tenant, docs[:3])  # start, descriptor, 1 event
    pages: list[dict[str, Any]] = []
    async with bluestream.open_catalog_async(tenant, metadata=metadata_uri,
                                             zarr_root=zarr_root, poll_interval=0.05) as acat:
        run = await acat[-1]

        async def consume() -> None:
            async for page in run.events_async("primary"):
                pages.append(page)

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                tg.start_soon(consume)
                await publish_in_steps(metadata_uri, zarr_root, tenant, docs[3:],
                                       lambda: sum(len(p["seq_num"]) for p in pages),
                                       stored=len(events_of(docs[:3])), chunk=7)
    seq = [s for p in pages for s in p["seq_num"]]
    assert seq == list(range(1, N + 1))
    assert len(pages) > 1


async def test_wait(metadata_uri: str, zarr_root: Path, tenant: str,
                    looks: WaitLooks) -> None:
    """More is stored once ``wait()`` has taken its first look at the run (waits on that
    look, not on a pause); ``wait()`` is given far more time than it should need, and a
    stopped run's ``wait(30)`` must return well within its 30 s."""
    docs = live_run()
    await ingest(metadata_uri, zarr_root, tenant, docs[:5])
    async with bluestream.open_catalog_async(tenant, metadata=metadata_uri,
                                             zarr_root=zarr_root, poll_interval=0.05) as acat:
        run = await acat[-1]
        assert await run.wait(0.3) is False  # nothing new

        async def later(part: Docs) -> None:
            await looks.after_next()
            await ingest(metadata_uri, zarr_root, tenant, part, start_offset=5)

        async with anyio.create_task_group() as tg:
            tg.start_soon(later, docs[5:10])
            with anyio.fail_after(DEADLINE + 10):
                assert await run.wait(DEADLINE) is True
        ds = await run["primary"].read()
        assert ds.sizes["time"] == 8
        async with anyio.create_task_group() as tg:
            tg.start_soon(later, docs[10:])
            with anyio.fail_after(DEADLINE + 10):
                while run.metadata["stop"] is None:  # wait() refreshes the metadata
                    assert await run.wait(DEADLINE) is True
        assert (await run["primary"].read()).sizes["time"] == N
        with anyio.fail_after(10):
            assert await run.wait(30) is False  # stopped: returns at once, not in 30 s


async def test_sync_catalog_on_a_running_loop(metadata_uri: str, zarr_root: Path,
                                              tenant: str, looks: WaitLooks) -> None:
    """The synchronous catalog works where a loop already runs (as in Jupyter), and its
    blocking calls can wait in a worker thread while this loop stores more data. The rest
    of the run is stored once the blocking ``wait()`` has taken its first look at the run
    (waits on that look)."""
    docs = live_run()
    await ingest(metadata_uri, zarr_root, tenant, docs[:4])
    cat = bluestream.open_catalog(tenant, metadata=metadata_uri, zarr_root=zarr_root,
                                  poll_interval=0.05)

    async def store_the_rest() -> None:
        await looks.after_next()
        for i in range(4, len(docs), 5):
            await ingest(metadata_uri, zarr_root, tenant, docs[i:i + 5], start_offset=i + 100)

    try:
        run = cat[-1]
        assert run["primary"].read().sizes["time"] == 2
        async with anyio.create_task_group() as tg:
            tg.start_soon(store_the_rest)
            with anyio.fail_after(DEADLINE + 10):
                assert await anyio.to_thread.run_sync(run.wait, DEADLINE) is True
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
