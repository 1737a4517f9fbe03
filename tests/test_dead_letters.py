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
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bluestream.consumers.decode import encode_message
from bluestream.daemon.service import Daemon
from bluestream.settings import Settings
from bluestream.storage.backends import open_metadata_store
from helpers import group_offsets, scalar_run
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
    """Every kind of bad input is dead-lettered with its reason, its value and key, and
    ``source-offset`` equal to the offset the producer got back (not merely ``>= 0``:
    shown to fail on a copy of the tree with the offset written as ``offset + 1``,
    ``KeyError: '1'``, and with the key not passed on, ``None == b'k'``)."""
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
            offsets = [(await producer.send_and_wait(topic, value, key=b"k")).offset
                       for value, _ in bad]
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
    assert sorted(one_header(r, "reason") for r in letters) == expected
    by_offset = {one_header(r, "source-offset"): r for r in letters}
    assert len(by_offset) == len(letters)
    for (value, reason), offset in zip(bad, offsets, strict=True):
        if reason:
            r = by_offset[str(offset)]  # the offset the producer got back, exactly
            assert r.value == value and r.key == b"k"
            assert one_header(r, "reason") == reason
            assert one_header(r, "source-topic") == topic
            assert one_header(r, "source-partition") == "0"
            assert one_header(r, "error")
        else:
            assert str(offset) not in by_offset
    assert daemon.counters.total("dead_lettered") == len(expected)


async def read_dlq(bootstrap: str, dlq_topic: str, n: int,
                   within: float = 60.0) -> list[ConsumerRecord[bytes, bytes]]:
    """The first ``n`` records of ``dlq_topic``, as they are (headers a list: a name
    that appears twice shows twice)."""
    consumer = AIOKafkaConsumer(dlq_topic, bootstrap_servers=bootstrap,
                                auto_offset_reset="earliest", group_id=None,
                                fetch_max_bytes=64 * 1024 * 1024,
                                max_partition_fetch_bytes=64 * 1024 * 1024)
    await consumer.start()
    out: list[ConsumerRecord[bytes, bytes]] = []
    try:
        with anyio.move_on_after(within):
            while len(out) < n:
                batch = await consumer.getmany(timeout_ms=500)
                for recs in batch.values():
                    out.extend(recs)
    finally:
        await consumer.stop()
    assert len(out) >= n, f"only {len(out)} of {n} dead letters arrived: {out}"
    return out


def one_header(record: ConsumerRecord[bytes, bytes], name: str) -> str:
    """The value of header ``name``, which must appear exactly once."""
    values = [v for k, v in record.headers if k == name]
    assert len(values) == 1, (name, record.headers)
    return values[0].decode()


# -- what a dead letter keeps, and what a producer cannot forge ---------------------------------
#: Headers of the producer's own, including forgeries of every header the daemon adds;
#: a name given twice must stay twice, in order.
FORGED = [("trace-id", b"abc-123"), ("reason", b"spoofed"), ("error", b"nothing wrong"),
          ("source-topic", b"elsewhere"), ("source-partition", b"7"),
          ("source-offset", b"999999"), ("value-omitted", b"0"), ("multi", b"1"),
          ("multi", b"2"), ("binary", bytes(range(256)))]
OURS = {"error", "reason", "source-topic", "source-partition", "source-offset",
        "value-omitted"}
DLQ_MAX_MESSAGE_BYTES = 64 * 1024


async def committed_offset(bootstrap: str, group: str, topic: str) -> int:
    return (await group_offsets(bootstrap, group)).get((topic, 0), -1)


async def publish_and_dead_letter(
        kafka_bootstrap: str, topic: str, settings: Settings,
        records: list[tuple[bytes | None, bytes, str]]
) -> tuple[Daemon, list[int], list[ConsumerRecord[bytes, bytes]]]:
    """Run the daemon, publish ``records`` (key, value, reason) with the FORGED headers,
    wait until the daemon has committed past the last of them (each was dead-lettered
    and acknowledged by then), and return the offsets the producer got back and the
    dead letters. A Kafka error in the daemon meanwhile fails at once."""
    daemon = Daemon(settings, handle_signals=False)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon.run)
            offsets = [(await producer.send_and_wait(topic, value, key=key,
                                                     headers=FORGED)).offset
                       for key, value, _ in records]

            async def committed() -> bool:
                errors = daemon.counters.get("errors", "kafka")
                assert not errors, "the daemon hit a Kafka error while dead-lettering"
                group = settings.kafka.group_id
                return await committed_offset(kafka_bootstrap, group, topic) > offsets[-1]
            await wait_for(committed, 60, "the source offsets committed past the records")
            letters = await read_dlq(kafka_bootstrap, topic + ".dlq", len(records))
            daemon.stop.set()
    finally:
        await producer.stop()
    assert len(letters) == len(records)
    assert daemon.counters.total("dead_lettered") == len(records)
    return daemon, offsets, letters


def assert_dead_letter(letter: ConsumerRecord[bytes, bytes], topic: str, offset: int,
                       key: bytes | None, reason: str) -> None:
    assert letter.key == key
    assert [(k, v) for k, v in letter.headers if k not in OURS] == \
        [(k, v) for k, v in FORGED if k not in OURS]
    assert one_header(letter, "reason") == reason
    assert one_header(letter, "source-topic") == topic
    assert one_header(letter, "source-partition") == "0"
    assert one_header(letter, "source-offset") == str(offset)
    assert one_header(letter, "error") not in ("", "nothing wrong")


async def test_dead_letters_keep_key_and_headers_and_cannot_be_spoofed(
        kafka_bootstrap: str, kafka_topic: str, tmp_path: Path, zarr_root: Path) -> None:
    """Each dead letter has the original key and value, the producer's own headers
    (values and order, a repeated name twice, arbitrary bytes), then exactly one each
    of ``error``, ``reason``, ``source-topic``, ``source-partition`` and
    ``source-offset``: a producer's headers of those names (and ``value-omitted``) are
    dropped, not passed on as ours; ``source-offset`` is the offset the producer got
    back; the source offset is committed past them.

    Shown to fail on a copy of the tree (``PYTHONPATH=<copy>/src``): the producer's
    headers of our names kept (``headers = list(env.headers)``): two ``source-offset``
    headers, ``len([b'999999', b'0']) == 1`` fails; ``source-offset`` written as
    ``offset + 1``: ``['1', '2', '3'] == ['0', '1', '2']`` fails; the key not passed
    on: ``None == b'key-0'`` fails; the original headers dropped: ``[] ==
    [('trace-id', b'abc-123'), ...]`` fails.
    """
    topic = kafka_topic
    settings = settings_for(kafka_bootstrap, topic, f"sqlite:///{tmp_path}/meta.db", zarr_root)
    records = [  # (key, value, reason)
        (b"key-0", encode_message("start", {"uid": str(uuid.uuid4())}), "schema-violation"),
        (b"key-1", os.urandom(100), "undecodable"),
        (None, msgpack.packb(("not_a_document", {"uid": "x"})), "unknown-document"),
    ]
    _, offsets, letters = await publish_and_dead_letter(kafka_bootstrap, topic, settings,
                                                        records)
    by_offset = {one_header(r, "source-offset"): r for r in letters}
    assert sorted(by_offset) == sorted(str(o) for o in offsets)
    for (key, value, reason), offset in zip(records, offsets, strict=True):
        letter = by_offset[str(offset)]
        assert_dead_letter(letter, topic, offset, key, reason)
        assert letter.value == value
        assert "value-omitted" not in [k for k, _ in letter.headers]


async def test_a_record_too_big_for_the_dead_letter_topic_goes_without_its_value(
        kafka_bootstrap: str, kafka_topic: str, tmp_path: Path, zarr_root: Path) -> None:
    """The dead-letter topic is created first with ``max.message.bytes`` 64 KiB; an
    invalid record of 300 kB (well under the daemon's ``limits.max_message_bytes``)
    must arrive there without its value, with ``value-omitted`` giving its size and
    every other header as usual; the records before and after it keep their values;
    the daemon commits past all of them.

    Failed before the fix (the dead-letter producer was idempotent): the record before
    the big one arrived, then
    the daemon logs ``Kafka error; rewinding to committed offsets and retrying
    error='[Error 45] OutOfOrderSequenceNumber'`` and never commits past the records;
    the test stops at the first Kafka error ("the daemon hit a Kafka error while
    dead-lettering"). Reproducer without the daemon: create ``<t>.dlq`` with
    ``max.message.bytes=65536``; ``d = KafkaDeadLetters(settings)``; ``await
    d.start()``; ``await d.send(Envelope(t, 0, i, b"x" * n, key=b"k"),
    DocumentError("bad"))`` for n in (100, 300_000, 100); ``await d.flush()`` raises
    ``OutOfOrderSequenceNumber`` (asyncio then reports "Future exception was never
    retrieved" for the futures ``flush`` abandons) and ``<t>.dlq`` holds only the
    first record. With the big record alone (the producer's first send) the
    value-omitted resend works, so this test dead-letters a small record first.

    Checked on a copy of the tree (``PYTHONPATH=<copy>/src``): with the dead-letter
    producer not idempotent (``enable_idempotence=False``, the fix) this test passes;
    with that fix and ``value-omitted`` off by one it fails, ``'300063' ==
    '300062'``; with that fix and ``flush`` re-raising ``MessageSizeTooLargeError``
    instead of resending without the value it fails at the daemon's Kafka error.
    """
    topic = kafka_topic
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic + ".dlq", 1, 1, topic_configs={
            "max.message.bytes": str(DLQ_MAX_MESSAGE_BYTES)})])
    finally:
        await admin.close()
    settings = settings_for(kafka_bootstrap, topic, f"sqlite:///{tmp_path}/meta.db", zarr_root,
                            max_message_bytes=8 * 1024 * 1024)
    oversized = encode_message("start", {"uid": str(uuid.uuid4()), "filler": "x" * 300_000})
    assert DLQ_MAX_MESSAGE_BYTES < len(oversized) < settings.limits.max_message_bytes
    records = [
        (b"key-0", os.urandom(100), "undecodable"),
        (b"key-1", oversized, "schema-violation"),
        (b"key-2", os.urandom(100), "undecodable"),
    ]
    _, offsets, letters = await publish_and_dead_letter(kafka_bootstrap, topic, settings,
                                                        records)
    by_offset = {one_header(r, "source-offset"): r for r in letters}
    for (key, value, reason), offset in zip(records, offsets, strict=True):
        letter = by_offset[str(offset)]
        assert_dead_letter(letter, topic, offset, key, reason)
        if value is oversized:
            assert letter.value is None
            assert one_header(letter, "value-omitted") == str(len(oversized))
        else:
            assert letter.value == value
            assert "value-omitted" not in [k for k, _ in letter.headers]
