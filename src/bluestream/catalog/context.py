"""What every catalog object of one opened catalog shares: the store, the arrays, the
handlers. One per ``open_catalog`` call; sub-catalogs from ``search`` reuse it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio

from bluestream.catalog.arrays import ArrayReader
from bluestream.catalog.fill import DatumResolver
from bluestream.errors import StorageUnavailable
from bluestream.handlers import HandlerClass
from bluestream.storage.base import MetadataStore
from bluestream.storage.rules import mask_uri
from bluestream.storage.zarr_root import ZarrRoot

__all__ = ["CatalogContext"]

T = TypeVar("T")

@dataclass
class CatalogContext:
    tenant: str
    store: MetadataStore
    zarr_root: ZarrRoot
    handlers: dict[str, HandlerClass] = field(default_factory=dict)
    root_map: dict[str, str] = field(default_factory=dict)
    #: Seconds allowed for one metadata call before StorageUnavailable.
    timeout: float = 30.0
    poll_interval: float = 0.2
    #: Makes a writable store of the same tenant, for what readers may change
    #: (annotations, removal); None: this catalog cannot write.
    writer_factory: Callable[[], MetadataStore] | None = None
    _writer: MetadataStore | None = field(default=None, init=False)
    arrays: ArrayReader = field(init=False)
    resolver: DatumResolver = field(init=False)
    _opened: bool = field(default=False, init=False)
    _open_lock: anyio.Lock | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.arrays = ArrayReader(self.zarr_root)
        self.resolver = DatumResolver(self.store, self.handlers, self.root_map)

    @property
    def where(self) -> str:
        return f"{mask_uri(self.store.uri)} (tenant {self.tenant!r})"

    async def ensure_open(self) -> None:
        if self._opened:
            return
        if self._open_lock is None:
            self._open_lock = anyio.Lock()
        async with self._open_lock:
            if self._opened:
                return
            await self.call("connect", self.store.open)
            await self.call("ping", self.store.ping)
            self._opened = True

    async def call(self, what: str, fn: Callable[..., Awaitable[T]], *args: Any,
                   **kwargs: Any) -> T:
        """``await fn(...)`` with a deadline (stores translate their own driver errors)."""
        try:
            with anyio.fail_after(self.timeout):
                return await fn(*args, **kwargs)
        except TimeoutError:
            raise StorageUnavailable(f"metadata store {self.where} did not answer within "
                                     f"{self.timeout:g} s ({what})") from None

    async def writer(self) -> MetadataStore:
        """A writable store of this tenant, opened on first use (the catalog's own
        store is read-only: it creates nothing)."""
        if self._writer is not None:
            return self._writer
        if self.writer_factory is None:
            raise StorageUnavailable(f"this catalog of {self.where} cannot write")
        if self._open_lock is None:
            self._open_lock = anyio.Lock()
        async with self._open_lock:  # concurrent first calls open one store, not two
            if self._writer is None:
                store = self.writer_factory()
                await self.call("connect for writing", store.open)
                self._writer = store
        return self._writer

    async def close(self) -> None:
        """Close the store (also after a failed open: it may hold a client)."""
        self._opened = False
        writer, self._writer = self._writer, None
        if writer is not None:
            await writer.close()
        await self.store.close()
