"""The catalog of one tenant's runs: lookup, search, iteration; async and sync.

:class:`AsyncCatalog` does the work. :class:`Catalog` is a thin synchronous wrapper that
runs it on a private event loop thread (so it also works in Jupyter, where the calling
thread already runs a loop). ``search`` returns a new, lazy catalog; nothing is cached
between calls, so counts and lookups always reflect what is stored now.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bluestream.catalog import integrity, usage
from bluestream.catalog.context import CatalogContext
from bluestream.catalog.loop_thread import LoopThread
from bluestream.catalog.removal import (
    PhaseHook,
    RemovalReport,
    finish_pending,
    remove_runs,
    select_prune,
)
from bluestream.catalog.run import AsyncBlueskyRun, BlueskyRun
from bluestream.catalog.run_keys import first_found
from bluestream.errors import AmbiguousUID, NotFound
from bluestream.handlers import HandlerClass
from bluestream.queries import And, Query, ScanID, TimeLike, as_query
from bluestream.settings import load_settings
from bluestream.storage.backends import is_mongo_uri, open_metadata_store
from bluestream.storage.base import MetadataStore
from bluestream.storage.query_rules import MIN_PARTIAL_UID
from bluestream.storage.rules import check_tenant, mask_uri
from bluestream.storage.zarr_root import S3_SCHEME, ZarrRoot

__all__ = [
    "MIN_PARTIAL_UID",
    "AsyncCatalog",
    "Catalog",
    "from_uri",
    "open_catalog",
    "open_catalog_async",
]

Doc = dict[str, Any]
#: A Zarr root as the catalog takes it: a directory, ``s3://bucket/prefix`` or a ZarrRoot.
RootArg = str | os.PathLike[str] | ZarrRoot
_PAGE = 100
_MAX_PAGE = 1_000
_CANDIDATES = 10


def _resolve_storage(metadata: str | None, zarr_root: RootArg | None,
                     config: str | os.PathLike[str] | None) -> tuple[str, ZarrRoot, int]:
    """Explicit arguments first, then the daemon's configuration (file + BLUESTREAM_*).
    An explicit ``s3://`` root takes the object store's options from the configuration
    when one is named, else from the standard AWS variables."""
    timeout_ms = 5_000
    path = config if config is not None else os.environ.get("BLUESTREAM_CONFIG") or None
    wants_s3 = isinstance(zarr_root, str) and zarr_root.startswith(S3_SCHEME) and \
        path is not None
    if metadata is None or zarr_root is None or wants_s3:
        settings = load_settings(None if path is None else Path(path))
        metadata = settings.storage.metadata if metadata is None else metadata
        root = settings.storage.zarr() if zarr_root is None else \
            ZarrRoot.parse(zarr_root, settings.storage.s3.options())
        timeout_ms = settings.storage.mongo_server_selection_timeout_ms
        return metadata, root, timeout_ms
    return metadata, ZarrRoot.parse(zarr_root), timeout_ms


def make_context(tenant: str, *, metadata: str | None = None,
                 zarr_root: RootArg | None = None,
                 config: str | os.PathLike[str] | None = None,
                 handlers: Mapping[str, HandlerClass] | None = None,
                 root_map: Mapping[str, str] | None = None,
                 timeout: float = 30.0, poll_interval: float = 0.2) -> CatalogContext:
    check_tenant(tenant)
    uri, root, timeout_ms = _resolve_storage(metadata, zarr_root, config)
    store = open_metadata_store(uri, tenant, server_selection_timeout_ms=timeout_ms,
                                readonly=True)

    def writer() -> MetadataStore:
        return open_metadata_store(uri, tenant, server_selection_timeout_ms=timeout_ms)

    return CatalogContext(tenant, store, root, dict(handlers or {}), dict(root_map or {}),
                          timeout=timeout, poll_interval=poll_interval, writer_factory=writer)


class AsyncCatalog:
    """Runs of one tenant matching a query (all of them at first), newest first.

    Use as ``async with open_catalog_async(...) as cat`` (or ``await cat.aclose()``),
    on an asyncio event loop (zarr's async API needs asyncio).
    Lookup: ``await cat[-1]`` (newest), ``await cat[42]`` (scan_id; newest duplicate),
    ``await cat["3f2a9"]`` (uid or a prefix of >= 5 characters).
    """

    def __init__(self, ctx: CatalogContext, query: Query | None = None, *,
                 owner: bool = True) -> None:
        self._ctx = ctx
        self._query = query
        self._owner = owner

    @property
    def tenant(self) -> str:
        return self._ctx.tenant

    @property
    def query(self) -> Query | None:
        return self._query

    async def open(self) -> AsyncCatalog:
        await self._ctx.ensure_open()
        return self

    async def aclose(self) -> None:
        if self._owner:
            await self._ctx.close()

    async def __aenter__(self) -> AsyncCatalog:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        q = "" if self._query is None else f" query={self._query!r}"
        return f"<AsyncCatalog tenant={self.tenant!r} at {self._ctx.where}{q}>"

    # -- queries --------------------------------------------------------------------------
    def search(self, query: Query | Mapping[str, Any]) -> AsyncCatalog:
        """A new catalog of the runs that also match ``query`` (lazy; chains with And)."""
        q = as_query(query)
        combined = q if self._query is None else And(self._query, q)
        return AsyncCatalog(self._ctx, combined, owner=False)

    async def count(self) -> int:
        await self._ctx.ensure_open()
        return await self._ctx.call("count runs", self._ctx.store.count, self._query)

    async def starts(self, skip: int = 0, limit: int | None = None) -> list[Doc]:
        """Start documents, newest first."""
        await self._ctx.ensure_open()
        return await self._ctx.call("search runs", self._ctx.store.search, self._query,
                                    skip=skip, limit=limit)

    async def uids(self, skip: int = 0, limit: int | None = None) -> list[str]:
        """Start uids, newest first (no documents read where the store can help it)."""
        await self._ctx.ensure_open()
        return await self._ctx.call("search runs", self._ctx.store.search_uids, self._query,
                                    skip=skip, limit=limit)

    async def __aiter__(self) -> AsyncIterator[str]:
        """Start uids, newest first, fetched a page at a time."""
        skip = 0
        while True:
            page = await self.uids(skip, _PAGE)
            for uid in page:
                yield uid
            if len(page) < _PAGE:
                return
            skip += len(page)

    async def values(self) -> AsyncIterator[AsyncBlueskyRun]:
        skip = 0
        while True:
            page = await self.starts(skip, _PAGE)
            for start in page:
                yield await AsyncBlueskyRun.load(self._ctx, start)
            if len(page) < _PAGE:
                return
            skip += len(page)

    async def load_run(self, start: Doc) -> AsyncBlueskyRun:
        """The run of a start document that :meth:`starts` returned."""
        return await AsyncBlueskyRun.load(self._ctx, start)

    async def items(self) -> AsyncIterator[tuple[str, AsyncBlueskyRun]]:
        async for run in self.values():
            yield run.uid, run

    # -- lookup -----------------------------------------------------------------------------
    def __getitem__(self, key: int | str) -> Coroutine[Any, Any, AsyncBlueskyRun]:
        """``await cat[key]``: see :meth:`lookup`."""
        return self.lookup(key)

    async def lookup(self, key: int | str) -> AsyncBlueskyRun:
        return await AsyncBlueskyRun.load(self._ctx, await self.lookup_start(key))

    async def lookup_start(self, key: int | str) -> Doc:
        """The start document for ``key``: a negative index (``-1`` newest), a scan_id
        (``>= 0``; the newest run with it), or a uid / uid prefix (>= 5 characters)."""
        await self._ctx.ensure_open()
        where = f"tenant {self.tenant!r}" + ("" if self._query is None else
                                              " (within this search)")
        if isinstance(key, bool) or not isinstance(key, int | np.integer | str):
            raise TypeError(f"runs are looked up by int (index / scan_id) or str (uid), "
                            f"not {type(key).__name__}")
        if isinstance(key, int | np.integer):
            key = int(key)
            if key < 0:
                docs = await self.starts(skip=-key - 1, limit=1)
                if not docs:
                    n = await self.count()
                    raise NotFound(f"index {key} is out of range: {n} run(s) in {where}")
                return docs[0]
            newest = ScanID(key, duplicates="all")  # newest first, so the latest one
            query: Query = newest if self._query is None else And(self._query, newest)
            docs = await self._ctx.call("search runs", self._ctx.store.search, query,
                                        skip=0, limit=1)
            if not docs:
                raise NotFound(f"no run with scan_id {key} in {where}")
            return docs[0]
        if len(key) < MIN_PARTIAL_UID:
            raise ValueError(f"partial uid {key!r} is too short: give at least "
                             f"{MIN_PARTIAL_UID} characters")
        candidates = await self._ctx.call("look up uid", self._ctx.store.uids_with_prefix,
                                          key, self._query, limit=_CANDIDATES)
        if key in candidates:
            uid = key
        elif not candidates:
            raise NotFound(f"no run with uid {key!r} (or starting with it) in {where}")
        elif len(candidates) > 1:
            more = " and more" if len(candidates) >= _CANDIDATES else ""
            raise AmbiguousUID(f"partial uid {key!r} matches {len(candidates)}{more} runs in "
                               f"{where}: {', '.join(candidates)}; give more characters")
        else:
            uid = candidates[0]
        start = await self._ctx.call("read start", self._ctx.store.get, "start", uid)
        if start is None:
            raise NotFound(f"no run with uid {uid!r} in {where}")
        return start

    async def contains(self, uid: str) -> bool:
        try:
            await self.lookup_start(uid)
        except (NotFound, ValueError):
            return False
        return True

    # -- removal ----------------------------------------------------------------------------
    async def remove(self, *keys: int | str, force: bool = False, settle: float = 5.0,
                     idle: float = 600.0, reason: str = "remove",
                     hook: PhaseHook | None = None) -> RemovalReport:
        """Remove runs (uids, uid prefixes, scan_ids, negative indices) for good, with
        their arrays: two-phase and crash-safe (:mod:`bluestream.catalog.removal`).
        Every key is looked up first: an unknown one raises NotFound, removing nothing
        (a key that names a run whose interrupted removal was just finished is done).
        Open runs are refused unless ``force``, and even then while anything of them is
        newer than ``idle`` seconds or they grow during ``settle`` seconds."""
        finished = await self.finish_removals(hook=hook)
        starts: dict[str, Doc] = {}
        for key in keys:
            start = await self.find_start(key, finished=finished)
            if start is not None:
                starts[str(start["uid"])] = start
        report = await remove_runs(self._ctx, list(starts.values()), force=force,
                                   settle=settle, idle=idle, reason=reason, hook=hook)
        report.finished = finished
        return report

    async def find_start(self, key: int | str, *, finished: Sequence[str] = ()
                         ) -> Doc | None:
        """The start of the run ``key`` names, read as a command-line RUN is (a long
        number is tried as a uid prefix first: :mod:`bluestream.catalog.run_keys`).
        None if it names none of the runs, but one of the ``finished`` removals."""
        try:
            return await first_found(key, self.lookup_start)
        except NotFound:
            if isinstance(key, str) and any(u == key or (len(key) >= MIN_PARTIAL_UID and
                                                         u.startswith(key))
                                            for u in finished):
                return None
            raise

    async def finish_removals(self, *, hook: PhaseHook | None = None) -> list[str]:
        """Complete removals that were interrupted (their runs are already hidden);
        the uids finished. :meth:`remove` and :meth:`prune` call this first."""
        await self._ctx.ensure_open()
        return [str(d["uid"]) for d in await finish_pending(self._ctx, hook=hook)]

    async def prune_candidates(self, before: TimeLike, query: Query | Mapping[str, Any]
                               | None = None) -> list[Doc]:
        """Start documents of the runs :meth:`prune` would remove, newest first."""
        q = select_prune(before, None if query is None else as_query(query))
        return await self.search(q).starts()

    async def prune(self, before: TimeLike, query: Query | Mapping[str, Any] | None = None,
                    *, force: bool = False, settle: float = 5.0, idle: float = 600.0,
                    hook: PhaseHook | None = None) -> RemovalReport:
        """Remove every run (of this catalog's search) started before ``before`` and
        matching ``query``; see :meth:`remove`."""
        finished = await self.finish_removals(hook=hook)
        starts = await self.prune_candidates(before, query)
        report = await remove_runs(self._ctx, starts, force=force, settle=settle, idle=idle,
                                   reason="prune", hook=hook)
        report.finished = finished
        return report

    # -- integrity, completeness, storage size (catalog/integrity.py, catalog/usage.py) -----
    async def verify(self, level: int = 4, runs: Sequence[int | str] | None = None, *,
                     progress: integrity.ProgressFn | None = None
                     ) -> list[integrity.Problem]:
        """Problems found by the integrity checks up to ``level`` (1-4, see
        :mod:`bluestream.catalog.integrity`) in ``runs`` (uids, uid prefixes, scan ids),
        or in every run of this catalog (of the whole tenant when it is not a search:
        then level 1 also finds documents whose start is gone). Empty: intact."""
        await self._ctx.ensure_open()
        uids = None if runs is None else await integrity.resolve_runs(
            self._ctx, [str(r) for r in runs], self.lookup_start)
        return await integrity.verify(self._ctx, level=level, runs=uids, query=self._query,
                                      progress=progress)

    async def stored(self, uids: Sequence[str], *, exact: bool = False) -> dict[str, bool]:
        """Whether each run (full uid) is complete: its stop arrived and every stream
        holds the events the stop records. A few queries for any number of runs;
        ``exact`` also counts the rows in the arrays. Unknown uids are False."""
        found = await integrity.completeness(self._ctx, uids, exact=exact)
        return {uid: found[uid].complete for uid in uids}

    def incomplete(self, *, exact: bool = False
                   ) -> AsyncIterator[tuple[Doc, integrity.Completeness]]:
        """(start document, what is missing) of every run of this catalog that is not
        complete, newest first."""
        return integrity.incomplete_runs(self._ctx, self._query, exact=exact)

    async def storage_size(self, by: str = "run", runs: Sequence[int | str] | None = None
                           ) -> usage.StorageReport:
        """Bytes on disk (or in the object store), in the metadata store, and logical
        (uncompressed) per run, stream or field (see :mod:`bluestream.catalog.usage`)."""
        await self._ctx.ensure_open()
        uids = None if runs is None else await integrity.resolve_runs(
            self._ctx, [str(r) for r in runs], self.lookup_start)
        return await usage.storage_size(self._ctx, by=by, runs=uids, query=self._query)


class Catalog:
    """Synchronous catalog (see :class:`AsyncCatalog` for the semantics).

    ``len(cat)``, ``list(cat)`` (start uids, newest first), ``cat[-1]``, ``cat[42]``,
    ``cat["3f2a9"]``, ``cat.search(...)``, ``keys()`` / ``values()`` / ``items()``.
    Close it (or use ``with``) to release the connection and the loop thread.
    """

    def __init__(self, inner: AsyncCatalog, loop: LoopThread, *, owner: bool = True) -> None:
        self._inner = inner
        self._loop = loop
        self._owner = owner

    @property
    def aio(self) -> AsyncCatalog:
        """The asynchronous catalog behind this one (use it on the catalog's loop only)."""
        return self._inner

    @property
    def tenant(self) -> str:
        return self._inner.tenant

    @property
    def query(self) -> Query | None:
        return self._inner.query

    def close(self) -> None:
        if self._owner and not self._loop.closed:
            try:
                self._loop.call(self._inner.aclose)
            finally:
                self._loop.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        q = "" if self.query is None else f" query={self.query!r}"
        try:
            n = f" {len(self)} runs"
        except Exception:  # a repr must not raise (storage down, catalog closed)
            n = ""
        return f"<Catalog tenant={self.tenant!r}{n} at {self._inner._ctx.where}{q}>"

    def search(self, query: Query | Mapping[str, Any]) -> Catalog:
        return Catalog(self._inner.search(query), self._loop, owner=False)

    def __len__(self) -> int:
        return self._loop.call(self._inner.count)

    def __iter__(self) -> Iterator[str]:
        return self.keys()

    def keys(self) -> Iterator[str]:
        """Start uids, newest first, fetched a page at a time: one call into the event
        loop per page, not per uid (10,000 uids took 2.7 s one by one). Pages grow
        from 100 to 1,000, so the first results come at once; nothing is held whole."""
        skip, size = 0, _PAGE
        while True:
            page = self._loop.call(self._inner.uids, skip, size)
            yield from page
            if len(page) < size:
                return
            skip += len(page)
            size = min(size * 2, _MAX_PAGE)

    def values(self) -> Iterator[BlueskyRun]:
        for run in self._loop.iterate(self._inner.values()):
            yield BlueskyRun(run, self._loop)

    def items(self) -> Iterator[tuple[str, BlueskyRun]]:
        for run in self.values():
            yield run.uid, run

    def __getitem__(self, key: int | str) -> BlueskyRun:
        return BlueskyRun(self._loop.call(self._inner.lookup, key), self._loop)

    def __contains__(self, uid: object) -> bool:
        if not isinstance(uid, str):
            return False
        return self._loop.call(self._inner.contains, uid)

    @staticmethod
    def from_uri(uri: str, *, zarr_root: RootArg, tenant: str | None = None,
                 **kwargs: Any) -> Catalog:
        """See :func:`from_uri`."""
        return from_uri(uri, zarr_root=zarr_root, tenant=tenant, **kwargs)

    def get(self, key: int | str, default: Any = None) -> Any:
        try:
            return self[key]
        except NotFound:
            return default

    def remove(self, *keys: int | str, force: bool = False, settle: float = 5.0,
               idle: float = 600.0, reason: str = "remove") -> RemovalReport:
        """See :meth:`AsyncCatalog.remove`."""
        return self._loop.call(lambda: self._inner.remove(*keys, force=force, settle=settle,
                                                          idle=idle, reason=reason))

    def finish_removals(self) -> list[str]:
        """See :meth:`AsyncCatalog.finish_removals`."""
        return self._loop.call(self._inner.finish_removals)

    def prune_candidates(self, before: TimeLike,
                         query: Query | Mapping[str, Any] | None = None) -> list[Doc]:
        return self._loop.call(lambda: self._inner.prune_candidates(before, query))

    def prune(self, before: TimeLike, query: Query | Mapping[str, Any] | None = None, *,
              force: bool = False, settle: float = 5.0, idle: float = 600.0
              ) -> RemovalReport:
        """See :meth:`AsyncCatalog.prune`."""
        return self._loop.call(lambda: self._inner.prune(before, query, force=force,
                                                         settle=settle, idle=idle))

    # -- integrity, completeness, storage size --------------------------------------------
    def verify(self, level: int = 4, runs: Sequence[int | str] | None = None, *,
               progress: integrity.ProgressFn | None = None) -> list[integrity.Problem]:
        """See :meth:`AsyncCatalog.verify`; ``[]`` when everything checked is intact."""
        return self._loop.call(lambda: self._inner.verify(level, runs, progress=progress))

    def stored(self, uids: Sequence[str], *, exact: bool = False) -> dict[str, bool]:
        """See :meth:`AsyncCatalog.stored` (the QuantumBackedButler's ``stored_many``)."""
        return self._loop.call(lambda: self._inner.stored(uids, exact=exact))

    def incomplete(self, *, exact: bool = False
                   ) -> Iterator[tuple[Doc, integrity.Completeness]]:
        """See :meth:`AsyncCatalog.incomplete`."""
        return self._loop.iterate(self._inner.incomplete(exact=exact))

    def storage_size(self, by: str = "run", runs: Sequence[int | str] | None = None
                     ) -> usage.StorageReport:
        """See :meth:`AsyncCatalog.storage_size`."""
        return self._loop.call(lambda: self._inner.storage_size(by, runs))


def open_catalog_async(tenant: str, *, metadata: str | None = None,
                       zarr_root: RootArg | None = None,
                       config: str | os.PathLike[str] | None = None,
                       handlers: Mapping[str, HandlerClass] | None = None,
                       root_map: Mapping[str, str] | None = None,
                       timeout: float = 30.0, poll_interval: float = 0.2) -> AsyncCatalog:
    """An :class:`AsyncCatalog` of ``tenant`` (connected on first use or ``async with``).

    ``metadata`` (``mongodb://...`` or ``sqlite:///path``) and ``zarr_root`` default to
    the daemon's configuration: the TOML file named by ``config`` or
    ``BLUESTREAM_CONFIG``, then ``BLUESTREAM_*`` environment variables. ``handlers``
    adds or overrides handler classes by spec for this catalog; ``root_map`` maps
    resource roots that moved.
    """
    return AsyncCatalog(make_context(tenant, metadata=metadata, zarr_root=zarr_root,
                                     config=config, handlers=handlers, root_map=root_map,
                                     timeout=timeout, poll_interval=poll_interval))


def open_catalog(tenant: str, *, metadata: str | None = None,
                 zarr_root: RootArg | None = None,
                 config: str | os.PathLike[str] | None = None,
                 handlers: Mapping[str, HandlerClass] | None = None,
                 root_map: Mapping[str, str] | None = None,
                 timeout: float = 30.0, poll_interval: float = 0.2) -> Catalog:
    """A synchronous :class:`Catalog` of ``tenant``, connected (see
    :func:`open_catalog_async` for the arguments). Raises StorageUnavailable naming
    the URI if the metadata store cannot be reached."""
    inner = open_catalog_async(tenant, metadata=metadata, zarr_root=zarr_root, config=config,
                               handlers=handlers, root_map=root_map, timeout=timeout,
                               poll_interval=poll_interval)
    loop = LoopThread(f"bluestream-catalog-{tenant}")
    try:
        loop.call(inner.open)
    except BaseException:
        try:
            loop.call(inner.aclose)
        finally:
            loop.close()
        raise
    return Catalog(inner, loop)


def from_uri(uri: str, *, zarr_root: RootArg, tenant: str | None = None,
             **kwargs: Any) -> Catalog:
    """``Catalog.from_uri("mongodb://host/csx", zarr_root=...)``: the tenant is the
    MongoDB database named in the URI path unless given."""
    if tenant is None:
        if not is_mongo_uri(uri):
            raise ValueError(f"give tenant= for {mask_uri(uri)}: only MongoDB URIs name one")
        rest = uri.split("://", 1)[1].split("?", 1)[0]
        _, _, db = rest.partition("/")
        if not db:
            raise ValueError(f"{mask_uri(uri)} names no database: give tenant=")
        tenant = db  # the URI stays as given: its path is also the default auth database
    return open_catalog(tenant, metadata=uri, zarr_root=zarr_root, **kwargs)

