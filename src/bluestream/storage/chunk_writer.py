"""Rows of event arrays written in one worker thread, with zarr's own codecs and store.

Why: ``AsyncArray.setitem`` hops to a worker thread for every codec step and every
store call of every chunk, and waits for each hop on the event loop. For a batch of
scalar events (23 arrays, a few chunks each) those hops cost ~5 ms per array, about
ten times the encoding and the file writes themselves, and they keep the event loop
busy while the next batch could be decoded.

What: :func:`write_rows` does what ``setitem`` does for a contiguous run of rows along
the event axis (the only writes the event store makes): for each chunk touched, the
existing chunk is read and decoded if it is only partly overwritten, the rows are
merged, and the chunk is encoded and stored, all through the array's own codecs
(their ``_encode_sync``/``_decode_sync``) and the store's ``get_sync``/``set_sync``.
The bytes are zarr's (``tests/test_chunk_writer.py`` compares them key by key with
``setitem``'s). Arrays whose codecs or store cannot do that synchronously (sharding,
an object store without sync calls) are written with ``setitem`` by the caller:
:func:`supports` tells which.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from zarr.abc.codec import SupportsSyncCodec
from zarr.core.array import AsyncArray
from zarr.core.array_spec import ArraySpec
from zarr.core.buffer import Buffer, NDBuffer, default_buffer_prototype
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.core.codec_pipeline import codecs_from_list, fill_value_or_default
from zarr.core.metadata.v3 import ArrayV3Metadata

__all__ = ["RowWrite", "read_rows", "supports", "write_all"]

#: Above this many bytes in one call, chunks are encoded and written by two threads
#: (zstd and file I/O release the GIL): image batches use both cores.
_PARALLEL_BYTES = 8 * 1024 * 1024
_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="bluestream-chunks")


@dataclass(frozen=True)
class RowWrite:
    """``values`` for rows ``start .. start + len(values)`` of ``array``."""

    array: AsyncArray[Any]
    start: int
    values: np.ndarray
    #: Called as ``observe(i, rows)`` with the rows ``values[i:i + len(rows)]`` of each
    #: chunk just before they are encoded, on the thread that encodes them: per-event
    #: summaries of images are computed while the rows are in the cache, on both threads.
    observe: Callable[[int, np.ndarray], None] | None = None


@dataclass(frozen=True)
class _Chain:
    """The codecs of an array with the spec each one sees, resolved once."""

    array_array: tuple[tuple[Any, ArraySpec], ...]
    array_bytes: tuple[Any, ArraySpec]
    bytes_bytes: tuple[tuple[Any, ArraySpec], ...]
    chunk_spec: ArraySpec
    fill: Any

    def encode(self, chunk: np.ndarray) -> Buffer:
        data: Any = self.chunk_spec.prototype.nd_buffer.from_numpy_array(chunk)
        for codec, spec in self.array_array:
            data = codec._encode_sync(data, spec)
        codec, spec = self.array_bytes
        data = codec._encode_sync(data, spec)
        for codec, spec in self.bytes_bytes:
            data = codec._encode_sync(data, spec)
        return cast(Buffer, data)

    def decode(self, raw: Buffer) -> np.ndarray:
        data: Any = raw
        for codec, spec in reversed(self.bytes_bytes):
            data = codec._decode_sync(data, spec)
        codec, spec = self.array_bytes
        data = codec._decode_sync(data, spec)
        for codec, spec in reversed(self.array_array):
            data = codec._decode_sync(data, spec)
        out: np.ndarray = cast(NDBuffer, data).as_numpy_array()
        return out if out.flags.writeable else out.copy()


_CHAINS: dict[int, tuple[ArrayV3Metadata, _Chain | None]] = {}


def _chain(array: AsyncArray[Any]) -> _Chain | None:
    """The array's codec chain, or None if it cannot run synchronously here."""
    meta = array.metadata
    cached = _CHAINS.get(id(meta))
    if cached is not None and cached[0] is meta:
        return cached[1]
    chain = _make_chain(array)
    if len(_CHAINS) > 4096:
        _CHAINS.clear()
    if isinstance(meta, ArrayV3Metadata):
        _CHAINS[id(meta)] = (meta, chain)
    return chain


def _make_chain(array: AsyncArray[Any]) -> _Chain | None:
    meta = array.metadata
    store = array.store_path.store
    if not isinstance(meta, ArrayV3Metadata) or not isinstance(meta.chunk_grid,
                                                               RegularChunkGrid):
        return None
    if not (hasattr(store, "get_sync") and hasattr(store, "set_sync")):
        return None
    chunks = tuple(meta.chunk_grid.chunk_shape)
    if not chunks or tuple(chunks[1:]) != tuple(meta.shape[1:]):
        return None  # only chunks that span every axis but the event axis
    try:
        aa, ab, bb = codecs_from_list(meta.codecs)
    except (TypeError, ValueError):
        return None
    if not all(isinstance(c, SupportsSyncCodec) for c in (*aa, ab, *bb)):
        return None
    spec = meta.get_chunk_spec((0,) * len(chunks), array.config, default_buffer_prototype())
    first = spec
    resolved_aa = []
    for codec in aa:
        resolved_aa.append((codec, spec))
        spec = codec.resolve_metadata(spec)
    resolved_ab = (ab, spec)
    spec = ab.resolve_metadata(spec)
    resolved_bb = []
    for bytes_codec in bb:
        resolved_bb.append((bytes_codec, spec))
        spec = bytes_codec.resolve_metadata(spec)
    return _Chain(tuple(resolved_aa), resolved_ab, tuple(resolved_bb), first,
                  fill_value_or_default(first))


def supports(array: AsyncArray[Any]) -> bool:
    """True if :func:`write_all` can write this array (else use ``setitem``)."""
    return _chain(array) is not None


@dataclass(frozen=True)
class _ChunkJob:
    array: AsyncArray[Any]
    chain: _Chain
    index: int  # chunk index along the event axis
    offset: int  # first row of the chunk written
    values: np.ndarray  # the rows written into it
    first: int  # their first row in the write's values
    observe: Callable[[int, np.ndarray], None] | None

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes)


def _jobs(write: RowWrite) -> list[_ChunkJob]:
    chain = _chain(write.array)
    if chain is None:
        raise ValueError(f"{write.array.path}: not writable synchronously")
    rows = int(chain.chunk_spec.shape[0])
    dtype = write.array.dtype
    values = write.values
    if isinstance(dtype, np.dtype) and values.dtype != dtype:
        values = values.astype(dtype, copy=False)
    start, stop = write.start, write.start + len(values)
    jobs = []
    for index in range(start // rows, (stop - 1) // rows + 1):
        lo, hi = max(start, index * rows), min(stop, (index + 1) * rows)
        jobs.append(_ChunkJob(write.array, chain, index, lo - index * rows,
                              values[lo - start:hi - start], lo - start, write.observe))
    return jobs


def _chunk_key(array: AsyncArray[Any], index: int, ndim: int) -> str:
    coords = (index,) + (0,) * (ndim - 1)
    return f"{array.store_path.path}/{array.metadata.encode_chunk_key(coords)}".lstrip("/")


def read_rows(array: AsyncArray[Any], start: int, stop: int) -> np.ndarray:
    """Stored rows ``[start, stop)`` of ``array`` along the event axis, the fill value
    where no chunk was written or past the array's end: what ``getitem`` returns, read
    with the same codecs and store calls as :func:`write_all` (the writer reads back the
    rest of a summary window it writes part of). Blocking: call it in a worker thread."""
    chain = _chain(array)
    if chain is None:
        raise ValueError(f"{array.path}: not readable synchronously")
    store: Any = array.store_path.store
    shape = chain.chunk_spec.shape
    rows = int(shape[0])
    dtype = array.dtype if isinstance(array.dtype, np.dtype) else np.dtype(array.dtype)
    out = np.full((max(0, stop - start), *shape[1:]), chain.fill, dtype=dtype)
    end = min(stop, int(array.shape[0]))
    for index in range(start // rows, (end - 1) // rows + 1 if end > start else 0):
        raw = store.get_sync(_chunk_key(array, index, len(shape)),
                             prototype=chain.chunk_spec.prototype)
        if raw is None:
            continue
        chunk = chain.decode(raw)
        lo, hi = max(start, index * rows), min(end, (index + 1) * rows)
        out[lo - start:hi - start] = chunk[lo - index * rows:hi - index * rows]
    return out


def _run(job: _ChunkJob) -> None:
    array, chain = job.array, job.chain
    store: Any = array.store_path.store
    shape = chain.chunk_spec.shape
    key = _chunk_key(array, job.index, len(shape))
    n = len(job.values)
    if job.observe is not None:
        job.observe(job.first, job.values)
    if job.offset == 0 and n == shape[0]:
        chunk = job.values
    else:  # a partial chunk: merge with what is stored (or the fill value)
        raw = store.get_sync(key, prototype=chain.chunk_spec.prototype)
        if raw is None:
            chunk = np.full(shape, chain.fill, dtype=job.values.dtype)
        else:
            chunk = chain.decode(raw)
        chunk[job.offset:job.offset + n] = job.values
    store.set_sync(key, chain.encode(np.ascontiguousarray(chunk)))


def _run_in_order(jobs: Sequence[_ChunkJob]) -> None:
    for job in jobs:
        _run(job)


def write_all(groups: Sequence[Iterable[RowWrite]]) -> None:
    """Write each group of row writes, one group after the other (a later group is
    written only once every chunk of the earlier ones is stored, and its values are
    taken only then: they may be filled by an earlier group's ``observe``). Blocking:
    call it in a worker thread. Within a group, chunks go through two threads when they
    are big; the jobs of one chunk (two runs of rows with a hole between them, in one
    chunk) stay on one thread, in order: each reads back what the one before wrote (on
    two threads both would read the chunk before either wrote it, and the last write
    would drop the other's rows)."""
    for group in groups:
        jobs = [job for write in group for job in _jobs(write)]
        if len(jobs) > 1 and sum(j.nbytes for j in jobs) >= _PARALLEL_BYTES:
            by_chunk: dict[tuple[int, str, int], list[_ChunkJob]] = {}
            for job in jobs:
                key = (id(job.array.store_path.store), job.array.store_path.path, job.index)
                by_chunk.setdefault(key, []).append(job)
            for _ in _POOL.map(_run_in_order, by_chunk.values()):
                pass
        else:
            _run_in_order(jobs)
