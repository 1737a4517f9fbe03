"""The project's own exception hierarchy.

Driver errors (aiokafka, pymongo, zarr, OSError) are translated into these at the edge,
so callers handle one family of errors with messages a user can act on.
"""

from __future__ import annotations

__all__ = [
    "AmbiguousUID",
    "BluestreamError",
    "ConfigError",
    "ConflictError",
    "DecodeError",
    "DocumentError",
    "LimitExceeded",
    "NotFound",
    "RoutingError",
    "SchemaViolation",
    "StorageError",
    "StorageUnavailable",
    "ValidationError",
]


class BluestreamError(Exception):
    """Base of every error bluestream raises on purpose."""


class ConfigError(BluestreamError):
    """A configuration key or value is invalid; the message names the key."""


class DocumentError(BluestreamError):
    """A document cannot be accepted; ``reason`` is a short machine-readable tag.

    Documents that raise this go to the dead-letter topic with ``reason`` as a header.
    """

    reason = "invalid"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class DecodeError(DocumentError):
    """The bytes are not a ``(name, doc)`` message in msgpack or JSON."""

    reason = "undecodable"


class ValidationError(DocumentError):
    """The document decoded but is not acceptable."""

    reason = "invalid"


class SchemaViolation(ValidationError):
    """The document violates event-model's JSON schema for its kind."""

    reason = "schema-violation"


class LimitExceeded(ValidationError):
    """A size or shape exceeds a configured limit (message bytes, shape elements ...)."""

    reason = "limit-exceeded"


class RoutingError(DocumentError):
    """The document refers to a run, descriptor or resource that never arrived."""

    reason = "unroutable"


class ConflictError(DocumentError):
    """A document with the same uid but different content was already stored."""

    reason = "conflict"


class StorageError(BluestreamError):
    """A store rejected an operation (not a transient outage)."""


class StorageUnavailable(StorageError):
    """A store cannot be reached; retrying later may succeed. Says which URI and why."""


class NotFound(BluestreamError, KeyError):
    """No run (or stream, or document) matches what was asked for."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain message.
        return str(self.args[0]) if self.args else ""


class AmbiguousUID(NotFound):
    """A partial uid matches several runs; the message lists the candidates."""
