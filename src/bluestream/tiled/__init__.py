"""Serving bluestream's storage through a stock Tiled server (``pip install
'bluestream[tiled]'``).

A Tiled server (0.2.x) mounts :func:`tenant_tree` (one tenant) or :func:`tenants_tree`
(every tenant of a metadata store, each a top-level container) from its configuration
file; ``bluestream tiled`` does that with bluestream's own settings. Stock clients with
``bluesky-tiled-plugins`` then read runs as they read what Bluesky's ``TiledWriter``
writes: ``c["csx"][-1]["primary"].read()``, ``c["csx"][42]``, searches,
``run.documents()``.

The layout (bluesky-tiled-plugins 2.x, "v3"): a catalog with spec
``CatalogOfBlueskyRuns 3.0``; runs keyed by start uid, spec ``BlueskyRun 3.0``, metadata
``{start, stop}``; streams with specs ``BlueskyEventStream 3.0`` + ``composite``, their
descriptor as metadata, one array node per data key with a per-event shape (served chunk
by chunk along the Zarr chunks) and an ``internal`` table of the scalar columns
(``seq_num``, ``time`` and the scalar data keys). Nothing is copied: every request reads
the metadata store and the Zarr arrays as the Python catalog does, so an open run grows
from one request to the next.
"""

from __future__ import annotations

from typing import Any

__all__ = ["tenant_tree", "tenants_tree"]


def tenant_tree(tenant: str, metadata: str | None = None, zarr_root: str | None = None,
                config: str | None = None) -> Any:
    """The catalog of one tenant, for a Tiled configuration's ``trees:`` entry."""
    from bluestream.tiled.adapters import CatalogNode

    return CatalogNode.for_tenant(tenant, metadata=metadata, zarr_root=zarr_root,
                                  config=config)


def tenants_tree(metadata: str | None = None, zarr_root: str | None = None,
                 tenants: list[str] | None = None, config: str | None = None) -> Any:
    """Every tenant (or those named) as a top-level container named after it."""
    from bluestream.tiled.adapters import TenantsNode

    return TenantsNode(metadata=metadata, zarr_root=zarr_root, tenants=tenants,
                       config=config)
