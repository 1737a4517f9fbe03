"""One opened metadata store per tenant, created on first use and closed together."""

from __future__ import annotations

from typing import Any

import anyio

from bluestream.storage.base import MetadataStore
from bluestream.storage.factory import open_metadata_store

__all__ = ["StoreRegistry"]


class StoreRegistry:
    """Opens ``MetadataStore`` instances lazily, one per tenant, sharing the URI."""

    def __init__(self, uri: str, **options: Any) -> None:
        self.uri = uri
        self._options = options
        self._stores: dict[str, MetadataStore] = {}
        self._lock = anyio.Lock()

    async def __call__(self, tenant: str) -> MetadataStore:
        store = self._stores.get(tenant)
        if store is not None:
            return store
        async with self._lock:
            store = self._stores.get(tenant)
            if store is None:
                store = open_metadata_store(self.uri, tenant, **self._options)
                await store.open()
                self._stores[tenant] = store
            return store

    @property
    def tenants(self) -> list[str]:
        return sorted(self._stores)

    async def ping(self) -> None:
        """Raise StorageUnavailable if the backend is unreachable."""
        store = next(iter(self._stores.values()), None)
        if store is None:
            store = await self("_health")
        await store.ping()

    async def aclose(self) -> None:
        for store in self._stores.values():
            await store.close()
        self._stores.clear()
