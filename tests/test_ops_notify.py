"""The systemd notify protocol, spoken to a real datagram socket the test binds: the
daemon (a subprocess, as systemd runs it) sends READY=1 only once it has its partitions
and its store answers, WATCHDOG=1 often enough for $WATCHDOG_USEC, RELOADING=1/READY=1
around a SIGHUP and STOPPING=1 on SIGTERM, then exits 0.

Datagrams are compared by their order of arrival, not by when the test saw them: the
daemon's own health-loop STATUS reports (at least ``health_check_interval_s`` apart in
its own time) are the clock the watchdog pings are counted against. That a hung loop
stops the pings is in test_watchdog."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest

from bluestream.daemon.notify import Notifier
from test_ops_support import DaemonProcess, Receiver, daemon_config, daemon_env, notify_receiver

#: 0.4 s: systemd would expect a ping at least every 0.4 s; the daemon pings every 0.2 s.
WATCHDOG_USEC = 400_000
#: daemon_config's health_check_interval_s: 2.5 watchdog timeouts between STATUS reports.
HEALTH_INTERVAL_S = 1.0


@pytest.mark.kafka
def test_daemon_notifies_systemd(kafka_bootstrap: str, kafka_topic: str,
                                 tmp_path: Path) -> None:
    """Checked against broken builds (a copy of src run with PYTHONPATH=copy/src):
    ``_watchdog`` sleeping 4 x its interval (a ping every 0.8 s against a 0.4 s watchdog)
    fails the per-window ping count (windows with 1 ping); ``reload()`` not sending
    RELOADING=1 fails the wait for it; STOPPING=1 removed from the SIGTERM path (and
    from the ``finally`` of ``run``) fails the wait for STOPPING=1."""
    config = daemon_config(tmp_path / "d.toml", bootstrap=kafka_bootstrap, topic=kafka_topic,
                           group=f"g-{kafka_topic}", metadata=f"sqlite:///{tmp_path}/m.db",
                           zarr_root=tmp_path / "zarr", top={
                               "health_check_interval_s": HEALTH_INTERVAL_S})
    with notify_receiver() as (address, rx):
        env = daemon_env(NOTIFY_SOCKET=address, WATCHDOG_USEC=str(WATCHDOG_USEC))
        daemon = DaemonProcess(config, tmp_path / "d.log", env=env).start()
        try:
            ready = rx.wait_for("READY", "1")
            # READY=1 came after the assignment (logged before it) and the store check.
            assert f'"partitions": ["{kafka_topic}:0"], "event": "partitions assigned"' \
                in daemon.tail(100_000)
            assert daemon.status()["checks"]["metadata"]["ok"] is True
            first = rx.messages[0]
            assert first.get("STATUS") == "starting" and "READY" not in first
            assert not rx.find("READY", until=ready), "READY=1 sent twice at start"
            rx.wait_for("STATUS", "consuming 1 partitions, lag 0, 0 events stored, "
                        "0 dead-lettered", since=ready)

            # `bluestream status` finds the daemon through http.url_file and asks it.
            shown = _status(config)
            assert shown.returncode == 0, shown.stderr
            assert "READY" in shown.stdout and f"{kafka_topic}:0" in shown.stdout
            data = json.loads(_status(config, "--json").stdout)
            assert data["ready"] and data["assigned"] == [f"{kafka_topic}:0"]

            _assert_watchdog_keeps_up(rx, since=ready)

            mark = rx.mark()
            daemon.signal(signal.SIGHUP)
            reloading = rx.wait_for("RELOADING", "1", since=mark, timeout=30)
            assert "MONOTONIC_USEC" in rx.messages[reloading]
            rx.wait_for("READY", "1", since=reloading + 1, timeout=30)

            mark = rx.mark()
            daemon.signal(signal.SIGTERM)
            rx.wait_for("STOPPING", "1", since=mark, timeout=30)
            assert daemon.proc is not None and daemon.proc.wait(timeout=120) == 0, daemon.tail()
            assert not daemon.url_file.exists()  # removed on exit: no stale address
            gone = _status(config, "--url", "http://127.0.0.1:1")
            assert gone.returncode == 3 and "no bluestream daemon answers" in gone.stderr
        finally:
            daemon.kill()


def _assert_watchdog_keeps_up(rx: Receiver, *, since: int, windows: int = 8) -> None:
    """Between consecutive STATUS reports of the health loop, which its own timer keeps
    at least HEALTH_INTERVAL_S = 2.5 x WATCHDOG_USEC apart, a daemon that never lets
    WATCHDOG_USEC pass without a ping has sent at least 2 pings (at its 0.2 s interval,
    about 5). Both come from the same event loop, so a slow machine stretches both.
    Counting starts at the first report after READY=1: the partition assignment that
    READY=1 waits for also wakes the health loop once without its pause, so the report
    right after it may follow at once."""
    first = rx.wait_for("STATUS", since=since + 1)
    last = rx.wait_for("STATUS", since=first, count=windows + 1, timeout=120)
    reports = rx.find("STATUS", since=first, until=last + 1)
    pings = [len(rx.find("WATCHDOG", "1", since=a, until=b)) for a, b in pairwise(reports)]
    assert len(pings) == windows and min(pings) >= 2, \
        f"WATCHDOG=1 per health-check window (>= 2.5 x WATCHDOG_USEC each): {pings}"


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
        got = rx.wait_for("READY", "1", timeout=30)
        assert rx.messages[got]["STATUS"] == "multi line status"
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
