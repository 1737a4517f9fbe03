"""The local-disk store of the Zarr arrays, and what makes its writes durable.

DESIGN I1: "durable" before a commit means written files and their directories synced,
once per batch. zarr's ``LocalStore`` writes each key to a temporary file and renames it
into place, without fsync: after a power loss a committed offset could cover chunks that
were only in the page cache. :class:`SyncingLocalStore` records the keys it writes;
:func:`sync_written` fsyncs them, then every directory from their parents up to the root
(a rename or a new directory is only durable once its parent is synced). A directory
whose own entry has been synced once is remembered as durable: later batches sync only the
directories they renamed files into, not the chain above them, unless a write finds a
directory missing (created anew, e.g. after a removal) and forgets it again.

Writers of one descriptor serialise through :func:`descriptor_lock`: a chunk write is a
read-modify-write of the whole chunk, so two processes writing different rows of one
chunk at once would otherwise lose one of the pages.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import os
import secrets
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, Self

import anyio
from zarr.core.buffer import Buffer
from zarr.storage import LocalStore

from bluestream.errors import StorageError, first_error

__all__ = ["SyncingLocalStore", "descriptor_lock", "lock_stripe", "metadata_keys", "stripe_lock",
           "sync_written"]

#: Worker threads that fsync one batch's files (then directories) concurrently: the
#: file system commits concurrent fsyncs together (about half the time of one thread
#: for a scalar batch's ~50 files and ~50 directories here).
_SYNC_THREADS = 8
_SYNC_POOL = ThreadPoolExecutor(max_workers=_SYNC_THREADS, thread_name_prefix="bluestream-fsync")
#: Lock files, shared by descriptors by hash: a fixed number of files, never one per
#: run (an inode each), kept outside every Zarr group.
_LOCK_STRIPES = 64
_LOCK_DIR = ".bluestream-locks"


class SyncingLocalStore(LocalStore):
    """zarr's ``LocalStore`` that remembers what it changed since the last :meth:`take`.

    It records keys, not open files: zarr writes a temporary file and renames it over
    the key, so the file to sync is the one at the key once the write is done. A key is
    recorded before it is written, so a write that is cancelled half-way is synced all
    the same (a key that does not exist at sync time is skipped).
    """

    def __init__(self, root: Path | str, *, read_only: bool = False) -> None:
        super().__init__(root, read_only=read_only)
        self._root_text = str(self.root)
        self._files: set[str] = set()  # keys written
        self._dirs: set[str] = set()  # keys of directories whose entries were removed
        #: Directories whose entry in their parent is known to be on disk.
        self.durable: set[str] = set()

    def with_read_only(self, read_only: bool = False) -> Self:
        other = super().with_read_only(read_only)
        other._files, other._dirs = self._files, self._dirs  # one record per store
        other.durable = self.durable
        return other

    def _noting(self, key: str) -> None:
        """Record ``key`` as written; a directory it is about to create is forgotten as
        durable (with every missing one above it), so its entry gets synced."""
        self._files.add(key)
        parent = _parent_key(key)
        while parent and parent in self.durable and not os.path.isdir(self.root / parent):
            self.durable.discard(parent)
            parent = _parent_key(parent)

    def note(self, key: str) -> None:
        """Record a key to sync although this store did not write it (metadata written
        by a process that stopped before its sync, and not rewritten by this one)."""
        self._files.add(key)

    def take(self) -> tuple[set[str], set[str]]:
        """The keys written and the directories changed since the last call; forgets
        them (the record is bounded by one batch's writes)."""
        files, dirs = self._files, self._dirs
        self._files, self._dirs = set(), set()
        return files, dirs

    def pending(self) -> int:
        """How many keys the next :meth:`take` returns (not ``__len__``: a store that
        is falsy when empty would surprise zarr's ``store or ...`` idioms)."""
        return len(self._files) + len(self._dirs)

    def give_back(self, files: Iterable[str], dirs: Iterable[str]) -> None:
        """Put back what a failed sync took, so the next sync covers it: metadata that
        exists is not rewritten when the batch is retried."""
        self._files.update(files)
        self._dirs.update(dirs)

    async def _set(self, key: str, value: Buffer, exclusive: bool = False) -> None:
        self._noting(key)
        await super()._set(key, value, exclusive=exclusive)

    def set_sync(self, key: str, value: Buffer) -> None:
        """What zarr's ``LocalStore.set_sync`` does (a temporary file renamed over the
        key: a reader or a crash never sees half a chunk), in fewer system and Python
        calls: no ``mkdir`` unless the directory is missing, no uuid per file. Every
        chunk and ``zarr.json`` of the daemon goes through here."""
        self._ensure_open_sync()
        self._check_writable()
        if not isinstance(value, Buffer):
            raise TypeError(f"set_sync: value must be a Buffer, got {type(value)}")
        self._noting(key)
        atomic_write(os.path.join(self._root_text, key), value.as_buffer_like())

    async def delete(self, key: str) -> None:
        self._dirs.add(_parent_key(key))
        await super().delete(key)

    def delete_sync(self, key: str) -> None:
        self._dirs.add(_parent_key(key))
        super().delete_sync(key)

    async def delete_dir(self, prefix: str) -> None:
        gone = prefix.rstrip("/")
        self._dirs.add(_parent_key(gone))
        self.durable.difference_update(
            [d for d in self.durable if d == gone or d.startswith(gone + "/")])
        await super().delete_dir(prefix)


#: Temporary files of :func:`atomic_write`: unique per process and write (the pid and a
#: random token: a pid repeats across containers and restarts, and a killed process can
#: leave its temporary file behind).
_TMP_IDS = itertools.count()
_TMP_TOKEN = secrets.token_hex(4)
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


def atomic_write(path: str, data: Any) -> None:
    """Write ``data`` (bytes-like) to ``path`` through a temporary file beside it,
    renamed over ``path`` once written (no fsync here: :func:`sync_written` does that per
    batch). Missing directories are created."""
    tmp = f"{path}.{os.getpid()}-{_TMP_TOKEN}-{next(_TMP_IDS)}.partial"
    try:
        fd = os.open(tmp, _WRITE_FLAGS, 0o666)
    except FileNotFoundError:
        parent = os.path.dirname(path)
        try:
            os.mkdir(parent)  # usually only the chunk directory itself is new
        except FileNotFoundError:
            os.makedirs(parent, exist_ok=True)
        except FileExistsError:
            pass  # made meanwhile by another writer
        fd = os.open(tmp, _WRITE_FLAGS, 0o666)
    try:
        try:
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


async def sync_written(store: SyncingLocalStore, root: Path) -> None:
    """Make everything ``store`` wrote since the last call durable: fsync the files, then
    their directories up to the root (each once). On failure the record is kept, so the
    retried batch syncs it again."""
    files, dirs = store.take()
    if not (files or dirs):
        return
    paths = [root / key for key in sorted(files)]
    synced = _dirs_to_sync(files, dirs, store.durable)
    directories = [root / key for key in sorted(synced)]
    try:
        await anyio.to_thread.run_sync(_fsync_blocking, paths, directories)
        store.durable.update(synced)
    except BaseException as exc:
        store.give_back(files, dirs)
        error = _first_os_error(exc)
        if error is None:
            raise
        raise StorageError(f"syncing Zarr files under {root} to disk failed "
                           f"({error}); the batch is not committed") from exc


def lock_stripe(path: str) -> int:
    """Which of the lock files guards the descriptor group ``path``."""
    digest = hashlib.blake2b(path.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") % _LOCK_STRIPES


def descriptor_lock(root: Path, path: str) -> AbstractAsyncContextManager[None]:
    """An exclusive advisory lock for writing the descriptor group ``path`` (one host)."""
    return stripe_lock(root, lock_stripe(path))


@asynccontextmanager
async def stripe_lock(root: Path, stripe: int) -> AsyncIterator[None]:
    """One lock file, exclusively (:func:`lock_stripe`). Taken without a thread hop
    when free; waited for in a worker thread otherwise. A process must not take the same
    stripe twice (flock locks of two open files exclude each other)."""
    lock_dir = root / _LOCK_DIR
    lock = lock_dir / f"{stripe:02d}.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:
        lock_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            await anyio.to_thread.run_sync(fcntl.flock, fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _parent_key(key: str) -> str:
    return key.rpartition("/")[0]


def metadata_keys(node: str) -> list[str]:
    """``zarr.json`` of a node and of every group above it, up to the root."""
    parts = node.split("/")
    return [f"{'/'.join(parts[:i])}/zarr.json".lstrip("/") for i in range(len(parts) + 1)]


def _dirs_to_sync(files: Iterable[str], dirs: Iterable[str],
                  durable: set[str] | frozenset[str] = frozenset()) -> set[str]:
    """The files' parents and the changed directories, and above each of them every
    directory up to the first one in ``durable`` (whose own entry is known to be on
    disk) or the root (``""``). Which directories zarr's ``mkdir`` (or a process that
    stopped before its sync) created is not known here, so a directory not known to be
    durable has its parent synced. Once synced, every directory returned is durable."""
    out: set[str] = set()
    todo = [_parent_key(f) for f in files]
    todo.extend(dirs)
    for key in todo:
        while key not in out:
            out.add(key)
            if not key or key in durable:
                break
            key = _parent_key(key)
    return out


def _fsync_path(path: Path, directory: bool) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if directory else 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return  # a write that failed, or a key deleted since: nothing left to sync
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_some(paths: list[Path], directory: bool) -> None:
    for path in paths:
        _fsync_path(path, directory)


def _fsync_all(paths: list[Path], *, directory: bool) -> None:
    """fsync ``paths`` in up to :data:`_SYNC_THREADS` threads of a pool (blocking)."""
    if not paths:
        return
    n = min(_SYNC_THREADS, len(paths))
    if n == 1:
        _fsync_some(paths, directory)
        return
    for _ in _SYNC_POOL.map(_fsync_some, [paths[i::n] for i in range(n)],
                            [directory] * n):
        pass


def _fsync_blocking(files: list[Path], directories: list[Path]) -> None:
    """The files, then the directories (a rename is durable once its directory is)."""
    _fsync_all(files, directory=False)
    _fsync_all(directories, directory=True)


def _first_os_error(exc: BaseException) -> OSError | None:
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        io, rest = exc.split(OSError)
        if io is not None and rest is None:
            found = first_error(io)
            return found if isinstance(found, OSError) else None
    return None
