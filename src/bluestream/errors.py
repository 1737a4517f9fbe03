"""The project's own exception hierarchy.

Driver errors (aiokafka, pymongo, zarr, OSError) are translated into these at the edge,
so callers handle one family of errors with messages a user can act on.
"""

from __future__ import annotations

import enum

__all__ = [
    "AmbiguousUID",
    "BluestreamError",
    "ConfigError",
    "ConflictError",
    "DecodeError",
    "DocumentError",
    "LimitExceeded",
    "NotFound",
    "Reason",
    "RoutingError",
    "SchemaViolation",
    "StorageError",
    "StorageUnavailable",
    "ValidationError",
    "first_error",
    "leaf_errors",
]


class Reason(enum.StrEnum):
    """Every ``reason`` header a dead letter can carry: the one list an operator reads.

    ``bluestream dlq list --reason R`` filters by these; metrics count by them.
    """

    # decoding (the bytes)
    UNDECODABLE = "undecodable"
    EMPTY = "empty"
    TOO_LARGE = "too-large"
    UNSAFE_VALUE = "unsafe-value"
    UNKNOWN_DOCUMENT = "unknown-document"
    # validation (the document)
    INVALID = "invalid"
    SCHEMA_VIOLATION = "schema-violation"
    LIMIT_EXCEEDED = "limit-exceeded"
    NOT_JSONABLE = "not-jsonable"
    INT_OUT_OF_RANGE = "int-out-of-range"
    BAD_TIME = "bad-time"
    BAD_SEQ_NUM = "bad-seq-num"
    BAD_KEY = "bad-key"
    BAD_DTYPE = "bad-dtype"
    BAD_SHAPE = "bad-shape"
    EMPTY_PAGE = "empty-page"
    PAGE_LENGTH_MISMATCH = "page-length-mismatch"
    DATA_KEYS_MISMATCH = "data-keys-mismatch"
    DESCRIPTOR_MISMATCH = "descriptor-mismatch"
    DTYPE_MISMATCH = "dtype-mismatch"
    SHAPE_MISMATCH = "shape-mismatch"
    UNSUPPORTED_FILLED_EXTERNAL = "unsupported-filled-external"
    # routing (the document's place in a run)
    UNROUTABLE = "unroutable"
    UNKNOWN_START = "unknown-start"
    UNKNOWN_DESCRIPTOR = "unknown-descriptor"
    UNKNOWN_RESOURCE = "unknown-resource"
    UNKNOWN_STREAM_RESOURCE = "unknown-stream-resource"
    CONFLICT = "conflict"
    CONFLICTING_START = "conflicting-start"
    CONFLICTING_STOP = "conflicting-stop"
    CONFLICTING_DESCRIPTOR = "conflicting-descriptor"
    CONFLICTING_RESOURCE = "conflicting-resource"
    CONFLICTING_DATUM = "conflicting-datum"
    CONFLICTING_STREAM_RESOURCE = "conflicting-stream-resource"
    CONFLICTING_STREAM_DATUM = "conflicting-stream-datum"

    @classmethod
    def unknown(cls, kind: str) -> Reason:
        """The reason for a document whose parent of ``kind`` never arrived."""
        return cls("unknown-" + kind.replace("_", "-"))

    @classmethod
    def conflicting(cls, kind: str) -> Reason:
        """The reason for a ``kind`` document that differs from the one stored."""
        return cls("conflicting-" + kind.replace("_", "-"))


def leaf_errors(exc: BaseException) -> list[BaseException]:
    """The errors inside (nested) exception groups, in order; ``[exc]`` for a plain one."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in leaf_errors(e)]
    return [exc]


def first_error(exc: BaseException) -> BaseException:
    """The first error inside (nested) exception groups, or ``exc`` itself."""
    return leaf_errors(exc)[0]


class BluestreamError(Exception):
    """Base of every error bluestream raises on purpose."""


class ConfigError(BluestreamError):
    """A configuration key or value is invalid; the message names the key."""


class DocumentError(BluestreamError):
    """A document cannot be accepted; ``reason`` is a short machine-readable tag.

    Documents that raise this go to the dead-letter topic with ``reason`` as a header.
    """

    reason: Reason = Reason.INVALID

    def __init__(self, message: str, *, reason: Reason | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class DecodeError(DocumentError):
    """The bytes are not a ``(name, doc)`` message in msgpack or JSON."""

    reason = Reason.UNDECODABLE


class ValidationError(DocumentError):
    """The document decoded but is not acceptable."""

    reason = Reason.INVALID


class SchemaViolation(ValidationError):
    """The document violates event-model's JSON schema for its kind."""

    reason = Reason.SCHEMA_VIOLATION


class LimitExceeded(ValidationError):
    """A size or shape exceeds a configured limit (message bytes, shape elements ...)."""

    reason = Reason.LIMIT_EXCEEDED


class RoutingError(DocumentError):
    """The document refers to a run, descriptor or resource that never arrived."""

    reason = Reason.UNROUTABLE


class ConflictError(DocumentError):
    """A document with the same uid but different content was already stored."""

    reason = Reason.CONFLICT


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
