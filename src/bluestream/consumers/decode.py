"""Decode Kafka message values into ``(name, doc)`` and encode them back.

The wire format is the bluesky-kafka Publisher's: ``msgpack.packb((name, doc))`` with
numpy values encoded the msgpack-numpy way (a map with ``nd``, ``type``, ``kind``,
``shape``, ``data``). JSON ``[name, doc]`` is accepted too, told apart by its first byte.

We do not use msgpack-numpy's own decode hook: for ``kind == "O"`` it calls
``pickle.loads`` on the payload, which would let anyone who can write to the topic run
code in the daemon. Object arrays are refused (dead-lettered) instead. We also call
msgpack's C functions directly, because ``msgpack_numpy.patch()`` (which importing
bluesky_kafka runs) replaces ``msgpack.unpackb`` with a version that chains that hook.
"""

from __future__ import annotations

import json
import math
import threading
from typing import Any

import numpy as np

from bluestream.documents import DOCUMENT_NAMES
from bluestream.errors import DecodeError, LimitExceeded, Reason

try:  # the C extension; fallback only where it was not built
    from msgpack._cmsgpack import Packer as _Packer
    from msgpack._cmsgpack import unpackb as _unpackb
except ImportError:  # pragma: no cover
    from msgpack.fallback import Packer as _Packer
    from msgpack.fallback import unpackb as _unpackb

__all__ = ["decode_document", "decode_message", "encode_message"]

_NAMES = frozenset(DOCUMENT_NAMES)

_ND = b"nd"
_MAX_NDIM = 32
#: How far the dimensions of an array may reach beyond its elements (zero-length axes).
_MAX_EMPTY_SPAN = 1024


class _UnsafeArray(Exception):
    pass


class _Made(threading.local):
    numpy = 0  # numpy values built by this thread's decodes


_MADE = _Made()


def _ndarray_hook(obj: dict[Any, Any]) -> Any:
    """msgpack object hook: rebuild numpy values encoded by msgpack-numpy, safely; every
    other map must have string keys (JSON's rule: the schemas and stores assume it)."""
    if _ND not in obj:
        if b"complex" in obj and b"data" in obj and len(obj) == 2:
            return complex(obj[b"data"].decode() if isinstance(obj[b"data"], bytes)
                           else obj[b"data"])
        for key in obj:
            if type(key) is not str:
                raise DecodeError(f"a map has a key that is not a string: {key!r:.80}")
        return obj
    _MADE.numpy += 1
    try:
        data = obj[b"data"]
        descr = obj[b"type"]
        if not isinstance(data, bytes):  # np.ndarray(buffer=None) is uninitialised memory
            raise _UnsafeArray("msgpack-numpy value without data bytes "
                               f"({type(data).__name__})")
        if obj[_ND] is True:
            kind = obj.get(b"kind", b"")
            if kind == b"O":
                raise _UnsafeArray("object (pickled) arrays are not accepted")
            if kind == b"V":
                descr = [tuple(t.decode() if isinstance(t, bytes) else t for t in d)
                         for d in descr]
            dtype = np.dtype(descr)
            if dtype.hasobject:
                raise _UnsafeArray("object dtypes are not accepted")
            shape = tuple(int(s) for s in obj[b"shape"])
            if len(shape) > _MAX_NDIM or math.prod(max(s, 1) for s in shape) > max(
                    len(data) // max(dtype.itemsize, 1), 1) * _MAX_EMPTY_SPAN:
                # np.ndarray accepts [2**40, 0] with no data: its tolist() never ends.
                raise _UnsafeArray(f"shape {list(shape)[:8]} does not fit {len(data)} bytes")
            # np.ndarray checks that the buffer is big enough for the shape, so a
            # hostile shape cannot make us allocate: it fails here.
            return np.ndarray(buffer=data, dtype=dtype, shape=shape)
        dtype = np.dtype(descr)
        if dtype.hasobject:
            raise _UnsafeArray("object dtypes are not accepted")
        return np.frombuffer(data, dtype=dtype)[0]
    except _UnsafeArray:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise _UnsafeArray(f"malformed msgpack-numpy value: {exc}") from exc


def decode_document(value: bytes | None, *, max_bytes: int
                    ) -> tuple[str, dict[str, Any], bool]:
    """:func:`decode_message`, and whether the document holds numpy values (when it does
    not, validation needs no conversion of them)."""
    before = _MADE.numpy
    name, doc = decode_message(value, max_bytes=max_bytes)
    return name, doc, _MADE.numpy != before


def decode_message(value: bytes | None, *, max_bytes: int) -> tuple[str, dict[str, Any]]:
    """Decode one message value. Raises :class:`DecodeError` or :class:`LimitExceeded`."""
    if value is None:
        raise DecodeError("message has no value (a tombstone?)", reason=Reason.EMPTY)
    if len(value) > max_bytes:
        raise LimitExceeded(
            f"message of {len(value)} bytes exceeds the limit of {max_bytes} bytes "
            "(limits.max_message_bytes)",
            reason=Reason.TOO_LARGE,
        )
    if not value:
        raise DecodeError("message value is empty", reason=Reason.EMPTY)
    first = value[:1]
    try:
        if first in (b"[", b" ", b"\n", b"\t", b"\r"):
            message: Any = json.loads(value)
        else:
            message = _unpackb(value, object_hook=_ndarray_hook, strict_map_key=False,
                               use_list=True)
    except DecodeError:
        raise
    except _UnsafeArray as exc:
        raise DecodeError(f"refused a value: {exc}", reason=Reason.UNSAFE_VALUE) from exc
    except Exception as exc:  # msgpack raises a zoo of types (ExtraData, ValueError, ...)
        raise DecodeError(
            f"not a msgpack or JSON (name, doc) message: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(message, list | tuple) or len(message) != 2:
        raise DecodeError(
            f"expected a (name, doc) pair, got {type(message).__name__}"
            + (f" of length {len(message)}" if isinstance(message, list | tuple) else "")
        )
    name, doc = message
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    if not isinstance(name, str):
        raise DecodeError(f"document name must be a string, got {type(name).__name__}")
    if name not in _NAMES:
        raise DecodeError(f"unknown document name {name[:64]!r}", reason=Reason.UNKNOWN_DOCUMENT)
    if not isinstance(doc, dict):
        raise DecodeError(f"{name} document must be a map, got {type(doc).__name__}")
    return name, doc  # every map's keys are strings: JSON's, and checked by _ndarray_hook


def _encode_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError("object arrays cannot be encoded")
        if obj.dtype.kind == "V":
            descr: Any = obj.dtype.descr
            kind = b"V"
        elif obj.dtype.kind == "T":  # numpy StringDType: send as a plain list
            return obj.tolist()
        else:
            descr, kind = obj.dtype.str, b""
        return {b"nd": True, b"type": descr, b"kind": kind, b"shape": list(obj.shape),
                b"data": np.ascontiguousarray(obj).tobytes()}
    if isinstance(obj, np.bool_ | np.number):
        return {b"nd": False, b"type": obj.dtype.str, b"data": obj.tobytes()}
    if isinstance(obj, complex):
        return {b"complex": True, b"data": repr(obj)}
    raise TypeError(f"cannot encode {type(obj).__name__}")


def encode_message(name: str, doc: dict[str, Any]) -> bytes:
    """Encode as the bluesky-kafka Publisher does (msgpack + msgpack-numpy)."""
    packed: bytes = _Packer(default=_encode_default, use_bin_type=True).pack((name, doc))
    return packed
