"""Tiled 0.2 adapters over bluestream's catalog (see :mod:`bluestream.tiled`).

Nodes are built per request from what the metadata store and the Zarr arrays hold now,
except the streams of closed runs, which :class:`StreamCache` reuses while the store's
records for them stay the same (an open run is built on every request: it grows between
two). Arrays are the lazy dask arrays of the Python catalog's ``to_dask()``, whose blocks
are the Zarr chunks: a block request reads one chunk. The ``internal`` table reads the
columns asked for through the stream's own (eager, concurrent) read. What Tiled needs of
an adapter (``structure_family``, ``metadata()``, ``specs``, ``structure()``; for
containers ``lookup_adapter`` raising ``NoEntry``, ``exact_len``,
``keys_range``/``items_range``, ``search``, ``sort``) is the protocol of the Tiled 0.2
server.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import anyio

# Registers the query types of older bluesky-tiled-plugins clients (scan_id, partial_uid,
# scan_id_range, time_range) with Tiled: it must happen before the server's app is built,
# which importing the tree's module does. An unregistered filter is silently ignored.
import bluesky_tiled_plugins.queries  # noqa: F401
import numpy as np
from tiled.server.core import NoEntry
from tiled.structures.array import ArrayStructure
from tiled.structures.core import Spec, StructureFamily
from tiled.structures.table import TableStructure
from tiled.utils import UnsupportedQueryType

from bluestream.catalog.core import AsyncCatalog, make_context
from bluestream.catalog.run import AsyncBlueskyRun
from bluestream.catalog.stream import is_stream_key
from bluestream.errors import ConfigError, NotFound, StorageError, StorageUnavailable
from bluestream.settings import load_settings
from bluestream.storage.backends import list_tenants
from bluestream.storage.rules import check_tenant
from bluestream.tiled.queries import translate

__all__ = ["ArrayNode", "CatalogNode", "RunNode", "StreamNode", "TableNode", "TenantsNode"]

CATALOG_SPECS = [Spec("CatalogOfBlueskyRuns", version="3.0")]
RUN_SPECS = [Spec("BlueskyRun", version="3.0")]
STREAM_SPECS = [Spec("BlueskyEventStream", version="3.0"), Spec("composite")]
_DROPPED_FROM_DESCRIPTOR = ("name", "object_keys", "run_start")
#: Sort keys that mean "by start time" (the order the store keeps).
_TIME_KEYS = ("", "_", "time", "start.time", "metadata.start.time")


@contextmanager
def _http_errors() -> Iterator[None]:
    """bluestream's errors as HTTP answers: a store that does not answer is 503, a query
    the store refuses 400, stored data that cannot be read 500 with the reason (not an
    unhandled exception)."""
    from fastapi import HTTPException

    try:
        yield
    except StorageUnavailable as exc:
        raise HTTPException(status_code=503, detail=str(exc)) from exc
    except StorageError as exc:
        raise HTTPException(status_code=500, detail=str(exc)) from exc
    except (ValueError, TypeError) as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from exc


def _jsonable(value: Any) -> Any:
    """Documents as JSON: numpy values become Python ones."""
    return json.loads(json.dumps(value, default=_default))


def _default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class _Paged:
    """Offset paging as Tiled's server asks for it: with ``items_page`` present it calls
    ``cursor_for_offset`` (None: no cursors here), then ``*_page(None, limit)`` for the
    first page and ``*_range(offset, limit)`` for the others."""

    async def keys_range(self, offset: int = 0, limit: int | None = None) -> list[str]:
        raise NotImplementedError

    async def items_range(self, offset: int = 0, limit: int | None = None
                          ) -> list[tuple[str, Any]]:
        raise NotImplementedError

    async def cursor_for_offset(self, offset: int) -> None:
        return None

    async def keys_page(self, cursor: Any, limit: int) -> tuple[list[str], None]:
        return await self.keys_range(0, limit), None

    async def items_page(self, cursor: Any, limit: int) -> tuple[list[tuple[str, Any]], None]:
        return await self.items_range(0, limit), None


class _Container(_Paged):
    """Shared by the containers with a fixed set of children (runs, streams)."""

    structure_family = StructureFamily.container
    specs: list[Spec] = []

    def __init__(self, metadata: dict[str, Any]) -> None:
        self._metadata = metadata

    def metadata(self) -> dict[str, Any]:
        return self._metadata

    def structure(self) -> None:
        return None

    def _keys(self) -> list[str]:
        raise NotImplementedError

    async def _child(self, key: str) -> Any:
        raise NotImplementedError

    async def lookup_adapter(self, segments: Sequence[str]) -> Any:
        if not segments:
            return self
        head, *rest = segments
        if head not in self._keys():
            raise NoEntry(list(segments))
        child = await self._child(head)
        if not rest:
            return child
        if not hasattr(child, "lookup_adapter"):
            raise NoEntry(list(segments))
        return await child.lookup_adapter(rest)

    async def exact_len(self) -> int:
        return len(self._keys())

    async def keys_range(self, offset: int = 0, limit: int | None = None) -> list[str]:
        keys = self._keys()
        return keys[offset:None if limit is None else offset + limit]

    async def items_range(self, offset: int = 0, limit: int | None = None
                          ) -> list[tuple[str, Any]]:
        return [(k, await self._child(k)) for k in await self.keys_range(offset, limit)]

    def search(self, query: Any) -> Any:
        raise UnsupportedQueryType(f"{type(self).__name__} cannot be searched")

    def read(self, fields: Sequence[str] | None = None) -> Any:
        return self


class ArrayNode:
    """One data key with a per-event shape: blocks are the Zarr chunks. Where the
    stream gives a direct reader of the key's rows (:meth:`AsyncEventStream.row_reader`),
    a read of a block or a slice of rows reads those rows from Zarr into one array (its
    chunks concurrently); otherwise it computes the dask array."""

    structure_family = StructureFamily.array
    specs: list[Spec] = []

    def __init__(self, values: Any, dims: tuple[str, ...], metadata: dict[str, Any],
                 rows: Callable[[int, int], Awaitable[np.ndarray]] | None = None) -> None:
        self._values = values  # a dask array over the Zarr chunks, or numpy
        self._structure = ArrayStructure.from_array(values, dims=dims)
        self._metadata = metadata
        self._rows = rows

    def metadata(self) -> dict[str, Any]:
        return self._metadata

    def structure(self) -> ArrayStructure:
        return self._structure

    async def _compute(self, values: Any) -> np.ndarray:
        if hasattr(values, "compute"):
            with _http_errors():
                return np.asarray(await anyio.to_thread.run_sync(values.compute))
        return np.asarray(values)

    async def _direct(self, sel: tuple[Any, ...]) -> np.ndarray | None:
        """``sel`` read through the row reader; None when it has none or ``sel`` does not
        start with an index or a slice of step 1 along the rows."""
        if self._rows is None:
            return None
        n = int(self._structure.shape[0])
        first, rest = (sel[0] if sel else slice(None)), tuple(sel[1:])
        if isinstance(first, int | np.integer) and not isinstance(first, bool):
            i = int(first) + (n if first < 0 else 0)
            if not 0 <= i < n:
                return None  # the dask array raises the usual IndexError
            with _http_errors():
                one = _whole(await self._rows(i, i + 1), 1)[0]
            return np.asarray(one[rest] if rest else one)
        if isinstance(first, slice):
            a, b, step = first.indices(n)
            if step != 1:
                return None
            with _http_errors():
                out = _whole(await self._rows(a, max(a, b)), max(0, b - a))
            return out[(slice(None), *rest)] if rest else out
        return None

    async def read(self, slice: Any = None) -> np.ndarray:
        if isinstance(self._values, _Deferred):
            whole = await self._values.load()
            return whole[tuple(slice)] if slice else whole
        direct = await self._direct(tuple(slice) if slice else ())
        if direct is not None:
            return direct
        values = self._values if not slice else self._values[tuple(slice)]
        return await self._compute(values)

    async def read_block(self, block: Sequence[int], slice: Any = None) -> np.ndarray:
        values = self._values
        if isinstance(values, _Deferred):
            values = await values.load()
        out = await self._direct(_block_slices(self._structure.chunks, block))
        if out is None:
            if hasattr(values, "blocks"):
                part = values.blocks[tuple(block)]
            else:
                part = values[_block_slices(self._structure.chunks, block)]
            out = await self._compute(part)
        return out[tuple(slice)] if slice else out


def _whole(rows: np.ndarray, n: int) -> np.ndarray:
    """``rows`` if it holds the ``n`` rows asked for; a StorageError (500 with the
    reason) if fewer came back (the run's arrays removed or cut while being read)."""
    if len(rows) != n:
        raise StorageError(f"{n} rows asked for, {len(rows)} stored: the arrays changed "
                           "while being read")
    return rows


def _block_slices(chunks: Sequence[Sequence[int]], block: Sequence[int]) -> tuple[slice, ...]:
    out = []
    for sizes, i in zip(chunks, block, strict=True):
        start = int(sum(sizes[:i]))
        out.append(slice(start, start + int(sizes[i])))
    return tuple(out)


class TableNode:
    """The ``internal`` table: ``seq_num``, ``time``, the scalar data keys and the
    timestamps of every key (``ts_<key>``, as TiledWriter writes them). The structure
    needs the columns' types only; a read fetches the columns asked for in one read of
    the stream (every Zarr array concurrently, as the local ``read()`` does): a request
    for one frame of a run reads none of them."""

    structure_family = StructureFamily.table
    specs: list[Spec] = []

    def __init__(self, stream: Any, dtypes: dict[str, np.dtype[Any]], length: int,
                 timestamp_keys: dict[str, str], metadata: dict[str, Any]) -> None:
        import pyarrow as pa

        self._stream = stream
        self._dtypes = dtypes  # column -> dtype (seq_num, time, data keys, ts_<key>)
        self._length = length
        self._timestamp_keys = timestamp_keys  # ts_<key> -> key
        schema = pa.schema([(name, pa.string() if dt.kind in "TOU"
                             else pa.from_numpy_dtype(dt)) for name, dt in dtypes.items()])
        self._structure = TableStructure.from_schema(schema, npartitions=1)
        self._metadata = metadata

    def metadata(self) -> dict[str, Any]:
        return self._metadata

    def structure(self) -> TableStructure:
        return self._structure

    def _check(self, fields: Sequence[str] | None) -> list[str]:
        names = list(fields) if fields else list(self._dtypes)
        missing = [f for f in names if f not in self._dtypes]
        if missing:
            raise KeyError(missing[0])
        return names

    async def _columns(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """The columns ``names``, their rows those of one read of the stream (the
        timestamps NaN where a second read saw other rows: an open run that grew)."""
        ts_keys = [self._timestamp_keys[n] for n in names if n in self._timestamp_keys]
        data = [n for n in names if n not in self._timestamp_keys
                and n not in ("seq_num", "time")]
        with _http_errors():
            ds = await self._stream.read(fields=data, uids=False)
            ts = await self._stream.timestamps(fields=ts_keys, uids=False) \
                if ts_keys else None
        seq = np.asarray(ds["seq_num"].values, dtype=np.int64)
        out: dict[str, np.ndarray] = {"seq_num": seq,
                                      "time": np.asarray(ds["time"].values, np.float64)}
        out.update({n: np.asarray(ds[n].values) for n in data})
        rows = _rows_alike(ds, ts) if ts is not None else 0
        for name in names:
            if name in self._timestamp_keys:
                key = self._timestamp_keys[name]
                out[name] = np.asarray(ts[key].values[:rows], dtype=np.float64) \
                    if rows and ts is not None and key in ts else np.full(len(seq), np.nan)
        return {n: _arrow_ready(out[n]) for n in names}

    async def read(self, fields: Sequence[str] | None = None) -> Any:
        import pandas as pd

        names = self._check(fields)
        columns = await self._columns(names)
        return await anyio.to_thread.run_sync(lambda: pd.DataFrame(columns))

    async def read_partition(self, partition: int, fields: Sequence[str] | None = None
                             ) -> Any:
        if partition != 0:
            raise IndexError(partition)
        return await self.read(fields)

    def __getitem__(self, key: str) -> ArrayNode:
        # A column alone (``.../internal/<column>``) is an array node; text columns have
        # no array structure of known width before they are read: those are served
        # through the table only (a 404 here, not a failure).
        if key not in self._dtypes or self._dtypes[key].kind in "TOU":
            raise KeyError(key)

        async def fetch() -> np.ndarray:
            return (await self._columns([key]))[key]
        return ArrayNode(_Deferred(self._length, self._dtypes[key], fetch), ("time",), {})


def _rows_alike(ds: Any, ts: Any) -> int:
    """How many rows of the timestamps ``ts`` are ``ds``'s rows: all of ``ds``'s when
    the first ones of ``ts`` have its times and seq_nums (a run that grew between the two
    reads has more), else 0. Compared by ``time`` (always a coordinate) and ``seq_num``
    where both hold it as a coordinate (a data key of that name replaces it)."""
    n = ds.sizes.get("time", 0)
    if ts.sizes.get("time", 0) < n:
        return 0
    if not np.array_equal(ts["time"].values[:n], ds["time"].values, equal_nan=True):
        return 0
    if "seq_num" in ds.coords and "seq_num" in ts.coords and \
            not np.array_equal(ts.coords["seq_num"].values[:n], ds.coords["seq_num"].values):
        return 0
    return int(n)


class _Deferred:
    """A column read only when asked for (``await load()``); shape and dtype are known
    without reading it, which is all a structure needs."""

    ndim = 1

    def __init__(self, n: int, dtype: np.dtype[Any],
                 fetch: Callable[[], Awaitable[np.ndarray]]) -> None:
        self.shape = (n,)
        self.dtype = np.dtype(object) if dtype.kind in "TOU" else dtype
        self._fetch = fetch

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise TypeError("a deferred column is read with load()")

    async def load(self) -> np.ndarray:
        return np.asarray(await self._fetch())


def _arrow_ready(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind in "TOU":
        return values.astype(str).astype(object)
    return values


class StreamNode(_Container):
    specs = STREAM_SPECS

    def __init__(self, metadata: dict[str, Any], children: dict[str, Any]) -> None:
        super().__init__(metadata)
        self._children = children

    @classmethod
    async def load(cls, run: AsyncBlueskyRun, name: str) -> StreamNode:
        stream = run[name]
        descriptors = await stream.descriptors()
        ds = await stream.to_dask(uids=False)
        first = dict(descriptors[0]) if descriptors else {}
        data_keys = {k: dict(v) for d in descriptors for k, v in d.get("data_keys", {}).items()}
        for key, dk in data_keys.items():
            if key in ds:
                dk["dtype_numpy"] = str(np.dtype(ds[key].dtype))
        for obj, keys in first.get("object_keys", {}).items():
            for key in keys:
                if key in data_keys:
                    data_keys[key]["object_name"] = obj
        metadata = {k: v for k, v in first.items() if k not in _DROPPED_FROM_DESCRIPTOR}
        metadata["data_keys"] = data_keys
        if len(descriptors) > 1:
            metadata["_config_updates"] = [
                {"uid": d["uid"], "time": d.get("time"),
                 "configuration": d.get("configuration", {})} for d in descriptors[1:]]
        arrays: dict[str, Any] = {}
        dtypes: dict[str, np.dtype[Any]] = {"seq_num": np.dtype(np.int64),
                                            "time": np.dtype(np.float64)}
        table_md: dict[str, Any] = {}
        for key in ds.data_vars:
            var = ds[key]
            name = str(key)
            if var.ndim > 1:
                reader = await stream.row_reader(name)
                rows = reader[1] if reader is not None and reader[0] == var.shape[0] \
                    else None
                arrays[name] = ArrayNode(var.data, tuple(str(d) for d in var.dims),
                                         _jsonable(data_keys.get(name, {})), rows)
            elif name not in dtypes:
                dtypes[name] = np.dtype(var.dtype)
                table_md[name] = _jsonable(data_keys.get(name, {}))
        # TiledWriter's timestamps columns, ts_<key> (the client's read([TIMESTAMPS])).
        timestamp_keys = {f"ts_{key}": key for key, dk in data_keys.items()
                          if not is_stream_key(dk)}
        dtypes.update({name: np.dtype(np.float64) for name in timestamp_keys})
        table = TableNode(stream, dtypes, int(ds.sizes.get("time", 0)), timestamp_keys,
                          table_md)
        children = {**arrays, "internal": table}
        return cls(_jsonable(metadata), children)

    def _keys(self) -> list[str]:
        return list(self._children)

    async def _child(self, key: str) -> Any:
        return self._children[key]


#: How long the streams of a closed run are reused (see :class:`StreamCache`).
STREAM_CACHE_TTL_S = 30.0
#: How many streams a tenant keeps built.
STREAM_CACHE_SIZE = 32


class StreamCache:
    """Streams of closed runs, built once and reused while the metadata store holds the
    same descriptors and ``event_stream`` records for them (compared on every use: a
    late write shows at once), for at most :data:`STREAM_CACHE_TTL_S` (what the records
    cannot tell, e.g. a hole filled after the stop, shows within that). A run still open
    is built on every request (it grows between two). Building a stream reads its
    ``seq_num`` and ``time`` columns and opens its arrays: without the cache, every
    request of a client's ``read()`` (metadata, search, then the data) paid it."""

    def __init__(self) -> None:
        self._entries: OrderedDict[tuple[str, str],
                                   tuple[tuple[Any, ...], float, StreamNode]] = OrderedDict()
        #: Builds under way, so that concurrent requests (a client fetches blocks on
        #: several threads) wait for one build instead of each making its own.
        self._building: dict[tuple[str, str], tuple[tuple[Any, ...], anyio.Event]] = {}

    def _fresh(self, key: tuple[str, str], token: tuple[Any, ...]) -> StreamNode | None:
        hit = self._entries.get(key)
        if hit is not None and hit[0] == token and \
                time.monotonic() - hit[1] < STREAM_CACHE_TTL_S:
            self._entries.move_to_end(key)
            return hit[2]
        return None

    async def get(self, run: AsyncBlueskyRun, name: str) -> StreamNode:
        if run.stop is None:
            return await StreamNode.load(run, name)
        token = await run[name].state_token()
        if token is None:
            return await StreamNode.load(run, name)
        key = (run.uid, name)
        node = self._fresh(key, token)
        if node is not None:
            return node
        pending = self._building.get(key)
        if pending is not None and pending[0] == token:
            await pending[1].wait()  # its build failed or is stale: build here
            node = self._fresh(key, token)
            if node is not None:
                return node
        done = anyio.Event()
        self._building[key] = (token, done)
        try:
            node = await StreamNode.load(run, name)  # built after the token: never older
            self._entries[key] = (token, time.monotonic(), node)
            self._entries.move_to_end(key)
            while len(self._entries) > STREAM_CACHE_SIZE:
                self._entries.popitem(last=False)
            return node
        finally:
            if self._building.get(key, (None, None))[1] is done:
                del self._building[key]
            done.set()


class RunNode(_Container):
    specs = RUN_SPECS

    def __init__(self, run: AsyncBlueskyRun, streams: StreamCache | None = None) -> None:
        md: dict[str, Any] = {"start": _jsonable(run.start)}
        if run.stop is not None:
            md["stop"] = _jsonable(run.stop)
        super().__init__(md)
        self.run = run
        self._streams = streams if streams is not None else StreamCache()

    def _keys(self) -> list[str]:
        return list(self.run.streams)

    async def _child(self, key: str) -> StreamNode:
        with _http_errors():
            return await self._streams.get(self.run, key)

    def __dask_tokenize__(self) -> tuple[Any, ...]:
        # Tiled's ETag of /container/full (documents()): an open run changes, so the
        # token does too (never cached stale).
        return ("bluestream-run", self.run.uid, os.urandom(8).hex())


class CatalogNode(_Paged):
    """The runs of one tenant (those matching the searches so far), oldest first by
    default: ``c[-1]`` asks for the reverse order and gets the newest."""

    structure_family = StructureFamily.container
    specs = CATALOG_SPECS

    def __init__(self, catalog: AsyncCatalog, *, newest_first: bool = False,
                 metadata: dict[str, Any] | None = None,
                 streams: StreamCache | None = None) -> None:
        self._catalog = catalog
        self._newest_first = newest_first
        self._metadata = metadata or {}
        self._streams = streams if streams is not None else StreamCache()

    @classmethod
    def for_tenant(cls, tenant: str, *, metadata: str | None = None,
                   zarr_root: str | None = None, config: str | None = None) -> CatalogNode:
        ctx = make_context(tenant, metadata=metadata, zarr_root=zarr_root, config=config)
        return cls(AsyncCatalog(ctx), metadata={"tenant": tenant})

    def metadata(self) -> dict[str, Any]:
        return self._metadata

    def structure(self) -> None:
        return None

    @property
    def sorting(self) -> list[tuple[str, int]]:
        return [("", 1)]

    def _variation(self, catalog: AsyncCatalog, newest_first: bool) -> CatalogNode:
        return CatalogNode(catalog, newest_first=newest_first, metadata=self._metadata,
                           streams=self._streams)

    def search(self, query: Any) -> CatalogNode:
        translated = translate(query)
        if translated is None:
            return self
        return self._variation(self._catalog.search(translated), self._newest_first)

    def sort(self, sorting: Sequence[tuple[str, int]]) -> CatalogNode:
        newest_first = self._newest_first
        for key, direction in sorting:
            if key not in _TIME_KEYS:
                raise UnsupportedQueryType(f"runs are sorted by start time only, not by "
                                           f"{key!r}")
            newest_first = direction < 0
        return self._variation(self._catalog, newest_first)

    async def exact_len(self) -> int:
        return int(await self._call(self._catalog.count()))

    async def check_open(self) -> None:
        """Open the tenant's store (read-only): NoEntry (404) if the tenant is unknown."""
        await self._call(self._catalog.open())

    async def aclose(self) -> None:
        await self._catalog.aclose()

    async def _call(self, awaitable: Any) -> Any:
        try:
            with _http_errors():
                return await awaitable
        except NotFound as exc:
            raise NoEntry([str(exc)]) from exc

    async def _starts(self, offset: int, limit: int | None) -> list[dict[str, Any]]:
        if self._newest_first:
            return list(await self._call(self._catalog.starts(offset, limit)))
        # The store keeps newest first: the oldest-first page [offset, offset + limit)
        # is the newest-first page that ends ``offset`` runs before the end, reversed.
        total = await self.exact_len()
        stop = total - offset
        if stop <= 0:
            return []
        first = 0 if limit is None else max(0, stop - limit)
        page = await self._call(self._catalog.starts(first, stop - first))
        return list(reversed(page))

    async def keys_range(self, offset: int = 0, limit: int | None = None) -> list[str]:
        return [str(s["uid"]) for s in await self._starts(offset, limit)]

    async def items_range(self, offset: int = 0, limit: int | None = None
                          ) -> list[tuple[str, RunNode]]:
        out = []
        for start in await self._starts(offset, limit):
            with _http_errors():
                run = await self._catalog.load_run(start)
            out.append((run.uid, RunNode(run, self._streams)))
        return out

    async def lookup_adapter(self, segments: Sequence[str]) -> Any:
        if not segments:
            return self
        head, *rest = segments
        try:
            start = await self._catalog.lookup_start(head)
        except (NotFound, ValueError, TypeError):
            raise NoEntry(list(segments)) from None
        if start.get("uid") != head:  # a uid prefix is a search, not a path
            raise NoEntry(list(segments))
        with _http_errors():
            run = RunNode(await self._catalog.load_run(start), self._streams)
        return await run.lookup_adapter(rest) if rest else run

    def read(self, fields: Sequence[str] | None = None) -> Any:
        return self


#: How long a listing of the tenants is reused (a new tenant shows within this).
TENANTS_TTL_S = 2.0


class TenantsNode(_Container):
    """Every tenant of a metadata store (or those named). The list is read again when
    older than :data:`TENANTS_TTL_S`; a request for one tenant does not list them at
    all (a MongoDB server with many databases costs a round trip per database to list),
    it opens that tenant's catalog, once, and a tenant that does not exist is a 404."""

    def __init__(self, *, metadata: str | None, zarr_root: str | None,
                 tenants: Sequence[str] | None, config: str | None) -> None:
        super().__init__({})
        self._uri = metadata
        self._zarr_root = zarr_root
        self._config = config
        self._named = list(tenants) if tenants else None
        self._catalogs: dict[str, CatalogNode] = {}
        self._missing: dict[str, float] = {}  # tenant -> when it was found not to exist
        self._known: list[str] = []
        self._listed_at = -float("inf")

    def _keys(self) -> list[str]:
        return self._known

    async def _refresh(self) -> list[str]:
        if self._named is not None:
            self._known = list(self._named)
        elif time.monotonic() - self._listed_at >= TENANTS_TTL_S:
            uri = self._uri
            if uri is None:
                uri = load_settings(self._config).storage.metadata
            with _http_errors():
                self._known = sorted(await list_tenants(uri))
            self._listed_at = time.monotonic()
        return self._known

    async def _child(self, key: str) -> CatalogNode:
        node = self._catalogs.get(key)
        if node is not None:
            return node
        missed = self._missing.get(key)
        if missed is not None and time.monotonic() - missed < TENANTS_TTL_S:
            raise NoEntry([key])  # asked again within the TTL: no new open
        try:
            check_tenant(key)
        except ConfigError:  # not a tenant name at all
            raise NoEntry([key]) from None
        node = CatalogNode.for_tenant(key, metadata=self._uri, zarr_root=self._zarr_root,
                                      config=self._config)
        try:
            await node.check_open()
        except Exception as exc:  # unknown (404), or the store is away (503)
            with contextlib.suppress(Exception):
                await node.aclose()  # its client, opened to find out
            if isinstance(exc, NoEntry):
                self._missing[key] = time.monotonic()
            raise
        kept = self._catalogs.setdefault(key, node)  # the first of concurrent opens
        if kept is not node:
            await node.aclose()
        self._missing.pop(key, None)
        return kept

    async def items_range(self, offset: int = 0, limit: int | None = None
                          ) -> list[tuple[str, Any]]:
        out = []
        for key in await self.keys_range(offset, limit):
            try:
                out.append((key, await self._child(key)))
            except NoEntry:  # removed since the listing
                continue
        return out

    async def lookup_adapter(self, segments: Sequence[str]) -> Any:
        if not segments:
            return self
        head, *rest = segments
        if self._named is not None and head not in self._named:
            raise NoEntry(list(segments))
        child = await self._child(head)
        return await child.lookup_adapter(rest) if rest else child

    async def exact_len(self) -> int:
        return len(await self._refresh())

    async def keys_range(self, offset: int = 0, limit: int | None = None) -> list[str]:
        await self._refresh()
        return await super().keys_range(offset, limit)
