"""Backpressure and bounded memory (DESIGN I5; README, "Backpressure": "One loop fetches a
batch (bounded by ``limits.batch_max_records`` and ``limits.batch_max_bytes``), stores it,
commits, and only then fetches the next, so a slow store pauses consumption instead of
filling memory").

1. In process: the real Zarr store slowed down by a wrapper (every page write first
   sleeps), a backlog of many batches already in the topic. While the daemon works
   through it, a sampler in the same event loop records per partition: what the consumer
   handed out (its position), what the daemon stored (``state.positions``), what is
   committed, and the bytes aiokafka holds fetched but not yet handed out. Handed out
   and stored minus committed never exceed ``batch_max_records``; the fetch buffer never
   exceeds one fetch (``batch_max_bytes``, at least 1 MiB per partition). aiokafka does
   prefetch the next fetch while a batch is written (so the README's "only then fetches
   the next" holds per batch handed to the writer, not per broker fetch); what it may
   hold ahead is that one fetch, which is what is asserted.
2. A subprocess daemon (``bluestream serve``), ``batch_max_bytes`` 4 MiB, frozen with
   SIGSTOP while 216 MB of 480 KiB frames are published to its topic, then let go: its
   peak RSS (``VmHWM``) stays under its idle RSS plus ``RSS_BUDGET`` (see there for the
   reasoning and the measured values).

How each test was shown to fail, in a copy of the tree run with
``PYTHONPATH=/tmp/bs-break/src`` (the copy's code wins over the editable install), one
break at a time in ``consumers/kafka.py``:
(a) ``_step`` calling ``getmany`` without ``max_records`` (a batch is whatever the
fetch buffer holds): test 1 failed, handed out minus committed reached 449 records
against the bound of 50 (test 2 passed: its batches are bounded by bytes anyway);
(b) the consumer built with ``fetch_max_bytes`` and ``max_partition_fetch_bytes`` of
64 MiB (``batch_max_bytes`` ignored): test 1 failed on the fetch buffer (4,623,699 bytes
against the bound of 1,114,112) and test 2 failed, peak RSS 268 MiB over the idle RSS
against the budget of 64 MiB;
(c) ``_step`` reading ahead, calling ``getmany`` again until nothing more came within
100 ms, then writing all of it (fetching decoupled from writing): test 1 failed, handed
out minus committed 2,003 (the whole backlog), and test 2 failed, peak RSS 667 MiB over
idle.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import event_model
import numpy as np
import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

import bluestream.daemon.service as service_module
from bluestream.consumers.kafka import records_for
from bluestream.consumers.pipeline import Ingestor
from bluestream.daemon.service import Daemon
from bluestream.settings import LimitSettings
from bluestream.storage.zarr_store import ZarrEventStore
from conftest import create_topic
from helpers import (
    assert_stored_events,
    image_run,
    new_uid,
    page_run,
    publish_docs,
    stored_stop,
)
from test_ingest_kafka import settings_for, wait_for
from test_ops_support import DaemonProcess, daemon_config

pytestmark = [pytest.mark.kafka, pytest.mark.anyio]

MiB = 1024 * 1024


# -- 1. in process: a slow store, sampled bounds ------------------------------------------
class SlowZarr(ZarrEventStore):
    """The real Zarr store; every page write first waits ``delay_s`` (a slow disk).
    ``writing`` counts writes in progress, so samples can be told apart."""

    delay_s = 0.1
    writing = 0

    async def write_page(self, *args: Any, **kwargs: Any) -> Any:
        SlowZarr.writing += 1
        try:
            await anyio.sleep(SlowZarr.delay_s)
            return await super().write_page(*args, **kwargs)
        finally:
            SlowZarr.writing -= 1


@dataclass(frozen=True)
class Sample:
    handed: int  # the consumer's position: records getmany returned so far
    stored: int  # state.positions: records the daemon stored
    committed: int
    buffered_bytes: int  # fetched from the broker, not yet handed out (aiokafka's buffer)
    writing: bool


def fetch_buffer_bytes(consumer: Any, tp: TopicPartition) -> int:
    """Bytes of the fetch response aiokafka holds for ``tp`` (0 when none). aiokafka
    keeps at most one per partition and fetches again only once it is drained; this
    reads its private fields, so an aiokafka upgrade that renames them fails here."""
    try:
        result = consumer._fetcher._records.get(tp)
        if result is None:
            return 0
        records = result._partition_records
        return 0 if records is None else int(records._records.size_in_bytes())
    except AttributeError as exc:  # pragma: no cover - aiokafka internals changed
        raise AssertionError(f"aiokafka's fetch buffer is not where it was: {exc}") from exc


async def _sample(daemon: Daemon, tp: tuple[str, int], samples: list[Sample],
                  done: anyio.Event) -> None:
    """Every ~10 ms (pacing, not synchronisation), one consistent sample: each read is
    synchronous within one event-loop step (``position`` does not suspend once the
    partition has a position), so no batch can move in between."""
    ktp = TopicPartition(*tp)
    while not done.is_set():
        src = daemon.source
        if src is not None and tp in src.state.assigned and ktp in src.consumer.assignment():
            committed = src.state.committed.get(tp, 0)
            stored = src.state.positions.get(tp, committed)
            with anyio.move_on_after(1):
                handed = await src.consumer.position(ktp)
                samples.append(Sample(handed, stored, committed,
                                      fetch_buffer_bytes(src.consumer, ktp),
                                      SlowZarr.writing > 0))
        await anyio.sleep(0.01)


async def test_slow_store_bounds_what_is_fetched_ahead(
        kafka_bootstrap: str, kafka_topic: str, tenant: str, tmp_path: Path,
        zarr_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    batch_records, batch_bytes = 50, 1 * MiB
    monkeypatch.setattr(service_module, "ZarrEventStore", SlowZarr)
    monkeypatch.setattr(SlowZarr, "writing", 0)
    metadata = f"sqlite:///{tmp_path}/meta.db"
    settings = settings_for(kafka_bootstrap, kafka_topic, metadata, zarr_root,
                            batch_max_records=batch_records, batch_max_bytes=batch_bytes)
    # ~2.1 KiB per message: 2,000 events are ~40 batches and ~4 fetches of 1 MiB.
    run = image_run(2000, shape=(32, 32), scan_id=5)
    published = await publish_docs(kafka_bootstrap, kafka_topic, run)
    assert published > 4 * batch_bytes and len(run) > 40 * batch_records
    tp = (kafka_topic, 0)
    samples: list[Sample] = []
    daemon = Daemon(settings, handle_signals=False)
    done = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        tg.start_soon(_sample, daemon, tp, samples, done)

        async def all_committed() -> bool:
            return bool(daemon.source) and daemon.source.state.committed.get(tp) == len(run)
        await wait_for(all_committed, 240, "the whole backlog to be stored and committed")
        done.set()
        daemon.stop.set()
    assert_stored_events(zarr_root, tenant, run, metadata)
    assert await stored_stop(metadata, tenant, run[0][1]["uid"])

    worst_handed = max(samples, key=lambda s: s.handed - s.committed)
    worst_stored = max(samples, key=lambda s: s.stored - s.committed)
    worst_buffer = max(s.buffered_bytes for s in samples)
    during = [s for s in samples if s.writing]
    print(f"\n{len(samples)} samples ({len(during)} during writes): handed out - committed "
          f"<= {worst_handed.handed - worst_handed.committed}, stored - committed <= "
          f"{worst_stored.stored - worst_stored.committed}, fetch buffer <= "
          f"{worst_buffer} bytes; {published} bytes published")
    # Two batches at most: one being flushed, the next one prepared meanwhile.
    assert worst_handed.handed - worst_handed.committed <= 2 * batch_records, worst_handed
    assert any(s.handed - s.committed > batch_records for s in during), \
        "no sample saw a batch prepared while the previous one was written"
    assert worst_stored.stored - worst_stored.committed <= batch_records, worst_stored
    # One fetch: the broker returns at most max_partition_fetch_bytes per partition
    # (the daemon sets max(1 MiB, batch_max_bytes)); 64 KiB for framing.
    fetch_bound = max(MiB, batch_bytes) + 64 * 1024
    assert worst_buffer <= fetch_bound, (worst_buffer, fetch_bound)
    # The samples saw the daemon at work: writes in progress, a batch in hand, and the
    # next fetch buffered meanwhile (so the bounds above were exercised, not vacuous).
    assert len(during) >= 20, f"only {len(during)} samples during writes"
    assert max(s.handed - s.committed for s in during) > 0
    assert max(s.buffered_bytes for s in during) > 0


# -- 1b. event pages: batches bounded by decoded events, not only by records -------------
def test_records_for_follows_events_per_record() -> None:
    lim = LimitSettings(batch_max_records=20_000, batch_max_events=20_000)
    assert records_for(500, 500, lim) == 20_000  # single events: the record bound
    assert records_for(0, 0, lim) == 20_000
    assert records_for(200, 20_000, lim) == 200  # pages of 100
    assert records_for(2, 200_000, lim) == 1  # pages of 100,000: one at a time
    assert records_for(1_000, 2_000, LimitSettings(batch_max_records=300)) == 300


async def test_event_pages_batched_by_events(
        kafka_bootstrap: str, kafka_topic: str, tenant: str, tmp_path: Path,
        zarr_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backlog of pages of 100 events with ``batch_max_events`` 1,000 (and a record
    bound far above): no batch holds more than about 1,000 events (the next fetch's
    record count is judged from the previous batch's events per record, start and
    descriptor included, so a batch after the first may overshoot by a few pages), and
    every event is stored once.

    Checked to fail: with ``_step`` fetching ``batch_max_records`` always (the events
    bound ignored), the largest batch held the whole backlog (30,000 events)."""
    sizes: list[int] = []
    original = Ingestor.prepare

    async def recording(self: Ingestor, envelopes: Any) -> Any:
        batch = await original(self, envelopes)
        sizes.append(batch.event_count())
        return batch
    monkeypatch.setattr(Ingestor, "prepare", recording)
    metadata = f"sqlite:///{tmp_path}/meta.db"
    settings = settings_for(kafka_bootstrap, kafka_topic, metadata, zarr_root,
                            batch_max_records=5_000, batch_max_events=1_000)
    run = page_run(30_000, 100, scan_id=6)
    await publish_docs(kafka_bootstrap, kafka_topic, run)
    tp = (kafka_topic, 0)
    daemon = Daemon(settings, handle_signals=False)
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)

        async def all_committed() -> bool:
            return bool(daemon.source) and daemon.source.state.committed.get(tp) == len(run)
        await wait_for(all_committed, 120, "the pages to be stored and committed")
        daemon.stop.set()
    assert_stored_events(zarr_root, tenant, run, metadata)
    with_events = [n for n in sizes if n]
    assert sum(with_events) == 30_000
    assert len(with_events) >= 25, sizes
    assert max(with_events) <= 1_300, sizes
    assert sum(n <= 1_000 for n in with_events) >= len(with_events) - 2, sizes


# -- 2. a subprocess: peak RSS with 200+ MB waiting ----------------------------------------
#: ``limits.batch_max_bytes`` of the subprocess daemon.
BATCH_BYTES = 4 * MiB
#: Peak RSS allowed above the idle daemon's RSS. What one batch of B = batch_max_bytes can
#: hold at once: aiokafka's next fetch (<= B), the fetch in hand and the records' values
#: (<= 2B), the decoded frames and the page they are concatenated into (<= 2B), and
#: Zarr's chunk buffers (chunks target 4 MiB: read, encode, write, ~3 x 4 MiB). That is
#: about 5B + 12 MiB = 32 MiB; twice that for allocator slack and what the first write
#: imports lazily (codecs). Measured here (2 cores, Python 3.11): idle RSS 76 MiB, peak
#: 116-119 MiB (40-43 MiB over idle) while 216 MB were waiting in the topic; a daemon that
#: ignores batch_max_bytes for its fetches peaked 268 MiB over idle, one that reads ahead
#: without bound 667 MiB.
RSS_BUDGET = 64 * MiB
FRAME = (480, 512)  # uint16: 480 KiB per message, under Kafka's default 1 MB limit
FRAMES = 440  # ~211 MB


def _rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in bytes, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def _frames_run(uid: str, n: int, t0: float) -> Iterator[tuple[str, dict[str, Any]]]:
    """A run of ``n`` large frames, made one at a time (the test process holds ~one)."""
    bundle = event_model.compose_run(uid=uid, time=t0,
                                     metadata={"scan_id": 9, "plan_name": "count"})
    keys = {"cam": {"dtype": "array", "shape": list(FRAME), "source": "sim:cam",
                    "dtype_numpy": "<u2"}}
    desc = bundle.compose_descriptor(name="primary", data_keys=keys, time=t0)
    yield "start", bundle.start_doc
    yield "descriptor", desc.descriptor_doc
    for i in range(1, n + 1):
        frame = np.full(FRAME, i, dtype=np.uint16)  # compresses well: the disk stays small
        yield "event", desc.compose_event(data={"cam": frame}, timestamps={"cam": t0 + i},
                                          seq_num=i, time=t0 + i)
    yield "stop", bundle.compose_stop(time=t0 + n + 1)


@dataclass
class _RssWatch:
    pid: int
    samples: list[int] = field(default_factory=list)

    def sample(self) -> None:
        self.samples.append(_rss(self.pid)[0])


async def _delete_topic(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topic])
    finally:
        await admin.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_rss_bounded_with_a_large_backlog(kafka_bootstrap: str, topic: str, tenant: str,
                                          tmp_path: Path, zarr_root: Path) -> None:
    anyio.run(create_topic, kafka_bootstrap, topic)
    uid = new_uid()
    metadata = f"sqlite:///{tmp_path}/meta.db"
    config = daemon_config(
        tmp_path / "daemon.toml", bootstrap=kafka_bootstrap, topic=topic,
        group=f"g-{topic}", metadata=metadata, zarr_root=zarr_root,
        kafka={"session_timeout_ms": 60_000},
        limits={"batch_max_bytes": BATCH_BYTES})
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        daemon.wait_ready(timeout=120)
        idle_rss, _ = _rss(daemon.pid)
        # Frozen while the backlog is published: when it wakes, all of it is waiting.
        daemon.signal(signal.SIGSTOP)
        try:
            published = anyio.run(_publish_frames, kafka_bootstrap, topic, uid)
        finally:
            daemon.signal(signal.SIGCONT)
        assert published > 200 * 10**6
        watch = _RssWatch(daemon.pid)

        async def stored() -> bool:
            assert daemon.alive(), daemon.tail()
            watch.sample()
            return await stored_stop(metadata, tenant, uid)
        anyio.run(wait_for, stored, 400.0, "the 200 MB run to be stored")
        _, peak = _rss(daemon.pid)
        assert daemon.terminate() == 0
    finally:
        daemon.kill()
        anyio.run(_delete_topic, kafka_bootstrap, topic)
    over = peak - idle_rss
    print(f"\nidle RSS {idle_rss / MiB:.0f} MiB, peak (VmHWM) {peak / MiB:.0f} MiB, "
          f"{over / MiB:.0f} MiB over idle; largest sampled RSS while ingesting "
          f"{max(watch.samples) / MiB:.0f} MiB; {published / 1e6:.0f} MB published; "
          f"budget {RSS_BUDGET / MiB:.0f} MiB")
    assert over <= RSS_BUDGET, (
        f"peak RSS {peak / MiB:.0f} MiB is {over / MiB:.0f} MiB over the idle "
        f"{idle_rss / MiB:.0f} MiB; budget {RSS_BUDGET / MiB:.0f} MiB")


async def _publish_frames(bootstrap: str, topic: str, uid: str) -> int:
    return await publish_docs(bootstrap, topic, _frames_run(uid, FRAMES, time.time()),
                              max_request_size=2 * MiB)
