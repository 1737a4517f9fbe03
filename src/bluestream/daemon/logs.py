"""structlog set-up: JSON lines for journald, readable console output on a terminal.

Under systemd (``$JOURNAL_STREAM`` set, or stdout not a terminal) every line is one JSON
object on stdout, including what third-party libraries (aiokafka, pymongo) log through
the standard library, so the journal never mixes formats. Context bound with
``structlog.contextvars`` (topic, partition, tenant of the batch in hand) appears on
every line logged while it is bound.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

__all__ = ["configure_logging"]


def _resolve(fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if os.environ.get("JOURNAL_STREAM"):
        return "json"
    return "console" if sys.stderr.isatty() else "json"


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    """``fmt`` is ``json``, ``console`` or ``auto``. Safe to call again (SIGHUP)."""
    fmt = _resolve(fmt)
    lvl = getattr(logging, level.upper(), logging.INFO)
    stream = sys.stdout if fmt == "json" else sys.stderr
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # Third-party libraries log through stdlib logging: same renderer, same stream,
    # warnings and above (aiokafka is chatty at INFO), or everything at debug.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer],
    ))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_bluestream", False)]:
        root.removeHandler(old)
    handler._bluestream = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(lvl if lvl <= logging.DEBUG else max(lvl, logging.WARNING))
