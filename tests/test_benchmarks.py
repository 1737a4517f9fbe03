"""The benchmarks still work end to end (``python -m benchmarks --quick``).

Behaviour only: every scenario runs against the real services and writes its JSON (with
the expected keys and positive rates) and its chart. Timing thresholds belong to the
benchmarks' own report, never to a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.kafka, pytest.mark.mongo, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("scalar_ingest", "image_ingest", "latency", "read", "scaling", "profile")


def _get(data: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        data = data[part]
    return data


#: Per scenario: where (inside ``results``) a rate or size that must be > 0 is.
POSITIVE: dict[str, list[tuple[str, ...]]] = {
    "scalar_ingest": [(v, *what) for v in ("events", "pages") for what in (
        ("raw", "events_per_s"), ("bluestream", "sqlite", "events_per_s"),
        ("bluestream", "mongo", "events_per_s"), ("incumbent", "events_per_s"))],
    "image_ingest": [("bluestream", "mb_per_s"), ("plain_zarr", "mb_per_s"), ("ratio",),
                     ("rss_mb", "peak")],
    "latency": [("mongo", "p50_s"), ("mongo", "p99_s"), ("mongo", "events")],
    "read": [("scalar", "bluestream", "events_per_s"), ("scalar", "incumbent", "events_per_s"),
             ("image", "bluestream", "frames_per_s"), ("image", "incumbent", "frames_per_s")],
    "scaling": [("1_daemons", "events_per_s"), ("2_daemons", "events_per_s"), ("speedup",)],
    "profile": [("in_process", "events/sqlite", "events_per_s"),
                ("in_process", "pages/sqlite", "events_per_s"),
                ("daemon", "default", "events_per_s"), ("daemon", "gc_tuned", "events_per_s")],
}


@pytest.mark.timeout(900)
def test_quick_benchmarks_produce_results(kafka_bootstrap: str, mongo_uri: str,
                                          tmp_path: Path) -> None:
    out = tmp_path / "results"
    env = {**os.environ, "BLUESTREAM_KAFKA_BOOTSTRAP": kafka_bootstrap,
           "BLUESTREAM_MONGO_URI": mongo_uri, "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out),
         "--work", str(tmp_path / "work")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "== summary" in proc.stdout

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
    # Scenarios that have targets report them (numbers, not verdicts, are tested).
    names = {t["name"] for t in summary["targets"]}
    assert any(n.startswith("scalar") for n in names)
    assert any(n.startswith("latency p99") for n in names)
    assert any(n.startswith("read") for n in names)
    assert any("RSS" in n for n in names)
