"""What the demo shows: a table of the stored runs and a plot, both read back through
the catalog (not from what was published), so they prove the round trip."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from bluestream.catalog.core import AsyncCatalog
from bluestream.catalog.run import AsyncBlueskyRun

__all__ = ["RunRow", "format_table", "plot_runs", "run_rows"]

RunRow = tuple[str, str, str, str, str, str]
HEADER: RunRow = ("uid", "scan_id", "plan", "start time", "events", "status")


async def run_rows(cat: AsyncCatalog) -> list[RunRow]:
    """One row per run of the catalog, oldest first."""
    rows: list[tuple[float, RunRow]] = []
    async for run in cat.values():
        start, stop = run.start, run.stop
        events = 0
        for name in run.streams:
            events += await run[name].length()
        status = "open" if stop is None else str(stop.get("exit_status", "?"))
        t = float(start.get("time", 0.0))
        rows.append((t, (run.uid[:8], str(start.get("scan_id", "")),
                         str(start.get("plan_name", "")),
                         datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S"),
                         str(events), status)))
    return [row for _, row in sorted(rows)]


def format_table(rows: Sequence[RunRow]) -> str:
    table = [HEADER, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    right = {1, 4}  # numbers
    lines = []
    for n, row in enumerate(table):
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


async def plot_runs(scan: AsyncBlueskyRun, images: AsyncBlueskyRun, path: Path) -> Path:
    """Detector vs motor for the scan, and the first frame of the image series."""
    from matplotlib.figure import Figure  # the OO API: no pyplot, no GUI backend

    scan_data: Any = await scan["primary"].read()
    image_data: Any = await images["primary"].read()
    img_key = next(k for k in image_data.data_vars if image_data[k].ndim == 3)
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(scan_data["motor"].values, scan_data["det"].values, "o-", ms=4)
    ax1.set(xlabel="motor", ylabel="det",
            title=f"scan {scan.start.get('scan_id')} ({scan.uid[:8]})")
    frame = image_data[img_key].values[0]
    im = ax2.imshow(frame, cmap="viridis", origin="lower")
    fig.colorbar(im, ax=ax2, label="counts")
    ax2.set(title=f"{img_key}, frame 1 of {image_data[img_key].shape[0]} "
                  f"({images.uid[:8]}), {frame.shape[0]}x{frame.shape[1]} {frame.dtype}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
