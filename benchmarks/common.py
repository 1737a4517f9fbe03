"""What every scenario shares: sizes per mode, the run context, targets, JSON and charts.

Scenarios return a :class:`Result`; :func:`save_result` writes ``<scenario>.json`` and
the runner prints the targets table. Nothing here measures anything.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from benchmarks.checks import Check

__all__ = ["FULL", "GOALS", "QUICK", "Check", "Context", "Goal", "Result", "Sizes", "Target",
           "fmt", "mb", "plt", "print_table", "rate", "save_result"]

MB = 1_000_000


@dataclass(frozen=True)
class Sizes:
    """How much data each scenario moves. Quick mode only proves the code still works."""

    scalar_runs: int
    scalar_events_per_run: int
    scalar_fields: int
    page_events: int  # events per event_page in the "pages" sub-scenario
    ingest_backends: tuple[str, ...]
    incumbent_runs: int  # runs the incumbent consumes (a subset: it is slow)
    image_frames: int
    image_shape: tuple[int, int]
    latency_rate: float  # events/s
    latency_seconds: float
    latency_backends: tuple[str, ...]
    read_scalar_events: int
    read_image_frames: int
    read_incumbent_image_frames: int  # inline images in Mongo are huge: a subset
    read_repeats: int
    scaling_runs: int
    scaling_events_per_run: int
    scaling_partitions: int
    profile_events: int
    s3_image_frames: int  # the object-store scenario (the test S3 server is slow)
    s3_scalar_events: int


FULL = Sizes(
    scalar_runs=20, scalar_events_per_run=10_000, scalar_fields=10, page_events=100,
    ingest_backends=("sqlite", "mongo"), incumbent_runs=1,
    image_frames=2_000, image_shape=(512, 512),
    latency_rate=200.0, latency_seconds=20.0, latency_backends=("mongo", "sqlite"),
    read_scalar_events=100_000, read_image_frames=1_000, read_incumbent_image_frames=50,
    read_repeats=3,
    scaling_runs=18, scaling_events_per_run=10_000, scaling_partitions=6,
    profile_events=50_000,
    s3_image_frames=500, s3_scalar_events=40_000,
)

QUICK = Sizes(
    scalar_runs=2, scalar_events_per_run=400, scalar_fields=10, page_events=50,
    ingest_backends=("sqlite", "mongo"), incumbent_runs=1,
    image_frames=24, image_shape=(128, 128),
    latency_rate=50.0, latency_seconds=2.0, latency_backends=("mongo", "sqlite"),
    read_scalar_events=2_000, read_image_frames=16, read_incumbent_image_frames=8,
    read_repeats=1,
    scaling_runs=6, scaling_events_per_run=300, scaling_partitions=6,
    profile_events=2_000,
    s3_image_frames=24, s3_scalar_events=2_000,
)


@dataclass
class Context:
    """One benchmark run: where results and scratch data go, which services, unique ids."""

    quick: bool
    out: Path
    work: Path
    kafka: str
    mongo: str
    keep: bool = False
    run_id: str = field(default_factory=lambda: time.strftime("%m%d%H%M")
                        + uuid.uuid4().hex[:4])
    topics: list[str] = field(default_factory=list)
    mongo_dbs: list[str] = field(default_factory=list)

    @property
    def sizes(self) -> Sizes:
        return QUICK if self.quick else FULL

    @property
    def mode(self) -> str:
        return "quick" if self.quick else "full"

    def tenant(self, what: str) -> str:
        """A fresh tenant (Mongo database, Zarr sub-tree) for this run; also the topic's
        first dotted component, which is how the daemon picks the tenant."""
        name = f"b{self.run_id}{what}".replace(".", "_")[:63]
        self.mongo_dbs.append(name)
        return name

    def topic(self, tenant: str) -> str:
        topic = f"{tenant}.bluesky.runengine.documents"
        self.topics.append(topic)
        return topic

    def scratch(self, what: str) -> Path:
        path = self.work / what
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

    def drop_scratch(self, path: Path) -> None:
        if not self.keep:
            shutil.rmtree(path, ignore_errors=True)


@dataclass
class Target:
    """One target of issue 12 (see :data:`GOALS`) and what was measured for it."""

    name: str
    measured: float
    target: float
    unit: str
    higher_is_better: bool = True
    #: Lower is better: met at ``measured <= target`` (else strictly below it).
    or_equal: bool = False

    @property
    def op(self) -> str:
        return ">=" if self.higher_is_better else "<=" if self.or_equal else "<"

    @property
    def met(self) -> bool:
        if self.higher_is_better:
            return self.measured >= self.target
        if self.or_equal:
            return self.measured <= self.target
        return self.measured < self.target

    def line(self) -> str:
        verdict = "met" if self.met else "MISSED"
        return (f"{self.name}: {fmt(self.measured)} {self.unit} "
                f"(target {self.op} {fmt(self.target)} {self.unit}) {verdict}")


@dataclass(frozen=True)
class Goal:
    """A target definition of issue 12 ("hot path"): the bar, independent of a run.
    Scenarios turn a measurement into a :class:`Target` with :meth:`target`."""

    key: str
    what: str
    value: float
    unit: str
    higher_is_better: bool = True
    or_equal: bool = False

    @property
    def op(self) -> str:
        return ">=" if self.higher_is_better else "<=" if self.or_equal else "<"

    def target(self, name: str, measured: float) -> Target:
        return Target(name, measured, self.value, self.unit, self.higher_is_better,
                      self.or_equal)


# -- the targets of issue 12 ("hot path"). The raw consume *limit* is the faster of two
# raw consumers of the same topic, each with the daemon's decode (decode_message): aiokafka
# and confluent-kafka (librdkafka). They replace issue 8's ">= 10x the incumbent" ingest
# and "p99 < 1 s" latency targets; the read ratios stay.
SCALAR_EVENTS_VS_LIMIT = Goal(
    "scalar_events_vs_limit", "single scalar events (10 float fields), SQLite and Mongo "
    "metadata: bluestream / raw consume limit", 0.5, "x")
SCALAR_EVENTS_VS_CEILING = Goal(
    "scalar_events_vs_incumbent_ceiling", "single scalar events: bluestream / the "
    "incumbent's client-side ceiling (msgpack decode + sanitize_doc + BSON encode, no "
    "server)", 3.0, "x")
SCALAR_PAGES_VS_LIMIT = Goal(
    "scalar_pages_vs_limit", "event pages of 100 events, SQLite and Mongo metadata: "
    "bluestream / raw consume limit (events/s)", 0.5, "x")
IMAGES_VS_BOUND = Goal(
    "images_vs_bound", "512x512 uint16 images: bluestream / min(plain Zarr write, raw "
    "consume limit) of the same frames", 0.8, "x")
LATENCY_P50 = Goal(
    "latency_p50_ms", "live latency publish -> readable, single events at 200/s, both "
    "metadata stores: p50", 50.0, "ms", higher_is_better=False)
LATENCY_P99 = Goal(
    "latency_p99_ms", "live latency publish -> readable, single events at 200/s, both "
    "metadata stores: p99", 250.0, "ms", higher_is_better=False)
PEAK_RSS = Goal(
    "peak_rss_mb", "daemon peak RSS (VmHWM) in every daemon scenario: scalar single "
    "events, event pages, images, latency (each metadata store run)", 500.0, "MB",
    higher_is_better=False)
READ_SCALAR_SECONDS = Goal(
    "read_scalar_s", "read() of a 100,000-event scalar run (absolute)", 0.3, "s",
    higher_is_better=False, or_equal=True)
READ_SCALAR_VS_INCUMBENT = Goal(
    "read_scalar_vs_incumbent", "read() of 100,000 scalar events: bluestream / incumbent",
    10.0, "x")
READ_IMAGES_VS_INCUMBENT = Goal(
    "read_images_vs_incumbent", "read() of images (frames/s): bluestream / incumbent",
    10.0, "x")

# -- the targets of issue 17 ("short runs").
SHORT_RUNS_PER_S = Goal(
    "short_runs_per_s", "one-event runs (start, descriptor, event, stop) per second through "
    "bluestream ingest and through the daemon, SQLite and Mongo metadata", 1_000.0, "runs/s")
SHORT_RUNS_VS_INCUMBENT = Goal(
    "short_runs_vs_incumbent", "one-event runs per second, Mongo metadata: bluestream / the "
    "incumbent (suitcase-mongo Serializer) on the same server", 2.0, "x")
SHORT_RUNS_FILES = Goal(
    "short_run_files", "files on disk per one-event run (Zarr and metadata store)", 3.0,
    "files", higher_is_better=False, or_equal=True)
SHORT_RUNS_KB = Goal(
    "short_run_kb", "bytes on disk per one-event run (Zarr and metadata store)", 16.0, "KB",
    higher_is_better=False, or_equal=True)
SHORT_RUNS_CATALOG_MS = Goal(
    "catalog_100k_ms", "a catalog of 100,000 runs (SQLite): len, cat[-1], cat[scan_id], a "
    "partial uid, the first 10 of a TimeRange search, listing 10,000 uids: each within "
    "tens of milliseconds", 50.0, "ms", higher_is_better=False, or_equal=True)
SHORT_RUNS_CATALOG_GROWTH = Goal(
    "catalog_growth", "the same operations, cost per run they touch (per run counted, "
    "found or listed) at 100,000 runs / at 1,000 runs, times below 1 ms counted as 1 ms: "
    "flat as the catalog grows", 3.0, "x", higher_is_better=False, or_equal=True)
SHORT_RUNS_IMPORT_VS_INGEST = Goal(
    "import_vs_ingest", "bluestream ingest-mongo of a suitcase-mongo database of one-event "
    "runs (runs/s) / bluestream ingest of one-event runs from files, SQLite (issue 17 asks "
    "it of 100,000 runs)", 1.0, "x")

# -- the target of issue 13 ("object storage").
IMAGES_S3_VS_PLAIN = Goal(
    "images_s3_vs_plain_zarr", "512x512 uint16 images with the Zarr root on S3: bluestream "
    "/ a plain Zarr write of the same frames to the same S3 server with the same store "
    "class", 0.8, "x")

# -- the targets of issue 14 ("remote readers").
TILED_IMAGES_VS_LOCAL = Goal(
    "tiled_images_vs_local", "read() of a 1,000-frame image run over HTTP (bluestream tiled, "
    "stock client): frames/s remote / local", 0.5, "x")
TILED_SCALAR_TIME_VS_LOCAL = Goal(
    "tiled_scalar_time_vs_local", "read() of a 100,000-event scalar run over HTTP: time "
    "remote / local", 3.0, "x", higher_is_better=False, or_equal=True)

GOALS: tuple[Goal, ...] = (
    SCALAR_EVENTS_VS_LIMIT, SCALAR_EVENTS_VS_CEILING, SCALAR_PAGES_VS_LIMIT,
    IMAGES_VS_BOUND, LATENCY_P50, LATENCY_P99, PEAK_RSS, READ_SCALAR_SECONDS,
    READ_SCALAR_VS_INCUMBENT, READ_IMAGES_VS_INCUMBENT, SHORT_RUNS_PER_S,
    SHORT_RUNS_VS_INCUMBENT, SHORT_RUNS_FILES, SHORT_RUNS_KB, SHORT_RUNS_CATALOG_MS,
    SHORT_RUNS_CATALOG_GROWTH, SHORT_RUNS_IMPORT_VS_INGEST, IMAGES_S3_VS_PLAIN,
    TILED_IMAGES_VS_LOCAL, TILED_SCALAR_TIME_VS_LOCAL,
)


@dataclass
class Result:
    """What a scenario measured, and what it checked (a failed check fails the run)."""

    scenario: str
    params: dict[str, Any]
    results: dict[str, Any]
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    charts: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    @property
    def failed_checks(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def as_json(self, ctx: Context) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "mode": ctx.mode,
            "run_id": ctx.run_id,
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine(),
            "params": self.params,
            "results": self.results,
            "targets": [{**asdict(t), "op": t.op, "met": t.met} for t in self.targets],
            "checks": [asdict(c) for c in self.checks],
            "notes": self.notes,
            "charts": self.charts,
        }


def machine() -> dict[str, Any]:
    """Where it ran; the load average tells whether something else shared the CPUs."""
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "host": platform.node(),
            "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()]}


def save_result(ctx: Context, result: Result) -> Path:
    path = ctx.out / f"{result.scenario}.json"
    path.write_text(json.dumps(result.as_json(ctx), indent=2, default=_json_default) + "\n")
    return path


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def best_of(fn: Callable[[], Any], repeats: int, budget_s: float = 10.0
            ) -> tuple[float, Any]:
    """(fastest seconds, last value) of ``repeats`` runs of ``fn``, fewer when the runs
    so far already took ``budget_s``."""
    times: list[float] = []
    value = None
    for _ in range(repeats):
        t = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t)
        if sum(times) > budget_s:
            break
    return min(times), value


def rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("nan")


def mb(nbytes: float) -> float:
    return nbytes / MB


def fmt(value: float) -> str:
    """Three significant figures, thousands separated, no scientific notation."""
    if value != value:  # NaN
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> None:
    """Columns after the first ``left`` (text) ones are right-aligned."""
    cells = [[fmt(c) if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  " + "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  " + "  ".join("-" * w for w in widths))
    for row in cells:
        print("  " + "  ".join(c.rjust(w) if i >= left else c.ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))))


def bar_chart(path: Path, title: str, labels: Sequence[str], values: Sequence[float],
              unit: str, *, colors: Sequence[str] | None = None,
              hlines: Sequence[tuple[float, str]] = ()) -> None:
    """Horizontal bars with the value printed on each; optional target lines."""
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(labels) + 1.6))
    y = range(len(labels))
    ax.barh(list(y), list(values), color=list(colors) if colors else "#4878a8")
    ax.set_yticks(list(y), list(labels))
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    ax.set_title(title)
    top = max([v for v in values if v == v] or [1.0])
    for i, v in enumerate(values):
        ax.text(v + top * 0.01, i, fmt(v), va="center", fontsize=9)
    for x, label in hlines:
        ax.axvline(x, color="#c44", linestyle="--", linewidth=1)
        ax.text(x, len(labels) - 0.5, f" {label}", color="#c44", fontsize=8, va="bottom")
    ax.set_xlim(0, top * 1.18)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
