"""The daemon: wires source, ingestor and stores together and runs them until told to stop.

One task group owns every task. SIGTERM/SIGINT set the stop event: the source finishes the
batch in hand, commits and leaves the group within ``shutdown_timeout_s`` (DESIGN I6).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog

from bluestream._version import __version__
from bluestream.consumers.kafka import KafkaDeadLetters, KafkaSource
from bluestream.consumers.pipeline import Ingestor
from bluestream.counters import Counters
from bluestream.daemon.config import Settings
from bluestream.storage.registry import StoreRegistry
from bluestream.storage.zarr_store import ZarrEventStore

__all__ = ["Daemon", "serve"]

log = structlog.get_logger("bluestream.daemon")


@dataclass
class Daemon:
    """Everything one running service holds; the health server reads from it."""

    settings: Settings
    counters: Counters = field(default_factory=Counters)
    stop: anyio.Event = field(default_factory=anyio.Event)
    started: float = field(default_factory=time.time)
    source: KafkaSource | None = None
    registry: StoreRegistry | None = None
    on_ready: Callable[[], None] | None = None
    #: Off when embedded (tests, the demo): the host process owns signal handling.
    handle_signals: bool = True

    @property
    def ready(self) -> bool:
        return self.source is not None and self.source.state.ready

    def status(self) -> dict[str, Any]:
        st = self.source.state if self.source else None
        return {
            "version": __version__,
            "ready": self.ready,
            "uptime_s": round(time.time() - self.started, 1),
            "assigned": sorted(f"{t}:{p}" for t, p in st.assigned) if st else [],
            "lag": {f"{t}:{p}": n for (t, p), n in st.lag().items()} if st else {},
            "last_error": st.last_error if st else "",
            "open_runs": sorted(u for _, u in self.source.ingestor.open_runs)
            if self.source else [],
            "counters": self.counters.snapshot(),
        }

    async def run(self) -> None:
        s = self.settings
        self.registry = StoreRegistry(
            s.storage.metadata,
            server_selection_timeout_ms=s.storage.mongo_server_selection_timeout_ms,
        )
        arrays = ZarrEventStore(s.storage.zarr_root)
        dlq = KafkaDeadLetters(s)
        ingestor = Ingestor(
            store_for=self.registry, arrays=arrays, dlq=dlq, limits=s.limits.limits(),
            park_max_count=s.limits.park_max_count, park_max_age_s=s.limits.park_max_age_s,
            counters=self.counters,
        )
        self.source = KafkaSource(s, ingestor, self.counters, on_ready=self.on_ready)
        log.info("starting", version=__version__, kafka=s.kafka.bootstrap,
                 metadata=s.masked()["storage"]["metadata"], zarr_root=str(s.storage.zarr_root))
        await dlq.start()
        try:
            async with anyio.create_task_group() as tg:
                if self.handle_signals:
                    tg.start_soon(self._signals, tg.cancel_scope)
                tg.start_soon(self._summaries)
                await self.source.run(self.stop)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await dlq.stop()
                await self.registry.aclose()
        log.info("stopped", counters=self.counters.snapshot())

    async def _signals(self, scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for sig in sigs:
                if sig == signal.SIGHUP:
                    log.info("SIGHUP received; configuration reload is not supported yet, "
                             "restart the service to apply changes")
                    continue
                log.info("stopping", signal=signal.Signals(sig).name)
                self.stop.set()
                scope.deadline = anyio.current_time() + self.settings.shutdown_timeout_s
                return

    async def _summaries(self) -> None:
        last_events, last_t = 0.0, time.monotonic()
        while True:
            await anyio.sleep(self.settings.log.summary_interval_s)
            events = self.counters.total("events")
            now = time.monotonic()
            st = self.source.state if self.source else None
            log.info("summary", events_per_s=round((events - last_events) / (now - last_t), 1),
                     lag=sum(st.lag().values()) if st else None,
                     open_runs=len(self.source.ingestor.open_runs) if self.source else 0,
                     dead_lettered=self.counters.total("dead_lettered"), ready=self.ready)
            last_events, last_t = events, now


async def serve(settings: Settings) -> None:
    await Daemon(settings).run()
