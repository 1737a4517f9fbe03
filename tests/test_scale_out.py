"""Scale-out: daemons in one consumer group share a topic's six partitions. While a
producer keeps publishing, one daemon is killed with SIGKILL, another joins, and one
leaves cleanly with SIGTERM; partitions move each time, and at the end every event of
every run is stored exactly once."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import anyio
import pytest

from conftest import create_topic
from test_ops_support import (
    ContinuousProducer,
    DaemonProcess,
    daemon_config,
    verify_exactly_once,
    wait_all_stored,
)

pytestmark = [pytest.mark.kafka, pytest.mark.mongo, pytest.mark.slow]

PARTITIONS = 6


def _assigned(daemons: list[DaemonProcess]) -> list[list[str]]:
    return [d.status()["assigned"] for d in daemons]


def _wait_shared(daemons: list[DaemonProcess], timeout: float = 60) -> list[list[str]]:
    """Until the daemons hold every partition between them, none twice, each some."""
    deadline = time.monotonic() + timeout
    while True:
        for d in daemons:
            assert d.alive(), d.tail()
        got = _assigned(daemons)
        flat = [p for a in got for p in a]
        if len(flat) == PARTITIONS == len(set(flat)) and all(got):
            return got
        assert time.monotonic() < deadline, f"partitions not shared in {timeout} s: {got}"
        time.sleep(0.5)


def _events(d: DaemonProcess) -> float:
    return float(sum(d.status()["counters"].get("events", {}).values()))


@pytest.mark.timeout(400)
def test_daemons_join_and_leave_mid_stream(kafka_bootstrap: str, mongo_uri: str,
                                           tmp_path: Path, tenant: str, topic: str) -> None:
    anyio.run(create_topic, kafka_bootstrap, topic, PARTITIONS)
    zarr_root = tmp_path / "zarr"

    def daemon(name: str) -> DaemonProcess:
        config = daemon_config(tmp_path / f"{name}.toml", bootstrap=kafka_bootstrap,
                               topic=topic, group=f"g-{topic}", metadata=mongo_uri,
                               zarr_root=zarr_root, kafka={"session_timeout_ms": 6000},
                               limits={"batch_max_records": 500})
        return DaemonProcess(config, tmp_path / f"{name}.log").start()

    a, b = daemon("a"), daemon("b")
    producer = ContinuousProducer(kafka_bootstrap, topic, concurrent_runs=6, rate=900).start()
    c: DaemonProcess | None = None
    moves: dict[str, object] = {}
    try:
        moves["a+b"] = _wait_shared([a, b])
        time.sleep(3)
        a_had = set(a.status()["assigned"])
        b_events = _events(b)
        a.kill()  # SIGKILL mid-stream: its partitions move after the session timeout
        c = daemon("c")
        moves["b+c"] = got = _wait_shared([b, c], timeout=90)
        assert a_had <= set(got[0]) | set(got[1])
        time.sleep(3)
        assert _events(b) > b_events, "b made no progress"
        b.signal(signal.SIGTERM)  # a clean leave: b commits and hands over
        assert b.proc is not None and b.proc.wait(timeout=60) == 0, b.tail()
        moves["c"] = _wait_shared([c])
        time.sleep(2)
        runs = producer.stop()
        wait_all_stored([c], mongo_uri, tenant, len(runs), timeout=180)
        assert c.terminate() == 0, c.tail()
    finally:
        producer.abort()
        for d in (a, b, c):
            if d is not None:
                d.kill()
    checked = verify_exactly_once(mongo_uri, tenant, zarr_root, runs)
    print(json.dumps({"events_verified": checked, "runs": len(runs), "assignments": moves}))
