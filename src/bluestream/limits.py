"""Size limits applied to untrusted documents before anything is allocated from them."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Limits"]


@dataclass(frozen=True)
class Limits:
    #: Largest Kafka message value accepted (bytes); larger ones are dead-lettered.
    max_message_bytes: int = 32 * 1024 * 1024
    #: Largest number of elements in one event's value for one data key (shape product).
    max_shape_elements: int = 64 * 1024 * 1024
    #: Largest seq_num accepted; arrays are sized from it, so it bounds preallocation.
    max_seq_num: int = 100_000_000
    #: Most events in one page.
    max_page_events: int = 100_000
    #: Most data keys in one descriptor.
    max_data_keys: int = 10_000
