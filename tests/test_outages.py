"""Outages against real processes: the daemon runs as a subprocess against a Kafka
broker and a MongoDB-wire server of the test's own (so stopping them disturbs no one),
while a producer keeps publishing numbered runs. Kafka is stopped for 30 s, then
MongoDB for 30 s, then the daemon itself is frozen (SIGSTOP) past its session timeout,
then its Zarr root is replaced by a file. Each time /readyz answers 503 naming the
dependency that failed, comes back by itself, the daemon never exits, and at the end
every event is stored exactly once. A second test stops the test's own S3 server for
30 s under a daemon whose Zarr root is on it.

The test waits on what the daemon shows (/readyz, its counters), each wait with a
generous timeout; the 30 s and 15 s are the lengths of the faults, not synchronisation.
Times measured along the way are reported, not asserted.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bluestream.storage.zarr_root import S3Options, ZarrRoot
from conftest import S3_ACCESS_KEY_ID, S3_BUCKET, S3_SECRET_ACCESS_KEY, create_topic
from helpers import group_offsets
from test_ops_support import (
    ContinuousProducer,
    DaemonProcess,
    PrivateServices,
    daemon_config,
    free_port_pair,
    poll_readiness,
    readyz,
    verify_exactly_once,
    wait_all_stored,
    wait_until,
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
    s3_port = free_port_pair()
    services = PrivateServices(tmp_path_factory.mktemp("services"), kafka_port, mongo_port,
                               s3_port)
    try:
        services.up()
        yield services
    finally:
        services.wipe()


@pytest.mark.timeout(900)
def test_daemon_rides_out_outages(private: PrivateServices, tmp_path: Path, tenant: str,
                                  topic: str) -> None:
    """Each phase waits for /readyz to answer 503 naming the failed dependency, as the
    active checks report it: "Kafka at <bootstrap> ..." (or the consumer loop's
    "Kafka: ..."), "metadata: MongoDB at <uri> ...", "zarr: Zarr root <root> is not
    writable" -- not for any 503, nor for any reason that merely contains a name: the
    start-up reasons ("starting: connecting to Kafka at ...", "metadata: not checked
    yet", "zarr: not checked yet") contain the same names before anything failed, and
    the Zarr root's path is in reasons about other things.

    Checked against broken builds (a copy of src run with PYTHONPATH=copy/src), one at a
    time: ``not_ready_reasons`` giving "not consuming" instead of the Kafka error ->
    "timed out after 120 s waiting for /readyz to name Kafka" (last answer: 503, ['not
    consuming']); the metadata check made to pass (``_ping_metadata`` returning at once)
    -> "... to name MongoDB" (last answer: only the failed write's "MongoDB at ... is
    unreachable"); the Zarr check made to pass (``_probe_zarr`` returning at once) ->
    "... to name the Zarr root" (last answer: only "writing Zarr group ... failed"). The
    last two passed the previous assertions ("MongoDB" in a reason, "zarr" in a reason):
    the failed writes' own errors matched them, while an idle daemon would have reported
    ready with its store gone. (``KafkaSource.probe`` not marking Kafka down still
    passes: the consumer loop's commit timeouts name Kafka too, so the promise holds.)"""
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
        zarr_root=tmp_path / "other-zarr", top={"shutdown_timeout_s": 10.0}),
        tmp_path / "other.log").start()
    producer = ContinuousProducer(private.kafka_bootstrap, topic).start()
    report: dict[str, object] = {}
    try:
        daemon.wait_ready(120)
        other.wait_ready(120)
        _wait_progress(daemon, 2000)

        # 1. Kafka down for 30 s, mid-stream. Meanwhile SIGTERM stops the other daemon
        # cleanly (leaving a group whose broker is gone must not hang: its shutdown is
        # bounded by shutdown_timeout_s, 10 s, plus bounded closes; 120 s is generous).
        private.down("kafka")
        down_at = time.monotonic()
        bootstrap = private.kafka_bootstrap
        named = _wait_named(daemon, "Kafka", lambda r: r.startswith(
            (f"Kafka at {bootstrap} ", "Kafka: ")))
        t_term = time.monotonic()
        assert other.terminate(timeout=120) == 0, other.tail()
        report["sigterm_without_kafka_s"] = round(time.monotonic() - t_term, 1)
        _hold(daemon, down_at, OUTAGE_S)
        private.up()
        report["kafka"] = _recovered(daemon, named)

        # 2. MongoDB down for 30 s, mid-stream.
        before = _events(daemon)
        private.down("mongo")
        down_at = time.monotonic()
        uri = private.mongo_uri
        named = _wait_named(daemon, "MongoDB", lambda r: r.startswith(
            f"metadata: MongoDB at {uri} "))
        _hold(daemon, down_at, OUTAGE_S)
        private.up()
        report["mongo"] = _recovered(daemon, named)
        _wait_progress(daemon, before + 1000)

        # 3. The daemon frozen past its session timeout (10 s): the group evicts it,
        # it finds out when it thaws, rejoins and goes on.
        daemon.signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        wait_until(lambda: daemon.pid_state() == "T", 30, "the daemon to be stopped")
        seen = poll_readiness(daemon, 15.0 - (time.monotonic() - frozen_at))
        daemon.signal(signal.SIGCONT)
        assert all(s is None for s in seen), f"a frozen daemon answered: {seen}"
        report["sigstop"] = _recovered(daemon, [])
        _wait_progress(daemon, _events(daemon) + 1000)

        # 4. The Zarr root stops taking data (replaced by a file: works even as root).
        away = zarr_root.with_name("zarr.away")
        zarr_root.rename(away)
        zarr_root.write_text("not a directory\n")
        named = _wait_named(daemon, "the Zarr root", lambda r: r.startswith(
            f"zarr: Zarr root {zarr_root} is not writable"))
        zarr_root.unlink()
        away.rename(zarr_root)
        report["zarr"] = _recovered(daemon, named)

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


@pytest.mark.s3
@pytest.mark.timeout(600)
def test_daemon_rides_out_an_s3_outage(private: PrivateServices, tmp_path: Path, tenant: str,
                                       topic: str) -> None:
    """The Zarr root on the test's own S3 server, every row written to the arrays
    (``tail_rows = 0``), the server stopped for 30 s mid-stream: /readyz names the Zarr
    root, the group commits nothing while it is away (nothing more can be stored), the
    daemon never exits and resumes by itself, and every event is stored exactly once."""
    anyio.run(create_topic, private.kafka_bootstrap, topic, PARTITIONS)
    root = ZarrRoot.parse(f"s3://{S3_BUCKET}/outage-{tenant}", S3Options(
        private.s3_endpoint, None, S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY))
    group = f"g-{topic}"
    config = daemon_config(
        tmp_path / "daemon.toml", bootstrap=private.kafka_bootstrap, topic=topic,
        group=group, metadata=private.mongo_uri, zarr_root=str(root),
        limits={"batch_max_records": 500},
        storage={"tail_rows": 0, "s3": {"endpoint": private.s3_endpoint,
                                        "access_key_id": S3_ACCESS_KEY_ID,
                                        "secret_access_key": S3_SECRET_ACCESS_KEY}})
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    producer = ContinuousProducer(private.kafka_bootstrap, topic).start()

    def committed() -> dict[tuple[str, int], int]:
        return anyio.run(group_offsets, private.kafka_bootstrap, group)

    report: dict[str, object] = {}
    try:
        daemon.wait_ready(120)
        _wait_progress(daemon, 2000)
        private.down("s3")
        down_at = time.monotonic()
        named = _wait_named(daemon, "the Zarr root", lambda r: r.startswith(
            ("zarr: Zarr root: ", "zarr: no answer")))
        time.sleep(5)  # a batch whose writes were under way when S3 went has failed now
        held = committed()
        events_held = _events(daemon)
        _hold(daemon, down_at, OUTAGE_S)
        assert committed() == held, "offsets were committed while nothing could be stored"
        assert _events(daemon) == events_held
        private.up()
        report["s3"] = _recovered(daemon, named)
        _wait_progress(daemon, events_held + 1000)
        runs = producer.stop()
        wait_all_stored([daemon], private.mongo_uri, tenant, len(runs), timeout=180)
        metrics = _metrics(daemon)
        assert daemon.terminate() == 0, daemon.tail()
    finally:
        producer.abort()
        daemon.kill()
    checked = verify_exactly_once(private.mongo_uri, tenant, root, runs)
    assert metrics.get(("bluestream_retries_total", "storage"), 0) > 0
    print(json.dumps({"events_verified": checked, "runs": len(runs), "phases": report}))


def _wait_named(daemon: DaemonProcess, what: str,
                names: Callable[[str], bool]) -> list[str]:
    """Until /readyz answers 503 with a reason ``names`` accepts (the daemon staying up
    meanwhile); the reasons it gave."""
    last: list[tuple[int, list[str]]] = []

    def named() -> list[str] | None:
        code, reasons = readyz(daemon)
        last[:] = [(code, reasons)]
        return reasons if code == 503 and any(names(r) for r in reasons) else None
    try:
        return wait_until(named, 120, f"/readyz to name {what}", daemon=daemon, interval=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nlast /readyz answer: {last}") from None


def _hold(daemon: DaemonProcess, since: float, seconds: float) -> None:
    """Keep the fault in place until ``seconds`` after ``since`` (the outage's length),
    the daemon staying up all along."""
    while time.monotonic() - since < seconds:
        assert daemon.alive(), f"the daemon exited during the outage: {daemon.tail()}"
        time.sleep(0.5)


def _events(daemon: DaemonProcess) -> int:
    return int(sum(daemon.status()["counters"].get("events", {}).values()))


def _wait_progress(daemon: DaemonProcess, events: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while _events(daemon) < events:
        assert daemon.alive(), daemon.tail()
        assert time.monotonic() < deadline, f"no progress past {events} events: {daemon.tail()}"
        time.sleep(0.25)


def _recovered(daemon: DaemonProcess, named: list[str]) -> dict[str, object]:
    """Waits until ready again; what to report (the reasons given, the time it took)."""
    back_after = daemon.wait_ready(180)
    return {"reasons": named, "ready_again_after_s": round(back_after, 1)}


def _metrics(daemon: DaemonProcess) -> dict[tuple[str, str], float]:
    code, body = daemon.get("/metrics")
    assert code == 200
    out: dict[tuple[str, str], float] = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            label = next(iter(s.labels.values()), "") if s.labels else ""
            out[(s.name, label)] = s.value
    return out
