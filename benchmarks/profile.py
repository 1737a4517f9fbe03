"""Where the daemon's time goes (supports the README's analysis; no targets of its own).

1. The hot path in process, no Kafka: pre-encoded envelopes of one run of single scalar
   events (and of event pages) through ``Ingestor.process``, batched as the daemon
   batches, with every stage timed (:class:`~benchmarks.inprocess.StageTimer`), including
   garbage-collector pauses. Once as is, once with the collector tuned
   (``gc.freeze()`` + a higher gen-0 threshold): a what-if that needs no code change.
2. What-ifs on the real daemon (same topic, fresh storage and group each): GC tuned,
   ``limits.batch_max_records = 20000``, both.
3. With pyinstrument installed (``.venv/bin/pip install pyinstrument``; not a project
   dependency), the in-process ``Ingestor.process`` call tree -> ``profile_ingest.txt``.
4. The cost of durability: the same in-process ingest with ``storage.fsync`` on (the
   default: every batch's Zarr files and directories fsynced before its metadata and
   commit) and off, back to back, best of :data:`FSYNC_REPEATS`, for single scalar
   events in the daemon's batches, small "live" batches and image frames; printed as the
   ratio on/off of events per second.
"""

from __future__ import annotations

import dataclasses
import gc
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from benchmarks.checks import no_data_loss
from benchmarks.common import Context, Result, bar_chart, print_table, rate
from benchmarks.docs import Run, image_frames, image_run, scalar_run
from benchmarks.infra import checked_ingest, create_topic, publish
from benchmarks.inprocess import StageTimer, batches, process_batches

NAME = "profile"
__all__ = ["GC_TUNED_ARGV", "NAME", "run"]

#: gen-0 threshold for the what-if (CPython's default is 700 allocations).
GC_GEN0 = 50_000
#: fsync on/off pairs, each measured this many times back to back; the best of each kept.
FSYNC_REPEATS = 3
#: Most frames in the fsync image case (its envelopes are held in memory, ~0.5 MB each).
FSYNC_IMAGE_FRAMES = 256
#: The daemon with the collector tuned after start-up imports (a what-if, no src change).
GC_TUNED_ARGV = [
    sys.executable, "-c",
    "import gc; import bluestream.cli as cli, bluestream.daemon.service; "
    f"gc.collect(); gc.freeze(); gc.set_threshold({GC_GEN0}, 20, 10); cli.main()",
    "serve",
]


@contextmanager
def _scalar_chunks(events: int | None) -> Iterator[None]:
    """What-if (measurement only): cap the event-axis chunk length of new arrays, by
    patching the writer's constant in this process. src is not changed."""
    import bluestream.layout as layout

    before = layout._MAX_CHUNK_EVENTS
    if events:
        layout._MAX_CHUNK_EVENTS = events
    try:
        yield
    finally:
        layout._MAX_CHUNK_EVENTS = before


@contextmanager
def _gc_tuned(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0, 20, 10)
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def _in_process(ctx: Context, run_: Run, label: str, backend: str, tuned: bool = False,
                batch: int | None = None, chunk: int | None = None,
                fsync: bool = True) -> dict[str, Any]:
    work = ctx.scratch(f"{NAME}-{label}")
    uri = ctx.mongo if backend == "mongo" else f"sqlite:///{work / 'meta.db'}"
    envelopes = list(batches(run_.docs, ctx.tenant(f"pf{label}"), batch))
    with _gc_tuned(tuned), _scalar_chunks(chunk), StageTimer() as timer:
        process_batches(uri, work / "zarr", envelopes, fsync=fsync)
    ctx.drop_scratch(work)
    n = run_.n_events
    total = timer.seconds["total"]
    stages = {k: v for k, v in timer.seconds.items() if k != "total"}
    top = sum(v for k, v in stages.items() if "." not in k and k != "gc pauses")
    top += sum(v for k, v in stages.items() if k.startswith("metadata."))
    top -= stages.get("metadata.get", 0.0)  # only inside route (parent lookups)
    return {"backend": backend, "gc_tuned": tuned, "batch": batch, "chunk_cap": chunk,
            "fsync": fsync,
            "batches": len(envelopes), "ms_per_batch": total / len(envelopes) * 1e3,
            "events": n, "seconds": total,
            "events_per_s": rate(n, total),
            "us_per_event": {k: v / n * 1e6 for k, v in sorted(stages.items())},
            "other_us_per_event": (total - top) / n * 1e6,
            "calls": dict(timer.calls)}


def _fsync_cost(ctx: Context, cases: dict[str, tuple[Run, int | None]]) -> dict[str, Any]:
    """Each case in process, SQLite metadata, fsync on then off, repeated back to back;
    the best pass of each. ``on_over_off`` < 1 is the share of speed durability keeps."""
    out: dict[str, Any] = {}
    for i, (case, (run_, batch)) in enumerate(cases.items()):
        best: dict[bool, dict[str, Any]] = {}
        for r in range(FSYNC_REPEATS):
            for fsync in (True, False):
                label = f"f{i}{r}{'y' if fsync else 'n'}"
                p = _in_process(ctx, run_, label, "sqlite", batch=batch, fsync=fsync)
                if fsync not in best or p["events_per_s"] > best[fsync]["events_per_s"]:
                    best[fsync] = p
        on, off = best[True], best[False]
        sync_s = on["us_per_event"].get("zarr sync (fsync)", 0.0) * on["events"] / 1e6
        out[case] = {
            "events": on["events"], "batches": on["batches"],
            "on": {k: on[k] for k in ("events_per_s", "ms_per_batch", "seconds")},
            "off": {k: off[k] for k in ("events_per_s", "ms_per_batch", "seconds")},
            "on_over_off": on["events_per_s"] / off["events_per_s"],
            "sync_ms_per_batch": sync_s / on["batches"] * 1e3,
            "sync_share_of_on": sync_s / on["seconds"],
        }
    return out


#: Daemon what-ifs that need no code change: (label, interpreter argv, limits in TOML).
WHATIFS: list[tuple[str, list[str] | None, str]] = [
    ("default", None, ""),
    ("gc_tuned", GC_TUNED_ARGV, ""),
    ("batch_20000", None, "batch_max_records = 20000"),
    ("gc_tuned+batch_20000", GC_TUNED_ARGV, "batch_max_records = 20000"),
]


def _daemon_whatif(ctx: Context, run_: Run) -> dict[str, Any]:
    """Real daemon, SQLite metadata: default vs tuned interpreter / batch size."""
    out: dict[str, Any] = {}
    messages = [(run_.uid.encode(), v, -1) for v in run_.encoded()]
    tenant = ctx.tenant("pfd")
    topic = ctx.topic(tenant)
    create_topic(ctx.kafka, topic, 1)
    publish(ctx.kafka, topic, messages)
    for label, argv, limits in WHATIFS:
        work = ctx.scratch(f"{NAME}-daemon")
        env = {}
        if limits:
            config = ctx.work / f"{NAME}-{label}.toml"
            config.write_text(f"[limits]\n{limits}\n")
            env["BLUESTREAM_CONFIG"] = str(config)
        timing, _, failures = checked_ingest(
            kafka=ctx.kafka, topic=topic, group=f"g-{topic}-{label}", backend="sqlite",
            mongo=ctx.mongo, tenant=tenant, work=work, expected=(1, run_.n_events, 1),
            argv=argv, extra_env=env)
        out[label] = {**timing.as_dict(), "data_loss_retries": failures, "limits": limits,
                      "events_per_s": rate(run_.n_events, timing.seconds)}
        ctx.drop_scratch(work)
    base = out["default"]["events_per_s"]
    for label, *_ in WHATIFS:
        out[label]["speedup"] = out[label]["events_per_s"] / base
    return out


def run(ctx: Context) -> Result:
    s = ctx.sizes
    events = scalar_run(s.profile_events, fields=s.scalar_fields)
    pages = scalar_run(s.profile_events, fields=s.scalar_fields, page_events=s.page_events)
    small = scalar_run(min(s.profile_events, 2_000), fields=s.scalar_fields)
    passes = {
        "events/sqlite": _in_process(ctx, events, "es", "sqlite"),
        "events/mongo": _in_process(ctx, events, "em", "mongo"),
        "events/sqlite/gc-tuned": _in_process(ctx, events, "et", "sqlite", tuned=True),
        "events/sqlite/chunk-8k": _in_process(ctx, events, "ec", "sqlite", chunk=8192),
        "events/sqlite/gc+chunk-8k": _in_process(ctx, events, "eb", "sqlite", tuned=True,
                                                 chunk=8192),
        "pages/sqlite": _in_process(ctx, pages, "ps", "sqlite"),
        "pages/sqlite/gc-tuned": _in_process(ctx, pages, "pt", "sqlite", tuned=True),
        "live/100-event batches": _in_process(ctx, small, "l1", "sqlite", batch=100),
        "live/100, chunk-8k": _in_process(ctx, small, "l2", "sqlite", batch=100, chunk=8192),
    }
    stage_names = sorted({k for p in passes.values() for k in p["us_per_event"]})
    print("  in-process Ingestor.process, microseconds per event by stage "
          "(zarr.* and gc are inside other stages):")
    print_table(["stage", *passes], [
        [k, *(p["us_per_event"].get(k, 0.0) for p in passes.values())] for k in stage_names
    ] + [["other (loop, batching)", *(p["other_us_per_event"] for p in passes.values())],
         ["TOTAL us/event", *(p["seconds"] / p["events"] * 1e6 for p in passes.values())],
         ["events/s", *(p["events_per_s"] for p in passes.values())],
         ["ms per batch", *(p["ms_per_batch"] for p in passes.values())]])
    frames = image_frames(s.image_shape)
    img_run, img_docs = image_run(min(s.image_frames, FSYNC_IMAGE_FRAMES), frames)
    images = dataclasses.replace(img_run, docs=list(img_docs))
    fsync = _fsync_cost(ctx, {
        "events (daemon batches)": (events, None),
        "live (100-event batches)": (small, 100),
        f"images {s.image_shape[0]}x{s.image_shape[1]} u2": (images, None),
    })
    print(f"  durability: in process, SQLite, storage.fsync on vs off "
          f"(best of {FSYNC_REPEATS} each, back to back):")
    print_table(["case", "batches", "on ev/s", "off ev/s", "on/off", "sync ms/batch",
                 "sync share"],
                [[k, v["batches"], v["on"]["events_per_s"], v["off"]["events_per_s"],
                  f"{v['on_over_off']:.2f}", v["sync_ms_per_batch"],
                  f"{v['sync_share_of_on']:.0%}"] for k, v in fsync.items()])
    daemon = _daemon_whatif(ctx, events)
    print("  real daemon, single events, SQLite metadata (no code changes):")
    print_table(["daemon", "events/s", "speedup"],
                [[k, v["events_per_s"], f"{v['speedup']:.2f}"] for k, v in daemon.items()])
    profile_file = _pyinstrument(ctx, events)
    base = passes["events/sqlite"]["us_per_event"]
    chart = ctx.out / f"{NAME}.png"
    shown = [k for k in stage_names if not k.startswith("zarr.") and k != "metadata.get"]
    bar_chart(chart, f"Ingestor.process per event, {events.n_events:,} single events x "
              f"{s.scalar_fields} fields, SQLite (gc pauses overlap the other stages)",
              [*shown, "other"],
              [*(base.get(k, 0.0) for k in shown), passes["events/sqlite"]["other_us_per_event"]],
              "microseconds per event")
    return Result(
        NAME,
        params={"events": s.profile_events, "fields": s.scalar_fields,
                "page_events": s.page_events, "gc_gen0_threshold_whatif": GC_GEN0,
                "fsync_repeats": FSYNC_REPEATS,
                "fsync_image_frames": images.n_events, "image_shape": s.image_shape},
        results={"in_process": passes, "fsync": fsync, "daemon": daemon,
                 "pyinstrument": profile_file},
        charts=[chart.name],
        checks=[no_data_loss(f"daemon {label}", d["data_loss_retries"])
                for label, d in daemon.items()],
        notes=["stages nest: zarr.* are inside 'zarr write_page'; 'gc pauses' overlap "
               "whatever stage was running; 'other' = total minus the top-level stages"],
    )


def _pyinstrument(ctx: Context, run_: Run) -> str | None:
    try:
        from pyinstrument import Profiler
    except ImportError:
        print("  (pyinstrument not installed: no call tree)")
        return None
    work = ctx.scratch(f"{NAME}-pyinstrument")
    envelopes = list(batches(run_.docs, ctx.tenant("pfpi")))
    profiler = Profiler(interval=0.001, async_mode="enabled", use_timing_thread=True)
    t = time.perf_counter()
    with profiler:
        process_batches(f"sqlite:///{work / 'meta.db'}", work / "zarr", envelopes)
    seconds = time.perf_counter() - t
    ctx.drop_scratch(work)
    path = ctx.out / "profile_ingest.txt"
    path.write_text(profiler.output_text(unicode=False, color=False, show_all=False))
    print(f"  pyinstrument call tree ({seconds:.1f} s under the profiler) -> {path}")
    return path.name
