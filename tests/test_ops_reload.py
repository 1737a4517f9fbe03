"""SIGHUP reload: what can change at run time (log level, summary interval, park
limits) changes in the running daemon; anything else is logged as needing a restart;
an invalid file changes nothing. (The signal itself, and the RELOADING=1/READY=1 it
sends to systemd, are covered by test_ops_notify.)"""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest
from structlog.testing import capture_logs

from bluestream.daemon.service import Daemon
from bluestream.settings import load_settings
from test_ingest_kafka import wait_for
from test_ops_support import daemon_config, write_config

pytestmark = [pytest.mark.kafka, pytest.mark.anyio]


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
        assert daemon.settings.storage.zarr_root == zarr_root
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
