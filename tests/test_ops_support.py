"""Support for the operations tests (no tests here): the daemon as a real subprocess,
its HTTP endpoints and JSON log, a receiver for its sd_notify datagrams, a producer that
keeps publishing through outages, private Kafka and MongoDB instances started by
``scripts/services``, and the exactly-once verifier.

Tests wait on what the daemon shows (a log event, a datagram, a counter in ``/status``),
each with a generous timeout, never on a fixed sleep: a loaded machine makes them slower,
not red."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import numpy as np
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from pymongo import MongoClient

from bluestream.consumers.decode import encode_message
from bluestream.storage.zarr_root import ZarrRoot
from helpers import read_stream_arrays, scalar_run

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
Run = list[tuple[str, dict[str, Any]]]
T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str, *,
               daemon: DaemonProcess | None = None, interval: float = 0.1) -> T:
    """Poll ``predicate`` until it returns something true and return that; fail after
    ``timeout`` seconds (or at once if ``daemon`` exited), saying what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if daemon is not None:
            assert daemon.alive(), f"the daemon exited while waiting for {what}: {daemon.tail()}"
        if time.monotonic() > deadline:
            tail = f": {daemon.tail()}" if daemon is not None else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{tail}")
        time.sleep(interval)


# -- configuration files -------------------------------------------------------------

def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table: [storage] s3 = {endpoint = "..."}
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def write_config(path: Path, config: Mapping[str, Any]) -> Path:
    """A TOML file from ``{key: value, section: {key: value}}``."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in config.items() if not isinstance(v, dict)]
    for section, values in config.items():
        if isinstance(values, dict):
            lines.append(f"\n[{section}]")
            lines += [f"{json.dumps(k) if '.' in k else k} = {_toml_value(v)}"
                      for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def daemon_config(path: Path, *, bootstrap: str, topic: str, group: str, metadata: str,
                  zarr_root: Path | str, **sections: dict[str, Any]) -> Path:
    """A daemon configuration at ``path`` (HTTP on a free port, its URL written to
    ``path.with_suffix('.url')``); ``sections`` override or add keys per section, the
    ``top`` section holds top-level keys."""
    config: dict[str, Any] = {
        "health_check_interval_s": 1.0,
        "retry_backoff_max_s": 4.0,
        "kafka": {"bootstrap": bootstrap, "topics": [topic], "group_id": group,
                  "session_timeout_ms": 10_000, "commit_timeout_s": 5.0},
        "storage": {"metadata": metadata, "zarr_root": str(zarr_root),
                    "mongo_server_selection_timeout_ms": 2000},
        "http": {"port": 0, "url_file": str(path.with_suffix(".url"))},
        "log": {"format": "json", "level": "info", "summary_interval_s": 10.0},
    }
    config.update(sections.pop("top", {}))
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return write_config(path, config)


def daemon_env(**extra: str) -> dict[str, str]:
    """The test's environment without BLUESTREAM_* settings (the config file rules)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLUESTREAM_")}
    env.update(extra)
    return env


# -- the daemon as a subprocess ----------------------------------------------------------

@dataclass
class DaemonProcess:
    """``bluestream serve -c config`` in a subprocess, with its log and HTTP address."""

    config: Path
    log: Path
    env: dict[str, str] = field(default_factory=daemon_env)
    proc: subprocess.Popen[bytes] | None = None
    #: What to run instead of ``python -m bluestream serve -c config``.
    command: list[str] | None = None

    def start(self) -> DaemonProcess:
        url_file = self.url_file
        if url_file.exists():
            url_file.unlink()
        argv = self.command or [sys.executable, "-m", "bluestream", "serve", "-c",
                                str(self.config)]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(argv, env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, cwd=str(self.config.parent))
        return self

    @property
    def url_file(self) -> Path:
        return self.config.with_suffix(".url")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        """Every complete JSON line of the log, in order (a line still being written and
        anything that is not a JSON object are left out)."""
        if not self.log.exists():
            return []
        text = self.log.read_text(errors="replace")
        out = []
        for line in text[:text.rfind("\n") + 1].splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                out.append(event)
        return out

    def wait_log(self, predicate: Callable[[dict[str, Any]], bool], what: str, *,
                 after: int = 0, count: int = 1, timeout: float = 60) -> list[int]:
        """Indices (into :meth:`log_events`) of the first ``count`` events at or past
        index ``after`` for which ``predicate`` holds, once there are that many."""
        def found() -> list[int]:
            hits = [i for i, e in enumerate(self.log_events()) if i >= after and predicate(e)]
            return hits[:count] if len(hits) >= count else []
        return wait_until(found, timeout, what, daemon=self)

    def pid_state(self) -> str:
        """The process state letter from /proc (R, S, T when stopped, ...)."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        return stat[stat.rfind(")") + 2]

    def url(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while not self.url_file.exists() or not self.url_file.read_text().strip():
            assert self.alive(), f"daemon exited: {self.tail()}"
            assert time.monotonic() < deadline, f"no HTTP address written: {self.tail()}"
            time.sleep(0.1)
        return self.url_file.read_text().strip()

    def get(self, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        """(status, body); status 0 when nothing answers in time."""
        try:
            with urllib.request.urlopen(self.url() + path, timeout=timeout) as resp:
                return int(resp.status), bytes(resp.read())
        except urllib.error.HTTPError as exc:
            return int(exc.code), bytes(exc.read())
        except (urllib.error.URLError, OSError):
            return 0, b""

    def ready(self, timeout: float = 2.0) -> bool | None:
        """True/False from /readyz; None when the daemon does not answer."""
        status, _ = self.get("/readyz", timeout)
        return None if status == 0 else status == 200

    def status(self) -> dict[str, Any]:
        code, body = self.get("/status", timeout=10)
        assert code == 200, (code, body)
        data: dict[str, Any] = json.loads(body)
        return data

    def wait_ready(self, timeout: float = 90) -> float:
        """Seconds until /readyz said 200."""
        t0 = time.monotonic()
        while self.ready() is not True:
            assert self.alive(), f"daemon exited: {self.tail()}"
            assert time.monotonic() - t0 < timeout, f"not ready in {timeout} s: {self.tail()}"
            time.sleep(0.25)
        return time.monotonic() - t0

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM and wait; the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def readyz(daemon: DaemonProcess) -> tuple[int, list[str]]:
    """(HTTP status, reasons) from /readyz; (0, []) when nothing answers."""
    code, body = daemon.get("/readyz")
    return (code, list(json.loads(body)["reasons"])) if code else (0, [])


def poll_readiness(daemon: DaemonProcess, seconds: float,
                   interval: float = 0.5) -> list[bool | None]:
    """/readyz answers over ``seconds`` (None: no answer). For holding a fault for a
    scenario's length while watching the daemon, not for synchronisation."""
    seen: list[bool | None] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen.append(daemon.ready(timeout=1.0))
        time.sleep(interval)
    return seen


# -- the systemd notify socket ---------------------------------------------------------

class Receiver:
    """Collects the datagrams sent to a bound AF_UNIX socket, as ``{key: value}``, in
    the order they arrived: for datagrams sent one after the other by one process that
    is the order they were sent in, so tests compare positions, not times."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append(dict(line.split("=", 1)
                                      for line in data.decode().splitlines() if line))

    def mark(self) -> int:
        """The position the next datagram will have."""
        return len(self.messages)

    def find(self, key: str, value: str | None = None, *, since: int = 0,
             until: int | None = None) -> list[int]:
        """Positions in [since, until) of datagrams with ``key`` (set to ``value``)."""
        msgs = self.messages[:until] if until is not None else list(self.messages)
        return [i for i in range(since, len(msgs))
                if key in msgs[i] and (value is None or msgs[i][key] == value)]

    def wait_for(self, key: str, value: str | None = None, *, since: int = 0,
                 count: int = 1, timeout: float = 60.0) -> int:
        """The position of the ``count``-th datagram at or past ``since`` with ``key``
        (set to ``value``), once it arrived."""
        try:
            found = wait_until(lambda: self.find(key, value, since=since)[count - 1:],
                               timeout, f"{count} x {key}={value} since #{since}",
                               interval=0.02)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; received (the last 30 of {len(self.messages)}): "
                                 f"{self.messages[-30:]}") from None
        return found[0]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@contextmanager
def notify_receiver() -> Iterator[tuple[str, Receiver]]:
    """A receiver on a fresh abstract-namespace socket: ($NOTIFY_SOCKET value, receiver)."""
    name = f"bluestream-test-{uuid.uuid4().hex}"
    receiver = Receiver(b"\0" + name.encode())
    try:
        yield "@" + name, receiver
    finally:
        receiver.close()


# -- a hung event loop, on demand ------------------------------------------------------

#: A record carrying this header makes :func:`serve_with_blocking_ingestor` block the
#: daemon's event loop for the header's value (seconds, as ASCII).
BLOCK_HEADER = "x-test-block-loop-s"


def blocking_serve_command(config: Path) -> list[str]:
    """The command line running :func:`serve_with_blocking_ingestor` for ``config``."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_ops_support as t; "
            "sys.exit(t.serve_with_blocking_ingestor(sys.argv[2]))")
    return [sys.executable, "-c", code, str(TESTS), str(config)]


def serve_with_blocking_ingestor(config: str) -> int:
    """``bluestream serve -c config``, but with the real ingestor wrapped: a batch holding
    a record with :data:`BLOCK_HEADER` first blocks the event loop (``time.sleep`` inside
    the async ``prepare``, as a synchronous call gone wrong would) for that many
    seconds. ``BLOCKED=1`` and then ``UNBLOCKED=1`` with ``BLOCKED_S`` (measured) go to
    ``$NOTIFY_SOCKET`` around the block, so the receiver sees where it lies among the
    daemon's own datagrams. A fault no real component produces on demand."""
    from bluestream.daemon import service
    from bluestream.daemon.logs import configure_logging
    from bluestream.daemon.notify import Notifier
    from bluestream.settings import load_settings

    def block(seconds: float) -> None:
        notifier = Notifier()
        notifier.send(BLOCKED=1)
        t0 = time.monotonic()
        time.sleep(seconds)
        notifier.send(UNBLOCKED=1, BLOCKED_S=f"{time.monotonic() - t0:.3f}")
        notifier.close()

    class BlockingIngestor(service.Ingestor):
        async def prepare(self, envelopes: Any) -> Any:
            batch = list(envelopes)
            for env in batch:
                for key, value in env.headers:
                    if key == BLOCK_HEADER:
                        block(float(value))  # in the event loop, on purpose
            return await super().prepare(batch)

    service.Ingestor = BlockingIngestor  # type: ignore[misc]
    settings = load_settings(config)
    configure_logging(settings.log.format, settings.log.level)
    return service.run_daemon(settings, Path(config))


async def _publish(bootstrap: str, topic: str,
                   messages: list[tuple[bytes, bytes | None, list[tuple[str, bytes]]]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for value, key, headers in messages:
            await producer.send_and_wait(topic, value, key=key, headers=headers or None)
    finally:
        await producer.stop()


def publish(bootstrap: str, topic: str, docs: Run, *,
            headers: Mapping[int, list[tuple[str, bytes]]] | None = None) -> None:
    """Publish ``docs`` in order (key: the first document's uid), waiting for every
    acknowledgement; ``headers`` maps a document's index to its record headers."""
    key = str(docs[0][1]["uid"]).encode() if docs else None
    anyio.run(_publish, bootstrap, topic,
              [(encode_message(n, d), key, (headers or {}).get(i, []))
               for i, (n, d) in enumerate(docs)])



# -- a producer that keeps publishing --------------------------------------------------

class ContinuousProducer:
    """Publishes numbered runs in a thread at about ``rate`` messages/s, several runs
    interleaved, each run keyed by its start uid, until stopped; survives broker outages
    by re-sending what was not acknowledged (duplicates in Kafka are harmless: storage
    is positional and idempotent, which is what the tests verify)."""

    def __init__(self, bootstrap: str, topic: str, *, events_per_run: int = 1500,
                 concurrent_runs: int = 3, rate: float = 600.0, chunk: int = 50) -> None:
        self.bootstrap, self.topic = bootstrap, topic
        self.events_per_run, self.concurrent_runs = events_per_run, concurrent_runs
        self.rate, self.chunk = rate, chunk
        self.runs: list[Run] = []  # every run begun (all complete once stopped)
        self.sent = 0
        self.errors = 0
        self._stop = threading.Event()
        self._abort = threading.Event()
        self._thread = threading.Thread(target=lambda: anyio.run(self._main), daemon=True)
        self._failure: BaseException | None = None

    def start(self) -> ContinuousProducer:
        self._thread.start()
        return self

    def abort(self) -> None:
        """Give up at once (a failed test): runs in progress stay incomplete."""
        self._abort.set()
        self._stop.set()
        self._thread.join(30)

    def stop(self, timeout: float = 180) -> list[Run]:
        """Finish the runs in progress (publishing their rest at once) and return all."""
        self._stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "producer did not finish"
        if self._failure is not None:
            raise self._failure
        return self.runs

    async def _main(self) -> None:
        try:
            await self._produce()
        except BaseException as exc:  # surfaced by stop()
            self._failure = exc

    async def _produce(self) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all",
                                    request_timeout_ms=5000, linger_ms=5,
                                    enable_idempotence=False)
        while True:
            try:
                await producer.start()
                break
            except KafkaError:
                await anyio.sleep(1)
        try:
            active: list[tuple[Run, int]] = []  # (run, next index)
            scan = 0
            while True:
                while len(active) < self.concurrent_runs and not self._stop.is_set():
                    scan += 1
                    run = scalar_run(self.events_per_run, fields=2, scan_id=scan)
                    self.runs.append(run)
                    active.append((run, 0))
                if not active or self._abort.is_set():
                    return
                msgs: list[tuple[bytes, bytes]] = []
                nxt = []
                for run, i in active:
                    step = self.chunk if not self._stop.is_set() else len(run)
                    key = run[0][1]["uid"].encode()
                    msgs += [(encode_message(n, d), key) for n, d in run[i:i + step]]
                    if i + step < len(run):
                        nxt.append((run, i + step))
                active = nxt
                await self._send_all(producer, msgs)
                if not self._stop.is_set():
                    await anyio.sleep(len(msgs) / self.rate)
        finally:
            await producer.stop()

    async def _send_all(self, producer: AIOKafkaProducer, msgs: list[tuple[bytes, bytes]]) -> None:
        while True:
            futures: list[asyncio.Future[Any]] = []
            try:
                for v, k in msgs:
                    futures.append(await producer.send(self.topic, v, key=k))
                results = await asyncio.gather(*futures, return_exceptions=True)
                failed = [r for r in results if isinstance(r, BaseException)]
                if not failed:
                    self.sent += len(msgs)
                    return
            except KafkaError:
                await asyncio.gather(*futures, return_exceptions=True)  # retrieve them
            self.errors += 1
            if self._abort.is_set():
                return
            await anyio.sleep(1)


# -- private services ------------------------------------------------------------------

def free_port_pair() -> int:
    """A port p with p and p + 1 free (Kafka's controller listens on p + 1)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port < 65000 and _free(port + 1):
            return port
    raise RuntimeError("no free port pair")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class PrivateServices:
    """A Kafka broker, a MongoDB-wire server and an S3 server of our own
    (``scripts/services`` with ``BLUESTREAM_SERVICES_HOME``), so outage tests can stop
    them without disturbing the shared ones other tests and people use."""

    home: Path
    kafka_port: int
    mongo_port: int
    s3_port: int

    @property
    def kafka_bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def mongo_uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.mongo_port}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def _run(self, *args: str, timeout: float = 240) -> str:
        env = daemon_env(BLUESTREAM_SERVICES_HOME=str(self.home),
                         BLUESTREAM_SERVICES_KAFKA_PORT=str(self.kafka_port),
                         BLUESTREAM_SERVICES_MONGO_PORT=str(self.mongo_port),
                         BLUESTREAM_SERVICES_S3_PORT=str(self.s3_port),
                         BLUESTREAM_SERVICES_KAFKA_HEAP="512m",
                         BLUESTREAM_SERVICES_MONGO_HEAP="512m")
        done = subprocess.run([str(ROOT / "scripts" / "services"), *args], env=env,
                              capture_output=True, text=True, timeout=timeout, check=False)
        assert done.returncode == 0, f"services {args}: {done.stdout}{done.stderr}"
        return done.stdout

    def up(self) -> str:
        return self._run("up")

    def down(self, *which: str) -> str:
        return self._run("down", *which)

    def wipe(self) -> str:
        return self._run("down", "--wipe")


# -- verification ----------------------------------------------------------------------

def stored_runs(mongo_uri: str, tenant: str) -> tuple[int, int]:
    """(run_start count, run_stop count)."""
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_uri)
    try:
        db = client[tenant]
        return db.run_start.count_documents({}), db.run_stop.count_documents({})
    finally:
        client.close()


def verify_exactly_once(mongo_uri: str, tenant: str, zarr_root: Path | ZarrRoot,
                        runs: list[Run]) -> int:
    """Every event of every run stored once at its position with its values; no extra
    runs, descriptors, stops or rows. Returns the number of events checked."""
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_uri)
    checked = 0
    try:
        db = client[tenant]
        assert db.run_start.count_documents({}) == len(runs)
        assert db.run_stop.count_documents({}) == len(runs)
        assert db.event_descriptor.count_documents({}) == len(runs)
        streams = {s["run_start"]: s for s in db.event_stream.find({}, {"_id": 0})}
        assert len(streams) == len(runs)
        for run in runs:
            uid = run[0][1]["uid"]
            events = [d for n, d in run if n == "event"]
            stream = streams[uid]
            assert stream["length"] == len(events), (uid, stream["length"], len(events))
            raw = read_stream_arrays(zarr_root, tenant, uid, stream["descriptor_uid"],
                                     mongo_uri)
            # Arrays grow by whole chunks: rows past the logical length (the stream
            # record's) hold seq_num 0, which readers skip; no event may be stored there.
            n = len(events)
            assert not raw["seq_num"][n:].any(), (uid, "rows past the length hold events")
            arrays = {k: v[:n] for k, v in raw.items()}
            np.testing.assert_array_equal(arrays["seq_num"], np.arange(1, n + 1))
            np.testing.assert_array_equal(arrays["data/counter"],
                                          [e["data"]["counter"] for e in events])
            np.testing.assert_array_equal(arrays["data/f1"], [e["data"]["f1"] for e in events])
            assert arrays["uid"].tolist() == [e["uid"] for e in events]
            checked += len(events)
    finally:
        client.close()
    return checked


def wait_all_stored(daemons: list[DaemonProcess], mongo_uri: str, tenant: str, n_runs: int,
                    timeout: float = 120) -> None:
    """Until every run's stop is stored and the daemons report no lag."""
    deadline = time.monotonic() + timeout
    while True:
        for d in daemons:
            assert d.alive(), f"daemon exited: {d.tail()}"
        if stored_runs(mongo_uri, tenant)[1] >= n_runs:
            lags = [sum(d.status()["lag"].values()) for d in daemons]
            if not any(lags):
                return
        assert time.monotonic() < deadline, \
            f"not all stored in {timeout} s: {stored_runs(mongo_uri, tenant)} of {n_runs}"
        time.sleep(0.5)
