"""Scenario 8 - the Zarr root on S3 (issue 13).

Images: 512x512 uint16 frames as single events, ingested by the daemon (Mongo metadata)
with its Zarr root on the S3 server of ``scripts/services`` (S3Proxy, filesystem
backend), against a plain Zarr write of the same frames to the same server with the same
store class (zarr's ``ObjectStore`` over obstore's ``S3Store``), the same chunks and
codecs as the daemon's array, in chunk-aligned blocks. Scalar single events: the same
daemon with the root on S3 against the root on local disk (reported, no target).

S3 endpoint and credentials: ``BLUESTREAM_S3_ENDPOINT`` (default the local server,
``http://127.0.0.1:9000``), ``BLUESTREAM_S3_ACCESS_KEY_ID`` /
``BLUESTREAM_S3_SECRET_ACCESS_KEY`` / ``BLUESTREAM_S3_BUCKET`` (defaults those of
``scripts/services``). Objects are written under ``bench-<run id>/`` and removed after.
"""

from __future__ import annotations

import os
from typing import Any

import obstore
import zarr
from obstore.store import S3Store
from zarr.storage import ObjectStore

from benchmarks.checks import Check, equal, frames_match, no_data_loss
from benchmarks.common import (
    IMAGES_S3_VS_PLAIN,
    Context,
    Result,
    bar_chart,
    mb,
    print_table,
    rate,
)
from benchmarks.docs import image_frames, image_run, scalar_run
from benchmarks.image_ingest import plain_zarr_write
from benchmarks.infra import checked_ingest, create_topic, publish
from bluestream.consumers.decode import encode_message
from bluestream.layout import descriptor_path
from bluestream.storage.zarr_root import S3Options, ZarrRoot

NAME = "object_store"
__all__ = ["NAME", "run"]

ENDPOINT = os.environ.get("BLUESTREAM_S3_ENDPOINT", "http://127.0.0.1:9000")
BUCKET = os.environ.get("BLUESTREAM_S3_BUCKET", "bluestream")
KEY = os.environ.get("BLUESTREAM_S3_ACCESS_KEY_ID", "bluestream")
SECRET = os.environ.get("BLUESTREAM_S3_SECRET_ACCESS_KEY", "bluestream-secret")
ENV = {"AWS_ENDPOINT_URL": ENDPOINT, "AWS_ACCESS_KEY_ID": KEY,
       "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1"}


def _root(prefix: str) -> ZarrRoot:
    return ZarrRoot.parse(f"s3://{BUCKET}/{prefix}", S3Options(ENDPOINT, None, KEY, SECRET))


def _plain_store(prefix: str) -> ObjectStore[S3Store]:
    return ObjectStore(S3Store(BUCKET, prefix=prefix, config={
        "endpoint": ENDPOINT, "access_key_id": KEY, "secret_access_key": SECRET,
        "region": "us-east-1"}, client_options={"allow_http": True}))


def _remove(prefix: str) -> int:
    """Delete every object under ``prefix`` (one DELETE each: S3Proxy refuses bulk
    deletes). Returns how many."""
    store = _root(prefix).object_store()
    n = 0
    for batch in obstore.list(store.store):
        for meta in batch:
            store.delete_sync(meta["path"])
            n += 1
    return n


def run(ctx: Context) -> Result:
    s = ctx.sizes
    prefix = f"bench-{ctx.run_id}"
    checks: list[Check] = []
    results: dict[str, Any] = {}
    try:
        results["images"] = _images(ctx, s.s3_image_frames, f"{prefix}/img", checks)
        results["scalar"] = _scalar(ctx, s.s3_scalar_events, f"{prefix}/scalar", checks)
    finally:
        removed = _remove(prefix) if not ctx.keep else 0
    img, sc = results["images"], results["scalar"]
    print_table(["what", "S3", "baseline", "ratio"], [
        ["images: bluestream vs plain zarr on S3 (MB/s)", img["bluestream_mb_per_s"],
         img["plain_zarr_mb_per_s"], f"{img['ratio']:.2f}"],
        ["scalar events: S3 vs local disk (events/s)", sc["s3_events_per_s"],
         sc["local_events_per_s"], f"{sc['ratio']:.2f}"],
    ])
    chart = ctx.out / f"{NAME}.png"
    bar_chart(chart, "Zarr root on S3 (the local S3Proxy server)",
              ["images: bluestream\n(MB/s)", "images: plain zarr\n(MB/s)"],
              [img["bluestream_mb_per_s"], img["plain_zarr_mb_per_s"]], "MB/s")
    return Result(
        NAME,
        params={"endpoint": ENDPOINT, "bucket": BUCKET, "server": "S3Proxy 2.6.0, filesystem "
                "backend (scripts/services)", "store_class": "zarr.storage.ObjectStore + "
                "obstore S3Store", "image_frames": s.s3_image_frames, "image_shape": [512, 512],
                "scalar_events": s.s3_scalar_events, "metadata": "mongo"},
        results={**results, "objects_removed": removed},
        targets=[IMAGES_S3_VS_PLAIN.target("images on S3: bluestream / plain zarr on S3",
                                           img["ratio"])],
        charts=[chart.name], checks=checks,
        notes=["MB = 10^6 bytes of image data; plain zarr time excludes building blocks",
               "the S3 server runs on the same 2 cores as the daemon and the client",
               "scalar: 10-float single events, default tail (rows reach S3 a block of 256 "
               "at a time); local: the same daemon with a local Zarr root"],
    )


def _images(ctx: Context, n: int, prefix: str, checks: list[Check]) -> dict[str, Any]:
    tenant = ctx.tenant("s3img")
    topic = ctx.topic(tenant)
    create_topic(ctx.kafka, topic, 1)
    frames = image_frames((512, 512))
    total_mb = mb(frames[0].nbytes * n)
    run_, docs = image_run(n, frames)
    publish(ctx.kafka, topic, ((run_.uid.encode(), encode_message(name, doc), -1)
                               for name, doc in docs))
    work = ctx.scratch(f"{NAME}-img")
    timing, _, failures = checked_ingest(
        kafka=ctx.kafka, topic=topic, group=f"g-{topic}", backend="mongo", mongo=ctx.mongo,
        tenant=tenant, work=work, expected=(1, n, 1), extra_env=ENV,
        zarr_root=lambda attempt: f"s3://{BUCKET}/{prefix}/daemon-{attempt}")
    checks.append(no_data_loss("daemon, Zarr root on S3", failures))
    ctx.drop_scratch(work)
    daemon_mbps = total_mb / timing.seconds
    root = _root(f"{prefix}/daemon-{len(failures)}")
    written = zarr.open_array(root.object_store(read_only=True), mode="r", path=descriptor_path(
        tenant, run_.uid, run_.descriptor_uid) + "/data/img")
    checks.append(frames_match("frames on S3 bit-exact", written, frames, n))
    plain_s = plain_zarr_write(_plain_store(f"{prefix}/plain"), frames, n, written)
    plain_mbps = total_mb / plain_s
    print(f"  images on S3: bluestream {daemon_mbps:,.0f} MB/s "
          f"({rate(n, timing.seconds):,.0f} frames/s), plain zarr {plain_mbps:,.0f} MB/s; "
          f"peak RSS {timing.peak_rss:.0f} MB")
    return {"frames": n, "bluestream": timing.as_dict(), "bluestream_mb_per_s": daemon_mbps,
            "plain_zarr_s": plain_s, "plain_zarr_mb_per_s": plain_mbps,
            "ratio": daemon_mbps / plain_mbps, "chunks": list(written.chunks),
            "data_loss_retries": failures}


def _scalar(ctx: Context, n: int, prefix: str, checks: list[Check]) -> dict[str, Any]:
    runs = 4
    per_run = max(1, n // runs)
    out: dict[str, Any] = {"events": per_run * runs}
    for where in ("s3", "local"):
        tenant = ctx.tenant(f"s3sc{where}")
        topic = ctx.topic(tenant)
        create_topic(ctx.kafka, topic, 1)
        made = [scalar_run(per_run, scan_id=i + 1) for i in range(runs)]
        publish(ctx.kafka, topic, ((r.uid.encode(), encode_message(name, doc), -1)
                                   for r in made for name, doc in r.docs))
        work = ctx.scratch(f"{NAME}-scalar-{where}")
        root = (lambda attempt: f"s3://{BUCKET}/{prefix}/daemon-{attempt}") \
            if where == "s3" else None
        timing, _, failures = checked_ingest(
            kafka=ctx.kafka, topic=topic, group=f"g-{topic}", backend="mongo",
            mongo=ctx.mongo, tenant=tenant, work=work, expected=(runs, per_run * runs, runs),
            extra_env=ENV if where == "s3" else None, zarr_root=root)
        checks.append(no_data_loss(f"daemon, scalar events, Zarr root {where}", failures))
        ctx.drop_scratch(work)
        out[f"{where}_events_per_s"] = rate(per_run * runs, timing.seconds)
        out[f"{where}_seconds"] = timing.seconds
        print(f"  scalar events, root {where}: {out[f'{where}_events_per_s']:,.0f} events/s")
    out["ratio"] = out["s3_events_per_s"] / out["local_events_per_s"]
    checks.append(equal("scalar runs stored on both roots", out["events"], per_run * runs))
    return out
