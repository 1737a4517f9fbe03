"""What every catalog object of one opened catalog shares: the store, the arrays, the
handlers. One per ``open_catalog`` call; sub-catalogs from ``search`` reuse it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio

from bluestream.catalog.arrays import ArrayReader
from bluestream.catalog.fill import DatumResolver
from bluestream.errors import BluestreamError, StorageUnavailable
from bluestream.handlers import HandlerClass
from bluestream.limits import Limits
from bluestream.schemas.normalise import FieldSpec, field_specs
from bluestream.storage.base import MetadataStore
from bluestream.storage.factory import mask_uri

__all__ = ["CatalogContext", "specs_of"]

T = TypeVar("T")

#: Reading applies no size limits: what was stored was already checked when written.
_NO_LIMITS = Limits(max_message_bytes=2**62, max_shape_elements=2**62, max_seq_num=2**62,
                    max_page_events=2**62, max_data_keys=2**62)


def specs_of(descriptor: Mapping[str, Any]) -> dict[str, FieldSpec]:
    """How each data key of ``descriptor`` is stored (the writer's own rules)."""
    return field_specs(descriptor, _NO_LIMITS)


def _driver_errors() -> tuple[type[BaseException], ...]:
    import sqlite3

    from pymongo.errors import PyMongoError

    return (OSError, sqlite3.Error, PyMongoError)


@dataclass
class CatalogContext:
    tenant: str
    store: MetadataStore
    zarr_root: Path
    handlers: dict[str, HandlerClass] = field(default_factory=dict)
    root_map: dict[str, str] = field(default_factory=dict)
    #: Seconds allowed for one metadata call before StorageUnavailable.
    timeout: float = 30.0
    poll_interval: float = 0.2
    arrays: ArrayReader = field(init=False)
    resolver: DatumResolver = field(init=False)
    _opened: bool = field(default=False, init=False)
    _open_lock: anyio.Lock | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.arrays = ArrayReader(self.zarr_root)
        self.resolver = DatumResolver(self.store, self.handlers, self.root_map)

    @property
    def where(self) -> str:
        return f"{mask_uri(self.store.uri)} (tenant {self.tenant!r})"

    async def ensure_open(self) -> None:
        if self._opened:
            return
        if self._open_lock is None:
            self._open_lock = anyio.Lock()
        async with self._open_lock:
            if self._opened:
                return
            await self.call("connect", self.store.open)
            await self.call("ping", self.store.ping)
            self._opened = True

    async def call(self, what: str, fn: Callable[..., Awaitable[T]], *args: Any,
                   **kwargs: Any) -> T:
        """``await fn(...)`` with a deadline; foreign errors become StorageUnavailable."""
        try:
            with anyio.fail_after(self.timeout):
                return await fn(*args, **kwargs)
        except TimeoutError:
            raise StorageUnavailable(f"metadata store {self.where} did not answer within "
                                     f"{self.timeout:g} s ({what})") from None
        except BluestreamError:
            raise
        except _driver_errors() as exc:  # not translated by the store itself
            raise StorageUnavailable(f"metadata store {self.where} failed ({what}): "
                                     f"{type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        """Close the store (also after a failed open: it may hold a client)."""
        self._opened = False
        await self.store.close()
