"""Durable before commit (DESIGN I1): the Zarr files a batch wrote, and their directories,
are fsynced once per batch, before the batch's metadata is written (and so before the
source commits its offsets); ``storage.fsync = false`` turns that off.

Everything runs against the real file system. ``os.fsync`` is wrapped (it still syncs) to
see which paths were synced and when; that is observation, not a fake. The one fault
injected (an fsync that fails) is one a real disk cannot be asked for on demand.
"""

from __future__ import annotations

import errno
import itertools
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import event_model
import numpy as np
import pytest
from zarr.core.buffer import cpu
from zarr.core.sync import sync as zarr_sync
from zarr.testing.store import StoreTests

from bluestream.errors import StorageError
from bluestream.layout import descriptor_path, field_specs
from bluestream.limits import Limits
from bluestream.schemas.normalise import page_from_events
from bluestream.settings import load_settings
from bluestream.storage.local_store import SyncingLocalStore, atomic_write
from bluestream.storage.zarr_store import ZarrEventStore
from helpers import envelopes, make_ingestor, scalar_run

pytestmark = pytest.mark.anyio

Doc = dict[str, Any]
LIMITS = Limits()
LOCK_DIR = ".bluestream-locks"  # the descriptor write locks: not data, never synced


# -- observing fsync ---------------------------------------------------------------------
Log = list[tuple[str, str]]  # ("fsync", path) or ("meta", what), in the order they ended


@pytest.fixture
def log(monkeypatch: pytest.MonkeyPatch) -> Log:
    """Every completed ``os.fsync`` as ("fsync", path); tests add their own entries."""
    entries: Log = []
    real = os.fsync

    def recording_fsync(fd: int) -> None:
        real(fd)
        entries.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return entries


def synced(log: Log, start: int = 0) -> Counter[str]:
    return Counter(what for kind, what in log[start:] if kind == "fsync")


def on_disk(root: Path) -> tuple[set[str], set[str]]:
    """(files, directories) under ``root``, ``root`` included, lock files left out."""
    files: set[str] = set()
    dirs: set[str] = set()
    for here, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d != LOCK_DIR]  # locks hold no data
        dirs.add(here)
        files.update(os.path.join(here, n) for n in names)
    return files, dirs


def inodes(paths: set[str]) -> dict[str, int]:
    return {p: os.stat(p).st_ino for p in paths}


# -- documents ---------------------------------------------------------------------------
def run_docs(n_events: int) -> tuple[Doc, Doc, list[Doc]]:
    """start, descriptor and events with a scalar, a 2-d image and a string per event
    (so chunk keys of one and of three levels: c/0 and c/0/0/0)."""
    bundle = event_model.compose_run(time=1000.0, metadata={"scan_id": 1})
    keys = {"x": {"dtype": "number", "shape": [], "source": "s"},
            "img": {"dtype": "array", "shape": [3, 4], "source": "s", "dtype_numpy": "<u2"},
            "label": {"dtype": "string", "shape": [], "source": "s"}}
    desc = bundle.compose_descriptor(name="primary", data_keys=keys, time=1000.0)
    events = []
    for i in range(1, n_events + 1):
        data = {"x": i * 0.5, "img": np.full((3, 4), i, dtype="<u2"), "label": f"p{i}"}
        events.append(desc.compose_event(data=data, timestamps={k: 1000.0 + i for k in data},
                                         seq_num=i, time=1000.0 + i))
    return bundle.start_doc, desc.descriptor_doc, events


async def write(store: ZarrEventStore, tenant: str, start: Doc, desc: Doc,
                events: list[Doc]) -> None:
    specs = field_specs(desc, LIMITS)
    await store.write_page(tenant, start["uid"], desc, specs,
                           page_from_events(events, specs, LIMITS))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path.resolve() / "zarr"


# -- (a) what a sync covers ----------------------------------------------------------------
async def test_sync_covers_every_written_file_and_directory(root: Path, log: Log) -> None:
    """After write_page + sync, every file under the Zarr root (chunks and zarr.json) and
    every directory from the root down was fsynced, each once; writing does not sync by
    itself; a second batch's sync covers every file it replaced or added.

    Checked to fail without the fix: against the code before the change (no sync()) it
    cannot run; with sync() kept but directories not synced, or with ``_grow`` reopening
    arrays on ``store=str(self.root)`` (writes of the second batch then go through a store
    that records nothing), the subset assertions fail.
    """
    store = ZarrEventStore(root)
    start, desc, events = run_docs(6)
    await write(store, "t", start, desc, events[:3])
    assert synced(log) == Counter(), "write_page alone must not fsync"
    await store.sync()

    files, dirs = on_disk(root)
    group = root / descriptor_path("t", start["uid"], desc["uid"])
    assert any(f.endswith("/c/0/0/0") for f in files)  # the image's 3-level chunk key
    assert str(group / "zarr.json") in files and str(group / "time" / "c" / "0") in files
    first = synced(log)
    assert files <= set(first), sorted(files - set(first))
    assert dirs <= set(first), sorted(dirs - set(first))
    assert max(first.values()) == 1, [p for p, n in first.items() if n > 1]

    before = inodes(files)
    mark = len(log)
    await write(store, "t", start, desc, events[3:])  # grows every array: new metadata
    await store.sync()
    files2, _ = on_disk(root)
    changed = {f for f in files2 if before.get(f) != os.stat(f).st_ino}  # replaced or new
    second = synced(log, mark)
    assert changed, "the second batch rewrote nothing?"
    assert changed <= set(second), sorted(changed - set(second))
    assert {os.path.dirname(f) for f in changed} <= set(second)
    assert max(second.values()) == 1
    # The chain above is durable since the first sync: not synced again.
    assert str(root) not in second and str(root / "t") not in second


async def test_recreated_directories_have_their_parents_synced(root: Path, log: Log) -> None:
    """A directory removed behind the store's back and created again by a write is not
    trusted as durable: its parent (and every recreated one above) is synced again.

    Checked to fail: with ``_noting`` recording the key only (no forgetting of missing
    directories), the run's directory is not among the second sync's fsyncs.
    """
    store = ZarrEventStore(root)
    start, desc, events = run_docs(2)
    await write(store, "t", start, desc, events[:1])
    await store.sync()
    run_dir = root / "t" / start["uid"][:2] / start["uid"]
    assert run_dir.is_dir()
    shutil.rmtree(run_dir.parent)
    store.forget("t", start["uid"])
    mark = len(log)
    await write(store, "t", start, desc, events)
    await store.sync()
    second = synced(log, mark)
    _files, dirs = on_disk(root)
    assert dirs <= set(second) | {str(root / LOCK_DIR)}, sorted(dirs - set(second))
    assert str(root / "t") in second and str(run_dir.parent) in second


# -- (b) fsync = false ---------------------------------------------------------------------
async def test_fsync_false_syncs_nothing(root: Path, log: Log) -> None:
    """With fsync=False, sync() fsyncs nothing (and still empties the record).

    Checked to fail without the fix: with ``if not self.fsync`` removed from sync(), the
    log holds every file and directory.
    """
    store = ZarrEventStore(root, fsync=False)
    start, desc, events = run_docs(4)
    await write(store, "t", start, desc, events)
    assert store.unsynced > 0
    await store.sync()
    assert synced(log) == Counter()
    assert store.unsynced == 0


def test_fsync_setting_and_environment() -> None:
    """``storage.fsync`` defaults to true; BLUESTREAM_FSYNC=false turns it off.

    Checked to fail without the fix: the key did not exist (extra keys are refused), and
    without the ENV_KEYS entry the variable is ignored.
    """
    assert load_settings(environ={}).storage.fsync is True
    assert load_settings(environ={"BLUESTREAM_FSYNC": "false"}).storage.fsync is False
    assert load_settings(environ={"BLUESTREAM_FSYNC": "1"}).storage.fsync is True


# -- (c) order within a batch, through the pipeline --------------------------------------
@pytest.mark.parametrize("tail_rows", [0, 4])
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("mongo", marks=pytest.mark.mongo)])
async def test_arrays_synced_before_metadata_of_each_batch(
        backend: str, tail_rows: int, root: Path, tmp_path: Path, tenant: str, log: Log,
        request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through Ingestor.process, in every batch with events, the array files' fsyncs all
    end before the batch's first metadata write (put_documents, update_streams), and they
    include the chunks of the arrays that batch wrote. With tails of 4 rows every batch
    moves rows from the tail (metadata) to the arrays: those are synced first too.

    Checked to fail without the fix: with ``await self.arrays.sync()`` removed from
    ``Ingestor._flush`` no array file is fsynced at all; moved after the metadata
    writes, the order assertion fails.
    """
    uri = (f"sqlite:///{tmp_path / 'meta.db'}" if backend == "sqlite"
           else request.getfixturevalue("mongo_uri"))
    ing, sink, registry = make_ingestor(uri, root, tail_rows=tail_rows)
    try:
        meta = await registry(tenant)
        for name in ("put_documents", "update_streams"):
            monkeypatch.setattr(meta, name, _logged(log, name, getattr(meta, name)))
        docs = scalar_run(30, fields=2)
        envs = envelopes(docs, tenant)
        cuts = [0, 10, 22, len(envs)]  # start+descriptor+events, events, events+stop
        for lo, hi in itertools.pairwise(cuts):
            log.append(("batch", f"{lo}-{hi}"))
            await ing.process(envs[lo:hi])
        assert not sink.letters
    finally:
        await registry.aclose()

    batches = _split(log)
    assert len(batches) == 3
    for entries in batches:
        kinds = [k for k, _ in entries]
        array_syncs = [i for i, (k, p) in enumerate(entries)
                       if k == "fsync" and p.startswith(str(root) + os.sep)]
        metadata = [i for i, k in enumerate(kinds) if k == "meta"]
        assert array_syncs, f"no array file fsynced in this batch: {entries}"
        assert metadata and max(array_syncs) < min(metadata), entries
        chunks = {p for k, p in entries if k == "fsync" and p.endswith("/time/c/0")}
        assert chunks, "the time column's chunk was written but not synced"
        assert ("meta", "update_streams") in entries


def _logged(log: Log, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        log.append(("meta", name))
        return await method(*args, **kwargs)
    return wrapper


def _split(log: Log) -> list[Log]:
    out: list[Log] = []
    for entry in log:
        if entry[0] == "batch":
            out.append([])
        elif out:
            out[-1].append(entry)
    return out


# -- (d) the record is bounded -------------------------------------------------------------
@pytest.mark.parametrize("fsync", [True, False])
async def test_record_is_cleared_by_each_sync(root: Path, log: Log, fsync: bool) -> None:
    """The record of written keys holds one batch's writes at most: sync() empties it,
    whether it syncs or not, and each sync covers no more than the files that exist.

    Checked to fail without the fix: with ``take()`` returning the sets without
    replacing them, ``unsynced`` grows batch after batch and the assertions fail.
    """
    store = ZarrEventStore(root, fsync=fsync)
    start, desc, events = run_docs(20)
    for i in range(0, 20, 4):
        mark = len(log)
        await write(store, "t", start, desc, events[i:i + 4])
        files, dirs = on_disk(root)
        assert 0 < store.unsynced <= len(files) + len(dirs)
        await store.sync()
        assert store.unsynced == 0
        assert sum(synced(log, mark).values()) <= (len(files) + len(dirs)) * fsync


# -- beyond the brief: what a predecessor left unsynced, and a failing fsync ---------------
async def test_metadata_left_unsynced_by_a_stopped_process_is_synced(root: Path,
                                                                     log: Log) -> None:
    """A daemon that stopped after writing but before its sync left group and array
    metadata that a replay does not rewrite (the arrays already have their length); the
    replaying store syncs it anyway, since its commit relies on it.

    Checked to fail without the fix: without the ``note(...zarr.json)`` calls when an
    array is first opened, the arrays' zarr.json files are missing from the log.
    """
    start, desc, events = run_docs(5)
    await write(ZarrEventStore(root), "t", start, desc, events)  # no sync: "crashed"
    assert synced(log) == Counter()
    store = ZarrEventStore(root)
    await write(store, "t", start, desc, events)  # the replay after a restart
    await store.sync()
    files, dirs = on_disk(root)
    metadata = {f for f in files if f.endswith("zarr.json")}
    assert metadata <= set(synced(log)), sorted(metadata - set(synced(log)))
    assert dirs <= set(synced(log))


async def test_failed_fsync_is_a_storage_error_and_is_retried(
        root: Path, log: Log, monkeypatch: pytest.MonkeyPatch) -> None:
    """An fsync that fails surfaces as StorageError (so the batch is not committed), and
    what it did not sync is kept for the next sync rather than forgotten.

    Checked to fail without the fix: without the translation the OSError (in an
    exception group) escapes; without ``give_back`` the second sync syncs nothing.
    """
    store = ZarrEventStore(root)
    start, desc, events = run_docs(3)
    await write(store, "t", start, desc, events)
    pending = store.unsynced
    recording = os.fsync

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(StorageError, match=r"syncing Zarr files .* failed"):
        await store.sync()
    assert store.unsynced == pending
    monkeypatch.setattr(os, "fsync", recording)
    await store.sync()
    files, dirs = on_disk(root)
    assert files | dirs <= set(synced(log))


# -- SyncingLocalStore is still a LocalStore: zarr's own store conformance suite -----------
class TestSyncingLocalStoreConformance(StoreTests[SyncingLocalStore, cpu.Buffer]):
    store_cls = SyncingLocalStore
    buffer_cls = cpu.Buffer

    async def get(self, store: SyncingLocalStore, key: str) -> cpu.Buffer:
        return self.buffer_cls.from_bytes((store.root / key).read_bytes())

    async def set(self, store: SyncingLocalStore, key: str, value: Any) -> None:
        path = store.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(value.to_bytes())

    @pytest.fixture
    def store_kwargs(self, tmp_path: Path) -> Iterator[dict[str, Any]]:
        yield {"root": str(tmp_path)}

    # The suite's own fixtures are async, which pytest refuses for its synchronous tests
    # under anyio's plugin (zarr runs the suite with pytest-asyncio): same stores, opened
    # on zarr's loop instead.
    @pytest.fixture
    def store(self, open_kwargs: dict[str, Any]) -> SyncingLocalStore:
        return zarr_sync(self.store_cls.open(**open_kwargs))

    @pytest.fixture
    def store_not_open(self, store_kwargs: dict[str, Any]) -> SyncingLocalStore:
        return self.store_cls(**store_kwargs)

    def test_store_repr(self, store: SyncingLocalStore) -> None:
        assert str(store) == f"file://{store.root.as_posix()}"

    def test_store_supports_writes(self, store: SyncingLocalStore) -> None:
        assert store.supports_writes

    def test_store_supports_listing(self, store: SyncingLocalStore) -> None:
        assert store.supports_listing


def test_atomic_write_replaces_whole_or_leaves_the_old_file(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """A key is replaced whole (missing directories made), and a write that fails half
    way leaves the previous bytes and no temporary file behind."""
    target = tmp_path / "a" / "b" / "c" / "0"
    atomic_write(str(target), b"old" * 1000)
    assert target.read_bytes() == b"old" * 1000
    atomic_write(str(target), memoryview(np.arange(10, dtype=np.float64)))
    assert target.read_bytes() == np.arange(10, dtype=np.float64).tobytes()

    calls = itertools.count()
    real_write = os.write

    def failing_write(fd: int, data: Any) -> int:
        if next(calls) == 1:  # the second write of the loop: a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, bytes(memoryview(data)[:5]))  # short writes

    monkeypatch.setattr(os, "write", failing_write)
    with pytest.raises(OSError, match="No space"):
        atomic_write(str(target), b"new" * 1000)
    monkeypatch.undo()
    assert target.read_bytes() == np.arange(10, dtype=np.float64).tobytes()
    assert sorted(p.name for p in target.parent.iterdir()) == ["0"]
    with pytest.raises(NotADirectoryError):  # a file where a directory should be
        atomic_write(str(target / "x"), b"data")
    assert sorted(p.name for p in target.parent.iterdir()) == ["0"]
