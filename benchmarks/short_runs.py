"""Scenario 6 - short runs (issue 17): per-run cost, footprint, and a catalog of many runs.

1. Runs of 1, 10 and 100 events (start, descriptor, events, stop; 5 float fields, made
   with event-model), stored through ``bluestream ingest``'s code (``ingest_files``, in
   process: the command minus interpreter start-up) into SQLite and into MongoDB, and by
   the daemon from Kafka (timed from partition assignment to the last commit); beside
   them the incumbent, suitcase-mongo's ``Serializer``, writing the same runs to the
   same Mongo-wire server. Runs per second.
2. Footprint: files and bytes on disk per run (Zarr tree plus the SQLite file and its
   log) for runs of 1, 10, 100 and 10,000 events.
3. A catalog of many runs (1,000 / 10,000 / 100,000; metadata only, starts and stops
   written through the metadata store's bulk API - what is measured is reading):
   ``len(cat)``, ``cat[-1]``, ``cat[scan_id]``, a partial uid, the first 10 results of a
   ``TimeRange`` search, listing 10,000 uids. Milliseconds each, best of 3; and each
   one's cost per run it touches at the largest catalog against the smallest (flat?).
4. ``bluestream ingest-mongo`` of a suitcase-mongo database of 2,000 and of 10,000
   one-event runs (laid out as its Serializer writes, with its indexes, written in bulk)
   into SQLite: runs/s against ``ingest``'s of part 1, then the same import again (every
   run found complete and skipped: the resume path). Not 100,000: see ``run()``.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import anyio

import bluestream
from benchmarks.checks import Check, equal, no_data_loss
from benchmarks.common import (
    SHORT_RUNS_CATALOG_GROWTH,
    SHORT_RUNS_CATALOG_MS,
    SHORT_RUNS_FILES,
    SHORT_RUNS_IMPORT_VS_INGEST,
    SHORT_RUNS_KB,
    SHORT_RUNS_PER_S,
    SHORT_RUNS_VS_INCUMBENT,
    Context,
    Result,
    bar_chart,
    print_table,
    rate,
)
from benchmarks.docs import Run, scalar_run
from benchmarks.incumbent import (
    bulk_suitcase_database,
    count_documents,
    create_suitcase_indexes,
    write_with_suitcase,
)
from benchmarks.infra import checked_ingest, create_topic, publish
from bluestream.queries import TimeRange
from bluestream.settings import load_settings
from bluestream.storage.backends import open_metadata_store
from bluestream.tools.ingest import ingest_files
from bluestream.tools.ingest_mongo import ingest_mongo

NAME = "short_runs"
__all__ = ["NAME", "run"]

Doc = dict[str, Any]
FIELDS = 5


def _runs(n_runs: int, events: int, t0: float) -> list[Run]:
    return [scalar_run(events, fields=FIELDS, scan_id=i + 1, t0=t0 + i)
            for i in range(n_runs)]


def _write_jsonl(path: Path, runs: list[Run]) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for r in runs:
            for name, doc in r.docs:
                f.write(json.dumps([name, doc]) + "\n")
    return path


def _settings(metadata: str, zarr_root: Path) -> Any:
    return load_settings(environ={"BLUESTREAM_METADATA": metadata,
                                  "BLUESTREAM_ZARR_ROOT": str(zarr_root)})


def _ingest(path: Path, tenant: str, metadata: str, zarr_root: Path) -> tuple[float, Any]:
    settings = _settings(metadata, zarr_root)
    t = time.perf_counter()
    report = anyio.run(lambda: ingest_files([path], tenant=tenant, settings=settings))
    return time.perf_counter() - t, report


def _footprint(root: Path) -> tuple[int, int]:
    files = nbytes = 0
    for dirpath, _, names in os.walk(root):
        if ".bluestream-locks" in dirpath:
            continue  # a fixed set of lock files per Zarr root, not per run
        for n in names:
            files += 1
            nbytes += os.path.getsize(os.path.join(dirpath, n))
    return files, nbytes


class _ServerTime:
    """Time the Mongo-wire server spends on the commands of clients created while this
    is registered (pymongo command monitoring: each command's round trip as the driver
    saw it), per command and collection: what bounds the Mongo paths."""

    _listener: Any = None

    def __init__(self) -> None:
        from pymongo import monitoring

        if _ServerTime._listener is None:
            class Listener(monitoring.CommandListener):
                active: _ServerTime | None = None
                started_keys: dict[int, str] = {}

                def started(self, event: Any) -> None:
                    if self.active is not None:
                        coll = event.command.get(event.command_name)
                        self.started_keys[event.request_id] = (
                            f"{event.command_name} {coll if isinstance(coll, str) else ''}")

                def succeeded(self, event: Any) -> None:
                    key = self.started_keys.pop(event.request_id, None)
                    if self.active is not None and key is not None:
                        self.active.micros[key] = (self.active.micros.get(key, 0)
                                                   + event.duration_micros)

                def failed(self, event: Any) -> None:
                    self.started_keys.pop(event.request_id, None)

            _ServerTime._listener = Listener()
            monitoring.register(_ServerTime._listener)
        self.micros: dict[str, int] = {}

    def __enter__(self) -> _ServerTime:
        _ServerTime._listener.active = self
        return self

    def __exit__(self, *exc: object) -> None:
        _ServerTime._listener.active = None

    def per_run_ms(self, runs: int) -> dict[str, float]:
        top = sorted(self.micros.items(), key=lambda kv: -kv[1])
        return {"total": sum(self.micros.values()) / 1e3 / runs,
                **{k: v / 1e3 / runs for k, v in top[:8]}}


def _ingest_rates(ctx: Context, sizes: dict[int, int], checks: list[Check]
                  ) -> dict[str, Any]:
    out: dict[str, Any] = {}
    t0 = time.time() - 10 * 86400
    for events, n_runs in sizes.items():
        runs = _runs(n_runs, events, t0)
        work = ctx.scratch(f"{NAME}-ingest-{events}")
        path = _write_jsonl(work / "runs.jsonl", runs)
        row: dict[str, Any] = {"runs": n_runs, "events_per_run": events}
        for backend in ("sqlite", "mongo"):
            tenant = ctx.tenant(f"si{events}{backend[0]}")
            metadata = f"sqlite:///{work / 'meta.db'}" if backend == "sqlite" else ctx.mongo
            with _ServerTime() as server:
                seconds, report = _ingest(path, tenant, metadata, work / f"zarr-{backend}")
            if backend == "mongo":
                row["ingest_mongo_server_ms_per_run"] = server.per_run_ms(n_runs)
            checks.append(equal(f"ingest stored every run: {events}-event runs, {backend}",
                                (report.runs, report.ok), (n_runs, True)))
            row[f"ingest_{backend}_runs_per_s"] = rate(n_runs, seconds)
            print(f"  [{events:>3}-event runs] bluestream ingest/{backend}: "
                  f"{rate(n_runs, seconds):,.0f} runs/s ({n_runs} runs, {seconds:.2f} s)")
        db = ctx.tenant(f"si{events}inc")
        with _ServerTime() as server:
            seconds = write_with_suitcase(ctx.mongo, db, (d for r in runs for d in r.docs))
        row["incumbent_server_ms_per_run"] = server.per_run_ms(n_runs)
        stored = count_documents(ctx.mongo, db)
        checks.append(equal(f"incumbent stored every run: {events}-event runs",
                            stored.get("run_stop"), n_runs))
        row["incumbent_runs_per_s"] = rate(n_runs, seconds)
        print(f"  [{events:>3}-event runs] incumbent suitcase-mongo Serializer: "
              f"{rate(n_runs, seconds):,.0f} runs/s ({seconds:.2f} s)")
        # the same into a database with suitcase-mongo's indexes (bluestream creates them
        # for its own database; bluesky-kafka's consumer creates none)
        db = ctx.tenant(f"si{events}inx")
        create_suitcase_indexes(ctx.mongo, db)
        with _ServerTime() as server:
            seconds = write_with_suitcase(ctx.mongo, db, (d for r in runs for d in r.docs))
        checks.append(equal(f"incumbent (indexed) stored every run: {events}-event runs",
                            count_documents(ctx.mongo, db).get("run_stop"), n_runs))
        row["incumbent_indexed_runs_per_s"] = rate(n_runs, seconds)
        row["incumbent_indexed_server_ms_per_run"] = server.per_run_ms(n_runs)
        print(f"  [{events:>3}-event runs] incumbent into suitcase's indexes: "
              f"{rate(n_runs, seconds):,.0f} runs/s ({seconds:.2f} s)")
        print(f"  [{events:>3}-event runs] Mongo-wire server time per run: bluestream "
              f"ingest {row['ingest_mongo_server_ms_per_run']['total']:.2f} ms, incumbent "
              f"{row['incumbent_server_ms_per_run']['total']:.2f} ms (indexed "
              f"{row['incumbent_indexed_server_ms_per_run']['total']:.2f} ms)")
        for backend in ("sqlite", "mongo"):
            tenant = ctx.tenant(f"sd{events}{backend[0]}")
            topic = ctx.topic(tenant)
            create_topic(ctx.kafka, topic, 1)
            publish(ctx.kafka, topic, ((r.uid.encode(), v, -1) for r in runs
                                       for v in r.encoded()))
            timing, _, failures = checked_ingest(
                kafka=ctx.kafka, topic=topic, group=f"g-{topic}", backend=backend,
                mongo=ctx.mongo, tenant=tenant, work=ctx.scratch(f"{NAME}-d{events}{backend}"),
                expected=(n_runs, n_runs * events, n_runs))
            checks.append(no_data_loss(f"daemon/{backend}, {events}-event runs", failures))
            row[f"daemon_{backend}_runs_per_s"] = rate(n_runs, timing.seconds)
            row[f"daemon_{backend}_peak_rss_mb"] = timing.peak_rss
            print(f"  [{events:>3}-event runs] daemon/{backend}: "
                  f"{rate(n_runs, timing.seconds):,.0f} runs/s ({timing.seconds:.2f} s)")
        out[str(events)] = row
        ctx.drop_scratch(work)
    return out


def _footprints(ctx: Context, sizes: dict[int, int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    t0 = time.time() - 20 * 86400
    for events, n_runs in sizes.items():
        work = ctx.scratch(f"{NAME}-fp-{events}")
        path = _write_jsonl(work / "runs.jsonl", _runs(n_runs, events, t0))
        store = work / "store"
        store.mkdir()
        _, report = _ingest(path, "fp", f"sqlite:///{store / 'meta.db'}", store / "zarr")
        assert report.ok, report.rejections
        files, nbytes = _footprint(store)
        zfiles, zbytes = _footprint(store / "zarr")
        out[str(events)] = {"runs": n_runs, "files_per_run": files / n_runs,
                            "kb_per_run": nbytes / n_runs / 1024,
                            "zarr_files_per_run": zfiles / n_runs,
                            "zarr_kb_per_run": zbytes / n_runs / 1024}
        ctx.drop_scratch(work)
    return out


async def _build_catalog(metadata: str, tenant: str, n_runs: int, t0: float) -> None:
    """Starts and stops of ``n_runs`` runs, written through the store's bulk API."""
    import event_model

    store = open_metadata_store(metadata, tenant)
    await store.open()
    try:
        for first in range(0, n_runs, 5_000):
            starts, stops = [], []
            for i in range(first, min(first + 5_000, n_runs)):
                bundle = event_model.compose_run(time=t0 + i, metadata={
                    "scan_id": i + 1, "plan_name": "count"})
                starts.append(bundle.start_doc)
                stops.append(bundle.compose_stop(time=t0 + i + 0.5))
            await store.put_documents("start", starts)
            await store.put_documents("stop", stops)
    finally:
        await store.close()


def _best_ms(fn: Any, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def _time_ops(cat: Any, n: int, half: TimeRange, listing: int) -> dict[str, float]:
    middle = cat[n // 2 + 1].metadata["start"]  # scan_id n//2 + 1
    partial = str(middle["uid"])[:8]
    ops = {
        "len": lambda: len(cat),
        "newest": lambda: cat[-1],
        "scan_id": lambda: cat[n // 2 + 1],
        "partial_uid": lambda: cat[partial],
        "first_10_of_time_range": lambda: list(itertools.islice(cat.search(half), 10)),
        "list_uids": lambda: list(itertools.islice(cat, listing)),
    }
    return {name: _best_ms(fn) for name, fn in ops.items()}


def _catalog_ops(ctx: Context, counts: list[int], checks: list[Check]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    t0 = time.time() - 400 * 86400
    for n in counts:
        work = ctx.scratch(f"{NAME}-cat-{n}")
        metadata = f"sqlite:///{work / 'meta.db'}"
        started = time.perf_counter()
        anyio.run(_build_catalog, metadata, "many", n, t0)
        built = time.perf_counter() - started
        listing = min(n, 10_000)
        with bluestream.open_catalog("many", metadata=metadata, zarr_root=work / "zarr") as cat:
            row = _time_ops(cat, n, TimeRange(since=t0, until=t0 + n / 2), listing)
            checks.append(equal(f"catalog of {n} runs: len, newest scan_id", (
                len(cat), cat[-1].metadata["start"]["scan_id"]), (n, n)))
        row["build_s"] = built
        row["listed"] = listing
        out[str(n)] = row
        print(f"  catalog of {n:,} runs (built in {built:.1f} s): " + ", ".join(
            f"{k} {v:.1f} ms" for k, v in row.items() if k in _CATALOG_OPS))
        ctx.drop_scratch(work)
    return out


#: The catalog operations timed (milliseconds in each catalog row).
_CATALOG_OPS = ("len", "newest", "scan_id", "partial_uid", "first_10_of_time_range",
                "list_uids")


def _catalog_growth(catalog: dict[str, Any]) -> dict[str, float]:
    """Per operation: its cost per run touched (counted, found or listed) in the largest
    catalog / in the smallest, each time taken as at least 1 ms (below that the clock
    and the machine's noise decide)."""
    def per_run(size: str, op: str) -> float:
        row = catalog[size]
        touched = {"len": int(size), "first_10_of_time_range": 10,
                   "list_uids": int(row["listed"])}.get(op, 1)
        return float(max(row[op], 1.0) / touched)

    small, large = min(catalog, key=int), max(catalog, key=int)
    return {op: per_run(large, op) / per_run(small, op) for op in _CATALOG_OPS}


def _import_rate(ctx: Context, n_runs: int, checks: list[Check]) -> dict[str, Any]:
    """ingest-mongo of a suitcase-mongo database of ``n_runs`` one-event runs, into
    SQLite; then again (everything already complete)."""
    work = ctx.scratch(f"{NAME}-import")
    source = ctx.tenant("simsrc")
    t0 = time.time() - 30 * 86400
    built = bulk_suitcase_database(ctx.mongo, source, (
        doc for i in range(n_runs)
        for doc in scalar_run(1, fields=FIELDS, scan_id=i + 1, t0=t0 + i).docs))
    settings = _settings(f"sqlite:///{work / 'meta.db'}", work / "zarr")
    uri = f"{ctx.mongo.split('?', 1)[0].rstrip('/')}/{source}"
    row: dict[str, Any] = {"runs": n_runs, "build_s": built}
    for label in ("import", "resume"):
        started = time.perf_counter()
        report = anyio.run(lambda: ingest_mongo(uri, tenant="imported", settings=settings))
        seconds = time.perf_counter() - started
        done = (report.imported, report.skipped) if label == "import" else \
            (report.skipped, report.imported)
        checks.append(equal(f"ingest-mongo {label}: {n_runs} runs, none rejected",
                            (report.runs, *done, report.ok), (n_runs, n_runs, 0, True)))
        checks.append(equal(f"ingest-mongo {label}: no warning", report.warnings, []))
        row[f"{label}_runs_per_s"] = rate(n_runs, seconds)
        row[f"{label}_s"] = seconds
        print(f"  ingest-mongo ({label}) of {n_runs:,} one-event runs (source built in "
              f"{built:.0f} s): {rate(n_runs, seconds):,.0f} runs/s ({seconds:.1f} s)")
    from pymongo import MongoClient
    client: MongoClient[Any] = MongoClient(ctx.mongo)
    try:
        client.drop_database(source)
    finally:
        client.close()
    ctx.drop_scratch(work)
    return row


def run(ctx: Context) -> Result:
    quick = ctx.quick
    rates_sizes = {1: 60, 10: 20, 100: 4} if quick else {1: 2_000, 10: 500, 100: 100}
    fp_sizes = {1: 50, 10: 20, 100: 5, 2_000: 1} if quick else \
        {1: 1_000, 10: 200, 100: 50, 10_000: 2}
    counts = [200, 1_000] if quick else [1_000, 10_000, 100_000]
    # The Mongo-wire test server serves lookups by unique indexes only (suitcase-mongo's
    # event_descriptor.run_start and event.descriptor are not): the import's lookups scan
    # those collections, so its per-run cost grows with the source here; 100,000 runs
    # would take hours on it (measured: a $in of 2,000 run uids on 100,000 descriptors
    # 24 s). Two sizes show the growth.
    import_sizes = [300] if quick else [2_000, 10_000]
    checks: list[Check] = []
    results: dict[str, Any] = {
        "ingest": _ingest_rates(ctx, rates_sizes, checks),
        "footprint": _footprints(ctx, fp_sizes),
        "catalog": _catalog_ops(ctx, counts, checks),
        "import": {str(n): _import_rate(ctx, n, checks) for n in import_sizes},
    }
    results["catalog_growth"] = _catalog_growth(results["catalog"])
    rows = []
    for events, row in results["ingest"].items():
        rows.append([f"{events}-event runs", f"{row['ingest_sqlite_runs_per_s']:,.0f}",
                     f"{row['ingest_mongo_runs_per_s']:,.0f}",
                     f"{row['daemon_sqlite_runs_per_s']:,.0f}",
                     f"{row['daemon_mongo_runs_per_s']:,.0f}",
                     f"{row['incumbent_runs_per_s']:,.0f}",
                     f"{row['incumbent_indexed_runs_per_s']:,.0f}"])
    print_table(["runs/s", "ingest/sqlite", "ingest/mongo", "daemon/sqlite", "daemon/mongo",
                 "incumbent", "incumbent, indexed"], rows)
    print_table(["events per run", "files/run", "KB/run", "Zarr files/run", "Zarr KB/run"],
                [[e, f"{r['files_per_run']:.2f}", f"{r['kb_per_run']:.1f}",
                  f"{r['zarr_files_per_run']:.2f}", f"{r['zarr_kb_per_run']:.1f}"]
                 for e, r in results["footprint"].items()])
    one = results["ingest"]["1"]
    targets = []
    for path in ("ingest_sqlite", "ingest_mongo", "daemon_sqlite", "daemon_mongo"):
        targets.append(SHORT_RUNS_PER_S.target(f"one-event runs/s: {path.replace('_', '/')}",
                                               one[f"{path}_runs_per_s"]))
    for path in ("ingest_mongo", "daemon_mongo"):
        targets.append(SHORT_RUNS_VS_INCUMBENT.target(
            f"one-event runs: {path.replace('_', '/')} / incumbent",
            one[f"{path}_runs_per_s"] / one["incumbent_runs_per_s"]))
        targets.append(SHORT_RUNS_VS_INCUMBENT.target(
            f"one-event runs: {path.replace('_', '/')} / incumbent into suitcase's indexes",
            one[f"{path}_runs_per_s"] / one["incumbent_indexed_runs_per_s"]))
    fp = results["footprint"]["1"]
    targets.append(SHORT_RUNS_FILES.target("files per one-event run", fp["files_per_run"]))
    targets.append(SHORT_RUNS_KB.target("KB per one-event run", fp["kb_per_run"]))
    largest = str(max(counts))
    for op in _CATALOG_OPS:
        targets.append(SHORT_RUNS_CATALOG_MS.target(
            f"catalog of {int(largest):,} runs: {op}", results["catalog"][largest][op]))
    for op, growth in results["catalog_growth"].items():
        targets.append(SHORT_RUNS_CATALOG_GROWTH.target(
            f"catalog {min(counts):,} -> {int(largest):,} runs, cost per run: {op}", growth))
    for n in import_sizes:
        targets.append(SHORT_RUNS_IMPORT_VS_INGEST.target(
            f"ingest-mongo of {n:,} runs / ingest, SQLite",
            results["import"][str(n)]["import_runs_per_s"] / one["ingest_sqlite_runs_per_s"]))
    chart = ctx.out / f"{NAME}.png"
    bar_chart(chart, "one-event runs per second (higher is better)",
              ["ingest/sqlite", "ingest/mongo", "daemon/sqlite", "daemon/mongo", "incumbent"],
              [one["ingest_sqlite_runs_per_s"], one["ingest_mongo_runs_per_s"],
               one["daemon_sqlite_runs_per_s"], one["daemon_mongo_runs_per_s"],
               one["incumbent_runs_per_s"]], "runs/s")
    return Result(
        scenario=NAME,
        params={"fields": FIELDS, "rates_runs": rates_sizes, "footprint_runs": fp_sizes,
                "catalog_runs": counts, "import_runs": import_sizes, "cpus": os.cpu_count()},
        results=results, targets=targets, checks=checks, charts=[chart.name],
        notes=["ingest = bluestream.tools.ingest.ingest_files in process (the code of "
               "`bluestream ingest`, without interpreter start-up); daemon timed from "
               "partition assignment to the last commit; incumbent = suitcase-mongo "
               "Serializer on the same Mongo-wire server, into a fresh database as "
               "bluesky-kafka's MongoConsumer leaves it (no index but _id), and into one with "
               "suitcase-mongo's indexes (those bluestream creates for its own database)",
               "server ms per run: the round trips of every Mongo command during the pass "
               "as pymongo's command monitoring times them, per run",
               "footprint = every file under a fresh SQLite file + Zarr root (the lock "
               "files of the Zarr root excluded), divided by the runs stored",
               "catalog runs are starts and stops only, written through the metadata "
               "store's bulk put_documents; SQLite; best of 3 per operation",
               "ingest-mongo source: one-event runs laid out as suitcase-mongo's Serializer "
               "writes them, with its indexes but the text ones (which the Mongo-wire test "
               "server refuses), written with insert_many; imported into SQLite"])
