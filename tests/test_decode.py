"""Decoding of the bluesky-kafka wire format, and refusal of everything else."""

from __future__ import annotations

import json
import os
import pickle

import msgpack
import numpy as np
import pytest

from bluestream.consumers.decode import decode_message, encode_message
from bluestream.errors import DecodeError, LimitExceeded

MAX = 1 << 20


def publisher_bytes(name: str, doc: dict) -> bytes:
    """Exactly what bluesky-kafka's Publisher sends (msgpack patched by msgpack-numpy)."""
    import msgpack_numpy as mpn

    return mpn.packb((name, doc))  # type: ignore[no-any-return]


def test_decodes_publisher_format_with_numpy_arrays() -> None:
    img = np.arange(12, dtype="<u2").reshape(3, 4)
    value = publisher_bytes("event", {"data": {"img": img, "x": np.float32(2.5)}, "seq_num": 1})
    name, doc = decode_message(value, max_bytes=MAX)
    assert name == "event"
    assert isinstance(doc["data"]["img"], np.ndarray)
    assert doc["data"]["img"].dtype == np.dtype("<u2")
    np.testing.assert_array_equal(doc["data"]["img"], img)
    assert doc["data"]["x"] == np.float32(2.5)


def test_json_values_are_accepted() -> None:
    name, doc = decode_message(json.dumps(["stop", {"uid": "u"}]).encode(), max_bytes=MAX)
    assert (name, doc) == ("stop", {"uid": "u"})


def test_our_encoder_is_readable_by_msgpack_numpy() -> None:
    import msgpack_numpy as mpn

    arr = np.linspace(0, 1, 7)
    name, doc = mpn.unpackb(encode_message("event", {"a": arr}))
    assert name == "event"
    np.testing.assert_array_equal(doc["a"], arr)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (os.urandom(64), None),
        (publisher_bytes("event", {"seq_num": 1, "data": {}})[:-3], "undecodable"),
        (msgpack.packb(("bogus", {})), "unknown-document"),
        (msgpack.packb(("event", [1, 2])), "undecodable"),
        (msgpack.packb(["event"]), "undecodable"),
        (msgpack.packb(("event", {1: 2})), "undecodable"),
        (b"", "empty"),
        (None, "empty"),
        (b"[not json", "undecodable"),
    ],
)
def test_malformed_values_raise_decode_error(value: bytes | None, reason: str | None) -> None:
    with pytest.raises(DecodeError) as info:
        decode_message(value, max_bytes=MAX)
    if reason is not None:
        assert info.value.reason == reason


def test_pickled_object_arrays_are_refused_not_unpickled() -> None:
    class Boom:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.getpid, ())

    payload = {b"nd": True, b"type": "|O", b"kind": b"O", b"shape": [1],
               b"data": pickle.dumps(Boom())}
    value = msgpack.packb(("event", {"data": {"x": payload}}))
    with pytest.raises(DecodeError) as info:
        decode_message(value, max_bytes=MAX)
    assert info.value.reason == "unsafe-value"


def test_hostile_shape_fails_without_allocating() -> None:
    payload = {b"nd": True, b"type": "<f8", b"kind": b"", b"shape": [10**6, 10**6],
               b"data": b"\0" * 8}
    with pytest.raises(DecodeError):
        decode_message(msgpack.packb(("event", {"data": {"x": payload}})), max_bytes=MAX)


def test_too_large_message_is_a_limit_error() -> None:
    with pytest.raises(LimitExceeded) as info:
        decode_message(b"\x92" + b"\0" * 2000, max_bytes=1000)
    assert info.value.reason == "too-large"
