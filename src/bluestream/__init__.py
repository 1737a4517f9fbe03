"""bluestream: Bluesky documents from Kafka into MongoDB/SQLite + Zarr, and a catalog
to read them back.

``import bluestream`` stays cheap: the catalog (and zarr, xarray, dask) load on first
use of :func:`open_catalog` / :func:`open_catalog_async`.

bluestream logs through the standard :mod:`logging` module under ``bluestream.*`` names
and shows nothing below WARNING until the application configures logging, e.g.
``logging.basicConfig(level=logging.DEBUG)`` or ``logging.getLogger("bluestream")
.setLevel(logging.INFO)`` with a handler; an application that configured structlog gets
the events through its own configuration (see :mod:`bluestream.log`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from bluestream._version import __version__

if TYPE_CHECKING:
    from bluestream.catalog.core import AsyncCatalog, Catalog
    from bluestream.storage.zarr_root import ZarrRoot

__all__ = ["__version__", "open_catalog", "open_catalog_async"]


def open_catalog(tenant: str, *, metadata: str | None = None,
                 zarr_root: str | os.PathLike[str] | ZarrRoot | None = None,
                 config: str | os.PathLike[str] | None = None,
                 handlers: Mapping[str, Any] | None = None,
                 root_map: Mapping[str, str] | None = None,
                 timeout: float = 30.0, poll_interval: float = 0.2) -> Catalog:
    """The runs of ``tenant``, synchronously (see :func:`bluestream.catalog.open_catalog`).

    Storage defaults to the daemon's configuration (``BLUESTREAM_CONFIG`` names the TOML
    file; ``BLUESTREAM_METADATA`` / ``BLUESTREAM_ZARR_ROOT`` override it).
    """
    from bluestream.catalog.core import open_catalog as _open

    return _open(tenant, metadata=metadata, zarr_root=zarr_root, config=config,
                 handlers=handlers, root_map=root_map, timeout=timeout,
                 poll_interval=poll_interval)


def open_catalog_async(tenant: str, *, metadata: str | None = None,
                       zarr_root: str | os.PathLike[str] | ZarrRoot | None = None,
                       config: str | os.PathLike[str] | None = None,
                       handlers: Mapping[str, Any] | None = None,
                       root_map: Mapping[str, str] | None = None,
                       timeout: float = 30.0, poll_interval: float = 0.2) -> AsyncCatalog:
    """The runs of ``tenant`` for ``async`` code: ``async with open_catalog_async(t) as
    cat`` (see :func:`bluestream.catalog.open_catalog_async`)."""
    from bluestream.catalog.core import open_catalog_async as _open

    return _open(tenant, metadata=metadata, zarr_root=zarr_root, config=config,
                 handlers=handlers, root_map=root_map, timeout=timeout,
                 poll_interval=poll_interval)
