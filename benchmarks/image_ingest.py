"""Scenario 2 - image ingest: 512x512 uint16 frames as single events, already in Kafka.

bluestream end to end (daemon subprocess, Mongo metadata, until committed) against the
storage limit: a plain Zarr write of the same frames into an array with the chunking and
codecs the daemon chose (read back from what it wrote), in chunk-aligned blocks.
The daemon's resident memory is sampled throughout (this is the 1 GB ingest whose peak
RSS scenario 5 asks for): it must stay bounded by ``limits.batch_max_bytes`` and co.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import zarr

from benchmarks.checks import Check, equal, frames_match, no_data_loss
from benchmarks.common import Context, Result, Target, fmt, mb, plt, print_table, rate
from benchmarks.docs import image_frames, image_run
from benchmarks.infra import checked_ingest, create_topic, end_offsets, publish
from benchmarks.scalar_ingest import raw_consume
from bluestream.consumers.decode import encode_message
from bluestream.layout import descriptor_path
from bluestream.settings import LimitSettings

NAME = "image_ingest"
__all__ = ["NAME", "plain_zarr_write", "run"]

BLOCK_CHUNKS = 16  # chunks per write call in the plain-Zarr baseline


def plain_zarr_write(path: Path, frames: list[np.ndarray], n: int,
                     like: zarr.Array[Any]) -> float:
    """Write ``n`` frames (taken from ``frames`` in turn) like the daemon's array;
    returns seconds spent in Zarr (building the blocks is not counted)."""
    shape = frames[0].shape
    arr = zarr.create_array(store=str(path), shape=(n, *shape), chunks=like.chunks,
                            dtype=like.dtype, fill_value=like.fill_value,
                            compressors=like.compressors, serializer=like.serializer,
                            filters=like.filters, dimension_names=("event", "dim_0", "dim_1"))
    block = like.chunks[0] * BLOCK_CHUNKS
    spent = 0.0
    for start in range(0, n, block):
        stop = min(n, start + block)
        data = np.stack([frames[i % len(frames)] for i in range(start, stop)])
        t = time.perf_counter()
        arr[start:stop] = data
        spent += time.perf_counter() - t
    return spent


#: The what-if: zarr's own setting, by environment, no code change. With it zarr skips
#: comparing every chunk against the fill value before writing (``NDBuffer.all_equal``,
#: on the daemon's event-loop thread).
WEC_ENV = {"ZARR_ARRAY__WRITE_EMPTY_CHUNKS": "True"}


def run(ctx: Context) -> Result:
    s = ctx.sizes
    tenant = ctx.tenant("img")
    topic = ctx.topic(tenant)
    create_topic(ctx.kafka, topic, 1)
    frames = image_frames(s.image_shape)
    frame_bytes = frames[0].nbytes
    total_bytes = frame_bytes * s.image_frames
    total_mb = mb(total_bytes)
    run_, docs = image_run(s.image_frames, frames)
    key = run_.uid.encode()
    _, wire_bytes, pub_s = publish(ctx.kafka, topic,
                                   ((key, encode_message(name, doc), -1) for name, doc in docs))
    print(f"  published {s.image_frames:,} frames {s.image_shape} uint16 "
          f"({mb(wire_bytes):,.0f} MB on the wire) in {pub_s:.1f} s")

    checks: list[Check] = []
    msgs, _, raw_s = anyio.run(raw_consume, ctx.kafka, topic, end_offsets(ctx.kafka, topic))
    checks.append(equal("raw consume saw every message", msgs, s.image_frames + 3))
    raw_mbps = total_mb / raw_s
    print(f"  (a) raw aiokafka consume+decode: {raw_mbps:,.0f} MB/s")

    work = ctx.scratch(NAME)
    timing, _, failures = checked_ingest(
        kafka=ctx.kafka, topic=topic, group=f"g-{topic}", backend="mongo", mongo=ctx.mongo,
        tenant=tenant, work=work, expected=(1, s.image_frames, 1))
    checks.append(no_data_loss("daemon", failures))
    daemon_mbps = total_mb / timing.seconds
    peak = timing.peak_rss_mb[0]
    print(f"  (b) bluestream: {daemon_mbps:,.0f} MB/s "
          f"({rate(s.image_frames, timing.seconds):,.0f} frames/s, {timing.seconds:.1f} s), "
          f"peak RSS {peak:.0f} MB")

    written = zarr.open_array(str(work / "zarr"), mode="r", path=descriptor_path(
        tenant, run_.uid, run_.descriptor_uid) + "/data/img")
    # The daemon stored every frame bit-exactly (read back in blocks, not timed).
    checks.append(frames_match("daemon stored frames bit-exact", written, frames,
                               s.image_frames))
    chunking = {"chunks": list(written.chunks), "compressors": repr(written.compressors),
                "write_empty_chunks": bool(zarr.config.get("array.write_empty_chunks"))}
    plain_s = plain_zarr_write(work / "plain.zarr", frames, s.image_frames, written)
    plain_mbps = total_mb / plain_s
    print(f"  (c) plain zarr write: {plain_mbps:,.0f} MB/s ({plain_s:.1f} s; chunks "
          f"{written.chunks}, {written.compressors})")
    with zarr.config.set({"array.write_empty_chunks": True}):
        plain_wec_s = plain_zarr_write(work / "plain-wec.zarr", frames, s.image_frames,
                                       written)
    ctx.drop_scratch(work)

    # What-if: the same daemon with write_empty_chunks (environment only).
    work = ctx.scratch(f"{NAME}-wec")
    wec, _, wec_failures = checked_ingest(
        kafka=ctx.kafka, topic=topic, group=f"g-{topic}-wec", backend="mongo",
        mongo=ctx.mongo, tenant=tenant, work=work, expected=(1, s.image_frames, 1),
        extra_env=WEC_ENV)
    checks.append(no_data_loss("daemon with write_empty_chunks", wec_failures))
    ctx.drop_scratch(work)
    wec_mbps = total_mb / wec.seconds
    print(f"  what-if, daemon with {WEC_ENV}: {wec_mbps:,.0f} MB/s")

    lim = LimitSettings()
    ratio = daemon_mbps / plain_mbps
    plain_wec_mbps = total_mb / plain_wec_s
    print_table(["writer", "MB/s", "frames/s", "vs plain zarr"], [
        ["(a) raw aiokafka consume+decode", raw_mbps, rate(s.image_frames, raw_s),
         f"{raw_mbps / plain_mbps:.2f}"],
        ["(c) plain zarr (same chunks/codecs)", plain_mbps, rate(s.image_frames, plain_s),
         "1.00"],
        ["(b) bluestream end to end", daemon_mbps, rate(s.image_frames, timing.seconds),
         f"{ratio:.2f}"],
        ["what-if: plain zarr, write_empty_chunks", plain_wec_mbps,
         rate(s.image_frames, plain_wec_s), f"{plain_wec_mbps / plain_mbps:.2f}"],
        ["what-if: bluestream, write_empty_chunks", wec_mbps,
         rate(s.image_frames, wec.seconds), f"{wec_mbps / plain_mbps:.2f}"],
    ])
    chart = ctx.out / f"{NAME}.png"
    _chart(chart, {"raw consume": raw_mbps, "plain zarr": plain_mbps,
                   "bluestream": daemon_mbps, "bluestream\n(wec what-if)": wec_mbps},
           plain_mbps, timing.rss_samples, peak)
    return Result(
        NAME,
        params={"frames": s.image_frames, "shape": list(s.image_shape), "dtype": "uint16",
                "frame_bytes": frame_bytes, "total_bytes": total_bytes,
                "metadata": "mongo", "batch_max_bytes": lim.batch_max_bytes,
                "batch_max_records": lim.batch_max_records, "queue_batches": lim.queue_batches,
                "plain_block_frames": written.chunks[0] * BLOCK_CHUNKS, **chunking},
        results={"publish_s": pub_s, "wire_bytes": wire_bytes,
                 "raw_consume": {"seconds": raw_s, "mb_per_s": raw_mbps},
                 "bluestream": {**timing.as_dict(), "mb_per_s": daemon_mbps,
                                "frames_per_s": rate(s.image_frames, timing.seconds),
                                "data_loss_retries": failures},
                 "plain_zarr": {"seconds": plain_s, "mb_per_s": plain_mbps},
                 "ratio": ratio,
                 "whatif_write_empty_chunks": {
                     "env": WEC_ENV, "bluestream_mb_per_s": wec_mbps,
                     "bluestream_peak_rss_mb": wec.peak_rss_mb[0],
                     "plain_zarr_mb_per_s": plain_wec_mbps,
                     "data_loss_retries": wec_failures},
                 "rss_mb": {"peak": peak,
                            "samples": [[round(t, 2), round(m, 1)]
                                        for t, m in timing.rss_samples[::5]]}},
        targets=[Target("images: bluestream / plain zarr", ratio, 0.8, "x"),
                 Target("daemon peak RSS, 1 GB of images" if not ctx.quick
                        else "daemon peak RSS, images", peak, 500.0, "MB",
                        higher_is_better=False)],
        charts=[chart.name], checks=checks,
        notes=["MB = 10^6 bytes of image data; plain zarr time excludes building blocks",
               "frames: a pool of 32 distinct 12-bit noise frames, taken in turn",
               "raw consume = aiokafka fetch + decode with the daemon's fetch settings"],
    )


def _chart(path: Path, bars: dict[str, float], plain: float,
           samples: list[tuple[float, float]], peak: float) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    colors = ["#999999", "#777777", "#4878a8", "#8fb0d0"]
    ax1.bar(list(bars), list(bars.values()), color=colors[:len(bars)])
    ax1.axhline(plain * 0.8, color="#c44", linestyle="--", linewidth=1)
    ax1.text(len(bars) - 0.5, plain * 0.8, "80% of plain zarr", color="#c44", fontsize=8,
             va="bottom", ha="right")
    for i, v in enumerate(bars.values()):
        ax1.text(i, v, fmt(v), ha="center", va="bottom")
    ax1.set_ylabel("MB/s")
    ax1.set_title("Image ingest bandwidth")
    if samples:
        ax2.plot([t for t, _ in samples], [m for _, m in samples], color="#4878a8")
    ax2.axhline(500, color="#c44", linestyle="--", linewidth=1)
    ax2.text(0, 500, " 500 MB target", color="#c44", fontsize=8, va="bottom")
    ax2.set_ylim(0, max(550, peak * 1.1))
    ax2.set_xlabel("s since first assignment")
    ax2.set_ylabel("daemon RSS (MB)")
    ax2.set_title(f"Daemon memory while ingesting (peak {peak:.0f} MB)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
