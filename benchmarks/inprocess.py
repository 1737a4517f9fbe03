"""bluestream's ingest pipeline driven in process (no Kafka): for writing test data fast
and for finding where the daemon's time goes.

:class:`StageTimer` wraps the pipeline's stages (module functions and methods, restored
afterwards) and adds up wall time per stage, plus the time the garbage collector pauses
the process (``gc.callbacks``). The stages run one after another inside
``Ingestor.process``, so wall time is the cost of each.
"""

from __future__ import annotations

import functools
import gc
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio

import bluestream.consumers.pipeline as pipeline
from bluestream.consumers.decode import encode_message
from bluestream.consumers.envelope import Envelope
from bluestream.consumers.pipeline import Ingestor
from bluestream.errors import DocumentError
from bluestream.settings import LimitSettings
from bluestream.storage.base import MetadataStore
from bluestream.storage.registry import StoreRegistry
from bluestream.storage.zarr_store import ZarrEventStore

__all__ = ["StageTimer", "batches", "ingest_in_process", "process_batches"]

Doc = dict[str, Any]


class FailOnDeadLetter:
    """Benchmark documents are valid: a dead letter means the benchmark is broken."""

    async def send(self, env: Envelope, error: DocumentError) -> None:
        raise RuntimeError(f"benchmark document dead-lettered: {error}")

    async def flush(self) -> None:
        return None


def batches(docs: Iterable[tuple[str, Doc]], tenant: str, max_records: int | None = None
            ) -> Iterator[list[Envelope]]:
    """Encoded envelopes, cut into batches the way the daemon's fetch cuts them (or into
    ``max_records``, e.g. the small batches a daemon sees when it keeps up live)."""
    lim = LimitSettings()
    limit = max_records or lim.batch_max_records
    batch: list[Envelope] = []
    size = 0
    for offset, (name, doc) in enumerate(docs):
        value = encode_message(name, doc)
        batch.append(Envelope("file:bench", 0, offset, value, tenant=tenant))
        size += len(value)
        if len(batch) >= limit or size >= lim.batch_max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


async def _process(uri: str, zarr_root: Path, envelope_batches: Iterable[list[Envelope]],
                   fsync: bool) -> None:
    registry = StoreRegistry(uri)
    ingestor = Ingestor(store_for=registry, arrays=ZarrEventStore(zarr_root, fsync=fsync),
                        dlq=FailOnDeadLetter(), limits=LimitSettings().limits())
    try:
        for batch in envelope_batches:
            await ingestor.process(batch)
    finally:
        await registry.aclose()


def process_batches(uri: str, zarr_root: Path, envelope_batches: Iterable[list[Envelope]],
                    *, fsync: bool = True) -> None:
    """Run batches through a fresh ``Ingestor`` (as one daemon would; ``fsync`` as the
    ``storage.fsync`` setting)."""
    anyio.run(_process, uri, zarr_root, envelope_batches, fsync)


def ingest_in_process(uri: str, zarr_root: Path, tenant: str,
                      docs: Iterable[tuple[str, Doc]]) -> None:
    """Store documents through bluestream's pipeline; encoding happens lazily."""
    process_batches(uri, zarr_root, batches(docs, tenant))


# -- stage timing -------------------------------------------------------------------------
#: (owner, attribute, stage name). Module functions are patched where the pipeline
#: looks them up. Nested stages (zarr.*) are also inside their parent (write_page).
_STAGES: list[tuple[Any, str, str]] = [
    (Ingestor, "process", "total"),
    (Ingestor, "prepare", "prepare (decode+route)"),
    (pipeline, "decode_document", "decode"),
    (pipeline, "validate", "validate"),
    (Ingestor, "_route", "route"),
    (Ingestor, "_pages", "page building"),
    (pipeline, "concat_pages", "concat pages"),
    (ZarrEventStore, "write_page", "zarr write_page"),
    (ZarrEventStore, "_group", "zarr.open_group"),
    (ZarrEventStore, "_array", "zarr.open/create arrays"),
    (ZarrEventStore, "_grow", "zarr.grow (reopen+resize)"),
    (ZarrEventStore, "sync", "zarr sync (fsync)"),  # after the writes, not inside them
]
_STORE_METHODS = ("put_documents", "update_streams", "log_ingest", "get")


class StageTimer:
    """``with StageTimer() as st: ...`` then ``st.seconds`` (stage -> s) and ``st.calls``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._saved: list[tuple[Any, str, Any]] = []
        self._gc_started = 0.0

    def _wrap(self, owner: Any, attr: str, stage: str) -> None:
        original = getattr(owner, attr)
        self._saved.append((owner, attr, original))
        seconds, calls = self.seconds, self.calls
        if _is_async(original):
            @functools.wraps(original)
            async def timed_async(*args: Any, **kwargs: Any) -> Any:
                t = time.perf_counter()
                try:
                    return await original(*args, **kwargs)
                finally:
                    seconds[stage] += time.perf_counter() - t
                    calls[stage] += 1
            setattr(owner, attr, timed_async)
        else:
            @functools.wraps(original)
            def timed(*args: Any, **kwargs: Any) -> Any:
                t = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    seconds[stage] += time.perf_counter() - t
                    calls[stage] += 1
            setattr(owner, attr, timed)

    def _gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.seconds["gc pauses"] += time.perf_counter() - self._gc_started
            self.calls[f"gc gen{info.get('generation')}"] += 1

    def __enter__(self) -> StageTimer:
        for owner, attr, stage in _STAGES:
            self._wrap(owner, attr, stage)
        for cls in _store_classes():
            for attr in _STORE_METHODS:
                self._wrap(cls, attr, f"metadata.{attr}")
        gc.callbacks.append(self._gc)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        gc.callbacks.remove(self._gc)
        for owner, attr, original in reversed(self._saved):
            setattr(owner, attr, original)
        self._saved.clear()


def _is_async(fn: Callable[..., Any]) -> bool:
    import inspect

    return inspect.iscoroutinefunction(fn)


def _store_classes() -> list[type[MetadataStore]]:
    from bluestream.storage.mongo import MongoMetadataStore
    from bluestream.storage.sqlite import SqliteMetadataStore

    return [MongoMetadataStore, SqliteMetadataStore]
