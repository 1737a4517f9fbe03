"""Scenario 1 - scalar ingest: runs of 10 scalar fields already in Kafka, as single events
and as event pages.

(a) raw: fetch + the daemon's decode (``decode_message``) of the whole topic with
    comparable fetch settings, by two clients: aiokafka (the daemon's) and confluent-kafka
    (librdkafka, fetching in its own threads). The faster of the two is the *limit*;
(b) bluestream: ``python -m bluestream serve`` until the group's offsets are committed
    (stored and committed), per metadata backend;
(c) incumbent: bluesky-kafka ``MongoConsumer`` + suitcase-mongo into a fresh database on
    the same server, on the first run(s) of the same topic (it is slow; rates compare).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import aiokafka
import anyio
import confluent_kafka
from aiokafka import AIOKafkaConsumer, TopicPartition

from benchmarks.checks import Check, equal, no_data_loss
from benchmarks.common import (
    PEAK_RSS,
    SCALAR_EVENTS_VS_CEILING,
    SCALAR_EVENTS_VS_LIMIT,
    SCALAR_PAGES_VS_LIMIT,
    Context,
    Result,
    Target,
    bar_chart,
    print_table,
    rate,
)
from benchmarks.docs import scalar_run
from benchmarks.incumbent import (
    client_side_ingest,
    consume_into_mongo,
    count_documents,
    expected_counts,
)
from benchmarks.infra import Message, checked_ingest, create_topic, end_offsets, publish
from bluestream.consumers.decode import decode_message
from bluestream.settings import LimitSettings

NAME = "scalar_ingest"
__all__ = ["AIOKAFKA", "CONFLUENT", "NAME", "raw_consume", "raw_consume_confluent",
           "raw_consumers", "run"]

AIOKAFKA = f"aiokafka {aiokafka.__version__}"
CONFLUENT = (f"confluent-kafka {confluent_kafka.__version__} "
             f"(librdkafka {confluent_kafka.libversion()[0]})")
#: Longest a ``Consumer.consume`` call waits to fill its batch (librdkafka returns early
#: only once ``num_messages`` are there): bounds the tail and the batch memory.
CONSUME_TIMEOUT_S = 0.1
#: librdkafka ``fetch.queue.backoff.ms`` (default 1,000; see raw_consume_confluent).
FETCH_QUEUE_BACKOFF_MS = 1


def _events(name: str, doc: dict[str, Any]) -> int:
    if name == "event":
        return 1
    if name == "event_page":
        return len(doc["seq_num"])
    return 0


async def raw_consume(bootstrap: str, topic: str, ends: dict[int, int]
                      ) -> tuple[int, int, float]:
    """aiokafka: fetch and decode every message with the daemon's fetch settings.
    Returns (messages, events, seconds)."""
    lim = LimitSettings()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False,
        fetch_max_bytes=lim.batch_max_bytes,
        max_partition_fetch_bytes=max(1024 * 1024, min(lim.batch_max_bytes,
                                                       lim.max_message_bytes)),
        isolation_level="read_committed",
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in ends]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        pos = dict.fromkeys(ends, 0)
        messages = events = 0
        started = time.perf_counter()
        while any(pos[p] < end for p, end in ends.items()):
            batch = await consumer.getmany(timeout_ms=500, max_records=lim.batch_max_records)
            for tp, records in batch.items():
                for r in records:
                    events += _events(*decode_message(r.value,
                                                      max_bytes=lim.max_message_bytes))
                messages += len(records)
                pos[tp.partition] = records[-1].offset + 1
        return messages, events, time.perf_counter() - started
    finally:
        await consumer.stop()


def raw_consume_confluent(bootstrap: str, topic: str, ends: dict[int, int]
                          ) -> tuple[int, int, float]:
    """confluent-kafka (librdkafka): the same topic, the same decode, comparable fetch
    settings (the daemon's ``fetch.max.bytes`` / ``max.partition.fetch.bytes``,
    read_committed), a fresh group id with ``auto.offset.reset=earliest`` and no commits;
    ``fetch.queue.backoff.ms`` lowered from its 1 s default (below).
    Consumes in batches of ``Consumer.consume(num_messages, timeout)``, at most
    ``batch_max_records`` messages and (by the mean message size so far)
    ``batch_max_bytes``, never more than are left, until every partition's end offset.

    The partitions are assigned at their first offsets, looked up before the clock starts
    (as aiokafka's ``seek_to_beginning`` is awaited before its clock starts): with no
    offset, librdkafka would first ask the fresh group's coordinator for committed offsets,
    ~0.1 s of round trips inside the timing. Returns (messages, events, seconds)."""
    lim = LimitSettings()
    consumer = confluent_kafka.Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"bench-raw-{uuid.uuid4().hex[:12]}",
        "enable.auto.commit": False, "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest", "isolation.level": "read_committed",
        "fetch.max.bytes": lim.batch_max_bytes,
        "max.partition.fetch.bytes": max(1024 * 1024, min(lim.batch_max_bytes,
                                                          lim.max_message_bytes)),
        "receive.message.max.bytes": lim.batch_max_bytes + 1024 * 1024,
        # librdkafka's prefetch queue (queued.max.messages.kbytes, default 64 MB) holds
        # about one batch ahead, as aiokafka's fetch buffer does; when it is full,
        # librdkafka postpones the partition's next fetch by this long (default 1 s:
        # large frames stalled in whole seconds, 190-1,100 MB/s run to run).
        "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS,
    })
    try:
        consumer.list_topics(topic, timeout=10)  # connected, metadata known
        tps = []
        for p in ends:
            low, _ = consumer.get_watermark_offsets(confluent_kafka.TopicPartition(topic, p),
                                                    timeout=10)
            tps.append(confluent_kafka.TopicPartition(topic, p, low))
        pos = {tp.partition: tp.offset for tp in tps}
        messages = events = nbytes = 0
        started = time.perf_counter()
        consumer.assign(tps)
        while True:
            left = sum(max(0, end - pos[p]) for p, end in ends.items())
            if not left:
                break
            by_size = lim.batch_max_bytes * messages // nbytes if nbytes else left
            batch = consumer.consume(num_messages=max(1, min(left, lim.batch_max_records,
                                                             by_size)),
                                     timeout=CONSUME_TIMEOUT_S)
            for m in batch:
                err = m.error()
                if err is not None:
                    raise confluent_kafka.KafkaException(err)
                value = m.value()
                events += _events(*decode_message(value, max_bytes=lim.max_message_bytes))
                nbytes += len(value or b"")
                partition, offset = m.partition(), m.offset()
                assert partition is not None and offset is not None
                pos[partition] = offset + 1
            messages += len(batch)
        return messages, events, time.perf_counter() - started
    finally:
        consumer.close()


def raw_consumers(bootstrap: str, topic: str, ends: dict[int, int]
                  ) -> dict[str, tuple[int, int, float]]:
    """Both raw consumers of ``topic``, one after the other: {client: (messages, events,
    seconds)}."""
    return {"aiokafka": anyio.run(raw_consume, bootstrap, topic, ends),
            "confluent-kafka": raw_consume_confluent(bootstrap, topic, ends)}


def _publish_runs(ctx: Context, topic: str, page_events: int
                  ) -> tuple[int, int, float, list[bytes]]:
    """Generate, encode and publish the runs one after the other (so the incumbent can
    stop after the first ones). Returns (events, messages, publish seconds, the values
    of the runs the incumbent consumes)."""
    s = ctx.sizes
    messages: list[Message] = []
    for r in range(s.scalar_runs):
        run_ = scalar_run(s.scalar_events_per_run, fields=s.scalar_fields,
                          page_events=page_events, scan_id=r + 1)
        key = run_.uid.encode()
        messages.extend((key, value, -1) for value in run_.encoded())
        if r + 1 == s.incumbent_runs:
            incumbent_values = [value for _, value, _ in messages]
    n, _, seconds = publish(ctx.kafka, topic, messages)
    return s.scalar_runs * s.scalar_events_per_run, n, seconds, incumbent_values


def _variant(ctx: Context, variant: str, page_events: int, checks: list[Check]
             ) -> dict[str, Any]:
    """One variant (single events or pages); appends what it verified to ``checks``."""
    s = ctx.sizes
    tenant = ctx.tenant(f"s{variant[0]}")
    topic = ctx.topic(tenant)
    create_topic(ctx.kafka, topic, 1)
    total, n_messages, pub_s, incumbent_values = _publish_runs(ctx, topic, page_events)
    ends = end_offsets(ctx.kafka, topic)
    print(f"  [{variant}] published {total:,} events in {n_messages:,} messages "
          f"({pub_s:.1f} s)")
    out: dict[str, Any] = {"events": total, "messages": n_messages, "publish_s": pub_s}

    raws = raw_consumers(ctx.kafka, topic, ends)
    for key, client in (("raw", "aiokafka"), ("raw_confluent", "confluent-kafka")):
        msgs, events, secs = raws[client]
        suffix = "" if key == "raw" else f" ({client})"
        checks.append(equal(f"raw consume saw every message: {variant}{suffix}",
                            (msgs, events), (n_messages, total)))
        out[key] = {"client": AIOKAFKA if key == "raw" else CONFLUENT, "seconds": secs,
                    "events_per_s": rate(events, secs), "messages_per_s": rate(msgs, secs)}
        print(f"  [{variant}] (a) raw {client} consume+decode: {rate(events, secs):,.0f} "
              "events/s")
    faster = max(("raw", "raw_confluent"), key=lambda k: out[k]["events_per_s"])
    out["limit"] = {"events_per_s": out[faster]["events_per_s"],
                    "client": "aiokafka" if faster == "raw" else "confluent-kafka"}

    out["bluestream"] = {}
    for backend in s.ingest_backends:
        work = ctx.scratch(f"{NAME}-{variant}-{backend}")
        timing, _, failures = checked_ingest(
            kafka=ctx.kafka, topic=topic, group=f"g-{topic}-{backend}", backend=backend,
            mongo=ctx.mongo, tenant=tenant, work=work,
            expected=(s.scalar_runs, total, s.scalar_runs))
        eps = rate(total, timing.seconds)
        out["bluestream"][backend] = {**timing.as_dict(), "events_per_s": eps,
                                      "data_loss_retries": failures,
                                      "rss_mb": timing.rss_json()}
        checks.append(no_data_loss(f"{variant}/{backend}", failures))
        print(f"  [{variant}] (b) bluestream/{backend}: {eps:,.0f} events/s "
              f"({timing.seconds:.1f} s, start-up {timing.startup_s:.1f} s, "
              f"peak RSS {timing.peak_rss:.0f} MB)")
        ctx.drop_scratch(work)

    database = f"{tenant}_incumbent"
    ctx.mongo_dbs.append(database)
    inc_events, inc_s = consume_into_mongo(ctx.kafka, topic, ctx.mongo, database,
                                           s.incumbent_runs)
    expected = s.incumbent_runs * s.scalar_events_per_run
    checks.append(equal(f"incumbent consumed every event: {variant}", inc_events, expected))
    stored = count_documents(ctx.mongo, database)
    checks.append(equal(f"incumbent stored count: {variant}", stored,
                        expected_counts(s.incumbent_runs, expected)))
    stored_inc = stored["event"]
    ceiling_events, ceiling_s = client_side_ingest(incumbent_values)
    out["incumbent"] = {"events": inc_events, "seconds": inc_s,
                        "events_per_s": rate(inc_events, inc_s), "stored": stored_inc,
                        "client_side_ceiling_events_per_s": rate(ceiling_events, ceiling_s)}
    print(f"  [{variant}] (c) incumbent MongoConsumer: {rate(inc_events, inc_s):,.0f} "
          f"events/s ({inc_events:,} events, {inc_s:.1f} s; {stored_inc:,} stored); its "
          f"client-side ceiling (infinitely fast server): "
          f"{rate(ceiling_events, ceiling_s):,.0f} events/s")
    return out


def run(ctx: Context) -> Result:
    s = ctx.sizes
    variants = {"events": 0, "pages": s.page_events}
    checks: list[Check] = []
    results = {v: _variant(ctx, v, pe, checks) for v, pe in variants.items()}
    targets: list[Target] = []
    rows = []
    labels, values, colors = [], [], []
    for variant, r in results.items():
        raw, raw_ck = r["raw"]["events_per_s"], r["raw_confluent"]["events_per_s"]
        limit = r["limit"]["events_per_s"]
        inc = r["incumbent"]["events_per_s"]
        ceiling = r["incumbent"]["client_side_ceiling_events_per_s"]
        for label, value in (("(a) raw aiokafka consume+decode", raw),
                             ("(a) raw confluent-kafka consume+decode", raw_ck)):
            best = " (limit)" if value == limit else ""
            rows.append([variant, label + best, value, "", "", "", ""])
            labels.append(f"{variant}: {label[4:]}")
            values.append(value)
            colors.append("#999999" if best else "#bbbbbb")
        for backend, b in r["bluestream"].items():
            eps = b["events_per_s"]
            b["ratio_to_raw"] = eps / raw
            b["ratio_to_raw_confluent"] = eps / raw_ck
            b["ratio_to_limit"] = eps / limit
            b["ratio_to_incumbent"] = eps / inc
            b["ratio_to_incumbent_ceiling"] = eps / ceiling
            rows.append([variant, f"(b) bluestream/{backend}", eps, f"{eps / limit:.2f}",
                         f"{eps / inc:.1f}", f"{eps / ceiling:.2f}",
                         f"{b['rss_mb']['peak']:.0f}"])
            labels.append(f"{variant}: bluestream/{backend}")
            values.append(eps)
            colors.append("#4878a8")
            goal = SCALAR_EVENTS_VS_LIMIT if variant == "events" else SCALAR_PAGES_VS_LIMIT
            targets.append(goal.target(f"scalar {variant} {backend}: bluestream / limit",
                                       eps / limit))
            if variant == "events":
                targets.append(SCALAR_EVENTS_VS_CEILING.target(
                    f"scalar events {backend}: bluestream / incumbent ceiling",
                    eps / ceiling))
            targets.append(PEAK_RSS.target(f"daemon peak RSS: scalar {variant} {backend}",
                                           b["rss_mb"]["peak"]))
        rows.append([variant, "(c) incumbent MongoConsumer", inc, "", "", "", ""])
        rows.append([variant, "    incumbent client-side ceiling", ceiling, "", "", "", ""])
        labels.append(f"{variant}: incumbent")
        values.append(inc)
        colors.append("#d08040")
    print_table(["variant", "consumer", "events/s", "b/limit", "b/c", "b/c-ceiling",
                 "peak RSS MB"], rows, left=2)
    chart = ctx.out / f"{NAME}.png"
    bar_chart(chart, f"Scalar ingest ({s.scalar_fields} fields, "
              f"{s.scalar_runs * s.scalar_events_per_run:,} events; pages of "
              f"{s.page_events})", labels, values, "events/s", colors=colors)
    return Result(
        NAME,
        params={"runs": s.scalar_runs, "events_per_run": s.scalar_events_per_run,
                "fields": s.scalar_fields, "page_events": s.page_events,
                "backends": list(s.ingest_backends), "incumbent_runs": s.incumbent_runs,
                "partitions": 1, "raw_clients": [AIOKAFKA, CONFLUENT],
                "confluent_consume_timeout_s": CONSUME_TIMEOUT_S,
                "confluent_fetch_queue_backoff_ms": FETCH_QUEUE_BACKOFF_MS},
        results=results, targets=targets, charts=[chart.name], checks=checks,
        notes=["limit = the faster raw consumer (fetch + decode_message of the whole "
               "topic): raw = aiokafka, raw_confluent = confluent-kafka (librdkafka); "
               "ratio_to_raw is to aiokafka, ratio_to_limit to the faster",
               "b = stored and committed, timed from the daemon's first partition "
               "assignment to the group's committed offset reaching the end",
               "peak RSS = the daemon's VmHWM (rss_mb: also VmRSS sampled every 0.05 s)",
               "incumbent timed from its first to its last document, on a subset",
               "incumbent client-side ceiling: its decode + sanitize + BSON encode per "
               "document, no server - what it could reach on an infinitely fast mongod "
               "(the mongo-java-server used here is far slower than mongod)"],
    )
