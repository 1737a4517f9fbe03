"""Handlers that load externally stored data (``resource``/``datum`` and
``stream_resource``/``stream_datum`` documents) when the catalog fills a stream.

Two kinds of handler live in one registry, keyed by a name:

- *datum handlers*, keyed by a resource's ``spec`` (``"NPY_SEQ"``, ``"AD_HDF5"``...),
  follow the convention of databroker and :class:`event_model.Filler`, so existing
  handler classes can be registered unchanged: ``cls(full_path, **resource_kwargs)``
  returns a callable, called as ``handler(**datum_kwargs)`` once per datum.
  ``full_path`` is the resource's ``root`` (after ``root_map``) joined with its
  ``resource_path``.
- *stream handlers*, keyed by a stream resource's ``mimetype``
  (``"application/x-hdf5"``): ``cls(uri, **parameters)`` returns a callable called as
  ``handler(start, stop)`` which returns the frames with indices ``[start, stop)``
  stacked along a new first axis.

Users extend the registry with :func:`register`. A lookup that finds nothing raises
:class:`HandlerNotFound`, naming the spec and what is registered.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

import numpy as np

from bluestream.errors import BluestreamError

__all__ = [
    "AreaDetectorHDF5Handler",
    "HDF5StreamHandler",
    "HandlerNotFound",
    "NpyHandler",
    "NumpySeqHandler",
    "lookup",
    "register",
    "registered",
    "unregister",
    "uri_to_path",
]


class Handler(Protocol):
    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


HandlerClass = Callable[..., Handler]


class HandlerNotFound(BluestreamError, KeyError):
    """No handler is registered for a resource's spec (or a stream resource's mimetype)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


_lock = threading.Lock()
_registry: dict[str, HandlerClass] = {}


def register(spec: str, cls: HandlerClass, *, overwrite: bool = True) -> None:
    """Use ``cls`` for resources whose ``spec`` (or stream resources whose ``mimetype``)
    is ``spec``. Registration is process-wide; catalogs can also be given their own
    mapping (``open_catalog(..., handlers={...})``) which takes precedence."""
    if not isinstance(spec, str) or not spec:
        raise ValueError("spec must be a non-empty string")
    if not callable(cls):
        raise TypeError(f"handler for {spec!r} must be callable, got {type(cls).__name__}")
    with _lock:
        if not overwrite and spec in _registry and _registry[spec] is not cls:
            raise ValueError(f"a handler for spec {spec!r} is already registered: "
                             f"{_registry[spec]!r}")
        _registry[spec] = cls


def unregister(spec: str) -> None:
    with _lock:
        _registry.pop(spec, None)


def registered() -> dict[str, HandlerClass]:
    """A copy of the process-wide registry."""
    with _lock:
        return dict(_registry)


def lookup(spec: str, extra: dict[str, HandlerClass] | None = None, *,
           what: str = "resource spec") -> HandlerClass:
    """The handler class for ``spec``: ``extra`` first, then the registry."""
    if extra and spec in extra:
        return extra[spec]
    with _lock:
        cls = _registry.get(spec)
        known = sorted(set(_registry) | set(extra or ()))
    if cls is None:
        raise HandlerNotFound(
            f"no handler is registered for {what} {spec!r}; register one with "
            f"bluestream.handlers.register({spec!r}, HandlerClass) or read with "
            f"fill=False (registered: {', '.join(known) or 'none'})")
    return cls


def uri_to_path(uri: str) -> str:
    """The local path of a ``file://`` URI (or a plain path)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return unquote(parsed.path) if parsed.scheme else uri
    raise ValueError(f"cannot read {uri!r}: only file:// URIs are supported")


# -- common handlers ---------------------------------------------------------------------

class NumpySeqHandler:
    """``NPY_SEQ`` (what ``ophyd.sim.SynSignalWithRegistry`` writes): one ``.npy`` file
    per datum, named ``<root>/<resource_path>_<index>.npy``."""

    specs = frozenset({"NPY_SEQ"})

    def __init__(self, filename: str, root: str = "") -> None:
        self._name = os.path.join(root, filename)

    def __call__(self, index: int) -> np.ndarray:
        return np.asarray(np.load(f"{self._name}_{index}.npy", allow_pickle=False))

    def get_file_list(self, datum_kwarg_gen: Any) -> list[str]:
        return [f"{self._name}_{kw['index']}.npy" for kw in datum_kwarg_gen]


class NpyHandler:
    """``npy``: the whole resource is one ``.npy`` file; datums take no arguments."""

    specs = frozenset({"npy", "NPY"})

    def __init__(self, filename: str) -> None:
        self._filename = filename

    def __call__(self) -> np.ndarray:
        return np.asarray(np.load(self._filename, allow_pickle=False))

    def get_file_list(self, datum_kwarg_gen: Any) -> list[str]:
        return [self._filename]


class _HDF5File:
    """Opens the file on first use; closed explicitly (or when garbage-collected)."""

    def __init__(self, filename: str, swmr: bool = False) -> None:
        self._filename = filename
        self._swmr = swmr
        self._file: Any = None

    def dataset(self, key: str) -> Any:
        if self._file is None:
            import h5py

            self._file = h5py.File(self._filename, "r", swmr=self._swmr)
        try:
            return self._file[key]
        except KeyError as exc:
            raise KeyError(f"HDF5 file {self._filename} has no dataset {key!r}") from exc

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class AreaDetectorHDF5Handler(_HDF5File):
    """``AD_HDF5`` (area-detector HDF5 plugin): frames in ``/entry/data/data``; datum
    ``point_number`` selects ``frame_per_point`` frames."""

    specs = frozenset({"AD_HDF5", "AD_HDF5_SWMR"})
    key = "/entry/data/data"

    def __init__(self, filename: str, frame_per_point: int = 1, **kwargs: Any) -> None:
        super().__init__(filename, swmr=bool(kwargs.get("swmr", False)))
        self._fpp = int(frame_per_point)

    def __call__(self, point_number: int) -> np.ndarray:
        ds = self.dataset(self.key)
        start = int(point_number) * self._fpp
        stop = start + self._fpp
        if stop > ds.shape[0]:
            raise IndexError(f"{self._filename}{self.key} has {ds.shape[0]} frames; "
                             f"point {point_number} needs frames {start}..{stop - 1}")
        return np.asarray(ds[start:stop])

    def get_file_list(self, datum_kwarg_gen: Any) -> list[str]:
        return [self._filename]


class HDF5StreamHandler(_HDF5File):
    """``application/x-hdf5`` stream resources (ophyd-async): ``parameters["dataset"]``
    holds the frames; stream datum indices ``[start, stop)`` select them (times
    ``multiplier`` frames per index when the producer sets one)."""

    specs = frozenset({"application/x-hdf5"})

    def __init__(self, uri: str, *, dataset: str, multiplier: int = 1, swmr: bool = False,
                 **_: Any) -> None:
        super().__init__(uri_to_path(uri), swmr=swmr)
        self._key = dataset
        self._multiplier = max(1, int(multiplier))

    def __call__(self, start: int, stop: int) -> np.ndarray:
        ds = self.dataset(self._key)
        m = self._multiplier
        if stop * m > ds.shape[0]:
            raise IndexError(f"{self._filename}{self._key} has {ds.shape[0]} frames; "
                             f"indices {start}..{stop - 1} need {stop * m}")
        out = np.asarray(ds[start * m:stop * m])
        if m > 1:
            out = out.reshape((stop - start, m, *out.shape[1:]))
        return out


def _register_defaults() -> None:
    for cls in (NumpySeqHandler, NpyHandler, AreaDetectorHDF5Handler, HDF5StreamHandler):
        for spec in sorted(cls.specs):
            register(spec, cls)


_register_defaults()
