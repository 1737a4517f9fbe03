"""A private event loop in a daemon thread, for the synchronous catalog.

The synchronous API runs the asynchronous one on this loop, so it works from plain
scripts and from Jupyter (where the calling thread already runs a loop). The thread is a
daemon: a catalog that is never closed does not keep the interpreter alive.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import anyio
from anyio.from_thread import BlockingPortal

__all__ = ["LoopThread"]

T = TypeVar("T")


class LoopThread:
    """Owns one asyncio loop running in a daemon thread, reached through a portal."""

    def __init__(self, name: str = "bluestream-catalog") -> None:
        self._ready = threading.Event()
        self._portal: BlockingPortal | None = None
        self._stop: anyio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        try:
            anyio.run(self._serve, backend="asyncio")
        except BaseException as exc:  # pragma: no cover - reported to the constructor
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        async with BlockingPortal() as portal:
            self._stop = anyio.Event()
            self._portal = portal
            self._ready.set()
            await self._stop.wait()
            await portal.stop(cancel_remaining=True)

    @property
    def closed(self) -> bool:
        return self._portal is None

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        portal = self._portal
        if portal is None:
            raise RuntimeError("this catalog is closed")
        return portal.call(fn, *args)

    def iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        """Drive an async iterator from this (synchronous) thread."""
        sentinel = object()

        async def step() -> Any:
            try:
                return await agen.__anext__()
            except StopAsyncIteration:
                return sentinel

        try:
            while True:
                item = self.call(step)
                if item is sentinel:
                    return
                yield item
        finally:
            aclose = getattr(agen, "aclose", None)
            if aclose is not None and not self.closed:
                with contextlib.suppress(RuntimeError):  # e.g. collected on the loop thread
                    self.call(aclose)

    def close(self) -> None:
        portal, stop = self._portal, self._stop
        if portal is None or stop is None:
            return
        self._portal = None
        with contextlib.suppress(RuntimeError):  # the loop already ended
            portal.call(_set, stop)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)


async def _set(event: anyio.Event) -> None:
    event.set()
