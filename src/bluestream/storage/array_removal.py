"""Deleting the event arrays of a run (the middle phase of a removal).

A run's arrays are everything under ``<root>/<tenant>/<uid[:2]>/<uid>/`` (one group per
descriptor, :mod:`bluestream.layout`). On a local root the directory is removed; on an
object store every object under the prefix is listed and deleted one by one (plain
DELETEs: some S3-compatible servers refuse the multi-object delete). Idempotent: a
rerun after a crash deletes what is left, and a run without arrays (a short run keeps
its rows in the metadata store) deletes nothing.
"""

from __future__ import annotations

import contextlib
import shutil

import anyio.to_thread

from bluestream.errors import StorageError, StorageUnavailable
from bluestream.layout import safe_component
from bluestream.storage.zarr_root import IO_ERRORS, ZarrRoot, brief

__all__ = ["delete_run_arrays", "run_arrays_exist", "run_prefix"]


def run_prefix(tenant: str, run_uid: str) -> str:
    """The key prefix (relative to the root) of a run's arrays."""
    run = safe_component(run_uid, "run start uid")
    return f"{safe_component(tenant, 'tenant')}/{run[:2]}/{run}"


async def delete_run_arrays(root: ZarrRoot, tenant: str, run_uid: str) -> int:
    """Delete a run's arrays; the number of files / objects deleted."""
    prefix = run_prefix(tenant, run_uid)
    try:
        if root.local is not None:
            return await anyio.to_thread.run_sync(_delete_local, root, prefix)
        return await _delete_objects(root, prefix)
    except IO_ERRORS as exc:
        if root.local is not None and not root.local.is_dir():
            raise StorageUnavailable(f"Zarr root {root} does not exist (or is not "
                                     f"mounted): {exc}") from exc
        raise StorageError(f"deleting the arrays {root.join(prefix)} failed: "
                           f"{brief(exc)}") from exc


async def run_arrays_exist(root: ZarrRoot, tenant: str, run_uid: str) -> bool:
    """Whether anything is stored under the run's prefix (one stat, or one listing)."""
    prefix = run_prefix(tenant, run_uid)
    try:
        if root.local is not None:
            return await anyio.Path(root.local / prefix).is_dir()
        async for _ in root.object_store().list_prefix(prefix + "/"):
            return True
        return False
    except IO_ERRORS as exc:
        raise StorageError(f"listing the arrays {root.join(prefix)} failed: "
                           f"{brief(exc)}") from exc


def _delete_local(root: ZarrRoot, prefix: str) -> int:
    assert root.local is not None
    if not root.local.is_dir():
        raise FileNotFoundError(f"Zarr root {root.local} is not a directory")
    path = root.local / prefix
    if not path.exists():
        return 0
    count = sum(1 for p in path.rglob("*") if p.is_file())
    shutil.rmtree(path)
    parent = path.parent  # <tenant>/<uid[:2]>: removed when it is left empty
    with contextlib.suppress(OSError):  # not empty: other runs share the prefix
        parent.rmdir()
    return count


async def _delete_objects(root: ZarrRoot, prefix: str) -> int:
    store = root.object_store()
    keys = [k async for k in store.list_prefix(prefix + "/")]
    for key in keys:
        await store.delete(key)
    return len(keys)
