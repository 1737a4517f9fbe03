"""What takes the space: bytes per run, stream or field (deker's
``calculate_storage_size``).

Three figures, because each answers a different question:

* ``zarr_bytes`` / ``zarr_objects``: what the arrays take on disk, or in the object store
  (file sizes under the run's directory; the sizes an ``s3://`` listing gives). Exact.
* ``metadata_bytes``: the run's documents (start, stop, descriptors, resources, datums,
  stream resources and datums) and ``event_stream`` records as compact JSON, plus the
  tail rows kept in the metadata store, byte for byte. The store's own overhead (indexes,
  BSON framing, SQLite pages and free space) is not counted: a SQLite file holds every
  tenant in shared pages, so the report gives the file's size beside it instead.
* ``logical_bytes``: the events uncompressed, rows x itemsize x elements per event for
  every column, rows being the events a stream record spans (its lowest to its highest
  seq_num); string columns (uids, strings,
  datum ids, JSON text) count numpy's 16 bytes per string, what a read allocates at least.

Per field, a field's arrays are every array named after it (``data/<key>``,
``timestamps/<key>``, ``filled/<key>``, and per-key groups such as summaries); ``field``
None is the stream's own part: its ``time``, ``seq_num`` and ``uid`` columns, its group
metadata and its descriptor and record; per stream, ``stream`` None
is the run's own part (its group, start, stop, resources). So rows always add up to the
total. Objects under the tenant outside every run (the tenant's group) have ``run`` None.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import obstore
import zarr.api.asynchronous as za

from bluestream.catalog.context import CatalogContext
from bluestream.catalog.integrity import expected_columns, record_span, visible_runs
from bluestream.errors import BluestreamError, StorageError
from bluestream.layout import EVENT_SUMMARY, SUMMARY, reader_specs
from bluestream.queries import Query
from bluestream.storage.array_removal import run_prefix
from bluestream.storage.tail import Tail
from bluestream.storage.zarr_root import IO_ERRORS, ZarrRoot, brief

__all__ = ["BY", "StorageReport", "Usage", "human_bytes", "storage_size"]

Doc = dict[str, Any]
Key = tuple[str | None, str | None, str | None]
BY = ("run", "stream", "field")
#: numpy's in-memory size of one StringDType element.
_STRING_BYTES = 16
_COLUMN_GROUPS = ("data", "timestamps", "filled")
#: Arrays of a descriptor's group that belong to the stream, not to one field (the
#: summary arrays hold every summarised key of the descriptor).
_EVENT_COLUMNS = ("time", "seq_num", "uid", SUMMARY, EVENT_SUMMARY)


@dataclass(frozen=True)
class Usage:
    """Space taken by one run, stream or field (see the module docstring)."""

    run: str | None
    stream: str | None = None
    field: str | None = None
    zarr_bytes: int = 0
    zarr_objects: int = 0
    metadata_bytes: int = 0
    logical_bytes: int = 0
    events: int = 0

    def __add__(self, other: Usage) -> Usage:
        return replace(self, zarr_bytes=self.zarr_bytes + other.zarr_bytes,
                       zarr_objects=self.zarr_objects + other.zarr_objects,
                       metadata_bytes=self.metadata_bytes + other.metadata_bytes,
                       logical_bytes=self.logical_bytes + other.logical_bytes,
                       events=self.events + other.events)


@dataclass(frozen=True)
class StorageReport:
    tenant: str
    zarr_root: str
    by: str
    rows: list[Usage]
    total: Usage
    #: Size of the SQLite file (every tenant's pages, WAL included), when the store is one.
    metadata_file_bytes: int | None = None
    counted: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rows"] = [asdict(r) for r in self.rows]
        out["total"] = asdict(self.total)
        return out


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as ``du --si``)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"  # pragma: no cover


# -- entry point ---------------------------------------------------------------------------
async def storage_size(ctx: CatalogContext, *, by: str = "run",
                       runs: Sequence[str] | None = None,
                       query: Query | None = None) -> StorageReport:
    """Space taken by ``runs`` (full uids), or by every run matching ``query`` (the
    whole tenant for None: then arrays of runs that have no start any more count too)."""
    if by not in BY:
        raise ValueError(f"by must be one of {BY}, not {by!r}")
    await ctx.ensure_open()
    whole = runs is None and query is None
    uids = list(runs) if runs is not None else await visible_runs(ctx, query)
    prefixes = [ctx.tenant + "/"] if whole else [run_prefix(ctx.tenant, u) + "/" for u in uids]
    objects = await anyio.to_thread.run_sync(_list_sizes, ctx.zarr_root, prefixes)
    parts: dict[Key, Usage] = {}
    streams: dict[str, dict[str, str]] = {}
    for uid in uids:
        streams[uid] = await _run_metadata(ctx, uid, parts)
    for key, size in objects:
        where = _attribute(key, streams)
        _put(parts, where, Usage(*where, zarr_bytes=size, zarr_objects=1))
    rows = _group(parts, by)
    total = sum((replace(r, run=None, stream=None, field=None) for r in rows), Usage(None))
    events = sum(u.events for k, u in parts.items() if k[2] is None and k[1] is not None)
    return StorageReport(ctx.tenant, str(ctx.zarr_root), by, rows,
                         replace(total, events=events), _file_bytes(ctx.store.uri),
                         _counted(ctx.zarr_root))


def _counted(root: ZarrRoot) -> dict[str, str]:
    where = "object sizes of an s3:// listing" if root.is_s3 else "file sizes on disk"
    return {
        "zarr_bytes": f"every object under the run's directory of {root}: {where}",
        "metadata_bytes": "documents and event_stream records as compact JSON, plus tail "
                          "rows; not the store's indexes, BSON framing or free pages",
        "logical_bytes": "events (lowest to highest seq_num) x itemsize x elements per "
                         "event of every column; strings at 16 bytes each",
        "metadata_file_bytes": "the SQLite file with its WAL, shared by every tenant "
                               "(null for MongoDB: see db.stats() there)",
    }


def _file_bytes(uri: str) -> int | None:
    if not uri.startswith("sqlite:///"):
        return None
    from bluestream.storage.sqlite import sqlite_path

    path = Path(sqlite_path(uri))
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + "-wal"))
               if p.is_file())


# -- the arrays ------------------------------------------------------------------------------
def _list_sizes(root: ZarrRoot, prefixes: Iterable[str]) -> list[tuple[str, int]]:
    """(key, bytes) of every object under ``prefixes``. Blocking."""
    out: list[tuple[str, int]] = []
    try:
        for prefix in prefixes:
            out += _walk(root.local, prefix) if root.local is not None else \
                _list_s3(root, prefix)
    except IO_ERRORS as exc:
        raise StorageError(f"listing the arrays under {root} failed: {brief(exc)}") from exc
    return out


def _walk(base: Path, prefix: str) -> list[tuple[str, int]]:
    top = base / prefix
    out = []
    for folder, _, files in os.walk(top):
        rel = Path(folder).relative_to(base).as_posix()
        for name in files:
            out.append((f"{rel}/{name}", os.stat(os.path.join(folder, name)).st_size))
    return out


def _list_s3(root: ZarrRoot, prefix: str) -> list[tuple[str, int]]:
    store = root.object_store(read_only=True)
    return [(str(meta["path"]), int(meta["size"]))
            for batch in obstore.list(store.store, prefix=prefix) for meta in batch]


def _attribute(key: str, streams: dict[str, dict[str, str]]) -> Key:
    """(run, stream, field) of an object key ``tenant/xx/run/descriptor/...``."""
    parts = key.split("/")
    if len(parts) < 4:
        return None, None, None
    run = parts[2]
    if len(parts) == 4:
        return run, None, None  # the run's group metadata
    desc, rest = parts[3], parts[4:]
    stream = streams.get(run, {}).get(desc, f"(descriptor {desc})")
    # data/<key>/..., timestamps/<key>/..., filled/<key>/... belong to the key; time,
    # seq_num, uid and the summary arrays (all keys in one) to the stream.
    fld = rest[1] if len(rest) >= 3 and rest[0] not in _EVENT_COLUMNS else None
    return run, stream, fld


# -- the metadata ----------------------------------------------------------------------------
async def _run_metadata(ctx: CatalogContext, uid: str, parts: dict[Key, Usage]) -> dict[str, str]:
    """Add the run's documents, records and logical sizes to ``parts``; return its
    descriptors' stream names."""
    store = ctx.store
    docs = [await ctx.call("read start", store.get, "start", uid),
            await ctx.call("read stop", store.get, "stop", uid)]
    for kind in ("resource", "stream_resource"):
        found = await ctx.call(f"read {kind}s", store.find, kind, run_start=uid)
        docs += found
        child = "datum" if kind == "resource" else "stream_datum"
        for doc in found:
            docs += await ctx.call(f"read {child}s", store.find, child, resource=str(doc["uid"]))
    _put(parts, (uid, None, None), Usage(uid, metadata_bytes=sum(_json_bytes(d) for d in docs
                                                                  if d is not None)))
    descriptors = {str(d["uid"]): d for d in
                   await ctx.call("read descriptors", store.find, "descriptor", run_start=uid)}
    names = {u: str(d.get("name", "primary")) for u, d in descriptors.items()}
    for desc in descriptors.values():
        _put(parts, (uid, names[str(desc["uid"])], None),
             Usage(uid, names[str(desc["uid"])], metadata_bytes=_json_bytes(desc)))
    for rec in await ctx.call("read event_stream", store.streams, uid):
        desc_uid = str(rec["descriptor_uid"])
        name = names.get(desc_uid, f"(descriptor {desc_uid})")
        tail = bytes(rec.get("tail") or b"")
        meta = _json_bytes({k: v for k, v in rec.items() if k != "tail"}) + len(tail)
        _put(parts, (uid, name, None), Usage(uid, name, metadata_bytes=meta,
                                             events=record_span(rec)))
        owner = descriptors.get(desc_uid)
        if owner is not None:
            for fld, n in (await _logical(ctx, owner, rec, tail)).items():
                _put(parts, (uid, name, fld), Usage(uid, name, fld, logical_bytes=n))
    return names


async def _logical(ctx: CatalogContext, desc: Doc, rec: Doc, tail: bytes
                   ) -> dict[str | None, int]:
    """Uncompressed bytes per field (None: time, seq_num, uid) of one descriptor."""
    try:
        columns = expected_columns(reader_specs(desc))
    except BluestreamError:
        return {}
    decoded = _tail_dtypes(tail)
    out: dict[str | None, int] = {}
    rows = record_span(rec)
    for col in columns:
        group, _, key = col.name.partition("/")
        dtype = col.dtype if col.dtype is not None else decoded.get(col.name)
        if dtype is None:
            dtype = await _array_dtype(ctx, f"{rec['zarr_path']}/{col.name}")
        item = _STRING_BYTES if dtype.kind == "T" else dtype.itemsize
        fld = key if group in _COLUMN_GROUPS else None
        out[fld] = out.get(fld, 0) + rows * item * math.prod(col.shape)
    return out


def _tail_dtypes(blob: bytes) -> dict[str, np.dtype[Any]]:
    if not blob:
        return {}
    try:
        return {n: a.dtype for n, a in Tail.decode(blob).columns.items()}
    except Exception:  # unreadable: verify reports it; sizes fall back to the arrays
        return {}


async def _array_dtype(ctx: CatalogContext, path: str) -> np.dtype[Any]:
    """The dtype of an array whose first page chose it (8 bytes when unreadable)."""
    try:
        arr = await za.open_array(store=ctx.zarr_root.open_store(read_only=True), path=path,
                                  mode="r", zarr_format=3)
    except (*IO_ERRORS, ValueError, KeyError):
        return np.dtype(np.float64)
    return arr.dtype if isinstance(arr.dtype, np.dtype) else np.dtype(arr.dtype)


def _json_bytes(doc: Any) -> int:
    return len(json.dumps(doc, separators=(",", ":"), allow_nan=True,
                          default=_plain).encode())


def _plain(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return value.hex()
    return str(value)


# -- grouping ---------------------------------------------------------------------------------
def _put(parts: dict[Key, Usage], key: Key, usage: Usage) -> None:
    have = parts.get(key)
    parts[key] = usage if have is None else have + usage


def _group(parts: dict[Key, Usage], by: str) -> list[Usage]:
    """Rows at the level ``by``; events counted once per stream."""
    depth = BY.index(by) + 1
    out: dict[Key, Usage] = {}
    for (run, stream, fld), usage in parts.items():
        key: Key = (run, stream if depth > 1 else None, fld if depth > 2 else None)
        counted = usage if depth > 2 or fld is None else replace(usage, events=0)
        if depth > 2 and fld is not None:
            counted = replace(counted, events=parts.get((run, stream, None), Usage(run)).events)
        _put(out, key, replace(counted, run=key[0], stream=key[1], field=key[2]))
    return sorted(out.values(), key=lambda u: (u.run is None, u.run or "", u.stream is not None,
                                               u.stream or "", u.field is not None,
                                               u.field or ""))
