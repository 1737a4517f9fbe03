"""``bluestream demo`` end to end, as a user runs it: a subprocess against the real broker."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import bluestream
from bluestream.tools.demo_report import format_table

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

BLUESTREAM = Path(sys.executable).with_name("bluestream")


def test_demo_prints_the_runs_and_writes_the_plot(kafka_bootstrap: str,
                                                  tmp_path: Path) -> None:
    out = tmp_path / "demo"
    env = {**os.environ, "BLUESTREAM_KAFKA_BOOTSTRAP": kafka_bootstrap}
    for var in ("BLUESTREAM_CONFIG", "BLUESTREAM_METADATA", "BLUESTREAM_ZARR_ROOT"):
        env.pop(var, None)
    proc = subprocess.run([str(BLUESTREAM), "demo", "--out", str(out), "--no-services",
                           "--timeout", "90"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    for step in range(1, 8):
        assert f"[{step}/7]" in text
    assert re.search(r"uid\s+scan_id\s+plan\s+start time\s+events\s+status", text)
    rows = re.findall(r"^([0-9a-f]{8})\s+(\d+)\s+(\w+)\s+\S+ \S+\s+(\d+)\s+(\w+)$", text,
                      re.MULTILINE)
    assert [(r[2], r[3], r[4]) for r in rows] == [
        ("count", "5", "success"), ("scan", "31", "success"), ("count", "8", "success")]

    plot = Path(re.search(r"plot written to (\S+\.png)", text).group(1))  # type: ignore[union-attr]
    assert plot.is_file() and plot.parent == out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000

    tenant = plot.stem  # demo-<random>, the topic's first component
    with bluestream.open_catalog(tenant, metadata=f"sqlite:///{out / 'bluestream.db'}",
                                 zarr_root=out / "zarr") as cat:
        assert len(cat) == 3
        frames = cat[-1]["primary"].read()["cam_img"]
        assert frames.shape == (8, 128, 128) and str(frames.dtype) == "uint16"


def test_format_table_aligns_columns() -> None:
    table = format_table([("abcdef12", "7", "scan", "2024-01-01 10:00:00", "31", "success"),
                          ("0fedcba9", "12", "count", "2024-01-01 10:01:00", "5", "open")])
    lines = table.splitlines()
    assert lines[0].split() == ["uid", "scan_id", "plan", "start", "time", "events", "status"]
    assert set(lines[1]) == {"-", " "}
    assert lines[2].index("7") + 1 == lines[3].index("12") + 2  # numbers right-aligned
    assert lines[2].index("scan") == lines[3].index("count")  # text left-aligned
