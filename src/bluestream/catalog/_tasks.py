"""Task groups whose failures come out as the error that happened, not a group.

anyio task groups raise ``ExceptionGroup`` even when a single task failed; a catalog
user should get the ``StorageError`` / ``KeyError`` / ``NotFound`` itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from anyio.abc import TaskGroup

from bluestream.errors import leaf_errors

__all__ = ["task_group"]


@asynccontextmanager
async def task_group() -> AsyncIterator[TaskGroup]:
    """``anyio.create_task_group()``, re-raising the first real error unwrapped."""
    error: BaseException | None = None
    try:
        async with anyio.create_task_group() as tg:
            yield tg
    except BaseExceptionGroup as group:
        cancelled = anyio.get_cancelled_exc_class()
        leaves = leaf_errors(group)
        real = [e for e in leaves if not isinstance(e, cancelled)]
        if not real:
            raise
        error = next((e for e in real if isinstance(e, Exception)), real[0])
    if error is not None:
        raise error
