"""Every ingestion outcome counted in one place, for logs, ``status`` and ``/metrics``.

The pipeline only increments plain numbers here; it never imports prometheus_client.
The daemon's metrics collector reads these at scrape time, so tests and the embedded
(file) ingestion pay nothing for metrics they do not serve.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["DEFAULT_BUCKETS", "Counters", "Histogram"]

#: Latency buckets in seconds: from a fast local commit to a slow store under load.
DEFAULT_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                      0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Histogram:
    """Observation counts per bucket (not cumulative), their sum and count."""

    buckets: tuple[float, ...] = DEFAULT_BUCKETS
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= bound)`` pairs ending with ``+Inf``."""
        out, running = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out

    def copy(self) -> Histogram:
        return Histogram(self.buckets, list(self.counts), self.sum, self.count)


@dataclass
class Counters:
    """Monotonic counters, a few gauges and latency histograms of the pipeline.

    Keys are ``(name, label)`` pairs, e.g. ``("documents", "event")``,
    ``("dead_lettered", "schema-violation")``; label ``""`` for unlabelled ones.
    Counters count work done, including work redone after a rewind (an outage makes
    the daemon re-read and idempotently re-write what was not yet committed).
    """

    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    gauges: dict[tuple[str, str], float] = field(default_factory=dict)
    histograms: dict[str, Histogram] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def inc(self, name: str, label: str = "", n: int | float = 1) -> None:
        with self._lock:
            self.counts[(name, label)] += n  # type: ignore[assignment]

    def set(self, name: str, label: str, value: float) -> None:
        with self._lock:
            self.gauges[(name, label)] = value

    def drop_gauge(self, name: str, label: str) -> None:
        """Forget a gauge (e.g. the lag of a partition that was revoked)."""
        with self._lock:
            self.gauges.pop((name, label), None)

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            hist = self.histograms.get(name)
            if hist is None:
                hist = self.histograms[name] = Histogram()
            hist.observe(value)

    def get(self, name: str, label: str = "") -> float:
        with self._lock:
            return float(self.counts.get((name, label), 0))

    def total(self, name: str) -> float:
        with self._lock:
            return float(sum(v for (n, _), v in self.counts.items() if n == name))

    def labelled(self, name: str) -> dict[str, float]:
        """Every label of one counter (or gauge) with its value."""
        with self._lock:
            out = {lbl: float(v) for (n, lbl), v in self.counts.items() if n == name}
            out.update({lbl: v for (n, lbl), v in self.gauges.items() if n == name})
            return out

    def histogram(self, name: str) -> Histogram:
        with self._lock:
            hist = self.histograms.get(name)
            return hist.copy() if hist is not None else Histogram()

    def snapshot(self) -> dict[str, dict[str, float]]:
        with self._lock:
            out: dict[str, dict[str, float]] = {}
            for (name, label), v in sorted(self.counts.items()):
                out.setdefault(name, {})[label] = float(v)
            for (name, label), g in sorted(self.gauges.items()):
                out.setdefault(name, {})[label] = float(g)
            for name, hist in sorted(self.histograms.items()):
                out[name] = {"count": float(hist.count), "sum": round(hist.sum, 6)}
            return out
