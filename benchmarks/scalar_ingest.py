"""Scenario 1 - scalar ingest: runs of 10 scalar fields already in Kafka, as single events
and as event pages.

(a) raw: aiokafka fetch + msgpack decode of the whole topic, with the daemon's fetch
    settings - the ceiling for a Python consumer;
(b) bluestream: ``python -m bluestream serve`` until the group's offsets are committed
    (stored and committed), per metadata backend;
(c) incumbent: bluesky-kafka ``MongoConsumer`` + suitcase-mongo into a fresh database on
    the same server, on the first run(s) of the same topic (it is slow; rates compare).
"""

from __future__ import annotations

import time
from typing import Any

import anyio
from aiokafka import AIOKafkaConsumer, TopicPartition

from benchmarks.checks import Check, equal, no_data_loss
from benchmarks.common import Context, Result, Target, bar_chart, print_table, rate
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
__all__ = ["NAME", "raw_consume", "run"]


async def raw_consume(bootstrap: str, topic: str, ends: dict[int, int]
                      ) -> tuple[int, int, float]:
    """Fetch and decode every message. Returns (messages, events, seconds)."""
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
                    name, doc = decode_message(r.value, max_bytes=lim.max_message_bytes)
                    if name == "event":
                        events += 1
                    elif name == "event_page":
                        events += len(doc["seq_num"])
                messages += len(records)
                pos[tp.partition] = records[-1].offset + 1
        return messages, events, time.perf_counter() - started
    finally:
        await consumer.stop()


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

    msgs, events, secs = anyio.run(raw_consume, ctx.kafka, topic, ends)
    checks.append(equal(f"raw consume saw every message: {variant}", (msgs, events),
                        (n_messages, total)))
    out["raw"] = {"seconds": secs, "events_per_s": rate(events, secs),
                  "messages_per_s": rate(msgs, secs)}
    print(f"  [{variant}] (a) raw consume+decode: {rate(events, secs):,.0f} events/s")

    out["bluestream"] = {}
    for backend in s.ingest_backends:
        work = ctx.scratch(f"{NAME}-{variant}-{backend}")
        timing, _, failures = checked_ingest(
            kafka=ctx.kafka, topic=topic, group=f"g-{topic}-{backend}", backend=backend,
            mongo=ctx.mongo, tenant=tenant, work=work,
            expected=(s.scalar_runs, total, s.scalar_runs))
        eps = rate(total, timing.seconds)
        out["bluestream"][backend] = {**timing.as_dict(), "events_per_s": eps,
                                      "data_loss_retries": failures}
        checks.append(no_data_loss(f"{variant}/{backend}", failures))
        print(f"  [{variant}] (b) bluestream/{backend}: {eps:,.0f} events/s "
              f"({timing.seconds:.1f} s, start-up {timing.startup_s:.1f} s, "
              f"peak RSS {timing.peak_rss_mb[0]:.0f} MB)")
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
        raw = r["raw"]["events_per_s"]
        inc = r["incumbent"]["events_per_s"]
        ceiling = r["incumbent"]["client_side_ceiling_events_per_s"]
        rows.append([variant, "(a) raw consume+decode", raw, "", "", ""])
        labels.append(f"{variant}: raw consume+decode")
        values.append(raw)
        colors.append("#999999")
        for backend, b in r["bluestream"].items():
            eps = b["events_per_s"]
            b["ratio_to_raw"] = eps / raw
            b["ratio_to_incumbent"] = eps / inc
            b["ratio_to_incumbent_ceiling"] = eps / ceiling
            rows.append([variant, f"(b) bluestream/{backend}", eps,
                         f"{eps / raw:.2f}", f"{eps / inc:.1f}", f"{eps / ceiling:.2f}"])
            labels.append(f"{variant}: bluestream/{backend}")
            values.append(eps)
            colors.append("#4878a8")
            targets.append(Target(f"scalar {variant} {backend}: b/a", eps / raw, 0.5, "x"))
            targets.append(Target(f"scalar {variant} {backend}: b/c", eps / inc, 10.0, "x"))
        rows.append([variant, "(c) incumbent MongoConsumer", inc, "", "", ""])
        rows.append([variant, "    incumbent client-side ceiling", ceiling, "", "", ""])
        labels.append(f"{variant}: incumbent")
        values.append(inc)
        colors.append("#d08040")
    print_table(["variant", "consumer", "events/s", "b/a", "b/c", "b/c-ceiling"], rows)
    chart = ctx.out / f"{NAME}.png"
    bar_chart(chart, f"Scalar ingest ({s.scalar_fields} fields, "
              f"{s.scalar_runs * s.scalar_events_per_run:,} events; pages of "
              f"{s.page_events})", labels, values, "events/s", colors=colors)
    return Result(
        NAME,
        params={"runs": s.scalar_runs, "events_per_run": s.scalar_events_per_run,
                "fields": s.scalar_fields, "page_events": s.page_events,
                "backends": list(s.ingest_backends), "incumbent_runs": s.incumbent_runs,
                "partitions": 1},
        results=results, targets=targets, charts=[chart.name], checks=checks,
        notes=["b = stored and committed, timed from the daemon's first partition "
               "assignment to the group's committed offset reaching the end",
               "incumbent timed from its first to its last document, on a subset",
               "incumbent client-side ceiling: its decode + sanitize + BSON encode per "
               "document, no server - what it could reach on an infinitely fast mongod "
               "(the mongo-java-server used here is far slower than mongod)"],
    )
