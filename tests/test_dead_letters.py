"""Bad input through the real broker: each kind ends in ``<topic>.dlq`` with the right
reason and headers, and the daemon goes on storing good runs afterwards."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import anyio
import msgpack
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bluestream.consumers.decode import encode_message
from bluestream.daemon.service import Daemon
from bluestream.storage.backends import open_metadata_store
from helpers import scalar_run
from test_ingest_kafka import settings_for, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.anyio]


def _descriptor(run_uid: str, data_keys: dict[str, Any]) -> dict[str, Any]:
    return {"uid": str(uuid.uuid4()), "run_start": run_uid, "time": 1.0, "name": "primary",
            "data_keys": data_keys, "configuration": {}, "object_keys": {}, "hints": {}}


def bad_messages(run_uid: str) -> list[tuple[bytes, str]]:
    """(value, expected reason) for every kind of bad input the daemon must survive."""
    img_desc = _descriptor(run_uid, {"img": {"dtype": "array", "shape": [4, 4],
                                             "source": "s", "dtype_numpy": "<u2"}})
    import numpy as np

    wrong_shape = {"uid": str(uuid.uuid4()), "time": 2.0, "seq_num": 1,
                   "descriptor": img_desc["uid"], "data": {"img": np.zeros((3, 3), "<u2")},
                   "timestamps": {"img": 2.0}, "filled": {}}
    huge = _descriptor(run_uid, {"x": {"dtype": "array", "shape": [10**6, 10**6],
                                       "source": "s"}})
    # event-model's schema already refuses "." and "/" in data keys; a backslash passes
    # the schema and must be refused by our own path-safety check.
    traversal = _descriptor(run_uid, {"evil\\name": {"dtype": "number", "shape": [],
                                                     "source": "s"}})
    dotted = _descriptor(run_uid, {"../../etc/passwd": {"dtype": "number", "shape": [],
                                                        "source": "s"}})
    orphan = {"uid": str(uuid.uuid4()), "time": 2.0, "seq_num": 1,
              "descriptor": str(uuid.uuid4()), "data": {"x": 1.0}, "timestamps": {"x": 1.0}}
    good = encode_message("event", orphan)
    return [
        (os.urandom(200), "undecodable"),
        (good[: len(good) // 2], "undecodable"),
        (msgpack.packb(("not_a_document", {"uid": "x"})), "unknown-document"),
        (encode_message("start", {"uid": str(uuid.uuid4())}), "schema-violation"),
        (encode_message("event_page", {"uid": 1}), "schema-violation"),
        (encode_message("descriptor", img_desc), ""),  # good: needed for the next one
        (encode_message("event", wrong_shape), "shape-mismatch"),
        (encode_message("descriptor", huge), "limit-exceeded"),
        (encode_message("descriptor", traversal), "bad-key"),
        (encode_message("descriptor", dotted), "schema-violation"),
        (b"\x92" + b"\xc4" * 20 * 1024 * 1024, "too-large"),  # a 20 MB message
        (encode_message("event", orphan), "unknown-descriptor"),
    ]


async def test_bad_input_is_dead_lettered_and_service_survives(
        kafka_bootstrap: str, kafka_topic: str, tenant: str, tmp_path: Path,
        zarr_root: Path) -> None:
    topic = kafka_topic
    metadata = f"sqlite:///{tmp_path}/meta.db"
    settings = settings_for(kafka_bootstrap, topic, metadata, zarr_root,
                            max_message_bytes=8 * 1024 * 1024, park_max_age_s=3.0)
    run = scalar_run(3, scan_id=7)
    run_uid = run[0][1]["uid"]
    bad = bad_messages(run_uid)
    daemon = Daemon(settings, handle_signals=False)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap,
                                max_request_size=25 * 1024 * 1024)
    await producer.start()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon.run)
            await producer.send_and_wait(topic, encode_message(*run[0]), key=b"k")
            for value, _ in bad:
                await producer.send_and_wait(topic, value, key=b"k")
            for name, doc in run[1:]:
                await producer.send_and_wait(topic, encode_message(name, doc), key=b"k")
            letters = await read_dlq(kafka_bootstrap, topic + ".dlq",
                                     sum(1 for _, r in bad if r))
            store = open_metadata_store(metadata, tenant)
            await store.open()

            async def stored() -> bool:
                return await store.get("stop", run_uid) is not None
            await wait_for(stored, 30, "the good run after the bad input")
            await store.close()
            daemon.stop.set()
    finally:
        await producer.stop()
    expected = sorted(r for _, r in bad if r)
    assert sorted(h["reason"] for h in letters) == expected
    for value, reason in bad:
        if reason:
            h = next(x for x in letters if x["value"] == value)
            assert h["reason"] == reason
            assert h["source-topic"] == topic
            assert h["source-partition"] == "0"
            assert int(h["source-offset"]) >= 0
            assert h["error"]
    assert daemon.counters.total("dead_lettered") == len(expected)


async def read_dlq(bootstrap: str, dlq_topic: str, n: int,
                   within: float = 60.0) -> list[dict[str, Any]]:
    consumer = AIOKafkaConsumer(dlq_topic, bootstrap_servers=bootstrap,
                                auto_offset_reset="earliest", group_id=None,
                                fetch_max_bytes=64 * 1024 * 1024,
                                max_partition_fetch_bytes=64 * 1024 * 1024)
    await consumer.start()
    out: list[dict[str, Any]] = []
    try:
        with anyio.move_on_after(within):
            while len(out) < n:
                batch = await consumer.getmany(timeout_ms=500)
                for recs in batch.values():
                    for r in recs:
                        h = {k: v.decode() for k, v in r.headers}
                        h["value"] = r.value
                        out.append(h)
    finally:
        await consumer.stop()
    assert len(out) >= n, f"only {len(out)} of {n} dead letters arrived: {out}"
    return out
