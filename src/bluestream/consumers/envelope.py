"""What travels between the source, the router and the dead-letter sink."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from bluestream.errors import DocumentError

if TYPE_CHECKING:
    from bluestream.consumers.run_index import DescriptorInfo

__all__ = ["DeadLetterSink", "Envelope", "Routed"]


@dataclass(eq=False, slots=True)
class Envelope:
    """One message as it came from its source (Kafka record, or a line of a file)."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = None
    headers: Sequence[tuple[str, bytes]] = ()
    tenant: str = ""
    received: float = 0.0  # monotonic time it entered the pipeline (for park ages)

    def where(self) -> str:
        if self.topic.startswith("file:"):
            return f"{self.topic[5:]}:{self.offset}"
        return f"{self.topic}[{self.partition}]@{self.offset}"


@dataclass(eq=False, slots=True)
class Routed:
    """A decoded, schema-valid document with the envelope it came in."""

    name: str
    doc: dict[str, Any]
    env: Envelope
    extra: dict[str, Any] = field(default_factory=dict)
    #: For events and event pages: their descriptor, resolved once when routed.
    descriptor: DescriptorInfo | None = None
    #: Decoded by the typed decoder (:mod:`bluestream.schemas.typed`): schema-valid, data
    #: values scalars, timestamps floats.
    typed: bool = False


class DeadLetterSink(Protocol):
    """Where documents that cannot be stored go (``<topic>.dlq`` for Kafka).

    ``send`` returns once the dead letter is durable; only then may the source's offset
    be committed past it.
    """

    async def send(self, env: Envelope, error: DocumentError) -> None: ...

    async def flush(self) -> None: ...
