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
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import anyio
import msgpack
import numpy as np
import zarr
import zarr.api.asynchronous as za
from numpy.typing import NDArray
from zarr.abc.store import Store
from zarr.core.array import AsyncArray
from zarr.core.buffer import default_buffer_prototype

from bluestream.catalog.context import CatalogContext
from bluestream.errors import BluestreamError, NotFound, StorageError
from bluestream.layout import (
    SEQ_NUM,
    STRING,
    TIME,
    UID,
    FieldSpec,
    data_path,
    descriptor_path,
    filled_path,
    reader_specs,
    timestamps_path,
)
from bluestream.queries import Query
from bluestream.storage.tail import Tail
from bluestream.storage.zarr_root import IO_ERRORS, brief

__all__ = ["LEVELS", "Completeness", "Problem", "completeness", "expected_columns",
           "incomplete_runs", "record_span", "resolve_runs", "verify", "visible_runs"]

Doc = dict[str, Any]
Array = NDArray[Any]
#: Progress callback: (runs checked, runs to check, what is being checked now); called
#: after each run and, inside a long run, after each window of chunks read.
ProgressFn = Callable[[int, int, str], None]
LEVELS = (1, 2, 3, 4)
#: Decoded bytes read per array per request at levels 3-4 (whole chunks, at least one).
_WINDOW_BYTES = 32 * 1024 * 1024
_STRING_ITEM_BYTES = 64
#: Rows of each stream re-read through the catalog's reader at level 4: a few windows of
#: consecutive rows (each window costs one chunk read per array, whatever its rows).
_SAMPLE_WINDOWS, _SAMPLE_ROWS = 4, 4
#: Arrays of one stream read at once (zarr reads each one's chunks concurrently too).
_ARRAYS_AT_ONCE = 4
#: Runs per metadata query when many are asked about.
_BATCH = 1_000
_READ_ERRORS = (*IO_ERRORS, zarr.errors.BaseZarrError, ValueError, TypeError, RuntimeError)


# -- results ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    """One thing found wrong, named as precisely as it is known: the run, the stream
    and descriptor, the array (its path inside the descriptor's group) and the chunk
    (its key under the Zarr root), so that an operator can go and look."""

    level: int
    run: str
    message: str
    stream: str | None = None
    descriptor: str | None = None
    array: str | None = None
    chunk: str | None = None

    def __str__(self) -> str:
        where = [f"run {self.run}"]
        if self.stream is not None:
            where.append(f"stream {self.stream!r}")
        if self.descriptor is not None:
            where.append(f"descriptor {self.descriptor}")
        if self.array is not None:
            where.append(f"array {self.array}")
        if self.chunk is not None:
            where.append(f"chunk {self.chunk}")
        return f"level {self.level}: {' '.join(where)}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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
            start = await lookup(int(key) if key.lstrip("-").isdigit() else key)
            uids.append(str(start["uid"]))
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


def _note(progress: ProgressFn | None, done: int, total: int) -> Callable[[str], None]:
    if progress is None:
        return _quiet
    return lambda what: progress(done, total, what)


def _quiet(what: str) -> None:
    return None


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
                     note: Callable[[str], None]) -> list[Problem]:
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


@dataclass(frozen=True)
class _Column:
    name: str
    dtype: np.dtype[Any] | None  # None: an array key whose first page chose the dtype
    shape: tuple[int, ...]


def expected_columns(specs: Mapping[str, FieldSpec]) -> list[_Column]:
    """The arrays the layout gives a descriptor (layout.stored_columns, without a page)."""
    cols = [_Column(TIME, np.dtype(np.float64), ()), _Column(SEQ_NUM, np.dtype(np.int64), ()),
            _Column(UID, STRING, ())]
    for key, spec in sorted(specs.items()):
        if spec.external or spec.variable or spec.kind == "string":
            cols.append(_Column(data_path(key), STRING, ()))
        else:
            cols.append(_Column(data_path(key), spec.dtype, spec.shape))
        cols.append(_Column(timestamps_path(key), np.dtype(np.float64), ()))
        if spec.external:
            cols.append(_Column(filled_path(key), np.dtype(np.bool_), ()))
    return cols


class StreamCheck:
    """Levels 2-4 of one descriptor's stream: its record, its tail, its Zarr group."""

    def __init__(self, ctx: CatalogContext, store: Store, run: str, descriptor: Doc,
                 record: Doc, level: int, note: Callable[[str], None] | None = None) -> None:
        self.ctx, self.store, self.run_uid, self.level = ctx, store, run, level
        self.descriptor, self.record = descriptor, record
        self.note: Callable[[str], None] = note or _quiet
        self.desc_uid = str(descriptor["uid"])
        self.stream = str(descriptor.get("name", "primary"))
        self.path = str(record["zarr_path"])
        self.length = int(record["length"])
        self.problems: list[Problem] = []
        self.tail: Tail | None = None
        #: Rows that live in the arrays: below the tail's start, or all of them.
        self.needed = self.length
        #: Events stored (rows whose seq_num > 0), counted at level 3 and up.
        self.written = 0
        self.written_mask: Array | None = None
        self.samples: Array = np.zeros(0, dtype=np.int64)
        self.sampled: dict[str, dict[int, Any]] = {}

    def problem(self, level: int, message: str, *, array: str | None = None,
                chunk: str | None = None) -> None:
        self.problems.append(Problem(level, self.run_uid, message, self.stream, self.desc_uid,
                                     array, chunk))

    async def run(self) -> list[Problem]:
        try:
            columns = expected_columns(reader_specs(self.descriptor))
        except BluestreamError as exc:
            self.problem(2, f"the descriptor's data_keys cannot be read: {exc}")
            return self.problems
        if not self._load_tail(columns):
            return self.problems
        arrays = await self._check_group(columns)
        if self.level >= 3:
            await self._check_chunks(arrays)
            if self.level >= 4:
                self._check_tail_values()
                self._check_top()
                await self._check_samples(columns)
        elif self.tail is not None:
            self.written = int((self.tail.columns[SEQ_NUM] > 0).sum())
        return sorted(self.problems, key=lambda p: (p.level, p.array or "", p.chunk or "",
                                                    p.message))

    # -- level 2 ------------------------------------------------------------------------
    def _load_tail(self, columns: list[_Column]) -> bool:
        blob = self.record.get("tail")
        if not blob:
            return True
        try:
            self.tail = Tail.decode(bytes(blob))
        except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
            self.problem(2, f"the tail kept in the metadata store cannot be decoded: {exc}")
            return False
        tail = self.tail
        self.needed = tail.start
        if self.record.get("tail_start") not in (None, tail.start):
            self.problem(2, f"the tail starts at row {tail.start}, its record says "
                         f"{self.record.get('tail_start')}")
        end = tail.start + len(tail)
        if end < self.length:
            self.problem(2, f"the tail holds rows up to {end}, the record says {self.length}")
        for col in columns:
            have = tail.columns.get(col.name)
            if have is None:
                self.problem(2, "missing from the tail kept in the metadata store",
                             array=col.name)
            elif _wrong_type(have.dtype, tuple(have.shape[1:]), col):
                self.problem(2, f"the tail holds {have.dtype} {list(have.shape[1:])} per "
                             f"event, the descriptor gives {_show(col)}", array=col.name)
        return True

    async def _check_group(self, columns: list[_Column]) -> dict[str, AsyncArray[Any]]:
        meta = await self._get_json(f"{self.path}/zarr.json")
        if meta is None:
            if self.needed > 0:
                self.problem(2, f"the Zarr group {self.path} is missing (the record puts "
                             f"{self.needed} rows there)")
            return {}
        attrs = meta.get("attributes", {}) if isinstance(meta, dict) else {}
        if attrs.get("descriptor_uid") not in (None, self.desc_uid):
            self.problem(2, f"the Zarr group {self.path} belongs to descriptor "
                         f"{attrs.get('descriptor_uid')}")
        arrays: dict[str, AsyncArray[Any]] = {}

        async def one(col: _Column) -> None:
            arr = await self._open(col)
            if arr is not None:
                arrays[col.name] = arr

        async with anyio.create_task_group() as tg:
            for col in columns:
                tg.start_soon(one, col)
        return arrays

    async def _get_json(self, key: str) -> Any:
        try:
            buf = await self.store.get(key, prototype=default_buffer_prototype())
        except FileNotFoundError:
            return None
        except IO_ERRORS as exc:
            raise StorageError(f"reading {self.ctx.zarr_root.join(key)} failed: "
                               f"{brief(exc)}") from exc
        if buf is None:
            return None
        try:
            return json.loads(buf.to_bytes())
        except ValueError:
            return {}

    async def _open(self, col: _Column) -> AsyncArray[Any] | None:
        try:
            arr = await za.open_array(store=self.store, path=f"{self.path}/{col.name}",
                                      mode="r", zarr_format=3)
        except FileNotFoundError:
            if self.needed > 0:
                self.problem(2, f"missing from the Zarr group (the record puts "
                             f"{self.needed} rows there)", array=col.name)
            return None
        except _READ_ERRORS as exc:
            self.problem(2, f"its metadata cannot be read: {brief(exc)}", array=col.name)
            return None
        dtype = arr.dtype if isinstance(arr.dtype, np.dtype) else np.dtype(arr.dtype)
        ok = True
        if _wrong_type(dtype, tuple(arr.shape[1:]), col):
            self.problem(2, f"holds {dtype} {list(arr.shape[1:])} per event, the descriptor "
                         f"gives {_show(col)}", array=col.name)
            ok = False
        if int(arr.shape[0]) < self.needed:
            self.problem(2, f"has {arr.shape[0]} rows, the record puts {self.needed} there",
                         array=col.name)
            ok = False
        return arr if ok else None

    # -- level 3 (and the level-4 checks made while reading) ------------------------------
    async def _check_chunks(self, arrays: dict[str, AsyncArray[Any]]) -> None:
        if self.needed == 0 or SEQ_NUM not in arrays:
            self.written = self._tail_written()
            if self.needed > 0:  # no seq_num: which rows hold events is unknown
                self.written_mask = np.ones(self.needed, dtype=bool)
            return
        self.written_mask = await self._read_seq_num(arrays[SEQ_NUM])
        self.written = int(self.written_mask.sum()) + self._tail_written()
        self.samples = _sample(np.flatnonzero(self.written_mask), _SAMPLE_WINDOWS,
                               _SAMPLE_ROWS)
        limit = anyio.Semaphore(_ARRAYS_AT_ONCE)

        async def one(name: str, arr: AsyncArray[Any]) -> None:
            async with limit:
                await self._read_array(name, arr)

        async with anyio.create_task_group() as tg:
            for name, arr in arrays.items():
                if name != SEQ_NUM:
                    tg.start_soon(one, name, arr)

    def _tail_written(self) -> int:
        if self.tail is None:
            return 0
        return int((self.tail.columns[SEQ_NUM] > 0).sum())

    async def _present(self, name: str) -> set[str]:
        prefix = f"{self.path}/{name}/c"
        try:
            return {k async for k in self.store.list_prefix(prefix + "/")}
        except FileNotFoundError:
            return set()
        except IO_ERRORS as exc:
            raise StorageError(f"listing {self.ctx.zarr_root.join(prefix)} failed: "
                               f"{brief(exc)}") from exc

    def _windows(self, arr: AsyncArray[Any]) -> list[tuple[int, int, int]]:
        """(first chunk, start row, stop row) windows of whole chunks over the rows the
        arrays hold."""
        chunk = max(1, int(arr.chunks[0]))
        row = int(np.prod(arr.chunks[1:], dtype=np.int64)) * _itemsize(arr)
        per = max(1, _WINDOW_BYTES // max(1, row * chunk))
        out = []
        for first in range(0, -(-self.needed // chunk), per):
            a = first * chunk
            out.append((first, a, min(self.needed, (first + per) * chunk)))
        return out

    def _chunk_key(self, name: str, arr: AsyncArray[Any], index: int) -> str:
        coords = (index, *([0] * (len(arr.shape) - 1)))
        return f"{self.path}/{name}/{arr.metadata.encode_chunk_key(coords)}"

    async def _read_seq_num(self, arr: AsyncArray[Any]) -> Array:
        """Which rows below ``needed`` hold an event; level 4 also checks their seq_num.
        A chunk that is missing or does not decode counts as written where the record
        says events are (its other arrays are then checked there too)."""
        present = await self._present(SEQ_NUM)
        mask = np.zeros(self.needed, dtype=bool)
        chunk = max(1, int(arr.chunks[0]))
        lo = max(0, int(self.record.get("seq_num_min") or 1) - 1)

        def needed(index: int) -> bool:  # rows the record says events may be in
            return (index + 1) * chunk > lo

        for first, a, b in self._windows(arr):
            values = await self._read_window(SEQ_NUM, arr, present, first, a, b, needed)
            for i, (start, stop) in enumerate(_chunk_rows(first, a, b, chunk)):
                got = values.get(first + i)
                if got is None:
                    mask[max(start, lo):stop] = True
                    continue
                seq = np.asarray(got)
                mask[start:stop] = seq > 0
                if self.level >= 4:
                    self._check_positions(arr, first + i, start, seq)
        return mask

    def _check_positions(self, arr: AsyncArray[Any], index: int, start: int,
                         seq: Array) -> None:
        rows = np.flatnonzero(seq > 0)
        bad = rows[seq[rows] != rows + start + 1]
        if bad.size:
            p = int(bad[0]) + start
            self.problem(4, f"{bad.size} row(s) hold a seq_num that is not their position "
                         f"+ 1 (row {p} holds {int(seq[bad[0]])})", array=SEQ_NUM,
                         chunk=self._chunk_key(SEQ_NUM, arr, index))

    async def _read_array(self, name: str, arr: AsyncArray[Any]) -> None:
        assert self.written_mask is not None
        present = await self._present(name)
        chunk = max(1, int(arr.chunks[0]))
        mask = self.written_mask

        def needed(index: int) -> bool:
            return bool(mask[index * chunk:(index + 1) * chunk].any())

        for first, a, b in self._windows(arr):
            values = await self._read_window(name, arr, present, first, a, b, needed)
            for i, (start, stop) in enumerate(_chunk_rows(first, a, b, chunk)):
                got = values.get(first + i)
                if got is not None:
                    self._check_values(name, arr, first + i, start, np.asarray(got),
                                       mask[start:stop])

    async def _read_window(self, name: str, arr: AsyncArray[Any], present: set[str],
                           first: int, a: int, b: int,
                           needed: Callable[[int], bool]) -> dict[int, Array]:
        """Decoded chunks of one window by chunk index; missing or undecodable ones that
        hold events are reported and left out. One request for the window; chunk by
        chunk only when it fails, to name the chunk."""
        chunk = max(1, int(arr.chunks[0]))
        spans = _chunk_rows(first, a, b, chunk)
        ok: dict[int, tuple[int, int]] = {}
        for i, (start, stop) in enumerate(spans):
            index = first + i
            key = self._chunk_key(name, arr, index)
            if key in present:
                ok[index] = (start, stop)
            elif needed(index):
                self.problem(3, f"missing (rows {start}-{stop - 1} hold events)",
                             array=name, chunk=key)
        self.note(f"run {self.run_uid} stream {self.stream!r} {name} rows {b}/{self.needed}")
        if not ok:
            return {}
        try:
            whole = np.asarray(await arr.getitem(slice(a, b)))
            return {index: whole[start - a:stop - a] for index, (start, stop) in ok.items()}
        except _READ_ERRORS:
            pass
        out: dict[int, Array] = {}
        for index, (start, stop) in ok.items():
            try:
                out[index] = np.asarray(await arr.getitem(slice(start, stop)))
            except _READ_ERRORS as exc:
                self.problem(3, f"cannot be decoded: {brief(exc, 200)}", array=name,
                             chunk=self._chunk_key(name, arr, index))
        return out

    def _check_values(self, name: str, arr: AsyncArray[Any], index: int, start: int,
                      values: Array, written: Array) -> None:
        for p in self.samples[(self.samples >= start)
                              & (self.samples < start + len(values))].tolist():
            self.sampled.setdefault(name, {})[p] = values[p - start]
        if self.level < 4 or name not in (TIME, UID) or not written.any():
            return
        rows = values[written[:len(values)]]
        if name == UID:
            bad = int((rows == "").sum())
            what = "an empty uid"
        else:
            lo, hi = float(self.record["time_min"]), float(self.record["time_max"])
            bad = int((~((rows >= lo) & (rows <= hi))).sum())
            what = f"a time outside the record's range [{lo!r}, {hi!r}]"
        if bad:
            self.problem(4, f"{bad} written row(s) hold {what}", array=name,
                         chunk=self._chunk_key(name, arr, index))

    # -- level 4 -------------------------------------------------------------------------
    def _check_tail_values(self) -> None:
        tail = self.tail
        if tail is None:
            return
        seq = tail.columns[SEQ_NUM]
        rows = np.flatnonzero(seq > 0)
        bad = rows[seq[rows] != rows + tail.start + 1]
        if bad.size:
            self.problem(4, f"{bad.size} tail row(s) hold a seq_num that is not their "
                         "position + 1", array=SEQ_NUM)
        uids = tail.columns.get(UID)
        if uids is not None and rows.size and bool((uids[rows] == "").any()):
            self.problem(4, "a written tail row holds an empty uid", array=UID)

    def _check_top(self) -> None:
        """The record's length is the highest seq_num written: the rows must reach it."""
        tops = [self.tail.top] if self.tail is not None else []
        if self.written_mask is not None and self.written_mask.any():
            tops.append(int(np.flatnonzero(self.written_mask)[-1]))
        top = max(tops, default=-1)
        if top + 1 != self.length:
            self.problem(4, f"the record says the highest seq_num is {self.length}, the "
                         f"stored rows reach {top + 1}")

    async def _check_samples(self, columns: list[_Column]) -> None:
        """Sample rows read back through the catalog's reader equal what was read here
        (rows from the arrays, and from the tail)."""
        direct = {name: dict(vals) for name, vals in self.sampled.items()}
        positions = set(self.samples.tolist())
        # seq_num was checked row by row above: a written row holds its position + 1.
        direct[SEQ_NUM] = {p: np.int64(p + 1) for p in positions}
        if self.tail is not None:
            rows = np.flatnonzero(self.tail.columns[SEQ_NUM] > 0)
            for i in _sample(rows, 1, _SAMPLE_ROWS).tolist():
                positions.add(self.tail.start + i)
                for name, col in self.tail.columns.items():
                    direct.setdefault(name, {})[self.tail.start + i] = col[i]
        if not positions:
            return
        if any(p.level < 4 for p in self.problems):
            return  # the catalog would read the chunks reported above
        keys = list(self.descriptor.get("data_keys", {}))
        try:
            opened = await self.ctx.arrays.open_arrays(self.record, [c.name for c in columns])
            for a, b in _windows_of(sorted(positions)):
                rows_read = await self.ctx.arrays.read_rows(self.record, keys, start=a,
                                                            stop=b, arrays=opened)
                got = _row_values(rows_read)
                for p in range(a, b):
                    if p in positions:
                        self._compare(p, got.get(p, {}), direct)
        except (BluestreamError, *_READ_ERRORS) as exc:
            self.problem(4, f"reading sample rows through the catalog failed: {brief(exc)}")

    def _compare(self, p: int, got: dict[str, Any], direct: dict[str, dict[int, Any]]) -> None:
        for name, values in sorted(direct.items()):
            if p not in values:
                continue
            if name not in got:
                if name == SEQ_NUM:
                    self.problem(4, f"row {p} holds an event, the catalog does not read it")
                    return
                continue
            if not _same(np.asarray(values[p]), np.asarray(got[name])):
                self.problem(4, f"row {p} reads back through the catalog as "
                             f"{_brief_value(got[name])}, the stored value is "
                             f"{_brief_value(values[p])}", array=name)


# -- small pure helpers ---------------------------------------------------------------------
def _chunk_rows(first: int, a: int, b: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, b)) for s in range(a, b, chunk)]


def _itemsize(arr: AsyncArray[Any]) -> int:
    dtype = arr.dtype
    if getattr(dtype, "kind", "") in "TO":
        return _STRING_ITEM_BYTES
    return int(np.dtype(dtype).itemsize)


def _sample(positions: Array, windows: int, rows: int) -> Array:
    """``windows`` runs of ``rows`` consecutive written positions, spread evenly from the
    first to the last (deterministic)."""
    if positions.size <= windows * rows:
        return positions.astype(np.int64)
    starts = np.unique(np.linspace(0, positions.size - rows, windows).round().astype(np.int64))
    idx = np.unique((starts[:, None] + np.arange(rows)).ravel())
    return positions[idx].astype(np.int64)


def _windows_of(positions: list[int]) -> list[tuple[int, int]]:
    """[start, stop) ranges covering sorted positions, neighbours merged."""
    out: list[tuple[int, int]] = []
    for p in positions:
        if out and p <= out[-1][1] + _SAMPLE_ROWS:
            out[-1] = (out[-1][0], p + 1)
        else:
            out.append((p, p + 1))
    return out


def _wrong_type(dtype: np.dtype[Any], shape: tuple[int, ...], col: _Column) -> bool:
    strings = (dtype.kind == "T", col.dtype is not None and col.dtype.kind == "T")
    if col.dtype is None:
        return strings[0] or shape != col.shape
    return strings[0] != strings[1] or (not strings[0] and dtype != col.dtype) \
        or shape != col.shape


def _show(col: _Column) -> str:
    return f"{col.dtype if col.dtype is not None else 'a numeric dtype'} {list(col.shape)}"


def _row_values(rows: Any) -> dict[int, dict[str, Any]]:
    """What the catalog's reader returned, by position and array name."""
    out: dict[int, dict[str, Any]] = {}
    for i, p in enumerate(rows.positions.tolist()):
        row: dict[str, Any] = {SEQ_NUM: rows.seq_num[i], TIME: rows.time[i], UID: rows.uid[i]}
        for prefix, group in (("data", rows.data), ("timestamps", rows.timestamps),
                              ("filled", rows.filled)):
            for key, values in group.items():
                row[f"{prefix}/{key}"] = values[i]
        out[int(p)] = row
    return out


def _same(a: Array, b: Array) -> bool:
    if a.shape != b.shape:
        return False
    if a.dtype.kind in "fc" and b.dtype.kind in "fc":
        return bool(np.array_equal(a, b, equal_nan=True))
    return bool(np.array_equal(a, b))


def _brief_value(value: Any) -> str:
    text = np.array2string(np.asarray(value), threshold=6, max_line_width=60) \
        if np.ndim(value) else repr(value.item() if hasattr(value, "item") else value)
    return text if len(text) <= 80 else text[:77] + "..."
