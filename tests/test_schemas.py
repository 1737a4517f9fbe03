"""Schema validation: event-model's rules, compiled with fastjsonschema, numpy-tolerant."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import event_model
import msgpack
import msgpack_numpy
import numpy as np
import pytest
from event_model import DocumentNames, StreamRange, compose_run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bluestream.documents import DOCUMENT_NAMES as KINDS
from bluestream.errors import SchemaViolation, ValidationError
from bluestream.schemas.validate import draft07_schema, to_draft07, validate

Doc = dict[str, Any]


def _reference_accepts(name: str, doc: Doc) -> bool:
    """What event-model's own (slow, jsonschema-based) validator says."""
    try:
        event_model.schema_validators[DocumentNames[name]].validate(doc)
    except Exception:
        return False
    return True


@pytest.fixture(scope="module")
def docs() -> dict[str, Doc]:
    """One realistic document of every kind, composed with event-model."""
    run = compose_run(metadata={
        "plan_name": "scan", "detectors": ["det"], "motors": ["motor"], "scan_id": 7,
        "hints": {"dimensions": [[["motor"], "primary"]]},
        "plan_args": {"num": 3, "args": ["motor", -1, 1]},
    })
    desc = run.compose_descriptor(
        name="primary",
        data_keys={
            "det": {"source": "SIM:det", "dtype": "number", "shape": [], "precision": 3,
                    "object_name": "det", "units": "counts"},
            "motor": {"source": "SIM:motor", "dtype": "number", "shape": [],
                      "object_name": "motor", "dtype_numpy": "<f8"},
            "cam": {"source": "PV:cam", "dtype": "array", "shape": [4, 3],
                    "dtype_numpy": "<u2", "object_name": "cam"},
            "img": {"source": "SIM:img", "dtype": "array", "shape": [10, 10],
                    "external": "FILESTORE:", "object_name": "img"},
        },
        configuration={"det": {
            "data": {"det_Imax": 1, "det_noise": "none"},
            "timestamps": {"det_Imax": 1.0, "det_noise": 1.0},
            "data_keys": {"det_Imax": {"source": "SIM:det_Imax", "dtype": "integer",
                                       "shape": []},
                          "det_noise": {"source": "SIM:det_noise", "dtype": "string",
                                        "shape": [], "choices": ["none", "poisson"]}},
        }},
        object_keys={"det": ["det"], "motor": ["motor"], "cam": ["cam"], "img": ["img"]},
        hints={"det": {"fields": ["det"]}, "motor": {"fields": ["motor"]}},
    )
    res = run.compose_resource(spec="NPY_SEQ", root="/tmp", resource_path="abc",
                               resource_kwargs={})
    datum = res.compose_datum(datum_kwargs={"index": 0})
    data = {"det": 1.5, "motor": -1.0, "cam": [[1, 2, 3]] * 4, "img": datum["datum_id"]}
    stamps = {k: 1.0 for k in data}
    event = desc.compose_event(data=data, timestamps=stamps, seq_num=1,
                               filled={"img": False})
    page = desc.compose_event_page(
        data={k: [v, v] for k, v in data.items()}, timestamps={k: [1.0, 2.0] for k in data},
        seq_num=[2, 3], filled={"img": [False, False]})
    sres = run.compose_stream_resource(mimetype="application/x-hdf5", uri="file:///x.h5",
                                       data_key="cam", parameters={"dataset": "/data"})
    sdatum = sres.compose_stream_datum(indices=StreamRange(start=0, stop=2),
                                       descriptor=desc.descriptor_doc)
    return {
        "start": run.start_doc,
        "descriptor": desc.descriptor_doc,
        "event": event,
        "event_page": page,
        "resource": res.resource_doc,
        "datum": datum,
        "datum_page": res.compose_datum_page(datum_kwargs={"index": [1, 2]}),
        "stream_resource": sres.stream_resource_doc,
        "stream_datum": sdatum,
        "stop": run.compose_stop(),
    }


@pytest.mark.parametrize("name", KINDS)
def test_every_kind_validates(docs: dict[str, Doc], name: str) -> None:
    assert _reference_accepts(name, docs[name])
    validate(name, docs[name])


def test_runengine_documents_validate_as_published_and_as_decoded() -> None:
    """Real RunEngine output (tuples, OrderedDicts, numpy scalars), before and after the
    msgpack-numpy round trip the Kafka publisher puts them through."""
    from bluesky import RunEngine
    from bluesky.plans import count, scan
    from ophyd.sim import det, img, motor

    collected: list[tuple[str, Doc]] = []
    engine = RunEngine({})
    engine(scan([det], motor, -1, 1, 3), lambda n, d: collected.append((n, d)))
    engine(count([img], 2), lambda n, d: collected.append((n, d)))
    assert {n for n, _ in collected} >= {"start", "descriptor", "event", "resource", "datum",
                                          "stop"}
    for name, doc in collected:
        validate(name, doc)
        wire = msgpack.packb((name, doc), default=msgpack_numpy.encode)
        decoded_name, decoded = msgpack.unpackb(wire, object_hook=msgpack_numpy.decode)
        validate(decoded_name, decoded)


# -- rejections -----------------------------------------------------------------------------
def _set(path: str, value: Any) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        *parents, last = path.split("/")
        node = doc
        for part in parents:
            node = node[part]
        node[last] = value
    return mutate


def _drop(path: str) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        *parents, last = path.split("/")
        node = doc
        for part in parents:
            node = node[part]
        del node[last]
    return mutate


BROKEN = [
    ("start", _drop("uid"), "at top level: must contain ['uid'] properties"),
    ("start", _set("time", "now"), "at time: must be number"),
    ("start", _set("scan_id", 1.5), "at scan_id: must be integer"),
    ("start", _set("hints", {"dimensions": [[["motor"], 5]]}),
     "at hints.dimensions[0][1]: must be array or string"),
    ("start", _set("hints", {"dimensions": [], "a.b": 1}), "at hints: must not contain"),
    ("start", _set("a.b", 1), "at top level: must not contain {'a.b'}"),
    ("stop", _set("exit_status", "meh"), "at exit_status: must be one of"),
    ("stop", _set("num_events", {"primary": "3"}), "at num_events.primary: must be integer"),
    ("descriptor", _drop("data_keys/det/source"), "at data_keys.det: must contain ['source']"),
    ("descriptor", _set("data_keys/det/dtype", "float"), "at data_keys.det.dtype"),
    ("descriptor", _set("data_keys/det/shape", [1.5]), "at data_keys.det.shape[0]"),
    ("descriptor", _set("data_keys/det/external", "filestore"), "at data_keys.det.external"),
    ("descriptor", _set("data_keys/det/dtype_numpy", [["x", "<f8"], ["y", "nonsense"]]),
     "at data_keys.det.dtype_numpy"),
    ("descriptor", _set("hints", {"NX_class": "bad"}), "at hints.NX_class"),
    ("event", _set("extra", 1), "at top level: must not contain {'extra'}"),
    ("event", _set("seq_num", "1"), "at seq_num: must be integer"),
    ("event", _set("data", [1, 2]), "at data: must be object"),
    ("event", _set("filled", {"img": 0}), "at filled.img: must be boolean or string"),
    ("event", _drop("timestamps"), "must contain ['timestamps'] properties"),
    ("event_page", _set("extra", 1), "at top level: must not contain {'extra'}"),
    ("event_page", _set("data/det", 1.5), "at data.det: must be array"),
    ("event_page", _set("time", [1.0, "x"]), "at time[1]: must be number"),
    ("event_page", _set("seq_num", [1, 2.5]), "at seq_num[1]: must be integer"),
    ("resource", _set("extra", 1), "at top level: must not contain {'extra'}"),
    ("resource", _drop("spec"), "must contain ['spec'] properties"),
    ("resource", _set("path_semantics", "dos"), "at path_semantics: must be one of"),
    ("datum", _set("extra", 1), "at top level: must not contain {'extra'}"),
    ("datum", _drop("datum_kwargs"), "must contain ['datum_kwargs'] properties"),
    ("datum_page", _set("datum_id", "abc/1"), "at datum_id: must be array"),
    ("datum_page", _set("datum_kwargs", {"index": 1}), "at datum_kwargs.index: must be array"),
    ("stream_resource", _drop("uri"), "must contain ['uri'] properties"),
    ("stream_datum", _set("indices", {"start": 0}), "at indices: must contain ['stop']"),
]


@pytest.mark.parametrize(("name", "mutate", "expected"), BROKEN,
                         ids=[f"{n}-{e[:30]}" for n, _, e in BROKEN])
def test_broken_documents_are_rejected_like_event_model_does(
        docs: dict[str, Doc], name: str, mutate: Callable[[Doc], None], expected: str) -> None:
    doc = copy.deepcopy(docs[name])
    mutate(doc)
    assert not _reference_accepts(name, doc)  # the rule is event-model's, not ours
    with pytest.raises(SchemaViolation) as info:
        validate(name, doc)
    message = str(info.value)
    assert info.value.reason == "schema-violation"
    assert message.startswith(f"{name} ")
    assert expected in message
    uid = doc.get("uid") or doc.get("datum_id")
    if isinstance(uid, str):
        assert repr(uid) in message
    elif isinstance(uid, list):
        assert repr(uid[0]) in message


@pytest.mark.parametrize("name", ["bulk_events", "bulk_datum", "nonsense", ""])
def test_unknown_kind(name: str) -> None:
    with pytest.raises(ValidationError) as info:
        validate(name, {"uid": "x"})
    assert info.value.reason == "unknown-document"
    assert not isinstance(info.value, SchemaViolation)


def test_not_a_mapping() -> None:
    with pytest.raises(SchemaViolation, match="must be a mapping"):
        validate("event", [1, 2])  # type: ignore[arg-type]


def test_long_values_do_not_blow_up_the_message(docs: dict[str, Doc]) -> None:
    doc = dict(docs["event"], time="x" * 100_000)
    with pytest.raises(SchemaViolation) as info:
        validate("event", doc)
    assert len(str(info.value)) < 1100


def test_deep_nesting_is_a_violation_not_a_crash(docs: dict[str, Doc]) -> None:
    deep: Any = "leaf"
    for _ in range(5000):
        deep = {"k": deep}
    with pytest.raises(SchemaViolation):
        validate("start", dict(docs["start"], md=deep))


def test_validation_does_not_modify_the_document(docs: dict[str, Doc]) -> None:
    """fastjsonschema inserts schema defaults unless told not to."""
    for name in KINDS:
        doc = copy.deepcopy(docs[name])
        validate(name, doc)
        assert doc == docs[name]


# -- numpy ----------------------------------------------------------------------------------
def test_numpy_scalars_and_arrays_are_accepted(docs: dict[str, Doc]) -> None:
    event = dict(docs["event"], seq_num=np.int64(1), time=np.float32(2.5),
                 filled={"img": np.bool_(False)},
                 data=dict(docs["event"]["data"], det=np.float64(1.0),
                           cam=np.ones((4, 3), np.uint16)),
                 timestamps={k: np.float64(1.0) for k in docs["event"]["timestamps"]})
    validate("event", event)
    page = dict(docs["event_page"], seq_num=np.array([2, 3]), time=np.array([1.0, 2.0]),
                uid=np.array(["a", "b"]),
                data=dict(docs["event_page"]["data"], cam=np.ones((2, 4, 3), np.uint16),
                          det=[np.float64(1.0), np.float64(2.0)]),
                timestamps={k: np.array([1.0, 2.0]) for k in docs["event_page"]["timestamps"]},
                filled={"img": np.array([False, False])})
    validate("event_page", page)
    validate("event_page", dict(page, uid=np.array(["a", "b"], dtype=np.dtypes.StringDType())))
    validate("start", dict(docs["start"], scan_id=np.int64(7), time=np.float64(1.0),
                           dims=np.array([1, 2])))
    stop = dict(docs["stop"], num_events={"primary": np.int64(3)})
    validate("stop", stop)
    desc = copy.deepcopy(docs["descriptor"])
    desc["data_keys"]["cam"]["shape"] = [np.int64(4), np.int32(3)]
    desc["configuration"]["det"]["data"]["det_Imax"] = np.int64(1)
    validate("descriptor", desc)
    validate("datum_page", dict(docs["datum_page"], datum_kwargs={"index": np.arange(2)},
                                datum_id=np.array(docs["datum_page"]["datum_id"])))


def test_numpy_values_are_still_checked(docs: dict[str, Doc]) -> None:
    page = docs["event_page"]
    for bad in [dict(page, seq_num=np.array([2.0, 2.5])), dict(page, time=np.array(["a", "b"])),
                dict(page, uid=np.array([1, 2])), dict(page, filled={"img": np.array([1, 0])})]:
        with pytest.raises(SchemaViolation):
            validate("event_page", bad)
    with pytest.raises(SchemaViolation, match="seq_num"):
        validate("event", dict(docs["event"], seq_num=np.float64(1.5)))
    with pytest.raises(SchemaViolation, match="scan_id"):
        validate("start", dict(docs["start"], scan_id=np.float32(1.5)))


# -- the draft-07 translation ---------------------------------------------------------------
@pytest.mark.parametrize("name", KINDS)
def test_compiled_schemas_use_only_draft07(name: str) -> None:
    text = repr(draft07_schema(name))
    for keyword in ("unevaluatedProperties", "prefixItems", "$dynamicRef"):
        assert keyword not in text


def test_translation_refuses_what_it_cannot_express() -> None:
    with pytest.raises(RuntimeError, match="dependentRequired"):
        to_draft07({"type": "object", "dependentRequired": {"a": ["b"]}})
    with pytest.raises(RuntimeError, match="unevaluatedProperties"):
        to_draft07({"allOf": [{"anyOf": [{"type": "object"}]}],
                    "unevaluatedProperties": False})


def test_ref_siblings_become_allof() -> None:
    schema = to_draft07({"$defs": {"A": {"type": "object"}},
                         "properties": {"a": {"$ref": "#/$defs/A", "title": "a",
                                              "additionalProperties": False}}})
    assert schema["properties"]["a"] == {
        "title": "a", "allOf": [{"$ref": "#/$defs/A"}, {"additionalProperties": False}]}


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False)
    | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(["a", "b.c", "d/e", "fields", "NX_class"]), inner,
                      max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(KINDS), data=st.data())
def test_agrees_with_event_model_on_random_changes(
        docs: dict[str, Doc], name: str, data: st.DataObject) -> None:
    """Whatever a field is replaced by, we accept exactly what event-model accepts."""
    doc = copy.deepcopy(docs[name])
    targets = [[k] for k in doc] + [[k, sub] for k, v in doc.items() if isinstance(v, dict)
                                    for sub in v] + [["novel"], ["hints"]]
    path = data.draw(st.sampled_from(targets))
    node = doc
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = data.draw(_json)
    expected = _reference_accepts(name, doc)
    try:
        validate(name, doc)
        accepted = True
    except SchemaViolation:
        accepted = False
    assert accepted == expected, (path, node[path[-1]])
