"""A store failure in the very first batch of a partition, before anything was ever
committed for it, must rewind to that batch's first record, not continue past it
(aiokafka's seek_to_committed does nothing without a committed offset; an early version
lost exactly this batch). A wrapper around the real Zarr store injects the failure; the
broker and the metadata store are real."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from aiokafka import AIOKafkaProducer

import bluestream.daemon.service as service_module
from bluestream.consumers.decode import encode_message
from bluestream.daemon.service import Daemon
from bluestream.errors import StorageError
from bluestream.storage.backends import open_metadata_store
from bluestream.storage.zarr_store import ZarrEventStore
from helpers import assert_stored_events, scalar_run
from test_ingest_kafka import settings_for, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.anyio]


class FailsFirstWrites(ZarrEventStore):
    """The real store, except that the first ``n`` batches fail like a full disk when
    they are made durable (every batch syncs, whether its rows went to the arrays or to
    the streams' tails)."""

    failures = 2

    async def sync(self) -> None:
        if FailsFirstWrites.failures > 0:
            FailsFirstWrites.failures -= 1
            raise StorageError(f"syncing Zarr files under {self.root} failed: [Errno 28] "
                               "No space left on device (injected)")
        await super().sync()


async def test_failed_first_batch_is_read_again(kafka_bootstrap: str, kafka_topic: str,
                                                tenant: str, tmp_path: Path, zarr_root: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service_module, "ZarrEventStore", FailsFirstWrites)
    metadata = f"sqlite:///{tmp_path}/meta.db"
    settings = settings_for(kafka_bootstrap, kafka_topic, metadata, zarr_root)
    settings = settings.model_copy(update={"retry_backoff_max_s": 0.5})
    daemon = Daemon(settings, handle_signals=False)
    run = scalar_run(200, scan_id=4)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    store = open_metadata_store(metadata, tenant)
    try:
        for name, doc in run:
            await producer.send(kafka_topic, encode_message(name, doc), key=b"k")
        await producer.flush()
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon.run)
            await store.open()

            async def stopped() -> bool:
                return await store.get("stop", run[0][1]["uid"]) is not None
            await wait_for(stopped, 60, "the run")
            daemon.stop.set()
    finally:
        await producer.stop()
        await store.close()
    assert FailsFirstWrites.failures == 0
    assert daemon.counters.get("errors", "storage") == 2
    assert_stored_events(zarr_root, tenant, run, metadata)
