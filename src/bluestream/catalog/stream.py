"""One event stream of a run, read into an ``xarray.Dataset`` (eager or dask-backed).

A read touches the metadata store once for the stream's descriptors and ``event_stream``
records (two queries, sent together), then reads every Zarr array of the stream
concurrently; external references cost one bulk query per document kind. No per-event
database round trips.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from bluestream.catalog._tasks import task_group
from bluestream.catalog.arrays import Rows
from bluestream.catalog.context import CatalogContext
from bluestream.catalog.dataset import Part, build_dataset, decode_json_column, to_str
from bluestream.catalog.fill import LoadPlan, StreamSlice, expected_shape, stack_values
from bluestream.catalog.replay import follow
from bluestream.catalog.summary import field_summary
from bluestream.layout import (
    SEQ_NUM,
    TIME,
    UID,
    FieldSpec,
    column_names,
    data_path,
    reader_specs,
    timestamps_path,
)

if TYPE_CHECKING:
    import xarray

__all__ = ["AsyncEventStream", "stream_keys"]

Array = NDArray[Any]
Doc = dict[str, Any]
#: Events per dask block of lazily filled external data.
_FILL_BLOCK_EVENTS = 64


def is_stream_key(data_key: Mapping[str, Any]) -> bool:
    return str(data_key.get("external") or "").startswith("STREAM:")


def stream_keys(descriptor: Mapping[str, Any]) -> list[str]:
    return [k for k, dk in descriptor.get("data_keys", {}).items() if is_stream_key(dk)]


class AsyncEventStream:
    """The events of one stream (all its descriptors) of one run."""

    def __init__(self, ctx: CatalogContext, run_uid: str, name: str) -> None:
        self._ctx = ctx
        self.run_uid = run_uid
        self.name = name

    def __repr__(self) -> str:
        return f"<EventStream {self.name!r} of run {self.run_uid!r}>"

    async def _layout(self) -> tuple[list[Doc], dict[str, Doc]]:
        """This stream's descriptors (oldest first) and event_stream records, fresh."""
        ctx = self._ctx
        await ctx.ensure_open()
        found: dict[str, Any] = {}

        async def descriptors() -> None:
            found["d"] = await ctx.call("read descriptors", ctx.store.find, "descriptor",
                                        run_start=self.run_uid)

        async def records() -> None:
            found["r"] = await ctx.call("read event_stream", ctx.store.streams, self.run_uid)

        async with task_group() as tg:
            tg.start_soon(descriptors)
            tg.start_soon(records)
        descs = [d for d in found["d"] if d.get("name", "primary") == self.name]
        descs.sort(key=lambda d: (d.get("time", 0.0), d["uid"]))
        recs = {str(r["descriptor_uid"]): r for r in found["r"]
                if r.get("stream_name", self.name) == self.name}
        return descs, recs

    async def descriptors(self) -> list[Doc]:
        return (await self._layout())[0]

    async def row_reader(self, key: str
                         ) -> tuple[int, Callable[[int, int], Awaitable[Array]]] | None:
        """``(n, read)`` where ``await read(start, stop)`` gives the values of ``key`` in
        rows ``[start, stop)`` of :meth:`read` (of its first ``n`` rows, as stored now),
        straight from the key's array: for a stream of one descriptor, a plain numeric
        key and no position left unwritten, where read()'s rows are the array's rows.
        None otherwise (then read() or to_dask() is the way). Reading a slice this way
        costs what reading it from Zarr costs (its chunks concurrently, into one array)."""
        descs, recs = await self._layout()
        if len(descs) != 1:
            return None
        desc = descs[0]
        record = recs.get(desc["uid"])
        data_key = desc.get("data_keys", {}).get(key)
        if record is None or data_key is None or stream_keys(desc) \
                or not _plain_numeric(reader_specs(desc)[key]):
            return None  # (with keys of stream resources, rows come from stream datums)
        arrays = await self._ctx.arrays.open_arrays(record, [SEQ_NUM, data_path(key)])
        if data_path(key) not in arrays:
            return None
        positions = await self._ctx.arrays.written_positions(record)
        n = len(positions)
        if n and int(positions[-1]) != n - 1:  # a hole: rows and positions differ
            return None

        async def read(start: int, stop: int) -> Array:
            rows = await self._ctx.arrays.read_rows(
                record, [key], start=start, stop=min(stop, n), arrays=arrays,
                timestamps=False)
            return rows.data[key]
        return n, read

    async def state_token(self) -> tuple[Any, ...] | None:
        """A value that two calls give equal only if the metadata store holds the same
        descriptors and ``event_stream`` records (lengths, tails, ...) for this stream:
        what a reader built from the stream can be reused while it stays equal. None for
        a stream with keys of stream resources (their rows come from stream datums, which
        the records do not count). A hole below a record's length filled later does not
        change it: callers that need that must not rely on the token alone."""
        descs, recs = await self._layout()
        if any(is_stream_key(dk) for d in descs for dk in d.get("data_keys", {}).values()):
            return None
        parts: list[Any] = [d["uid"] for d in descs]
        for uid in sorted(recs):
            fields = []
            for name, value in sorted(recs[uid].items()):
                if name == "_id":
                    continue
                if isinstance(value, bytes | bytearray | memoryview):
                    value = hashlib.blake2b(bytes(value), digest_size=16).hexdigest()
                fields.append((name, repr(value)))
            parts.append((uid, tuple(fields)))
        return tuple(parts)

    async def length(self) -> int:
        """Number of events stored so far (written rows, not the highest seq_num)."""
        descs, recs = await self._layout()
        total = 0
        for d in descs:
            rec = recs.get(d["uid"])
            if rec is not None:
                total += len(await self._ctx.arrays.written_positions(rec))
        return total

    # -- reading ------------------------------------------------------------------------
    async def read(self, fields: Sequence[str] | None = None, *, fill: bool = True,
                   uids: bool = True) -> xarray.Dataset:
        """All events stored so far, in memory. ``fill=False`` keeps external data as
        references (datum ids; stream datum uids for stream resources). ``uids=False``
        leaves out the ``uid`` coordinate (the event uids: 36-character strings, the
        costliest column of a scalar stream to read; ~40 % of reading 100,000 events
        of 10 fields)."""
        return await self._dataset(fields, fill=fill, lazy=False, uids=uids)

    async def to_dask(self, fields: Sequence[str] | None = None, *, fill: bool = True,
                      uids: bool = True) -> xarray.Dataset:
        """Like :meth:`read`, with data variables as dask arrays over the Zarr chunks
        (external data loaded by handlers when computed)."""
        return await self._dataset(fields, fill=fill, lazy=True, uids=uids)

    async def timestamps(self, fields: Sequence[str] | None = None, *, lazy: bool = False,
                         uids: bool = True) -> xarray.Dataset:
        """The events' timestamps, one float64 variable per data key (what each event's
        ``timestamps`` held), with :meth:`read`'s ``time`` coordinate: the rows line up
        with :meth:`read`'s. ``lazy`` gives dask arrays. Keys of stream resources (no
        events) have none. ``uids`` as for :meth:`read`."""
        return await self._dataset(fields, fill=False, lazy=lazy, timestamps=True,
                                   uids=uids)

    async def _dataset(self, fields: Sequence[str] | None, *, fill: bool,
                       lazy: bool, timestamps: bool = False,
                       uids: bool = True) -> xarray.Dataset:
        descs, recs = await self._layout()
        wanted = None if fields is None else list(dict.fromkeys(fields))
        if wanted is not None:
            known = {k for d in descs for k in d.get("data_keys", {})}
            unknown = [f for f in wanted if f not in known]
            if unknown:
                raise KeyError(f"stream {self.name!r} of run {self.run_uid!r} has no data key "
                               f"{unknown[0]!r}; its keys are {sorted(known)}")
        parts: list[Part] = [Part({}, np.zeros(0, np.int64), np.zeros(0), np.zeros(0, "<U1"))
                             for _ in descs]

        async def one(i: int, desc: Doc) -> None:
            record = recs.get(desc["uid"])
            parts[i] = (await self._timestamps_part(desc, record, wanted, lazy=lazy,
                                                    uids=uids)
                        if timestamps else
                        await self._part(desc, record, wanted, fill=fill, lazy=lazy,
                                         uids=uids))

        async with task_group() as tg:
            for i, desc in enumerate(descs):
                tg.start_soon(one, i, desc)
        keys: dict[str, Mapping[str, Any]] = {}
        for desc in descs:
            for key, dk in desc.get("data_keys", {}).items():
                if (wanted is None or key in wanted) and key not in keys:
                    keys[key] = dk
        if wanted is not None:
            keys = {k: keys[k] for k in wanted if k in keys}
        if timestamps:  # seconds since the epoch: none of the data key's attributes
            keys = {k: {} for k, dk in keys.items() if not is_stream_key(dk)}
        attrs = {"stream_name": self.name, "run_start": self.run_uid,
                 "descriptors": [d["uid"] for d in descs]}
        return build_dataset(parts, keys, attrs=attrs, uids=uids)

    async def _part(self, desc: Doc, record: Doc | None, wanted: Sequence[str] | None, *,
                    fill: bool, lazy: bool, uids: bool = True) -> Part:
        ctx = self._ctx
        data_keys: dict[str, Any] = desc.get("data_keys", {})
        keys = [k for k in data_keys if wanted is None or k in wanted]
        specs = reader_specs(desc)
        skeys = [k for k in keys if is_stream_key(data_keys[k])]
        zkeys = [k for k in keys if k not in skeys]
        part = Part(desc, np.zeros(0, np.int64), np.zeros(0), np.zeros(0, "<U1"))
        if record is not None:
            names = [n for n in column_names(zkeys, timestamps=False) if uids or n != UID]
            arrays = await ctx.arrays.open_arrays(record, names)
            lazy_keys = [k for k in zkeys if lazy and _plain_numeric(specs[k])
                         and data_path(k) in arrays]
            eager = [k for k in zkeys if k not in lazy_keys]
            rows = await ctx.arrays.read_rows(
                record, eager, timestamps=False,
                arrays={n: a for n, a in arrays.items()
                        if n.partition("/")[2] not in lazy_keys})
            part = Part(desc, rows.seq_num, rows.time, _uids(rows, uids))
            for key in lazy_keys:
                part.columns[key] = _lazy_column(ctx, arrays[data_path(key)], rows)
            for key in eager:
                if key in rows.data:
                    part.columns[key] = await self._column(key, data_keys[key], specs[key],
                                                           rows, fill=fill, lazy=lazy)
        # The rows of a stream with keys of stream resources are those of all its stream
        # datums, whichever keys are asked for: read(fields) gives read()'s rows.
        row_keys = [k for k, dk in data_keys.items() if is_stream_key(dk)]
        if row_keys:
            part = await self._stream_columns(part, desc, skeys, fill=fill, rows_of=row_keys)
        if len(part) == 0:  # no events yet: empty variables, typed as they will be
            for key in keys:
                if key not in part.columns:
                    part.columns[key] = _empty_column(specs[key], data_keys[key], fill=fill)
        return part

    async def _timestamps_part(self, desc: Doc, record: Doc | None,
                               wanted: Sequence[str] | None, *, lazy: bool,
                               uids: bool = True) -> Part:
        ctx = self._ctx
        keys = [k for k, dk in desc.get("data_keys", {}).items()
                if (wanted is None or k in wanted) and not is_stream_key(dk)]
        part = Part(desc, np.zeros(0, np.int64), np.zeros(0), np.zeros(0, "<U1"))
        if record is not None:
            arrays = await ctx.arrays.open_arrays(
                record, [SEQ_NUM, TIME, *([UID] if uids else []),
                         *(timestamps_path(k) for k in keys)])
            eager = {n: a for n, a in arrays.items()
                     if not (lazy and n.startswith("timestamps/"))}
            rows = await ctx.arrays.read_rows(record, keys, timestamps=True, arrays=eager)
            part = Part(desc, rows.seq_num, rows.time, _uids(rows, uids))
            for key in keys:
                if lazy and timestamps_path(key) in arrays:
                    part.columns[key] = _lazy_column(ctx, arrays[timestamps_path(key)], rows)
                elif key in rows.timestamps:
                    part.columns[key] = np.asarray(rows.timestamps[key], dtype=np.float64)
        for key in keys:
            if key not in part.columns and len(part) == 0:
                part.columns[key] = np.zeros(0)
        return part

    async def _column(self, key: str, data_key: Mapping[str, Any], spec: FieldSpec,
                      rows: Rows, *, fill: bool, lazy: bool) -> Any:
        values = rows.data[key]
        if spec.external:
            if not fill:
                return to_str(values)
            if lazy:
                return await self._lazy_fill(values, data_key)
            return await self._ctx.resolver.fill(values, data_key)
        if spec.variable:
            return decode_json_column(values)
        return to_str(values)

    async def _lazy_fill(self, ids: Array, data_key: Mapping[str, Any]) -> Any:
        """A dask array whose blocks load their datums with the handlers when computed."""
        import dask.array as da
        from dask.delayed import delayed

        resolver = self._ctx.resolver
        id_list = [str(i) for i in ids.tolist()]
        datums, resources = await resolver.documents(id_list)
        resolver.plans(id_list, datums, resources)  # raises HandlerNotFound now, not later
        want = expected_shape(data_key)
        dtype = _known_dtype(data_key)
        if not id_list or want is None:
            return await resolver.fill(ids, data_key)  # nothing to defer / ragged: eager
        if dtype is None:  # no dtype_numpy: the first value tells
            first = await resolver.fill(ids[:1], data_key)
            if first.dtype == object or first.shape[1:] != want:
                return await resolver.fill(ids, data_key)
            dtype = first.dtype
        blocks = []
        for start in range(0, len(id_list), _FILL_BLOCK_EVENTS):
            block_ids = id_list[start:start + _FILL_BLOCK_EVENTS]
            block_plans = resolver.plans(block_ids, datums, resources)
            task = delayed(_load_block, pure=True)(block_plans, block_ids, dict(data_key))
            blocks.append(da.from_delayed(  # type: ignore[no-untyped-call]
                task, shape=(len(block_ids), *want), dtype=dtype))
        return da.concatenate(blocks, axis=0)  # type: ignore[no-untyped-call]

    async def _stream_columns(self, part: Part, desc: Doc, skeys: Sequence[str], *,
                              fill: bool, rows_of: Sequence[str]) -> Part:
        """Add keys backed by stream_resource/stream_datum (their rows may have no
        event at all: then time is NaN and uid empty); the rows are those of the keys
        ``rows_of`` (every such key of the descriptor) and of the events."""
        resolver = self._ctx.resolver
        by_key, resources = await resolver.stream_slices(self.run_uid, desc["uid"])
        seqs = [part.seq_num]
        for key in rows_of:
            for s in by_key.get(key, []):
                seqs.append(np.arange(s.seq_start, s.seq_stop, dtype=np.int64))
        all_seq = np.unique(np.concatenate(seqs))
        if not np.array_equal(all_seq, part.seq_num):
            part = _realign(part, all_seq)
        for key in skeys:
            slices = by_key.get(key, [])
            if not slices:
                continue
            dk = desc["data_keys"][key]
            if fill:
                values = await resolver.fill_stream(slices, resources, dk)
            else:
                values = _stream_refs(slices)
            where = np.searchsorted(all_seq, np.concatenate(
                [np.arange(s.seq_start, s.seq_stop, dtype=np.int64) for s in slices]))
            column = _missing_like(len(all_seq), values)
            column[where] = values
            part.columns[key] = column
        return part

    async def events_async(self, *, poll_interval: float | None = None
                           ) -> AsyncIterator[Doc]:
        """Event pages of this stream as they are stored, from the first; ends after
        the run's stop once all were yielded."""
        async for name, doc in follow(self._ctx, self.run_uid, stream=self.name,
                                      poll_interval=poll_interval):
            if name == "event_page":
                yield doc

    # -- statistical summaries ----------------------------------------------------------
    async def summary(self, field: str, points: int | None = None) -> xarray.Dataset:
        """Statistical summaries of one numeric field, read without reading the field.

        A scalar field (number, integer, boolean) is summarised per window of
        ``bluestream.layout.SUMMARY_WINDOW`` (256) rows, as stored at ingest: dimension
        ``window``, variables ``min``, ``mean``, ``max`` (NaN values left out; NaN when
        a window holds no number), ``count`` (events stored there, NaNs included) and
        ``nan_count``; coordinates ``seq_num`` (the first seq_num a point covers) and
        ``seq_num_stop`` (one past the last). With ``points`` (an upper bound), adjacent
        windows are merged (counts added, min of mins, max of maxes, means weighted by
        how many numbers each was taken of); ``attrs["windows_per_point"]`` says how
        many. A window that holds no event has count 0 and NaN statistics.

        An array field (an image) is summarised per event: dimension ``time``,
        variables ``min``, ``max``, ``mean`` and ``sum`` of each event's value (numpy's:
        a NaN in a value makes all four NaN), coordinates ``time`` and ``seq_num``, as
        :meth:`read` has them; ``points`` merges adjacent events in the same way.

        Rows the summary arrays do not cover are summarised from the rows themselves,
        so the answer is the rows' own: the stream's newest rows (its tail, kept in the
        metadata store until they fill a block) and groups written by a bluestream
        without summaries (read in full: as slow as :meth:`read` of the field). A stream
        of several descriptors is summarised descriptor after descriptor (oldest first;
        events in time order for array fields).

        KeyError when no descriptor of the stream has ``field``; TypeError when it is
        not numeric (strings, JSON text, external references, complex numbers).
        """
        descs, recs = await self._layout()
        return await field_summary(self._ctx.arrays, descs, recs, field, points,
                                   {"stream_name": self.name, "run_start": self.run_uid})

    # -- configuration ------------------------------------------------------------------
    async def config(self) -> dict[str, xarray.Dataset]:
        """Per device (object name): its configuration readings, one row per event
        (databroker's ``stream.config[obj]``)."""
        descs, recs = await self._layout()
        objects: dict[str, dict[str, Any]] = {}
        for desc in descs:
            for obj, cfg in (desc.get("configuration") or {}).items():
                objects.setdefault(obj, {}).update(cfg.get("data_keys") or {})
        times: list[Rows | None] = []
        for desc in descs:
            rec = recs.get(desc["uid"])
            times.append(None if rec is None else
                         await self._ctx.arrays.read_rows(rec, [], timestamps=False))
        out: dict[str, xarray.Dataset] = {}
        for obj, keys in objects.items():
            parts = []
            for desc, rows in zip(descs, times, strict=True):
                if rows is None:
                    continue
                cfg = (desc.get("configuration") or {}).get(obj) or {}
                part = Part(desc, rows.seq_num, rows.time, to_str(rows.uid))
                for key, value in (cfg.get("data") or {}).items():
                    part.columns[key] = _repeat(value, len(rows))
                parts.append(part)
            out[obj] = build_dataset(parts, keys, attrs={"object_name": obj})
        return out


def _uids(rows: Rows, wanted: bool) -> Array:
    """The rows' event uids as read() gives them, or (not wanted: not read) empty ones."""
    return to_str(rows.uid) if wanted else np.full(len(rows.seq_num), "", dtype="<U1")


def _plain_numeric(spec: FieldSpec) -> bool:
    return not spec.external and not spec.variable and spec.kind != "string"


def _known_dtype(data_key: Mapping[str, Any]) -> np.dtype[Any] | None:
    raw = data_key.get("dtype_numpy")
    if isinstance(raw, str) and raw:
        try:
            return np.dtype(raw)
        except TypeError:
            return None
    return None


def _lazy_column(ctx: CatalogContext, arr: Any, rows: Rows) -> Any:
    """A dask array over one Zarr array, restricted to the rows that were written."""
    import dask.array as da

    sync = ctx.arrays.sync_array(arr)
    full = da.from_array(  # type: ignore[no-untyped-call]
        sync, chunks=sync.chunks, name=False, asarray=True, lock=False)
    n = int(rows.positions[-1]) + 1 if len(rows) else 0
    if len(rows) == n:  # no holes: a plain slice keeps the chunk structure
        return full[:n]
    return full[rows.positions]


def _load_block(plans: list[LoadPlan], ids: list[str], data_key: dict[str, Any]) -> Array:
    loaded: dict[str, Any] = {}
    for plan in plans:
        loaded.update(plan.load())
    return stack_values([loaded[i] for i in ids], data_key)


def _realign(part: Part, all_seq: Array) -> Part:
    """``part`` extended to the rows ``all_seq`` (a superset of its seq_nums)."""
    where = np.searchsorted(all_seq, part.seq_num)
    n = len(all_seq)
    time = np.full(n, np.nan)
    time[where] = part.time
    uid = np.full(n, "", dtype=object)
    uid[where] = part.uid
    out = Part(part.descriptor, all_seq, time, uid.astype(str))
    for key, col in part.columns.items():
        arr = np.asarray(col)
        new = _missing_like(n, arr)
        new[where] = arr
        out.columns[key] = new
    return out


def _missing_like(n: int, values: Any) -> Array:
    arr = np.asarray(values)
    shape = (n, *arr.shape[1:])
    if arr.dtype.kind in "fc":
        return np.full(shape, np.nan, dtype=arr.dtype)
    if arr.dtype.kind in "iub":
        return np.full(shape, np.nan)
    if arr.dtype.kind == "U":
        return np.full(shape, "", dtype=arr.dtype)
    return np.full(shape, None, dtype=object)


def _stream_refs(slices: Sequence[StreamSlice]) -> Array:
    total = sum(s.seq_stop - s.seq_start for s in slices)
    out = np.empty(total, dtype=object)
    i = 0
    for s in slices:
        n = s.seq_stop - s.seq_start
        out[i:i + n] = s.stream_datum
        i += n
    return out.astype(str) if total else np.zeros(0, dtype="<U1")


def _repeat(value: Any, n: int) -> Array:
    arr = np.asarray(value)
    if arr.dtype == object:
        out = np.empty(n, dtype=object)
        for i in range(n):
            out[i] = value
        return out
    return np.broadcast_to(arr, (n, *arr.shape)).copy() if n else \
        np.zeros((0, *arr.shape), dtype=arr.dtype)



def _empty_column(spec: FieldSpec, data_key: Mapping[str, Any], *, fill: bool) -> Array:
    if spec.external:
        return stack_values([], data_key) if fill else np.zeros(0, dtype="<U1")
    if spec.variable:
        return np.zeros(0, dtype=object)
    if spec.kind == "string":
        return np.zeros(0, dtype="<U1")
    return np.zeros((0, *spec.shape), dtype=spec.dtype or np.float64)
