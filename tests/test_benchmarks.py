"""The benchmarks still work end to end (``python -m benchmarks --quick``), and their own
correctness checks are made, pass, and fail the run when they do not.

Behaviour only: every scenario runs against the real services and writes its JSON (with
the expected keys, positive rates and its checks) and its chart. Timing thresholds belong
to the benchmarks' own report, never to a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("scalar_ingest", "image_ingest", "latency", "read", "scaling", "short_runs",
             "object_store", "tiled_read", "profile", "lifecycle")


def _get(data: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        data = data[part]
    return data


_VARIANTS = ("events", "pages")
_BACKENDS = ("sqlite", "mongo")  # scalar ingest and (quick mode too) latency

#: Per scenario: where (inside ``results``) a rate or size that must be > 0 is.
POSITIVE: dict[str, list[tuple[str, ...]]] = {
    "scalar_ingest": [(v, *what) for v in _VARIANTS for what in (
        ("raw", "events_per_s"), ("raw_confluent", "events_per_s"), ("limit", "events_per_s"),
        *(("bluestream", b, key) for b in _BACKENDS
          for key in ("events_per_s", "ratio_to_limit", "ratio_to_incumbent_ceiling")),
        *(("bluestream", b, "rss_mb", "peak") for b in _BACKENDS),
        ("incumbent", "events_per_s"), ("incumbent", "client_side_ceiling_events_per_s"))],
    "image_ingest": [("bluestream", "mb_per_s"), ("plain_zarr", "mb_per_s"), ("ratio",),
                     ("raw_consume", "mb_per_s"), ("raw_consume_confluent", "mb_per_s"),
                     ("limit", "mb_per_s"), ("bound", "mb_per_s"), ("ratio_to_bound",),
                     ("raw_disk_write", "mb_per_s"), ("raw_disk_write", "seconds"),
                     ("ratio_to_disk_write",), ("rss_mb", "peak")],
    "latency": [(b, key) for b in _BACKENDS for key in ("p50_s", "p99_s", "events")]
    + [(b, "rss_mb", "peak") for b in _BACKENDS],
    "read": [("scalar", "bluestream", "events_per_s"), ("scalar", "incumbent", "events_per_s"),
             ("scalar", "bluestream", "seconds"),
             ("image", "bluestream", "frames_per_s"), ("image", "incumbent", "frames_per_s")],
    "scaling": [("1_daemons", "events_per_s"), ("2_daemons", "events_per_s"), ("speedup",)],
    "short_runs": [("ingest", e, key) for e in ("1", "10", "100") for key in (
        "ingest_sqlite_runs_per_s", "ingest_mongo_runs_per_s", "daemon_sqlite_runs_per_s",
        "daemon_mongo_runs_per_s", "incumbent_runs_per_s")]
    + [("footprint", e, key) for e in ("1", "10", "100", "2000")
       for key in ("files_per_run", "kb_per_run")]
    + [("catalog", n, key) for n in ("200", "1000") for key in (
        "len", "newest", "scan_id", "partial_uid", "first_10_of_time_range")],
    "object_store": [("images", "bluestream_mb_per_s"), ("images", "plain_zarr_mb_per_s"),
                     ("images", "ratio"), ("scalar", "s3_events_per_s"),
                     ("scalar", "local_events_per_s"), ("scalar", "ratio")],
    "tiled_read": [("scalar", "local_s"), ("scalar", "remote_s"), ("scalar", "time_factor"),
                   ("image", "local_s"), ("image", "remote_s"), ("image", "ratio")],
    "profile": [("in_process", "events/sqlite", "events_per_s"),
                ("in_process", "pages/sqlite", "events_per_s"),
                ("daemon", "default", "events_per_s"), ("daemon", "gc_tuned", "events_per_s")],
    "lifecycle": [("read_s",), ("raw_array_read_s",), ("summary_s",),
                  ("summary_without_stored_s",), ("ratio_read_to_summary",),
                  ("write_with_summaries_s",), ("write_without_summaries_s",),
                  ("verify", "level4_s"), ("verify", "read_s")],
}

#: Per scenario: the targets it reports (names; numbers, not verdicts, are tested). Every
#: daemon scenario reports its peak RSS, per variant and metadata store.
TARGETS: dict[str, set[str]] = {
    "scalar_ingest": {
        *(f"scalar {v} {b}: bluestream / limit" for v in _VARIANTS for b in _BACKENDS),
        *(f"scalar events {b}: bluestream / incumbent ceiling" for b in _BACKENDS),
        *(f"daemon peak RSS: scalar {v} {b}" for v in _VARIANTS for b in _BACKENDS)},
    "image_ingest": {"images: bluestream / min(plain zarr, limit)", "daemon peak RSS: images"},
    "latency": {f"{what} ({b})" for b in _BACKENDS
                for what in ("latency p50", "latency p99", "daemon peak RSS: latency")},
    "read": {"read scalar (2,000 events): seconds", "read scalar: bluestream / incumbent",
             "read images: bluestream / incumbent"},
    "scaling": set(),
    "short_runs": {*(f"one-event runs/s: {p}" for p in (
        "ingest/sqlite", "ingest/mongo", "daemon/sqlite", "daemon/mongo")),
        "one-event runs: ingest/mongo / incumbent", "one-event runs: daemon/mongo / incumbent",
        "files per one-event run", "KB per one-event run"},
    "object_store": {"images on S3: bluestream / plain zarr on S3"},
    "tiled_read": {"images over HTTP / local read()", "scalars over HTTP: time / local time"},
    "profile": set(),
    "lifecycle": {"summary(points=1000) vs read(): 200,000 events",
                  "verify level 4: 10,000 events x 10 fields"},
}


#: Per scenario: the correctness checks (``benchmarks.checks``) its run must report, each
#: passed. A daemon that needed a repeated ingest (``data_loss_retries``), a wrong stored
#: count on either side, or values read back that differ from the documents fail these.
CHECKS: dict[str, set[str]] = {
    "scalar_ingest": {
        *(f"raw consume saw every message: {v}" for v in _VARIANTS),
        *(f"raw consume saw every message: {v} (confluent-kafka)" for v in _VARIANTS),
        *(f"no data loss: {v}/{b}" for v in _VARIANTS for b in _BACKENDS),
        *(f"incumbent consumed every event: {v}" for v in _VARIANTS),
        *(f"incumbent stored count: {v}" for v in _VARIANTS)},
    "image_ingest": {"raw consume saw every message",
                     "raw consume saw every message (confluent-kafka)",
                     "raw disk write wrote every byte", "no data loss: daemon",
                     "no data loss: daemon with write_empty_chunks",
                     "daemon stored frames bit-exact"},
    "latency": {f"stored (runs, events, stops): {b}" for b in _BACKENDS},
    "read": {"incumbent stored count", "read scalar values: bluestream",
             "read scalar values: incumbent", "read image values: bluestream",
             "read image seq_num: bluestream", "read image values: incumbent"},
    "scaling": {f"stored (runs, events, stops): {n} daemon(s)" for n in (1, 2)},
    "short_runs": {*(f"ingest stored every run: {e}-event runs, {b}" for e in (1, 10, 100)
                     for b in _BACKENDS),
                   *(f"incumbent stored every run: {e}-event runs" for e in (1, 10, 100)),
                   *(f"no data loss: daemon/{b}, {e}-event runs" for e in (1, 10, 100)
                     for b in _BACKENDS),
                   *(f"catalog of {n} runs: len, newest scan_id" for n in (200, 1000))},
    "object_store": {"no data loss: daemon, Zarr root on S3", "frames on S3 bit-exact",
                     *(f"no data loss: daemon, scalar events, Zarr root {w}"
                       for w in ("s3", "local")), "scalar runs stored on both roots"},
    "tiled_read": {"remote read scalar values", "remote read image values",
                   "floor read values"},
    "profile": {f"no data loss: daemon {label}"
                for label in ("default", "gc_tuned", "batch_20000", "gc_tuned+batch_20000")},
    "lifecycle": {"read() returns the column", "summary(points=1000) equals numpy",
                  "verify level 4 finds no problem in an intact run",
                  "summary() of every window equals numpy",
                  "summary() without stored summaries equals numpy"},
}


def _check_limits(name: str, results: dict[str, Any]) -> None:
    """The raw consume limit is the faster of the two raw consumers, and the ratios the
    targets use are taken against it."""
    if name == "scalar_ingest":
        for v in _VARIANTS:
            r = results[v]
            rates = {"aiokafka": r["raw"]["events_per_s"],
                     "confluent-kafka": r["raw_confluent"]["events_per_s"]}
            assert r["limit"]["events_per_s"] == max(rates.values()), (v, r["limit"], rates)
            assert rates[r["limit"]["client"]] == r["limit"]["events_per_s"], v
            assert r["raw_confluent"]["client"].startswith("confluent-kafka"), v
            for b in _BACKENDS:
                bs = r["bluestream"][b]
                assert bs["ratio_to_limit"] == pytest.approx(
                    bs["events_per_s"] / r["limit"]["events_per_s"]), (v, b)
                assert bs["rss_mb"]["peak"] == max(bs["peak_rss_mb"]), (v, b)
                assert bs["rss_mb"]["samples"], (v, b)
    elif name == "image_ingest":
        rates = {"aiokafka": results["raw_consume"]["mb_per_s"],
                 "confluent-kafka": results["raw_consume_confluent"]["mb_per_s"]}
        assert results["limit"]["mb_per_s"] == max(rates.values()), (results["limit"], rates)
        assert rates[results["limit"]["client"]] == results["limit"]["mb_per_s"]
        bound = min(results["plain_zarr"]["mb_per_s"], results["limit"]["mb_per_s"])
        assert results["bound"]["mb_per_s"] == bound
        assert results["ratio_to_bound"] == pytest.approx(
            results["bluestream"]["mb_per_s"] / bound)
        assert results["ratio_to_disk_write"] == pytest.approx(
            results["bluestream"]["mb_per_s"] / results["raw_disk_write"]["mb_per_s"])
        assert results["rss_mb"]["samples"]
    elif name == "latency":
        for b in _BACKENDS:
            assert results[b]["rss_mb"]["samples"], b


@pytest.mark.kafka
@pytest.mark.mongo
@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.timeout(900)
def test_quick_benchmarks_produce_results(kafka_bootstrap: str, mongo_uri: str,
                                          s3_endpoint: str, tmp_path: Path) -> None:
    out = tmp_path / "results"
    env = {**os.environ, "BLUESTREAM_KAFKA_BOOTSTRAP": kafka_bootstrap,
           "BLUESTREAM_MONGO_URI": mongo_uri, "BLUESTREAM_S3_ENDPOINT": s3_endpoint,
           "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out),
         "--work", str(tmp_path / "work")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=880)
    summary_at = proc.stdout.rfind("== summary")  # failed checks are listed there
    report = proc.stdout[summary_at:] if summary_at >= 0 else proc.stdout[-4000:]
    assert proc.returncode == 0, report + proc.stderr[-4000:]
    assert summary_at >= 0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == []
    assert sorted(summary["scenarios"]) == sorted(SCENARIOS)
    assert (out / "summary.png").stat().st_size > 0
    for name in SCENARIOS:
        data = json.loads((out / f"{name}.json").read_text())
        assert data["scenario"] == name and data["mode"] == "quick"
        assert {"params", "results", "targets", "machine", "charts"} <= data.keys()
        for path in POSITIVE[name]:
            value = _get(data["results"], path)
            assert isinstance(value, int | float) and value > 0, (name, path, value)
        for target in data["targets"]:
            assert {"name", "measured", "target", "unit", "met"} <= target.keys()
            assert target["measured"] == target["measured"]  # not NaN
        for chart in data["charts"]:
            assert (out / chart).stat().st_size > 0, chart
        _check_limits(name, data["results"])
        reported = {t["name"] for t in data["targets"]}
        assert TARGETS[name] <= reported, (name, sorted(TARGETS[name] - reported))
        checks = {c["name"]: c for c in data["checks"]}
        assert CHECKS[name] <= checks.keys(), (name, sorted(CHECKS[name] - checks.keys()))
        failed = [c for c in checks.values() if not c["ok"]]
        assert not failed, (name, failed)
    assert all(c["ok"] for c in summary["checks"])
    assert len(summary["checks"]) >= sum(len(c) for c in CHECKS.values())
    # Scenarios that have targets report them (numbers, not verdicts, are tested).
    names = {t["name"] for t in summary["targets"]}
    assert set().union(*TARGETS.values()) <= names
    assert all({"op", "met", "measured", "target"} <= t.keys() for t in summary["targets"])
    assert {g["key"] for g in summary["goals"]} >= {
        "scalar_events_vs_limit", "scalar_events_vs_incumbent_ceiling",
        "scalar_pages_vs_limit", "images_vs_bound", "latency_p50_ms", "latency_p99_ms",
        "peak_rss_mb", "read_scalar_s"}
    assert "targets:" in report and "verdict" in report  # the printed targets table


def test_a_failed_check_fails_the_run(tmp_path: Path) -> None:
    """The runner itself: a scenario that returns figures but a failed check is marked
    failed (in the output, ``summary.json``) and ``python -m benchmarks`` exits 1, while
    its JSON (figures and the failed check's detail) is still written."""
    out = tmp_path / "results"
    script = textwrap.dedent(f"""
        import sys
        from benchmarks import __main__ as runner
        from benchmarks.checks import Check
        from benchmarks.common import Result

        class Fake:
            NAME = "fake"

            @staticmethod
            def run(ctx):
                return Result("fake", {{}}, {{"rate": 1.0}}, checks=[
                    Check("fine", True), Check("stored count", False, "got 9, expected 10")])

        runner.SCENARIOS = {{"fake": Fake}}
        sys.exit(runner.main(["--only", "fake", "--out", {str(out)!r},
                              "--work", {str(tmp_path / "work")!r}]))
    """)
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "CHECK FAILED: stored count (got 9, expected 10)" in proc.stdout
    assert "FAILED scenarios: fake" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == ["fake"]
    assert [(c["name"], c["ok"]) for c in summary["checks"]] == [("fine", True),
                                                                 ("stored count", False)]
    data = json.loads((out / "fake.json").read_text())
    assert data["results"] == {"rate": 1.0}
    assert data["checks"][1] == {"name": "stored count", "ok": False,
                                 "detail": "got 9, expected 10"}


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(ROOT))
    import benchmarks.checks

    return benchmarks.checks


def test_checks_compare_values_not_only_sizes(checks: Any) -> None:
    """What the read scenario relies on: same shapes, one value different -> failed,
    and the detail names the column and row."""
    expected = {"seq_num": np.arange(1, 6), "uid": np.array(list("abcde")),
                "data/x": np.linspace(0, 1, 5)}
    assert checks.same_columns("read", dict(expected), expected).ok
    for key, broken in [("data/x", np.array([0, 0.25, 0.5, 0.7, 1.0])),
                        ("uid", np.array(list("abced"))),
                        ("seq_num", np.array([1, 2, 3, 5, 4]))]:
        got = {**expected, key: broken}
        check = checks.same_columns("read", got, expected)
        assert not check.ok and check.detail.startswith(f"{key}[3]"), check
    assert not checks.same_columns("read", {**expected, "data/x": np.zeros(4)}, expected).ok
    assert not checks.same_columns("read", {"seq_num": expected["seq_num"]}, expected).ok
    frames = [np.full((2, 2), i, dtype=np.uint16) for i in range(3)]
    stack = np.stack([frames[i % 3] for i in range(7)])
    assert checks.frames_match("img", stack, frames, 7).ok
    stack[5, 1, 1] += 1
    assert "frame 5" in checks.frames_match("img", stack, frames, 7).detail


def test_data_loss_retries_and_counts_fail_checks(checks: Any) -> None:
    assert checks.no_data_loss("events/sqlite", []).ok
    lost = checks.no_data_loss("events/sqlite", ["attempt 1: stored (1, 4999, 1)"])
    assert not lost.ok and "attempt 1" in lost.detail
    assert checks.equal("incumbent stored count", {"event": 400}, {"event": 400}).ok
    assert not checks.equal("incumbent stored count", {"event": 399}, {"event": 400}).ok


@pytest.fixture
def common(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(ROOT))
    import benchmarks.common

    return benchmarks.common


def test_targets_compare_in_their_direction(common: Any) -> None:
    """A target is met at its bar when it says ">=" or "<=", not when it says "<"; the
    JSON carries the operator the table prints."""
    assert common.SCALAR_EVENTS_VS_LIMIT.target("b/limit", 0.5).met
    assert not common.SCALAR_EVENTS_VS_LIMIT.target("b/limit", 0.49).met
    assert common.READ_SCALAR_SECONDS.target("read", 0.3).met
    assert not common.READ_SCALAR_SECONDS.target("read", 0.31).met
    assert not common.LATENCY_P99.target("p99", common.LATENCY_P99.value).met
    assert common.PEAK_RSS.target("rss", common.PEAK_RSS.value - 1).met
    target = common.READ_SCALAR_SECONDS.target("read", 0.2)
    assert (target.op, target.line()) == ("<=", "read: 0.2 s (target <= 0.3 s) met")
    assert len({g.key for g in common.GOALS}) == len(common.GOALS)
