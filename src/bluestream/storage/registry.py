"""One opened metadata store per tenant, created on first use and closed together."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anyio

from bluestream.errors import StorageUnavailable
from bluestream.storage.base import MetadataStore
from bluestream.storage.factory import mask_uri, open_metadata_store

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
        if self.uri.startswith("sqlite:///"):
            path = Path(self.uri.removeprefix("sqlite:///"))
            parent = path.parent if str(path) != ":memory:" else Path(".")
            while not parent.exists() and parent != parent.parent:
                parent = parent.parent  # open() creates missing directories
            if not os.access(parent, os.W_OK):
                raise StorageUnavailable(f"SQLite database {self.uri}: directory {parent} "
                                         "is not writable")
            return
        from pymongo import AsyncMongoClient
        from pymongo.errors import PyMongoError

        timeout = int(self._options.get("server_selection_timeout_ms", 5000))
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            self.uri, serverSelectionTimeoutMS=timeout)
        try:
            await client.admin.command("ping")
        except PyMongoError as exc:
            raise StorageUnavailable(f"MongoDB at {mask_uri(self.uri)} is unreachable: "
                                     f"{str(exc)[:300]}") from exc
        finally:
            await client.close()

    async def aclose(self) -> None:
        for store in self._stores.values():
            await store.close()
        self._stores.clear()
