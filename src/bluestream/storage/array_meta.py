"""Array metadata of a descriptor's group, opened, created and grown in one worker thread.

Why: ``group.create_array``, ``open_array`` and ``resize`` each make several store calls
(existence checks, reads, writes of ``zarr.json``), every one a hop to a worker thread
and back, waited for on the event loop. A new descriptor of 10 scalar fields has 23
arrays: creating them cost ~10 ms each, ~230 ms per descriptor, which is what a short
run or a benchmark of many runs pays per run; every growth past a chunk paid the same
again per array.

What: the same metadata, built by zarr's own functions (the dtype, codec and chunk-key
defaults of ``create_array``; ``tests/test_array_meta.py`` compares the ``zarr.json``
bytes with ``create_array``'s) and read, written and resized through the store's
``get_sync``/``set_sync`` in one blocking call per batch (a local store, or
:class:`~bluestream.storage.zarr_root.S3ZarrStore`: each call a GET or a PUT). Stores
without those calls keep the asynchronous path: :func:`supported` tells which.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

from zarr.abc.store import Store
from zarr.core.array import AsyncArray, _parse_chunk_encoding_v3
from zarr.core.buffer import default_buffer_prototype
from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding
from zarr.core.dtype import parse_dtype
from zarr.core.group import GroupMetadata
from zarr.core.metadata.v3 import ArrayV3Metadata
from zarr.storage import StorePath

from bluestream.errors import StorageError
from bluestream.layout import Column

__all__ = ["ensure_group", "grow_all", "grown_length", "open_or_create", "supported"]

_PROTOTYPE = default_buffer_prototype()
_META = "zarr.json"


def supported(store: Store) -> bool:
    """True if metadata can be handled here synchronously (else use zarr's async API)."""
    return hasattr(store, "get_sync") and hasattr(store, "set_sync")


def grown_length(needed: int, chunk: int) -> int:
    """The length an array grows to when ``needed`` rows must fit: whole chunks, a
    power of two of them (a long run resizes its arrays log2(chunks) times, not once per
    chunk). It depends on ``needed`` alone, so replays and any batching grow arrays to
    the same shape."""
    chunks = -(-needed // chunk)
    return (1 << max(0, chunks - 1).bit_length()) * chunk


@functools.lru_cache(maxsize=1024)
def _new_metadata(col: Column) -> ArrayV3Metadata:
    """What ``create_array(shape=(0, *shape), chunks=(chunk, *shape), dtype, fill_value,
    dimension_names)`` writes (zarr's default codecs for the dtype). Kept per column
    (the metadata is immutable): every run of a descriptor shape makes the same columns,
    and building them (dtype and codec resolution) was half the cost of a new run's
    arrays."""
    zdtype = parse_dtype(col.dtype, zarr_format=3)
    array_array, array_bytes, bytes_bytes = _parse_chunk_encoding_v3(
        compressors="auto", filters="auto", serializer="auto", dtype=zdtype)
    return AsyncArray._create_metadata_v3(
        shape=(0, *col.shape),
        dtype=zdtype,
        fill_value=col.fill_value,
        chunk_shape=(col.chunk_events, *col.shape),
        chunk_key_encoding=DefaultChunkKeyEncoding(separator="/"),
        codecs=(*array_array, array_bytes, *bytes_bytes),
        dimension_names=col.dimension_names,
        attributes=col.attrs,
    )


def _node(store: Any, path: str) -> dict[str, Any] | None:
    """The ``zarr.json`` document of the node at ``path`` (None if there is none)."""
    raw = store.get_sync(f"{path}/{_META}".lstrip("/"), prototype=_PROTOTYPE)
    if raw is None:
        return None
    doc: dict[str, Any] = json.loads(raw.to_bytes())
    return doc


def _expect(doc: dict[str, Any], path: str, kind: str) -> None:
    if doc.get("node_type") != kind:
        found = doc.get("node_type", "non-Zarr node")
        raise StorageError(f"{path or '/'} is {_a(found)}, expected {_a(kind)}")


def _a(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def _read(store: Any, path: str) -> ArrayV3Metadata | None:
    doc = _node(store, path)
    if doc is None:
        return None
    _expect(doc, path, "array")
    return ArrayV3Metadata.from_dict(doc)


def _write(store: Any, path: str, meta: ArrayV3Metadata | GroupMetadata) -> None:
    for name, buf in meta.to_buffer_dict(_PROTOTYPE).items():
        store.set_sync(f"{path}/{name}".lstrip("/"), buf)


def ensure_group(store: Store, path: str, attributes: dict[str, Any]) -> bool:
    """What ``open_group(path, mode="a", attributes=...)`` does: an existing group is
    kept as it is; a missing one is created with ``attributes``, and every missing group
    above it (the root's included) with none. An array in the way is an error.
    True if the group was created here. Blocking: call it in a worker thread."""
    doc = _node(store, path)
    if doc is not None:
        _expect(doc, path, "group")
        return False
    parts = path.split("/")
    for i in range(len(parts)):
        parent = "/".join(parts[:i])
        above = _node(store, parent)
        if above is None:
            _write(store, parent, GroupMetadata(zarr_format=3))
        else:
            _expect(above, parent, "group")
    _write(store, path, GroupMetadata(attributes=attributes, zarr_format=3))
    return True


def _handle(store: Store, path: str, meta: ArrayV3Metadata) -> AsyncArray[Any]:
    return AsyncArray(metadata=meta, store_path=StorePath(store, path))


def open_or_create(store: Store, group_path: str, columns: Sequence[Column],
                   lengths: Sequence[int] | None = None, *, created: bool = False
                   ) -> list[AsyncArray[Any]]:
    """The arrays of ``columns`` under the (existing) group ``group_path``: each opened
    if its ``zarr.json`` exists, else created, empty or (``lengths``, one per column)
    already as long as :func:`grow_all` would make it for that many rows: a new run's
    arrays are written once, not created and then resized. ``created``: the group was
    just made (:func:`ensure_group` returned True), so nothing below it is looked for.
    Blocking: call it in a worker thread, with the descriptor's lock held."""
    out = []
    middles: set[str] = set()  # groups between the descriptor's and its arrays, seen
    for i, col in enumerate(columns):
        path = f"{group_path}/{col.name}"
        meta = None if created else _read(store, path)
        if meta is None:
            meta = _new_metadata(col)
            # The cached metadata's attributes dict is shared: each array gets its own.
            meta = meta.update_attributes(dict(meta.attributes))
            if lengths is not None and lengths[i] > 0:
                meta = meta.update_shape((grown_length(lengths[i], col.chunk_events),
                                          *col.shape))
            # Groups between the descriptor's and the array (``data/``), as zarr's
            # ``ensure_parents`` makes them.
            inner = col.name.split("/")[:-1]
            for j in range(1, len(inner) + 1):
                middle = "/".join([group_path, *inner[:j]])
                if middle in middles:
                    continue
                middles.add(middle)
                doc = None if created else _node(store, middle)
                if doc is None:
                    _write(store, middle, GroupMetadata(zarr_format=3))
                else:
                    _expect(doc, middle, "group")
            _write(store, path, meta)
        out.append(_handle(store, path, meta))
    return out


def grow_all(store: Store, arrays: Sequence[AsyncArray[Any]], needed: int | Sequence[int]
             ) -> tuple[list[AsyncArray[Any]], list[str]]:
    """Arrays at least ``needed`` long (one length for all, or one per array: summary
    windows need fewer rows than events), their shape re-read from the store (another
    writer may have grown them), each grown to the next whole chunk. Returns the arrays
    and the metadata keys found grown by someone else (to be synced with this batch).
    Blocking: call it in a worker thread, with the descriptor's lock held."""
    out: list[AsyncArray[Any]] = []
    grown_elsewhere: list[str] = []
    needs = [needed] * len(arrays) if isinstance(needed, int) else list(needed)
    for arr, needed in zip(arrays, needs, strict=True):
        if arr.shape[0] >= needed:
            out.append(arr)
            continue
        meta = _read(store, arr.path)
        if meta is None:
            raise StorageError(f"{arr.path}: the array's metadata is gone")
        if meta.shape[0] < needed:
            chunk = max(1, int(meta.chunk_grid.chunk_shape[0]))  # type: ignore[attr-defined]
            meta = meta.update_shape((grown_length(needed, chunk), *meta.shape[1:]))
            _write(store, arr.path, meta)
        else:
            grown_elsewhere.append(f"{arr.path}/{_META}")
        out.append(_handle(store, arr.path, meta))
    return out, grown_elsewhere
