"""Validation and normalisation of Bluesky documents: pure functions, no I/O.

``validate`` checks a document against event-model's schema (compiled once);
``normalise`` turns events into column pages for the writer and back, and metadata
documents into plain JSON values for the metadata stores.
"""

from __future__ import annotations

from bluestream.schemas.normalise import (
    datum_page_to_datums,
    page_from_event_page,
    page_from_events,
    page_to_event_page,
    page_to_events,
    to_jsonable,
)
from bluestream.schemas.validate import validate

__all__ = [
    "datum_page_to_datums",
    "page_from_event_page",
    "page_from_events",
    "page_to_event_page",
    "page_to_events",
    "to_jsonable",
    "validate",
]
