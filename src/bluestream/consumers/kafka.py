"""The Kafka source: the consumer loop that feeds the ingestor (dead letters go through
:mod:`bluestream.consumers.dead_letters`).

One loop fetches a batch, has the ingestor prepare it (decode, check, route), then
hands it to a flush task that stores it and commits per partition up to (not past) the
oldest parked message. The loop fetches and prepares the next batch while that flush
runs (the writes spend their time in worker threads, so both cores work), and waits for
it before starting the next flush: at most one batch is prepared and one in flight, so a
slow store pauses consumption instead of filling memory (DESIGN I5), flushes and commits
happen in fetch order, and an offset is committed only once its batch is stored (I1). A
rebalance waits for the batch in flight to be stored and committed before partitions
are let go (I6).

Outages: a store or Kafka error abandons the batch in hand, rewinds to the committed
offsets, pauses fetching and retries after a capped exponential backoff; everything
not committed is read and written again (idempotently), so nothing is lost or doubled.
aiokafka retries a lost broker forever inside its own calls, so an outage does not
always surface as an error: commits run under a timeout and :meth:`KafkaSource.probe`
asks the cluster directly, which is what readiness reports.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError, KafkaTimeoutError
from anyio.abc import TaskGroup

from bluestream.consumers.envelope import Envelope
from bluestream.consumers.kafka_clients import kafka_client_options, stop_client
from bluestream.consumers.pipeline import Batch, Ingestor
from bluestream.counters import Counters
from bluestream.errors import StorageError, leaf_errors
from bluestream.log import get_logger
from bluestream.settings import LimitSettings, Settings, tenant_for_topic

__all__ = ["KafkaSource", "SourceState"]

log = get_logger("bluestream.kafka")


@dataclass
class SourceState:
    """What health checks and ``status`` report about the consumer."""

    assigned: set[tuple[str, int]] = field(default_factory=set)
    ever_assigned: bool = False
    stores_ok: bool = True
    kafka_ok: bool = True
    last_error: str = ""
    kafka_error: str = ""
    store_error: str = ""
    committed: dict[tuple[str, int], int] = field(default_factory=dict)
    positions: dict[tuple[str, int], int] = field(default_factory=dict)
    highwater: dict[tuple[str, int], int] = field(default_factory=dict)
    last_batch_at: float = 0.0
    #: Seconds until the next retry while backing off after an error (0: consuming).
    retry_at: float = 0.0
    consumer_started: bool = False

    @property
    def ready(self) -> bool:
        return self.ever_assigned and self.stores_ok and self.kafka_ok

    @property
    def backing_off(self) -> bool:
        return self.retry_at > time.monotonic()

    def lag(self) -> dict[tuple[str, int], int]:
        return {tp: max(0, hw - self.committed.get(tp, 0)) for tp, hw in self.highwater.items()
                if tp in self.assigned}


@dataclass
class _InFlight:
    """The batch being flushed: set ``done`` when it ended, with ``error`` if it failed."""

    done: anyio.Event = field(default_factory=anyio.Event)
    error: BaseException | None = None


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, source: KafkaSource) -> None:
        self.source = source

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.source._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self.source._on_assigned(assigned)


class KafkaSource:
    """Consumes the configured topics in a consumer group and drives the ingestor."""

    def __init__(self, settings: Settings, ingestor: Ingestor,
                 counters: Counters | None = None,
                 on_ready: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.ingestor = ingestor
        self.counters = counters or ingestor.counters
        self.state = SourceState()
        self._on_ready = on_ready
        self._busy = anyio.Lock()
        self._in_flight: _InFlight | None = None
        self._tasks: TaskGroup | None = None
        self._caught_up = False
        #: First offset handed to us per partition since its assignment: where a rewind
        #: goes while nothing is committed yet (``seek_to_committed`` then does nothing).
        self._first_fetched: dict[tuple[str, int], int] = {}
        #: Records asked of the next fetch: ``batch_max_records``, or fewer when records
        #: carry many events each (pages), so a batch holds about ``batch_max_events``.
        #: Before any batch is seen, records are assumed to be pages of 100 events.
        lim = settings.limits
        self._max_records = max(1, min(lim.batch_max_records, lim.batch_max_events // 100))
        self.commit_timeout_s = settings.kafka.commit_timeout_s
        self._backoff_cap = settings.retry_backoff_max_s
        k = settings.kafka
        self.consumer = AIOKafkaConsumer(
            **kafka_client_options(k),
            group_id=k.group_id,
            client_id=k.client_id,
            enable_auto_commit=False,
            auto_offset_reset=k.auto_offset_reset,
            fetch_max_bytes=lim.batch_max_bytes,
            max_partition_fetch_bytes=max(1024 * 1024, min(lim.batch_max_bytes,
                                                           lim.max_message_bytes)),
            session_timeout_ms=k.session_timeout_ms,
            max_poll_interval_ms=k.max_poll_interval_ms,
            isolation_level="read_committed",
            # New topics matching the subscription are noticed within this time.
            metadata_max_age_ms=10_000,
        )

    # -- lifecycle ------------------------------------------------------------------------
    async def run(self, stop: anyio.Event) -> None:
        """Consume until ``stop`` is set; then flush, commit and leave the group."""
        backoff = _Backoff(cap=self._backoff_cap)
        try:
            await self._start_consumer(stop)
            async with anyio.create_task_group() as tasks:
                self._tasks = tasks
                await self._consume(stop, backoff)
                await self._settle()  # the last batch stored and committed
        finally:
            # Shielded from the cancellation that may have ended the loop, but bounded:
            # with Kafka gone, leaving the group could otherwise wait forever.
            with anyio.move_on_after(self.settings.shutdown_timeout_s, shield=True):
                await self._shutdown()

    async def _consume(self, stop: anyio.Event, backoff: _Backoff) -> None:
        while not stop.is_set():
            try:
                await self._step()
                backoff.reset()
                continue
            except (StorageError, KafkaError, BaseExceptionGroup) as caught:
                exc = _outage(caught)
                if exc is None:
                    raise
            if isinstance(exc, StorageError):
                self.state.stores_ok = False
                self.state.last_error = self.state.store_error = str(exc)
                self.counters.inc("errors", "storage")
                log.error("store failed; rewinding to committed offsets and retrying",
                          error=str(exc), retry_in_s=backoff.peek())
            else:
                self.state.kafka_ok = False
                self.state.last_error = self.state.kafka_error = f"Kafka: {exc}"
                self.counters.inc("errors", "kafka")
                log.error("Kafka error; rewinding to committed offsets and retrying",
                          error=str(exc) or repr(exc), retry_in_s=backoff.peek())
            await self._retry_later(stop, backoff.next())

    async def _retry_later(self, stop: anyio.Event, delay: float) -> None:
        """Abandon the batch: rewind to the committed offsets, stop fetching meanwhile
        (nothing fetched now would be kept), and wait ``delay`` seconds (or until stopped)."""
        await self._rewind()
        self.consumer.pause(*self.consumer.assignment())
        self.state.retry_at = time.monotonic() + delay
        try:
            await _sleep_or_stop(stop, delay)
        finally:
            self.state.retry_at = 0.0
            self.consumer.resume(*self.consumer.paused())

    async def _start_consumer(self, stop: anyio.Event) -> None:
        k = self.settings.kafka
        backoff = _Backoff(cap=self._backoff_cap)
        while True:
            try:
                await self.consumer.start()
                self.state.consumer_started = True
                break
            except KafkaError as exc:
                self.state.kafka_ok = False
                self.state.last_error = self.state.kafka_error = (
                    f"Kafka at {k.bootstrap} unreachable: {exc}")
                log.error("cannot reach Kafka; retrying", bootstrap=k.bootstrap, error=repr(exc))
                await _sleep_or_stop(stop, backoff.next())
                if stop.is_set():
                    return
        pattern = k.effective_pattern()
        if pattern is not None:
            self.consumer.subscribe(pattern=pattern, listener=_Listener(self))
        else:
            self.consumer.subscribe(topics=list(k.topics), listener=_Listener(self))
        log.info("subscribed", topics=k.topics or None, pattern=pattern, group=k.group_id)

    async def close(self) -> None:
        """Release the consumer if :meth:`run` never did (stopped before it ran)."""
        await stop_client(self.consumer.stop, "consumer")

    async def _shutdown(self) -> None:
        if not self.state.consumer_started:
            await self.close()
            return
        async with self._busy:
            try:
                await self._settle()
                await self._commit()
            except Exception as exc:  # best effort: uncommitted records are re-read
                log.warning("final commit failed", error=repr(exc))
        await stop_client(self.consumer.stop, "consumer")

    # -- one batch ----------------------------------------------------------------------
    async def _step(self) -> None:
        lim = self.settings.limits
        records = await self.consumer.getmany(timeout_ms=500, max_records=self._max_records)
        if records:
            self.state.kafka_ok = True
        async with self._busy:
            if not records:
                await self._settle()
                await self.ingestor.expire_parked()
                await self._commit()
                self._update_highwater()
                self._note_caught_up()
                return
            self._caught_up = False
            envelopes = []
            # The consumer's own assignment, not state.assigned: aiokafka makes an
            # assignment live (and fetches for it) before on_partitions_assigned has run,
            # so records can arrive for a partition the listener has not recorded yet.
            # Skipping those would move the position past records nobody stored.
            owned = self.consumer.assignment()
            fetched: dict[tuple[str, int], int] = {}
            for tp, recs in records.items():
                if tp not in owned:
                    continue  # revoked while we waited for the lock: the new owner has it
                if tp.topic.endswith(self.settings.kafka.dlq_suffix):
                    continue  # never ingest our own dead letters
                tenant = tenant_for_topic(tp.topic, self.settings.tenants)
                if recs:
                    self._first_fetched.setdefault((tp.topic, tp.partition), recs[0].offset)
                for r in recs:
                    envelopes.append(Envelope(
                        tp.topic, tp.partition, r.offset, r.value, r.key,
                        list(r.headers or ()), tenant))
                    fetched[(tp.topic, tp.partition)] = r.offset + 1
            context = _log_context(envelopes)
            started = time.perf_counter()
            with structlog.contextvars.bound_contextvars(**context):
                batch = await self.ingestor.prepare(envelopes)
            self._max_records = records_for(len(envelopes), batch.event_count(), lim)
            # Meanwhile the previous batch was being written: it must be stored and
            # committed (or its error raised here) before this one's flush starts.
            await self._settle()
            flight = self._in_flight = _InFlight()
            assert self._tasks is not None
            self._tasks.start_soon(self._flush, batch, fetched, flight, context, started)

    async def _flush(self, batch: Batch, fetched: dict[tuple[str, int], int],
                     flight: _InFlight, context: dict[str, Any], started: float) -> None:
        """Store a prepared batch, then advance and commit its partitions' positions.
        Positions advance only once the batch is stored: however this ends (error,
        cancellation at shutdown), nothing unstored is ever committed."""
        try:
            with structlog.contextvars.bound_contextvars(**context):
                await self.ingestor.flush(batch)
            self.counters.observe("write_seconds", time.perf_counter() - started)
            self.state.positions.update(fetched)
            self.state.stores_ok = True
            self.state.last_batch_at = time.time()
            await self._commit()
            self._update_highwater()
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException as exc:  # raised by the loop's next _settle
            flight.error = exc
        finally:
            flight.done.set()

    async def _settle(self, *, quiet: bool = False) -> None:
        """Wait for the batch in flight; raise its error (unless ``quiet``: the caller
        rewinds, or lets the partitions go, anyway)."""
        flight = self._in_flight
        if flight is None:
            return
        await flight.done.wait()
        self._in_flight = None
        if flight.error is not None:
            if quiet:
                log.warning("the batch in flight failed; its records will be re-read",
                            error=repr(flight.error))
                return
            raise flight.error

    async def _commit(self) -> None:
        held = self.ingestor.held_offsets()
        owned = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
        offsets: dict[TopicPartition, int] = {}
        for tp, pos in self.state.positions.items():
            if tp not in self.state.assigned or tp not in owned:
                continue  # not ours (any more): its next owner re-reads from its commit
            target = min(pos, held.get(tp, pos))
            if target > self.state.committed.get(tp, -1):
                offsets[TopicPartition(*tp)] = target
        if not offsets:
            return
        started = time.perf_counter()
        try:
            # aiokafka waits forever for a coordinator; an outage must surface instead.
            with anyio.fail_after(self.commit_timeout_s):
                await self.consumer.commit(offsets)
        except TimeoutError:
            raise KafkaTimeoutError(
                f"offset commit did not complete within {self.commit_timeout_s:g} s "
                f"(is Kafka at {self.settings.kafka.bootstrap} reachable?)") from None
        self.counters.observe("commit_seconds", time.perf_counter() - started)
        self.counters.inc("commits", "")
        self.state.kafka_ok = True
        for tp, off in offsets.items():
            self.state.committed[(tp.topic, tp.partition)] = off

    def _note_caught_up(self) -> None:
        """Log once each time everything assigned is stored and committed."""
        if self._caught_up or not self.state.assigned:
            return
        if all(self.state.highwater.get(tp, 0) <= self.state.committed.get(tp, 0)
               for tp in self.state.assigned) and not len(self.ingestor.parked):
            self._caught_up = True
            log.info("caught up", partitions=len(self.state.assigned),
                     events=self.counters.total("events"))

    def _update_highwater(self, known: dict[tuple[str, int], int] | None = None) -> None:
        # The consumer's own assignment too: when a topic matching the subscription
        # pattern appears (or goes), aiokafka swaps in a new subscription with no
        # assignment before it calls on_partitions_revoked, and highwater() asserts on a
        # partition it no longer holds (that assertion ended the daemon).
        owned = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
        for tp in list(self.state.assigned & owned):
            hw = (known or {}).get(tp)
            if hw is None:
                hw = self.consumer.highwater(TopicPartition(*tp))
            if hw is not None:
                self.state.highwater[tp] = max(hw, self.state.highwater.get(tp, 0))
                self.counters.set("lag", f"{tp[0]}:{tp[1]}", float(max(
                    0, self.state.highwater[tp] - self.state.committed.get(tp, 0))))

    async def probe(self, timeout_s: float) -> bool:
        """Ask the cluster for the end offsets of our partitions (or, with none, for
        metadata), within ``timeout_s``. Updates ``state.kafka_ok`` and the lag; True if
        Kafka answered. The consumer's own fetches cannot tell: during an outage aiokafka
        retries quietly and ``getmany`` just returns nothing."""
        k = self.settings.kafka
        if not self.state.consumer_started:
            return False  # the start loop reports its own errors
        tps = [TopicPartition(*tp) for tp in sorted(self.state.assigned)]
        try:
            with anyio.fail_after(timeout_s):
                if tps:
                    ends = await self.consumer.end_offsets(tps)
                else:
                    await self.consumer.topics()
                    ends = {}
        except (TimeoutError, KafkaError) as exc:
            why = "no answer" if isinstance(exc, TimeoutError) else str(exc) or repr(exc)
            if self.state.kafka_ok:
                log.warning("Kafka does not answer", bootstrap=k.bootstrap, error=why)
            self.state.kafka_ok = False
            self.state.last_error = self.state.kafka_error = (
                f"Kafka at {k.bootstrap} does not answer: {why}")
            return False
        if not self.state.kafka_ok:
            log.info("Kafka answers again", bootstrap=k.bootstrap)
        self.state.kafka_ok = True
        self._update_highwater({(tp.topic, tp.partition): off for tp, off in ends.items()})
        return True

    async def _rewind(self) -> None:
        """After a failed batch: forget in-memory state, re-read from committed offsets."""
        await self._settle(quiet=True)
        self.ingestor.reset()
        live = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
        for tp in sorted(self.state.assigned | live):
            # Not seek_to_committed(): it does nothing while nothing is committed, and
            # it waits for the group coordinator, which an outage may have taken away.
            target = self.state.committed.get(tp, self._first_fetched.get(tp))
            if target is None:
                continue  # nothing handed to us from this partition: nothing to re-read
            try:
                self.consumer.seek(TopicPartition(*tp), target)
            except Exception as exc:  # partition gone meanwhile: the next rebalance fixes it
                log.warning("seek failed", partition=f"{tp[0]}:{tp[1]}", error=repr(exc))
        self.state.positions = {tp: off for tp, off in self.state.committed.items()
                                if tp in self.state.assigned}

    # -- rebalance ------------------------------------------------------------------------
    async def _on_revoked(self, revoked: list[TopicPartition]) -> None:
        gone = {(tp.topic, tp.partition) for tp in revoked}
        async with self._busy:  # wait for the batch in hand to be stored
            try:
                await self._settle_keeping_error()
                await self._commit()
            except Exception as exc:
                log.warning("commit on revocation failed; records will be re-read",
                            error=repr(exc))
            self.ingestor.drop_partitions(gone)
            self.state.assigned -= gone
            for tp in gone:
                self._first_fetched.pop(tp, None)
                self.state.positions.pop(tp, None)
                self.state.committed.pop(tp, None)
                self.state.highwater.pop(tp, None)
                self.counters.drop_gauge("lag", f"{tp[0]}:{tp[1]}")
        if gone:
            log.info("partitions revoked", partitions=sorted(f"{t}:{p}" for t, p in gone))

    async def _settle_keeping_error(self) -> None:
        """Wait for the batch in flight without taking its error: the loop's next
        :meth:`_settle` raises it and rewinds (the positions it would have advanced were
        not, so what is committed now is stored)."""
        flight = self._in_flight
        if flight is not None:
            await flight.done.wait()
            if flight.error is None:
                self._in_flight = None

    async def _on_assigned(self, assigned: list[TopicPartition]) -> None:
        dlq = self.settings.kafka.dlq_suffix
        mine = {(tp.topic, tp.partition) for tp in assigned}
        self.state.assigned = mine  # before any await (see _step)
        for tp in assigned:
            if tp.topic.endswith(dlq):
                log.warning("subscribed to a dead-letter topic; it is not ingested",
                            topic=tp.topic)
            committed = await self.consumer.committed(tp)
            if committed is not None:
                self.state.committed[(tp.topic, tp.partition)] = committed
        self.state.assigned = mine
        if not self.state.ever_assigned:  # joined the group (maybe with nothing to do yet)
            self.state.ever_assigned = True
            if self._on_ready is not None:
                self._on_ready()
        log.info("partitions assigned", partitions=sorted(f"{t}:{p}" for t, p in mine))


def _outage(exc: BaseException) -> StorageError | KafkaError | None:
    """The outage behind ``exc``: the error itself or, for a group raised by concurrent
    writes, its first StorageError (else KafkaError) when every member is one of those.
    None for anything else (a bug, a cancellation): that must not be retried forever."""
    if isinstance(exc, StorageError | KafkaError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        leaves = leaf_errors(exc)
        if leaves and all(isinstance(e, StorageError | KafkaError) for e in leaves):
            return next((e for e in leaves if isinstance(e, StorageError)),
                        leaves[0])
    return None


def records_for(records: int, events: int, lim: LimitSettings) -> int:
    """Records to fetch next so that a batch holds about ``batch_max_events`` events,
    judged from the last batch (``records`` records carrying ``events`` events)."""
    if records <= 0 or events <= records:
        return lim.batch_max_records
    per_record = events / records
    return max(1, min(lim.batch_max_records, int(lim.batch_max_events / per_record)))


def _log_context(envelopes: list[Envelope]) -> dict[str, Any]:
    """Log context of one batch: its topic, partition and tenant when there is one."""
    if not envelopes:
        return {}
    first = envelopes[0]
    if all(e.topic == first.topic and e.partition == first.partition for e in envelopes):
        return {"topic": first.topic, "partition": first.partition, "tenant": first.tenant}
    return {"partitions": sorted({f"{e.topic}:{e.partition}" for e in envelopes})}


class _Backoff:
    """Capped exponential backoff: 0.5 s, 1 s, 2 s ... up to ``cap`` (30 s)."""

    def __init__(self, first: float = 0.5, cap: float = 30.0) -> None:
        self.first, self.cap, self.n = first, cap, 0

    def peek(self) -> float:
        return min(self.cap, self.first * math.pow(2, self.n))

    def next(self) -> float:
        delay = self.peek()
        self.n += 1
        return delay

    def reset(self) -> None:
        self.n = 0


async def _sleep_or_stop(stop: anyio.Event, seconds: float) -> None:
    with anyio.move_on_after(seconds):
        await stop.wait()
