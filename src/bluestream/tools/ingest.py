"""``bluestream ingest``: store document files directly, without Kafka.

The records of each file go through the daemon's own :class:`Ingestor` as envelopes
(topic ``file:<path>``, offset = line or record number), so validation, normalisation,
idempotent writes and provenance are exactly those of the Kafka path; ingesting a file
twice stores the same bytes. Batches are bounded in count and bytes (images!), which
also bounds memory.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bluestream.consumers.envelope import Envelope
from bluestream.consumers.pipeline import Ingestor
from bluestream.settings import Settings
from bluestream.storage.registry import StoreRegistry
from bluestream.storage.rules import check_tenant
from bluestream.storage.zarr_store import ZarrEventStore
from bluestream.tools.files import FileFormatError, is_provenance_file, iter_records
from bluestream.tools.progress import Progress
from bluestream.tools.rejects import Rejection, ReportingSink, drain_parked

__all__ = ["BATCH_BYTES", "BATCH_RECORDS", "IngestReport", "ingest_files", "open_ingestor"]

BATCH_RECORDS = 2000
BATCH_BYTES = 64 * 1024 * 1024


@dataclass
class IngestReport:
    files: int = 0
    documents: int = 0  # records read (stored, already stored, or rejected)
    runs: int = 0  # start documents read
    events: int = 0  # event rows written
    seconds: float = 0.0
    rejections: list[Rejection] = field(default_factory=list)

    @property
    def rejected(self) -> int:
        return len(self.rejections)

    @property
    def ok(self) -> bool:
        return not self.rejections

    def summary(self, what: str = "") -> str:
        stored = self.documents - self.rejected
        return (f"{what}{self.files} file(s): {stored} of {self.documents} documents stored "
                f"({self.runs} runs, {self.events} events), {self.rejected} rejected, "
                f"in {self.seconds:.1f} s")


@asynccontextmanager
async def open_ingestor(settings: Settings, sink: ReportingSink
                        ) -> AsyncIterator[tuple[Ingestor, StoreRegistry]]:
    """An Ingestor on the configured stores (and their registry), closed afterwards.

    Parked documents never expire by age here: an import's input is complete, so
    whatever still waits at the end is reported by :func:`drain_parked` instead.
    """
    s = settings
    registry = StoreRegistry(
        s.storage.metadata,
        server_selection_timeout_ms=s.storage.mongo_server_selection_timeout_ms)
    arrays = ZarrEventStore(s.storage.zarr(), fsync=s.storage.fsync,
                            tail_rows=s.storage.tail_rows)
    ingestor = Ingestor(store_for=registry, arrays=arrays, dlq=sink, limits=s.limits.limits(),
                        park_max_count=s.limits.park_max_count, park_max_age_s=math.inf)
    try:
        yield ingestor, registry
    finally:
        await registry.aclose()


class Batcher:
    """Collects envelopes and hands them to the Ingestor in bounded batches."""

    def __init__(self, ingestor: Ingestor, *, max_records: int = BATCH_RECORDS,
                 max_bytes: int = BATCH_BYTES,
                 on_flush: Callable[[int], None] | None = None) -> None:
        self.ingestor = ingestor
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.on_flush = on_flush
        self._batch: list[Envelope] = []
        self._bytes = 0

    async def add(self, env: Envelope) -> None:
        self._batch.append(env)
        self._bytes += len(env.value or b"")
        if len(self._batch) >= self.max_records or self._bytes >= self.max_bytes:
            await self.flush()

    async def flush(self) -> None:
        if not self._batch:
            return
        batch, n = self._batch, len(self._batch)
        self._batch, self._bytes = [], 0
        await self.ingestor.process(batch)
        if self.on_flush is not None:
            self.on_flush(n)


async def ingest_files(paths: Sequence[str | os.PathLike[str]], *, tenant: str,
                       settings: Settings, progress: Progress | None = None,
                       on_reject: Callable[[Rejection], None] | None = None,
                       batch_records: int = BATCH_RECORDS,
                       batch_bytes: int | None = None) -> IngestReport:
    """Store every document of ``paths`` (in order) for ``tenant``; see the module doc."""
    check_tenant(tenant)
    t0 = time.monotonic()
    paths = [p for p in paths if not is_provenance_file(p)]  # beside exported runs
    report = IngestReport(files=len(paths))
    sink = ReportingSink(on_reject=on_reject)
    max_bytes = settings.limits.max_message_bytes
    consumed = 0  # bytes of input handed to batches, for the progress bar
    pending_bytes = 0

    def flushed(n: int) -> None:
        nonlocal consumed, pending_bytes
        consumed, pending_bytes = consumed + pending_bytes, 0
        if progress is not None:
            progress.update(0, docs=report.documents, rejected=len(sink.rejections))
            progress.done = consumed

    async with open_ingestor(settings, sink) as (ingestor, _):
        batcher = Batcher(ingestor, max_records=batch_records,
                          max_bytes=batch_bytes or settings.limits.batch_max_bytes,
                          on_flush=flushed)
        for path in paths:
            topic = f"file:{path}"
            last_end = 0
            try:
                for rec in iter_records(path, max_bytes=max_bytes):
                    report.documents += 1
                    pending_bytes += rec.end - last_end
                    last_end = rec.end
                    await batcher.add(Envelope(topic, 0, rec.index, rec.value, tenant=tenant))
            except FileFormatError as exc:
                report.documents += 1
                sink.add(Rejection(exc.where, "unreadable", str(exc).split(": ", 1)[1]))
            pending_bytes += _size(path) - last_end
        await batcher.flush()
        await drain_parked(ingestor)
        report.runs = int(ingestor.counters.get("documents", "start"))
        report.events = int(ingestor.counters.total("events"))
    report.rejections = sink.rejections
    report.seconds = time.monotonic() - t0
    if progress is not None:
        progress.done = consumed + pending_bytes
        progress.update(0, docs=report.documents, rejected=report.rejected)
        progress.close()
    return report


def _size(path: str | os.PathLike[str]) -> int:
    try:
        return Path(path).stat().st_size
    except OSError:
        return 0
