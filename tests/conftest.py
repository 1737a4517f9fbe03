"""Shared fixtures: the real services started by ``scripts/services`` (or the external
ones named by ``BLUESTREAM_KAFKA_BOOTSTRAP`` / ``BLUESTREAM_MONGO_URI``)."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

KAFKA_BOOTSTRAP = os.environ.get("BLUESTREAM_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
MONGO_URI = os.environ.get("BLUESTREAM_MONGO_URI", "mongodb://127.0.0.1:27017")


def _reachable(hostport: str) -> bool:
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=2):
            return True
    except OSError:
        return False


def _mongo_hostport(uri: str) -> str:
    rest = uri.split("://", 1)[1]
    rest = rest.split("@", 1)[-1]
    return rest.split("/", 1)[0].split(",", 1)[0].split("?", 1)[0]


@pytest.fixture(autouse=True)
def _no_bluestream_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests say which settings they use: BLUESTREAM_* variables of the shell that started
    pytest (an external Mongo URI, say) must not override a test's own configuration.
    The service addresses above were read before this runs."""
    for name in list(os.environ):
        if name.startswith("BLUESTREAM_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    if not _reachable(KAFKA_BOOTSTRAP):
        pytest.fail(f"Kafka is not reachable at {KAFKA_BOOTSTRAP}: run `scripts/services up`")
    return KAFKA_BOOTSTRAP


@pytest.fixture(scope="session")
def mongo_uri() -> str:
    if not _reachable(_mongo_hostport(MONGO_URI)):
        pytest.fail(f"MongoDB is not reachable at {MONGO_URI}: run `scripts/services up`")
    return MONGO_URI


@pytest.fixture
def tenant() -> str:
    """A fresh tenant (Mongo database / Zarr sub-tree) name per test."""
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def topic(tenant: str) -> str:
    """A fresh topic per test whose first dotted component is the test's tenant."""
    return f"{tenant}.bluesky.runengine.documents"


async def create_topic(bootstrap: str, topic: str, partitions: int = 1) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


@pytest.fixture
def kafka_topic(kafka_bootstrap: str, topic: str) -> str:
    """``topic``, created on the broker with one partition."""
    import anyio

    anyio.run(create_topic, kafka_bootstrap, topic)
    return topic


@pytest.fixture
def zarr_root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "zarr"
    root.mkdir()
    yield root
