"""Removing runs for good: two-phase and crash-safe (daf_butler's ``removeRuns`` /
``pruneDatasets``).

Phase one marks the runs removed in the metadata store: from then on searches, counts
and lookups of every reader leave them out. Phase two deletes their arrays, then their
metadata records, the mark last (:meth:`~bluestream.storage.base.MetadataStore.delete_run`).
A crash anywhere leaves the mark, and every later removal first finishes the runs still
marked: a rerun after a crash finishes the job.

Open runs (no stop document) are refused unless ``force``; even then a run is refused
when anything of it is newer than ``idle`` seconds (its start, descriptors and newest
event, by their own times) or when it grows while watched (its stored state is read
twice, ``settle`` seconds apart). A consumer still writing a removed run would recreate
fragments of it (a descriptor, rows, a stop without their start), which ``verify``
reports at level 1; the daemon does not check for removals while it writes, so that
is what these two conditions are for.
A removed run whose documents are later replayed from Kafka is stored again (removal
is of what is stored, not of the topic).
"""

from __future__ import annotations

import getpass
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from bluestream.catalog.context import CatalogContext
from bluestream.log import get_logger
from bluestream.queries import And, Query, TimeLike, TimeRange
from bluestream.storage.array_removal import delete_run_arrays, run_arrays_exist
from bluestream.storage.base import MetadataStore

__all__ = ["Refusal", "RemovalReport", "finish_pending", "remove_runs", "select_prune"]

Doc = dict[str, Any]
#: Called after each phase of each run (``"mark"`` once for all runs, ``"arrays"`` per
#: run); tests use it to stop a removal between its phases.
PhaseHook = Callable[[str, str], None]

log = get_logger("bluestream.removal")


@dataclass(frozen=True)
class Refusal:
    uid: str
    reason: str

    def __str__(self) -> str:
        return f"{self.uid}: {self.reason}"


@dataclass
class RemovalReport:
    removed: list[Doc] = field(default_factory=list)  # uid, scan_id, files, records
    refused: list[Refusal] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)  # earlier removals completed now

    @property
    def ok(self) -> bool:
        return not self.refused


async def _progress(ctx: CatalogContext, uid: str) -> tuple[Any, ...]:
    """What a writer of the run would change: its stop, descriptors and stream records."""
    store = ctx.store
    stop = await ctx.call("read stop", store.get, "stop", uid)
    descriptors = await ctx.call("read descriptors", store.find, "descriptor", run_start=uid)
    streams = await ctx.call("read event_stream", store.streams, uid)
    return (stop is not None, len(descriptors),
            tuple(sorted((str(r["descriptor_uid"]), int(r["length"]), r.get("tail_start"),
                          len(r.get("tail") or b"")) for r in streams)))


async def _arrays_missing(ctx: CatalogContext, starts: Sequence[Doc]) -> list[Refusal]:
    """Runs whose stream records say rows are in Zarr but nothing is stored for them
    under this root: most likely a wrong Zarr root, and removing their metadata would
    orphan the real arrays for good."""
    out = []
    uids = [str(s["uid"]) for s in starts]
    # One query for every run's stream records (without their tail rows): a record
    # without a tail, or whose tail starts past row 0, has rows in Zarr.
    in_zarr = {str(r["run_start"]) for r in await ctx.call(
        "read event_stream", ctx.store.links, "event_stream", uids)
        if r.get("tail_start") is None or int(r["tail_start"]) > 0}
    for uid in uids:
        if uid in in_zarr and not await run_arrays_exist(ctx.zarr_root, ctx.tenant, uid):
            out.append(Refusal(uid, f"its arrays are not under the Zarr root {ctx.zarr_root} "
                                    "(a wrong --zarr-root?); nothing was removed"))
    return out


async def _newest_time(ctx: CatalogContext, start: Doc) -> float:
    """The newest time a run's stored documents carry (start, descriptors, events)."""
    uid = str(start["uid"])
    times = [start.get("time")]
    times += [d.get("time") for d in await ctx.call("read descriptors", ctx.store.find,
                                                     "descriptor", run_start=uid)]
    times += [r.get("time_max") for r in await ctx.call("read event_stream",
                                                         ctx.store.streams, uid)]
    return max((float(t) for t in times if isinstance(t, int | float)), default=0.0)


async def _refusals(ctx: CatalogContext, starts: Sequence[Doc], *, force: bool,
                    settle: float, idle: float) -> list[Refusal]:
    stopped = {str(r["run_start"]) for r in await ctx.call(
        "read stops", ctx.store.links, "stop", [str(s["uid"]) for s in starts])}
    open_runs = [s for s in starts if str(s["uid"]) not in stopped]
    if not force:
        return [Refusal(str(s["uid"]), "the run is open (no stop document): a consumer may "
                                       "still be writing it; give --force to remove a run "
                                       "that will never stop") for s in open_runs]
    refused = []
    quiet = []
    for start in open_runs:
        age = time.time() - await _newest_time(ctx, start)
        if idle > 0 and age < idle:
            refused.append(Refusal(str(start["uid"]), f"the run is open and wrote data "
                                   f"{max(age, 0):.0f} s ago (less than --idle {idle:g} s)"))
        else:
            quiet.append(str(start["uid"]))
    if not quiet:
        return refused
    before = {u: await _progress(ctx, u) for u in quiet}
    await anyio.sleep(settle)
    return refused + [
        Refusal(u, f"the run is still being written (it changed within {settle:g} s); "
                   "stop its producer or wait for its stop document")
        for u in quiet if await _progress(ctx, u) != before[u]]


def _info(reason: str) -> Doc:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return {"time": time.time(), "host": socket.gethostname(), "user": user,
            "reason": reason}


async def _finish_one(ctx: CatalogContext, writer: MetadataStore, uid: str,
                      hook: PhaseHook | None) -> Doc:
    files = await delete_run_arrays(ctx.zarr_root, ctx.tenant, uid)
    if hook is not None:
        hook("arrays", uid)
    counts = await ctx.call(f"delete run {uid}", writer.delete_run, uid)
    return {"uid": uid, "files": files, "records": sum(counts.values()) - counts.get("mark", 0)}


async def finish_pending(ctx: CatalogContext, *, hook: PhaseHook | None = None) -> list[Doc]:
    """Complete removals that were marked but did not finish (a crash, a kill)."""
    writer = await ctx.writer()
    done = []
    for mark in await ctx.call("read removal marks", writer.removal_marks):
        uid = str(mark["uid"])
        done.append(await _finish_one(ctx, writer, uid, hook))
        log.info("removal finished", tenant=ctx.tenant, run=uid, marked=mark)
    return done


async def remove_runs(ctx: CatalogContext, starts: Sequence[Doc], *, force: bool = False,
                      settle: float = 5.0, idle: float = 600.0, reason: str = "remove",
                      hook: PhaseHook | None = None) -> RemovalReport:
    """Remove the runs of these start documents (see the module docstring). Runs that
    are refused are left untouched; the others are removed. Callers finish earlier
    removals first (:func:`finish_pending`): runs marked removed are hidden from lookups."""
    await ctx.ensure_open()
    report = RemovalReport()
    report.refused = await _arrays_missing(ctx, starts)
    missing = {r.uid for r in report.refused}
    report.refused += await _refusals(ctx, [s for s in starts if str(s["uid"]) not in missing],
                                      force=force, settle=settle, idle=idle)
    refused = {r.uid for r in report.refused}
    chosen = [s for s in starts if str(s["uid"]) not in refused]
    if not chosen:
        return report
    writer = await ctx.writer()
    uids = [str(s["uid"]) for s in chosen]
    await ctx.call("mark runs removed", writer.mark_removed, uids, _info(reason))
    log.info("runs marked removed", tenant=ctx.tenant, runs=uids, reason=reason)
    if hook is not None:
        hook("mark", ",".join(uids))
    for start in chosen:
        done = await _finish_one(ctx, writer, str(start["uid"]), hook)
        done["scan_id"] = start.get("scan_id")
        done["time"] = start.get("time")
        report.removed.append(done)
        log.info("run removed", tenant=ctx.tenant, run=done["uid"], scan_id=done["scan_id"],
                 files=done["files"], records=done["records"])
    return report


def select_prune(before: TimeLike, query: Query | None = None,
                 timezone: str | None = None) -> Query:
    """The runs a prune removes: started before ``before`` (and matching ``query``)."""
    if before is None:
        raise ValueError("prune needs a date: runs started before it are removed")
    older = TimeRange(until=before, timezone=timezone)
    return older if query is None else And(older, query)
