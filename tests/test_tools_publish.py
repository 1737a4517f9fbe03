"""``publish``: suitcase files -> Kafka (bluesky-kafka wire format, keyed by start uid)
-> the daemon, running in this process -> stored; read back equal through the catalog."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiokafka import AIOKafkaConsumer

from bluestream.catalog.core import open_catalog_async
from bluestream.consumers.decode import decode_message
from bluestream.daemon.service import Daemon
from bluestream.settings import Settings
from bluestream.tools.publish import publish_files
from test_catalog_support import canonical, re_runs
from test_tools_support import make_settings, write_suitcase

pytestmark = [pytest.mark.kafka, pytest.mark.anyio]


@pytest.fixture
def settings(kafka_bootstrap: str, kafka_topic: str, tmp_path: Path, zarr_root: Path
             ) -> Settings:
    s = make_settings(f"sqlite:///{tmp_path / 'meta.db'}", zarr_root,
                      BLUESTREAM_KAFKA_BOOTSTRAP=kafka_bootstrap,
                      BLUESTREAM_TOPICS=kafka_topic, BLUESTREAM_GROUP_ID=f"g-{kafka_topic}")
    return s.model_copy(update={"http": s.http.model_copy(update={"enabled": False})})


@pytest.fixture
async def daemon(settings: Settings) -> AsyncIterator[Daemon]:
    d = Daemon(settings, handle_signals=False)
    async with anyio.create_task_group() as tg:
        tg.start_soon(d.run)
        with anyio.fail_after(60):
            await poll(lambda: bool(d.ready and d.source and d.source.state.assigned))
        yield d
        d.stop.set()


async def poll(condition: Callable[[], bool]) -> None:
    """Check every 0.1 s (the daemon offers no event for "partitions assigned")."""
    while True:
        if condition():
            return
        await anyio.sleep(0.1)


async def keys_and_names(bootstrap: str, topic: str, n: int) -> list[tuple[str, str, str]]:
    """(key, document name, uid or run_start) of the first ``n`` records of ``topic``."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    out: list[tuple[str, str, str]] = []
    try:
        with anyio.fail_after(30):
            while len(out) < n:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for rec in records:
                        name, doc = decode_message(rec.value, max_bytes=1 << 30)
                        out.append((rec.key.decode(), name, doc.get("run_start", doc["uid"])
                                    if name in ("start", "stop", "descriptor") else ""))
    finally:
        await consumer.stop()
    return out


async def test_published_files_are_stored(daemon: Daemon, settings: Settings, tenant: str,
                                          kafka_bootstrap: str, kafka_topic: str,
                                          tmp_path: Path) -> None:
    runs = list(re_runs().values())
    files = [*write_suitcase(runs[:2], "jsonl", tmp_path),
             *write_suitcase(runs[2:], "msgpack", tmp_path)]
    report = await publish_files(files, topic=kafka_topic, settings=settings)
    assert report.ok and report.runs == len(runs)

    uids = [docs[0][1]["uid"] for docs in runs]
    deadline = time.monotonic() + 60
    async with open_catalog_async(tenant, metadata=settings.storage.metadata,
                                  zarr_root=settings.storage.zarr_root,
                                  timeout=10) as cat:
        while True:
            done = [u for u in uids if await cat.contains(u)
                    and (await cat.lookup(u)).stop is not None]
            if len(done) == len(uids):
                break
            assert time.monotonic() < deadline, f"stored only {done}"
            await anyio.sleep(0.2)
        for docs in runs:
            run = await cat.lookup(docs[0][1]["uid"])
            assert canonical([item async for item in run.documents()]) == canonical(docs)
    assert daemon.counters.total("dead_lettered") == 0

    records = await keys_and_names(kafka_bootstrap, kafka_topic, report.documents)
    for key, _, run_start in records:
        assert key in uids
        assert not run_start or run_start == key  # every run's documents carry its uid
    assert [k for k, name, _ in records if name == "start"] == uids


def test_run_keys_follow_references() -> None:
    from bluestream.tools.publish import RunKeys

    keys = RunKeys()
    got: list[Any] = [
        keys.key("start", {"uid": "r1"}),
        keys.key("descriptor", {"uid": "d1", "run_start": "r1"}),
        keys.key("resource", {"uid": "res1", "run_start": "r1"}),
        keys.key("start", {"uid": "r2"}),
        keys.key("event", {"descriptor": "d1"}),  # r1's, though r2 started since
        keys.key("datum", {"resource": "res1"}),
        keys.key("event_page", {"descriptor": "unknown"}),  # falls back to the current run
        keys.key("stop", {"run_start": "r1"}),
    ]
    assert got == ["r1", "r1", "r1", "r2", "r1", "r1", "r2", "r1"]
