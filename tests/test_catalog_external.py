"""External data (resource/datum, stream_resource/stream_datum) through the catalog:
filled by handlers on read (``fill=True``), kept as references with ``fill=False``,
replayed faithfully by ``documents()``."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask.array as da
import event_model
import h5py
import numpy as np
import pytest
import xarray as xr
from ophyd.sim import NumpySeqHandler as OphydNumpySeqHandler

import bluestream
from bluestream import handlers
from bluestream.catalog import Catalog
from bluestream.handlers import HandlerNotFound
from test_catalog_support import (  # noqa: F401  (fixtures)
    NPY_SHAPE,
    Docs,
    assert_matches_reference,
    assert_valid_order,
    canonical,
    cat_fixture,
    metadata_uri_fixture,
    now,
    npy_seq_run,
    re_runs,
    reference_stream,
    store_docs_fixture,
    tail_rows_fixture,
)


def uid_of(docs: Docs) -> str:
    return str(docs[0][1]["uid"])


def npy_filler(docs: Docs, handler: Any = OphydNumpySeqHandler) -> Any:
    """Resolve an external value the way databroker does (event_model conventions)."""
    resources = {d["uid"]: d for n, d in docs if n == "resource"}
    datums = {d["datum_id"]: d for n, d in docs if n == "datum"}

    def fill(key: str, datum_id: str) -> Any:
        datum = datums[datum_id]
        res = resources[datum["resource"]]
        return handler(res["resource_path"], root=res["root"])(**datum["datum_kwargs"])

    return fill


@pytest.fixture
def npy_docs(tmp_path: Path) -> Docs:
    return npy_seq_run(tmp_path / "files", n=5, t0=now() - 100)


def test_npy_seq_filled(cat: Catalog, store_docs: Any, npy_docs: Docs) -> None:
    store_docs(npy_docs)
    stream = cat[uid_of(npy_docs)]["primary"]
    ds = stream.read()
    assert ds["frame"].shape == (5, *NPY_SHAPE)
    assert ds["frame"].dtype == np.uint16
    assert ds["frame"].dims == ("time", "dim_0", "dim_1")
    assert_matches_reference(ds, reference_stream(npy_docs, "primary", npy_filler(npy_docs)))
    np.testing.assert_array_equal(ds["frame"].values[2],
                                  np.arange(256, dtype=np.uint16).reshape(NPY_SHAPE) * 3)
    assert ds["frame"].attrs["external"] == "FILESTORE:"


def test_npy_seq_references(cat: Catalog, store_docs: Any, npy_docs: Docs) -> None:
    store_docs(npy_docs)
    ds = cat[uid_of(npy_docs)]["primary"].read(fill=False)
    assert_matches_reference(ds, reference_stream(npy_docs, "primary"))
    assert ds["frame"].values.tolist() == [d["datum_id"] for n, d in npy_docs if n == "datum"]


def test_npy_seq_lazy(cat: Catalog, store_docs: Any, npy_docs: Docs) -> None:
    store_docs(npy_docs)
    stream = cat[uid_of(npy_docs)]["primary"]
    lazy = stream.to_dask()
    assert isinstance(lazy["frame"].data, da.Array)
    xr.testing.assert_identical(lazy.compute(), stream.read())
    xr.testing.assert_identical(stream.to_dask(fill=False).compute(), stream.read(fill=False))


def test_npy_seq_documents(cat: Catalog, store_docs: Any, npy_docs: Docs) -> None:
    store_docs(npy_docs)
    out = list(cat[uid_of(npy_docs)].documents())
    assert_valid_order(out)
    assert canonical(out) == canonical(npy_docs)
    # What comes out can be fed to event-model's Filler, which needs a valid order.
    filler = event_model.Filler({"NPY_SEQ": OphydNumpySeqHandler}, inplace=False)
    filled = [filler(name, doc) for name, doc in out]
    page = next(doc for name, doc in filled if name == "event_page")
    np.testing.assert_array_equal(page["data"]["frame"][0],
                                  np.arange(256, dtype=np.uint16).reshape(NPY_SHAPE))
    filler.close()


def test_event_page_ingest(cat: Catalog, store_docs: Any, tmp_path: Path) -> None:
    docs = npy_seq_run(tmp_path / "paged", n=4, t0=now() - 90, pages=True)
    store_docs(docs)
    stream = cat[uid_of(docs)]["primary"]
    assert_matches_reference(stream.read(), reference_stream(docs, "primary", npy_filler(docs)))
    assert canonical(cat[uid_of(docs)].documents()) == canonical(docs)


def test_runengine_registry_detector(cat: Catalog, store_docs: Any) -> None:
    """ophyd.sim's SynSignalWithRegistry (spec NPY_SEQ), as published by a RunEngine."""
    docs = re_runs()["external"]
    store_docs(docs)
    stream = cat[uid_of(docs)]["primary"]
    ds = stream.read()
    assert ds["ext"].shape == (4, *NPY_SHAPE)
    assert_matches_reference(ds, reference_stream(docs, "primary", npy_filler(docs)))
    lazy = stream.to_dask()  # no dtype_numpy in the descriptor: the first frame tells
    assert isinstance(lazy["ext"].data, da.Array)
    xr.testing.assert_identical(lazy.compute(), ds)


def test_unknown_spec(cat: Catalog, store_docs: Any, tmp_path: Path, metadata_uri: str,
                      zarr_root: Path, tenant: str) -> None:
    docs = npy_seq_run(tmp_path / "odd", n=2, t0=now() - 80, spec="NOT_A_KNOWN_SPEC")
    store_docs(docs)
    stream = cat[uid_of(docs)]["primary"]
    with pytest.raises(HandlerNotFound, match="NOT_A_KNOWN_SPEC") as err:
        stream.read()
    assert "bluestream.handlers.register" in str(err.value)
    assert isinstance(err.value, KeyError)
    with pytest.raises(HandlerNotFound, match="NOT_A_KNOWN_SPEC"):
        stream.to_dask()
    assert stream.read(fill=False).sizes["time"] == 2
    handlers.register("NOT_A_KNOWN_SPEC", handlers.NumpySeqHandler)
    try:
        assert stream.read()["frame"].shape == (2, *NPY_SHAPE)
    finally:
        handlers.unregister("NOT_A_KNOWN_SPEC")
    with bluestream.open_catalog(tenant, metadata=metadata_uri, zarr_root=zarr_root,
                                 handlers={"NOT_A_KNOWN_SPEC": OphydNumpySeqHandler}) as own:
        assert own[uid_of(docs)]["primary"].read()["frame"].shape == (2, *NPY_SHAPE)


def test_root_map(cat: Catalog, store_docs: Any, npy_docs: Docs, tmp_path: Path,
                  metadata_uri: str, zarr_root: Path, tenant: str) -> None:
    store_docs(npy_docs)
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "files", moved)
    with pytest.raises(bluestream.errors.StorageError, match=r"frames_0\.npy"):
        cat[uid_of(npy_docs)]["primary"].read()
    with bluestream.open_catalog(tenant, metadata=metadata_uri, zarr_root=zarr_root,
                                 root_map={str(tmp_path / "files"): str(moved)}) as mapped:
        ds = mapped[uid_of(npy_docs)]["primary"].read()
    assert ds["frame"].shape == (5, *NPY_SHAPE)


# -- HDF5 --------------------------------------------------------------------------------------
def hdf5_frames(n: int) -> np.ndarray:
    return (np.arange(n * 64, dtype=np.uint16) * 7).reshape(n, 8, 8)


@pytest.fixture
def ad_hdf5_docs(tmp_path: Path) -> Iterator[Docs]:
    t0 = now() - 70
    with h5py.File(tmp_path / "det.h5", "w") as f:
        f.create_dataset("/entry/data/data", data=hdf5_frames(4))
    bundle = event_model.compose_run(time=t0, metadata={"scan_id": 5, "plan_name": "count"})
    res = bundle.compose_resource(spec="AD_HDF5", root=str(tmp_path), resource_path="det.h5",
                                  resource_kwargs={"frame_per_point": 1})
    desc = bundle.compose_descriptor(
        name="primary", time=t0,
        data_keys={"det_image": {"dtype": "array", "shape": [8, 8], "source": "PV:det",
                                 "external": "FILESTORE:", "dtype_numpy": "<u2"}})
    docs: Docs = [("start", bundle.start_doc), ("descriptor", desc.descriptor_doc),
                  ("resource", res.resource_doc)]
    for i in range(4):
        datum = res.compose_datum(datum_kwargs={"point_number": i})
        docs.append(("datum", datum))
        docs.append(("event", desc.compose_event(
            data={"det_image": datum["datum_id"]}, timestamps={"det_image": t0 + i},
            filled={"det_image": False}, seq_num=i + 1, time=t0 + i + 1)))
    docs.append(("stop", bundle.compose_stop(time=t0 + 10)))
    yield docs


def test_ad_hdf5(cat: Catalog, store_docs: Any, ad_hdf5_docs: Docs) -> None:
    store_docs(ad_hdf5_docs)
    stream = cat[uid_of(ad_hdf5_docs)]["primary"]
    ds = stream.read()
    np.testing.assert_array_equal(ds["det_image"].values, hdf5_frames(4))
    xr.testing.assert_identical(stream.to_dask().compute(), ds)
    assert canonical(cat[uid_of(ad_hdf5_docs)].documents()) == canonical(ad_hdf5_docs)


def test_rows_of_a_stream_with_stream_datums(cat: Catalog, store_docs: Any, tmp_path: Path,
                                             metadata_uri: str, zarr_root: Path,
                                             tenant: str) -> None:
    """A stream whose rows come from stream datums (two keys of stream resources, no
    events): read(fields) has read()'s rows whichever keys are asked for (none: the rows
    alone), and so do the columns of the Tiled table (seq_num and time alone, as the
    client reads them beside the arrays)."""
    t0 = now() - 60
    path = tmp_path / "two.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("/entry/data/data", data=hdf5_frames(6))
        f.create_dataset("/entry/data/sum", data=np.arange(6, dtype=np.float64))
    bundle = event_model.compose_run(time=t0, metadata={"scan_id": 7, "plan_name": "fly"})
    desc = bundle.compose_descriptor(
        name="primary", time=t0,
        data_keys={"cam": {"dtype": "array", "shape": [8, 8], "source": "PV:cam",
                           "external": "STREAM:", "dtype_numpy": "<u2"},
                   "total": {"dtype": "number", "shape": [], "source": "PV:sum",
                             "external": "STREAM:", "dtype_numpy": "<f8"}})
    docs: Docs = [("start", bundle.start_doc), ("descriptor", desc.descriptor_doc)]
    for key, dataset in (("cam", "/entry/data/data"), ("total", "/entry/data/sum")):
        sres = bundle.compose_stream_resource(
            mimetype="application/x-hdf5", uri=f"file://localhost{path}", data_key=key,
            parameters={"dataset": dataset})
        docs.append(("stream_resource", sres.stream_resource_doc))
        docs.append(("stream_datum", sres.compose_stream_datum(
            indices={"start": 0, "stop": 6}, seq_nums={"start": 1, "stop": 7},
            descriptor=desc.descriptor_doc)))
    docs.append(("stop", bundle.compose_stop(time=t0 + 10)))
    store_docs(docs)
    stream = cat[uid_of(docs)]["primary"]
    whole = stream.read()
    assert whole["seq_num"].values.tolist() == [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal(whole["total"].values, np.arange(6.0))
    xr.testing.assert_identical(stream.read(fields=["total"]), whole[["total"]])
    assert stream.read(fields=[])["seq_num"].values.tolist() == [1, 2, 3, 4, 5, 6]
    pytest.importorskip("tiled.server")
    import anyio

    from bluestream.tiled.adapters import StreamNode

    async def table() -> Any:
        async with bluestream.open_catalog_async(tenant, metadata=metadata_uri,
                                                 zarr_root=zarr_root) as acat:
            node = await StreamNode.load(await acat.lookup(uid_of(docs)), "primary")
            internal = await node.lookup_adapter(["internal"])
            return await internal.read(["seq_num", "time"]), await internal.read(["total"])

    rows, total = anyio.run(table)
    assert rows["seq_num"].tolist() == [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal(total["total"], np.arange(6.0))


def test_stream_resource_hdf5(cat: Catalog, store_docs: Any, tmp_path: Path) -> None:
    """ophyd-async style: no events, frames referenced by stream_datum index ranges."""
    t0 = now() - 60
    path = tmp_path / "flyer.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("/entry/data/data", data=hdf5_frames(6))
    bundle = event_model.compose_run(time=t0, metadata={"scan_id": 6, "plan_name": "fly"})
    desc = bundle.compose_descriptor(
        name="primary", time=t0,
        data_keys={"cam": {"dtype": "array", "shape": [8, 8], "source": "PV:cam",
                           "external": "STREAM:", "dtype_numpy": "<u2"}})
    sres = bundle.compose_stream_resource(
        mimetype="application/x-hdf5", uri=f"file://localhost{path}", data_key="cam",
        parameters={"dataset": "/entry/data/data"})
    docs: Docs = [("start", bundle.start_doc), ("descriptor", desc.descriptor_doc),
                  ("stream_resource", sres.stream_resource_doc)]
    docs.append(("stream_datum", sres.compose_stream_datum(
        indices={"start": 0, "stop": 4}, seq_nums={"start": 1, "stop": 5},
        descriptor=desc.descriptor_doc)))
    docs.append(("stream_datum", sres.compose_stream_datum(
        indices={"start": 4, "stop": 6}, seq_nums={"start": 5, "stop": 7},
        descriptor=desc.descriptor_doc)))
    docs.append(("stop", bundle.compose_stop(time=t0 + 10)))
    store_docs(docs)
    run = cat[uid_of(docs)]
    ds = run["primary"].read()
    assert ds["seq_num"].values.tolist() == [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal(ds["cam"].values, hdf5_frames(6))
    xr.testing.assert_identical(run["primary"].read(uids=False), ds.drop_vars("uid"))
    refs = run["primary"].read(fill=False)["cam"].values.tolist()
    sd_uids = [d["uid"] for n, d in docs if n == "stream_datum"]
    assert refs == [sd_uids[0]] * 4 + [sd_uids[1]] * 2
    out = list(run.documents())
    assert_valid_order(out)
    assert canonical(out) == canonical(docs)
