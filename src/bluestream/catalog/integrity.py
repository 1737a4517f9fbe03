"""Is what was stored intact, and was all of it stored? Integrity checks in levels
(deker's ``check_integrity``) and completeness of runs (the QuantumBackedButler's
``stored_many``).

Levels, each including the ones below:

1. metadata: every descriptor and stop has its start, every ``event_stream`` record its
   descriptor (of the same run) and the Zarr path the layout gives it;
2. arrays: every stream's Zarr group exists (unless all its rows are in the tail), with
   every array the layout gives its descriptor, long enough for the rows the record puts
   there (arrays grow in whole chunks: longer is fine), of the descriptor's dtype and
   per-event shape; a tail kept in the metadata store decodes and has the same columns;
3. chunks: every chunk of rows that hold events (``seq_num > 0``) exists and decodes;
4. values: the stop's ``num_events`` per stream equals the events stored, every written
   row holds ``seq_num == position + 1`` and a non-empty uid, times lie within the
   record's range, and sample rows read back through the catalog's reader equal the
   arrays.

Levels 3 and 4 read each chunk once, in windows of whole chunks (no xarray, no dataset
building), so they cost about one pass over the stored bytes. Completeness looks at the
metadata only (a few queries for any number of runs); ``exact=True`` counts the written
rows in the arrays too (one read of each stream's ``seq_num`` column).

Here: the entry points, level 1, the stop's event counts and completeness. The checks
of one stream at levels 2-4 (those that read arrays) are in
:mod:`bluestream.catalog.stream_check`; :class:`Problem` (in
:mod:`bluestream.catalog.problems`) and :func:`expected_columns` (in
:mod:`bluestream.catalog.stream_columns`) are re-exported from here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from zarr.abc.store import Store

from bluestream.catalog.context import CatalogContext
from bluestream.catalog.problems import Problem
from bluestream.catalog.run_keys import first_found
from bluestream.catalog.stream_check import StreamCheck
from bluestream.catalog.stream_columns import expected_columns
from bluestream.errors import BluestreamError, NotFound
from bluestream.layout import descriptor_path
from bluestream.queries import Query

__all__ = ["LEVELS", "Completeness", "Problem", "completeness", "expected_columns",
           "incomplete_runs", "record_span", "resolve_runs", "verify", "visible_runs"]

Doc = dict[str, Any]
#: Progress callback: (runs checked, runs to check, what is being checked now); called
#: after each run and, inside a long run, after each window of chunks read.
ProgressFn = Callable[[int, int, str], None]
LEVELS = (1, 2, 3, 4)
#: Runs per metadata query when many are asked about.
_BATCH = 1_000


# -- results ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Completeness:
    """Whether a run's stop arrived and every stream holds the events the stop records
    (``stop["num_events"]``); ``reason`` says what is missing."""

    uid: str
    complete: bool
    reason: str = ""
    expected: dict[str, int] = field(default_factory=dict)
    stored: dict[str, int] = field(default_factory=dict)


# -- completeness -------------------------------------------------------------------------
async def completeness(ctx: CatalogContext, uids: Sequence[str], *,
                       exact: bool = False) -> dict[str, Completeness]:
    """Completeness of these runs (full uids) in three queries per thousand runs.

    The stored events of a stream are the seq_nums its ``event_stream`` records span,
    lowest to highest (the writer updates them only once the rows are durable);
    ``exact=True`` counts the rows that hold an event instead, which finds gaps but
    reads each stream's ``seq_num`` column."""
    await ctx.ensure_open()
    out: dict[str, Completeness] = {}
    wanted = list(dict.fromkeys(uids))
    for i in range(0, len(wanted), _BATCH):
        out.update(await _completeness_batch(ctx, wanted[i:i + _BATCH], exact))
    return out


async def _completeness_batch(ctx: CatalogContext, uids: list[str],
                              exact: bool) -> dict[str, Completeness]:
    store = ctx.store
    starts = {d["key"] for d in await ctx.call("list starts", store.links, "start", uids)}
    stops = {str(d["run_start"]): d for d in
             await ctx.call("read stops", store.find, "stop", keys=uids)}
    stored: dict[str, dict[str, int]] = {u: {} for u in uids}
    if exact:
        for uid in uids:
            if uid in starts:
                for rec in await ctx.call("read event_stream", store.streams, uid):
                    n = len(await ctx.arrays.written_positions(rec))
                    _add(stored[uid], str(rec["stream_name"]), n)
    else:
        for rec in await ctx.call("list event_stream", store.links, "event_stream", uids):
            _add(stored[str(rec["run_start"])], str(rec["stream_name"]), record_span(rec))
    return {u: _judge(u, u in starts, stops.get(u), stored[u]) for u in uids}


def record_span(record: Mapping[str, Any]) -> int:
    """Events a stream record covers: seq_nums from its lowest to its highest (a second
    descriptor of a stream may continue the first one's seq_nums)."""
    return max(0, int(record["length"]) - int(record.get("seq_num_min") or 1) + 1)


def _add(counts: dict[str, int], stream: str, n: int) -> None:
    counts[stream] = counts.get(stream, 0) + n


def _judge(uid: str, known: bool, stop: Doc | None, stored: dict[str, int]) -> Completeness:
    if not known:
        return Completeness(uid, False, "no such run (no start document)", stored=stored)
    if stop is None:
        return Completeness(uid, False, "open: no stop document yet", stored=stored)
    raw = stop.get("num_events")
    expected = {str(k): int(v) for k, v in raw.items()} if isinstance(raw, Mapping) else {}
    short = [f"stream {name!r}: {stored.get(name, 0)} of {n} events stored"
             for name, n in sorted(expected.items()) if stored.get(name, 0) < n]
    return Completeness(uid, not short, "; ".join(short), expected, stored)


async def incomplete_runs(ctx: CatalogContext, query: Query | None, *, exact: bool = False,
                          page: int = _BATCH) -> AsyncIterator[tuple[Doc, Completeness]]:
    """(start document, completeness) of every run matching ``query`` that is not
    complete, newest first, a page of runs per few queries."""
    await ctx.ensure_open()
    skip = 0
    while True:
        starts = await ctx.call("search runs", ctx.store.search, query, skip=skip, limit=page)
        found = await completeness(ctx, [str(s["uid"]) for s in starts], exact=exact)
        for start in starts:
            result = found[str(start["uid"])]
            if not result.complete:
                yield start, result
        if len(starts) < page:
            return
        skip += len(starts)


# -- which runs ---------------------------------------------------------------------------
async def resolve_runs(ctx: CatalogContext, keys: Sequence[str],
                       lookup: Callable[[int | str], Any]) -> list[str]:
    """Full uids of ``keys`` (uid, uid prefix, scan id: ``lookup`` returns the start);
    a full uid whose start is gone still names its orphaned documents."""
    uids = []
    for key in keys:
        try:
            uids.append(str((await first_found(key, lookup))["uid"]))
        except NotFound:
            if not await _referenced(ctx, key):
                raise
            uids.append(key)
    return list(dict.fromkeys(uids))


async def _referenced(ctx: CatalogContext, uid: str) -> bool:
    for kind in ("stop", "descriptor", "event_stream"):
        if await ctx.call("list links", ctx.store.links, kind, [uid]):
            return True
    return False


async def visible_runs(ctx: CatalogContext, query: Query | None) -> list[str]:
    """Uids of the runs a search sees (removed runs are not among them)."""
    uids: list[str] = []
    while True:
        page = await ctx.call("search runs", ctx.store.search, query, skip=len(uids),
                              limit=_BATCH)
        uids += [str(d["uid"]) for d in page]
        if len(page) < _BATCH:
            return uids


# -- verify ------------------------------------------------------------------------------
async def verify(ctx: CatalogContext, *, level: int = 4, runs: Sequence[str] | None = None,
                 query: Query | None = None,
                 progress: ProgressFn | None = None) -> list[Problem]:
    """Problems found at ``level`` and below in the runs ``runs`` (full uids), or in
    every run matching ``query`` (the whole tenant for None: then level 1 also finds
    documents whose start is gone)."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, not {level!r}")
    await ctx.ensure_open()
    if runs is None and query is None:
        problems = await _tenant_links(ctx)
        uids = await visible_runs(ctx, None)
    else:
        uids = list(runs) if runs is not None else await visible_runs(ctx, query)
        problems = []
        for uid in uids:
            problems += await _run_links(ctx, uid)
    if progress is not None:
        progress(0, len(uids), "")
    if level >= 2:
        store = ctx.zarr_root.open_store(read_only=True)
        for i, uid in enumerate(uids):
            problems += await _check_run(ctx, store, uid, level, _note(progress, i, len(uids)))
            if progress is not None:
                progress(i + 1, len(uids), uid)
    return problems


def _note(progress: ProgressFn | None, done: int, total: int
          ) -> Callable[[str], None] | None:
    if progress is None:
        return None
    return lambda what: progress(done, total, what)


# -- level 1 ------------------------------------------------------------------------------
async def _tenant_links(ctx: CatalogContext) -> list[Problem]:
    got = {kind: await ctx.call(f"list {kind} links", ctx.store.links, kind)
           for kind in ("start", "stop", "descriptor", "event_stream")}
    starts = {str(d["key"]) for d in got["start"]}
    return _link_problems(ctx.tenant, starts, got["stop"], got["descriptor"],
                          got["event_stream"])


async def _run_links(ctx: CatalogContext, uid: str) -> list[Problem]:
    """Level 1 for one run: its documents, and the descriptors its records name
    (which may belong to another run)."""
    store = ctx.store
    got = {kind: await ctx.call(f"list {kind} links", store.links, kind, [uid])
           for kind in ("start", "stop", "descriptor", "event_stream")}
    mine = {str(d["key"]) for d in got["descriptor"]}
    named = [str(r["descriptor_uid"]) for r in got["event_stream"]
             if str(r["descriptor_uid"]) not in mine]
    others = await ctx.call("read descriptors", store.find, "descriptor", keys=named) \
        if named else []
    descriptors = got["descriptor"] + [{"key": d["uid"], "uid": d["uid"],
                                        "run_start": d.get("run_start")} for d in others]
    starts = {str(d["key"]) for d in got["start"]}
    problems = _link_problems(ctx.tenant, starts | {str(d["run_start"]) for d in others
                                                    if d.get("run_start")},
                              got["stop"], descriptors, got["event_stream"])
    if uid not in starts and not problems and not got["stop"] and not got["descriptor"]:
        problems.append(Problem(1, uid, "no start document, and nothing refers to it"))
    return problems


def _link_problems(tenant: str, starts: set[str], stops: Sequence[Doc],
                   descriptors: Sequence[Doc], records: Sequence[Doc]) -> list[Problem]:
    """The level-1 rules over link records (pure)."""
    problems = [Problem(1, str(s["run_start"]), f"stop {s['uid']} has no start document")
                for s in stops if str(s["run_start"]) not in starts]
    owner = {str(d["key"]): d.get("run_start") for d in descriptors}
    problems += [Problem(1, str(d["run_start"]), "has no start document",
                         descriptor=str(d["key"]))
                 for d in descriptors if str(d["run_start"]) not in starts]
    for rec in records:
        run, desc = str(rec["run_start"]), str(rec["descriptor_uid"])
        stream = str(rec.get("stream_name"))
        if desc not in owner:
            problems.append(Problem(1, run, "the event_stream record of this stream has no "
                                    "descriptor document", stream, desc))
        elif owner[desc] != run:
            problems.append(Problem(1, run, f"the event_stream record names run {run}, its "
                                    f"descriptor names run {owner[desc]}", stream, desc))
        else:
            want = _expected_path(tenant, run, desc)
            if want is not None and rec.get("zarr_path") != want:
                problems.append(Problem(1, run, f"the event_stream record points at "
                                        f"{rec.get('zarr_path')!r}, the layout gives {want!r}",
                                        stream, desc))
    return problems


def _expected_path(tenant: str, run: str, desc: str) -> str | None:
    try:
        return descriptor_path(tenant, run, desc)
    except BluestreamError:
        return None  # an unsafe uid was never stored; nothing to compare


# -- levels 2-4, per run ------------------------------------------------------------------
async def _check_run(ctx: CatalogContext, store: Store, uid: str, level: int,
                     note: Callable[[str], None] | None) -> list[Problem]:
    stop = await ctx.call("read stop", ctx.store.get, "stop", uid)
    descriptors = {str(d["uid"]): d for d in
                   await ctx.call("read descriptors", ctx.store.find, "descriptor",
                                  run_start=uid)}
    records = await ctx.call("read event_stream", ctx.store.streams, uid)
    problems: list[Problem] = []
    counts: dict[str, int] = {}
    unknown: set[str] = set()  # streams with a record level 1 found no descriptor for
    for rec in records:
        desc = descriptors.get(str(rec["descriptor_uid"]))
        if desc is None:
            unknown.add(str(rec["stream_name"]))
            continue
        check = StreamCheck(ctx, store, uid, desc, rec, level, note)
        problems += await check.run()
        _add(counts, check.stream, check.written)
    if level >= 4 and stop is not None:
        problems += [p for p in _stop_problems(uid, stop, counts,
                                               {str(r["stream_name"]) for r in records})
                     if p.stream not in unknown]
    return problems


def _stop_problems(uid: str, stop: Doc, counts: dict[str, int],
                   streams: set[str]) -> list[Problem]:
    raw = stop.get("num_events")
    if not isinstance(raw, Mapping):
        return []
    problems = []
    for name, n in sorted(raw.items()):
        have = counts.get(str(name), 0)
        if isinstance(n, int) and have != n:
            problems.append(Problem(4, uid, f"the stop records {n} events, {have} are stored",
                                    str(name)))
    for name in sorted(streams - {str(k) for k in raw}):
        if counts.get(name, 0):
            problems.append(Problem(4, uid, f"the stop records no event count for this "
                                    f"stream, which holds {counts[name]} events", name))
    return problems

