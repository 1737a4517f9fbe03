"""Exactly-once in effect: the daemon is SIGKILLed at random moments while it ingests
numbered events from several partitions; after restarts the stored result is exactly
the published one. A replay of the whole topic into existing storage changes nothing.
Two shapes: long runs (rows reach the Zarr arrays block by block) and many short runs
(kept whole in their streams' tails in the metadata store); long runs once more with
the Zarr root on the S3 server (the daemon reads its endpoint and credentials from the
standard AWS variables).

Every wait is on observable state, not on the machine's speed: kills follow stored
progress (each one lands after a further share of the events is stored, plus a random
delay); the end of each phase is the consumer group's committed offsets reaching the
topic's end offsets. The replay phase also asserts, from the daemon's own /metrics, that
it re-read every event (a replay that read nothing would leave the bytes unchanged too:
checked by pointing it at an empty topic, which fails the event count)."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from pymongo import MongoClient

from bluestream.catalog import open_catalog
from bluestream.consumers.decode import encode_message
from bluestream.storage.zarr_root import ZarrRoot
from conftest import create_topic
from helpers import read_stream_arrays, scalar_run, zarr_files

pytestmark = [pytest.mark.kafka, pytest.mark.mongo, pytest.mark.slow]

PARTITIONS = 4
#: (runs, events per run, records per batch): long runs, 50,000 events in all, whose rows
#: go to the arrays block by block; and 300 short runs kept whole in their streams'
#: tails (storage/tail.py), in small batches so that kills fall between them.
SHAPES = {"long-runs": (8, 6_250, 2_000), "short-runs": (300, 2, 30)}


async def publish(bootstrap: str, topic: str, runs: list[list[tuple[str, Any]]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20,
                                max_batch_size=1 << 20, acks="all")
    await producer.start()
    try:
        futures = []
        # Interleave runs so every partition carries several runs at once.
        for i in range(max(len(r) for r in runs)):
            for run in runs:
                if i < len(run):
                    name, doc = run[i]
                    key = run[0][1]["uid"].encode()
                    futures.append(await producer.send(topic, encode_message(name, doc),
                                                       key=key))
        await producer.flush()
        for f in futures:
            await f
    finally:
        await producer.stop()


def start_daemon(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "bluestream", "serve"], env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def stored_events(mongo_uri: str, tenant: str, zarr_root: Path | ZarrRoot
                  ) -> dict[str, dict[str, Any]]:
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_uri)
    try:
        db = client[tenant]
        out = {}
        for st in db.event_stream.find({}, {"_id": 0}):
            arrays = read_stream_arrays(zarr_root, tenant, st["run_start"], st["descriptor_uid"],
                                        mongo_uri, record=st)
            out[st["run_start"]] = {"stream": st, **arrays}
        return out
    finally:
        client.close()


def stored_count(mongo_uri: str, tenant: str) -> int:
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_uri)
    try:
        return sum(int(s["length"]) for s in client[tenant].event_stream.find({}))
    finally:
        client.close()


def all_stopped(mongo_uri: str, tenant: str) -> int:
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_uri)
    try:
        return int(client[tenant].run_stop.count_documents({}))
    finally:
        client.close()


def snapshot(mongo_uri: str, tenant: str, zarr_root: Path | ZarrRoot) -> dict[str, str]:
    """A digest of everything stored: every Zarr file (or object) and every metadata
    document."""
    digests = {key: digest for key, digest in zarr_files(zarr_root, tenant).items()
               if not key.endswith(".lock")}
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_uri)
    try:
        db = client[tenant]
        for coll in sorted(db.list_collection_names()):
            # Provenance records which processes wrote each run: a replay adds itself
            # there (checked by sessions_of), so it is compared without that part.
            found = list(db[coll].find({}, {"_id": 0}))
            if coll == "ingest_log":
                found = [{**d, "extra": {k: v for k, v in d["extra"].items()
                                         if k != "sessions"}} for d in found]
            docs = sorted(repr(sorted(d.items())) for d in found)
            digests[f"mongo:{coll}"] = hashlib.sha256("\n".join(docs).encode()).hexdigest()
    finally:
        client.close()
    return digests


@pytest.mark.parametrize(("shape", "arrays"), [
    ("long-runs", "local"), ("short-runs", "local"),
    pytest.param("long-runs", "s3", marks=pytest.mark.s3)])
def test_sigkill_loop_stores_every_event_exactly_once(
        shape: str, arrays: str, kafka_bootstrap: str, mongo_uri: str, topic: str,
        tenant: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    n_runs, per_run, batch = SHAPES[shape]
    zarr_root: Path | ZarrRoot = request.getfixturevalue(
        "s3_root" if arrays == "s3" else "zarr_root")
    runs = [scalar_run(per_run, fields=4, scan_id=i + 1) for i in range(n_runs)]
    anyio.run(create_topic, kafka_bootstrap, topic, PARTITIONS)
    anyio.run(publish, kafka_bootstrap, topic, runs)
    env = {**os.environ, "BLUESTREAM_KAFKA_BOOTSTRAP": kafka_bootstrap,
           "BLUESTREAM_TOPICS": topic, "BLUESTREAM_GROUP_ID": f"g-{topic}",
           "BLUESTREAM_METADATA": mongo_uri, "BLUESTREAM_ZARR_ROOT": str(zarr_root),
           "BLUESTREAM_HTTP_PORT": "0", "BLUESTREAM_LOG_FORMAT": "json"}
    # Small batches: several per partition, so a kill can fall between them (the
    # default of 20,000 records stores this topic in two or three batches).
    config = tmp_path / "daemon.toml"
    config.write_text(f"[limits]\nbatch_max_records = {batch}\n")
    env["BLUESTREAM_CONFIG"] = str(config)
    log = tmp_path / "daemon.log"
    rng = random.Random(1234)
    total = n_runs * per_run
    progress: list[int] = []
    group = env["BLUESTREAM_GROUP_ID"]
    for kill in range(1, 6):
        proc = start_daemon(env, log)
        # Kill once a further share of the events is stored (never a fixed time, which
        # a fast machine outruns and a slow one never reaches), at a random moment after.
        target = total * kill // 7
        _wait(lambda target=target: stored_count(mongo_uri, tenant) >= target, proc, log,
              f"{target} events stored")
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        progress.append(stored_count(mongo_uri, tenant))
    # The kills must have hit the daemon mid-stream, or the test proves nothing.
    assert sum(1 for p in progress if 0 < p < total) >= 3, progress
    logged = log.stat().st_size
    proc = start_daemon(env, log)
    try:
        _wait(lambda: all_stopped(mongo_uri, tenant) >= n_runs, proc, log, "every run")
        _wait(lambda: _committed_to_end(kafka_bootstrap, group, topic), proc, log,
              "offsets committed to the end")
        # The last killed daemon may have stored and committed everything already: a
        # SIGTERM before this one handles signals would kill it instead of stopping it.
        _wait(lambda: b'"event": "ready"' in log.read_bytes()[logged:], proc, log,
              "the last daemon ready")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    verify(mongo_uri, tenant, zarr_root, runs, per_run)
    written = sessions_of(mongo_uri, tenant)
    # Provenance names every daemon run that wrote a run, with the offsets it wrote;
    # runs stored across a kill name the killed daemon and its successor.
    assert len({sid for rec in written.values() for sid in rec["sessions"]}) >= 2
    assert sum(1 for rec in written.values() if len(rec["sessions"]) >= 2) >= 1, written
    for rec in written.values():
        check_sessions_cover(rec)
    cat = open_catalog(tenant, metadata=mongo_uri, zarr_root=zarr_root)
    try:
        run = cat[runs[0][0][1]["uid"]]
        prov = run.provenance()
        [source] = prov["sources"]
        assert source["topic"] == topic and prov["topics"] == [topic]
        assert {w["session"] for w in source["writers"]} == \
            set(written[run.uid]["sessions"])
    finally:
        cat.close()

    # A replay of the whole topic by a new consumer group changes nothing.
    before = snapshot(mongo_uri, tenant, zarr_root)
    replay_group = env["BLUESTREAM_GROUP_ID"] = f"replay-{topic}"
    url_file = tmp_path / "replay.url"
    env["BLUESTREAM_HTTP_URL_FILE"] = str(url_file)
    proc = start_daemon(env, log)
    try:
        _wait(lambda: _committed_to_end(kafka_bootstrap, replay_group, topic), proc, log,
              "the replay group's offsets committed to the end")
        assert _metric(url_file, 'bluestream_documents_total{kind="event"}') == total
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert snapshot(mongo_uri, tenant, zarr_root) == before
    verify(mongo_uri, tenant, zarr_root, runs, per_run)
    # ... except that the replaying daemon is named in each run's provenance, with the
    # whole offset range of the run.
    for run_uid, rec in sessions_of(mongo_uri, tenant).items():
        new = set(rec["sessions"]) - set(written[run_uid]["sessions"])
        assert len(new) == 1, rec
        replayed = rec["sessions"][new.pop()]
        assert (replayed["offset_min"], replayed["offset_max"]) == \
            (rec["offset_min"], rec["offset_max"])


def sessions_of(mongo_uri: str, tenant: str) -> dict[str, dict[str, Any]]:
    """Each run's ingest_log record (one topic partition per run here), with the
    processes that wrote it under ``sessions``."""
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_uri)
    try:
        out = {}
        for rec in client[tenant].ingest_log.find({}, {"_id": 0}):
            assert rec["run_start"] not in out, "a run spread over partitions"
            out[rec["run_start"]] = {**rec, "sessions": rec["extra"]["sessions"]}
        return out
    finally:
        client.close()


def check_sessions_cover(rec: dict[str, Any]) -> None:
    """The writers' offset ranges lie within the record's and reach both its ends."""
    sessions = rec["sessions"].values()
    assert sessions
    for s in sessions:
        assert rec["offset_min"] <= s["offset_min"] <= s["offset_max"] <= rec["offset_max"]
        assert s["host"] and s["daemon_version"] and s["pid"] > 0
    assert min(s["offset_min"] for s in sessions) == rec["offset_min"]
    assert max(s["offset_max"] for s in sessions) == rec["offset_max"]


def _wait(done: Any, proc: subprocess.Popen[bytes], log: Path, what: str,
          timeout: float = 300) -> None:
    """Poll ``done()`` while the daemon lives; a generous deadline for a loaded machine."""
    deadline = time.monotonic() + timeout
    while not done():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _committed_to_end(bootstrap: str, group: str, topic: str) -> bool:
    """The group's committed offset equals the end offset on every partition."""
    async def check() -> bool:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                    enable_auto_commit=False)
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
            ends = await consumer.end_offsets(tps)
            for tp in tps:
                if (await consumer.committed(tp) or 0) < ends[tp]:
                    return False
            return True
        finally:
            await consumer.stop()
    return anyio.run(check)


def _metric(url_file: Path, series: str) -> float:
    """One series of the daemon's /metrics (found through its http.url_file)."""
    base = url_file.read_text().strip()
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(series + " "):
                return float(line.split()[-1])
    raise AssertionError(f"{series} not in /metrics")


def verify(mongo_uri: str, tenant: str, zarr_root: Path | ZarrRoot,
           runs: list[list[tuple[str, Any]]], per_run: int) -> None:
    n_runs = len(runs)
    stored = stored_events(mongo_uri, tenant, zarr_root)
    assert len(stored) == n_runs
    for run in runs:
        uid = run[0][1]["uid"]
        got = stored[uid]
        events = [d for n, d in run if n == "event"]
        assert got["stream"]["length"] == per_run
        np.testing.assert_array_equal(got["seq_num"], np.arange(1, per_run + 1))
        np.testing.assert_array_equal(got["data/counter"], [e["data"]["counter"] for e in events])
        np.testing.assert_array_equal(got["data/f0"], [e["data"]["f0"] for e in events])
        assert got["uid"].tolist() == [e["uid"] for e in events]
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_uri)
    try:
        db = client[tenant]
        assert db.run_start.count_documents({}) == n_runs
        assert db.run_stop.count_documents({}) == n_runs
        assert db.event_descriptor.count_documents({}) == n_runs
    finally:
        client.close()
