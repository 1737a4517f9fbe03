"""Normalisation: descriptor -> field specs, events <-> pages, numpy -> JSON."""

from __future__ import annotations

import copy
import itertools
import json
import math
import struct
import tracemalloc
from collections import OrderedDict
from typing import Any

import event_model
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bluestream.errors import DocumentError, LimitExceeded, ValidationError
from bluestream.layout import STRING, FieldSpec, Page, field_specs
from bluestream.limits import Limits
from bluestream.schemas.normalise import (
    datum_page_to_datums,
    page_from_event_page,
    page_from_events,
    page_to_event_page,
    page_to_events,
    to_jsonable,
)

Doc = dict[str, Any]
LIMITS = Limits()


def _key(dtype: str, shape: list[Any], **extra: Any) -> Doc:
    return {"dtype": dtype, "shape": shape, "source": "SIM:x", **extra}


def _descriptor(**data_keys: Doc) -> Doc:
    return {"uid": "desc", "run_start": "run", "time": 1.0, "data_keys": data_keys}


# -- field specs ----------------------------------------------------------------------------
F8, I8 = np.dtype(np.float64), np.dtype(np.int64)


@pytest.mark.parametrize(("entry", "expected"), [
    (_key("number", []), ("number", F8, (), False, False)),
    (_key("number", [], dtype_numpy="<f4"), ("number", np.dtype("f4"), (), False, False)),
    (_key("number", [], dtype_numpy="<i4"), ("number", np.dtype("i4"), (), False, False)),
    (_key("number", [], dtype_numpy="<U9"), ("number", F8, (), False, False)),
    (_key("number", [], dtype_numpy="|b1"), ("number", F8, (), False, False)),
    (_key("integer", []), ("integer", I8, (), False, False)),
    (_key("integer", [], dtype_numpy="<u2"), ("integer", np.dtype("u2"), (), False, False)),
    (_key("integer", [], dtype_numpy="<f8"), ("integer", I8, (), False, False)),
    (_key("boolean", []), ("boolean", np.dtype(bool), (), False, False)),
    (_key("string", [], dtype_numpy="<U9"), ("string", STRING, (), False, False)),
    (_key("string", [3]), ("string", STRING, (), False, True)),
    (_key("array", [512, 512], dtype_numpy="<u2"),
     ("array", np.dtype("u2"), (512, 512), False, False)),
    (_key("array", [5], dtype_numpy=">f4"), ("array", np.dtype("<f4"), (5,), False, False)),
    (_key("array", [5]), ("array", None, (5,), False, False)),
    (_key("array", [0]), ("array", None, (0,), False, False)),
    (_key("array", [2], dtype_numpy="<U9"), ("array", STRING, (), False, True)),
    (_key("array", [2], dtype_numpy=[["x", "<f8"], ["y", "<i4"]]),
     ("array", STRING, (), False, True)),
    (_key("array", [None]), ("array", STRING, (), False, True)),
    (_key("array", [-1, 5], dtype_numpy="<f8"), ("array", STRING, (), False, True)),
    (_key("array", [10, 10], external="FILESTORE:"), ("array", STRING, (), True, False)),
    (_key("array", [10**9, 10**9], external="STREAM:"), ("array", STRING, (), True, False)),
])
def test_field_spec_mapping(entry: Doc, expected: tuple[Any, ...]) -> None:
    spec = field_specs(_descriptor(x=entry), LIMITS)["x"]
    assert spec == FieldSpec("x", *expected)
    if spec.dtype is not None:
        assert spec.dtype.isnative


@pytest.mark.parametrize("key", ["", "a/b", "a\\b", "a\x00b", ".", "..", ".hidden", "__x",
                                 "x" * 256, 5])
def test_unsafe_keys_are_refused(key: Any) -> None:
    with pytest.raises(ValidationError) as info:
        field_specs({"data_keys": {key: _key("number", [])}}, LIMITS)
    assert info.value.reason == "bad-key"


def test_ordinary_keys_are_fine() -> None:
    keys = ["det", "motor_setpoint", "x" * 255, "a.b", "Δθ", "_private", "a-b c"]
    assert set(field_specs({"data_keys": {k: _key("number", []) for k in keys}}, LIMITS)) \
        == set(keys)


@pytest.mark.parametrize(("entry", "reason"), [
    (_key("float", []), "bad-dtype"),
    (_key("array", [3], dtype_numpy="<zz"), "bad-dtype"),
    (_key("array", [3], dtype_numpy="(2,2)f8"), "bad-dtype"),
    (_key("array", [3], dtype_numpy=5), "bad-dtype"),
    (_key("array", "3"), "bad-shape"),
    (_key("array", [1.5]), "bad-shape"),
    (_key("array", [True]), "bad-shape"),
    (_key("array", [1] * 33), "bad-shape"),
])
def test_bad_descriptions_are_refused(entry: Doc, reason: str) -> None:
    with pytest.raises(ValidationError) as info:
        field_specs(_descriptor(x=entry), LIMITS)
    assert info.value.reason == reason
    assert "'x'" in str(info.value)


def test_limits_on_descriptors() -> None:
    with pytest.raises(LimitExceeded, match="3 data keys"):
        field_specs({"data_keys": {f"k{i}": _key("number", []) for i in range(3)}},
                    Limits(max_data_keys=2))
    with pytest.raises(LimitExceeded, match="1000000000000 elements"):
        field_specs(_descriptor(x=_key("array", [10**6, 10**6])), LIMITS)
    with pytest.raises(LimitExceeded):
        field_specs(_descriptor(x=_key("array", [10**40, 10**40], dtype_numpy="<f8")), LIMITS)
    assert field_specs(_descriptor(x=_key("array", [8, 8])), Limits(max_shape_elements=64))


def test_hostile_shapes_allocate_nothing() -> None:
    tracemalloc.start()
    try:
        with pytest.raises(LimitExceeded):
            field_specs(_descriptor(x=_key("array", [10**12], dtype_numpy="<f8")), LIMITS)
        specs = field_specs(_descriptor(x=_key("array", [3], dtype_numpy="<f8")), LIMITS)
        huge = [0.0] * 1_000_000  # claims shape (3,), is a million long
        event = _event(1, {"x": huge})
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        with pytest.raises(ValidationError) as info:
            page_from_events([event], specs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.reason == "shape-mismatch"
    assert peak - before < 100_000  # the list is 8 MB; nothing of its size was built


# -- pages ----------------------------------------------------------------------------------
DESCRIPTOR = _descriptor(
    det=_key("number", []),
    count=_key("integer", []),
    flag=_key("boolean", []),
    name=_key("string", []),
    cam=_key("array", [4, 3], dtype_numpy="<u2"),
    wave=_key("array", [5]),
    img=_key("array", [100, 100], external="FILESTORE:"),
    roi=_key("array", [None, 2]),
)
SPECS = field_specs(DESCRIPTOR, LIMITS)


def _event(seq_num: int, data: Doc, **extra: Any) -> Doc:
    return {"descriptor": "desc", "uid": f"uid-{seq_num}", "seq_num": seq_num,
            "time": 1000.0 + seq_num, "data": data,
            "timestamps": {k: 999.0 + seq_num for k in data},
            "filled": {k: False for k in data if k in SPECS and SPECS[k].external},
            **extra}


def _full(seq_num: int) -> Doc:
    return _event(seq_num, {
        "det": np.float64(seq_num / 3), "count": seq_num, "flag": seq_num % 2 == 0,
        "name": f"n{seq_num}", "cam": np.full((4, 3), seq_num, np.uint16),
        "wave": [float(seq_num)] * 5, "img": f"res/{seq_num}",
        "roi": [[seq_num, 1]] * seq_num,
    })


def test_page_from_events_happy_path() -> None:
    events = [_full(i) for i in range(1, 5)]
    page = page_from_events(events, SPECS)
    assert len(page) == 4
    assert page.descriptor == "desc"
    assert page.uid.dtype == STRING and page.uid.tolist() == [e["uid"] for e in events]
    assert page.seq_num.dtype == np.int64 and page.seq_num.tolist() == [1, 2, 3, 4]
    assert page.time.dtype == np.float64
    expected = {"det": (np.float64, (4,)), "count": (np.int64, (4,)), "flag": (np.bool_, (4,)),
                "name": (STRING, (4,)), "cam": (np.uint16, (4, 4, 3)),
                "wave": (np.float64, (4, 5)), "img": (STRING, (4,)), "roi": (STRING, (4,))}
    for key, (dtype, shape) in expected.items():
        assert page.data[key].dtype == dtype, key
        assert page.data[key].shape == shape, key
        assert page.timestamps[key].dtype == np.float64
    assert set(page.filled) == {"img"} and page.filled["img"].tolist() == [False] * 4
    assert json.loads(page.data["roi"][2]) == [[3, 1]] * 3
    assert page.data["cam"][3, 0, 0] == 4


def test_page_from_event_page_equals_page_from_events() -> None:
    events = [_full(i) for i in range(1, 5)]
    by_events = page_from_events(events, SPECS)
    by_page = page_from_event_page(event_model.pack_event_page(*events), SPECS, LIMITS)
    _assert_pages_equal(by_events, by_page)


def test_event_page_columns_may_be_whole_arrays() -> None:
    events = [_full(i) for i in range(1, 4)]
    doc = event_model.pack_event_page(*events)
    doc = dict(doc, seq_num=np.array(doc["seq_num"]), time=np.array(doc["time"]),
               uid=np.array(doc["uid"]))
    doc["data"] = dict(doc["data"], cam=np.stack(doc["data"]["cam"]),
                       det=np.array(doc["data"]["det"]), wave=np.array(doc["data"]["wave"]))
    _assert_pages_equal(page_from_event_page(doc, SPECS, LIMITS),
                        page_from_events(events, SPECS))


def test_values_are_cast_when_that_loses_nothing() -> None:
    specs = field_specs(_descriptor(f=_key("number", []), i=_key("integer", []),
                                    small=_key("integer", [], dtype_numpy="|u1"),
                                    f4=_key("array", [2], dtype_numpy="<f4")), LIMITS)
    page = page_from_events([
        _event(1, {"f": 1, "i": 2.0, "small": np.int64(255), "f4": [1, 2]}),
        _event(2, {"f": np.int32(3), "i": np.uint8(7), "small": 0,
                   "f4": np.array([0.5, 1e30])}),
    ], specs)
    assert page.data["f"].tolist() == [1.0, 3.0]
    assert page.data["i"].tolist() == [2, 7] and page.data["i"].dtype == np.int64
    assert page.data["small"].dtype == np.uint8
    assert page.data["f4"].dtype == np.float32


def _with(seq_num: int = 1, **data: Any) -> Doc:
    event = _full(seq_num)
    event["data"].update(data)
    return event


@pytest.mark.parametrize(("events", "reason", "text"), [
    ([_with(det="abc")], "dtype-mismatch", "data['det']"),
    ([_with(det=None)], "dtype-mismatch", "data['det']"),
    ([_with(det={"a": 1})], "dtype-mismatch", "data['det']"),
    ([_with(det=[1.0])], "shape-mismatch", "data['det']"),
    ([_with(det=np.zeros(2))], "shape-mismatch", "data['det']"),
    ([_with(count=1.5)], "dtype-mismatch", "non-integral"),
    ([_with(count=float("nan"))], "dtype-mismatch", "non-integral"),
    ([_with(count=2**70)], "dtype-mismatch", "data['count']"),
    ([_with(count="3")], "dtype-mismatch", "data['count']"),
    ([_with(flag=1)], "dtype-mismatch", "data['flag']"),
    ([_with(name=5)], "dtype-mismatch", "expected strings"),
    ([_with(cam=np.zeros((3, 4), np.uint16))], "shape-mismatch", "expected per-event shape"),
    ([_with(cam=np.full((4, 3), -1))], "dtype-mismatch", "out of range for uint16"),
    ([_with(cam=np.full((4, 3), 0.5))], "dtype-mismatch", "non-integral"),
    ([_with(cam=[[1, 2, 3]] * 3)], "shape-mismatch", "length 3 at depth 0"),
    ([_with(cam=5)], "shape-mismatch", "got a int"),
    ([_with(wave=[1.0, 2.0, [3.0], 4.0, 5.0])], "shape-mismatch", "ragged"),
    ([_with(wave=["a"] * 5)], "dtype-mismatch", "not numeric"),
    ([_with(wave=[None] * 5)], "dtype-mismatch", "not numeric"),
    ([_with(img=7)], "dtype-mismatch", "reference string"),
    ([dict(_with(img=np.zeros((100, 100))), filled={"img": True})],
     "unsupported-filled-external", "img"),
    ([dict(_full(1), filled={"det": False})], "data-keys-mismatch", "det"),
    ([dict(_full(1), data={k: v for k, v in _full(1)["data"].items() if k != "det"})],
     "data-keys-mismatch", "missing ['det']"),
    ([dict(_full(1), data=dict(_full(1)["data"], extra=1.0))], "data-keys-mismatch",
     "unexpected ['extra']"),
    ([dict(_full(1), timestamps={"det": 1.0})], "data-keys-mismatch", "timestamps"),
    ([dict(_full(1), timestamps=dict(_full(1)["timestamps"], det="x"))], "dtype-mismatch",
     "timestamps['det']"),
    ([_full(0)], "bad-seq-num", "below 1"),
    ([dict(_full(1), seq_num=True)], "bad-seq-num", "seq_num"),
    ([dict(_full(1), seq_num=1.5)], "bad-seq-num", "seq_num"),
    ([dict(_full(1), time=float("inf"))], "bad-time", "finite"),
    ([dict(_full(1), time="now")], "bad-time", "time"),
    ([_full(1), dict(_full(2), descriptor="other")], "descriptor-mismatch", "other"),
    ([], "empty-page", "no events"),
])
def test_page_from_events_rejections(events: list[Doc], reason: str, text: str) -> None:
    with pytest.raises(DocumentError) as info:
        page_from_events(events, SPECS)
    assert info.value.reason == reason
    assert text in str(info.value)


def test_seq_num_limit() -> None:
    with pytest.raises(LimitExceeded, match="exceeds the limit 10"):
        page_from_events([_full(11)], SPECS, Limits(max_seq_num=10))
    page_from_events([_full(10)], SPECS, Limits(max_seq_num=10))


def _page_doc(n: int = 3) -> Doc:
    return dict(event_model.pack_event_page(*[_full(i) for i in range(1, n + 1)]))


def _mutated(**changes: Any) -> Doc:
    doc = copy.deepcopy(_page_doc())
    for path, value in changes.items():
        *parents, last = path.split("__")
        node = doc
        for part in parents:
            node = node[part]
        node[last] = value
    return doc


@pytest.mark.parametrize(("doc", "reason", "text"), [
    (_mutated(seq_num=[1, 2]), "page-length-mismatch", "seq_num has 2 entries"),
    (_mutated(time=[1.0]), "page-length-mismatch", "time has 1"),
    (_mutated(data__det=[1.0, 2.0]), "page-length-mismatch", "data['det']"),
    (_mutated(timestamps__det=[1.0] * 4), "page-length-mismatch", "timestamps['det']"),
    (_mutated(filled__img=[False]), "page-length-mismatch", "filled['img']"),
    (_mutated(filled__det=[False] * 3), "data-keys-mismatch", "det"),
    (_mutated(uid=[]), "empty-page", "no events"),
    (_mutated(seq_num=[1, 0, 2]), "bad-seq-num", "below 1"),
    (_mutated(data__cam=np.zeros((3, 3, 4), np.uint16)), "shape-mismatch", "[4, 3]"),
    (_mutated(data__det=np.zeros((3, 2))), "shape-mismatch", "data['det']"),
    (_mutated(data__det=["a", "b", "c"]), "dtype-mismatch", "data['det']"),
])
def test_page_from_event_page_rejections(doc: Doc, reason: str, text: str) -> None:
    with pytest.raises(DocumentError) as info:
        page_from_event_page(doc, SPECS, LIMITS)
    assert info.value.reason == reason
    assert text in str(info.value)


def test_event_page_length_limit_is_checked_first() -> None:
    doc = _page_doc(3)
    doc["data"] = "not even a mapping"  # would fail later; the limit must win
    with pytest.raises(LimitExceeded, match="3 events"):
        page_from_event_page(doc, SPECS, Limits(max_page_events=2))


def test_page_without_filled_means_references() -> None:
    doc = _page_doc()
    del doc["filled"]
    assert page_from_event_page(doc, SPECS, LIMITS).filled["img"].tolist() == [False] * 3


def test_inferred_array_dtype_comes_from_the_values() -> None:
    specs = field_specs(_descriptor(w=_key("array", [2])), LIMITS)
    assert page_from_events([_event(1, {"w": [1, 2]})], specs).data["w"].dtype == np.int64
    page = page_from_events([_event(1, {"w": np.array([1, 2], ">i4")})], specs)
    assert page.data["w"].dtype == np.dtype("<i4")
    mixed = page_from_events([_event(1, {"w": [1, 2]}), _event(2, {"w": [0.5, 1]})], specs)
    assert mixed.data["w"].dtype == np.float64


def test_filled_foreign_keys_and_reference_strings() -> None:
    specs = field_specs(_descriptor(img=_key("array", [2], external="FILESTORE:")), LIMITS)
    page = page_from_events([_event(1, {"img": "res/1"}, filled={"img": "res/1"}),
                             _event(2, {"img": "res/2"}, filled={})], specs)
    assert page.filled["img"].tolist() == [True, False]


# -- back to documents ----------------------------------------------------------------------
def test_page_to_documents() -> None:
    events = [_full(i) for i in range(1, 4)]
    page = page_from_events(events, SPECS)
    back = page_to_events(page, DESCRIPTOR)
    expected = copy.deepcopy(events)  # as stored: Python scalars, numpy arrays
    for event in expected:
        event["data"]["det"] = float(event["data"]["det"])
        event["data"]["wave"] = np.array(event["data"]["wave"])
    _assert_same(back, expected)
    assert type(back[0]["data"]["det"]) is float and type(back[0]["data"]["count"]) is int
    assert type(back[0]["data"]["flag"]) is bool and type(back[0]["data"]["name"]) is str
    assert isinstance(back[0]["data"]["cam"], np.ndarray)
    _assert_same(page_to_event_page(page, DESCRIPTOR), event_model.pack_event_page(*expected))
    for event in back:
        event_model.schema_validators[event_model.DocumentNames.event].validate(event)


# -- properties -----------------------------------------------------------------------------
def _same_value(a: Any, b: Any) -> bool:
    """Bit-exact equality: same types, same dtypes, same bytes (NaN payloads too)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and a.tobytes() == b.tobytes())
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _assert_same(a: Any, b: Any) -> None:
    assert _same_value(a, b), (a, b)


def _assert_pages_equal(a: Page, b: Page) -> None:
    assert a.descriptor == b.descriptor
    for name in ("uid", "seq_num", "time"):
        _assert_columns_equal(getattr(a, name), getattr(b, name))
    for attr in ("data", "timestamps", "filled"):
        left, right = getattr(a, attr), getattr(b, attr)
        assert left.keys() == right.keys()
        for key in left:
            _assert_columns_equal(left[key], right[key])


def _assert_columns_equal(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.dtype == STRING:
        assert a.tolist() == b.tolist()
    else:
        assert a.tobytes() == b.tobytes()


_floats = st.floats(allow_nan=True, allow_infinity=True)
_KIND_STRATEGIES: dict[str, tuple[Doc, Any]] = {
    "f8": (_key("number", []), _floats),
    "i8": (_key("integer", []), st.integers(-(2**63), 2**63 - 1)),
    "u1": (_key("integer", [], dtype_numpy="|u1"), st.integers(0, 255)),
    "b": (_key("boolean", []), st.booleans()),
    "s": (_key("string", []), st.text(max_size=8)),
    "img": (_key("array", [3, 2], dtype_numpy="<u2"),
            hnp.arrays(np.uint16, (3, 2))),
    "vec": (_key("array", [4], dtype_numpy="<f4"),
            hnp.arrays(np.float32, (4,), elements=st.floats(width=32))),
    "wave": (_key("array", [3]), hnp.arrays(np.float64, (3,))),
    "ext": (_key("array", [9, 9], external="FILESTORE:"), st.text(min_size=1, max_size=10)),
    "var": (_key("array", [None]), st.lists(st.integers(-5, 5) | st.text(max_size=3),
                                             max_size=4)),
}


@st.composite
def _streams(draw: st.DrawFn) -> tuple[Doc, list[Doc]]:
    kinds = draw(st.lists(st.sampled_from(sorted(_KIND_STRATEGIES)), min_size=1, max_size=6))
    keys = {f"k{i}_{kind}": kind for i, kind in enumerate(kinds)}
    descriptor = _descriptor(**{k: _KIND_STRATEGIES[kind][0] for k, kind in keys.items()})
    n = draw(st.integers(1, 8))
    seq_nums = draw(st.lists(st.integers(1, 1000), min_size=n, max_size=n))
    events = []
    for i, seq_num in enumerate(seq_nums):
        data = {k: draw(_KIND_STRATEGIES[kind][1]) for k, kind in keys.items()}
        events.append({
            "descriptor": "desc", "uid": f"u{i}", "seq_num": seq_num,
            "time": draw(st.floats(0, 2e9)),
            "data": data, "timestamps": {k: draw(st.floats(allow_nan=False, allow_infinity=False))
                                           for k in keys},
            "filled": {k: False for k, kind in keys.items() if kind == "ext"},
        })
    return descriptor, events


@settings(max_examples=150, deadline=None)
@given(stream=_streams())
def test_round_trip_is_bit_exact(stream: tuple[Doc, list[Doc]]) -> None:
    descriptor, events = stream
    specs = field_specs(descriptor, LIMITS)
    page = page_from_events(events, specs)
    _assert_same(page_to_events(page, descriptor), events)
    packed = event_model.pack_event_page(*events)
    by_page = page_from_event_page(packed, specs, LIMITS)
    _assert_pages_equal(by_page, page)
    _assert_same(page_to_event_page(by_page, descriptor), packed)


@settings(max_examples=100, deadline=None)
@given(stream=_streams(), data=st.data())
def test_any_split_into_pages_gives_the_same_columns(
        stream: tuple[Doc, list[Doc]], data: st.DataObject) -> None:
    descriptor, events = stream
    specs = field_specs(descriptor, LIMITS)
    cuts = sorted(data.draw(st.sets(st.integers(1, len(events) - 1), max_size=len(events)))
                  if len(events) > 1 else [])
    bounds = [0, *cuts, len(events)]
    pages = [page_from_events(events[a:b], specs) for a, b in itertools.pairwise(bounds)]
    whole = page_from_events(events, specs)
    joined = Page(
        descriptor=pages[0].descriptor,
        uid=np.concatenate([p.uid for p in pages]),
        seq_num=np.concatenate([p.seq_num for p in pages]),
        time=np.concatenate([p.time for p in pages]),
        data={k: np.concatenate([p.data[k] for p in pages]) for k in whole.data},
        timestamps={k: np.concatenate([p.timestamps[k] for p in pages])
                    for k in whole.timestamps},
        filled={k: np.concatenate([p.filled[k] for p in pages]) for k in whole.filled},
    )
    _assert_pages_equal(joined, whole)


# -- to_jsonable and datum pages ------------------------------------------------------------
def test_to_jsonable_converts_numpy_everywhere() -> None:
    doc = {"a": np.int64(3), "b": np.float32(0.5), "c": np.bool_(True), "d": np.str_("x"),
           "e": (1, np.uint8(2)), "f": np.arange(4).reshape(2, 2),
           "g": OrderedDict(h=[np.array([1.5])]), "i": None, np.str_("j"): "k",
           "l": np.array(["p", "q"]), "m": float("nan")}
    out = to_jsonable(doc)
    assert out["a"] == 3 and type(out["a"]) is int
    assert type(out["b"]) is float and type(out["c"]) is bool and type(out["d"]) is str
    assert out["e"] == [1, 2] and out["f"] == [[0, 1], [2, 3]]
    assert out["g"] == {"h": [[1.5]]} and type(out["g"]) is dict
    assert out["j"] == "k" and out["l"] == ["p", "q"] and math.isnan(out["m"])
    json.dumps(out)


def test_to_jsonable_copies_and_keeps_plain_values() -> None:
    doc = {"a": [1, {"b": "c"}], "d": 1.5}
    out = to_jsonable(doc)
    assert out == doc
    assert out is not doc and out["a"] is not doc["a"] and out["a"][1] is not doc["a"][1]


@pytest.mark.parametrize("value", [{1: "a"}, b"bytes", 1 + 2j, np.complex128(1j),
                                   np.array([1j]), {"s": {1, 2}}, object()])
def test_to_jsonable_refuses_what_json_cannot_hold(value: Any) -> None:
    with pytest.raises(ValidationError) as info:
        to_jsonable({"v": value})
    assert info.value.reason == "not-jsonable"


@given(st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1)
                    | st.floats(allow_nan=False)
                    | st.text(), lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner)))
def test_to_jsonable_is_identity_on_json(value: Any) -> None:
    assert to_jsonable(value) == value


@pytest.mark.parametrize("value", [2**63, -2**63 - 1, 2**64 - 1, np.uint64(2**64 - 1),
                                   np.array([1, 2**64 - 1], dtype=np.uint64)])
def test_to_jsonable_refuses_integers_beyond_64_bits(value: Any) -> None:
    """Neither store holds them (SQLite raised OverflowError, BSON cannot encode them):
    refused as the document's fault, not retried as a store outage (found by the fuzzer)."""
    with pytest.raises(ValidationError) as info:
        to_jsonable({"scan_id": value})
    assert info.value.reason == "int-out-of-range"
    assert to_jsonable({"v": [2**63 - 1, -2**63]}) == {"v": [2**63 - 1, -2**63]}


def test_datum_page_to_datums() -> None:
    page = {"resource": "r", "datum_id": ["r/0", "r/1"],
            "datum_kwargs": {"index": np.array([0, 1]), "name": ["a", "b"]}}
    datums = datum_page_to_datums(page)
    assert datums == [
        {"resource": "r", "datum_id": "r/0", "datum_kwargs": {"index": 0, "name": "a"}},
        {"resource": "r", "datum_id": "r/1", "datum_kwargs": {"index": 1, "name": "b"}},
    ]
    assert type(datums[0]["datum_kwargs"]["index"]) is int
    expected = list(event_model.unpack_datum_page(dict(page, datum_kwargs={
        "index": [0, 1], "name": ["a", "b"]})))
    assert datums == expected


def test_datum_page_rejections() -> None:
    with pytest.raises(ValidationError) as info:
        datum_page_to_datums({"resource": "r", "datum_id": ["r/0", "r/1"],
                              "datum_kwargs": {"index": [0]}})
    assert info.value.reason == "page-length-mismatch"
    with pytest.raises(LimitExceeded):
        datum_page_to_datums({"resource": "r", "datum_id": ["a", "b", "c"], "datum_kwargs": {}},
                             Limits(max_page_events=2))
