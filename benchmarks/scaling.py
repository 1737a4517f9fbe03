"""Scenario 5 - scaling: ingest rate of 1 vs 2 daemons in one consumer group on a topic of
6 partitions (Mongo metadata, as in production).

The daemons start first, on the empty topic; once the group is stable (every partition
assigned) the runs are published as fast as possible, one run per partition in turn and
their documents interleaved, and the time to "all committed" is measured from the start
of publishing. Each daemon count gets its own topic and tenant (same data), so neither
ingests into storage the other already filled. (Peak RSS under 1 GB of images is
measured in the image scenario, whose daemon ingests exactly that.)
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.checks import Check, equal
from benchmarks.common import Context, Result, bar_chart, print_table, rate
from benchmarks.docs import scalar_run
from benchmarks.infra import Message, create_topic, publish, stored_events, timed_ingest

NAME = "scaling"
__all__ = ["NAME", "run"]


def _messages(ctx: Context) -> list[Message]:
    s = ctx.sizes
    runs = []
    for r in range(s.scaling_runs):
        run_ = scalar_run(s.scaling_events_per_run, fields=s.scalar_fields, scan_id=r + 1)
        runs.append((run_.uid.encode(), r % s.scaling_partitions, run_.encoded()))
    out: list[Message] = []
    for i in range(max(len(enc) for _, _, enc in runs)):
        for key, part, enc in runs:
            if i < len(enc):
                out.append((key, enc[i], part))
    return out


def run(ctx: Context) -> Result:
    s = ctx.sizes
    messages = _messages(ctx)
    total = s.scaling_runs * s.scaling_events_per_run
    results: dict[str, Any] = {}
    checks: list[Check] = []
    for n in (1, 2):
        tenant = ctx.tenant(f"sc{n}")
        topic = ctx.topic(tenant)
        create_topic(ctx.kafka, topic, s.scaling_partitions)
        work = ctx.scratch(f"{NAME}-{n}")

        def flood(topic: str = topic) -> float:
            t0 = time.time()
            publish(ctx.kafka, topic, messages)
            return t0

        timing = timed_ingest(kafka=ctx.kafka, topic=topic, group=f"g-{topic}",
                              metadata=ctx.mongo, zarr_root=work / "zarr", log_dir=work,
                              daemons=n, publish_after_assignment=flood)
        checks.append(equal(f"stored (runs, events, stops): {n} daemon(s)",
                            stored_events(ctx.mongo, tenant),
                            (s.scaling_runs, total, s.scaling_runs)))
        eps = rate(total, timing.seconds)
        results[f"{n}_daemons"] = {**timing.as_dict(), "events_per_s": eps}
        print(f"  {n} daemon(s): {eps:,.0f} events/s ({timing.seconds:.1f} s, publishing "
              f"took {timing.publish_s:.1f} s), peak RSS "
              f"{', '.join(f'{m:.0f}' for m in timing.peak_rss_mb)} MB")
        ctx.drop_scratch(work)
    one, two = results["1_daemons"]["events_per_s"], results["2_daemons"]["events_per_s"]
    results["speedup"] = two / one
    print_table(["daemons", "events/s", "speedup"], [["1", one, "1.00"],
                                                      ["2", two, f"{two / one:.2f}"]])
    chart = ctx.out / f"{NAME}.png"
    bar_chart(chart, f"Scale-out: {s.scaling_partitions} partitions, {total:,} events "
              f"({ctx.sizes.scalar_fields} fields), Mongo metadata",
              ["1 daemon", "2 daemons"], [one, two], "events/s (stored and committed)")
    return Result(
        NAME,
        params={"runs": s.scaling_runs, "events_per_run": s.scaling_events_per_run,
                "partitions": s.scaling_partitions, "fields": s.scalar_fields,
                "metadata": "mongo", "cpus": _cpus()},
        results=results,
        notes=["timed from the start of publishing into a settled group to all committed",
               "on 2 cores the daemons share the CPUs with Kafka, the Mongo-wire server "
               "and the producer: the speed-up is a floor, not what more cores give"],
        charts=[chart.name], checks=checks,
    )


def _cpus() -> int:
    import os

    return os.cpu_count() or 0
