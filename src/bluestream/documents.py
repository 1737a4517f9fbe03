"""The Bluesky document model as bluestream accepts it: names, and who is whose parent."""

from __future__ import annotations

__all__ = ["DOCUMENT_NAMES", "PARENT_FIELD"]

#: Document kinds bluestream accepts (event-model's deprecated bulk_* kinds are not).
DOCUMENT_NAMES: tuple[str, ...] = (
    "start", "stop", "descriptor", "event", "event_page", "resource", "datum",
    "datum_page", "stream_resource", "stream_datum",
)

#: For each kind that needs a parent: (parent kind, field naming the parent).
PARENT_FIELD: dict[str, tuple[str, str]] = {
    "descriptor": ("start", "run_start"),
    "stop": ("start", "run_start"),
    "event": ("descriptor", "descriptor"),
    "event_page": ("descriptor", "descriptor"),
    "resource": ("start", "run_start"),  # optional in old documents
    "datum": ("resource", "resource"),
    "stream_resource": ("start", "run_start"),
    "stream_datum": ("stream_resource", "stream_resource"),
}
