"""A hung event loop stops the watchdog pings, so systemd (``WatchdogSec=``) would
restart the daemon; once the loop runs again, so do the pings.

The daemon is a real subprocess against the real broker; only its ingestor is wrapped
(:func:`test_ops_support.serve_with_blocking_ingestor`) so that a marked record blocks
the event loop with a synchronous ``time.sleep`` -- a fault no real component produces
on demand. The wrapper sends BLOCKED=1 and UNBLOCKED=1 to the same notify socket, so the
test reads from the order of arrival alone whether a ping fell inside the hang: no
counting in fixed windows, no timing of the test's own."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import scalar_run
from test_ops_support import (
    BLOCK_HEADER,
    DaemonProcess,
    blocking_serve_command,
    daemon_config,
    daemon_env,
    notify_receiver,
    publish,
    wait_until,
)

pytestmark = [pytest.mark.kafka]

#: systemd's watchdog timeout for the test: the daemon pings every 0.2 s.
WATCHDOG_USEC = 400_000
#: How long the loop hangs: 5 watchdog timeouts (10 ping intervals).
HANG_S = 5 * WATCHDOG_USEC / 1e6


def test_a_hung_event_loop_stops_the_watchdog_pings(kafka_bootstrap: str, kafka_topic: str,
                                                   tmp_path: Path) -> None:
    """Checked against a broken build (a copy of src run with PYTHONPATH=copy/src) whose
    ``_watchdog`` pings from a worker thread (``anyio.to_thread.run_sync`` of a loop of
    ``notifier.watchdog(); time.sleep(interval)``) instead of from the event loop: the
    pings went on during the hang and the test failed with "WATCHDOG=1 while the event
    loop was blocked" (10 pings between BLOCKED=1 and UNBLOCKED=1)."""
    config = daemon_config(tmp_path / "d.toml", bootstrap=kafka_bootstrap, topic=kafka_topic,
                           group=f"g-{kafka_topic}", metadata=f"sqlite:///{tmp_path}/m.db",
                           zarr_root=tmp_path / "zarr")
    run = scalar_run(5)
    with notify_receiver() as (address, rx):
        env = daemon_env(NOTIFY_SOCKET=address, WATCHDOG_USEC=str(WATCHDOG_USEC))
        daemon = DaemonProcess(config, tmp_path / "d.log", env=env,
                               command=blocking_serve_command(config)).start()
        try:
            ready = rx.wait_for("READY", "1")
            rx.wait_for("WATCHDOG", "1", since=ready, count=3)  # pinging before the hang

            # The run's start document carries the mark: its batch blocks the loop.
            publish(kafka_bootstrap, kafka_topic, run,
                    headers={0: [(BLOCK_HEADER, str(HANG_S).encode())]})
            blocked = rx.wait_for("BLOCKED", "1", since=ready, timeout=60)
            unblocked = rx.wait_for("UNBLOCKED", "1", since=blocked, timeout=60)
            hung_s = float(rx.messages[unblocked]["BLOCKED_S"])
            assert hung_s >= HANG_S > 3 * WATCHDOG_USEC / 1e6
            assert rx.find("WATCHDOG", since=ready, until=blocked), "no ping before the hang"
            during = rx.find("WATCHDOG", since=blocked, until=unblocked)
            assert not during, (f"WATCHDOG=1 while the event loop was blocked for {hung_s} s "
                                f"({len(during)} pings between BLOCKED=1 and UNBLOCKED=1): "
                                "systemd would not notice a hung loop")

            # The loop runs again: pings resume and the blocked batch is stored after all.
            rx.wait_for("WATCHDOG", "1", since=unblocked, count=3, timeout=60)
            events = len(run) - 3
            wait_until(lambda: daemon.status()["counters"].get("events") == {
                kafka_topic.split(".")[0]: events}, 60, "the blocked run to be stored",
                daemon=daemon)
            assert daemon.terminate(timeout=120) == 0, daemon.tail()
        finally:
            daemon.kill()
