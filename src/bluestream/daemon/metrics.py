"""``/metrics``: Prometheus text exposition of the pipeline's counters.

A custom collector on a private :class:`~prometheus_client.CollectorRegistry` reads
:class:`~bluestream.counters.Counters` at scrape time. Nothing in the hot path touches
prometheus_client, and a private registry keeps the output to what the daemon means to
export (no process-global default metrics that differ between test and service runs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from bluestream._version import __version__
from bluestream.counters import Counters, Histogram

__all__ = ["CONTENT_TYPE", "DaemonGauges", "MetricsCollector"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Counter name in :class:`Counters` -> (metric name, label name, help).
_COUNTERS: dict[str, tuple[str, str, str]] = {
    "documents": ("bluestream_documents", "kind",
                  "Documents decoded and schema-valid, by kind (re-reads after a rewind "
                  "count again)."),
    "events": ("bluestream_events", "tenant", "Events written to Zarr, by tenant."),
    "bytes": ("bluestream_message_bytes", "topic", "Message bytes consumed, by topic."),
    "dead_lettered": ("bluestream_dead_lettered", "reason",
                      "Messages sent to the dead-letter topic, by reason."),
    "parked_total": ("bluestream_parked", "kind",
                     "Documents parked while waiting for their parent, by kind."),
    "errors": ("bluestream_retries", "cause",
               "Batches abandoned and retried after an outage, by cause (kafka, storage)."),
}
_HISTOGRAMS: dict[str, tuple[str, str]] = {
    "commit_seconds": ("bluestream_commit_duration_seconds",
                       "Time to commit offsets to Kafka."),
    "write_seconds": ("bluestream_batch_write_duration_seconds",
                      "Time to store one batch (Zarr, metadata and dead letters)."),
}


@dataclass
class DaemonGauges:
    """What the daemon knows besides the counters, read at scrape time."""

    ready: bool = False
    uptime_s: float = 0.0
    assigned: int = 0
    checks: Mapping[str, bool] = field(default_factory=dict)


class MetricsCollector(Collector):
    """Turns :class:`Counters` (and a few daemon gauges) into metric families."""

    def __init__(self, counters: Counters,
                 gauges: Callable[[], DaemonGauges] = DaemonGauges) -> None:
        self.counters = counters
        self.gauges = gauges
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def render(self) -> bytes:
        """The exposition text for one scrape."""
        return bytes(generate_latest(self.registry))

    def collect(self) -> Iterator[Metric]:
        c = self.counters
        for key, (name, label, doc) in _COUNTERS.items():
            fam = CounterMetricFamily(name, doc, labels=[label])
            for value_label, value in sorted(c.labelled(key).items()):
                fam.add_metric([value_label], value)
            yield fam
        commits = CounterMetricFamily("bluestream_commits", "Offset commits to Kafka.")
        commits.add_metric([], c.get("commits"))
        yield commits
        parked = GaugeMetricFamily("bluestream_parked_documents",
                                   "Documents currently parked (waiting for a parent).")
        parked.add_metric([], c.labelled("parked").get("", 0.0))
        yield parked
        lag = GaugeMetricFamily("bluestream_consumer_lag",
                                "Records not yet committed, per assigned partition.",
                                labels=["topic", "partition"])
        for tp, value in sorted(c.labelled("lag").items()):
            topic, _, partition = tp.rpartition(":")
            lag.add_metric([topic, partition], value)
        yield lag
        for key, (name, doc) in _HISTOGRAMS.items():
            yield _histogram(name, doc, c.histogram(key))
        yield from self._daemon()

    def _daemon(self) -> Iterator[Metric]:
        g = self.gauges()
        info = GaugeMetricFamily("bluestream_info", "Version of the running daemon.",
                                 labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        ready = GaugeMetricFamily("bluestream_ready", "1 when consuming and stores reachable.")
        ready.add_metric([], 1.0 if g.ready else 0.0)
        yield ready
        up = GaugeMetricFamily("bluestream_check_up", "Result of the last health check.",
                               labels=["check"])
        for check, ok in sorted(g.checks.items()):
            up.add_metric([check], 1.0 if ok else 0.0)
        yield up
        assigned = GaugeMetricFamily("bluestream_assigned_partitions",
                                     "Partitions assigned to this daemon.")
        assigned.add_metric([], g.assigned)
        yield assigned
        uptime = GaugeMetricFamily("bluestream_uptime_seconds", "Seconds since start.")
        uptime.add_metric([], g.uptime_s)
        yield uptime


def _histogram(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
    buckets = [("+Inf" if bound == float("inf") else repr(float(bound)), float(n))
               for bound, n in h.cumulative()]
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=h.sum)
