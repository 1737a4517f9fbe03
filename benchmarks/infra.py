"""The services side of the benchmarks: Kafka topics and publishing (confluent-kafka, the
client bluesky-kafka's Publisher uses, and fast enough not to be the bottleneck), the
daemon as a subprocess, and checks of what was stored.

Completion of an ingest is detected the way an operator would: the consumer group's
committed offsets reach the end of every partition (stored *and* committed, DESIGN I1).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from bluestream.storage.backends import open_metadata_store

__all__ = ["DaemonProcess", "IngestTiming", "Message", "RssSampler", "checked_ingest",
           "committed_offsets", "create_topic", "delete_topics", "drop_databases",
           "end_offsets", "metadata_uri", "publish", "rss_report", "stored_events",
           "timed_ingest", "wait_committed"]

#: (key, value, partition or -1 for the partitioner's choice)
Message = tuple[bytes | None, bytes, int]


# -- topics -------------------------------------------------------------------------------
def create_topic(bootstrap: str, topic: str, partitions: int = 1) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(topic, num_partitions=partitions,
                                            replication_factor=1)])
    for fut in futures.values():
        fut.result(timeout=30)
    # Wait until the broker reports the topic with its partitions (metadata propagation).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        md = admin.list_topics(topic, timeout=10)
        t = md.topics.get(topic)
        if t is not None and t.error is None and len(t.partitions) == partitions:
            return
        time.sleep(0.1)
    raise RuntimeError(f"topic {topic} did not appear")


def delete_topics(bootstrap: str, topics: list[str]) -> None:
    if not topics:
        return
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})
    for fut in admin.delete_topics(topics, operation_timeout=30).values():
        with contextlib.suppress(KafkaException):  # already gone, or never created
            fut.result(timeout=60)


def publish(bootstrap: str, topic: str, messages: Iterable[Message], *,
            on_sent: Callable[[int], None] | None = None) -> tuple[int, int, float]:
    """Publish and wait for every acknowledgement. Returns (messages, bytes, seconds)."""
    errors: list[str] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    producer = Producer({
        "bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True,
        "linger.ms": 20, "batch.size": 4 * 1024 * 1024,
        "queue.buffering.max.messages": 500_000,
        "queue.buffering.max.kbytes": 256 * 1024,
        "message.max.bytes": 33_554_432,
    })
    count = nbytes = 0
    started = time.perf_counter()
    for key, value, partition in messages:
        while True:
            try:
                producer.produce(topic, value, key, partition=partition, on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
        count += 1
        nbytes += len(value)
        if on_sent is not None:
            on_sent(count)
    left = producer.flush(300)
    seconds = time.perf_counter() - started
    if left or errors:
        raise RuntimeError(f"publishing to {topic}: {left} unacknowledged, errors: "
                           f"{errors[:3]}")
    return count, nbytes, seconds


def _probe(bootstrap: str, group: str = "bench-probe") -> Consumer:
    return Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                     "enable.auto.commit": False})


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    c = _probe(bootstrap)
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in sorted(parts)}
    finally:
        c.close()


def committed_offsets(consumer: Consumer, topic: str, partitions: Iterable[int]
                      ) -> dict[int, int]:
    tps = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
    return {tp.partition: tp.offset for tp in tps}


def wait_committed(bootstrap: str, group: str, topic: str, ends: dict[int, int], *,
                   timeout: float, alive: Callable[[], None] = lambda: None,
                   interval: float = 0.05) -> float:
    """Block until ``group`` has committed ``ends``; return the wall time it saw that.

    ``alive`` is called between polls (to fail fast when a daemon died)."""
    c = _probe(bootstrap, group)
    deadline = time.monotonic() + timeout
    try:
        while True:
            got = committed_offsets(c, topic, ends)
            if all(got.get(p, -1) >= end for p, end in ends.items()):
                return time.time()
            alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"group {group} committed {got}, expected {ends}")
            time.sleep(interval)
    finally:
        c.close()


# -- the daemon ---------------------------------------------------------------------------
def metadata_uri(backend: str, mongo: str, workdir: Path) -> str:
    return mongo if backend == "mongo" else f"sqlite:///{workdir / 'meta.db'}"


DAEMON_ARGV = [sys.executable, "-m", "bluestream", "serve"]


class DaemonProcess:
    """``python -m bluestream serve`` configured through ``BLUESTREAM_*`` variables,
    JSON logs to a file that is parsed for lifecycle events and their timestamps."""

    def __init__(self, *, kafka: str, topics: list[str], group: str, metadata: str,
                 zarr_root: Path | str, log: Path, extra_env: dict[str, str] | None = None,
                 argv: list[str] | None = None) -> None:
        self.log = log
        env = {**os.environ, "BLUESTREAM_KAFKA_BOOTSTRAP": kafka,
               "BLUESTREAM_TOPICS": ",".join(topics), "BLUESTREAM_GROUP_ID": group,
               "BLUESTREAM_METADATA": metadata, "BLUESTREAM_ZARR_ROOT": str(zarr_root),
               "BLUESTREAM_HTTP_PORT": "0", "BLUESTREAM_LOG_FORMAT": "json",
               }
        env.pop("BLUESTREAM_CONFIG", None)
        env.update(extra_env or {})  # e.g. BLUESTREAM_CONFIG=<toml> for limits
        with log.open("ab") as out:
            self.proc = subprocess.Popen(argv or DAEMON_ARGV, env=env, stdout=out,
                                         stderr=subprocess.STDOUT)
        self.spawned = time.time()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n"
                               + self.log.read_text(errors="replace")[-3000:])

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        return [r for r in _log_records(self.log) if name is None or r.get("event") == name]

    def assigned(self) -> list[str]:
        """Partitions of the latest assignment (empty after a revocation of all)."""
        current: set[str] = set()
        for rec in self.events():
            if rec.get("event") == "partitions assigned":
                current = set(rec.get("partitions", []))
            elif rec.get("event") == "partitions revoked":
                current -= set(rec.get("partitions", []))
        return sorted(current)

    def wait_event(self, name: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(name)
            if found:
                return found[0]
            self.check_alive()
            time.sleep(0.05)
        raise TimeoutError(f"daemon did not log {name!r} within {timeout} s:\n"
                           + self.log.read_text(errors="replace")[-3000:])

    def first_time(self, name: str) -> float:
        """Wall-clock time of the first log record ``name`` (structlog's ISO UTC stamp)."""
        return stamp(self.wait_event(name))

    def status_kb(self, field: str) -> int:
        """A ``VmHWM`` / ``VmRSS`` line of /proc/<pid>/status, in kB (0 once exited)."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


class RssSampler:
    """The daemons' resident memory while they work: the sum of their ``VmRSS`` every
    ``interval`` s, sampled by a background thread, and each one's ``VmHWM`` (its peak,
    which no sampling can miss) read by :meth:`stop` - call it before the daemons exit
    (``/proc`` reads 0 afterwards)."""

    def __init__(self, procs: Sequence[DaemonProcess], interval: float = 0.05) -> None:
        self.procs = list(procs)
        self.interval = interval
        self.started = time.time()
        self.samples: list[tuple[float, float]] = []  # (wall time, MB summed)
        self.peak_mb: list[float] = []  # VmHWM per daemon, once stopped
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)

    def start(self) -> RssSampler:
        self.started = time.time()
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._halt.is_set():
            kb = sum(p.status_kb("VmRSS") for p in self.procs)
            self.samples.append((time.time(), kb / 1024))
            self._halt.wait(self.interval)

    def stop(self) -> list[float]:
        """Read every daemon's VmHWM (once) and stop sampling; returns the peaks in MB."""
        if not self.peak_mb:
            self.peak_mb = [p.status_kb("VmHWM") / 1024 for p in self.procs]
        self._halt.set()
        if self._thread.is_alive():
            self._thread.join()
        return self.peak_mb

    def report(self, t0: float | None = None) -> dict[str, Any]:
        """:func:`rss_report` of this sampler, times relative to ``t0`` (default: the
        start of sampling)."""
        start = self.started if t0 is None else t0
        return rss_report(self.peak_mb, [(t - start, m) for t, m in self.samples])


def rss_report(peak_mb: Sequence[float], samples: Sequence[tuple[float, float]],
               max_points: int = 300) -> dict[str, Any]:
    """The JSON every daemon scenario reports: ``peak`` (MB, the largest VmHWM),
    ``peak_per_daemon`` and ``samples`` ([s, MB summed], at most ``max_points``)."""
    step = max(1, -(-len(samples) // max_points))
    return {"peak": max(peak_mb, default=0.0), "peak_per_daemon": list(peak_mb),
            "samples": [[round(t, 2), round(m, 1)] for t, m in samples[::step]]}


def stamp(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(record["timestamp"])).timestamp()


# -- storage checks -----------------------------------------------------------------------
async def _stored_events(uri: str, tenant: str) -> tuple[int, int, int]:
    store = open_metadata_store(uri, tenant)
    await store.open()
    try:
        starts = await store.search(None)
        events = stops = 0
        for start in starts:
            events += sum(int(s["length"]) for s in await store.streams(start["uid"]))
            stops += await store.get("stop", start["uid"]) is not None
        return len(starts), events, stops
    finally:
        await store.close()


def stored_events(uri: str, tenant: str) -> tuple[int, int, int]:
    """(runs, events, stops) stored for ``tenant``, through the metadata-store API."""
    return anyio.run(_stored_events, uri, tenant)


# -- one timed ingest ---------------------------------------------------------------------
class IngestTiming:
    """What :func:`timed_ingest` measured."""

    def __init__(self) -> None:
        self.seconds = 0.0  # from the start of consumption (or publishing) to committed
        self.startup_s = 0.0  # process spawn -> first partition assignment
        self.publish_s = 0.0  # only when publishing happened during the measurement
        self.peak_rss_mb: list[float] = []  # VmHWM per daemon
        self.rss_samples: list[tuple[float, float]] = []  # (s since t0, MB summed)
        self.exit_codes: list[int] = []

    @property
    def peak_rss(self) -> float:
        """MB: the largest daemon's VmHWM."""
        return max(self.peak_rss_mb, default=0.0)

    def rss_json(self) -> dict[str, Any]:
        return rss_report(self.peak_rss_mb, self.rss_samples)

    def as_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "startup_s": self.startup_s,
                "publish_s": self.publish_s, "peak_rss_mb": self.peak_rss_mb,
                "exit_codes": self.exit_codes}


def timed_ingest(*, kafka: str, topic: str, group: str, metadata: str, zarr_root: Path | str,
                 log_dir: Path, daemons: int = 1, timeout: float = 600.0,
                 publish_after_assignment: Callable[[], float] | None = None,
                 argv: list[str] | None = None, extra_env: dict[str, str] | None = None
                 ) -> IngestTiming:
    """Run ``daemons`` daemon processes in one group until ``topic`` is committed.

    Data already in the topic: timing starts at the first partition assignment (the
    daemon's own log stamp), so interpreter start-up and group join are not counted.
    With ``publish_after_assignment``: the daemons first settle (every partition
    assigned, group stable), then the callable publishes (returning when it started),
    and timing starts there - a flood arriving at a running service.
    """
    timing = IngestTiming()
    procs = [DaemonProcess(kafka=kafka, topics=[topic], group=group, metadata=metadata,
                           zarr_root=zarr_root, log=log_dir / f"daemon{i}.log", argv=argv,
                           extra_env=extra_env)
             for i in range(daemons)]
    rss = RssSampler(procs).start()

    def alive() -> None:
        for p in procs:
            p.check_alive()

    try:
        assigned_at = [p.first_time("partitions assigned") for p in procs]
        timing.startup_s = min(assigned_at) - min(p.spawned for p in procs)
        if publish_after_assignment is not None:
            nparts = len(end_offsets(kafka, topic))
            deadline = time.monotonic() + 60
            while True:
                held = [p.assigned() for p in procs]
                if all(held) and sum(len(h) for h in held) == nparts:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"group did not settle: {held}")
                alive()
                time.sleep(0.1)
            time.sleep(1.0)  # let the last rebalance finish on every member
            t0 = publish_after_assignment()
            timing.publish_s = time.time() - t0
        else:
            t0 = min(assigned_at)
        ends = end_offsets(kafka, topic)
        t1 = wait_committed(kafka, group, topic, ends, timeout=timeout, alive=alive)
        timing.seconds = t1 - t0
        timing.peak_rss_mb = rss.stop()
        timing.rss_samples = [(t - t0, m) for t, m in rss.samples]
    finally:
        rss.stop()
        timing.exit_codes = [p.stop() for p in procs]
    return timing


def checked_ingest(*, kafka: str, topic: str, group: str, backend: str, mongo: str,
                   tenant: str, work: Path, expected: tuple[int, int, int],
                   attempts: int = 2, zarr_root: Callable[[int], str] | None = None,
                   **kwargs: Any) -> tuple[IngestTiming, str, list[str]]:
    """:func:`timed_ingest` into fresh storage, then check what was stored against
    ``expected`` (runs, events, stops). On a mismatch the failure is recorded and the
    ingest repeated into fresh storage with a fresh group (so the run still reports a
    number), and the caller turns the record into a failed check
    (:func:`benchmarks.checks.no_data_loss`): a daemon that lost data once fails the
    scenario. ``zarr_root``: the root of each attempt (an ``s3://`` URL, say) instead of
    ``work/zarr``. Returns (timing, metadata URI, failures)."""
    failures: list[str] = []
    for attempt in range(attempts):
        for child in work.iterdir() if work.exists() else ():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
        work.mkdir(parents=True, exist_ok=True)
        if backend == "mongo":
            drop_databases(mongo, [tenant])
        uri = metadata_uri(backend, mongo, work)
        root = zarr_root(attempt) if zarr_root is not None else work / "zarr"
        timing = timed_ingest(kafka=kafka, topic=topic, group=f"{group}-{attempt}",
                              metadata=uri, zarr_root=root, log_dir=work, **kwargs)
        got = stored_events(uri, tenant)
        if got == expected:
            return timing, uri, failures
        stopped = [r for p in work.glob("daemon*.log")
                   for r in _log_records(p) if r.get("event") == "stopped"]
        lost = [r.get("counters", {}).get("dead_lettered") for r in stopped]
        failures.append(f"attempt {attempt + 1}: stored (runs, events, stops) = {got}, "
                        f"expected {expected}; dead letters: {lost}")
        print(f"  !! DATA LOSS: {failures[-1]}")
    raise RuntimeError("; ".join(failures))


def _log_records(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def drop_databases(mongo: str, names: Iterable[str]) -> list[str]:
    """Drop databases; returns those the server refused to drop. (mongo-java-server's
    H2 backend sometimes fails dropDatabase; dropping the collections first helps.)"""
    from pymongo import MongoClient
    from pymongo.errors import PyMongoError

    failed = []
    client: MongoClient[dict[str, Any]] = MongoClient(mongo)
    try:
        for name in names:
            try:
                db = client[name]
                for coll in db.list_collection_names():
                    db.drop_collection(coll)
                client.drop_database(name)
            except PyMongoError:
                if name in client.list_database_names():
                    failed.append(name)
    finally:
        client.close()
    return failed
