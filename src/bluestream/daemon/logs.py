"""structlog set-up: JSON lines for journald, readable console output on a terminal.

Under systemd (``$JOURNAL_STREAM`` set, or stdout not a terminal) every line is one JSON
object on stdout, including what third-party libraries (aiokafka, pymongo) log through
the standard library, so the journal never mixes formats. Context bound with
``structlog.contextvars`` (topic, partition, tenant of the batch in hand) appears on
every line logged while it is bound.

During an outage aiokafka logs the same connection error many times a second; a
filter lets each distinct library message through once per minute and says how many
were held back, so a long outage does not flood the journal.

This is the application's choice, made by the daemon and the CLI tools only: bluestream's
loggers (:mod:`bluestream.log`) follow structlog's configuration once something made one,
and go to the standard logging module (printing nothing below WARNING) before that, as a
library's should.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import structlog

__all__ = ["RepeatFilter", "configure_logging"]


class RepeatFilter(logging.Filter):
    """Passes each (logger, message template) at most once per ``window_s`` seconds;
    the next one to pass says how many were suppressed meanwhile."""

    def __init__(self, window_s: float = 60.0, max_keys: int = 1000) -> None:
        super().__init__()
        self.window_s = window_s
        self.max_keys = max_keys
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}  # -> (passed at, held)

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        passed_at, held = self._seen.get(key, (float("-inf"), 0))
        if now - passed_at < self.window_s:
            self._seen[key] = (passed_at, held + 1)
            return False
        if len(self._seen) >= self.max_keys:
            self._seen.clear()
        self._seen[key] = (now, 0)
        if held:
            record.msg = f"{record.msg} [{held} like this suppressed in {self.window_s:g} s]"
        return True


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
    handler.addFilter(RepeatFilter())
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
