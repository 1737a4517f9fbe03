"""``python -m benchmarks [--quick] [--only a,b] [--out DIR]``: run the scenarios, print
the figures and the targets table, write ``<scenario>.json`` + ``.png`` and
``summary.json`` + ``summary.png``.

Full mode writes to ``benchmarks/results/``; quick mode (tiny sizes, seconds) to a fresh
temporary directory unless ``--out`` is given. Exit status 1 if a scenario failed: it
raised, or one of its own correctness checks failed (``benchmarks.checks``: data lost by
a daemon, stored counts, values read back). A missed target is reported, not a failure:
the benchmarks measure, tests assert.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from types import ModuleType

from benchmarks import (
    image_ingest,
    latency,
    lifecycle,
    object_store,
    profile,
    read,
    scalar_ingest,
    scaling,
    short_runs,
    tiled_read,
)
from benchmarks.common import (
    GOALS,
    Context,
    Result,
    Target,
    bar_chart,
    fmt,
    print_table,
    save_result,
)
from benchmarks.infra import delete_topics, drop_databases
from bluestream.daemon.logs import configure_logging

SCENARIOS: dict[str, ModuleType] = {
    m.NAME: m for m in (scalar_ingest, image_ingest, latency, read, scaling, short_runs,
                        object_store, tiled_read, profile, lifecycle)
}
RESULTS = Path(__file__).resolve().parent / "results"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks it all works")
    p.add_argument("--only", default="", help="comma-separated scenarios: "
                   + ", ".join(SCENARIOS))
    p.add_argument("--out", type=Path, help="where JSON and PNG results go")
    p.add_argument("--work", type=Path, help="scratch directory for stored data "
                   "(default: a temporary directory, removed afterwards)")
    p.add_argument("--keep", action="store_true", help="keep scratch data, topics, databases")
    p.add_argument("--kafka", default=os.environ.get("BLUESTREAM_KAFKA_BOOTSTRAP",
                                                     "127.0.0.1:9092"))
    p.add_argument("--mongo", default=os.environ.get("BLUESTREAM_MONGO_URI",
                                                     "mongodb://127.0.0.1:27017"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    configure_logging("console", "warning")  # the stores we open log at info level
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}", file=sys.stderr)
        return 2
    out = args.out or (Path(tempfile.mkdtemp(prefix="bluestream-bench-")) if args.quick
                       else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="bluestream-bench-work-"))
    ctx = Context(quick=args.quick, out=out, work=work, kafka=args.kafka, mongo=args.mongo,
                  keep=args.keep)
    print(f"bluestream benchmarks, {ctx.mode} mode, run {ctx.run_id}; results -> {out}")
    results: dict[str, Result] = {}
    failed: list[str] = []
    started = time.monotonic()
    try:
        for name in names:
            print(f"\n== {name}")
            t = time.monotonic()
            try:
                result = SCENARIOS[name].run(ctx)
            except Exception:
                traceback.print_exc()
                failed.append(name)
                continue
            results[name] = result
            path = save_result(ctx, result)
            for target in result.targets:
                print("  " + target.line())
            for check in result.checks:
                print("  " + check.line())
            if result.failed_checks:
                failed.append(name)
                print(f"  !! {name} FAILED: {len(result.failed_checks)} of "
                      f"{len(result.checks)} checks failed")
            print(f"  -> {path} ({time.monotonic() - t:.0f} s)")
    finally:
        if not ctx.keep:
            _cleanup(ctx)
            if args.work is None:
                shutil.rmtree(work, ignore_errors=True)
    _summary(ctx, results, failed, time.monotonic() - started)
    return 1 if failed else 0


def _cleanup(ctx: Context) -> None:
    try:
        delete_topics(ctx.kafka, ctx.topics)
    except Exception as exc:
        print(f"  (could not delete topics: {exc})")
    try:
        failed = drop_databases(ctx.mongo, sorted(set(ctx.mongo_dbs)))
        if failed:
            print(f"  (the Mongo server refused to drop {len(failed)} database(s): {failed})")
    except Exception as exc:
        print(f"  (could not drop databases: {exc})")


def _summary(ctx: Context, results: dict[str, Result], failed: list[str],
             seconds: float) -> None:
    targets: list[Target] = [t for r in results.values() for t in r.targets]
    print(f"\n== summary ({ctx.mode} mode, {seconds:.0f} s)")
    if targets:
        print_table(["scenario", "target", "measured", "goal", "verdict"], [
            [scenario, t.name, f"{fmt(t.measured)} {t.unit}", f"{t.op} {fmt(t.target)} "
             f"{t.unit}", "met" if t.met else "MISSED"]
            for scenario, r in results.items() for t in r.targets], left=2)
        print(f"  targets: {sum(t.met for t in targets)} of {len(targets)} met"
              + (" (quick mode: tiny sizes, the verdicts mean nothing)" if ctx.quick
                 else ""))
    checks = [(s, c) for s, r in results.items() for c in r.checks]
    print(f"  checks: {sum(c.ok for _, c in checks)} of {len(checks)} passed")
    for scenario, check in checks:
        if not check.ok:
            print(f"  {scenario}: {check.line()}")
    if failed:
        print(f"  FAILED scenarios: {', '.join(failed)}")
    summary = {"mode": ctx.mode, "run_id": ctx.run_id, "seconds": seconds,
               "scenarios": sorted(results), "failed": failed,
               "targets": [{"scenario": s, **asdict(t), "op": t.op, "met": t.met}
                           for s, r in results.items() for t in r.targets],
               "goals": [{**asdict(g), "op": g.op} for g in GOALS],
               "checks": [{"scenario": s, **c.__dict__} for s, c in checks]}
    (ctx.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if targets:
        # Every target as measured/target (or target/measured when lower is better):
        # >= 1 means met.
        scores = [t.measured / t.target if t.higher_is_better else t.target / t.measured
                  for t in targets]
        bar_chart(ctx.out / "summary.png", "Targets: measured relative to target "
                  "(>= 1 is met)", [t.name for t in targets], scores, "x of target",
                  colors=["#4a4" if t.met else "#c44" for t in targets],
                  hlines=[(1.0, "target")])


if __name__ == "__main__":
    sys.exit(main())
