"""Scenario - lifecycle (issue 15): ``summary(field, points=1000)`` of a 10-million-event
scalar column against reading the column, and ``verify(level=4)`` of a 100,000-event
run of 10 fields against reading the run.

The column (float64, a random walk with a NaN every ~1,000 events) is written through
:meth:`ZarrEventStore.write_page` (the daemon's Zarr writer, summaries included) in
pages of 262,144 events, its documents and ``event_stream`` record through the SQLite
metadata store; Kafka and decoding are left out, they are not what is measured here.
The same column is written a second time with the summaries switched off (what a
bluestream before summaries stored), which gives both the write cost of the summaries
and the time ``summary()`` takes when it must compute them from the rows.

Timed, best of a few: ``read(["det"])`` through the catalog (what a user would do
without summaries: the column with its seq_num, time and uid), the bare Zarr array
``data/det`` read whole (the least any reader of the column reads), and ``summary``.
Checked: the summary equals numpy's over the same values.

The 100,000-event run (10 float64 fields, written the same way, all rows in Zarr) is
checked at level 4 (``cat.verify``: every chunk read and decoded, values against the
stop, sample rows read back) and read whole (``run["primary"].read()``); checked: no
problem is found.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import event_model
import numpy as np
import zarr

import bluestream
import bluestream.storage.zarr_store as zarr_store
from benchmarks.checks import Check, equal
from benchmarks.common import Context, Goal, Result, bar_chart, best_of, print_table
from bluestream.layout import STRING, SUMMARY_WINDOW, Page, descriptor_path, field_specs
from bluestream.limits import Limits
from bluestream.storage.registry import StoreRegistry

NAME = "lifecycle"
__all__ = ["NAME", "run"]

SUMMARY_VS_READ = Goal(
    "summary_vs_read", "summary(points=1000) of a 10-million-event scalar column: "
    "read() of the column / summary() time", 50.0, "x")
VERIFY_SECONDS = Goal(
    "verify_seconds", "verify --level 4 of a 100,000-event run of 10 scalar fields: "
    "seconds (issue: 'in seconds, not minutes')", 10.0, "s", higher_is_better=False,
    or_equal=True)
_PAGE = 1 << 18
_VERIFY_FIELDS = 10
_POINTS = 1000
Doc = dict[str, Any]


def _column(n: int) -> np.ndarray:
    rng = np.random.default_rng(15)
    det = np.cumsum(rng.normal(0.0, 1.0, n))
    det[rng.random(n) < 0.001] = np.nan
    return det


@contextmanager
def _summaries_off() -> Iterator[None]:
    """The Zarr writer as it was before summaries: no summary arrays."""
    saved = zarr_store.summary_columns
    zarr_store.summary_columns = lambda specs, page: []
    try:
        yield
    finally:
        zarr_store.summary_columns = saved


async def _write(uri: str, root: Path, tenant: str, columns: dict[str, np.ndarray]
                 ) -> tuple[str, float]:
    """Store a run whose primary stream holds ``columns`` (float64, one length); its
    uid and the seconds the Zarr writes took."""
    t0 = time.time()
    n = len(next(iter(columns.values())))
    bundle = event_model.compose_run(time=t0, metadata={"scan_id": 1, "plan_name": "count"})
    keys = {k: {"dtype": "number", "shape": [], "source": f"sim:{k}"} for k in columns}
    desc = bundle.compose_descriptor(name="primary", data_keys=keys, time=t0).descriptor_doc
    specs = field_specs(desc, Limits())
    registry = StoreRegistry(uri)
    arrays = zarr_store.ZarrEventStore(root, fsync=False, tail_rows=0)
    try:
        store = await registry(tenant)
        await store.put_documents("start", [bundle.start_doc])
        await store.put_documents("descriptor", [desc])
        write_s = 0.0
        update = None
        for a in range(0, n, _PAGE):
            b = min(n, a + _PAGE)
            seq = np.arange(a + 1, b + 1, dtype=np.int64)
            times = t0 + seq.astype(np.float64)
            page = Page(descriptor=desc["uid"], uid=seq.astype(STRING), seq_num=seq,
                        time=times, data={k: v[a:b] for k, v in columns.items()},
                        timestamps={k: times for k in columns}, filled={})
            t = time.perf_counter()
            update = await arrays.write_page(tenant, bundle.start_doc["uid"], desc, specs, page)
            write_s += time.perf_counter() - t
        assert update is not None  # one record for the whole column
        await store.update_streams([replace(update, seq_num_min=1, time_min=t0 + 1)])
        stop = bundle.compose_stop(time=t0 + n + 1)
        stop["num_events"] = {"primary": n}
        await store.put_documents("stop", [stop])
    finally:
        await registry.aclose()
    return bundle.start_doc["uid"], write_s


def _expected(det: np.ndarray, per: int) -> dict[str, np.ndarray]:
    rows = per * SUMMARY_WINDOW
    out: dict[str, list[float]] = {k: [] for k in ("count", "nan_count", "min", "max", "mean")}
    for a in range(0, len(det), rows):
        v = det[a:a + rows]
        nums = v[~np.isnan(v)]
        out["count"].append(v.size)
        out["nan_count"].append(int(v.size - nums.size))
        out["min"].append(float(nums.min()) if nums.size else math.nan)
        out["max"].append(float(nums.max()) if nums.size else math.nan)
        out["mean"].append(float(nums.mean()) if nums.size else math.nan)
    return {k: np.asarray(v) for k, v in out.items()}


def _same(name: str, ds: Any, want: dict[str, np.ndarray]) -> Check:
    problems = []
    for key in ("count", "nan_count", "min", "max"):
        if not np.array_equal(ds[key].values, want[key], equal_nan=True):
            problems.append(key)
    if not np.allclose(ds["mean"].values, want["mean"], rtol=1e-9, equal_nan=True):
        problems.append("mean")
    return Check(name, not problems, "differs: " + ", ".join(problems) if problems else
                 f"{ds.sizes['window']} points equal numpy's")


def _verify(uri: str, root: Path, n: int) -> tuple[float, float, list[str]]:
    """(verify level 4 seconds, read() seconds, problems) of an intact run of ``n``
    events and 10 fields."""
    base = _column(n)
    columns = {f"f{i}": base + i for i in range(_VERIFY_FIELDS)}
    uid, _ = anyio.run(_write, uri, root, "verify", columns)
    with bluestream.open_catalog("verify", metadata=uri, zarr_root=root) as cat:
        verify_s, problems = best_of(lambda: cat.verify(level=4, runs=[uid]), 3)
        read_s, _ = best_of(lambda: cat[uid]["primary"].read(), 3)
    return verify_s, read_s, [str(p) for p in problems]


def run(ctx: Context) -> Result:
    n = 200_000 if ctx.quick else 10_000_000
    work = ctx.scratch(NAME)
    uri, root = f"sqlite:///{work / 'meta.db'}", work / "zarr"
    det = _column(n)
    uid, write_s = anyio.run(_write, uri, root, "with", {"det": det})
    with _summaries_off():
        old_uid, old_write_s = anyio.run(_write, uri, root, "without", {"det": det})
    print(f"  wrote {n:,} events twice: {write_s:.1f} s with summaries, {old_write_s:.1f} s "
          "without (Zarr writes only, no fsync)")

    with bluestream.open_catalog("with", metadata=uri, zarr_root=root) as cat:
        stream = cat[uid]["primary"]
        read_s, ds = best_of(lambda: stream.read(["det"]), 2)
        col_ok = np.array_equal(ds["det"].values, det, equal_nan=True)
        del ds
        summary_s, summ = best_of(lambda: stream.summary("det", points=_POINTS), 5)
        all_s, every = best_of(lambda: stream.summary("det"), 3)
    desc_uid = summ.attrs["descriptors"][0]
    path = root / descriptor_path("with", uid, desc_uid) / "data" / "det"
    raw_s, _ = best_of(lambda: zarr.open_array(zarr.storage.LocalStore(path), mode="r")[:n], 3)
    with bluestream.open_catalog("without", metadata=uri, zarr_root=root) as cat:
        old = cat[old_uid]["primary"]
        fallback_s, old_summ = best_of(lambda: old.summary("det", points=_POINTS), 1)

    per = summ.attrs["windows_per_point"]
    ratio, raw_ratio = read_s / summary_s, raw_s / summary_s
    rows = [["read(['det']) through the catalog", f"{read_s:.3f}", "1"],
            ["Zarr array data/det read whole", f"{raw_s:.3f}", f"{read_s / raw_s:.1f}"],
            [f"summary(points={_POINTS})", f"{summary_s:.4f}", f"{ratio:.0f}"],
            [f"summary() (all {every.sizes['window']:,} windows)", f"{all_s:.4f}",
             f"{read_s / all_s:.0f}"],
            ["summary() of storage without summaries", f"{fallback_s:.3f}",
             f"{read_s / fallback_s:.1f}"]]
    print_table(["what", "seconds", "read / this"], rows)
    print(f"  summary(points={_POINTS}) is {ratio:.0f}x faster than read(), {raw_ratio:.0f}x "
          "faster than reading the bare array")
    chart = ctx.out / f"{NAME}.png"
    bar_chart(chart, f"{n:,}-event float column: seconds (lower is better)",
              [r[0] for r in rows], [float(r[1]) for r in rows], "seconds")
    verify_n = 10_000 if ctx.quick else 100_000
    verify_s, read_run_s, problems = _verify(uri, root, verify_n)
    print_table(["run of 10 fields", "seconds"],
                [[f"verify(level=4), {verify_n:,} events", f"{verify_s:.3f}"],
                 [f"read() of the stream, {verify_n:,} events", f"{read_run_s:.3f}"]])
    want = _expected(det, per)
    checks = [equal("read() returns the column", col_ok, True),
              equal("verify level 4 finds no problem in an intact run", problems, []),
              _same(f"summary(points={_POINTS}) equals numpy", summ, want),
              _same("summary() of every window equals numpy", every, _expected(det, 1)),
              _same("summary() without stored summaries equals numpy", old_summ, want)]
    return Result(
        NAME,
        params={"events": n, "points": _POINTS, "window": SUMMARY_WINDOW, "page": _PAGE,
                "metadata": "sqlite", "dtype": "float64"},
        results={"read_s": read_s, "raw_array_read_s": raw_s, "summary_s": summary_s,
                 "summary_all_windows_s": all_s, "summary_without_stored_s": fallback_s,
                 "ratio_read_to_summary": ratio, "ratio_raw_read_to_summary": raw_ratio,
                 "windows": int(every.sizes["window"]), "windows_per_point": per,
                 "write_with_summaries_s": write_s, "write_without_summaries_s": old_write_s,
                 "write_overhead": write_s / old_write_s - 1.0,
                 "verify": {"events": verify_n, "fields": _VERIFY_FIELDS,
                            "level4_s": verify_s, "read_s": read_run_s,
                            "ratio_to_read": verify_s / read_run_s}},
        targets=[SUMMARY_VS_READ.target(f"summary(points={_POINTS}) vs read(): {n:,} events",
                                        ratio),
                 VERIFY_SECONDS.target(f"verify level 4: {verify_n:,} events x "
                                       f"{_VERIFY_FIELDS} fields", verify_s)],
        charts=[chart.name], checks=checks,
        notes=["read() reads the column with its seq_num, time and uid columns (what a "
               "user would otherwise do); the bare array read is the lower bound of any "
               "reader of the column",
               "write times: ZarrEventStore.write_page only (no Kafka, no decoding, no "
               "fsync); 'without' is the same writer with the summary arrays switched off",
               "verify: cat.verify(level=4) of one run (every chunk of its 25 arrays read "
               "and decoded, the stop's num_events, sample rows read back); read: "
               "run['primary'].read() of the same run, best of 3",
               "quick mode writes 200,000 and 10,000 events: its verdicts mean nothing"],
    )
