"""The daemon: wires source, ingestor and stores together and runs them until told to stop.

One task group owns every task: the consumer loop, the HTTP server (health, metrics,
status), the health checks, the systemd watchdog and the periodic summary.
SIGTERM/SIGINT set the stop event: the source finishes the batch in hand, commits and
leaves the group within ``shutdown_timeout_s`` (DESIGN I6). SIGHUP re-reads the
configuration: what can change at run time changes, the rest is logged as needing a
restart.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from aiokafka.errors import KafkaError

from bluestream._version import __version__
from bluestream.consumers.dead_letters import KafkaDeadLetters
from bluestream.consumers.kafka import KafkaSource
from bluestream.consumers.pipeline import Ingestor
from bluestream.counters import Counters
from bluestream.daemon.health import HealthChecks
from bluestream.daemon.http import HttpServer, Response, json_response
from bluestream.daemon.logs import configure_logging
from bluestream.daemon.metrics import CONTENT_TYPE, DaemonGauges, MetricsCollector
from bluestream.daemon.notify import Notifier
from bluestream.errors import ConfigError, StorageUnavailable
from bluestream.gc_tuning import tune_gc
from bluestream.log import get_logger
from bluestream.schemas.validate import warm_up
from bluestream.settings import RELOADABLE, Settings, changed_keys, load_settings
from bluestream.storage.registry import StoreRegistry
from bluestream.storage.zarr_root import check_access
from bluestream.storage.zarr_store import ZarrEventStore

__all__ = ["Daemon", "run_daemon", "serve"]

log = get_logger("bluestream.daemon")


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
    #: The file SIGHUP re-reads (None: environment and defaults only).
    config_path: Path | None = None
    notifier: Notifier = field(default_factory=Notifier)
    health: HealthChecks | None = None
    http: HttpServer | None = None
    #: Set once READY=1 was sent (first assignment and stores reachable).
    announced_ready: bool = False
    _wake: anyio.Event = field(default_factory=anyio.Event, init=False, repr=False)
    _loop_lag_s: float = field(default=0.0, init=False, repr=False)
    #: Set by a reload that changes ``log.summary_interval_s`` (wakes the summary loop).
    _interval_changed: anyio.Event | None = field(default=None, init=False, repr=False)
    _metrics_collector: MetricsCollector | None = field(default=None, init=False, repr=False)

    # -- what probes and `status` see -------------------------------------------------
    def not_ready_reasons(self) -> list[str]:
        """Why the daemon is not ready; empty when it consumes and its stores answer."""
        reasons: list[str] = []
        if self.stop.is_set():
            reasons.append("stopping")
        st = self.source.state if self.source else None
        if st is None or not st.consumer_started:
            reasons.append(st.last_error if st and st.last_error else
                           f"starting: connecting to Kafka at {self.settings.kafka.bootstrap}")
        elif not st.ever_assigned:
            reasons.append("waiting for the consumer group to assign partitions")
        if st is not None and st.consumer_started and not st.kafka_ok:
            reasons.append(st.kafka_error or "Kafka does not answer")
        if st is not None and not st.stores_ok:
            reasons.append(st.store_error or "a store failed")
        if st is not None and st.backing_off:
            reasons.append(f"paused: retrying in {st.retry_at - time.monotonic():.1f} s")
        if self.health is None:
            reasons.append("health checks not started")
        else:
            for name, check in self.health.checks.items():
                if not check.ok:
                    reasons.append(f"{name}: {check.error}")
        return list(dict.fromkeys(reasons))

    @property
    def ready(self) -> bool:
        return not self.not_ready_reasons()

    def status(self) -> dict[str, Any]:
        st = self.source.state if self.source else None
        reasons = self.not_ready_reasons()
        return {
            "version": __version__,
            "ready": not reasons,
            "not_ready": reasons,
            "uptime_s": round(time.time() - self.started, 1),
            "group": self.settings.kafka.group_id,
            "assigned": sorted(f"{t}:{p}" for t, p in st.assigned) if st else [],
            "lag": {f"{t}:{p}": n for (t, p), n in sorted(st.lag().items())} if st else {},
            "committed": {f"{t}:{p}": n for (t, p), n in sorted(st.committed.items())}
            if st else {},
            "last_error": st.last_error if st else "",
            "checks": {name: {"ok": c.ok, "error": c.error, "checked_at": c.checked_at}
                       for name, c in (self.health.checks.items() if self.health else ())},
            "open_runs": sorted(u for _, u in self.source.ingestor.open_runs)
            if self.source else [],
            "parked": len(self.source.ingestor.parked) if self.source else 0,
            "counters": self.counters.snapshot(),
            "http": self.http.url if self.http else None,
            "settings": self.settings.masked(),
        }

    def status_line(self) -> str:
        """One line for ``systemctl status`` (``STATUS=``) and the summary log."""
        reasons = self.not_ready_reasons()
        if reasons:
            return "not ready: " + "; ".join(reasons)[:400]
        st = self.source.state if self.source else None
        lag = sum(st.lag().values()) if st else 0
        return (f"consuming {len(st.assigned) if st else 0} partitions, lag {lag}, "
                f"{int(self.counters.total('events'))} events stored, "
                f"{int(self.counters.total('dead_lettered'))} dead-lettered")

    # -- lifecycle ----------------------------------------------------------------------
    async def run(self) -> None:
        s = self.settings
        self._preflight()
        await self._check_object_store()
        self.registry = StoreRegistry(
            s.storage.metadata,
            server_selection_timeout_ms=s.storage.mongo_server_selection_timeout_ms,
        )
        arrays = ZarrEventStore(s.storage.zarr(), fsync=s.storage.fsync,
                            tail_rows=s.storage.tail_rows)
        dlq = KafkaDeadLetters(s)
        ingestor = Ingestor(
            store_for=self.registry, arrays=arrays, dlq=dlq, limits=s.limits.limits(),
            park_max_count=s.limits.park_max_count, park_max_age_s=s.limits.park_max_age_s,
            park_max_bytes=s.limits.park_max_bytes,
            counters=self.counters,
        )
        self.source = KafkaSource(s, ingestor, self.counters, on_ready=self._assigned)
        self.health = HealthChecks(
            self.registry, arrays.root, tenants=self._tenants_in_use,
            timeout_s=max(5.0, s.storage.mongo_server_selection_timeout_ms / 1000 + 1))
        log.info("starting", version=__version__, kafka=s.kafka.bootstrap,
                 group=s.kafka.group_id, topics=s.kafka.topics or None,
                 pattern=s.kafka.effective_pattern(),
                 metadata=s.masked()["storage"]["metadata"], zarr_root=str(s.storage.zarr_root))
        self.notifier.status("starting")
        try:
            if s.http.enabled:
                await self._bind_http()
            async with anyio.create_task_group() as tg:
                if self.http is not None:
                    tg.start_soon(self.http.serve)
                if self.handle_signals:
                    tg.start_soon(self._signals, tg.cancel_scope)
                tg.start_soon(self._summaries)
                tg.start_soon(self._health_loop)
                tg.start_soon(self._ticker)
                if self.notifier.watchdog_interval_s:
                    tg.start_soon(self._watchdog, self.notifier.watchdog_interval_s)
                if await self._start_dead_letters(dlq):
                    await self.source.run(self.stop)
                tg.cancel_scope.cancel()
        finally:
            self.notifier.stopping()
            self._remove_url_file()
            with anyio.move_on_after(10, shield=True):  # bounded: Kafka may be gone
                await self.source.close()
                await dlq.stop()
            with anyio.move_on_after(10, shield=True):
                await self.registry.aclose()
            self.notifier.close()
        log.info("stopped", counters=self.counters.snapshot())

    def _preflight(self) -> None:
        """Fail at start, with the key's name, on what would otherwise fail later."""
        root = self.settings.storage.zarr()
        if root.local is None:
            return  # asked in _check_object_store, off the event loop
        try:
            root.local.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"storage.zarr_root: cannot create {root}: "
                              f"{exc.strerror or exc}") from None

    async def _check_object_store(self) -> None:
        """An s3:// root: a missing bucket or refused credentials cannot fix themselves
        (ConfigError, exit 2); an endpoint that does not answer is an outage like any
        other: logged, and the daemon starts not ready until the health check passes."""
        root = self.settings.storage.zarr()
        if root.local is not None:
            return
        try:
            await anyio.to_thread.run_sync(
                lambda: check_access(root, write=True, unreachable_is_outage=True))
        except StorageUnavailable as exc:
            log.error("object store unreachable at start; waiting for it (not ready)",
                      error=str(exc))

    async def _bind_http(self) -> None:
        h = self.settings.http
        self.http = HttpServer({"/healthz": self._healthz, "/readyz": self._readyz,
                                "/metrics": self._metrics, "/status": self._status},
                               h.bind, h.port)
        try:
            await self.http.bind()
        except OSError as exc:
            raise ConfigError(f"http.bind/http.port: cannot listen on {h.bind}:{h.port}: "
                              f"{exc.strerror or exc}") from None
        log.info("http listening", url=self.http.url, port=self.http.port)
        if h.url_file is not None:
            try:
                h.url_file.parent.mkdir(parents=True, exist_ok=True)
                h.url_file.write_text(self.http.url + "\n", encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"http.url_file: cannot write {h.url_file}: "
                                  f"{exc.strerror or exc}") from None

    def _remove_url_file(self) -> None:
        f = self.settings.http.url_file
        if self.http is not None and f is not None:
            f.unlink(missing_ok=True)

    async def _start_dead_letters(self, dlq: KafkaDeadLetters) -> bool:
        """Start the dead-letter producer, retrying while Kafka is down; False if told
        to stop first."""
        delay = 0.5
        while not self.stop.is_set():
            try:
                await dlq.start()
                return True
            except KafkaError as exc:
                assert self.source is not None
                self.source.state.last_error = (f"Kafka at {self.settings.kafka.bootstrap} "
                                                f"unreachable: {exc}")
                log.error("cannot reach Kafka; retrying", bootstrap=self.settings.kafka.bootstrap,
                          error=repr(exc), retry_in_s=delay)
                with anyio.move_on_after(delay):
                    await self.stop.wait()
                delay = min(delay * 2, self.settings.retry_backoff_max_s)
        return False

    def _assigned(self) -> None:
        self._wake.set()  # check the stores now: READY=1 waits for them
        if self.on_ready is not None:
            self.on_ready()

    def _tenants_in_use(self) -> list[str]:
        """Tenants whose stores readiness pings: those of assigned topics, else of the
        configured topics (empty with a pattern and nothing assigned yet)."""
        st = self.source.state if self.source else None
        topics = {t for t, _ in st.assigned} if st and st.assigned else set(
            self.settings.kafka.topics)
        return sorted({self.settings.tenant_for(t) for t in topics})

    # -- periodic tasks -----------------------------------------------------------------
    async def _health_loop(self) -> None:
        assert self.health is not None and self.source is not None
        was_ready = False
        while True:
            # A fresh event before checking: an assignment during the checks wakes the
            # next round at once (READY=1 should not wait a whole interval).
            wake = self._wake = anyio.Event()
            timeout = max(5.0, self.settings.health_check_interval_s)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.health.run_once)
                tg.start_soon(self.source.probe, timeout)
            reasons = self.not_ready_reasons()
            if not reasons and not self.announced_ready:
                self.announced_ready = True
                log.info("ready", partitions=len(self.source.state.assigned))
                self.notifier.ready(self.status_line())
            else:
                if was_ready and reasons and not self.stop.is_set():
                    log.warning("not ready", reasons=reasons)
                elif self.announced_ready and not was_ready and not reasons:
                    log.info("ready again")
                self.notifier.status(self.status_line())
            was_ready = not reasons
            with anyio.move_on_after(self.settings.health_check_interval_s):
                await wake.wait()

    async def _watchdog(self, interval: float) -> None:
        """WATCHDOG=1 from the event loop itself: if the loop hangs, the pings stop and
        systemd restarts the service."""
        while True:
            self.notifier.watchdog()
            await anyio.sleep(interval)

    async def _ticker(self) -> None:
        """Measures how late the event loop wakes up (reported by ``/healthz``)."""
        while True:
            t0 = anyio.current_time()
            await anyio.sleep(1.0)
            self._loop_lag_s = max(0.0, anyio.current_time() - t0 - 1.0)

    async def _summaries(self) -> None:
        last_events, last_t = 0.0, time.monotonic()
        while True:
            # A reload that changes the interval wakes this wait, so the new interval
            # applies at once (not after the old one, up to an hour, ran out).
            self._interval_changed = anyio.Event()
            with anyio.move_on_after(self.settings.log.summary_interval_s):
                await self._interval_changed.wait()
            if self._interval_changed.is_set():
                continue
            events = self.counters.total("events")
            now = time.monotonic()
            st = self.source.state if self.source else None
            log.info("summary", events_per_s=round((events - last_events) / (now - last_t), 1),
                     lag=sum(st.lag().values()) if st else None,
                     partitions=len(st.assigned) if st else 0,
                     open_runs=len(self.source.ingestor.open_runs) if self.source else 0,
                     parked=len(self.source.ingestor.parked) if self.source else 0,
                     dead_lettered=self.counters.total("dead_lettered"), ready=self.ready)
            last_events, last_t = events, now

    # -- signals and reload ---------------------------------------------------------------
    async def _signals(self, scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for sig in sigs:
                if sig == signal.SIGHUP:
                    self.reload()
                    continue
                log.info("stopping", signal=signal.Signals(sig).name)
                self.notifier.stopping()
                self.stop.set()
                scope.deadline = anyio.current_time() + self.settings.shutdown_timeout_s
                return

    def reload(self) -> list[str]:
        """Re-read the configuration; apply :data:`RELOADABLE` keys, log the others.
        Returns the keys applied. An invalid file changes nothing (and is logged)."""
        self.notifier.reloading()
        try:
            new = load_settings(self.config_path)
        except ConfigError as exc:
            log.error("reload failed; the running configuration stays", error=str(exc))
            self._reloaded()
            return []
        changed = changed_keys(self.settings, new)
        applied = [k for k in changed if k in RELOADABLE]
        restart = [k for k in changed if k not in RELOADABLE]
        old = self.settings
        self.settings = old.model_copy(update={
            "log": old.log.model_copy(update={"level": new.log.level,
                                              "summary_interval_s": new.log.summary_interval_s}),
            "limits": old.limits.model_copy(update={
                "park_max_count": new.limits.park_max_count,
                "park_max_age_s": new.limits.park_max_age_s}),
        })
        if "log.summary_interval_s" in applied and self._interval_changed is not None:
            self._interval_changed.set()
        if self.source is not None:
            parked = self.source.ingestor.parked
            parked.max_count = self.settings.limits.park_max_count
            parked.max_age_s = self.settings.limits.park_max_age_s
        # Logged before a new level applies, so that raising the level still shows it.
        log.info("configuration reloaded", path=str(self.config_path) if self.config_path
                 else None, applied=applied, unchanged=not changed)
        if restart:
            log.warning("configuration changes need a restart to take effect", keys=restart)
        if "log.level" in applied and self.handle_signals:
            configure_logging(self.settings.log.format, self.settings.log.level)
        self._reloaded()
        return applied

    def _reloaded(self) -> None:
        """READY=1 ends a reload for systemd, but must not claim a start not yet done."""
        if self.announced_ready:
            self.notifier.ready(self.status_line())
        else:
            self.notifier.status(self.status_line())

    # -- HTTP -----------------------------------------------------------------------------
    async def _healthz(self) -> Response:
        return json_response({"alive": True, "loop_lag_s": round(self._loop_lag_s, 3)})

    async def _readyz(self) -> Response:
        reasons = self.not_ready_reasons()
        return json_response({"ready": not reasons, "reasons": reasons},
                             200 if not reasons else 503)

    async def _metrics(self) -> Response:
        return Response(200, self._collector.render(), CONTENT_TYPE)

    async def _status(self) -> Response:
        return Response(200, (json.dumps(self.status(), indent=1, default=str) + "\n").encode(),
                        "application/json")

    @property
    def _collector(self) -> MetricsCollector:
        if self._metrics_collector is None:
            self._metrics_collector = MetricsCollector(self.counters, self._gauges)
        return self._metrics_collector

    def _gauges(self) -> DaemonGauges:
        st = self.source.state if self.source else None
        checks = {name: bool(c.ok) for name, c in
                  (self.health.checks.items() if self.health else ())}
        if st is not None:
            checks["kafka"] = st.consumer_started and st.kafka_ok
        return DaemonGauges(ready=self.ready, uptime_s=time.time() - self.started,
                            assigned=len(st.assigned) if st else 0, checks=checks)


async def serve(settings: Settings, config_path: Path | None = None) -> None:
    await Daemon(settings, config_path=config_path).run()


def run_daemon(settings: Settings, config_path: Path | None = None) -> int:
    """Run until stopped; the process exit code. 2 for configuration problems found
    at start (the message names the key), as for an invalid file."""
    warm_up()  # compile the schemas before the collector's start state is frozen
    tune_gc()
    try:
        anyio.run(serve, settings, config_path)
    except ConfigError as exc:
        message = str(exc)
    except BaseExceptionGroup as group:
        match, rest = group.split(ConfigError)
        if match is None or rest is not None:
            raise
        message = "; ".join(str(e) for e in match.exceptions)
    else:
        return 0
    log.error("cannot start", error=message)
    print(f"error: {message}", file=sys.stderr)
    return 2
