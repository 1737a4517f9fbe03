"""End to end through the real broker: a bluesky RunEngine publishes with bluesky-kafka's
Publisher, the daemon stores, storage holds every document, values bit-exact."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from bluestream.daemon.service import Daemon
from bluestream.settings import load_settings
from bluestream.storage.backends import open_metadata_store
from helpers import assert_stored_events

pytestmark = [pytest.mark.kafka, pytest.mark.anyio]


def settings_for(kafka: str, topic: str, metadata: str, zarr_root: Path, **limits: Any):
    env = {"BLUESTREAM_KAFKA_BOOTSTRAP": kafka, "BLUESTREAM_TOPICS": topic,
           "BLUESTREAM_GROUP_ID": f"g-{topic}", "BLUESTREAM_METADATA": metadata,
           "BLUESTREAM_ZARR_ROOT": str(zarr_root)}
    s = load_settings(None, environ=env)
    return s.model_copy(update={
        "http": s.http.model_copy(update={"enabled": False}),
        "limits": s.limits.model_copy(update=limits),
    })


@pytest.fixture(params=["sqlite", "mongo"])
def metadata_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/meta.db"
    uri: str = request.getfixturevalue("mongo_uri")
    return uri


async def wait_for(predicate: Any, within: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await predicate():
            return
        await anyio.sleep(0.2)
    raise AssertionError(f"timed out after {within} s waiting for {what}")


@pytest.fixture
async def running_daemon(kafka_bootstrap: str, kafka_topic: str, metadata_uri: str,
                         zarr_root: Path) -> AsyncIterator[Daemon]:
    daemon = Daemon(settings_for(kafka_bootstrap, kafka_topic, metadata_uri, zarr_root),
                    handle_signals=False)
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        await wait_for(_assigned(daemon), 60, "the daemon to be assigned its partition")
        yield daemon
        daemon.stop.set()


def _assigned(daemon: Daemon) -> Any:
    async def check() -> bool:
        return daemon.ready and bool(daemon.source and daemon.source.state.assigned)
    return check


def run_plans_with_publisher(kafka: str, topic: str, tmp_path: Path) -> list[tuple[str, Any]]:
    """A RunEngine with ophyd's simulated devices, publishing through bluesky-kafka."""
    from bluesky import RunEngine
    from bluesky.plans import count, scan
    from bluesky_kafka import Publisher
    from ophyd.sim import DirectImage, SynAxis, SynGauss

    motor = SynAxis(name="motor")
    det = SynGauss("det", motor, "motor", center=0, Imax=1, sigma=1)
    rng = np.random.default_rng(7)
    cam = DirectImage(func=lambda: rng.integers(0, 4096, size=(64, 48), dtype=np.uint16),
                      name="cam")
    RE = RunEngine({}, call_returns_result=False, context_managers=[])  # runs in a thread
    docs: list[tuple[str, Any]] = []
    publisher = Publisher(topic=topic, bootstrap_servers=kafka, key="bluestream-test",
                          flush_on_stop_doc=True)
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    RE.subscribe(publisher)
    RE(count([det], 5))
    RE(scan([det], motor, -1, 1, 11))
    RE(count([cam], 7))
    publisher.flush()
    return docs


async def test_runengine_documents_stored_bit_exact(
        running_daemon: Daemon, kafka_bootstrap: str, topic: str, tenant: str,
        metadata_uri: str, zarr_root: Path, tmp_path: Path) -> None:
    docs = await anyio.to_thread.run_sync(run_plans_with_publisher, kafka_bootstrap, topic,
                                          tmp_path)
    starts = [d for n, d in docs if n == "start"]
    store = open_metadata_store(metadata_uri, tenant)
    await store.open()
    try:
        async def all_stopped() -> bool:
            return all([await store.get("stop", s["uid"]) is not None for s in starts])
        await wait_for(all_stopped, 60, "every run's stop document")
        for name, doc in docs:
            if name in ("start", "descriptor"):
                stored = await store.get(name, doc["uid"])
                assert stored is not None and stored["uid"] == doc["uid"]
        assert_stored_events(zarr_root, tenant, docs, metadata_uri)
        streams = {s["descriptor_uid"]: s for st in starts
                   for s in await store.streams(st["uid"])}
        n_events = sum(1 for n, _ in docs if n == "event")
        assert sum(s["length"] for s in streams.values()) == n_events
        log = await store.ingest_log(starts[0]["uid"])
        assert log and log[0]["topic"] == topic
    finally:
        await store.close()
    assert running_daemon.counters.total("dead_lettered") == 0
