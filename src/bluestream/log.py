"""The loggers bluestream's modules log through: ``log = get_logger("bluestream.x")``,
then key-value calls, ``log.info("subscribed", topics=[...])``.

A library prints nothing unless the application asks it to. Unconfigured structlog
prints every level on stdout, so module-level ``structlog.get_logger`` put bluestream's
debug lines in users' notebooks. Each call therefore decides where it goes, at the time
of the call:

* Something configured structlog (the daemon and the CLI tools through
  :func:`bluestream.daemon.logs.configure_logging`, an application using structlog
  itself, ``structlog.testing.capture_logs``): through that configuration, as any
  structlog logger (JSON lines with the bound ``structlog.contextvars`` in the daemon).
* Otherwise: to the standard :mod:`logging` logger of the same name, the message being
  the event followed by its ``key=value`` pairs. Python's last-resort handler then shows
  warnings and above on stderr and nothing else; ``logging.basicConfig(level=DEBUG)`` or
  ``logging.getLogger("bluestream").setLevel(...)`` turn on the rest.

Nothing here configures structlog or logging.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import structlog

__all__ = ["Logger", "get_logger"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}


class Logger:
    """A structlog-style logger (``bind`` and the level methods) for either destination."""

    __slots__ = ("_context", "_stdlib", "_structlog")

    def __init__(self, name: str, context: Mapping[str, Any] | None = None) -> None:
        self._context = dict(context or {})
        self._stdlib = logging.getLogger(name)
        # A lazy proxy: it reads structlog's configuration when used, not now.
        self._structlog: Any = structlog.get_logger(name, **self._context)

    @property
    def name(self) -> str:
        return self._stdlib.name

    def bind(self, **values: Any) -> Logger:
        """A logger adding ``values`` to every event."""
        return Logger(self.name, {**self._context, **values})

    def debug(self, event: str, **kw: Any) -> None:
        self._log("debug", event, kw)

    def info(self, event: str, **kw: Any) -> None:
        self._log("info", event, kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._log("warning", event, kw)

    def error(self, event: str, **kw: Any) -> None:
        self._log("error", event, kw)

    def critical(self, event: str, **kw: Any) -> None:
        self._log("critical", event, kw)

    def exception(self, event: str, **kw: Any) -> None:
        """``error`` with the exception being handled."""
        kw.setdefault("exc_info", True)
        self._log("error", event, kw)

    def _log(self, method: str, event: str, kw: dict[str, Any]) -> None:
        if structlog.is_configured():
            getattr(self._structlog, method)(event, **kw)
            return
        level = _LEVELS[method]
        if not self._stdlib.isEnabledFor(level):
            return
        values = structlog.contextvars.merge_contextvars(
            self._stdlib, method, {**self._context, **kw})
        exc_info = values.pop("exc_info", None)
        stack_info = bool(values.pop("stack_info", False))
        # stacklevel 3: the record names the line that called debug/info/..., not this one.
        self._stdlib.log(level, _message(event, values), exc_info=exc_info,
                         stack_info=stack_info, stacklevel=3)


def _message(event: str, values: Mapping[str, Any]) -> str:
    return " ".join([event, *(f"{key}={value!r}" for key, value in values.items())])


def get_logger(name: str) -> Logger:
    """The logger for module ``name`` (a ``bluestream.*`` name: the standard logging
    hierarchy under ``bluestream`` is what users configure)."""
    return Logger(name)
