"""Where the daemon's time goes: the hot path in process, no Kafka, stage by stage.

Pre-encoded envelopes of single scalar events (one run) go through, cumulatively:
decode; decode + validate; decode + validate + page building; the whole
``Ingestor.process`` (SQLite metadata and Mongo metadata). Each stage's rate says what
the next one costs. With pyinstrument installed (not a project dependency:
``.venv/bin/pip install pyinstrument``), ``Ingestor.process`` is also profiled and the
call tree written to ``profile_ingest.txt``.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.common import Context, Result, bar_chart, print_table, rate
from benchmarks.docs import scalar_run
from benchmarks.read import ingest_in_process
from bluestream.consumers.decode import decode_message
from bluestream.daemon.config import LimitSettings
from bluestream.limits import Limits
from bluestream.schemas.normalise import field_specs, page_from_events
from bluestream.schemas.validate import validate

NAME = "profile"
__all__ = ["NAME", "run"]


def _pure_stages(values: list[bytes], descriptor: dict[str, Any], batch: int
                 ) -> dict[str, float]:
    """Seconds for the pure stages over the events: decode, validate, page building."""
    lim = Limits()
    out: dict[str, float] = {}
    t = time.perf_counter()
    docs = [decode_message(v, max_bytes=lim.max_message_bytes) for v in values]
    out["decode"] = time.perf_counter() - t
    t = time.perf_counter()
    for name, doc in docs:
        validate(name, doc)
    out["validate"] = time.perf_counter() - t
    specs = field_specs(descriptor, lim)
    t = time.perf_counter()
    for i in range(0, len(docs), batch):
        page_from_events([d for _, d in docs[i:i + batch]], specs, lim)
    out["page"] = time.perf_counter() - t
    return out


def run(ctx: Context) -> Result:
    s = ctx.sizes
    lim = LimitSettings()
    run_ = scalar_run(s.profile_events, fields=s.scalar_fields)
    encoded = run_.encoded()
    events = encoded[2:-1]
    n = len(events)
    stages = _pure_stages(events, run_.docs[1][1], lim.batch_max_records)

    totals: dict[str, float] = {}
    for backend in ("sqlite", "mongo"):
        work = ctx.scratch(f"{NAME}-{backend}")
        uri = ctx.mongo if backend == "mongo" else f"sqlite:///{work / 'meta.db'}"
        tenant = ctx.tenant(f"pf{backend[0]}")
        t = time.perf_counter()
        ingest_in_process(uri, work / "zarr", tenant, run_.docs)
        totals[backend] = time.perf_counter() - t
        ctx.drop_scratch(work)

    cumulative = {
        "decode": stages["decode"],
        "+ validate": stages["decode"] + stages["validate"],
        "+ page building": stages["decode"] + stages["validate"] + stages["page"],
        "Ingestor.process (sqlite)": totals["sqlite"],
        "Ingestor.process (mongo)": totals["mongo"],
    }
    rows = [[k, rate(n, v), v / n * 1e6] for k, v in cumulative.items()]
    print_table(["stage (cumulative)", "events/s", "us/event"], rows)
    profile_file = _pyinstrument(ctx, run_.docs)
    chart = ctx.out / f"{NAME}.png"
    bar_chart(chart, f"In-process hot path, {n:,} single events x {s.scalar_fields} fields "
              "(cumulative stages)", list(cumulative), [v / n * 1e6 for v in
                                                        cumulative.values()],
              "microseconds per event")
    return Result(
        NAME,
        params={"events": n, "fields": s.scalar_fields, "batch": lim.batch_max_records},
        results={"seconds": cumulative,
                 "events_per_s": {k: rate(n, v) for k, v in cumulative.items()},
                 "us_per_event": {k: v / n * 1e6 for k, v in cumulative.items()},
                 "pyinstrument": profile_file},
        charts=[chart.name],
        notes=["stages are cumulative; Ingestor.process includes Zarr writes and the "
               "metadata bulk writes, batched as the daemon batches (5,000 records)"],
    )


def _pyinstrument(ctx: Context, docs: list[tuple[str, dict[str, Any]]]) -> str | None:
    try:
        from pyinstrument import Profiler
    except ImportError:
        print("  (pyinstrument not installed: no call tree)")
        return None
    work = ctx.scratch(f"{NAME}-pyinstrument")
    profiler = Profiler(interval=0.0005, async_mode="enabled")
    with profiler:
        ingest_in_process(f"sqlite:///{work / 'meta.db'}", work / "zarr",
                          ctx.tenant("pfp"), docs)
    ctx.drop_scratch(work)
    path = ctx.out / "profile_ingest.txt"
    path.write_text(profiler.output_text(unicode=False, color=False, show_all=False))
    print(f"  pyinstrument call tree -> {path}")
    return path.name
