"""Where a run came from: its ``ingest_log`` records made readable.

The QuantumBackedButler's ``extract_provenance_data`` answers "which inputs and which
software made this"; for bluestream that is every Kafka topic, partition and offset
range that carried the run's documents, and every process (host, pid, version, start
time) that wrote them, so that a run written partly by a daemon that was killed and
partly by its successor names both. Runs brought in by ``bluestream ingest`` name their
files (topic ``file:<path>``) and by ``ingest-mongo`` their source database
(``mongo:<database>``). Pure: records in, a JSON-ready dict out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

__all__ = ["provenance_of"]

Doc = dict[str, Any]
_FILE, _MONGO = "file:", "mongo:"


def _iso(t: Any) -> str | None:
    if not isinstance(t, int | float):
        return None
    return datetime.fromtimestamp(float(t), UTC).isoformat()


def _source(rec: Mapping[str, Any]) -> Doc:
    topic = str(rec["topic"])
    kind = "file" if topic.startswith(_FILE) else "mongo" if topic.startswith(_MONGO) \
        else "kafka"
    sessions = rec.get("sessions") or {}
    writers = sorted(({"session": sid, **{k: v for k, v in s.items()},
                       "started_iso": _iso(s.get("started"))}
                      for sid, s in sessions.items()),
                     key=lambda w: (w.get("started") or 0.0, w["session"]))
    out: Doc = {"kind": kind, "topic": topic, "partition": rec["partition"],
                "offset_min": rec["offset_min"], "offset_max": rec["offset_max"],
                "daemon_version": rec["daemon_version"], "host": rec["host"],
                "writers": writers}
    if kind == "file":
        out["file"] = topic[len(_FILE):]
    elif kind == "mongo":
        out["database"] = topic[len(_MONGO):]
    if rec.get("extra"):
        out["extra"] = dict(rec["extra"])
    return out


def provenance_of(run_uid: str, records: Sequence[Mapping[str, Any]]) -> Doc:
    """The provenance of one run from its ``ingest_log`` records (see the module
    docstring): ``sources`` one per topic and partition, plus the distinct topics,
    files, databases, hosts and versions. Runs stored before writers were recorded
    have empty ``writers`` lists (their record still names the last host and version)."""
    sources = [_source(r) for r in records]
    writers = [w for s in sources for w in s["writers"]]
    return {
        "run_start": run_uid,
        "sources": sources,
        "topics": sorted({s["topic"] for s in sources if s["kind"] == "kafka"}),
        "files": sorted({s["file"] for s in sources if s["kind"] == "file"}),
        "databases": sorted({s["database"] for s in sources if s["kind"] == "mongo"}),
        "hosts": sorted({str(w["host"]) for w in writers} | {str(s["host"]) for s in sources
                                                            if s["host"]}),
        "daemon_versions": sorted({str(w["daemon_version"]) for w in writers}
                                  | {str(s["daemon_version"]) for s in sources}),
    }
