"""Garbage-collector settings for the processes that ingest (daemon, ``ingest`` tools).

A batch creates a few tracked containers per event (the document, its ``data`` and
``timestamps``, the envelope) that all live until the batch is stored. With CPython's
default thresholds (700 allocations for a young collection, then every 10th of those
one level up) a batch of 20,000 events ran hundreds of collections that walked the
whole growing batch again and again: ~4.5 µs of every ~23 µs an event cost in process
(``benchmarks/profile.py``, stage "gc pauses"). The documents hold no reference cycles,
so collecting less often frees nothing later than it would have been freed anyway.

:func:`tune_gc` raises the young threshold to 50,000 and freezes what exists at start
(modules, settings, compiled schemas) out of every later collection. Only processes
that ingest call it; importing bluestream as a library changes nothing.
"""

from __future__ import annotations

import gc

__all__ = ["GC_THRESHOLDS", "tune_gc"]

GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """Apply :data:`GC_THRESHOLDS` and freeze the objects alive now (call once, when the
    process has loaded what it needs)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
