"""Subscription and tenants (README, "Configuration"; DESIGN, "Wire format").

- With no topics listed the daemon subscribes by pattern (``kafka.topic_pattern``,
  default ``^.*bluesky\\.runengine\\.documents$``), so a topic created after the daemon
  started is picked up and its runs are stored; a topic that does not match is not.
- A topic maps to a tenant: the ``[tenants]`` table first, else the topic's first dotted
  component. A mapped topic's runs are stored under the mapped tenant and nothing is
  created under its first component.

The daemon runs in process against the real broker. The narrower-pattern test uses the
shared broker with a pattern unique to the test (other tests' topics cannot match); the
true-default test needs a broker where no one else's topics match the default pattern,
so it starts a private Kafka of its own (``scripts/services`` on free ports, as the
outage tests do; skipped without java).

Bug found by these tests, fixed (they failed every time before the fix): when the
pattern subscription grows, aiokafka replaces its subscription (no assignment) before it
calls ``on_partitions_revoked``; if the consumer loop runs in between, its
``_update_highwater`` asks ``consumer.highwater()`` about a partition still in
``state.assigned`` and aiokafka's ``AssertionError: Partition is not assigned`` ends the
daemon. Left to chance this happened in 3 of 5 runs; the tests hold the idle loop in a
slow fsync while the subscription changes, so they fail every time ("the daemon crashed:
AssertionError: Partition is not assigned", seen with ``--runxfail``).

How each test was shown to fail, in a copy of the tree run with
``PYTHONPATH=/tmp/bs-break/src`` (the copy's code wins over the editable install). For
the pattern tests, on top of a candidate fix (``_update_highwater`` skipping partitions
not in ``consumer.assignment()``), with which both pass under ``--runxfail``; then one
break at a time:
(1) ``KafkaSource._start_consumer`` listing the topics that match the pattern once at
start and subscribing to that fixed list: both pattern tests failed, "timed out after
120.0 s waiting for the consumer to subscribe to the new topic";
(2) ``_start_consumer`` using ``kafka.topic_pattern`` instead of ``effective_pattern()``
(no default): the default-pattern test failed, "the daemon crashed: TypeError: You
should provide either `topics` or `pattern`";
(3) ``tenant_for_topic`` ignoring the ``[tenants]`` map: both mapping tests failed,
"timed out after 90 s waiting for the mapped topic's run under the mapped tenant";
(4) ``tenant_for_topic`` taking the last dotted component instead of the first: the
narrow-pattern test failed ("... waiting for the run on the topic that existed at
start") and both mapping tests ("... waiting for the unmapped topic's run under its
first component").
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

import bluestream.daemon.service as service_module
from bluestream.daemon.service import Daemon
from bluestream.errors import NotFound, leaf_errors
from bluestream.settings import DEFAULT_TOPIC_PATTERN, Settings, load_settings
from bluestream.storage.backends import open_metadata_store
from bluestream.storage.zarr_store import ZarrEventStore
from conftest import create_topic
from helpers import assert_stored_events, publish_docs, scalar_run, stored_stop
from test_ingest_kafka import wait_for
from test_ops_support import PrivateServices, daemon_env, free_port_pair

pytestmark = [pytest.mark.kafka, pytest.mark.anyio]

#: The consumer refreshes its topic metadata every 10 s (metadata_max_age_ms), then
#: rejoins its group; generous for two loaded cores.
PICKUP_S = 120.0
SUFFIX = ".bluesky.runengine.documents"


def pattern_settings(bootstrap: str, metadata: str, zarr_root: Path, group: str,
                     pattern: str | None) -> Settings:
    """Daemon settings with no topics listed: a pattern (``None``: the default)."""
    env = {"BLUESTREAM_KAFKA_BOOTSTRAP": bootstrap, "BLUESTREAM_GROUP_ID": group,
           "BLUESTREAM_METADATA": metadata, "BLUESTREAM_ZARR_ROOT": str(zarr_root),
           "BLUESTREAM_HTTP_ENABLED": "false"}
    if pattern is not None:
        env["BLUESTREAM_TOPIC_PATTERN"] = pattern
    settings = load_settings(None, environ=env)
    assert not settings.kafka.topics
    assert settings.kafka.effective_pattern() == (pattern or DEFAULT_TOPIC_PATTERN)
    return settings


@dataclass
class Held:
    """Daemon crash, if any (the test fails with it instead of a bare cancellation)."""

    crash: BaseException | None = None

    def check(self) -> None:
        if self.crash is not None:
            leaves = "; ".join(f"{type(e).__name__}: {e}" for e in leaf_errors(self.crash))
            raise AssertionError(f"the daemon crashed: {leaves}") from self.crash


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[tuple[Daemon, Held]]:
    daemon = Daemon(settings, handle_signals=False)
    held = Held()

    async def run() -> None:
        try:
            await daemon.run()
        except Exception as exc:  # reported by the test's waits, not as a cancellation
            held.crash = exc

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        try:
            yield daemon, held
        finally:
            daemon.stop.set()
    held.check()


@dataclass
class Gate:
    entered: anyio.Event = field(default_factory=anyio.Event)
    release: anyio.Event = field(default_factory=anyio.Event)


class SlowSyncZarr(ZarrEventStore):
    """The real Zarr store, except that while a gate is armed the next ``sync`` (the
    per-batch fsync, also run by the idle loop) waits until the test releases it: an
    fsync stalled on a slow disk. The consumer loop holds its batch lock meanwhile."""

    gate: Gate | None = None

    async def sync(self) -> None:
        gate, SlowSyncZarr.gate = SlowSyncZarr.gate, None
        if gate is not None:
            gate.entered.set()
            await gate.release.wait()
        await super().sync()


def _stored(metadata: str, tenant: str, run: list[tuple[str, Any]], held: Held) -> Any:
    async def check() -> bool:
        held.check()
        return await stored_stop(metadata, tenant, run[0][1]["uid"])
    return check


async def _tenant_exists(metadata: str, tenant: str) -> bool:
    store = open_metadata_store(metadata, tenant, readonly=True)
    try:
        await store.open()
    except NotFound:
        return False
    finally:
        await store.close()  # also after a failed open: it may hold a client
    return True


async def _picked_up_after_start(bootstrap: str, metadata: str, zarr_root: Path,
                                 settings: Settings, early: str, late: str,
                                 unmatched: str) -> None:
    """``early`` exists before the daemon starts. Once its run is stored and committed
    (the daemon consumes, and is idle), ``unmatched`` and then ``late`` are created and
    published to: ``late``'s run must be stored under its first dotted component,
    ``unmatched``'s nowhere, and the daemon must keep running.

    While the consumer's subscription changes to include ``late``, the idle loop is held
    in a slow fsync (:class:`SlowSyncZarr`). That makes the test deterministic: it always
    takes the interleaving in which the consumer loop, not the rebalance callback, runs
    first after aiokafka changed the subscription (left to chance, the two orders come
    about equally often)."""
    first = early.split(".")[0]
    run_early = scalar_run(4, scan_id=1)
    await create_topic(bootstrap, early)
    await publish_docs(bootstrap, early, run_early)
    async with running(settings) as (daemon, held):
        await wait_for(_stored(metadata, first, run_early, held), PICKUP_S,
                       "the run on the topic that existed at start")
        assert daemon.source is not None
        source = daemon.source
        assert source.state.assigned == {(early, 0)}

        async def committed() -> bool:
            held.check()
            return source.state.committed.get((early, 0)) == len(run_early)
        await wait_for(committed, 60, "the early run's offsets to be committed")
        gate = SlowSyncZarr.gate = Gate()
        with anyio.fail_after(30):
            await gate.entered.wait()  # the idle loop polls every 0.5 s
        run_unmatched = scalar_run(3, scan_id=2)
        await create_topic(bootstrap, unmatched)
        await publish_docs(bootstrap, unmatched, run_unmatched)
        run_late = scalar_run(5, scan_id=3)
        await create_topic(bootstrap, late)  # after the daemon started and consumed
        await publish_docs(bootstrap, late, run_late)

        async def subscribed() -> bool:
            held.check()
            return late in source.consumer.subscription()
        await wait_for(subscribed, PICKUP_S, "the consumer to subscribe to the new topic")
        gate.release.set()
        late_tenant = late.split(".")[0]
        await wait_for(_stored(metadata, late_tenant, run_late, held), PICKUP_S,
                       "the run on the topic created after the daemon started")
        assigned = source.state.assigned
        assert {(early, 0), (late, 0)} <= assigned
        assert all(t != unmatched for t, _ in assigned)
        assert unmatched not in source.consumer.subscription()
        assert daemon.counters.total("dead_lettered") == 0
    assert_stored_events(zarr_root, first, run_early, metadata)
    assert_stored_events(zarr_root, late_tenant, run_late, metadata)
    # The unmatched topic's metadata arrived with (or before) the late topic's.
    assert not await _tenant_exists(metadata, unmatched.split(".")[0])
    assert not (zarr_root / unmatched.split(".")[0]).exists()


async def test_pattern_picks_up_new_topic(kafka_bootstrap: str, tmp_path: Path,
                                          zarr_root: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A pattern narrower than the default (unique to this test, so other tests' topics on
    the shared broker cannot match) but still a pattern: the code path is the default's."""
    monkeypatch.setattr(service_module, "ZarrEventStore", SlowSyncZarr)
    prefix = "sub" + uuid.uuid4().hex[:10]
    metadata = f"sqlite:///{tmp_path}/meta.db"
    pattern = rf"^{prefix}-[a-z]+\.bluesky\.runengine\.documents$"
    settings = pattern_settings(kafka_bootstrap, metadata, zarr_root, f"g-{prefix}", pattern)
    await _picked_up_after_start(
        kafka_bootstrap, metadata, zarr_root, settings,
        early=f"{prefix}-early{SUFFIX}", late=f"{prefix}-late{SUFFIX}",
        unmatched=f"{prefix}-nope.bluesky.runengine.documents.copy")


# -- the true default, on a broker of our own ----------------------------------------------
class _PrivateKafka(PrivateServices):
    """A private Kafka only (``scripts/services`` starts no Mongo and no S3 when given
    external ones)."""

    def _run(self, *args: str, timeout: float = 240) -> str:
        import subprocess

        from test_ops_support import ROOT

        env = daemon_env(BLUESTREAM_SERVICES_HOME=str(self.home),
                         BLUESTREAM_SERVICES_KAFKA_PORT=str(self.kafka_port),
                         # "external": scripts/services then starts no Mongo, no S3
                         BLUESTREAM_MONGO_URI="mongodb://127.0.0.1:1",
                         BLUESTREAM_S3_ENDPOINT="http://127.0.0.1:1",
                         BLUESTREAM_SERVICES_KAFKA_HEAP="512m")
        done = subprocess.run([str(ROOT / "scripts" / "services"), *args], env=env,
                              capture_output=True, text=True, timeout=timeout, check=False)
        assert done.returncode == 0, f"services {args}: {done.stdout}{done.stderr}"
        return done.stdout


@pytest.fixture(scope="module")
def private_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if shutil.which("java") is None:
        pytest.skip("java is not installed: scripts/services cannot start a private Kafka")
    services = _PrivateKafka(tmp_path_factory.mktemp("kafka"), free_port_pair(), 0, 0)
    try:
        services.up()
        yield services.kafka_bootstrap
    finally:
        services.wipe()


@pytest.mark.slow
async def test_default_pattern_picks_up_new_topic(private_kafka: str, tmp_path: Path,
                                                  zarr_root: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """No topics and no pattern configured: the default pattern. On a private broker,
    every topic is this test's."""
    monkeypatch.setattr(service_module, "ZarrEventStore", SlowSyncZarr)
    metadata = f"sqlite:///{tmp_path}/meta.db"
    settings = pattern_settings(private_kafka, metadata, zarr_root, "bluestream", None)
    await _picked_up_after_start(
        private_kafka, metadata, zarr_root, settings,
        early=f"csx{SUFFIX}", late=f"chx{SUFFIX}", unmatched="xpd.bluesky.documents")


# -- [tenants] ------------------------------------------------------------------------------
@pytest.fixture(params=["sqlite", pytest.param("mongo", marks=pytest.mark.mongo)])
def metadata_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/meta.db"
    uri: str = request.getfixturevalue("mongo_uri")
    return uri


async def test_tenants_table_maps_topic(kafka_bootstrap: str, metadata_uri: str,
                                        tmp_path: Path, zarr_root: Path) -> None:
    """``[tenants]`` in the TOML file maps one topic to another tenant: its run is stored
    there (metadata, arrays, provenance) and nothing exists under the topic's first
    component; an unlisted topic of the same daemon keeps its first component."""
    ids = uuid.uuid4().hex[:10]
    mapped_first, target, unmapped_first = f"ta{ids}", f"tb{ids}", f"tu{ids}"
    mapped, unmapped = f"{mapped_first}{SUFFIX}", f"{unmapped_first}{SUFFIX}"
    config = tmp_path / "bluestream.toml"
    config.write_text(f"""
[kafka]
bootstrap = "{kafka_bootstrap}"
topics = ["{mapped}", "{unmapped}"]
group_id = "g-{ids}"

[storage]
metadata = "{metadata_uri}"
zarr_root = "{zarr_root}"

[http]
enabled = false

[tenants]
"{mapped}" = "{target}"
""", encoding="utf-8")
    settings = load_settings(config)
    assert settings.tenants == {mapped: target}
    run_mapped, run_unmapped = scalar_run(6, scan_id=7), scalar_run(2, scan_id=8)
    for topic, run in ((mapped, run_mapped), (unmapped, run_unmapped)):
        await create_topic(kafka_bootstrap, topic)
        await publish_docs(kafka_bootstrap, topic, run)
    async with running(settings) as (daemon, held):
        await wait_for(_stored(metadata_uri, target, run_mapped, held), 90,
                       "the mapped topic's run under the mapped tenant")
        await wait_for(_stored(metadata_uri, unmapped_first, run_unmapped, held), 90,
                       "the unmapped topic's run under its first component")
        assert daemon.counters.total("dead_lettered") == 0
    assert_stored_events(zarr_root, target, run_mapped, metadata_uri)
    assert_stored_events(zarr_root, unmapped_first, run_unmapped,
                         metadata_uri)
    uid = run_mapped[0][1]["uid"]
    store = open_metadata_store(metadata_uri, target, readonly=True)
    await store.open()
    try:
        assert (await store.get("start", uid)) == run_mapped[0][1]
        assert [e["topic"] for e in await store.ingest_log(uid)] == [mapped]
        assert await store.get("start", run_unmapped[0][1]["uid"]) is None
    finally:
        await store.close()
    assert not await _tenant_exists(metadata_uri, mapped_first)
    assert not (zarr_root / mapped_first).exists()
