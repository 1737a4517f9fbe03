"""Every ingestion outcome counted in one place, for logs, ``status`` and ``/metrics``."""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field

__all__ = ["Counters"]


@dataclass
class Counters:
    """Monotonic counters (and a few gauges) of the ingestion pipeline.

    Keys are ``(name, label)`` pairs, e.g. ``("documents", "event")``,
    ``("dead_lettered", "schema-violation")``; label ``""`` for unlabelled ones.
    """

    counts: defaultdict[tuple[str, str], float] = field(
        default_factory=lambda: defaultdict(float))
    gauges: dict[tuple[str, str], float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def inc(self, name: str, label: str = "", n: int | float = 1) -> None:
        with self._lock:
            self.counts[(name, label)] += n

    def set(self, name: str, label: str, value: float) -> None:
        with self._lock:
            self.gauges[(name, label)] = value

    def get(self, name: str, label: str = "") -> float:
        with self._lock:
            return float(self.counts.get((name, label), 0))

    def total(self, name: str) -> float:
        with self._lock:
            return float(sum(v for (n, _), v in self.counts.items() if n == name))

    def snapshot(self) -> dict[str, dict[str, float]]:
        with self._lock:
            out: dict[str, dict[str, float]] = {}
            for (name, label), v in sorted(self.counts.items()):
                out.setdefault(name, {})[label] = float(v)
            for (name, label), v in sorted(self.gauges.items()):
                out.setdefault(name, {})[label] = float(v)
            return out
