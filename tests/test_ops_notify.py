"""The systemd notify protocol, spoken to a real datagram socket the test binds: the
daemon (a subprocess, as systemd runs it) sends READY=1 only once it has its partitions
and its store answers, WATCHDOG=1 at half of $WATCHDOG_USEC, RELOADING=1/READY=1 around
a SIGHUP and STOPPING=1 on SIGTERM, then exits 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bluestream.daemon.notify import Notifier
from test_ops_support import DaemonProcess, daemon_config, daemon_env


class Receiver:
    """Collects (time, {key: value}) datagrams from a bound AF_UNIX socket."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            self.messages.append((time.monotonic(), fields))

    def wait_for(self, key: str, value: str | None = None, *, after: float = 0.0,
                 timeout: float = 60.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, m in list(self.messages):
                if t >= after and key in m and (value is None or m[key] == value):
                    return t
            time.sleep(0.05)
        raise AssertionError(f"no {key}={value} within {timeout} s: {self.messages}")

    def count(self, key: str, since: float) -> int:
        return sum(1 for t, m in list(self.messages) if t >= since and key in m)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def abstract_receiver() -> Iterator[tuple[str, Receiver]]:
    name = f"bluestream-test-{uuid.uuid4().hex}"
    receiver = Receiver(b"\0" + name.encode())
    yield "@" + name, receiver
    receiver.close()


@pytest.mark.kafka
def test_daemon_notifies_systemd(kafka_bootstrap: str, kafka_topic: str, tmp_path: Path,
                                 abstract_receiver: tuple[str, Receiver]) -> None:
    address, rx = abstract_receiver
    config = daemon_config(tmp_path / "d.toml", bootstrap=kafka_bootstrap, topic=kafka_topic,
                           group=f"g-{kafka_topic}", metadata=f"sqlite:///{tmp_path}/m.db",
                           zarr_root=tmp_path / "zarr")
    env = daemon_env(NOTIFY_SOCKET=address, WATCHDOG_USEC="400000")
    daemon = DaemonProcess(config, tmp_path / "d.log", env=env).start()
    try:
        ready_at = rx.wait_for("READY", "1")
        # READY=1 came after the assignment (logged before it) and the store check.
        assert f'"partitions": ["{kafka_topic}:0"], "event": "partitions assigned"' \
            in daemon.tail(100_000)
        assert daemon.status()["checks"]["metadata"]["ok"] is True
        first = rx.messages[0][1]
        assert first.get("STATUS") == "starting" and "READY" not in first
        rx.wait_for("STATUS", "consuming 1 partitions, lag 0, 0 events stored, 0 dead-lettered")

        # `bluestream status` finds the daemon through http.url_file and asks it.
        shown = _status(config)
        assert shown.returncode == 0, shown.stderr
        assert "READY" in shown.stdout and f"{kafka_topic}:0" in shown.stdout
        data = json.loads(_status(config, "--json").stdout)
        assert data["ready"] and data["assigned"] == [f"{kafka_topic}:0"]

        t0 = time.monotonic()
        time.sleep(2.0)
        pings = rx.count("WATCHDOG", since=t0)
        assert 5 <= pings <= 12, f"{pings} watchdog pings in 2 s at a 0.2 s interval"
        assert ready_at > 0

        t_hup = time.monotonic()
        daemon.signal(signal.SIGHUP)
        reloading = rx.wait_for("RELOADING", "1", after=t_hup, timeout=10)
        assert rx.wait_for("READY", "1", after=reloading, timeout=10) >= reloading
        assert "MONOTONIC_USEC" in next(m for t, m in rx.messages if "RELOADING" in m)

        t_term = time.monotonic()
        daemon.signal(signal.SIGTERM)
        rx.wait_for("STOPPING", "1", after=t_term, timeout=10)
        assert daemon.proc is not None and daemon.proc.wait(timeout=60) == 0, daemon.tail()
        assert not daemon.url_file.exists()  # removed on exit: no stale address
        gone = _status(config, "--url", "http://127.0.0.1:1")
        assert gone.returncode == 3 and "no bluestream daemon answers" in gone.stderr
    finally:
        daemon.kill()


def _status(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bluestream", "status", "-c", str(config),
                           *args], env=daemon_env(), capture_output=True, text=True,
                          timeout=60, check=False)


def test_notifier_paths_and_failures(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    rx = Receiver(str(path))
    try:
        n = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "3000000"})
        assert n.enabled and n.watchdog_interval_s == 1.5
        assert n.ready("multi\nline status")
        rx.wait_for("READY", "1", timeout=5)
        assert rx.messages[-1][1]["STATUS"] == "multi line status"
        n.close()
    finally:
        rx.close()
    # Outside systemd every call is a no-op.
    assert not Notifier({}).enabled and not Notifier({}).watchdog()
    assert Notifier({}).watchdog_interval_s is None
    # A watchdog meant for another process is not ours to feed.
    other = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000",
                      "WATCHDOG_PID": str(os.getpid() + 1)})
    assert other.watchdog_interval_s is None
    # A socket that went away: False, no exception.
    gone = Notifier({"NOTIFY_SOCKET": str(path)})
    assert not gone.status("nobody listens")
    gone.close()
