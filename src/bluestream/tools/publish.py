"""``bluestream publish``: document files to Kafka, as a bluesky-kafka Publisher would.

Values are re-encoded in the bluesky-kafka wire format (msgpack + msgpack-numpy),
whatever the file format, so the daemon sees exactly what a live RunEngine sends. The
key is the run's start uid, which keeps each run on one partition (ordering within a
run is only guaranteed there). ``acks=all`` with idempotence: when the command says a
document is published, the broker has it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from bluestream.consumers.decode import encode_message
from bluestream.consumers.kafka_clients import kafka_client_options
from bluestream.errors import BluestreamError, DocumentError
from bluestream.settings import Settings
from bluestream.tools.files import FileFormatError, iter_documents
from bluestream.tools.progress import Progress
from bluestream.tools.rejects import Rejection

__all__ = ["KafkaUnavailable", "PublishReport", "RunKeys", "publish_files"]

#: Sends in flight before waiting for acknowledgements (bounds memory).
_WINDOW = 1000


class KafkaUnavailable(BluestreamError):
    """The broker cannot be reached or refused the messages; says which and why."""


@dataclass
class PublishReport:
    files: int = 0
    documents: int = 0  # published and acknowledged
    bytes: int = 0
    runs: int = 0
    seconds: float = 0.0
    rejections: list[Rejection] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.rejections

    def summary(self, topic: str) -> str:
        return (f"published {self.documents} documents ({self.runs} runs, "
                f"{self.bytes / 1e6:.1f} MB) from {self.files} file(s) to {topic!r} in "
                f"{self.seconds:.1f} s, {len(self.rejections)} rejected")


class RunKeys:
    """Which run each document belongs to, from the references seen so far."""

    def __init__(self) -> None:
        self._run_of: dict[str, str] = {}  # descriptor / resource uid -> start uid
        self.current = ""  # the last start seen: the fallback for unknown references

    def key(self, name: str, doc: dict[str, Any]) -> str:
        if name == "start":
            self.current = str(doc.get("uid", ""))
            return self.current
        if name in ("descriptor", "resource", "stream_resource"):
            run = str(doc.get("run_start") or self.current)
            self._run_of[str(doc.get("uid"))] = run
            return run
        if name == "stop":
            return str(doc.get("run_start") or self.current)
        ref = {"event": "descriptor", "event_page": "descriptor", "datum": "resource",
               "datum_page": "resource", "stream_datum": "stream_resource"}.get(name)
        parent = doc.get(ref) if ref else None
        if parent is None and name == "stream_datum":
            parent = doc.get("descriptor")
        return self._run_of.get(str(parent), self.current)


async def publish_files(paths: Sequence[str | os.PathLike[str]], *, topic: str,
                        settings: Settings, progress: Progress | None = None,
                        on_reject: Callable[[Rejection], None] | None = None
                        ) -> PublishReport:
    """Publish every document of ``paths`` to ``topic``; undecodable records are
    reported (and not published), the rest still go out."""
    t0 = time.monotonic()
    report = PublishReport(files=len(paths))
    max_bytes = settings.limits.max_message_bytes

    def reject(r: Rejection) -> None:
        report.rejections.append(r)
        if on_reject is not None:
            on_reject(r)

    producer = AIOKafkaProducer(**kafka_client_options(settings.kafka),
                                client_id=f"{settings.kafka.client_id}-publish", acks="all",
                                enable_idempotence=True, max_request_size=max_bytes + 65536,
                                request_timeout_ms=30_000)
    where = f"Kafka at {settings.kafka.bootstrap}"
    try:
        await producer.start()
    except KafkaError as exc:
        await producer.stop()
        raise KafkaUnavailable(f"{where} cannot be reached: {exc}") from None
    try:
        pending: list[Any] = []
        for path in paths:
            keys = RunKeys()
            try:
                for rec, decoded in iter_documents(path, max_bytes=max_bytes):
                    if isinstance(decoded, DocumentError):
                        reject(Rejection(rec.where(), decoded.reason, str(decoded)))
                        continue
                    name, doc = decoded
                    value = encode_message(name, doc)
                    key = keys.key(name, doc)
                    pending.append(await producer.send(topic, value, key=key.encode() or None))
                    report.bytes += len(value)
                    if name == "start":
                        report.runs += 1
                    if len(pending) >= _WINDOW:
                        report.documents += await _acknowledged(pending)
                    if progress is not None:
                        progress.update(1, rejected=len(report.rejections))
            except FileFormatError as exc:
                reject(Rejection(exc.where, "unreadable", str(exc).split(": ", 1)[1]))
        report.documents += await _acknowledged(pending)
    except KafkaError as exc:
        raise KafkaUnavailable(f"publishing to {topic!r} on {where} failed: "
                               f"{type(exc).__name__}: {exc}") from None
    finally:
        await producer.stop()
    report.seconds = time.monotonic() - t0
    if progress is not None:
        progress.close()
    return report


async def _acknowledged(pending: list[Any]) -> int:
    """Wait for the broker's acknowledgement of every send in ``pending`` (then empty)."""
    n = 0
    for fut in pending:
        await fut
        n += 1
    pending.clear()
    return n
