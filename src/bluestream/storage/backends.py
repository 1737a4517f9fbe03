"""Which URI scheme means which metadata backend: opening, checking and pinging one.

This is the only module that maps ``mongodb://`` / ``mongodb+srv://`` / ``sqlite:///``
to a backend. The backends are imported lazily, so that a reader of SQLite files never
imports pymongo and the configuration can be checked without connecting anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bluestream.errors import ConfigError, StorageUnavailable
from bluestream.storage.base import MetadataStore
from bluestream.storage.rules import DEFAULT_SERVER_SELECTION_TIMEOUT_MS, check_tenant, mask_uri

__all__ = [
    "check_metadata_uri",
    "is_mongo_uri",
    "is_sqlite_uri",
    "list_tenants",
    "open_metadata_store",
    "ping_backend",
]

_MONGO_SCHEMES = ("mongodb://", "mongodb+srv://")
_SQLITE_SCHEME = "sqlite:///"
_SUPPORTED = "use mongodb://, mongodb+srv:// or sqlite:///path/to/file.db"


def is_mongo_uri(uri: str) -> bool:
    return uri.startswith(_MONGO_SCHEMES)


def is_sqlite_uri(uri: str) -> bool:
    return uri.startswith(_SQLITE_SCHEME)


def check_metadata_uri(uri: str) -> str:
    """``uri`` if it names a supported backend and parses; else ValueError saying why.

    ``mongodb+srv://`` needs DNS to parse fully: that is checked when connecting.
    """
    if not is_mongo_uri(uri) and not is_sqlite_uri(uri):
        raise ValueError("must start with mongodb://, mongodb+srv:// or sqlite:///")
    if uri.startswith("mongodb://"):
        from pymongo.errors import PyMongoError
        from pymongo.uri_parser import parse_uri

        try:
            parse_uri(uri, warn=False)
        except (PyMongoError, ValueError) as exc:
            raise ValueError(f"not a valid MongoDB URI: {mask_uri(str(exc))}") from None
    return uri


def open_metadata_store(
    uri: str,
    tenant: str,
    *,
    server_selection_timeout_ms: int = DEFAULT_SERVER_SELECTION_TIMEOUT_MS,
    readonly: bool = False,
) -> MetadataStore:
    """A store for ``tenant`` at ``uri``, not yet opened (call ``await store.open()``).

    ``readonly`` stores (the catalog's) never create a database, table or index; opening
    one for a tenant that does not exist raises NotFound listing those that do.
    ``server_selection_timeout_ms`` applies to MongoDB only; it is accepted for every
    URI so that callers can pass one set of options whatever the backend.
    """
    check_tenant(tenant)
    if is_mongo_uri(uri):
        from bluestream.storage.mongo import MongoMetadataStore

        return MongoMetadataStore(uri, tenant, readonly=readonly,
                                  server_selection_timeout_ms=server_selection_timeout_ms)
    if is_sqlite_uri(uri):
        from bluestream.storage.sqlite import SqliteMetadataStore

        return SqliteMetadataStore(uri, tenant, readonly=readonly)
    raise ConfigError(f"metadata store URI {mask_uri(uri)!r} is not supported: {_SUPPORTED}")


async def list_tenants(uri: str, *, server_selection_timeout_ms: int =
                       DEFAULT_SERVER_SELECTION_TIMEOUT_MS) -> list[str]:
    """Every tenant at ``uri`` (opened by a writer at least once); nothing is created."""
    if is_sqlite_uri(uri):
        import anyio

        from bluestream.storage.sqlite import tenants_at

        return await anyio.to_thread.run_sync(tenants_at, uri)
    store = open_metadata_store(uri, "bluestream", readonly=True,
                                server_selection_timeout_ms=server_selection_timeout_ms)
    try:
        return sorted(await store.tenants())
    finally:
        await store.close()


async def ping_backend(uri: str, *, server_selection_timeout_ms: int =
                       DEFAULT_SERVER_SELECTION_TIMEOUT_MS) -> None:
    """StorageUnavailable unless the backend at ``uri`` answers; no tenant is touched
    (a MongoDB database or a SQLite file is never created by asking)."""
    if is_sqlite_uri(uri):
        path = Path(uri.removeprefix(_SQLITE_SCHEME))
        parent = path.parent if str(path) != ":memory:" else Path(".")
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent  # open() creates missing directories
        if not os.access(parent, os.W_OK):
            raise StorageUnavailable(f"SQLite database {uri}: directory {parent} "
                                     "is not writable")
        return
    from pymongo import AsyncMongoClient
    from pymongo.errors import PyMongoError

    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        uri, serverSelectionTimeoutMS=server_selection_timeout_ms)
    try:
        await client.admin.command("ping")
    except PyMongoError as exc:
        raise StorageUnavailable(f"MongoDB at {mask_uri(uri)} is unreachable: "
                                 f"{mask_uri(str(exc))[:300]}") from exc
    finally:
        await client.close()
