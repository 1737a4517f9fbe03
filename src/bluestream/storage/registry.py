"""One opened metadata store per tenant, created on first use and closed together."""

from __future__ import annotations

from typing import Any

import anyio

from bluestream.storage.backends import open_metadata_store, ping_backend
from bluestream.storage.base import MetadataStore
from bluestream.storage.rules import DEFAULT_SERVER_SELECTION_TIMEOUT_MS

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
        if store is not None:
            await store.ping()
            return
        # No tenant opened yet: ping the backend without creating a tenant's database.
        timeout = int(self._options.get("server_selection_timeout_ms",
                                        DEFAULT_SERVER_SELECTION_TIMEOUT_MS))
        await ping_backend(self.uri, server_selection_timeout_ms=timeout)

    async def aclose(self) -> None:
        for store in self._stores.values():
            await store.close()
        self._stores.clear()
