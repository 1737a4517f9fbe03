"""The array conformance suite against :class:`ZarrEventStore`, read back with
:class:`ArrayReader` (the reader every catalog object uses): on local disk, and on the
real S3-compatible server of ``scripts/services`` (a fresh bucket prefix per test).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import anyio
import pytest
from zarr.abc.store import Store
from zarr.storage import LocalStore

from bluestream.catalog.arrays import ArrayReader
from bluestream.storage.zarr_root import ZarrRoot
from bluestream.storage.zarr_store import ZarrEventStore

# The suite's asserts live in a helper module: have pytest explain them (conftest.py
# would be the more general place for this).
pytest.register_assert_rewrite("array_conformance")
from array_conformance import ArrayStoreTests, Snapshot  # noqa: E402
from helpers import zarr_files  # noqa: E402

#: Defects this suite found in ZarrEventStore and that are fixed (each test failed before):
#: lossy dtype casts stored changed values (int64 2**40 as 0 in an int32 array, numbers
#: as text in a string column); two writers of one descriptor lost rows to concurrent
#: chunk rewrites (the lock covered only resizes); the lock file sat inside the group.


class TestLocalZarrEventStore(ArrayStoreTests):
    known_defects: ClassVar[dict[str, str]] = {}

    @pytest.fixture
    def root(self, zarr_root: Path) -> Path:
        return zarr_root

    @pytest.fixture
    def make_writer(self) -> Callable[[Path], ZarrEventStore]:
        return ZarrEventStore

    @pytest.fixture
    def make_reader(self) -> Callable[[Path], ArrayReader]:
        return ArrayReader

    @pytest.fixture
    def inspect_store(self) -> Callable[[Path], LocalStore]:
        return lambda root: LocalStore(str(root), read_only=True)

    @pytest.fixture
    def snapshot(self) -> Snapshot:
        """Every file under the root (or the sub-directory ``prefix``), Zarr's or not:
        lock files included."""
        async def files(root: Path, prefix: str = "") -> dict[str, str]:
            out = {}
            async for path in anyio.Path(root, prefix).rglob("*"):
                if await path.is_file():
                    data = await path.read_bytes()
                    out[str(path.relative_to(root))] = hashlib.sha256(data).hexdigest()
            return out
        return files


class TestS3ZarrEventStore(ArrayStoreTests):
    """The same contract with the Zarr root on S3: PUTs instead of files, no rename, no
    fsync, the descriptor lock held in the process."""

    pytestmark = pytest.mark.s3
    #: On an object store the descriptor lock is held in the process (shared by its
    #: writers of one root, so the two writers of test_concurrent_writers_keep_every_row
    #: keep every row); writers in different processes are not locked against each other:
    #: a run's documents stay on one partition, and a partition has one owner (README,
    #: "Several hosts, one object store").
    known_defects: ClassVar[dict[str, str]] = {}

    @pytest.fixture
    def root(self, s3_root: ZarrRoot) -> ZarrRoot:
        return s3_root

    @pytest.fixture
    def make_writer(self) -> Callable[[ZarrRoot], ZarrEventStore]:
        return ZarrEventStore

    @pytest.fixture
    def make_reader(self) -> Callable[[ZarrRoot], ArrayReader]:
        return ArrayReader

    @pytest.fixture
    def inspect_store(self) -> Callable[[ZarrRoot], Store]:
        return lambda root: root.object_store(read_only=True)

    @pytest.fixture
    def snapshot(self) -> Snapshot:
        """Every object under the root's prefix (or ``prefix`` below it)."""
        async def objects(root: ZarrRoot, prefix: str = "") -> dict[str, str]:
            return await anyio.to_thread.run_sync(zarr_files, root, prefix)
        return objects
