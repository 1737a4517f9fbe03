"""Scenario 4 - read: ``read()`` of a 100,000-event scalar run and a 1,000-frame image run
through ``bluestream.open_catalog(...)[uid]["primary"].read()`` (Mongo metadata + Zarr)
against the incumbent reading the same runs from suitcase-mongo's layout with PyMongo.

Both sides are written first, outside the timing: bluestream through its own ingest
pipeline (in process, no Kafka), the incumbent through suitcase-mongo's Serializer.
Inline images in Mongo cost ~2.4 MB of BSON per 512x512 frame, so the incumbent stores
and reads a subset of the frames; frames/s are compared. Best of ``read_repeats``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

import bluestream
from benchmarks.checks import Check, equal, frames_match, same_columns
from benchmarks.common import (
    READ_IMAGES_VS_INCUMBENT,
    READ_SCALAR_SECONDS,
    READ_SCALAR_VS_INCUMBENT,
    Context,
    Result,
    bar_chart,
    best_of,
    mb,
    print_table,
    rate,
)
from benchmarks.docs import Run, expected_columns, image_frames, image_run, scalar_run
from benchmarks.incumbent import (
    client_side_seconds,
    count_documents,
    expected_counts,
    read_events,
    write_with_suitcase,
)
from benchmarks.inprocess import ingest_in_process

NAME = "read"
__all__ = ["NAME", "run"]

Doc = dict[str, Any]


def _read_bluestream(tenant: str, uri: str, zarr_root: Path, uid: str) -> Any:
    with bluestream.open_catalog(tenant, metadata=uri, zarr_root=zarr_root) as cat:
        return cat[uid]["primary"].read()


def _columns(ds: Any) -> dict[str, Any]:
    """A bluestream Dataset as the incumbent reader's columns (``data/<key>``, time,
    seq_num, uid), so both are compared with the same expectation."""
    return {"time": ds["time"].values, "seq_num": ds["seq_num"].values,
            "uid": ds["uid"].values, **{f"data/{k}": ds[k].values for k in ds.data_vars}}


def run(ctx: Context) -> Result:
    s = ctx.sizes
    tenant = ctx.tenant("rd")
    inc_db = f"{tenant}_incumbent"
    ctx.mongo_dbs.append(inc_db)
    work = ctx.scratch(NAME)
    zarr_root = work / "zarr"
    uri = ctx.mongo

    # -- write both layouts (not timed) --
    scalars = scalar_run(s.read_scalar_events, fields=s.scalar_fields)
    ingest_in_process(uri, zarr_root, tenant, scalars.docs)
    inc_scalar_docs = _as_pages(scalars, 1000)
    inc_write_s = write_with_suitcase(uri, inc_db, inc_scalar_docs)
    frames = image_frames(s.image_shape)
    images, image_docs = image_run(s.read_image_frames, frames)
    ingest_in_process(uri, zarr_root, tenant, image_docs)
    inc_images, inc_image_docs = image_run(s.read_incumbent_image_frames, frames)
    inc_img_write_s = write_with_suitcase(uri, inc_db, inc_image_docs)
    print(f"  stored {s.read_scalar_events:,} scalar events and {s.read_image_frames:,} "
          f"frames (incumbent: {s.read_incumbent_image_frames:,} frames; suitcase-mongo "
          f"wrote the scalar run in {inc_write_s:.1f} s, the frames in {inc_img_write_s:.1f}"
          " s)")

    checks: list[Check] = [equal("incumbent stored count", count_documents(uri, inc_db),
                                 expected_counts(2, s.read_scalar_events
                                                 + s.read_incumbent_image_frames))]

    # -- read (each reader's result checked against the documents, outside the timing) --
    out: dict[str, Any] = {}
    expected = expected_columns(scalars)
    t_bs, ds = best_of(lambda: _read_bluestream(tenant, uri, zarr_root, scalars.uid),
                     s.read_repeats)
    checks.append(same_columns("read scalar values: bluestream", _columns(ds), expected))
    del ds
    t_inc, cols = best_of(lambda: read_events(uri, inc_db, scalars.descriptor_uid),
                        s.read_repeats)
    checks.append(same_columns("read scalar values: incumbent", cols, expected))
    del cols
    floor_s = client_side_seconds(uri, inc_db, scalars.descriptor_uid)
    out["scalar"] = {"events": s.read_scalar_events,
                     "bluestream": {"seconds": t_bs,
                                    "events_per_s": rate(s.read_scalar_events, t_bs)},
                     "incumbent": {"seconds": t_inc,
                                   "events_per_s": rate(s.read_scalar_events, t_inc),
                                   "client_side_seconds": floor_s},
                     "ratio": t_inc / t_bs, "ratio_to_client_side": floor_s / t_bs}

    frame_mb = mb(frames[0].nbytes)
    t_bs_img, ds = best_of(lambda: _read_bluestream(tenant, uri, zarr_root, images.uid),
                         s.read_repeats)
    checks.append(frames_match("read image values: bluestream", ds["img"].values, frames,
                               s.read_image_frames))
    checks.append(same_columns("read image seq_num: bluestream",
                               {"seq_num": ds["seq_num"].values},
                               {"seq_num": np.arange(1, s.read_image_frames + 1)}))
    del ds
    # ~2.4 MB of BSON per inline 512x512 frame: 6 frames per reply stays under 16 MB.
    t_inc_img, cols = best_of(lambda: read_events(uri, inc_db, inc_images.descriptor_uid,
                                                {"img": "<u2"}, batch_size=6),
                            s.read_repeats)
    checks.append(frames_match("read image values: incumbent", cols["data/img"], frames,
                               s.read_incumbent_image_frames))
    del cols
    floor_img_s = client_side_seconds(uri, inc_db, inc_images.descriptor_uid, {"img": "<u2"},
                                      batch_size=6)
    inc_floor_fps = rate(s.read_incumbent_image_frames, floor_img_s)
    bs_fps = rate(s.read_image_frames, t_bs_img)
    inc_fps = rate(s.read_incumbent_image_frames, t_inc_img)
    out["image"] = {"frames": s.read_image_frames,
                    "incumbent_frames": s.read_incumbent_image_frames,
                    "bluestream": {"seconds": t_bs_img, "frames_per_s": bs_fps,
                                   "mb_per_s": bs_fps * frame_mb},
                    "incumbent": {"seconds": t_inc_img, "frames_per_s": inc_fps,
                                  "mb_per_s": inc_fps * frame_mb,
                                  "client_side_seconds": floor_img_s,
                                  "client_side_frames_per_s": inc_floor_fps},
                    "ratio": bs_fps / inc_fps, "ratio_to_client_side": bs_fps / inc_floor_fps}
    ctx.drop_scratch(work)

    sc, im = out["scalar"], out["image"]
    print_table(["run", "reader", "seconds", "rate", "ratio"], [
        [f"scalar {s.read_scalar_events:,} ev", "bluestream read()", t_bs,
         f"{sc['bluestream']['events_per_s']:,.0f} ev/s", f"{sc['ratio']:.1f}"],
        ["", "incumbent PyMongo", t_inc, f"{sc['incumbent']['events_per_s']:,.0f} ev/s", ""],
        ["", "incumbent, client side only", floor_s,
         f"{rate(s.read_scalar_events, floor_s):,.0f} ev/s",
         f"{sc['ratio_to_client_side']:.1f}"],
        [f"images {s.read_image_frames:,} fr", "bluestream read()", t_bs_img,
         f"{bs_fps:,.0f} fr/s", f"{im['ratio']:.1f}"],
        [f"images {s.read_incumbent_image_frames:,} fr", "incumbent PyMongo", t_inc_img,
         f"{inc_fps:,.1f} fr/s", ""],
        ["", "incumbent, client side only", floor_img_s, f"{inc_floor_fps:,.1f} fr/s",
         f"{im['ratio_to_client_side']:.1f}"],
    ])
    chart = ctx.out / f"{NAME}.png"
    bar_chart(chart, "read(): bluestream catalog vs incumbent (suitcase-mongo layout)",
              ["scalar: bluestream", "scalar: incumbent", "images: bluestream",
               "images: incumbent"],
              [sc["ratio"], 1.0, im["ratio"], 1.0], "speed relative to the incumbent (x)",
              colors=["#4878a8", "#d08040", "#4878a8", "#d08040"],
              hlines=[(READ_SCALAR_VS_INCUMBENT.value,
                       f"{READ_SCALAR_VS_INCUMBENT.value:.0f}x target")])
    return Result(
        NAME,
        params={"scalar_events": s.read_scalar_events, "fields": s.scalar_fields,
                "image_frames": s.read_image_frames, "shape": list(s.image_shape),
                "incumbent_image_frames": s.read_incumbent_image_frames,
                "repeats": s.read_repeats, "metadata": "mongo",
                "incumbent_reader": "PyMongo find(descriptor).sort(seq_num) -> numpy"},
        results={**out, "incumbent_write_s": {"scalar": inc_write_s,
                                              "images": inc_img_write_s}},
        targets=[READ_SCALAR_SECONDS.target(
                     f"read scalar ({s.read_scalar_events:,} events): seconds", t_bs),
                 READ_SCALAR_VS_INCUMBENT.target("read scalar: bluestream / incumbent",
                                                 sc["ratio"]),
                 READ_IMAGES_VS_INCUMBENT.target("read images: bluestream / incumbent",
                                                 im["ratio"])],
        charts=[chart.name], checks=checks,
        notes=["incumbent read = PyMongo + numpy, no databroker: a lower bound on the "
               "incumbent's real cost",
               "incumbent client side only = BSON decoding + columns of the same replies, "
               "server time excluded (mongo-java-server is much slower than mongod)",
               "image rates in frames/s; the incumbent reads a subset",
               f"the absolute target (<= {READ_SCALAR_SECONDS.value} s) is for 100,000 "
               "events; quick mode reads fewer, so its verdict means nothing there"],
    )


def _as_pages(run_: Run, page: int) -> Iterator[tuple[str, Doc]]:
    """The same run with events grouped into event_pages (suitcase-mongo stores one
    ``event`` document per event either way; pages let it use insert_many)."""
    events: list[Doc] = []
    for name, doc in run_.docs:
        if name != "event":
            if events:
                yield "event_page", _page(events)
                events = []
            yield name, doc
            continue
        events.append(doc)
        if len(events) == page:
            yield "event_page", _page(events)
            events = []


def _page(events: list[Doc]) -> Doc:
    keys = list(events[0]["data"])
    return {"descriptor": events[0]["descriptor"], "uid": [e["uid"] for e in events],
            "seq_num": [e["seq_num"] for e in events], "time": [e["time"] for e in events],
            "data": {k: [e["data"][k] for e in events] for k in keys},
            "timestamps": {k: [e["timestamps"][k] for e in events] for k in keys},
            "filled": {}}
