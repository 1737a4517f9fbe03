"""Inspect and replay the dead-letter topic ``<topic>.dlq`` (``bluestream dlq ...``).

A dead letter keeps the original key, value and headers, plus ``reason``, ``error``
and the ``source-topic/-partition/-offset`` it came from (see
:class:`~bluestream.consumers.kafka.KafkaDeadLetters`). After the cause is fixed (the
missing descriptor published, a limit raised), ``replay`` publishes the selected
originals to their source topic again, with the same key (so the same partition and
order within a run) and a ``dlq-replay-of`` header. Ingestion is idempotent, so
replaying a record twice stores it once.

Reading never joins a consumer group and never commits: inspecting the DLQ changes
nothing. Topics are looked up with an admin metadata request, which (unlike a consumer
subscription) does not auto-create a missing topic.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from bluestream.consumers.dead_letters import DLQ_HEADERS
from bluestream.consumers.decode import decode_message
from bluestream.consumers.kafka_clients import kafka_client_options
from bluestream.errors import BluestreamError, DocumentError
from bluestream.schemas.normalise import to_jsonable
from bluestream.settings import Settings

__all__ = ["DeadLetter", "DlqError", "ReplayResult", "dlq_topic_for", "read_dead_letters",
           "replay", "show_text", "summary_line", "unique_by_source"]

_FETCH_BYTES = 64 * 1024 * 1024


class DlqError(BluestreamError):
    """The DLQ (or a record in it, or Kafka) cannot be read or written as asked."""


@dataclass
class DeadLetter:
    """One record of the dead-letter topic."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)

    def header(self, name: str) -> str:
        for k, v in self.headers:
            if k == name:
                return v.decode("utf-8", "replace")
        return ""

    @property
    def reason(self) -> str:
        return self.header("reason")

    @property
    def error(self) -> str:
        return self.header("error")

    @property
    def source_topic(self) -> str:
        return self.header("source-topic")

    @property
    def source(self) -> str:
        return f"{self.source_topic}[{self.header('source-partition')}]@" \
               f"{self.header('source-offset')}"

    @property
    def size(self) -> int:
        omitted = self.header("value-omitted")
        return int(omitted) if omitted.isdigit() else len(self.value or b"")

    @property
    def time(self) -> str:
        return datetime.fromtimestamp(self.timestamp_ms / 1000, UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ")

    def as_dict(self) -> dict[str, Any]:
        return {"partition": self.partition, "offset": self.offset, "time": self.time,
                "reason": self.reason, "source": self.source, "bytes": self.size,
                "value_omitted": bool(self.header("value-omitted")), "error": self.error}


def unique_by_source(letters: Iterable[DeadLetter]) -> tuple[list[DeadLetter], int]:
    """Each source record once (its newest dead letter), in DLQ order, and how many
    copies were left out. Dead letters are written at least once: a batch retried
    after an outage sends its rejects again, with the same source coordinates."""
    newest: dict[tuple[str, str, str], DeadLetter] = {}
    plain: list[DeadLetter] = []
    total = 0
    for d in letters:
        total += 1
        key = (d.source_topic, d.header("source-partition"), d.header("source-offset"))
        if not all(key):
            plain.append(d)  # not one of ours (no source headers): keep as it is
            continue
        old = newest.get(key)
        if old is None or (d.timestamp_ms, d.partition, d.offset) >= \
                (old.timestamp_ms, old.partition, old.offset):
            newest[key] = d
    out = sorted([*newest.values(), *plain], key=lambda d: (d.partition, d.offset))
    return out, total - len(out)


def dlq_topic_for(topic: str, suffix: str) -> str:
    """Accept either the source topic or the DLQ topic itself."""
    return topic if topic.endswith(suffix) else topic + suffix


def summary_line(d: DeadLetter, width: int = 60) -> str:
    error = " ".join(d.error.split())
    error = error if len(error) <= width else error[: width - 3] + "..."
    return (f"{d.partition}:{d.offset:<8} {d.time}  {d.reason:<22} {d.source:<48} "
            f"{d.size:>9}  {error}")


def show_text(d: DeadLetter, max_bytes: int) -> str:
    """Everything about one dead letter: headers, key, and the document if it decodes."""
    lines = [f"dead letter {d.topic}[{d.partition}]@{d.offset}  ({d.time})",
             f"key: {d.key!r}", "headers:"]
    lines += [f"  {k}: {v.decode('utf-8', 'replace')}" for k, v in d.headers]
    if d.value is None:
        lines.append(f"value: omitted from the dead letter ({d.size} bytes); the original "
                     f"is {d.source} while retention keeps it (replay fetches it)")
        return "\n".join(lines)
    try:
        name, doc = decode_message(d.value, max_bytes=max_bytes)
        body = json.dumps(to_jsonable(doc), indent=2, sort_keys=True, default=repr)
        lines += [f"value: {len(d.value)} bytes, decodes as a {name!r} document:", body]
    except (DocumentError, ValueError, TypeError) as exc:
        lines += [f"value: {len(d.value)} bytes, does not decode: {exc}",
                  "first bytes: " + d.value[:256].hex(" ")]
    return "\n".join(lines)


# -- reading ----------------------------------------------------------------------------

def _consumer(settings: Settings) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        **kafka_client_options(settings.kafka), group_id=None, enable_auto_commit=False,
        client_id=f"{settings.kafka.client_id}-dlq-tool", auto_offset_reset="earliest",
        fetch_max_bytes=_FETCH_BYTES, max_partition_fetch_bytes=_FETCH_BYTES)


async def _partitions(settings: Settings, topic: str) -> list[int]:
    admin = AIOKafkaAdminClient(**kafka_client_options(settings.kafka),
                                client_id=f"{settings.kafka.client_id}-dlq-tool")
    await admin.start()
    try:
        described = await admin.describe_topics()  # all topics: creates nothing
    finally:
        await admin.close()
    for t in described:
        if t["topic"] == topic:
            return sorted(int(p["partition"]) for p in t["partitions"])
    raise DlqError(f"topic {topic!r} does not exist at {settings.kafka.bootstrap} "
                   "(nothing was dead-lettered there yet?)")


async def read_dead_letters(settings: Settings, dlq_topic: str, *,
                            partition: int | None = None,
                            select: dict[int, set[int]] | None = None,
                            timeout_s: float = 60.0) -> list[DeadLetter]:
    """Records of ``dlq_topic``: of one partition or all, every record or only the
    ``select``-ed ``{partition: {offsets}}``, up to the end offsets seen at the start."""
    try:
        with anyio.fail_after(timeout_s):
            return await _read(settings, dlq_topic, partition, select)
    except TimeoutError:
        raise DlqError(f"reading {dlq_topic} from {settings.kafka.bootstrap} took longer "
                       f"than {timeout_s:g} s") from None
    except KafkaError as exc:
        raise DlqError(f"Kafka at {settings.kafka.bootstrap}: {exc}") from exc


async def _read(settings: Settings, dlq_topic: str, partition: int | None,
                select: dict[int, set[int]] | None) -> list[DeadLetter]:
    parts = await _partitions(settings, dlq_topic)
    if partition is not None:
        if partition not in parts:
            raise DlqError(f"{dlq_topic} has no partition {partition} (it has {parts})")
        parts = [partition]
    if select is not None:
        missing = sorted(set(select) - set(parts))
        if missing:
            raise DlqError(f"{dlq_topic} has no partition {missing[0]} (it has {parts})")
        parts = [p for p in parts if select.get(p)]
    consumer = _consumer(settings)
    await consumer.start()
    try:
        tps = [TopicPartition(dlq_topic, p) for p in parts]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        starts = await consumer.beginning_offsets(tps)
        stop_at: dict[TopicPartition, int] = {}
        for tp in tps:
            first, last = starts[tp], ends[tp]
            if select is not None:
                wanted = select[tp.partition]
                first = max(first, min(wanted))
                last = min(last, max(wanted) + 1)
            stop_at[tp] = last
            consumer.seek(tp, min(first, ends[tp]))
        todo = {tp for tp in tps if (await consumer.position(tp)) < stop_at[tp]}
        out: list[DeadLetter] = []
        while todo:
            batch = await consumer.getmany(*todo, timeout_ms=1000)
            for tp, records in batch.items():
                for r in records:
                    if r.offset >= stop_at[tp]:
                        continue
                    if select is None or r.offset in select[tp.partition]:
                        out.append(DeadLetter(tp.topic, tp.partition, r.offset, r.timestamp,
                                              r.key, r.value, list(r.headers or ())))
            for tp in list(todo):
                if await consumer.position(tp) >= stop_at[tp]:
                    todo.discard(tp)
        return sorted(out, key=lambda d: (d.partition, d.offset))
    finally:
        await consumer.stop()


async def _original(settings: Settings, d: DeadLetter) -> bytes:
    """The original value of a dead letter whose value was omitted (too large)."""
    tp = TopicPartition(d.source_topic, int(d.header("source-partition")))
    want = int(d.header("source-offset"))
    consumer = _consumer(settings)
    await consumer.start()
    try:
        consumer.assign([tp])
        start = (await consumer.beginning_offsets([tp]))[tp]
        if want < start:
            raise DlqError(f"{d.source}: the original is gone (retention); the topic "
                           f"now starts at offset {start}")
        consumer.seek(tp, want)
        with anyio.fail_after(60):
            while True:
                for r in (await consumer.getmany(tp, timeout_ms=1000)).get(tp, []):
                    if r.offset == want:
                        if r.value is None:
                            raise DlqError(f"{d.source}: the original has no value")
                        return bytes(r.value)
                    if r.offset > want:
                        raise DlqError(f"{d.source}: the original offset is gone")
    finally:
        await consumer.stop()


# -- replaying --------------------------------------------------------------------------

@dataclass
class ReplayResult:
    replayed: list[tuple[DeadLetter, str]] = field(default_factory=list)  # (letter, where)
    failed: list[tuple[DeadLetter, str]] = field(default_factory=list)  # (letter, why)


async def replay(settings: Settings, letters: Iterable[DeadLetter], *,
                 dry_run: bool = False) -> ReplayResult:
    """Publish each letter's original (key, value, original headers) to its source
    topic, in DLQ order, and wait until the broker acknowledged every one."""
    suffix = settings.kafka.dlq_suffix
    result = ReplayResult()
    letters = list(letters)
    if dry_run:
        result.replayed = [(d, f"{d.source_topic or d.topic.removesuffix(suffix)} (dry run)")
                           for d in letters]
        return result
    producer = AIOKafkaProducer(**kafka_client_options(settings.kafka),
                                client_id=f"{settings.kafka.client_id}-dlq-replay",
                                acks="all", enable_idempotence=True,
                                max_request_size=max(settings.limits.max_message_bytes,
                                                     32 * 1024 * 1024) + 1024 * 1024)
    await producer.start()
    try:
        for d in letters:
            target = d.source_topic or d.topic.removesuffix(suffix)
            try:
                value = d.value if d.value is not None else await _original(settings, d)
                headers = [(k, v) for k, v in d.headers if k not in DLQ_HEADERS
                           and k != "dlq-replay-of"]
                headers.append(("dlq-replay-of", f"{d.topic}:{d.partition}:{d.offset}"
                                .encode()))
                meta = await producer.send_and_wait(target, value=value, key=d.key,
                                                    headers=headers)
                result.replayed.append((d, f"{meta.topic}[{meta.partition}]@{meta.offset}"))
            except (DlqError, KafkaError) as exc:
                result.failed.append((d, str(exc) or repr(exc)))
    finally:
        await producer.stop()
    return result
