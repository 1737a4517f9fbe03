"""Outages against real processes: the daemon runs as a subprocess against a Kafka
broker and a MongoDB-wire server of the test's own (so stopping them disturbs no one),
while a producer keeps publishing numbered runs. Kafka is stopped for 30 s, then
MongoDB for 30 s, then the daemon itself is frozen (SIGSTOP) past its session timeout,
then its Zarr root is replaced by a file. Each time /readyz goes false and comes back
by itself, the daemon never exits, and at the end every event is stored exactly once.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import create_topic
from test_ops_support import (
    ContinuousProducer,
    DaemonProcess,
    PrivateServices,
    daemon_config,
    free_port_pair,
    poll_readiness,
    verify_exactly_once,
    wait_all_stored,
)

pytestmark = [pytest.mark.kafka, pytest.mark.mongo, pytest.mark.slow]

OUTAGE_S = 30.0
PARTITIONS = 3


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateServices]:
    if shutil.which("java") is None:
        pytest.skip("java is not installed: scripts/services cannot start private services")
    kafka_port = free_port_pair()
    mongo_port = free_port_pair()
    services = PrivateServices(tmp_path_factory.mktemp("services"), kafka_port, mongo_port)
    try:
        services.up()
        yield services
    finally:
        services.wipe()


def _outage(daemon: DaemonProcess, seconds: float) -> list[bool | None]:
    seen = poll_readiness(daemon, seconds)
    assert daemon.alive(), f"the daemon exited during the outage: {daemon.tail()}"
    return seen


@pytest.mark.timeout(600)
def test_daemon_rides_out_outages(private: PrivateServices, tmp_path: Path, tenant: str,
                                  topic: str) -> None:
    anyio.run(create_topic, private.kafka_bootstrap, topic, PARTITIONS)
    zarr_root = tmp_path / "zarr"
    config = daemon_config(tmp_path / "daemon.toml", bootstrap=private.kafka_bootstrap,
                           topic=topic, group=f"g-{topic}", metadata=private.mongo_uri,
                           zarr_root=zarr_root, limits={"batch_max_records": 500})
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    # A second daemon (own group, own stores) to be stopped while Kafka is away.
    other = DaemonProcess(daemon_config(
        tmp_path / "other.toml", bootstrap=private.kafka_bootstrap, topic=topic,
        group=f"other-{topic}", metadata=f"sqlite:///{tmp_path}/other.db",
        zarr_root=tmp_path / "other-zarr"), tmp_path / "other.log").start()
    producer = ContinuousProducer(private.kafka_bootstrap, topic).start()
    report: dict[str, object] = {}
    try:
        daemon.wait_ready(60)
        other.wait_ready(60)
        _wait_progress(daemon, 2000)

        # 1. Kafka down for 30 s, mid-stream. Meanwhile SIGTERM stops the other daemon
        # cleanly and promptly (leaving a group whose broker is gone must not hang).
        private.down("kafka")
        t0 = time.monotonic()
        seen = poll_readiness(daemon, 5.0)
        assert other.terminate(timeout=40) == 0, other.tail()
        report["sigterm_without_kafka_s"] = round(time.monotonic() - t0 - 5.0, 1)
        seen += _outage(daemon, OUTAGE_S - (time.monotonic() - t0))
        assert False in seen, f"/readyz stayed true while Kafka was down: {seen}"
        why = daemon.status()["not_ready"]
        assert any("Kafka" in r for r in why), why
        private.up()
        report["kafka"] = _recovered(daemon, seen)

        # 2. MongoDB down for 30 s, mid-stream.
        before = _events(daemon)
        private.down("mongo")
        seen = _outage(daemon, OUTAGE_S)
        assert False in seen, f"/readyz stayed true while MongoDB was down: {seen}"
        why = daemon.status()["not_ready"]
        assert any("MongoDB" in r for r in why), why
        private.up()
        report["mongo"] = _recovered(daemon, seen)
        _wait_progress(daemon, before + 1000)

        # 3. The daemon frozen past its session timeout (10 s): the group evicts it,
        # it finds out when it thaws, rejoins and goes on.
        daemon.signal(signal.SIGSTOP)
        seen = poll_readiness(daemon, 15.0)
        daemon.signal(signal.SIGCONT)
        assert all(s is None for s in seen[2:]), f"a frozen daemon answered: {seen}"
        report["sigstop"] = _recovered(daemon, seen)
        _wait_progress(daemon, _events(daemon) + 1000)

        # 4. The Zarr root stops taking data (replaced by a file: works even as root).
        away = zarr_root.with_name("zarr.away")
        zarr_root.rename(away)
        zarr_root.write_text("not a directory\n")
        seen = _outage(daemon, 8.0)
        assert False in seen, f"/readyz stayed true without a Zarr root: {seen}"
        why = daemon.status()["not_ready"]
        assert any("Zarr" in r or "zarr" in r for r in why), why
        zarr_root.unlink()
        away.rename(zarr_root)
        report["zarr"] = _recovered(daemon, seen)

        runs = producer.stop()
        wait_all_stored([daemon], private.mongo_uri, tenant, len(runs), timeout=180)
        metrics = _metrics(daemon)
        assert daemon.terminate() == 0, daemon.tail()
    finally:
        producer.abort()
        other.kill()
        if daemon.alive():
            daemon.signal(signal.SIGCONT)
        daemon.kill()
        if zarr_root.is_file():
            zarr_root.unlink()
            shutil.move(str(zarr_root.with_name("zarr.away")), zarr_root)
    checked = verify_exactly_once(private.mongo_uri, tenant, zarr_root, runs)
    log = daemon.log.read_text()
    assert "store failed; rewinding to committed offsets" in log
    assert metrics.get(("bluestream_retries_total", "storage"), 0) > 0
    print(json.dumps({"events_verified": checked, "runs": len(runs),
                      "produced": producer.sent, "producer_retries": producer.errors,
                      "phases": report, "retries": {k[1]: v for k, v in metrics.items()
                                                    if k[0] == "bluestream_retries_total"}}))


def _events(daemon: DaemonProcess) -> int:
    return int(sum(daemon.status()["counters"].get("events", {}).values()))


def _wait_progress(daemon: DaemonProcess, events: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while _events(daemon) < events:
        assert daemon.alive(), daemon.tail()
        assert time.monotonic() < deadline, f"no progress past {events} events: {daemon.tail()}"
        time.sleep(0.25)


def _recovered(daemon: DaemonProcess, seen: list[bool | None]) -> dict[str, object]:
    back_after = daemon.wait_ready(120)
    return {"polls": len(seen), "not_ready_polls": sum(1 for s in seen if s is not True),
            "ready_again_after_s": round(back_after, 1)}


def _metrics(daemon: DaemonProcess) -> dict[tuple[str, str], float]:
    code, body = daemon.get("/metrics")
    assert code == 200
    out: dict[tuple[str, str], float] = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            label = next(iter(s.labels.values()), "") if s.labels else ""
            out[(s.name, label)] = s.value
    return out
