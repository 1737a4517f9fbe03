"""A progress line on stderr, without a dependency.

On a terminal the line is redrawn in place (a bar when the total is known); otherwise
(CI logs, ``journalctl``, a pipe) a plain line is printed every few seconds so logs stay
readable. Messages written through :meth:`Progress.write` never garble the bar.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress", "human_bytes"]

_BAR = 24


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


class Progress:
    """Progress of one operation: ``update(n, **fields)``, then ``close()``.

    ``unit="bytes"`` shows amounts as kB/MB. ``fields`` are shown after the amount
    (e.g. ``docs=1200 rejected=1``) and keep their last value.
    """

    def __init__(self, what: str, total: float | None = None, *, unit: str = "",
                 stream: TextIO | None = None, enabled: bool = True,
                 interval: float | None = None) -> None:
        self.what = what
        self.total = total
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.interval = interval if interval is not None else (0.1 if self.tty else 5.0)
        self.done = 0.0
        self.fields: dict[str, object] = {}
        self._t0 = time.monotonic()
        self._last = 0.0 if self.tty else self._t0  # logs: first line after interval
        self._drawn = False
        self._closed = False

    def update(self, n: float = 0, **fields: object) -> None:
        self.done += n
        self.fields.update(fields)
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._draw()

    def write(self, message: str) -> None:
        """Print a line (an error, say) above the progress line."""
        if self.enabled and self.tty and self._drawn:
            self.stream.write("\r\x1b[K")
            self._drawn = False
        print(message, file=self.stream, flush=True)
        if self.enabled and self.tty:
            self._draw()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        self._draw()
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        amount = self._fmt(self.done)
        parts = [self.what]
        if self.total:
            frac = min(self.done / self.total, 1.0)
            if self.tty:
                filled = int(frac * _BAR)
                parts.append("[" + "#" * filled + "-" * (_BAR - filled) + "]")
            parts.append(f"{frac:4.0%} {amount}/{self._fmt(self.total)}")
        else:
            parts.append(amount)
        rate = self.done / elapsed
        parts.append(f"{self._fmt(rate)}/s" if self.unit == "bytes" else f"{rate:,.0f}/s")
        parts.extend(f"{k}={v}" for k, v in self.fields.items())
        parts.append(f"{elapsed:.1f}s")
        return " ".join(parts)

    def _fmt(self, n: float) -> str:
        if self.unit == "bytes":
            return human_bytes(n)
        return f"{n:,.0f}" + (f" {self.unit}" if self.unit else "")

    def _draw(self) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\x1b[K" + self.line())
            self._drawn = True
            self.stream.flush()
        else:
            print(self.line(), file=self.stream, flush=True)
