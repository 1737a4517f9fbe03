"""Where the offline tools put documents the Ingestor refuses: the user's terminal.

The daemon dead-letters to ``<topic>.dlq``; a file or database import has a person
waiting for it instead, so each rejected document is reported at once with where it
came from (``file:line``, ``db.collection:uid``), kept for the summary, and turns the
command's exit status to 1. Nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from bluestream.consumers.envelope import Envelope, Routed
from bluestream.consumers.pipeline import Ingestor
from bluestream.errors import DocumentError, Reason, RoutingError

__all__ = ["Rejection", "ReportingSink", "drain_parked"]


@dataclass(frozen=True)
class Rejection:
    where: str  # file:line, file:record, or the source's own coordinates
    reason: str  # machine-readable tag (DocumentError.reason)
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}: {self.message}"


@dataclass
class ReportingSink:
    """A DeadLetterSink that reports and keeps rejections instead of producing them."""

    on_reject: Callable[[Rejection], None] | None = None
    #: Turns an envelope into a location; default ``Envelope.where()`` (``file:line``).
    locate: Callable[[Envelope], str] = Envelope.where
    rejections: list[Rejection] = field(default_factory=list)

    async def send(self, env: Envelope, error: DocumentError) -> None:
        self.add(Rejection(self.locate(env), error.reason, str(error)))

    async def flush(self) -> None:
        return None

    def add(self, rejection: Rejection) -> None:
        self.rejections.append(rejection)
        if self.on_reject is not None:
            self.on_reject(rejection)


async def drain_parked(ingestor: Ingestor) -> int:
    """At the end of the input, reject what still waits for a parent.

    Waiting longer cannot help an import (its input is complete), so documents whose
    start, descriptor or resource never came are reported now rather than after the
    parking timeout. Returns how many there were.
    """
    items: list[Routed] = []

    def take(item: Routed) -> bool:
        items.append(item)
        return False

    ingestor.parked.drop(take)
    for item in sorted(items, key=lambda r: (r.env.topic, r.env.offset)):
        _, kind, key = item.extra["waiting_for"]
        error = RoutingError(f"{item.name} refers to {kind} {key!r}, which is not in the "
                             "input (nor already stored)",
                             reason=Reason.unknown(kind))
        ingestor.counters.inc("dead_lettered", error.reason)
        await ingestor.dlq.send(item.env, error)
    ingestor.counters.set("parked", "", 0.0)
    await ingestor.dlq.flush()
    return len(items)
