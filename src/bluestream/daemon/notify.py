"""The systemd notify protocol (``sd_notify``), implemented in a few lines.

systemd passes ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace) to a
``Type=notify`` service; the service sends newline-separated ``KEY=value`` datagrams:
``READY=1`` once it does its job, ``STATUS=`` for ``systemctl status``, ``WATCHDOG=1``
at least every ``$WATCHDOG_USEC`` microseconds, ``STOPPING=1`` when it shuts down,
``RELOADING=1`` around a reload. Outside systemd the variable is unset and every call
is a no-op, so the daemon never needs to ask whether it runs under systemd.

Written here rather than taken from a package: the protocol is one ``sendto`` and a
dependency for it would be heavier than the code.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

from bluestream.log import get_logger

__all__ = ["Notifier"]

log = get_logger("bluestream.notify")


class Notifier:
    """Sends state changes to the service manager, if there is one."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval_s = _watchdog_interval(env)
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines; True if the datagram left. Never raises: a missing
        service manager must not take the daemon down."""
        if self.address is None:
            return False
        payload = "\n".join(f"{k}={_one_line(v)}" for k, v in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(payload, self.address)
        except OSError as exc:
            if not self._warned:  # once: a dead socket would otherwise flood the log
                log.warning("sd_notify failed", socket=os.fsdecode(self.address),
                            error=exc.strerror or repr(exc))
                self._warned = True
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send(READY=1, STATUS=status) if status else self.send(READY=1)

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets Type=notify-reload (systemd >= 253) match reload and ready.
        return self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(
            time.CLOCK_MONOTONIC) // 1000)

    def stopping(self, status: str = "stopping") -> bool:
        return self.send(STOPPING=1, STATUS=status)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _address(value: str) -> bytes | None:
    """``$NOTIFY_SOCKET`` as a ``sendto`` address; ``@name`` is the abstract namespace."""
    if not value or value[0] not in "/@":
        return None  # unset, or e.g. a vsock address we do not speak
    raw = os.fsencode(value)
    return b"\0" + raw[1:] if raw[:1] == b"@" else raw


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half of ``$WATCHDOG_USEC`` (what sd_watchdog_enabled advises), if it is meant for
    this process (``$WATCHDOG_PID`` unset or ours)."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2 / 1_000_000


def _one_line(value: str | int) -> str:
    return str(value).replace("\n", " ")[:1000]
