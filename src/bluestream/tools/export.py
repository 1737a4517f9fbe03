"""``bluestream export``: runs back out as document files, one file per run.

What is written is what the catalog's ``run.documents()`` replays (events as
event_pages), in suitcase's formats and file names (``<start uid>.jsonl`` /
``<start uid>.msgpack``), so suitcase-era readers and plain ``json`` / ``msgpack``
parsing work, and ``bluestream ingest`` of an export stores the same runs again.
Beside each, ``<start uid>.provenance.json`` says where the run came from
(``run.provenance()``: topics, offsets, hosts, versions, source files).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from bluestream.catalog.core import AsyncCatalog, open_catalog_async
from bluestream.catalog.run import AsyncBlueskyRun
from bluestream.catalog.run_keys import first_found, parse_run_key
from bluestream.errors import NotFound
from bluestream.settings import Settings
from bluestream.tools.files import DocumentWriter, Format, run_file_name
from bluestream.tools.progress import Progress

__all__ = ["ExportReport", "export_runs", "find_start", "parse_run_key"]



@dataclass
class ExportReport:
    files: list[Path] = field(default_factory=list)
    documents: int = 0
    bytes: int = 0
    seconds: float = 0.0
    missing: list[str] = field(default_factory=list)  # keys that matched no run
    #: ``<uid>.provenance.json`` beside each document file (``run.provenance()``).
    provenance: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing

    def summary(self) -> str:
        miss = f", {len(self.missing)} not found" if self.missing else ""
        return (f"exported {len(self.files)} run(s): {self.documents} documents, "
                f"{self.bytes / 1e6:.1f} MB in {self.seconds:.1f} s{miss}")


async def find_start(cat: AsyncCatalog, text: str) -> dict[str, Any]:
    """The start document of the run a RUN argument names (:func:`parse_run_key`)."""
    return await first_found(text, cat.lookup_start)


async def _lookup(cat: AsyncCatalog, text: str) -> AsyncBlueskyRun:
    return await cat.load_run(await find_start(cat, text))


async def _write_provenance(run: AsyncBlueskyRun, outdir: Path) -> Path:
    """Where the run came from, beside its documents (written whole, then renamed)."""
    path = outdir / f"{run.uid}.provenance.json"
    text = json.dumps(await run.provenance(), indent=2, sort_keys=True) + "\n"
    tmp = path.with_name(path.name + ".tmp")
    await anyio.Path(tmp).write_text(text, encoding="utf-8")
    await anyio.Path(tmp).replace(path)
    return path


async def export_runs(runs: Sequence[str], *, tenant: str, settings: Settings, fmt: Format,
                      out: str | os.PathLike[str], all_runs: bool = False,
                      progress: Progress | None = None,
                      on_missing: Callable[[str, str], None] | None = None) -> ExportReport:
    """Write each run named in ``runs`` (or every run with ``all_runs``) to ``out``."""
    t0 = time.monotonic()
    report = ExportReport()
    outdir = Path(out)
    await anyio.Path(outdir).mkdir(parents=True, exist_ok=True)
    async with open_catalog_async(tenant, metadata=settings.storage.metadata,
                                  zarr_root=settings.storage.zarr()) as cat:
        selected: list[AsyncBlueskyRun] = []
        for text in runs:
            try:
                selected.append(await _lookup(cat, text))
            except (NotFound, ValueError) as exc:
                report.missing.append(text)
                if on_missing is not None:
                    on_missing(text, str(exc))
        if all_runs:
            selected.extend([run async for run in cat.values()])
        seen: set[str] = set()
        for run in selected:
            if run.uid in seen:
                continue
            seen.add(run.uid)
            path = outdir / run_file_name(run.uid, fmt)
            with DocumentWriter(path, fmt) as writer:
                async for name, doc in run.documents():
                    writer.write(name, doc)
                    if progress is not None:
                        progress.update(1, runs=len(seen))
            report.files.append(path)
            report.provenance.append(await _write_provenance(run, outdir))
            report.documents += writer.documents
            report.bytes += writer.bytes
    report.seconds = time.monotonic() - t0
    if progress is not None:
        progress.close()
    return report
