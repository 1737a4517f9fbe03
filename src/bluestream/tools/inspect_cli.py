"""``bluestream verify``, ``du`` and ``status --tenant``: is the store intact, what takes
the space, which runs were not stored whole. The work is in
:mod:`bluestream.catalog.integrity` and :mod:`bluestream.catalog.usage` (the same on the
catalog API); these wrappers parse options, print and set the exit status:
0 clean, 1 problems found (or the command failed), 2 bad configuration or usage.

``status`` without ``--tenant`` asks a running daemon, as it always did
(:func:`bluestream.daemon.ops_cli.status`); :func:`register` replaces that command.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import anyio
import typer

from bluestream.daemon import ops_cli
from bluestream.errors import BluestreamError, NotFound
from bluestream.tools.commands import ConfigOpt, MetadataOpt, QuietOpt, ZarrOpt, tool_settings

if TYPE_CHECKING:
    from bluestream.catalog.core import AsyncCatalog
    from bluestream.catalog.integrity import Completeness
    from bluestream.catalog.problems import Problem
    from bluestream.catalog.usage import StorageReport, Usage
    from bluestream.settings import Settings

__all__ = ["du", "register", "status", "verify"]

T = TypeVar("T")
EXIT_PROBLEMS = 1
EXIT_USAGE = 2

TenantOpt = Annotated[str, typer.Option("--tenant", "-t", help="Tenant to look at.")]
RunsOpt = Annotated[list[str] | None, typer.Option(
    "--run", help="Only this run: uid, uid prefix (>= 5 characters) or scan_id "
    "(repeatable). Default: every run of the tenant.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


class By(StrEnum):
    run = "run"
    stream = "stream"
    field = "field"


def _fail(message: str, code: int = EXIT_PROBLEMS) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _with_catalog(settings: Settings, tenant: str,
                  work: Callable[[AsyncCatalog], Awaitable[T]]) -> T:
    """``work(catalog)`` on a read-only catalog of ``tenant``; errors become one line."""
    from bluestream.catalog.core import open_catalog_async

    async def main() -> T:
        cat = open_catalog_async(tenant, metadata=settings.storage.metadata,
                                 zarr_root=settings.storage.zarr())
        async with cat:
            return await work(cat)

    try:
        return anyio.run(main)
    except (NotFound, ValueError) as exc:
        raise _fail(str(exc).strip("'\""), EXIT_USAGE) from None
    except BluestreamError as exc:
        raise _fail(str(exc)) from None


# -- verify --------------------------------------------------------------------------------
def verify(tenant: TenantOpt,
           level: Annotated[int, typer.Option(
               "--level", "-l", min=1, max=4, help="1 metadata consistent, 2 arrays present "
               "with the recorded lengths, dtypes and shapes, 3 every chunk decodable, "
               "4 values agree with the stop and read back equal. Each includes those "
               "below.")] = 4,
           run: RunsOpt = None,
           report: Annotated[Path | None, typer.Option(
               "--report", help="Also write the problems to FILE (JSON with --json).")
                             ] = None,
           as_json: JsonOpt = False, metadata: MetadataOpt = None, zarr_root: ZarrOpt = None,
           quiet: QuietOpt = False, config: ConfigOpt = None) -> None:
    """Check that what is stored is intact; one line per problem.

    Exit status: 0 intact, 1 problems found (or the check failed), 2 usage (unknown run).
    """
    from bluestream.tools.progress import Progress

    settings = tool_settings(config, zarr_access="read", metadata=metadata, zarr_root=zarr_root)
    progress = Progress("verify", None, unit="runs", enabled=not quiet)
    found: list[Problem] = []
    checked = [0]

    def step(done: int, total: int, what: str) -> None:
        progress.total, progress.done = total, done
        checked[0] = total
        progress.update(0, at=what[:100])

    async def work(cat: AsyncCatalog) -> list[Problem]:
        return await cat.verify(level, run, progress=step)

    t0 = time.monotonic()
    try:
        found = _with_catalog(settings, tenant, work)
    finally:
        progress.close()
    elapsed = time.monotonic() - t0
    text = _verify_json(tenant, level, checked[0], found) if as_json else \
        "".join(f"{p}\n" for p in found)
    sys.stdout.write(text)
    if report is not None:
        report.write_text(text, encoding="utf-8")
    keys = f"; chunk keys are under {settings.storage.zarr()}" if found else ""
    typer.echo(f"verify level {level}: {checked[0]} run(s) checked, {len(found)} problem(s) "
               f"in {elapsed:.1f} s{keys}", err=True)
    raise typer.Exit(EXIT_PROBLEMS if found else 0)


def _verify_json(tenant: str, level: int, runs: int, problems: list[Problem]) -> str:
    return json.dumps({"tenant": tenant, "level": level, "runs_checked": runs,
                       "ok": not problems, "problems": [p.as_dict() for p in problems]},
                      indent=2) + "\n"


# -- du ------------------------------------------------------------------------------------
def du(tenant: TenantOpt, run: RunsOpt = None,
       by: Annotated[By, typer.Option("--by", help="One line per run, stream or field.")
                     ] = By.run,
       as_json: JsonOpt = False, metadata: MetadataOpt = None, zarr_root: ZarrOpt = None,
       config: ConfigOpt = None) -> None:
    """Space taken per run, stream or field: on disk, in the metadata store, logical.

    On disk: the arrays' files (object sizes for an s3:// root).

    Metadata: documents and stream records as JSON, plus the tail rows.

    Logical: the events uncompressed (strings at 16 bytes each).
    """
    settings = tool_settings(config, zarr_access="read", metadata=metadata, zarr_root=zarr_root)

    async def work(cat: AsyncCatalog) -> StorageReport:
        return await cat.storage_size(by.value, run)

    result = _with_catalog(settings, tenant, work)
    if as_json:
        typer.echo(json.dumps(result.as_dict(), indent=2))
    else:
        typer.echo(format_usage(result))


def format_usage(report: StorageReport) -> str:
    """The report as a table with human-readable sizes, and what is counted."""
    from bluestream.catalog.usage import human_bytes

    where = "OBJECTS" if report.zarr_root.startswith("s3://") else "ON DISK"
    head = ["RUN", "STREAM", "FIELD"][:["run", "stream", "field"].index(report.by) + 1]
    rows = [[*_names(u, len(head)), f"{u.events}", human_bytes(u.zarr_bytes),
             f"{u.zarr_objects}", human_bytes(u.metadata_bytes), human_bytes(u.logical_bytes)]
            for u in report.rows]
    total = report.total
    rows.append([f"TOTAL ({len({u.run for u in report.rows if u.run})} runs)",
                 *[""] * (len(head) - 1), f"{total.events}", human_bytes(total.zarr_bytes),
                 f"{total.zarr_objects}", human_bytes(total.metadata_bytes),
                 human_bytes(total.logical_bytes)])
    table = [[*head, "EVENTS", where, "FILES", "METADATA", "LOGICAL"], *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) if i < len(head) else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
             for r in table]
    lines.append(f"tenant {report.tenant!r} in {report.zarr_root}; METADATA: documents and "
                 "stream records as JSON plus tail rows (not indexes or pages)")
    if report.metadata_file_bytes is not None:
        lines.append(f"the SQLite file (every tenant) takes "
                     f"{human_bytes(report.metadata_file_bytes)}")
    return "\n".join(lines)


def _names(u: Usage, n: int) -> list[str]:
    return [v if v is not None else "-" for v in (u.run, u.stream, u.field)][:n]


# -- status --------------------------------------------------------------------------------
def status(config: ConfigOpt = None,
           url: Annotated[str | None, typer.Option(
               "--url", help="The daemon's HTTP address (without --tenant), e.g. "
               "http://127.0.0.1:8520.")] = None,
           as_json: JsonOpt = False,
           timeout: Annotated[float, typer.Option(help="Seconds to wait for the daemon's "
                                                  "answer.")] = 5.0,
           tenant: Annotated[str | None, typer.Option(
               "--tenant", "-t", help="Look at the stored runs of this tenant instead of "
               "asking a daemon.")] = None,
           incomplete: Annotated[bool, typer.Option(
               "--incomplete", help="With --tenant: list the runs whose stop has not "
               "arrived or whose streams hold fewer events than the stop records.")
                                 ] = False,
           exact: Annotated[bool, typer.Option(
               "--exact", help="With --tenant: count the rows in the arrays instead of "
               "trusting the stream records (reads every seq_num column).")] = False,
           metadata: MetadataOpt = None, zarr_root: ZarrOpt = None) -> None:
    """Ask a running daemon how it is; or, with --tenant, which stored runs are complete.

    Without --tenant, exit status: 0 ready, 1 not ready, 2 configuration, 3 no daemon.

    With --tenant, exit status: 0 every run complete, 1 some are not, 2 configuration.
    """
    if tenant is None:
        if incomplete or exact or metadata is not None or zarr_root is not None:
            raise _fail("--incomplete, --exact, --metadata and --zarr-root need --tenant",
                        EXIT_USAGE)
        ops_cli.status(config=config, url=url, as_json=as_json, timeout=timeout)
        return
    settings = tool_settings(config, zarr_access="read", metadata=metadata, zarr_root=zarr_root)

    async def work(cat: AsyncCatalog) -> tuple[int, list[tuple[dict[str, Any], Completeness]]]:
        return await cat.count(), [item async for item in cat.incomplete(exact=exact)]

    total, missing = _with_catalog(settings, tenant, work)
    if as_json:
        typer.echo(json.dumps({"tenant": tenant, "runs": total, "incomplete": [
            {"uid": c.uid, "scan_id": s.get("scan_id"), "plan_name": s.get("plan_name"),
             "time": s.get("time"), "reason": c.reason, "expected": c.expected,
             "stored": c.stored} for s, c in missing]}, indent=2))
    else:
        if incomplete:
            for start, c in missing:
                typer.echo(f"{c.uid}  scan_id={start.get('scan_id')!s:<6} "
                           f"{start.get('plan_name')!s:<12} {c.reason}")
        opened = sum(1 for _, c in missing if not c.expected and "no stop" in c.reason)
        typer.echo(f"tenant {tenant!r}: {total} runs, {total - len(missing)} complete, "
                   f"{len(missing)} not ({opened} open)", err=incomplete)
    raise typer.Exit(EXIT_PROBLEMS if missing else 0)


def register(app: typer.Typer) -> None:
    """Add ``verify`` and ``du`` to ``app``, and replace ``status`` (registered by
    :func:`bluestream.daemon.ops_cli.register`) with the one that also takes --tenant."""
    app.command("verify")(verify)
    app.command("du")(du)
    app.registered_commands = [c for c in app.registered_commands if c.name != "status"]
    app.command("status")(status)
