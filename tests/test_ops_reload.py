"""SIGHUP reload: what can change at run time (log level, summary interval, park
limits) changes in the running daemon; anything else is logged as needing a restart;
an invalid file changes nothing.

``test_sighup_reloads_the_running_daemon`` does it as systemd does (``systemctl reload``
sends SIGHUP to ``bluestream serve``): a real subprocess, a changed file, a real signal,
and the effects read from what the daemon shows -- its JSON log and ``/status`` -- each
awaited with a generous timeout. (RELOADING=1/READY=1 around it are in test_ops_notify.)
"""

from __future__ import annotations

import os
import signal
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from bluestream.daemon.service import Daemon
from bluestream.settings import load_settings
from helpers import scalar_run
from test_ingest_kafka import wait_for
from test_ops_support import DaemonProcess, daemon_config, publish, wait_until, write_config

pytestmark = [pytest.mark.kafka]

RELOADABLE_KEYS = ["limits.park_max_age_s", "limits.park_max_count", "log.level",
                   "log.summary_interval_s"]


@pytest.mark.anyio
async def test_reload_applies_what_it_can(kafka_bootstrap: str, kafka_topic: str,
                                          tmp_path: Path, zarr_root: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in os.environ if v.startswith("BLUESTREAM_")]:
        monkeypatch.delenv(var)
    path = tmp_path / "d.toml"

    def config(**changes: dict[str, object]) -> Path:
        return daemon_config(path, bootstrap=kafka_bootstrap, topic=kafka_topic,
                             group=f"g-{kafka_topic}", metadata=f"sqlite:///{tmp_path}/m.db",
                             zarr_root=zarr_root, **changes)

    config()
    daemon = Daemon(load_settings(path), handle_signals=False, config_path=path)
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)

        async def assigned() -> bool:
            return daemon.ready and bool(daemon.source and daemon.source.state.assigned)
        await wait_for(assigned, 60, "the assignment")
        assert daemon.source is not None
        config(log={"level": "debug", "summary_interval_s": 3.0},
               limits={"park_max_count": 7, "park_max_age_s": 2.5},
               kafka={"group_id": "another-group"}, storage={"zarr_root": str(tmp_path / "z2")})
        with capture_logs() as logs:
            applied = daemon.reload()
        assert sorted(applied) == ["limits.park_max_age_s", "limits.park_max_count",
                                   "log.level", "log.summary_interval_s"]
        assert daemon.settings.log.level == "debug"
        assert daemon.settings.limits.park_max_age_s == 2.5
        assert daemon.source.ingestor.parked.max_count == 7
        assert daemon.source.ingestor.parked.max_age_s == 2.5
        # Not applied: still consuming as the group it started with, into the same root.
        assert daemon.settings.kafka.group_id == f"g-{kafka_topic}"
        assert daemon.settings.storage.zarr_root == str(zarr_root)
        restart = next(e for e in logs if e["event"].startswith("configuration changes need"))
        assert restart["keys"] == ["kafka.group_id", "storage.zarr_root"]
        assert restart["log_level"] == "warning"

        write_config(path, {"http": {"port": "not a port"}})
        with capture_logs() as logs:
            assert daemon.reload() == []
        failed = next(e for e in logs if e["event"].startswith("reload failed"))
        assert "http.port" in failed["error"] and failed["log_level"] == "error"
        assert daemon.settings.log.level == "debug"  # unchanged by the bad file
        assert daemon.ready
        daemon.stop.set()


# -- through a real signal ---------------------------------------------------------------

def _config(path: Path, kafka_bootstrap: str, topic: str, tmp_path: Path, *, level: str,
            summary_s: float, park_count: int, park_age_s: float, group: str) -> Path:
    return daemon_config(path, bootstrap=kafka_bootstrap, topic=topic, group=group,
                         metadata=f"sqlite:///{tmp_path}/m.db", zarr_root=tmp_path / "zarr",
                         log={"level": level, "summary_interval_s": summary_s},
                         limits={"park_max_count": park_count, "park_max_age_s": park_age_s})


def _hup(daemon: DaemonProcess) -> int:
    """SIGHUP; the log index of the "configuration reloaded" line it caused."""
    after = len(daemon.log_events())
    daemon.signal(signal.SIGHUP)
    [reloaded] = daemon.wait_log(lambda e: e.get("event") == "configuration reloaded",
                                 "the reload to be logged", after=after)
    return reloaded


def _time(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def _summary(e: dict[str, Any]) -> bool:
    return e.get("event") == "summary"


def _dead_letters(daemon: DaemonProcess, since: int = 0) -> list[str]:
    """Sources (topic[partition]@offset) of the dead-lettered lines logged at or past
    ``since``."""
    return [e["source"] for e in daemon.log_events()[since:] if e.get("event") == "dead-lettered"]


def test_sighup_reloads_the_running_daemon(kafka_bootstrap: str, kafka_topic: str,
                                           tmp_path: Path) -> None:
    """Each promise of the reload, observed in the running daemon:

    * log.level info -> debug: no line at level debug before, debug lines after;
      debug -> info: none after that reload.
    * log.summary_interval_s 0.2 -> 1.5: after the reload (and the one summary already
      waiting on the old interval) consecutive summary lines are >= 1.5 s apart by the
      daemon's own timestamps. A sleep never ends early, so load cannot make this fail;
      with the old 0.2 s interval still in force the gaps are ~0.2 s.
    * limits.park_max_count 10000 -> 1 with three orphan events parked: the two oldest
      (offsets 0 and 1) are dead-lettered as unknown-descriptor, one stays parked.
    * limits.park_max_age_s 3600 -> 0.5: the last one is dead-lettered too.
    * kafka.group_id changed: logged as needing a restart; still consuming as the group
      it started with.

    Checked against broken builds (a copy of src run with PYTHONPATH=copy/src), one at
    a time: ``reload()`` not calling ``configure_logging`` -> "timed out ... waiting for
    a debug line after the reload"; the new summary interval left out of the settings it
    keeps -> "summary lines 0.2 s apart after the reload to 1.5 s"; the park limits not
    handed to the parking lot -> "timed out ... waiting for park_max_count=1 to
    dead-letter the two oldest" (parked stayed 3); the restart warning removed ->
    "timed out ... waiting for the restart warning"."""
    path = tmp_path / "d.toml"
    group = f"g-{kafka_topic}"

    def config(**kw: Any) -> Path:
        return _config(path, kafka_bootstrap, kafka_topic, tmp_path, **kw)

    config(level="info", summary_s=0.2, park_count=10_000, park_age_s=3600.0, group=group)
    daemon = DaemonProcess(path, tmp_path / "d.log").start()
    try:
        daemon.wait_ready()
        daemon.wait_log(_summary, "summary lines every 0.2 s", count=3)
        # Three events whose descriptor never comes: parked, and kept under these limits.
        orphans = [d for d in scalar_run(3) if d[0] == "event"]
        publish(kafka_bootstrap, kafka_topic, orphans)
        wait_until(lambda: daemon.status()["parked"] == 3, 60, "three parked events",
                   daemon=daemon)
        assert daemon.status()["counters"].get("dead_lettered", {}) == {}
        levels = {e.get("level") for e in daemon.log_events()}
        assert "info" in levels and "debug" not in levels, levels

        # 1. Debug logging, a longer summary interval, a lot for one, another group.
        config(level="debug", summary_s=1.5, park_count=1, park_age_s=3600.0,
               group="another-group")
        reloaded = _hup(daemon)
        events = daemon.log_events()
        assert sorted(events[reloaded]["applied"]) == RELOADABLE_KEYS[1:], events[reloaded]
        [restart] = daemon.wait_log(
            lambda e: str(e.get("event")).startswith("configuration changes need a restart"),
            "the restart warning", after=reloaded)
        assert daemon.log_events()[restart]["keys"] == ["kafka.group_id"]
        assert daemon.log_events()[restart]["level"] == "warning"

        daemon.wait_log(lambda e: e.get("level") == "debug", "a debug line after the reload",
                        after=reloaded)

        def two_oldest_gone() -> bool:
            st = daemon.status()
            return (st["parked"] == 1
                    and st["counters"].get("dead_lettered") == {"unknown-descriptor": 2})
        wait_until(two_oldest_gone, 60, "park_max_count=1 to dead-letter the two oldest",
                   daemon=daemon)
        assert _dead_letters(daemon) == [f"{kafka_topic}[0]@0", f"{kafka_topic}[0]@1"]

        status = daemon.status()
        assert status["group"] == group  # not applied: needs a restart
        assert status["settings"]["log"]["level"] == "debug"
        assert status["settings"]["limits"]["park_max_count"] == 1

        hits = daemon.wait_log(_summary, "three summaries after the reload", after=reloaded,
                               count=3, timeout=120)
        events = daemon.log_events()
        gaps = [round(_time(events[b]) - _time(events[a]), 3) for a, b in pairwise(hits)]
        assert min(gaps) >= 1.45, \
            f"summary lines {gaps} s apart after the reload to 1.5 s (they were 0.2 s)"

        # 2. Parked documents expire after 0.5 s now; back to info.
        config(level="info", summary_s=1.5, park_count=1, park_age_s=0.5,
               group="another-group")
        reloaded = _hup(daemon)
        assert sorted(daemon.log_events()[reloaded]["applied"]) == [
            "limits.park_max_age_s", "log.level"]

        def all_expired() -> bool:
            st = daemon.status()
            return (st["parked"] == 0
                    and st["counters"].get("dead_lettered") == {"unknown-descriptor": 3})
        wait_until(all_expired, 60, "park_max_age_s=0.5 to dead-letter the last one",
                   daemon=daemon)
        assert _dead_letters(daemon, since=reloaded) == [f"{kafka_topic}[0]@2"]
        late = [e for e in daemon.log_events()[reloaded:] if e.get("level") == "debug"]
        assert not late, f"debug lines after the reload to info: {late[:3]}"

        assert daemon.terminate(timeout=120) == 0, daemon.tail()
    finally:
        daemon.kill()


def test_a_shorter_summary_interval_applies_at_once(kafka_bootstrap: str, kafka_topic: str,
                                                    tmp_path: Path) -> None:
    """log.summary_interval_s 3600 -> 0.2 by SIGHUP: summary lines should follow within
    seconds (awaited for 30 s). Failed before the fix: the daemon slept out the 3600 s
    it had started before the reload (a reload now wakes the summary loop)."""
    path = tmp_path / "d.toml"

    def config(summary_s: float) -> Path:
        return _config(path, kafka_bootstrap, kafka_topic, tmp_path, level="info",
                       summary_s=summary_s, park_count=10_000, park_age_s=60.0,
                       group=f"g-{kafka_topic}")

    config(3600.0)
    daemon = DaemonProcess(path, tmp_path / "d.log").start()
    try:
        daemon.wait_ready()
        assert not [e for e in daemon.log_events() if _summary(e)]
        config(0.2)
        reloaded = _hup(daemon)
        daemon.wait_log(_summary, "summaries every 0.2 s after the reload", after=reloaded,
                        count=3, timeout=30)
        assert daemon.terminate(timeout=120) == 0, daemon.tail()
    finally:
        daemon.kill()
