"""The conformance suite every event-array store passes: the layout contract end to end.

Like zarr-python's ``StoreTests`` (and our :class:`storage_conformance.MetadataStoreTests`):
a backend's test module subclasses :class:`ArrayStoreTests` and provides

* ``root``: where that backend's arrays live for one test (a directory, an S3 prefix ...);
* ``make_writer``: ``(root) -> writer``; two calls give two independent writers over the
  same data (a restarted daemon, or a second daemon sharing the run);
* ``make_reader``: ``(root) -> reader`` with :meth:`ArrayReader.read_rows`'s signature;
* ``inspect_store``: ``(root) -> zarr Store`` (read-only) for looking at what was written
  without going through the reader.

The suite writes pages built by :mod:`bluestream.schemas.normalise` from a descriptor
that covers every :class:`~bluestream.layout.FieldSpec` case, and checks group paths,
attributes, array names/dtypes/shapes/chunks/dimension names against
:func:`bluestream.layout.stored_columns`, positional rows (``seq_num == row + 1``,
unwritten rows ``0``), last-wins duplicates, byte-identical replays, growth only, the
returned :class:`~bluestream.storage.base.StreamUpdate`, refusals (``dtype-mismatch``,
``shape-mismatch``, ``bad-key``) and that the reader returns exactly what was written.
Expected contents come from a plain model (:func:`expected_page`), not from the store.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol

import anyio
import event_model
import numpy as np
import pytest
import zarr.api.asynchronous as za
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zarr.abc.store import Store
from zarr.core.array import AsyncArray
from zarr.core.buffer import default_buffer_prototype

from bluestream import layout
from bluestream.catalog.arrays import Rows
from bluestream.errors import Reason, ValidationError
from bluestream.layout import STRING, FieldSpec, Page
from bluestream.limits import Limits
from bluestream.schemas.normalise import page_from_event_page, page_from_events
from bluestream.storage.base import StreamUpdate

__all__ = [
    "DATA_KEYS",
    "DESCRIPTOR",
    "EXPECTED_SPECS",
    "ArrayStoreTests",
    "EventArrayWriter",
    "RowReader",
    "Snapshot",
    "assert_pages_equal",
    "event",
    "events",
    "expected_page",
    "page_of",
]

RUN = "5e6f7a8b-3333-4a00-8000-000000000003"
DESC_UID = "d0d0d0d0-0001-4a00-8000-000000000001"
T0 = 1_709_294_400.0  # 2024-03-01T12:00Z
LIMITS = Limits()


class Snapshot(Protocol):
    def __call__(self, root: Any, prefix: str = "") -> Awaitable[dict[str, str]]: ...


class EventArrayWriter(Protocol):
    async def write_page(self, tenant: str, run_start: str, descriptor: Mapping[str, Any],
                         specs: Mapping[str, FieldSpec], page: Page) -> StreamUpdate: ...


class RowReader(Protocol):
    async def read_rows(self, record: dict[str, Any], keys: Sequence[str], *,
                        start: int = 0, stop: int | None = None,
                        timestamps: bool = True) -> Rows: ...


# -- the descriptor: one data key per FieldSpec case ---------------------------------------
_STRUCTURED = [["x", "<f8"], ["y", "<i4"]]

DATA_KEYS: dict[str, dict[str, Any]] = {
    # number / integer / boolean scalars, with and without dtype_numpy
    "num": {"dtype": "number", "shape": []},
    "num_f4": {"dtype": "number", "shape": [], "dtype_numpy": "<f4"},
    "num_be": {"dtype": "number", "shape": [], "dtype_numpy": ">f8"},  # stored native
    "num_i4": {"dtype": "number", "shape": [], "dtype_numpy": "<i4"},
    "num_u": {"dtype": "number", "shape": [], "dtype_numpy": "<U4"},  # unusable: float64
    "int": {"dtype": "integer", "shape": []},
    "int_u2": {"dtype": "integer", "shape": [], "dtype_numpy": "<u2"},
    "int_f8": {"dtype": "integer", "shape": [], "dtype_numpy": "<f8"},  # not an int: int64
    "bool": {"dtype": "boolean", "shape": []},
    "bool_np": {"dtype": "boolean", "shape": [], "dtype_numpy": "|b1"},
    # string scalar
    "str": {"dtype": "string", "shape": []},
    # arrays: numeric dtype_numpy, and none (the first page decides)
    "img": {"dtype": "array", "shape": [3, 4], "dtype_numpy": "<u2"},
    "spectrum": {"dtype": "array", "shape": [5]},
    # external reference with a filled column
    "ext": {"dtype": "array", "shape": [16, 16], "dtype_numpy": "<u2",
            "external": "FILESTORE:"},
    # JSON text: variable shape, structured dtype list, string array, non-numeric array
    "ragged": {"dtype": "array", "shape": [None]},
    "neg": {"dtype": "array", "shape": [-1, 2], "dtype_numpy": "<f8"},
    "rec": {"dtype": "array", "shape": [], "dtype_numpy": _STRUCTURED},
    "str_arr": {"dtype": "string", "shape": [2]},
    "ustr": {"dtype": "array", "shape": [3], "dtype_numpy": "<U8"},
}
for _key, _entry in DATA_KEYS.items():
    _entry["source"] = f"sim:{_key}"

DESCRIPTOR: dict[str, Any] = {"uid": DESC_UID, "run_start": RUN, "name": "primary",
                              "time": T0, "data_keys": DATA_KEYS, "configuration": {},
                              "object_keys": {"sim": sorted(DATA_KEYS)}}


def _f(key: str, kind: str, dtype: Any, shape: tuple[int, ...] = (), *,
       external: bool = False, variable: bool = False) -> FieldSpec:
    return FieldSpec(key, kind, None if dtype is None else np.dtype(dtype), shape,
                     external=external, variable=variable)


#: What layout.field_specs must make of DATA_KEYS (the layout module docstring's rules).
EXPECTED_SPECS: dict[str, FieldSpec] = {
    "num": _f("num", "number", np.float64),
    "num_f4": _f("num_f4", "number", np.float32),
    "num_be": _f("num_be", "number", "=f8"),
    "num_i4": _f("num_i4", "number", np.int32),
    "num_u": _f("num_u", "number", np.float64),
    "int": _f("int", "integer", np.int64),
    "int_u2": _f("int_u2", "integer", np.uint16),
    "int_f8": _f("int_f8", "integer", np.int64),
    "bool": _f("bool", "boolean", np.bool_),
    "bool_np": _f("bool_np", "boolean", np.bool_),
    "str": _f("str", "string", STRING),
    "img": _f("img", "array", np.uint16, (3, 4)),
    "spectrum": _f("spectrum", "array", None, (5,)),
    "ext": _f("ext", "array", STRING, external=True),
    "ragged": _f("ragged", "array", STRING, variable=True),
    "neg": _f("neg", "array", STRING, variable=True),
    "rec": _f("rec", "array", STRING, variable=True),
    "str_arr": _f("str_arr", "string", STRING, variable=True),
    "ustr": _f("ustr", "array", STRING, variable=True),
}


def _value(key: str, seq: int, v: int) -> Any:
    """A JSON-like value of ``key`` for event ``seq``; ``v`` (variant) tells rewrites apart."""
    values: dict[str, Any] = {
        "num": math.nan if seq % 4 == 0 else seq + 0.25 + 100 * v,
        "num_f4": seq / 3 + v,
        "num_be": -seq * 1e10 - v,
        "num_i4": -7 * seq - v,
        "num_u": seq * 0.5 + v,
        "int": seq * 2**40 + v,
        "int_u2": (31 * seq + v) % 65_536,
        "int_f8": seq + v,
        "bool": (seq + v) % 2 == 0,
        "bool_np": (seq + v) % 3 == 0,
        "str": "" if seq % 5 == 0 else f"µ-{seq}/{v}",
        "img": (np.arange(12).reshape(3, 4) + 12 * seq + v).tolist(),
        "spectrum": [seq + j / 4 + v for j in range(5)],
        "ext": f"res-{v}/{seq}",
        "ragged": [*range(seq % 4), v],
        "neg": [[seq, v]] * (seq % 3),
        "rec": {"x": seq / 2, "y": v},
        "str_arr": [f"a{seq}", f"b{v}"],
        "ustr": ["x", str(seq), str(v)],
    }
    return values[key]


def event(seq: int, v: int = 0, *, descriptor: Mapping[str, Any] = DESCRIPTOR) -> dict[str, Any]:
    time = T0 + seq + v / 1000
    keys = descriptor["data_keys"]
    return {"descriptor": descriptor["uid"], "uid": f"{descriptor['uid'][:8]}-{seq:05d}-{v}",
            "seq_num": seq, "time": time,
            "data": {k: _value(k, seq, v) for k in keys},
            "timestamps": {k: time - 0.5 - i / 100 for i, k in enumerate(keys)},
            "filled": {k: seq % 3 == 0 for k, e in keys.items() if e.get("external")}}


def events(seqs: Sequence[int], v: int = 0, **kw: Any) -> list[dict[str, Any]]:
    return [event(s, v, **kw) for s in seqs]


def specs_of(descriptor: Mapping[str, Any] = DESCRIPTOR) -> dict[str, FieldSpec]:
    return layout.field_specs(descriptor, LIMITS)


def page_of(evs: Sequence[Mapping[str, Any]],
            descriptor: Mapping[str, Any] = DESCRIPTOR) -> Page:
    return page_from_events(evs, specs_of(descriptor), LIMITS)


def expected_page(pages: Sequence[Page]) -> Page:
    """The model: every page's rows, later ones winning per seq_num, in seq_num order."""
    def cat(arrays: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate(arrays)

    seq = cat([p.seq_num for p in pages])
    last = {s: i for i, s in enumerate(seq.tolist())}
    idx = np.array([last[s] for s in sorted(last)], dtype=np.intp)
    first = pages[0]
    return Page(descriptor=first.descriptor, uid=cat([p.uid for p in pages])[idx],
                seq_num=seq[idx], time=cat([p.time for p in pages])[idx],
                data={k: cat([p.data[k] for p in pages])[idx] for k in first.data},
                timestamps={k: cat([p.timestamps[k] for p in pages])[idx]
                            for k in first.timestamps},
                filled={k: cat([p.filled[k] for p in pages])[idx] for k in first.filled})


def assert_pages_equal(got: Page, want: Page) -> None:
    """Column by column: same names, dtypes, shapes and values (NaN equals NaN)."""
    assert got.descriptor == want.descriptor
    for part in ("data", "timestamps", "filled"):
        assert sorted(getattr(got, part)) == sorted(getattr(want, part)), part
    columns = [("uid", got.uid, want.uid), ("seq_num", got.seq_num, want.seq_num),
               ("time", got.time, want.time)]
    for part in ("data", "timestamps", "filled"):
        columns += [(f"{part}/{k}", getattr(got, part)[k], w)
                    for k, w in sorted(getattr(want, part).items())]
    for name, g, w in columns:
        assert g.dtype == w.dtype, f"{name}: dtype {g.dtype} != {w.dtype}"
        np.testing.assert_array_equal(g, w, err_msg=name, strict=True)


def _take(page: Page, sel: slice) -> Page:
    return Page(page.descriptor, page.uid[sel], page.seq_num[sel], page.time[sel],
                {k: v[sel] for k, v in page.data.items()},
                {k: v[sel] for k, v in page.timestamps.items()},
                {k: v[sel] for k, v in page.filled.items()})


def record(*updates: StreamUpdate, length: int | None = None) -> dict[str, Any]:
    """The ``event_stream`` record the metadata store would hold after ``updates``."""
    return {"zarr_path": updates[0].zarr_path, "descriptor_uid": updates[0].descriptor_uid,
            "length": max(u.length for u in updates) if length is None else length}


async def _hash_store(store: Store, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    async for key in store.list_prefix(prefix):
        buf = await store.get(key, prototype=default_buffer_prototype())
        out[key] = hashlib.sha256(b"" if buf is None else buf.to_bytes()).hexdigest()
    return out


class ArrayStoreTests:
    """Subclass and provide ``root``, ``make_writer``, ``make_reader`` and
    ``inspect_store`` (see the module docstring); override ``snapshot`` to hash what a
    backend holds more literally (every file, not every key zarr lists)."""

    pytestmark = pytest.mark.anyio

    #: Tests this backend is known to fail: test name (or name[param]) -> the defect.
    #: They run as ``xfail(strict=True)``, so a fix shows up as a failure to remove them.
    known_defects: ClassVar[dict[str, str]] = {}

    @pytest.fixture(autouse=True)
    def _known_defect(self, request: pytest.FixtureRequest) -> None:
        reason = self.known_defects.get(request.node.name) or \
            self.known_defects.get(request.node.originalname)
        if reason:
            request.applymarker(pytest.mark.xfail(strict=True, reason=reason))

    # -- what a backend provides ------------------------------------------------------
    @pytest.fixture
    def root(self) -> Any:
        raise NotImplementedError("array stores provide root")

    @pytest.fixture
    def make_writer(self) -> Callable[[Any], EventArrayWriter]:
        raise NotImplementedError("array stores provide make_writer")

    @pytest.fixture
    def make_reader(self) -> Callable[[Any], RowReader]:
        raise NotImplementedError("array stores provide make_reader")

    @pytest.fixture
    def inspect_store(self) -> Callable[[Any], Store]:
        raise NotImplementedError("array stores provide inspect_store")

    @pytest.fixture
    def snapshot(self, inspect_store: Callable[[Any], Store]) -> Snapshot:
        """``(root, prefix="") -> {key: sha256}`` of everything stored under root (and
        under ``prefix`` in it, a tenant for example)."""
        return lambda root, prefix="": _hash_store(inspect_store(root), prefix)

    # -- derived ----------------------------------------------------------------------
    @pytest.fixture
    def writer(self, make_writer: Callable[[Any], EventArrayWriter],
               root: Any) -> EventArrayWriter:
        return make_writer(root)

    @pytest.fixture
    def reader(self, make_reader: Callable[[Any], RowReader], root: Any) -> RowReader:
        return make_reader(root)

    @pytest.fixture
    def store(self, inspect_store: Callable[[Any], Store], root: Any) -> Store:
        return inspect_store(root)

    @staticmethod
    async def write(writer: EventArrayWriter, tenant: str, page: Page,
                    descriptor: Mapping[str, Any] = DESCRIPTOR) -> StreamUpdate:
        return await writer.write_page(tenant, str(descriptor["run_start"]), descriptor,
                                       specs_of(descriptor), page)

    @staticmethod
    async def read(reader: RowReader, *updates: StreamUpdate, **kw: Any) -> Page:
        keys = kw.pop("keys", sorted(DATA_KEYS))
        rows = await reader.read_rows(record(*updates, length=kw.pop("length", None)),
                                      keys, **kw)
        return rows.to_page()

    @staticmethod
    async def arrays(store: Store, path: str) -> dict[str, AsyncArray[Any]]:
        """Every array under the group ``path``, by name relative to it (from the
        ``zarr.json`` keys, so files that are not Zarr nodes do not matter here)."""
        names = [key.removeprefix(f"{path}/").removesuffix("/zarr.json")
                 async for key in store.list_prefix(f"{path}/")
                 if key.endswith("/zarr.json") and key != f"{path}/zarr.json"]
        out: dict[str, AsyncArray[Any]] = {}
        for name in names:
            node = await za.open(store=store, path=f"{path}/{name}", mode="r", zarr_format=3)
            if isinstance(node, AsyncArray):
                out[name] = node
            else:
                assert name in ("data", "timestamps", "filled"), f"unexpected group {name}"
        return out

    @staticmethod
    async def seq_nums(store: Store, path: str) -> list[int]:
        arr = await za.open_array(store=store, path=f"{path}/{layout.SEQ_NUM}", mode="r",
                                  zarr_format=3)
        seq = np.asarray(await arr.getitem(slice(None)))
        # The arrays grow by whole chunks: rows past the last written hold seq_num 0.
        assert arr.shape[0] % arr.chunks[0] == 0, (arr.shape, arr.chunks)
        nonzero = np.flatnonzero(seq)
        return seq[: int(nonzero[-1]) + 1 if nonzero.size else 0].tolist()  # type: ignore[no-any-return]

    # -- the layout's field specs (pure) ------------------------------------------------
    def test_field_specs_cover_every_case(self) -> None:
        assert specs_of() == EXPECTED_SPECS
        assert layout.reader_specs(DESCRIPTOR) == EXPECTED_SPECS

    @pytest.mark.parametrize("key", ["a/b", "..", ".hidden", "__x", "a\\b", "a\x00b", ""])
    def test_unsafe_data_key_is_bad_key(self, key: str) -> None:
        desc = {**DESCRIPTOR, "data_keys": {key: {"dtype": "number", "shape": []}}}
        with pytest.raises(ValidationError) as info:
            specs_of(desc)
        assert info.value.reason == Reason.BAD_KEY

    # -- group and arrays ---------------------------------------------------------------
    async def test_group_path_and_attributes(self, writer: EventArrayWriter, store: Store,
                                             tenant: str) -> None:
        update = await self.write(writer, tenant, page_of(events([1, 2])))
        path = layout.descriptor_path(tenant, RUN, DESC_UID)
        assert path == f"{tenant}/{RUN[:2]}/{RUN}/{DESC_UID}"
        assert update.zarr_path == path
        group = await za.open_group(store=store, path=path, mode="r", zarr_format=3)
        attrs = dict(group.attrs)
        assert {k: attrs.get(k) for k in ("descriptor_uid", "run_start", "stream_name",
                                          "schema_version")} == {
            "descriptor_uid": DESC_UID, "run_start": RUN, "stream_name": "primary",
            "schema_version": layout.SCHEMA_VERSION}

    @pytest.mark.parametrize("spectrum", ["float", "int"])
    async def test_arrays_are_the_stored_columns(self, writer: EventArrayWriter,
                                                 store: Store, tenant: str,
                                                 spectrum: str) -> None:
        evs = events([1, 2, 3])
        if spectrum == "int":  # array without dtype_numpy: the first page decides
            for e in evs:
                e["data"]["spectrum"] = [int(x) for x in e["data"]["spectrum"]]
        page = page_of(evs)
        update = await self.write(writer, tenant, page)
        columns = layout.stored_columns(specs_of(), page) + \
            layout.summary_columns(specs_of(), page)
        arrays = await self.arrays(store, update.zarr_path)
        assert sorted(arrays) == sorted(c.name for c in columns)
        assert arrays["data/spectrum"].dtype == (np.int64 if spectrum == "int" else np.float64)
        for col in columns:
            arr = arrays[col.name]
            assert arr.dtype == np.dtype(col.dtype), col.name
            # whole chunks of headroom past the 3 events written (their one window)
            rows = layout.summary_length(3) if col.name == layout.SUMMARY else 3
            assert arr.shape == (col.chunk_events * -(-rows // col.chunk_events),
                                 *col.shape), col.name
            assert arr.chunks == (col.chunk_events, *col.shape), col.name
            assert arr.metadata.dimension_names == col.dimension_names, \
                col.name  # type: ignore[union-attr]
            fill = arr.metadata.fill_value
            assert fill == col.fill_value or (np.isnan(fill) and np.isnan(col.fill_value)), \
                col.name

    # -- positions ----------------------------------------------------------------------
    async def test_row_i_holds_seq_num_i_plus_1(self, writer: EventArrayWriter,
                                                reader: RowReader, store: Store,
                                                tenant: str) -> None:
        page = page_of(events([5, 2, 3]))
        update = await self.write(writer, tenant, page)
        assert update.length == 5
        assert await self.seq_nums(store, update.zarr_path) == [0, 2, 3, 0, 5]
        rows = await reader.read_rows(record(update), sorted(DATA_KEYS))
        assert rows.positions.tolist() == [1, 2, 4]
        assert_pages_equal(rows.to_page(), expected_page([page]))

    async def test_duplicates_and_disorder_later_wins(self, writer: EventArrayWriter,
                                                      reader: RowReader, store: Store,
                                                      tenant: str) -> None:
        first = page_of([event(4), event(1), event(3), event(1, 1), event(2), event(4, 1)])
        second = page_of([event(2, 2), event(6), event(2, 3)])
        updates = [await self.write(writer, tenant, p) for p in (first, second)]
        model = expected_page([first, second])
        assert model.uid.tolist() == [event(s, v)["uid"] for s, v in
                                      [(1, 1), (2, 3), (3, 0), (4, 1), (6, 0)]]
        assert await self.seq_nums(store, updates[0].zarr_path) == [1, 2, 3, 4, 0, 6]
        assert_pages_equal(await self.read(reader, *updates), model)

    async def test_event_page_documents(self, writer: EventArrayWriter, reader: RowReader,
                                        tenant: str) -> None:
        evs = [event(3), event(1), event(2), event(1, 1)]
        doc = event_model.pack_event_page(*evs)
        page = page_from_event_page(doc, specs_of(), LIMITS)
        update = await self.write(writer, tenant, page)
        got = await self.read(reader, update)
        assert_pages_equal(got, expected_page([page]))
        assert_pages_equal(got, expected_page([page_of(evs)]))

    async def test_gap_then_filled(self, writer: EventArrayWriter, reader: RowReader,
                                   store: Store, tenant: str) -> None:
        pages = [page_of(events([1, 2, 3])), page_of(events([7, 8]))]
        updates = [await self.write(writer, tenant, p) for p in pages]
        path = updates[0].zarr_path
        assert await self.seq_nums(store, path) == [1, 2, 3, 0, 0, 0, 7, 8]
        assert_pages_equal(await self.read(reader, *updates), expected_page(pages))
        pages.append(page_of(events([6, 4, 5])))
        updates.append(await self.write(writer, tenant, pages[-1]))
        assert updates[-1].length == 6  # this write's reach; the record keeps the max, 8
        assert await self.seq_nums(store, path) == list(range(1, 9))
        assert_pages_equal(await self.read(reader, *updates), expected_page(pages))

    async def test_arrays_only_grow(self, make_writer: Callable[[Any], EventArrayWriter],
                                    root: Any, reader: RowReader, store: Store,
                                    tenant: str) -> None:
        pages = [page_of(events(range(1, 13)))]
        updates = [await self.write(make_writer(root), tenant, pages[0])]
        for w in (make_writer(root), make_writer(root)):  # a restarted writer too
            pages.append(page_of(events([3, 4], v=len(pages))))
            updates.append(await self.write(w, tenant, pages[-1]))
            assert updates[-1].length == 4  # what this write reached; stores merge by max
            arrays = await self.arrays(store, updates[0].zarr_path)
            assert all(a.shape[0] >= 12 and a.shape[0] % a.chunks[0] == 0
                       for a in arrays.values())
            assert await self.seq_nums(store, updates[0].zarr_path) == list(range(1, 13))
        assert_pages_equal(await self.read(reader, *updates), expected_page(pages))

    # -- replay -------------------------------------------------------------------------
    async def test_replay_writes_identical_bytes(
            self, make_writer: Callable[[Any], EventArrayWriter], root: Any,
            snapshot: Snapshot, tenant: str) -> None:
        pages = [page_of(events([1, 2, 3])), page_of(events([9, 10])),
                 page_of([event(2, 1), event(5), event(2, 2)])]
        writer = make_writer(root)
        updates = [await self.write(writer, tenant, p) for p in pages]
        before = await snapshot(root)
        assert before
        for w in (writer, make_writer(root)):  # the same writer, and a restarted one
            again = [await self.write(w, tenant, p) for p in pages]
            assert again[1:] == updates[1:]
            assert await snapshot(root) == before
        # a replay of only a suffix changes nothing either
        await self.write(make_writer(root), tenant, pages[-1])
        assert await snapshot(root) == before

    # -- the stream update --------------------------------------------------------------
    async def test_stream_update(self, writer: EventArrayWriter, tenant: str) -> None:
        evs = events([3, 1, 2])
        for e, t in zip(evs, (T0 + 5, T0 + 9, T0 + 1), strict=True):  # times not by seq
            e["time"] = t
        update = await self.write(writer, tenant, page_of(evs))
        assert update == StreamUpdate(
            descriptor_uid=DESC_UID, run_start=RUN, stream_name="primary",
            zarr_path=layout.descriptor_path(tenant, RUN, DESC_UID), length=3,
            seq_num_min=1, seq_num_max=3, time_min=T0 + 1, time_max=T0 + 9,
            data_keys=tuple(sorted(DATA_KEYS)), schema_version=layout.SCHEMA_VERSION)
        later = await self.write(writer, tenant, page_of(events([2])))
        assert (later.length, later.seq_num_min, later.seq_num_max) == (2, 2, 2)
        assert (later.time_min, later.time_max) == (T0 + 2, T0 + 2)

    # -- refusals -----------------------------------------------------------------------
    async def test_first_page_decides_then_dtype_mismatch(
            self, writer: EventArrayWriter,
            snapshot: Snapshot, root: Any,
            tenant: str) -> None:
        ints = events([1, 2])
        for e in ints:
            e["data"]["spectrum"] = [int(x) for x in e["data"]["spectrum"]]
        await self.write(writer, tenant, page_of(ints))
        before = await snapshot(root)
        with pytest.raises(ValidationError) as info:
            await self.write(writer, tenant, page_of(events([3])))  # floats now
        assert info.value.reason == Reason.DTYPE_MISMATCH
        assert "spectrum" in str(info.value)
        assert await snapshot(root) == before  # a refused page writes nothing

    @pytest.mark.parametrize(("key", "change", "reason"), [
        ("img", {"dtype_numpy": "<f4"}, Reason.DTYPE_MISMATCH),
        ("img", {"dtype_numpy": "<c8"}, Reason.DTYPE_MISMATCH),
        ("bool", {"dtype": "number"}, Reason.DTYPE_MISMATCH),
        ("bool", {"dtype": "integer"}, Reason.DTYPE_MISMATCH),
        ("img", {"shape": [4, 3]}, Reason.SHAPE_MISMATCH),
        ("spectrum", {"shape": [6]}, Reason.SHAPE_MISMATCH),
        ("num", {"shape": [2], "dtype": "array", "dtype_numpy": "<f8"}, Reason.SHAPE_MISMATCH),
    ], ids=lambda x: str(x) if not isinstance(x, Reason) else x.value)
    async def test_changed_descriptor_is_refused(
            self, writer: EventArrayWriter,
            snapshot: Snapshot, root: Any, tenant: str,
            key: str, change: dict[str, Any], reason: Reason) -> None:
        await self.write(writer, tenant, page_of(events([1, 2])))
        before = await snapshot(root)
        changed = {**DESCRIPTOR, "data_keys": {**DATA_KEYS, key: {**DATA_KEYS[key], **change}}}
        spec = specs_of(changed)[key]
        evs = events([3], descriptor=changed)
        evs[0]["data"][key] = (np.zeros(spec.shape, dtype=spec.dtype or np.float64).tolist()
                               if spec.kind != "string" else "x")
        with pytest.raises(ValidationError) as info:
            await self.write(writer, tenant, page_of(evs, changed), changed)
        assert info.value.reason == reason
        assert f"data/{key}" in str(info.value)
        assert await snapshot(root) == before

    @pytest.mark.parametrize(("tenant_", "run", "desc"), [
        ("a/b", RUN, DESC_UID), ("..", RUN, DESC_UID), ("", RUN, DESC_UID),
        (".hidden", RUN, DESC_UID), ("t", "../../etc", DESC_UID), ("t", "ab/cd", DESC_UID),
        ("t", "ab..cd", DESC_UID), ("t", RUN, "x/../y"), ("t", RUN, ".."), ("t", RUN, "a\\b"),
        ("t", RUN, "d" * 256),
    ])
    async def test_unsafe_names_are_bad_key(
            self, writer: EventArrayWriter,
            snapshot: Snapshot, root: Any,
            tenant_: str, run: str, desc: str) -> None:
        descriptor = {**DESCRIPTOR, "uid": desc, "run_start": run}
        page = page_of(events([1], descriptor=descriptor), descriptor)
        before = await snapshot(root)
        with pytest.raises(ValidationError) as info:
            await writer.write_page(tenant_, run, descriptor, specs_of(descriptor), page)
        assert info.value.reason == Reason.BAD_KEY
        assert await snapshot(root) == before

    # -- the reader ---------------------------------------------------------------------
    async def test_reader_windows_and_record_length(self, writer: EventArrayWriter,
                                                    reader: RowReader, tenant: str) -> None:
        page = page_of(events([1, 2, 3, 4, 6, 7]))
        update = await self.write(writer, tenant, page)
        model = expected_page([page])
        # the record's length bounds what is read (the arrays may be ahead of it)
        assert_pages_equal(await self.read(reader, update, length=4), _take(model, slice(0, 4)))
        assert_pages_equal(await self.read(reader, update, start=2, stop=6),
                           _take(model, slice(2, 5)))  # positions 2..5: seq 3, 4, 6
        assert_pages_equal(await self.read(reader, update, length=0), _take(model, slice(0, 0)))
        some = await self.read(reader, update, keys=["img", "ext"], timestamps=False)
        assert sorted(some.data) == ["ext", "img"]
        assert some.timestamps == {}
        assert sorted(some.filled) == ["ext"]
        np.testing.assert_array_equal(some.data["img"], model.data["img"], strict=True)
        np.testing.assert_array_equal(some.filled["ext"], model.filled["ext"], strict=True)

    async def test_descriptors_and_tenants_are_separate(self, writer: EventArrayWriter,
                                                        reader: RowReader,
                                                        tenant: str) -> None:
        other = {**DESCRIPTOR, "uid": "d0d0d0d0-0002-4a00-8000-000000000002",
                 "name": "baseline"}
        a, b = page_of(events([1, 2])), page_of(events([1, 2, 3], v=1, descriptor=other), other)
        c = page_of(events([2], v=2))
        ua = await self.write(writer, tenant, a)
        ub = await self.write(writer, tenant, b, other)
        uc = await self.write(writer, tenant + "x", c)
        assert len({ua.zarr_path, ub.zarr_path, uc.zarr_path}) == 3
        assert ub.stream_name == "baseline"
        assert_pages_equal(await self.read(reader, ua), a)
        assert_pages_equal(await self.read(reader, ub), b)
        assert_pages_equal(await self.read(reader, uc), c)

    @settings(max_examples=10, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(st.lists(st.tuples(st.integers(1, 24), st.integers(0, 3)),
                             min_size=1, max_size=6), min_size=1, max_size=4),
           st.integers(0, 3))
    async def test_any_pages_read_back_as_the_model(
            self, writer: EventArrayWriter, reader: RowReader,
            snapshot: Snapshot, root: Any,
            batches: list[list[tuple[int, int]]], replay_from: int) -> None:
        """Any pages, in any order, with duplicates, then a replay of any suffix: the
        reader returns the model and the replay changes no byte. The writer and root
        are shared by the examples, so each example gets its own tenant."""
        tenant = "h" + uuid.uuid4().hex[:12]
        pages = [page_of([event(s, v) for s, v in batch]) for batch in batches]
        updates = [await self.write(writer, tenant, p) for p in pages]
        model = expected_page(pages)
        assert_pages_equal(await self.read(reader, *updates), model)
        before = await snapshot(root, tenant)
        for p in pages[min(replay_from, len(pages) - 1):]:
            await self.write(writer, tenant, p)
        assert await snapshot(root, tenant) == before

    # -- known defects (see the backend module for the xfail markers) -------------------
    @pytest.mark.parametrize("case", ["int32-then-2**40", "float32-then-1e300",
                                      "string-then-number"])
    async def test_values_are_never_stored_changed(self, writer: EventArrayWriter,
                                                   reader: RowReader, tenant: str,
                                                   case: str) -> None:
        """A page whose values the stored array cannot hold as they are is refused
        (dtype-mismatch); it is never stored converted. The first two: an array key
        without dtype_numpy took the first page's dtype (msgpack-numpy keeps an
        array's own dtype); the third: a changed descriptor sends numbers to a string
        column."""
        key, descriptor = "spectrum", DESCRIPTOR
        first = events([1])
        second = events([2])
        if case == "int32-then-2**40":
            first[0]["data"][key] = np.arange(5, dtype=np.int32)
            second[0]["data"][key] = [2**40, -(2**40), 1, 2, 3]
        elif case == "float32-then-1e300":
            first[0]["data"][key] = np.arange(5, dtype=np.float32)
            second[0]["data"][key] = [1e300, 0.1, 1.0, 2.0, 3.0]
        else:
            key = "str"
            descriptor = {**DESCRIPTOR,
                          "data_keys": {**DATA_KEYS, key: {**DATA_KEYS[key], "dtype": "number"}}}
            second = events([2], descriptor=descriptor)
            second[0]["data"][key] = 0.5
        await self.write(writer, tenant, page_of(first))
        page = page_of(second, descriptor)
        try:
            update = await self.write(writer, tenant, page, descriptor)
        except ValidationError as exc:
            assert exc.reason == Reason.DTYPE_MISMATCH
            return
        got = await self.read(reader, update, keys=[key])
        np.testing.assert_array_equal(got.data[key][1:], page.data[key], strict=True)

    async def test_concurrent_writers_keep_every_row(
            self, make_writer: Callable[[Any], EventArrayWriter], root: Any,
            store: Store, tenant: str) -> None:
        """Two writers (daemons sharing a run across a partition handover) writing
        disjoint rows of one descriptor at once: both writes returned, so both land."""
        lost: list[int] = []
        for round_ in range(40):  # a race: where it exists, about half the rounds lose rows
            desc = {**DESCRIPTOR, "uid": f"d0d0d0d0-{round_:04d}-4a00-8000-00000000000c",
                    "data_keys": {"num": DATA_KEYS["num"]}}
            a, b = make_writer(root), make_writer(root)
            update = await self.write(a, tenant, page_of(events([1, 64], descriptor=desc),
                                                         desc), desc)
            await self.write(b, tenant, page_of(events([1], descriptor=desc), desc), desc)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.write, a, tenant,
                              page_of(events(range(2, 33), descriptor=desc), desc), desc)
                tg.start_soon(self.write, b, tenant,
                              page_of(events(range(33, 64), descriptor=desc), desc), desc)
            seq = await self.seq_nums(store, update.zarr_path)
            lost = [i + 1 for i, s in enumerate(seq) if s != i + 1]
            if lost:
                break
        assert lost == [], f"round {round_}: rows of seq_num {lost} were lost"

    async def test_group_holds_only_zarr_nodes(self, writer: EventArrayWriter, store: Store,
                                               tenant: str) -> None:
        """Everything under a descriptor group is a Zarr node, so generic Zarr tools
        (zarr's own member listing, xarray) read it without complaint."""
        update = await self.write(writer, tenant, page_of(events([1, 2])))
        prefix = f"{update.zarr_path}/"
        page = page_of(events([1]))
        columns = {c.name for c in layout.stored_columns(specs_of(), page)
                   + layout.summary_columns(specs_of(), page)}
        nodes = {"", "data", "timestamps", "filled"} | columns

        def node_of(key: str) -> str | None:
            rel = key.removeprefix(prefix)
            if rel == "zarr.json":
                return ""
            if rel.endswith("/zarr.json"):
                return rel.removesuffix("/zarr.json")
            return rel.split("/c/")[0] if "/c/" in rel else None  # a chunk, or a stray

        strays = [k async for k in store.list_prefix(prefix) if node_of(k) not in nodes]
        assert strays == [], f"not Zarr nodes of the group: {strays}"
