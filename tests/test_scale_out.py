"""Scale-out: daemons in one consumer group share a topic's six partitions. While a
producer keeps publishing, one daemon is killed with SIGKILL, another joins, and one
leaves cleanly with SIGTERM; partitions move each time, and at the end every event of
every run is stored exactly once. Once with a shared local Zarr root, once with the
arrays on the S3 server (each daemon its own process, one bucket: the multi-host
picture, where no file lock is shared).

"Mid-stream" is observed, not slept for: between the moves the test waits until the
daemons' own ``/status`` shows more events written and offsets committed on the
partitions in question, each wait with a generous deadline.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import anyio
import pytest

from bluestream.storage.zarr_root import S3Options, ZarrRoot
from conftest import S3_ACCESS_KEY_ID, S3_BUCKET, S3_SECRET_ACCESS_KEY, create_topic
from helpers import group_offsets
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
    """Events this daemon process has written to Zarr (its counter; only grows)."""
    return float(sum(d.status()["counters"].get("events", {}).values()))


async def _group_offsets(bootstrap: str, group: str) -> dict[str, int]:
    return {f"{t}:{p}": max(0, off) for (t, p), off in
            (await group_offsets(bootstrap, group)).items()}


def _committed(bootstrap: str, group: str, partitions: Iterable[str] | None = None) -> int:
    """The group's committed offsets as Kafka holds them, summed (over ``partitions``,
    ``"topic:p"`` names, or all): what the group has stored and committed so far."""
    got = anyio.run(_group_offsets, bootstrap, group)
    return sum(got.get(p, 0) for p in (got if partitions is None else partitions))


def _wait_until(condition: Callable[[], bool], what: str, daemons: list[DaemonProcess],
                timeout: float = 120) -> None:
    """Poll ``condition`` every 0.5 s while every daemon stays alive."""
    deadline = time.monotonic() + timeout
    while True:
        for d in daemons:
            assert d.alive(), d.tail()
        if condition():
            return
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.5)


#: Events each daemon must write between two moves: ~1 s of the producer's rate, several
#: of the daemons' batches of 500 records.
PROGRESS = 1000


@pytest.mark.timeout(600)
@pytest.mark.parametrize("arrays", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_daemons_join_and_leave_mid_stream(kafka_bootstrap: str, mongo_uri: str,
                                           tmp_path: Path, tenant: str, topic: str,
                                           arrays: str, request: pytest.FixtureRequest
                                           ) -> None:
    """Each move happens mid-stream, once observed: (1) a is killed once a and b have
    each written ``PROGRESS`` more events since they shared the partitions; (2) b leaves
    once the survivors have committed past the group's offsets on a's partitions at the
    kill (Kafka's committed offsets) and b has written more events than before it; (3)
    the producer stops once c, alone, has committed ``PROGRESS`` more offsets across the
    topic than the group had when b left."""
    anyio.run(create_topic, kafka_bootstrap, topic, PARTITIONS)
    zarr_root: Path | ZarrRoot = tmp_path / "zarr"
    storage: dict[str, object] = {}
    if arrays == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        zarr_root = ZarrRoot.parse(f"s3://{S3_BUCKET}/scale-{topic[:13]}", S3Options(
            endpoint, None, S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY))
        storage = {"s3": {"endpoint": endpoint, "access_key_id": S3_ACCESS_KEY_ID,
                          "secret_access_key": S3_SECRET_ACCESS_KEY}}

    group = f"g-{topic}"

    def daemon(name: str) -> DaemonProcess:
        config = daemon_config(tmp_path / f"{name}.toml", bootstrap=kafka_bootstrap,
                               topic=topic, group=group, metadata=mongo_uri,
                               zarr_root=str(zarr_root), kafka={"session_timeout_ms": 6000},
                               limits={"batch_max_records": 500}, storage=storage)
        return DaemonProcess(config, tmp_path / f"{name}.log").start()

    a, b = daemon("a"), daemon("b")
    producer = ContinuousProducer(kafka_bootstrap, topic, concurrent_runs=6, rate=900).start()
    c: DaemonProcess | None = None
    moves: dict[str, object] = {}
    try:
        moves["a+b"] = _wait_shared([a, b])
        settled = {d.log.stem: _events(d) for d in (a, b)}
        _wait_until(lambda: all(_events(d) >= settled[d.log.stem] + PROGRESS
                                for d in (a, b)),
                    f"a and b each to write {PROGRESS} more events", [a, b])
        a_had = set(a.status()["assigned"])
        b_events = _events(b)
        a.kill()  # SIGKILL mid-stream: its partitions move after the session timeout
        at_kill = _committed(kafka_bootstrap, group, a_had)  # a can commit no more
        c = daemon("c")
        moves["b+c"] = got = _wait_shared([b, c], timeout=90)
        assert a_had <= set(got[0]) | set(got[1])
        _wait_until(lambda: _committed(kafka_bootstrap, group, a_had) > at_kill,
                    "b and c to commit past the group's offsets on a's partitions", [b, c])
        _wait_until(lambda: _events(b) > b_events, "b to make progress", [b, c])
        b.signal(signal.SIGTERM)  # a clean leave: b commits and hands over
        assert b.proc is not None and b.proc.wait(timeout=60) == 0, b.tail()
        handed = _committed(kafka_bootstrap, group)  # only c commits from here on
        moves["c"] = _wait_shared([c])
        _wait_until(lambda: _committed(kafka_bootstrap, group) >= handed + PROGRESS,
                    f"c to commit {PROGRESS} more offsets alone", [c])
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
