"""The daemon's HTTP endpoints against the real broker: /healthz, /readyz (with the
reason when not ready), /status, and /metrics parsed as Prometheus text whose counters
match what was published."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from bluestream.consumers.decode import encode_message
from bluestream.daemon.http import HttpServer, Response
from bluestream.daemon.service import Daemon
from bluestream.storage.backends import open_metadata_store
from helpers import scalar_run
from test_ingest_kafka import settings_for, wait_for

pytestmark = [pytest.mark.anyio]


async def http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read the whole answer: (status, headers, body)."""
    async with await anyio.connect_tcp("127.0.0.1", port) as s:
        await s.send(request)
        data = b""
        with anyio.fail_after(10):
            try:
                while True:
                    data += await s.receive()
            except anyio.EndOfStream:
                pass
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert request.startswith(b"HEAD") or int(headers["Content-Length"]) == len(body)
    return int(lines[0].split()[1]), headers, body


async def get(port: int, path: str) -> tuple[int, bytes]:
    status, _, body = await http(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return status, body


def http_settings(kafka: str, topic: str, metadata: str, zarr_root: Path) -> Any:
    s = settings_for(kafka, topic, metadata, zarr_root)
    return s.model_copy(update={
        "http": s.http.model_copy(update={"enabled": True, "port": 0}),
        "health_check_interval_s": 0.5,
    })


@pytest.mark.kafka
async def test_metrics_match_what_was_sent(kafka_bootstrap: str, kafka_topic: str,
                                           tenant: str, tmp_path: Path,
                                           zarr_root: Path) -> None:
    metadata = f"sqlite:///{tmp_path}/meta.db"
    daemon = Daemon(http_settings(kafka_bootstrap, kafka_topic, metadata, zarr_root),
                    handle_signals=False)
    run = scalar_run(40, scan_id=3)
    values = [encode_message(n, d) for n, d in run]
    bad = [b"\x00not msgpack", encode_message("start", {"uid": "no-time"})]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon.run)
            await wait_for(_ready(daemon), 60, "the daemon to be ready")
            assert daemon.http is not None
            port = daemon.http.port
            status, body = await get(port, "/readyz")
            assert status == 200 and json.loads(body) == {"ready": True, "reasons": []}
            for v in [*values[:2], *bad, *values[2:]]:
                await producer.send_and_wait(kafka_topic, v, key=b"k")
            store = open_metadata_store(metadata, tenant)
            await store.open()

            async def stored() -> bool:
                return await store.get("stop", run[0][1]["uid"]) is not None
            await wait_for(stored, 30, "the run")
            await store.close()
            await wait_for(_lag_zero(daemon), 30, "the commit")
            await wait_for(_dead(daemon, 2), 30, "the dead letters")

            status, body = await get(port, "/metrics")
            assert status == 200
            metrics = _parse(body.decode())
            status, body = await get(port, "/status")
            st = json.loads(body)
            status_h, _ = await get(port, "/healthz")
            daemon.stop.set()
    finally:
        await producer.stop()
    events = len(run) - 3
    assert metrics[("bluestream_documents_total", ("event",))] == events
    for kind in ("start", "descriptor", "stop"):
        assert metrics[("bluestream_documents_total", (kind,))] == 1
    assert metrics[("bluestream_events_total", (tenant,))] == events
    assert metrics[("bluestream_message_bytes_total", (kafka_topic,))] == \
        sum(map(len, values)) + sum(map(len, bad))
    assert metrics[("bluestream_dead_lettered_total", ("undecodable",))] == 1
    assert metrics[("bluestream_dead_lettered_total", ("schema-violation",))] == 1
    assert metrics[("bluestream_consumer_lag", ("0", kafka_topic))] == 0  # partition, topic
    assert metrics[("bluestream_ready", ())] == 1
    assert metrics[("bluestream_assigned_partitions", ())] == 1
    assert metrics[("bluestream_commits_total", ())] >= 1
    for hist in ("bluestream_commit_duration_seconds", "bluestream_batch_write_duration_seconds"):
        assert metrics[(hist + "_count", ())] >= 1
        assert metrics[(hist + "_bucket", ("+Inf",))] == metrics[(hist + "_count", ())]
        assert metrics[(hist + "_sum", ())] > 0
    for check in ("kafka", "metadata", "zarr"):
        assert metrics[("bluestream_check_up", (check,))] == 1
    assert status_h == 200
    assert st["ready"] and st["assigned"] == [f"{kafka_topic}:0"]
    assert st["lag"] == {f"{kafka_topic}:0": 0}
    assert st["counters"]["events"] == {tenant: events}
    assert st["settings"]["kafka"]["topics"] == [kafka_topic]


@pytest.mark.kafka
async def test_readyz_says_why_not(tmp_path: Path, zarr_root: Path) -> None:
    """Nothing listens on port 1: the daemon stays up, /readyz answers 503 with why --
    the failure to reach Kafka at 127.0.0.1:1, not the start-up message ("starting:
    connecting to Kafka at 127.0.0.1:1"), which names the same broker before anything
    failed and would match a looser check.

    Checked against a broken build (a copy of src run with PYTHONPATH=copy/src) in which
    neither ``_start_dead_letters`` nor ``KafkaSource._start_consumer`` records the
    connection error in ``last_error``: /readyz kept answering only the start-up
    message, and the wait for "Kafka at 127.0.0.1:1 unreachable" timed out."""
    daemon = Daemon(http_settings("127.0.0.1:1", "x.bluesky.runengine.documents",
                                  f"sqlite:///{tmp_path}/meta.db", zarr_root),
                    handle_signals=False)
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        await wait_for(_bound(daemon), 30, "the HTTP server")
        assert daemon.http is not None
        port = daemon.http.port
        answers: list[tuple[int, list[str]]] = []

        async def kafka_named() -> bool:
            status, body = await get(port, "/readyz")
            answers.append((status, json.loads(body)["reasons"]))
            return any(r.startswith("Kafka at 127.0.0.1:1 unreachable: ")
                       for r in answers[-1][1])
        try:
            await wait_for(kafka_named, 60, "/readyz to name the unreachable Kafka")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last answer: {answers[-1:]}") from None
        status, reasons = answers[-1]
        assert status == 503
        assert not any(r.startswith("starting") for r in reasons), reasons
        status, _ = await get(port, "/healthz")
        assert status == 200
        done = await anyio.run_process(
            [sys.executable, "-m", "bluestream", "status", "--url",
             f"http://127.0.0.1:{port}"], check=False)
        assert done.returncode == 1, done.stderr  # running, not ready
        shown = done.stdout.decode()
        assert "NOT READY" in shown and "Kafka at 127.0.0.1:1 unreachable" in shown, shown
        daemon.stop.set()


async def test_http_server_refuses_what_it_does_not_serve() -> None:
    async def ok() -> Response:
        return Response(200, b"fine\n")

    server = HttpServer({"/ok": ok}, "127.0.0.1", 0)
    port = await server.bind()
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        assert await get(port, "/ok?x=1") == (200, b"fine\n")
        status, headers, body = await http(port, b"HEAD /ok HTTP/1.1\r\n\r\n")
        assert (status, headers["Content-Length"], body) == (200, "5", b"")
        assert (await get(port, "/nope"))[0] == 404
        assert (await http(port, b"POST /ok HTTP/1.1\r\nContent-Length: 0\r\n\r\n"))[0] == 405
        assert (await http(port, b"garbage\r\n\r\n"))[0] == 400
        assert (await http(port, b"GET /" + b"x" * 10_000 + b" HTTP/1.1\r\n\r\n"))[0] == 431
        tg.cancel_scope.cancel()


def _parse(text: str) -> dict[tuple[str, tuple[str, ...]], float]:
    """{(sample name, label values in label-name order): value}."""
    out: dict[tuple[str, tuple[str, ...]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(v for _, v in sorted(s.labels.items())))] = s.value
    return out


def _ready(daemon: Daemon) -> Any:
    async def check() -> bool:
        return daemon.ready and bool(daemon.source and daemon.source.state.assigned)
    return check


def _bound(daemon: Daemon) -> Any:
    async def check() -> bool:
        return daemon.http is not None and daemon.http.port != 0
    return check


def _lag_zero(daemon: Daemon) -> Any:
    async def check() -> bool:
        st = daemon.source.state if daemon.source else None
        return bool(st and st.assigned and st.committed and not any(st.lag().values())
                    and all(st.highwater.get(tp, 0) <= st.committed.get(tp, 0)
                            for tp in st.assigned))
    return check


def _dead(daemon: Daemon, n: int) -> Any:
    async def check() -> bool:
        return daemon.counters.total("dead_lettered") >= n
    return check
