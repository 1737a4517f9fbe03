"""Active health checks of what the daemon depends on: metadata store and Zarr root.

The consumer loop only notices an outage when it has something to write; an idle
daemon whose MongoDB went away would still look ready. So the daemon also checks on a
timer, each check under its own timeout, and readiness (``/readyz``, ``READY=1``,
``STATUS=``) is the conjunction of what the loop saw and what the checks saw. Kafka is
checked by :meth:`bluestream.consumers.kafka.KafkaSource.probe`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
from zarr.abc.store import Store

from bluestream.errors import BluestreamError, StorageUnavailable
from bluestream.log import get_logger
from bluestream.storage.registry import StoreRegistry
from bluestream.storage.zarr_root import ZarrRoot, probe_root

__all__ = ["Check", "HealthChecks", "probe_directory"]

log = get_logger("bluestream.health")


@dataclass
class Check:
    """The outcome of the latest run of one check; ``ok is None`` until it first ran."""

    ok: bool | None = None
    error: str = "not checked yet"
    checked_at: float = 0.0

    def record(self, name: str, error: str | None) -> None:
        was = self.ok
        self.ok, self.error, self.checked_at = error is None, error or "", time.time()
        if error is not None and was is not False:
            log.warning("health check failed", check=name, error=error)
        elif error is None and was is False:
            log.info("health check passes again", check=name)


class HealthChecks:
    """Runs the store checks; ``tenants`` says which tenants' stores to ping."""

    def __init__(self, registry: StoreRegistry, zarr_root: ZarrRoot, *,
                 tenants: Callable[[], list[str]], timeout_s: float) -> None:
        self.registry = registry
        self.zarr_root = zarr_root
        self.tenants = tenants
        self.timeout_s = timeout_s
        self.metadata = Check()
        self.zarr = Check()
        self._s3: Store | None = None  # the object store probed, made once

    @property
    def checks(self) -> dict[str, Check]:
        return {"metadata": self.metadata, "zarr": self.zarr}

    async def run_once(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._timed, "metadata", self.metadata, self._ping_metadata)
            tg.start_soon(self._timed, "zarr", self.zarr, self._probe_zarr)

    async def _timed(self, name: str, check: Check, fn: Callable[[], Awaitable[None]]) -> None:
        try:
            with anyio.fail_after(self.timeout_s):
                await fn()
        except TimeoutError:
            check.record(name, f"no answer within {self.timeout_s:g} s")
        except (BluestreamError, OSError) as exc:
            check.record(name, str(exc) or repr(exc))
        else:
            check.record(name, None)

    async def _ping_metadata(self) -> None:
        """Ping through the stores we use (opening a tenant's store is needed anyway);
        with none known yet, the registry's own ping."""
        tenants = self.tenants()
        if not tenants:
            await self.registry.ping()
            return
        for tenant in tenants:
            store = await self.registry(tenant)
            await store.ping()

    async def _probe_zarr(self) -> None:
        root = self.zarr_root
        if root.local is not None:
            await anyio.to_thread.run_sync(probe_directory, root.local, abandon_on_cancel=True)
            return
        if self._s3 is None:
            self._s3 = root.object_store()
        await anyio.to_thread.run_sync(probe_root, root, self._s3, abandon_on_cancel=True)


def probe_directory(root: Path) -> None:
    """Create the directory if needed and write, sync and remove one byte in it.

    Permission bits do not stop root, and a full disk still lets ``access()`` succeed,
    so only a real write tells whether the Zarr root takes data.
    """
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".bluestream-probe-{os.getpid()}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0")
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as exc:
        raise StorageUnavailable(f"Zarr root {root} is not writable: "
                                 f"{exc.strerror or exc}") from exc
