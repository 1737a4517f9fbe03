"""Event arrays in Zarr v3: one group per run and descriptor, written by position.

The layout (paths, dtypes, chunking) is :mod:`bluestream.layout`'s. Row ``i`` holds the
event with ``seq_num == i + 1``; a replay writes the same bytes to the same places, so
storage is idempotent (DESIGN I1, I2).

Arrays only grow. Each page is written under a lock of its descriptor, with the shape
re-read inside it. On a local root the lock is an advisory file lock (one host; see
:mod:`bluestream.storage.local_store`), so two daemons that both write one descriptor (a
run whose events a producer spread over partitions) neither shrink an array nor lose
each other's rows to a chunk rewrite. On an object store (``s3://``) the lock is held in
the process only: writers on different hosts never share a descriptor because a run's
documents stay on one partition and a partition has one owner at a time (see the
README's "Several hosts, one object store").

Durability: on a local root every write goes through one
:class:`~bluestream.storage.local_store.SyncingLocalStore` and :meth:`ZarrEventStore.sync`
makes a batch's writes durable before its metadata and offsets (DESIGN I1); on an object
store every PUT is acknowledged before :meth:`ZarrEventStore.write_page` returns.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any, cast

import anyio
import numpy as np
import zarr
import zarr.api.asynchronous as za
from zarr.abc.store import Store
from zarr.core.array import AsyncArray
from zarr.core.group import AsyncGroup
from zarr.errors import ContainsArrayError, ContainsGroupError

from bluestream.errors import Reason, StorageError, ValidationError, first_error
from bluestream.layout import (
    EVENT_SUMMARY,
    SCHEMA_VERSION,
    SEQ_NUM,
    SUMMARY,
    Column,
    FieldSpec,
    Page,
    data_path,
    descriptor_path,
    stored_columns,
    summary_columns,
    summary_length,
)
from bluestream.storage import array_meta, chunk_writer, tail
from bluestream.storage.base import StreamUpdate
from bluestream.storage.local_store import (
    SyncingLocalStore,
    lock_stripe,
    metadata_keys,
    stripe_lock,
    sync_written,
)
from bluestream.storage.summaries import Reader, WindowPlan, event_stats, window_summaries
from bluestream.storage.zarr_root import ObjectStoreError, ZarrRoot, brief

__all__ = ["ZarrEventStore"]

_MAX_OPEN_ARRAYS = 4_096
#: Object stores: the descriptor locks of this process, by (event loop, root, stripe),
#: shared by every ZarrEventStore on the root (64 stripes a root at most).
_PROCESS_LOCKS: dict[tuple[int, str, int], anyio.Lock] = {}

def _contiguous_runs(positions: np.ndarray) -> Iterator[tuple[int, int, int]]:
    """Split sorted unique positions into (first_index, start_pos, stop_pos) runs."""
    if positions.size == 0:
        return
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [positions.size]))
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        yield s, int(positions[s]), int(positions[e - 1]) + 1


class ZarrEventStore:
    """Writes and reads per-descriptor event arrays under one root directory.

    ``fsync=False`` makes :meth:`sync` a no-op: faster, and still safe against a crash
    of the process (the page cache survives it), but not against a power loss or a
    kernel crash, after which committed events may be missing from the arrays.
    """

    def __init__(self, root: ZarrRoot | Path | str, *, fsync: bool = True,
                 tail_rows: int = tail.DEFAULT_BLOCK) -> None:
        self.root = ZarrRoot.parse(root)
        self.fsync = fsync
        #: Rows per block kept in the metadata store before they move to the arrays
        #: (:mod:`bluestream.storage.tail`); 0 writes every row to the arrays at once.
        self.tail_rows = tail_rows
        # The one store every group and array is opened with, so that every write to a
        # local root is recorded for :meth:`sync`.
        self._local = SyncingLocalStore(self.root.local) if self.root.local else None
        self._store: Store = self._local if self._local is not None else \
            self.root.object_store()
        # Event arrays are written densely by position: zarr's check of every written
        # chunk against the fill value (np.array_equal on the event loop) never saves a
        # write here and cost ~18% of an image ingest.
        zarr.config.set({"array.write_empty_chunks": True})
        # Open array handles, most recently used last; bounded because runs that never
        # send a stop (aborted, or stopped on another daemon) would otherwise pile up.
        self._arrays: OrderedDict[tuple[str, str], AsyncArray[Any]] = OrderedDict()

    # -- durability -------------------------------------------------------------------
    @property
    def unsynced(self) -> int:
        """Files and directories recorded for the next :meth:`sync` (one batch's worth)."""
        return self._local.pending() if self._local is not None else 0

    @property
    def store(self) -> Store:
        """The zarr store every array is written through."""
        return self._store

    async def sync(self) -> None:
        """Make everything written since the last call durable (see
        :mod:`bluestream.storage.local_store`). Called once per batch, before the
        metadata that points at the arrays is written and before offsets are committed.
        """
        if self._local is None:
            return  # an object store: every PUT was acknowledged when write_page returned
        if self.fsync:
            await sync_written(self._local, self._local.root)
        else:
            self._local.take()  # nothing to sync: keep the record bounded

    # -- writing ----------------------------------------------------------------------
    @asynccontextmanager
    async def locked(self, paths: Iterable[str]) -> AsyncIterator[None]:
        """Hold the locks of these descriptor groups (a batch's; see
        :func:`~bluestream.storage.local_store.descriptor_lock`) for a read-modify-write
        that spans the arrays and the metadata store (the tail). Pages written inside
        are written with ``lock=False``."""
        async with AsyncExitStack() as stack:
            try:
                for stripe in sorted({lock_stripe(p) for p in paths}):  # one order
                    await stack.enter_async_context(self._stripe_lock(stripe))
            except OSError as exc:  # the Zarr root is gone, full, read-only ...: an outage
                raise StorageError(f"locking descriptor groups under {self.root} failed: "
                                   f"{exc}") from exc
            yield

    def _stripe_lock(self, stripe: int) -> AbstractAsyncContextManager[Any]:
        if self._local is not None:
            return stripe_lock(self._local.root, stripe)
        key = (id(asyncio.get_running_loop()), str(self.root), stripe)
        lock = _PROCESS_LOCKS.get(key)
        if lock is None:
            lock = _PROCESS_LOCKS[key] = anyio.Lock()
        return lock

    async def write_page(self, tenant: str, run_start: str, descriptor: Mapping[str, Any],
                         specs: Mapping[str, FieldSpec], page: Page, *,
                         lock: bool = True) -> StreamUpdate:
        """Write one page by position. Later rows with the same seq_num win.
        ``lock=False``: the caller holds the descriptor's lock (:meth:`locked`)."""
        if len(page) == 0:
            raise ValueError("empty page")
        path = descriptor_path(tenant, run_start, str(descriptor["uid"]))
        order, positions = tail.last_wins_order(page.seq_num)
        columns = stored_columns(specs, page)
        summaries = summary_columns(specs, page)
        values = _column_values(page, order)
        needed = int(positions[-1]) + 1
        needs = [summary_length(needed) if _windowed(c) else needed
                 for c in columns + summaries]
        try:
            async with self._stripe_lock(lock_stripe(path)) if lock else nullcontext():
                arrays = await self._arrays_of(path, descriptor, run_start, columns,
                                               needs[:len(columns)])
                self._check_dtypes(arrays, columns)
                # Only once the page's columns fit: a refused page creates nothing.
                extra = await self._arrays_of(path, descriptor, run_start, summaries,
                                              needs[len(columns):])
                self._check_dtypes(extra, summaries)
                arrays = await self._grow(path, arrays + extra, needs)
                await _write_columns(arrays, columns + summaries, positions, values)
        except (OSError, ObjectStoreError, zarr.errors.BaseZarrError) as exc:
            raise StorageError(f"writing Zarr group {self.root.join(path)} failed: "
                               f"{brief(exc)}") from exc
        except BaseExceptionGroup as group:  # the concurrent array writes above failed
            io, rest = group.split((OSError, ObjectStoreError, zarr.errors.BaseZarrError))
            if io is None or rest is not None:
                raise
            raise StorageError(f"writing Zarr group {self.root.join(path)} failed: "
                               f"{brief(first_error(io))}") from group
        return stream_update(tenant, run_start, descriptor, specs, page)

    async def _arrays_of(self, path: str, descriptor: Mapping[str, Any], run_start: str,
                         columns: list[Column], needs: list[int]) -> list[AsyncArray[Any]]:
        """The descriptor's arrays, from the handle cache when all are there (no store
        access at all), else through its group (created if missing; on stores with
        synchronous calls, arrays created here are made ``needs`` rows long at once, as
        :meth:`_grow` would; elsewhere :meth:`_grow` does it next)."""
        cached = [self._arrays.get((path, col.name)) for col in columns]
        if all(arr is not None for arr in cached):
            for col in columns:
                self._arrays.move_to_end((path, col.name))
            return cast(list[AsyncArray[Any]], cached)
        attrs: dict[str, Any] = {
            "descriptor_uid": str(descriptor["uid"]), "run_start": run_start,
            "stream_name": str(descriptor.get("name", "primary")),
            "schema_version": SCHEMA_VERSION}
        if array_meta.supported(self._store):
            def open_sync() -> list[AsyncArray[Any]]:
                created = array_meta.ensure_group(self._store, path, attrs)
                return array_meta.open_or_create(self._store, path, columns, needs,
                                                 created=created)
            arrays = await anyio.to_thread.run_sync(open_sync)
            for col, arr in zip(columns, arrays, strict=True):
                self._remember(path, col, arr)
            return arrays
        group = await self._group(path, attrs)
        return [await self._array(group, path, col) for col in columns]

    async def _group(self, path: str, attrs: dict[str, Any]) -> AsyncGroup:
        try:
            return await za.open_group(store=self._store, path=path, mode="a",
                                       zarr_format=3, attributes=attrs)
        except ContainsArrayError as exc:
            raise StorageError(f"{path} is an array, expected a group") from exc

    async def _array(self, group: AsyncGroup, path: str, col: Column) -> AsyncArray[Any]:
        key = (path, col.name)
        cached = self._arrays.get(key)
        if cached is not None:
            self._arrays.move_to_end(key)
            return cached
        try:
            arr = await group.getitem(col.name)
        except KeyError:
            chunk = col.chunk_events
            try:
                arr = await group.create_array(
                    col.name, shape=(0, *col.shape), chunks=(chunk, *col.shape),
                    dtype=col.dtype, fill_value=col.fill_value,
                    dimension_names=col.dimension_names,
                    attributes=col.attrs,
                )
            except (ContainsArrayError, ContainsGroupError):  # created meanwhile elsewhere
                arr = await group.getitem(col.name)
        if not isinstance(arr, AsyncArray):
            raise StorageError(f"{path}/{col.name} is a group, expected an array")
        self._remember(path, col, arr)
        return arr

    def _remember(self, path: str, col: Column, arr: AsyncArray[Any]) -> None:
        # First use in this process: the array's metadata and its parent groups' (the
        # root's included) may have been written by a process that stopped before its
        # sync, and exist, so they are not rewritten now; the next commit relies on them.
        if self._local is not None:
            for meta in metadata_keys(arr.path):
                self._local.note(meta)
        self._arrays[(path, col.name)] = arr
        while len(self._arrays) > _MAX_OPEN_ARRAYS:
            self._arrays.popitem(last=False)

    @staticmethod
    def _check_dtypes(arrays: list[AsyncArray[Any]], columns: list[Column]) -> None:
        for arr, col in zip(arrays, columns, strict=True):
            want = np.dtype(col.dtype)
            have = arr.dtype if isinstance(arr.dtype, np.dtype) else np.dtype(arr.dtype)
            strings = (have.kind == "T", want.kind == "T")
            # Only casts that keep every value ("safe"): int64 values in an int32 array
            # or floats in a string array would be stored changed, silently.
            if strings[0] != strings[1] or (
                    not strings[0] and have != want and not np.can_cast(want, have, "safe")):
                raise ValidationError(
                    f"{col.name}: values of dtype {want} cannot be stored in the existing "
                    f"array of dtype {have}", reason=Reason.DTYPE_MISMATCH)
            if tuple(arr.shape[1:]) != col.shape:
                raise ValidationError(
                    f"{col.name}: per-event shape {col.shape} differs from the stored "
                    f"{tuple(arr.shape[1:])}", reason=Reason.SHAPE_MISMATCH)

    async def _grow(self, path: str, arrays: list[AsyncArray[Any]],
                    needs: list[int]) -> list[AsyncArray[Any]]:
        """Each array at least as long as its ``needs`` entry (called with the
        descriptor's lock held, the shape re-read from storage: another writer may have
        grown them). Summary windows (``summary``) need fewer rows than events.

        Growth is to a power of two of whole chunks (headroom,
        :func:`~bluestream.storage.array_meta.grown_length`): resizing rewrites an
        array's metadata, so growing by a batch at a time cost every batch a metadata
        write (and its fsync) per array; now about log2(chunks) per run. The logical length is the
        ``event_stream`` record's; rows past it hold ``seq_num`` 0, which readers skip.
        The shape depends on the highest seq_num only, never on how events were batched,
        so replays and any batching still store identical bytes."""
        if all(arr.shape[0] >= needed for arr, needed in zip(arrays, needs, strict=True)):
            return list(arrays)
        if array_meta.supported(self._store):
            out, elsewhere = await anyio.to_thread.run_sync(
                array_meta.grow_all, self._store, arrays, needs)
            for key in elsewhere:  # grown by another writer, maybe one not synced yet
                self._note(key)
            for arr in out:
                self._arrays[(path, arr.path.removeprefix(path + "/"))] = arr
            return out
        out = []
        for arr, needed in zip(arrays, needs, strict=True):
            if arr.shape[0] >= needed:
                out.append(arr)
                continue
            fresh = await za.open_array(store=self._store, path=arr.path,
                                        zarr_format=3, mode="r+")
            if fresh.shape[0] < needed:
                chunk = max(1, int(fresh.chunks[0]))
                await fresh.resize((array_meta.grown_length(needed, chunk),
                                    *fresh.shape[1:]))
            else:  # grown by another writer, maybe one that has not synced yet
                self._note(f"{arr.path}/zarr.json")
            self._arrays[(path, arr.path.removeprefix(path + "/"))] = fresh
            out.append(fresh)
        return out

    def _note(self, key: str) -> None:
        if self._local is not None:
            self._local.note(key)

    def forget(self, tenant: str, run_start: str) -> None:
        """Drop cached array handles of a finished run."""
        prefix = f"{tenant}/{run_start[:2]}/{run_start}/"
        for key in [k for k in self._arrays if k[0].startswith(prefix)]:
            del self._arrays[key]


def stream_update(tenant: str, run_start: str, descriptor: Mapping[str, Any],
                  specs: Mapping[str, FieldSpec], page: Page) -> StreamUpdate:
    """The ``event_stream`` summary of writing ``page`` (its rows in the arrays or in
    the tail)."""
    return StreamUpdate(
        descriptor_uid=str(descriptor["uid"]),
        run_start=run_start,
        stream_name=str(descriptor.get("name", "primary")),
        zarr_path=descriptor_path(tenant, run_start, str(descriptor["uid"])),
        length=int(page.seq_num.max()),  # logical: arrays may be longer (whole chunks)
        seq_num_min=int(page.seq_num.min()),
        seq_num_max=int(page.seq_num.max()),
        time_min=float(page.time.min()),
        time_max=float(page.time.max()),
        data_keys=tuple(sorted(specs)),
        schema_version=SCHEMA_VERSION,
    )


def _column_values(page: Page, order: np.ndarray) -> dict[str, np.ndarray]:
    # The common case is a page already in seq_num order without duplicates: take views
    # instead of fancy-indexed copies (a 64 MB batch of images was copied once more).
    take: slice | np.ndarray = order
    if order.size == len(page) and bool((order == np.arange(order.size)).all()):
        take = slice(None)
    return tail.page_values(page, take)


def _windowed(col: Column) -> bool:
    """The ``summary`` array: one row per window of rows, not per event."""
    return col.name == SUMMARY


def _is_summary(col: Column) -> bool:
    return col.name in (SUMMARY, EVENT_SUMMARY)


def _keys(col: Column) -> list[str]:
    """The data keys a summary array describes, in the order of its ``key`` axis."""
    return list(dict(col.attributes)["keys"])


def _summary_rows(columns: list[Column], positions: np.ndarray,
                  values: dict[str, np.ndarray], read: Reader
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Summary array name -> (its rows written, their values) for a write of
    ``values`` at ``positions`` (:mod:`~bluestream.storage.summaries`); ``read`` gives
    the stored rows of windows the write covers in part."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for col in columns:
        names = [data_path(k) for k in _keys(col)]
        if _windowed(col):
            plan = WindowPlan.of(positions)
            stats = window_summaries(plan, {n: values[n] for n in names}, read)
            out[col.name] = (plan.windows.astype(np.int64),
                             np.stack([stats[n] for n in names], axis=1))
        else:
            out[col.name] = (positions, np.stack([event_stats(values[n]) for n in names],
                                                 axis=1))
    return out


async def _write_columns(arrays: list[AsyncArray[Any]], columns: list[Column],
                         positions: np.ndarray, values: dict[str, np.ndarray]) -> None:
    """Every column's rows, the summaries of the summarised ones with them; ``seq_num``
    last, once the others are stored: a reader that sees a row's seq_num sees the whole
    row and its summaries. In one worker thread when zarr's codecs and the store can run
    synchronously (:mod:`~bluestream.storage.chunk_writer`), else through ``setitem``."""
    by_name = dict(zip((c.name for c in columns), arrays, strict=True))
    seq = by_name[SEQ_NUM]
    summary = [c for c in columns if _is_summary(c)]
    rest = [(a, c) for a, c in zip(arrays, columns, strict=True)
            if c.name != SEQ_NUM and not _is_summary(c)]
    if all(chunk_writer.supports(a) for a in arrays):
        runs = list(_contiguous_runs(positions))

        def writes(arr: AsyncArray[Any], column: np.ndarray, where: list[tuple[int, int, int]],
                   stats: np.ndarray | None = None) -> list[chunk_writer.RowWrite]:
            return [chunk_writer.RowWrite(arr, start, column[first:first + (stop - start)],
                                          None if stats is None else
                                          partial(_stats_into, stats, first))
                    for first, start, stop in where]

        def summary_writes(rows: dict[str, tuple[np.ndarray, np.ndarray]]
                           ) -> list[chunk_writer.RowWrite]:
            return [w for name, (where, stats) in rows.items()
                    for w in writes(by_name[name], stats, list(_contiguous_runs(where)))]

        def work() -> None:
            # Windows: the stored rows are read back (rarely: see storage.summaries)
            # before anything is written. Events (images): summarised by the chunk
            # threads as they encode the rows (``observe``), and written after them.
            rows = _summary_rows([c for c in summary if _windowed(c)], positions, values,
                                 lambda name, a, b: chunk_writer.read_rows(by_name[name], a, b))
            events = {c.name: np.full((len(positions), *c.shape), np.nan)
                      for c in summary if not _windowed(c)}
            into = {data_path(key): events[c.name][:, j] for c in summary
                    if not _windowed(c) for j, key in enumerate(_keys(c))}
            first = [w for a, c in rest
                     for w in writes(a, values[c.name], runs, into.get(c.name))]
            chunk_writer.write_all([
                first + summary_writes(rows),
                summary_writes({name: (positions, stats) for name, stats in events.items()}),
                writes(seq, values[SEQ_NUM], runs)])

        await anyio.to_thread.run_sync(work)
        return
    stored: dict[tuple[str, int, int], np.ndarray] = {}
    for col in (c for c in summary if _windowed(c)):
        for a, b in WindowPlan.of(positions).ranges():
            for name in [SEQ_NUM, *(data_path(k) for k in _keys(col))]:
                stored[(name, a, b)] = await _read_async(by_name[name], a, b)
    rows = _summary_rows(summary, positions, values,
                         lambda name, a, b: stored[(name, a, b)])
    async with anyio.create_task_group() as tg:
        for arr, col in rest:
            tg.start_soon(_write_runs, arr, positions, values[col.name])
        for name, (where, stats) in rows.items():
            tg.start_soon(_write_runs, by_name[name], where, stats)
    await _write_runs(seq, positions, values[SEQ_NUM])


def _stats_into(out: np.ndarray, base: int, offset: int, rows: np.ndarray) -> None:
    """Per-event summaries of ``rows``, the rows ``base + offset`` onwards of a page."""
    out[base + offset:base + offset + len(rows)] = event_stats(rows)


async def _read_async(arr: AsyncArray[Any], start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` through ``getitem``; zeros past the array's end (rows never
    written: their seq_num reads 0, so their values are not looked at)."""
    end = min(stop, int(arr.shape[0]))
    got = np.asarray(await arr.getitem(slice(start, end))) if end > start else None
    dtype = got.dtype if got is not None else np.dtype(np.float64)
    out = np.zeros((stop - start, *arr.shape[1:]), dtype=dtype)
    if got is not None:
        out[:end - start] = got
    return out


async def _write_runs(arr: AsyncArray[Any], positions: np.ndarray, values: np.ndarray) -> None:
    for first, start, stop in _contiguous_runs(positions):
        chunk = values[first:first + (stop - start)]
        if chunk.dtype != arr.dtype and isinstance(arr.dtype, np.dtype):
            chunk = chunk.astype(arr.dtype, copy=False)
        await arr.setitem(slice(start, stop), chunk)
