"""The typed decoder accepts only what event-model's own validator accepts, and together
with the general path it accepts and refuses exactly what event-model does."""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path
from typing import Any

import event_model
import msgpack
import msgspec
import numpy as np
import pytest

from bluestream.consumers.decode import decode_message, encode_message
from bluestream.errors import DocumentError
from bluestream.schemas.typed import STRUCTS, decode_typed, float_column
from bluestream.schemas.validate import validate
from helpers import zarr_files
from test_catalog_support import create_store, ingest

MAX = 32 * 1024 * 1024


def _truth(name: str, doc: dict[str, Any]) -> bool:
    """event-model's own verdict (jsonschema, draft 2020-12), plus the finite-time rule
    bluestream adds (a NaN time is refused with reason bad-time)."""
    try:
        event_model.schema_validators[event_model.DocumentNames[name]].validate(doc)
    except Exception:
        return False
    when = doc.get("time")
    return not (isinstance(when, float) and not math.isfinite(when))


def _general(value: bytes) -> bool:
    try:
        name, doc = decode_message(value, max_bytes=MAX)
        validate(name, doc)
    except DocumentError:
        return False
    return True


def _event(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"descriptor": "d-1", "uid": "e-1", "seq_num": 1, "time": 1.5,
                           "data": {"a": 1.0, "b": 2, "c": True, "s": "text"},
                           "timestamps": {"a": 1.0, "b": 2, "c": 3.0, "s": 4.0},
                           "filled": {}}
    doc.update(over)
    return doc


def _page(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"descriptor": "d-1", "uid": ["e-1", "e-2"], "seq_num": [1, 2],
                           "time": [1.5, 2], "data": {"a": [1.0, 2.0], "s": ["x", "y"]},
                           "timestamps": {"a": [1.0, 2.0], "s": [1, 2]}, "filled": {}}
    doc.update(over)
    return doc


def _without(doc: dict[str, Any], key: str) -> dict[str, Any]:
    out = dict(doc)
    del out[key]
    return out


CORPUS: list[tuple[str, dict[str, Any]]] = [
    ("event", _event()),
    ("event", _without(_event(), "filled")),
    ("event", _event(time=3)),
    ("event", _event(filled={"a": False, "b": "datum-1"})),
    ("event", _event(data={}, timestamps={})),
    ("event", _event(data={"a": [1, 2, 3]})),  # schema: data values are free
    ("event", _event(data={"a": None})),
    ("event", _event(data={"a": {"nested": 1}})),
    ("event", _event(timestamps={"a": "not a number"})),
    ("event", _event(seq_num=1.0)),  # an integer to JSON schema
    ("event", _event(seq_num=1.5)),
    ("event", _event(seq_num=True)),
    ("event", _event(seq_num="1")),
    ("event", _event(time=True)),
    ("event", _event(time="now")),
    ("event", _event(time=float("nan"))),
    ("event", _event(time=float("inf"))),
    ("event", _event(uid=5)),
    ("event", _event(descriptor=None)),
    ("event", _event(data=[1, 2])),
    ("event", _event(filled={"a": 3})),
    ("event", _event(filled=[])),
    ("event", _event(extra="field")),
    *[("event", _without(_event(), k))
      for k in ("descriptor", "uid", "seq_num", "time", "data", "timestamps")],
    ("event_page", _page()),
    ("event_page", _without(_page(), "filled")),
    ("event_page", _page(filled={"a": [False, "datum-2"]})),
    ("event_page", _page(data={"a": [[1, 2], [3, 4]]})),
    ("event_page", _page(data={"a": [None, 1]})),
    ("event_page", _page(data={"a": 5})),
    ("event_page", _page(seq_num=[1, 2.0])),
    ("event_page", _page(seq_num=[1, True])),
    ("event_page", _page(time=[1, "x"])),
    ("event_page", _page(time=[1, True])),
    ("event_page", _page(uid=["a", 1])),
    ("event_page", _page(uid="a")),
    ("event_page", _page(timestamps={"a": 1})),
    ("event_page", _page(filled={"a": [1]})),
    ("event_page", _page(extra=1)),
    *[("event_page", _without(_page(), k))
      for k in ("descriptor", "uid", "seq_num", "time", "data", "timestamps")],
]


def _check(name: str, doc: dict[str, Any], value: bytes) -> None:
    truth = _truth(name, doc)
    fast = decode_typed(value)
    if fast is not None:
        assert truth, f"the fast path accepted what event-model refuses: {name} {doc!r:.300}"
        assert fast[0] == name
        assert _same(fast[1], doc)  # the same document (an int time arrives as a float)
    accepted = fast is not None or _general(value)
    assert accepted == truth, f"{name} {doc!r:.300}: bluestream {accepted}, event-model {truth}"


@pytest.mark.parametrize(("name", "doc"), CORPUS, ids=[f"{i}-{n}" for i, (n, _) in
                                                       enumerate(CORPUS)])
def test_corpus(name: str, doc: dict[str, Any]) -> None:
    _check(name, doc, msgpack.packb((name, doc), use_bin_type=True))


def test_plain_documents_take_the_fast_path() -> None:
    for name, doc in [("event", _event()), ("event_page", _page()),
                      ("event", _without(_event(), "filled"))]:
        assert decode_typed(encode_message(name, doc)) is not None


def test_numpy_values_and_bytes_keys_go_the_general_way() -> None:
    with_numpy = _event(data={"img": np.zeros((2, 2), dtype=np.uint16)},
                        timestamps={"img": 1.0})
    assert decode_typed(encode_message("event", with_numpy)) is None
    name, doc = decode_message(encode_message("event", with_numpy), max_bytes=MAX)
    validate(name, doc)  # accepted there
    bytes_key = msgpack.packb(("event", {**_event(), "data": {b"a": 1.0}}), use_bin_type=True)
    assert decode_typed(bytes_key) is None
    assert not _general(bytes_key)
    scalar = encode_message("event", _event(data={"a": np.float32(2.5)}))  # an nd map
    assert decode_typed(scalar) is None and _general(scalar)


def test_other_documents_and_garbage_are_left_undecided() -> None:
    start = {"uid": "s", "time": 1.0}
    assert decode_typed(encode_message("start", start)) is None
    for junk in (b"", b"\xc1", b"[\"event\", {}]", msgpack.packb(["event"]),
                 msgpack.packb(("event", _event()))[:-3],
                 msgpack.packb(("event", _event())) + b"\x00"):
        assert decode_typed(junk) is None


def test_struct_fields_are_the_schema_properties() -> None:
    """Each struct lists the schema's properties, requires what it requires, and
    refuses what it does not list (the schemas say additionalProperties: false)."""
    for name, struct in STRUCTS.items():
        schema = event_model.schemas[event_model.DocumentNames[name]]
        info = msgspec.inspect.type_info(struct)
        assert isinstance(info, msgspec.inspect.StructType)
        fields = {f.name for f in info.fields}
        required = {f.name for f in info.fields if f.required}
        properties = set(schema["properties"]) | {
            p for part in schema.get("allOf", ())
            for p in schema["$defs"][part["$ref"].rsplit("/", 1)[-1]]["properties"]}
        assert fields == properties, name
        want = set(schema.get("required", ())) | {
            r for part in schema.get("allOf", ())
            for r in schema["$defs"][part["$ref"].rsplit("/", 1)[-1]].get("required", ())}
        assert required == want, name
        assert info.forbid_unknown_fields
        assert schema.get("unevaluatedProperties", schema.get("additionalProperties")) is False


_ODD = [None, True, False, 0, -1, 2**63, 1.5, float("nan"), "", "x", [], [1], ["a"], {},
        {"k": 1}, b"raw", [[1]], [None]]


def test_random_mutations_agree_with_event_model() -> None:
    """Mutations of valid documents (a field dropped, added, or given an odd value, at
    the top or one level down): the fast path never accepts what event-model refuses,
    and the combined verdict is event-model's."""
    rng = random.Random(12)
    bases = [("event", _event()), ("event_page", _page())]
    checked = 0
    for _ in range(3000):
        name, base = rng.choice(bases)
        doc = copy.deepcopy(base)
        target = doc
        if rng.random() < 0.5:
            inner = rng.choice(["data", "timestamps", "filled"])
            target = doc[inner]
        action = rng.random()
        keys = list(target)
        if action < 0.2 and keys:
            del target[rng.choice(keys)]
        elif action < 0.4:
            target[rng.choice(["extra", "zz", "a"])] = rng.choice(_ODD)
        elif keys:
            target[rng.choice(keys)] = rng.choice(_ODD)
        try:
            value = msgpack.packb((name, doc), use_bin_type=True)
        except (TypeError, ValueError, OverflowError):
            continue
        if any(isinstance(v, bytes) for v in _leaves(doc)):
            # bytes have no JSON form: event-model's verdict on them is not the question
            assert decode_typed(value) is None
            continue
        _check(name, doc, value)
        checked += 1
    assert checked > 2500


def _leaves(obj: Any) -> list[Any]:
    if isinstance(obj, dict):
        return [leaf for v in obj.values() for leaf in _leaves(v)]
    if isinstance(obj, list):
        return [leaf for v in obj for leaf in _leaves(v)]
    return [obj]


def _same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN; a page column read as a float64 array is the same
    as the list of numbers it was packed from."""
    if isinstance(a, np.ndarray):
        assert a.dtype == np.float64 and a.ndim == 1, a.dtype
        a = a.tolist()
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return (type(a) is type(b) and a == b) or (
        {type(a), type(b)} == {int, float} and a == b)


@pytest.mark.parametrize("n", [1, 15, 16, 1000, 70_000])
def test_page_columns_of_doubles_are_read_whole(n: int) -> None:
    """A column of msgpack doubles (fixarray, array16 and array32 headers) arrives as the
    float64 array of the same values, NaN and infinities included; the document is
    still the one event-model accepts."""
    values = [i * 0.25 - 3.0 for i in range(n)]
    values[0] = float("nan")
    values[-1] = float("inf") if n > 1 else values[-1]
    page = _page(uid=[f"e-{i}" for i in range(n)], seq_num=list(range(1, n + 1)),
                 time=[float(i) for i in range(n)], data={"a": values},
                 timestamps={"a": [1.0] * n})
    fast = decode_typed(msgpack.packb(("event_page", page), use_bin_type=True))
    assert fast is not None
    got = fast[1]["data"]["a"]
    assert isinstance(got, np.ndarray) and got.dtype == np.float64 and got.flags.writeable
    np.testing.assert_array_equal(got, np.array(values))
    assert isinstance(fast[1]["time"], np.ndarray)


def test_float_column_takes_only_doubles() -> None:
    """Anything but an array of msgpack doubles is left to the list decoder (and its
    checks): ints, floats packed as float32, mixed entries, other types, empty arrays,
    truncated or overlong bytes."""
    doubles = msgpack.packb([1.0, 2.5, -0.0])
    assert float_column(doubles) is not None
    for value in ([1.0, 2], [1, 2], [1.0, "x"], [1.0, True], [1.0, None], [], [[1.0]],
                  {"a": 1.0}, 1.0, "x"):
        assert float_column(msgpack.packb(value)) is None, value
    assert float_column(msgpack.packb([1.0, 2.0], use_single_float=True)) is None
    assert float_column(doubles[:-1]) is None
    assert float_column(doubles + b"\x00") is None
    assert float_column(b"") is None
    # A page whose column mixes ints and floats still decodes (as a list) and validates.
    mixed = _page(data={"a": [1, 2.5], "s": ["x", "y"]})
    fast = decode_typed(msgpack.packb(("event_page", mixed), use_bin_type=True))
    assert fast is not None and fast[1]["data"]["a"] == [1, 2.5]


@pytest.mark.anyio
async def test_pages_store_the_same_bytes_by_either_path(tmp_path: Path) -> None:
    """Pages of float columns stored through the typed path (columns of doubles
    converted whole) and the same pages with numpy columns (msgpack-numpy: the general
    path) leave identical Zarr files."""
    bundle = event_model.compose_run(time=1_700_000_000.0)
    keys = {k: {"dtype": "number", "shape": [], "source": k} for k in ("a", "b", "c")}
    desc = bundle.compose_descriptor(name="primary", data_keys=keys, time=1_700_000_000.0)
    rng = np.random.default_rng(3)
    plain: list[tuple[str, dict[str, Any]]] = [("start", bundle.start_doc),
                                               ("descriptor", desc.descriptor_doc)]
    numpy_ = list(plain)
    for first in range(1, 301, 50):
        seq = list(range(first, first + 50))
        cols = {k: rng.normal(size=50) for k in keys}
        cols["a"][::7] = np.nan
        times = [1_700_000_000.0 + i for i in seq]
        page = {"descriptor": desc.descriptor_doc["uid"], "seq_num": seq,
                "uid": [f"{desc.descriptor_doc['uid']}-{i}" for i in seq], "time": times,
                "filled": {}}
        plain.append(("event_page", {**page, "data": {k: v.tolist() for k, v in cols.items()},
                                     "timestamps": {k: times for k in keys}}))
        numpy_.append(("event_page", {**page, "data": cols,
                                      "timestamps": {k: np.array(times) for k in keys}}))
    stop = bundle.compose_stop(time=1_700_001_000.0)
    plain.append(("stop", stop))
    numpy_.append(("stop", stop))
    assert decode_typed(encode_message(*plain[2])) is not None  # the typed path
    assert decode_typed(encode_message(*numpy_[2])) is None  # the general path

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    for tenant, docs in (("ta", plain), ("tb", numpy_)):
        await create_store(uri, tenant)
        await ingest(uri, tmp_path / tenant, tenant, docs)
    a, b = ({k.split("/", 1)[1]: v for k, v in zarr_files(tmp_path / t, t).items()}
            for t in ("ta", "tb"))
    assert a == b and any("/data/a/c/" in k for k in a)
