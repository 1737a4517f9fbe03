"""Shared fixtures: the real services started by ``scripts/services`` (or the external
ones named by ``BLUESTREAM_KAFKA_BOOTSTRAP`` / ``BLUESTREAM_MONGO_URI`` /
``BLUESTREAM_S3_ENDPOINT``)."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

KAFKA_BOOTSTRAP = os.environ.get("BLUESTREAM_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
MONGO_URI = os.environ.get("BLUESTREAM_MONGO_URI", "mongodb://127.0.0.1:27017")
S3_ENDPOINT = os.environ.get("BLUESTREAM_S3_ENDPOINT", "http://127.0.0.1:9000")
S3_BUCKET = os.environ.get("BLUESTREAM_S3_BUCKET", "bluestream")
S3_ACCESS_KEY_ID = os.environ.get("BLUESTREAM_S3_ACCESS_KEY_ID", "bluestream")
S3_SECRET_ACCESS_KEY = os.environ.get("BLUESTREAM_S3_SECRET_ACCESS_KEY", "bluestream-secret")


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


def s3_environment(endpoint: str = S3_ENDPOINT) -> dict[str, str]:
    """The standard variables that point a daemon or tool at the test S3 server."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET_ACCESS_KEY, "AWS_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    hostport = S3_ENDPOINT.split("://", 1)[-1].split("/", 1)[0]
    if not _reachable(hostport):
        pytest.fail(f"S3 is not reachable at {S3_ENDPOINT}: run `scripts/services up`")
    return S3_ENDPOINT


@pytest.fixture
def s3_root(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A fresh ``s3://bucket/prefix`` Zarr root per test (a ZarrRoot); the AWS variables
    of this process point at the test server, as they would for a daemon."""
    from bluestream.storage.zarr_root import ZarrRoot

    for name, value in s3_environment(s3_endpoint).items():
        monkeypatch.setenv(name, value)
    return ZarrRoot.parse(f"s3://{S3_BUCKET}/test-{uuid.uuid4().hex[:12]}")


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
