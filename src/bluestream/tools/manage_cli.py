"""Commands that change what is stored after the fact: ``annotate``, ``remove``,
``prune``, and ``provenance`` to read where a run came from.

Exit status: 0 done, 1 something was refused or not found (nothing else changed for
it), 2 bad configuration or usage. Removal asks for confirmation unless ``--yes`` and
prints one line per run removed; it is logged as well (``bluestream.removal``).
"""

from __future__ import annotations

import getpass
import json
from typing import Annotated, Any

import anyio
import typer

from bluestream.catalog.core import AsyncCatalog, open_catalog_async
from bluestream.catalog.removal import RemovalReport
from bluestream.errors import BluestreamError, NotFound
from bluestream.queries import Raw, TimeRange
from bluestream.settings import Settings
from bluestream.storage.query_rules import time_bounds
from bluestream.tools.commands import (
    ConfigOpt,
    MetadataOpt,
    TenantOpt,
    ZarrOpt,
    fail,
    tool_settings,
)
from bluestream.tools.export import find_start

__all__ = ["register"]

RunsArg = Annotated[list[str], typer.Argument(
    help="Runs: uid, uid prefix (>= 5 characters), scan_id, or -1 (newest).",
    show_default=False)]
ForceOpt = Annotated[bool, typer.Option(
    "--force", help="Also remove open runs (no stop document) that have stopped growing.")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
SettleOpt = Annotated[float, typer.Option(
    min=0.0, help="With --force: seconds an open run is watched and must not change.")]
IdleOpt = Annotated[float, typer.Option(
    min=0.0, help="With --force: an open run must have written nothing (by its documents' "
    "times) for this many seconds.")]


def _catalog(tenant: str, settings: Settings) -> AsyncCatalog:
    return open_catalog_async(tenant, metadata=settings.storage.metadata,
                              zarr_root=settings.storage.zarr())


def _value(text: str) -> Any:
    """``key=value`` values are JSON when they parse (numbers, true, null, "quoted",
    [lists], {objects}), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


# -- annotate ------------------------------------------------------------------------------

def annotate(run: Annotated[str, typer.Argument(help="The run: uid, uid prefix, scan_id or "
                                                "-1.", show_default=False)],
             tenant: TenantOpt,
             pairs: Annotated[list[str] | None, typer.Argument(
                 metavar="KEY=VALUE...", help="Annotations to set (VALUE as JSON when it "
                 "parses, else text; KEY= with nothing clears). None: show them.",
                 show_default=False)] = None,
             author: Annotated[str | None, typer.Option(
                 help="Who annotates; default: the login name.")] = None,
             note: Annotated[str | None, typer.Option(help="Why (kept with the version).")
                             ] = None,
             history: Annotated[str | None, typer.Option(
                 "--history", help="Print every version of this key instead.")] = None,
             metadata: MetadataOpt = None, zarr_root: ZarrOpt = None,
             config: ConfigOpt = None) -> None:
    """Annotate a run after the fact (versioned; start/stop documents never change)."""
    parsed: list[tuple[str, Any]] = []
    for pair in pairs or []:
        key, eq, text = pair.partition("=")
        if not eq or not key:
            fail(f"{pair!r} is not KEY=VALUE", 2)
        parsed.append((key, _value(text) if text else None))
    settings = tool_settings(config, metadata=metadata, zarr_root=zarr_root)
    who = author if author is not None else _login()

    async def work() -> None:
        async with _catalog(tenant, settings) as cat:
            r = await cat.lookup(str((await find_start(cat, run))["uid"]))
            for key, value in parsed:
                version = await r.annotate(key, value, author=who, note=note)
                typer.echo(f"{r.uid} {key} = {json.dumps(value)} (version {version})")
            if history is not None:
                for v in await r.annotation_history(history):
                    typer.echo(json.dumps(v, sort_keys=True))
            elif not parsed:
                typer.echo(json.dumps(await r.annotations(), indent=2, sort_keys=True))

    _run(work)


def _login() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None


def _run(work: Any) -> None:
    try:
        anyio.run(work)
    except (NotFound, ValueError, TypeError) as exc:
        fail(str(exc), 1)
    except BluestreamError as exc:
        fail(str(exc), 1)


# -- provenance ----------------------------------------------------------------------------

def provenance(run: Annotated[str, typer.Argument(help="The run: uid, uid prefix, scan_id "
                                                  "or -1.", show_default=False)],
               tenant: TenantOpt, metadata: MetadataOpt = None,
               zarr_root: ZarrOpt = None, config: ConfigOpt = None) -> None:
    """Print where a run came from: topics, partitions, offsets, hosts, versions, files."""
    settings = tool_settings(config, metadata=metadata, zarr_root=zarr_root)

    async def work() -> None:
        async with _catalog(tenant, settings) as cat:
            r = await cat.lookup(str((await find_start(cat, run))["uid"]))
            typer.echo(json.dumps(await r.provenance(), indent=2, sort_keys=True))

    _run(work)


# -- remove / prune ------------------------------------------------------------------------

def _describe(start: dict[str, Any]) -> str:
    return (f"{start.get('uid')}  scan_id={start.get('scan_id')}  "
            f"plan_name={start.get('plan_name')}  time={start.get('time')}")


def _say_finished(uids: list[str]) -> None:
    for uid in uids:
        typer.echo(f"finished an interrupted removal: {uid}")


def _print_report(report: RemovalReport) -> None:
    for done in report.removed:
        typer.echo(f"removed {done['uid']} (scan_id {done.get('scan_id')}): "
                   f"{done['files']} array files, {done['records']} metadata records")
    for refusal in report.refused:
        typer.echo(f"refused {refusal}", err=True)
    typer.echo(f"{len(report.removed)} run(s) removed, {len(report.refused)} refused",
               err=True)


def _confirm(starts: list[dict[str, Any]], yes: bool) -> None:
    for start in starts:
        typer.echo(f"  {_describe(start)}")
    if not yes and not typer.confirm(f"Remove these {len(starts)} run(s) and their arrays "
                                     "for good?", default=False):
        fail("nothing removed", 1)


def remove(runs: RunsArg, tenant: TenantOpt, force: ForceOpt = False, yes: YesOpt = False,
           settle: SettleOpt = 5.0, idle: IdleOpt = 600.0, metadata: MetadataOpt = None,
           zarr_root: ZarrOpt = None,
           config: ConfigOpt = None) -> None:
    """Remove runs and their arrays for good (two-phase: a rerun after a crash finishes).

    Open runs are refused unless --force; even then a run that wrote anything within
    --idle seconds, or grows while watched for --settle seconds, is refused."""
    settings = tool_settings(config, zarr_access="write", metadata=metadata,
                             zarr_root=zarr_root)

    async def work() -> RemovalReport:
        async with _catalog(tenant, settings) as cat:
            finished = await cat.finish_removals()  # a rerun after a crash ends here
            _say_finished(finished)
            found = [await cat.find_start(text, finished=finished) for text in runs]
            unique = list({str(s["uid"]): s for s in found if s is not None}.values())
            if not unique:
                return RemovalReport()
            _confirm(unique, yes)
            return await cat.remove(*[str(s["uid"]) for s in unique], force=force,
                                    settle=settle, idle=idle)

    _finish(work)


def prune(tenant: TenantOpt,
          before: Annotated[str, typer.Option(
              help="Remove runs started before this date/time (ISO, local time unless it "
              "names a zone; or epoch seconds).")],
          query: Annotated[str | None, typer.Option(
              help="Only runs whose start document matches this MongoDB-style JSON filter, "
              "e.g. '{\"plan_name\": \"count\"}'.")] = None,
          dry_run: Annotated[bool, typer.Option("--dry-run", help="List the runs; remove "
                                                "nothing.")] = False,
          force: ForceOpt = False, yes: YesOpt = False, settle: SettleOpt = 5.0,
          idle: IdleOpt = 600.0,
          metadata: MetadataOpt = None, zarr_root: ZarrOpt = None,
          config: ConfigOpt = None) -> None:
    """Remove every run started before a date (and matching --query), with its arrays."""
    filt: Any = None
    if query is not None:
        try:
            filt = json.loads(query)
        except ValueError as exc:
            fail(f"--query is not JSON: {exc}", 2)
        if not isinstance(filt, dict):
            fail("--query must be a JSON object (a MongoDB-style filter)", 2)
    settings = tool_settings(config, zarr_access=None if dry_run else "write",
                             metadata=metadata, zarr_root=zarr_root)
    when = _when(before)
    try:  # a date that does not parse is a usage error, found before anything is done
        time_bounds(TimeRange(until=when))
    except ValueError as exc:
        fail(f"--before: {exc}", 2)

    async def work() -> RemovalReport:
        async with _catalog(tenant, settings) as cat:
            if not dry_run:
                _say_finished(await cat.finish_removals())
            starts = await cat.prune_candidates(when, None if filt is None else Raw(filt))
            if dry_run:
                for start in starts:
                    typer.echo(_describe(start))
                typer.echo(f"{len(starts)} run(s) would be removed (dry run)", err=True)
                return RemovalReport()
            if not starts:
                typer.echo("no run matches: nothing to remove", err=True)
                return RemovalReport()
            _confirm(starts, yes)  # exactly these are removed, whatever arrives meanwhile
            return await cat.remove(*[str(d["uid"]) for d in starts], force=force,
                                    settle=settle, idle=idle, reason="prune")

    _finish(work, quiet=dry_run)


def _when(text: str) -> str | float:
    """Epoch seconds when ``text`` is a number, else the date text (TimeRange parses it)."""
    try:
        return float(text)
    except ValueError:
        return text


def _finish(work: Any, quiet: bool = False) -> None:
    report: RemovalReport | None = None

    async def main() -> None:
        nonlocal report
        report = await work()

    _run(main)
    if report is None:
        return
    if not quiet:
        _print_report(report)
    if not report.ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add these commands to ``app`` (the ``bluestream`` command)."""
    # "-1" (the newest run) must reach RUN(S) instead of being taken for an option.
    newest = {"ignore_unknown_options": True}
    app.command("annotate", context_settings=newest)(annotate)
    app.command("provenance", context_settings=newest)(provenance)
    app.command("remove", context_settings=newest)(remove)
    app.command("prune")(prune)

