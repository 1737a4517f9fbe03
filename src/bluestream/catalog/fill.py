"""Resolving external references (datum ids, stream datums) into arrays via handlers.

Datum and resource documents are fetched in bulk (one query per kind, whatever the
number of events); handler instances are made once per resource per read, and files are
read in worker threads so the event loop keeps serving other reads.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
from numpy.typing import NDArray

from bluestream import handlers as handler_registry
from bluestream.catalog._tasks import task_group
from bluestream.errors import NotFound, StorageError
from bluestream.handlers import HandlerClass
from bluestream.storage.base import MetadataStore

__all__ = ["DatumResolver", "StreamSlice", "stack_values"]

Array = NDArray[Any]
Doc = dict[str, Any]
#: Handler calls (file reads) running at once per catalog.
_LOADERS = 8


@dataclass(frozen=True)
class StreamSlice:
    """Rows ``seq_nums [s0, s1)`` of a stream key come from ``indices [i0, i1)``."""

    stream_datum: str
    stream_resource: str
    seq_start: int
    seq_stop: int
    index_start: int
    index_stop: int


class DatumResolver:
    """Fetches datums/resources for references and loads them with handlers."""

    def __init__(self, store: MetadataStore, handlers: Mapping[str, HandlerClass] | None,
                 root_map: Mapping[str, str] | None) -> None:
        self.store = store
        self.handlers = dict(handlers or {})
        self.root_map = dict(root_map or {})
        self._limiter: anyio.CapacityLimiter | None = None

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        if self._limiter is None:  # made on the catalog's own loop, on first use
            self._limiter = anyio.CapacityLimiter(_LOADERS)
        return self._limiter

    # -- resource / datum ---------------------------------------------------------------
    async def documents(self, datum_ids: Sequence[str]) -> tuple[dict[str, Doc], dict[str, Doc]]:
        """(datum by id, resource by uid) for ``datum_ids``; NotFound for missing ones."""
        unique = list(dict.fromkeys(d for d in datum_ids if d))
        datums = {d["datum_id"]: d for d in await self.store.find("datum", keys=unique)} \
            if unique else {}
        missing = [d for d in unique if d not in datums]
        if missing:
            raise NotFound(f"datum {missing[0]!r} (and {len(missing) - 1} more) referenced by "
                           f"events is not stored in tenant {self.store.tenant!r}")
        res_uids = list(dict.fromkeys(str(d["resource"]) for d in datums.values()))
        resources = {r["uid"]: r for r in await self.store.find("resource", keys=res_uids)} \
            if res_uids else {}
        lost = [r for r in res_uids if r not in resources]
        if lost:
            raise NotFound(f"resource {lost[0]!r} referenced by datums is not stored in "
                           f"tenant {self.store.tenant!r}")
        return datums, resources

    def handler_class(self, spec: str, *, what: str = "resource spec") -> HandlerClass:
        return handler_registry.lookup(spec, self.handlers, what=what)

    def resource_path(self, resource: Mapping[str, Any]) -> str:
        root = str(resource.get("root") or "")
        root = self.root_map.get(root, root)
        path = str(resource.get("resource_path", ""))
        return os.path.join(root, path) if root else path

    async def fill(self, datum_ids: Array, data_key: Mapping[str, Any]) -> Array:
        """The values that the references ``datum_ids`` point at, stacked per event."""
        ids = [str(d) for d in datum_ids.tolist()]
        datums, resources = await self.documents(ids)
        plans = self.plans(ids, datums, resources)
        loaded: dict[str, Any] = {}

        async def run(plan: LoadPlan) -> None:
            loaded.update(await anyio.to_thread.run_sync(plan.load, limiter=self.limiter))

        async with task_group() as tg:
            for plan in plans:
                tg.start_soon(run, plan)
        return stack_values([loaded[i] for i in ids], data_key)

    def plans(self, ids: Sequence[str], datums: Mapping[str, Doc],
              resources: Mapping[str, Doc]) -> list[LoadPlan]:
        """One :class:`LoadPlan` per resource, covering the distinct ``ids``."""
        by_resource: dict[str, list[str]] = defaultdict(list)
        for datum_id in dict.fromkeys(ids):
            by_resource[str(datums[datum_id]["resource"])].append(datum_id)
        out = []
        for res_uid, members in by_resource.items():
            resource = resources[res_uid]
            cls = self.handler_class(str(resource.get("spec")))
            out.append(LoadPlan(cls, self.resource_path(resource),
                                dict(resource.get("resource_kwargs") or {}),
                                [(d, dict(datums[d].get("datum_kwargs") or {})) for d in members],
                                str(resource.get("spec"))))
        return out

    # -- stream_resource / stream_datum ----------------------------------------------------
    async def stream_slices(self, run_start: str, descriptor_uid: str) -> tuple[
            dict[str, list[StreamSlice]], dict[str, Doc]]:
        """Stream datums of one descriptor by data key, and the stream resources."""
        resources = {r["uid"]: r for r in await self.store.find("stream_resource",
                                                                 run_start=run_start)}
        by_key: dict[str, list[StreamSlice]] = defaultdict(list)
        found: list[Doc] = []

        async def one(uid: str) -> None:
            found.extend(await self.store.find("stream_datum", resource=uid))

        async with task_group() as tg:
            for uid in resources:
                tg.start_soon(one, uid)
        for sd in found:
            if sd.get("descriptor") != descriptor_uid:
                continue
            res = resources[str(sd["stream_resource"])]
            key = str(res.get("data_key") or sd.get("data_key") or "")
            seq, idx = sd["seq_nums"], sd["indices"]
            by_key[key].append(StreamSlice(str(sd["uid"]), str(res["uid"]), int(seq["start"]),
                                           int(seq["stop"]), int(idx["start"]),
                                           int(idx["stop"])))
        for slices in by_key.values():
            slices.sort(key=lambda s: (s.seq_start, s.stream_datum))
        return dict(by_key), resources

    async def fill_stream(self, slices: Sequence[StreamSlice], resources: Mapping[str, Doc],
                          data_key: Mapping[str, Any]) -> Array:
        """Values of ``slices`` (in order), stacked per event."""
        plans: dict[str, StreamLoadPlan] = {}
        for s in slices:
            if s.stream_resource not in plans:
                res = resources[s.stream_resource]
                cls = self.handler_class(str(res.get("mimetype")),
                                         what="stream resource mimetype")
                plans[s.stream_resource] = StreamLoadPlan(
                    cls, self._stream_uri(str(res.get("uri", ""))),
                    dict(res.get("parameters") or {}), str(res.get("mimetype")))
        parts: dict[int, Array] = {}

        async def run(n: int, s: StreamSlice) -> None:
            plan = plans[s.stream_resource]
            parts[n] = await anyio.to_thread.run_sync(plan.load, s.index_start, s.index_stop,
                                                      limiter=self.limiter)

        async with task_group() as tg:
            for n, s in enumerate(slices):
                tg.start_soon(run, n, s)
        frames: list[Any] = []
        for n, s in enumerate(slices):
            block = parts[n]
            want = s.seq_stop - s.seq_start
            if len(block) != want:
                raise StorageError(f"stream datum {s.stream_datum!r} covers {want} events but "
                                   f"its handler returned {len(block)} frames")
            frames.extend(block)
        return stack_values(frames, data_key)

    def _stream_uri(self, uri: str) -> str:
        for old, new in self.root_map.items():
            for prefix in (old, "file://localhost" + old, "file://" + old):
                if uri.startswith(prefix):
                    return new + uri[len(prefix):]
        return uri


@dataclass
class LoadPlan:
    """What one resource contributes to a read; picklable, run in a worker thread."""

    cls: HandlerClass
    path: str
    resource_kwargs: dict[str, Any]
    datums: list[tuple[str, dict[str, Any]]]
    spec: str

    def load(self) -> dict[str, Any]:
        try:
            handler = self.cls(self.path, **self.resource_kwargs)
        except Exception as exc:
            raise StorageError(f"the {self.spec} handler could not open {self.path}: "
                               f"{exc}") from exc
        try:
            out = {}
            for datum_id, kwargs in self.datums:
                try:
                    out[datum_id] = handler(**kwargs)
                except Exception as exc:
                    raise StorageError(f"the {self.spec} handler could not load datum "
                                       f"{datum_id!r} ({kwargs}) from {self.path}: "
                                       f"{exc}") from exc
            return out
        finally:
            close = getattr(handler, "close", None)
            if callable(close):
                close()


@dataclass
class StreamLoadPlan:
    cls: HandlerClass
    uri: str
    parameters: dict[str, Any]
    mimetype: str

    def load(self, start: int, stop: int) -> Array:
        try:
            handler = self.cls(self.uri, **self.parameters)
        except Exception as exc:
            raise StorageError(f"the {self.mimetype} handler could not open {self.uri}: "
                               f"{exc}") from exc
        try:
            return np.asarray(handler(start, stop))
        except Exception as exc:
            raise StorageError(f"the {self.mimetype} handler could not read indices "
                               f"{start}..{stop - 1} from {self.uri}: {exc}") from exc
        finally:
            close = getattr(handler, "close", None)
            if callable(close):
                close()


def expected_shape(data_key: Mapping[str, Any]) -> tuple[int, ...] | None:
    shape = data_key.get("shape")
    if not isinstance(shape, list | tuple):
        return None
    if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
        return None
    return tuple(int(d) for d in shape)


def stack_values(values: Sequence[Any], data_key: Mapping[str, Any]) -> Array:
    """One array of per-event values: (n, *shape) when they agree, else an object array.

    A handler may return a leading length-1 axis (frames per point) that the
    descriptor's shape leaves out; values with the descriptor's number of elements are
    reshaped to its shape.
    """
    want = expected_shape(data_key)
    arrays = [np.asarray(v) for v in values]
    if want is not None:
        size = math.prod(want)
        arrays = [a.reshape(want) if a.shape != want and a.size == size else a for a in arrays]
    if not arrays:
        dtype = _dtype_of(data_key)
        return np.zeros((0, *(want or ())), dtype=dtype)
    shapes = {a.shape for a in arrays}
    if len(shapes) == 1 and all(a.dtype.kind != "O" for a in arrays):
        return np.stack(arrays)
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


def _dtype_of(data_key: Mapping[str, Any]) -> np.dtype[Any]:
    raw = data_key.get("dtype_numpy")
    if isinstance(raw, str):
        try:
            return np.dtype(raw)
        except TypeError:
            pass
    return np.dtype({"integer": np.int64, "boolean": np.bool_, "string": object}.get(
        str(data_key.get("dtype")), np.float64))
