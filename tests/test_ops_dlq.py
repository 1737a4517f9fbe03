"""``bluestream dlq list|show|replay`` against the real broker: events whose descriptor
came too late are dead-lettered; after the descriptor is published (the fix), replaying
them by reason stores them, while the undecodable record stays where it is."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bluestream.consumers.decode import encode_message
from bluestream.daemon.service import Daemon
from bluestream.storage.backends import open_metadata_store
from helpers import read_stream_arrays, scalar_run
from test_ingest_kafka import settings_for, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.anyio]


async def cli(kafka: str, *args: str, expect: int = 0) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLUESTREAM_")}
    env["BLUESTREAM_KAFKA_BOOTSTRAP"] = kafka
    done = await anyio.run_process([sys.executable, "-m", "bluestream", *args], env=env,
                                   check=False)
    out = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == expect, (args, out)
    return out


async def test_dlq_list_show_and_replay_after_a_fix(kafka_bootstrap: str, kafka_topic: str,
                                                    tenant: str, tmp_path: Path,
                                                    zarr_root: Path) -> None:
    topic = kafka_topic
    metadata = f"sqlite:///{tmp_path}/meta.db"
    daemon = Daemon(settings_for(kafka_bootstrap, topic, metadata, zarr_root,
                                 park_max_age_s=1.0), handle_signals=False)
    run = scalar_run(5, scan_id=9)
    (_, start), (_, descriptor), events, (_, stop) = run[0], run[1], run[2:-1], run[-1]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    store = open_metadata_store(metadata, tenant)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon.run)
            key = start["uid"].encode()
            await producer.send_and_wait(topic, encode_message("start", start), key=key)
            for name, doc in events:  # their descriptor is missing: parked, then dead
                await producer.send_and_wait(topic, encode_message(name, doc), key=key)
            await producer.send_and_wait(topic, b"\xc1 not a message", key=key)
            await wait_for(_dead(daemon, 6), 60, "six dead letters")

            listed = [json.loads(line) for line in
                      (await cli(kafka_bootstrap, "dlq", "list", topic, "--json")).splitlines()]
            assert sorted(d["reason"] for d in listed) == ["undecodable"] + \
                ["unknown-descriptor"] * 5
            assert all(d["source"].startswith(f"{topic}[0]@") for d in listed)
            table = await cli(kafka_bootstrap, "dlq", "list", topic)
            assert "6 dead letters: undecodable 1, unknown-descriptor 5" in table
            bad = next(d for d in listed if d["reason"] == "undecodable")
            shown = await cli(kafka_bootstrap, "dlq", "show", topic + ".dlq",
                              f"0:{bad['offset']}")
            assert "reason: undecodable" in shown and "does not decode" in shown
            first = next(d for d in listed if d["reason"] == "unknown-descriptor")
            shown = await cli(kafka_bootstrap, "dlq", "show", topic, str(first["offset"]))
            assert "decodes as a 'event' document" in shown and '"seq_num": 1' in shown
            assert descriptor["uid"] in shown
            await cli(kafka_bootstrap, "dlq", "show", topic, "999", expect=1)

            # The fix: the descriptor arrives. Then replay what failed for want of it.
            await producer.send_and_wait(topic, encode_message("descriptor", descriptor),
                                         key=key)
            await store.open()

            async def has_descriptor() -> bool:
                return await store.get("descriptor", descriptor["uid"]) is not None
            await wait_for(has_descriptor, 30, "the descriptor")
            dry = await cli(kafka_bootstrap, "dlq", "replay", topic, "--all", "--reason",
                            "unknown-descriptor", "--dry-run")
            assert "5 replayed (dry run), 0 failed" in dry
            out = await cli(kafka_bootstrap, "dlq", "replay", topic, "--all",
                            "--reason", "unknown-descriptor")
            assert "5 replayed, 0 failed" in out
            await producer.send_and_wait(topic, encode_message("stop", stop), key=key)

            async def stopped() -> bool:
                return await store.get("stop", start["uid"]) is not None
            await wait_for(stopped, 30, "the stop")
            await wait_for(_events(daemon, 5), 30, "the replayed events")
            daemon.stop.set()
    finally:
        await producer.stop()
        await store.close()
    arrays = read_stream_arrays(zarr_root, tenant, start["uid"], descriptor["uid"],
                                metadata)
    np.testing.assert_array_equal(arrays["seq_num"], np.arange(1, 6))
    np.testing.assert_array_equal(arrays["data/counter"], [e["data"]["counter"] for _, e in events])
    assert daemon.counters.total("dead_lettered") == 6  # nothing new died
    replayed = await _replayed_headers(kafka_bootstrap, topic)
    assert len(replayed) == 5 and all(h.startswith(f"{topic}.dlq:0:") for h in replayed)
    # Mistakes are reported, not guessed at.
    await cli(kafka_bootstrap, "dlq", "list", f"nothing-{tenant}", expect=1)
    none = await cli(kafka_bootstrap, "dlq", "replay", topic, "--offset", "999")
    assert "no (matching) record at 0:999" in none and "0 replayed" in none
    await cli(kafka_bootstrap, "dlq", "replay", topic, expect=2)  # neither --offset nor --all


async def _replayed_headers(bootstrap: str, topic: str) -> list[str]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest")
    await consumer.start()
    out: list[str] = []
    try:
        with anyio.move_on_after(5):
            while True:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    out += [v.decode() for r in records for k, v in r.headers
                            if k == "dlq-replay-of"]
    finally:
        await consumer.stop()
    return out


def _dead(daemon: Daemon, n: int) -> Any:
    async def check() -> bool:
        return daemon.counters.total("dead_lettered") >= n
    return check


def _events(daemon: Daemon, n: int) -> Any:
    async def check() -> bool:
        return daemon.counters.total("events") >= n
    return check


async def test_a_retried_batch_dead_letters_twice_and_the_tool_shows_it_once(
        kafka_bootstrap: str, kafka_topic: str, tmp_path: Path, zarr_root: Path) -> None:
    """Review defect 10: a batch retried after a store outage sends its dead letters
    again. The real dead-letter producer sends the same rejected record twice (as the
    retry does); ``dlq list`` shows it once (``--copies`` shows both) and ``replay --all``
    replays it once. Checked to fail before the fix: list showed "2 dead letters"."""
    from bluestream.consumers.dead_letters import KafkaDeadLetters
    from bluestream.consumers.envelope import Envelope
    from bluestream.errors import DecodeError

    settings = settings_for(kafka_bootstrap, kafka_topic, f"sqlite:///{tmp_path}/m.db",
                            zarr_root)
    sink = KafkaDeadLetters(settings)
    await sink.start()
    try:
        env = Envelope(kafka_topic, 0, 41, b"\xc1 junk", b"key", [("trace", b"t1")])
        other = Envelope(kafka_topic, 0, 42, b"\xc1 more junk", b"key")
        for _ in range(2):  # the first attempt, then the retry of the same batch
            await sink.send(env, DecodeError("not msgpack"))
            await sink.flush()
        await sink.send(other, DecodeError("not msgpack either"))
        await sink.flush()
    finally:
        await sink.stop()
    table = await cli(kafka_bootstrap, "dlq", "list", kafka_topic)
    assert "2 dead letters: undecodable 2 (1 repeated copies not shown" in table
    listed = [json.loads(line) for line in (await cli(
        kafka_bootstrap, "dlq", "list", kafka_topic, "--json")).splitlines()]
    assert sorted(d["source"] for d in listed) == [f"{kafka_topic}[0]@41",
                                                   f"{kafka_topic}[0]@42"]
    every = await cli(kafka_bootstrap, "dlq", "list", kafka_topic, "--copies")
    assert "3 dead letters" in every
    dry = await cli(kafka_bootstrap, "dlq", "replay", kafka_topic, "--all", "--dry-run")
    assert "2 replayed (dry run), 0 failed" in dry
