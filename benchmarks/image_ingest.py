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

import numpy as np
import zarr

from benchmarks.common import Context, Result, Target, fmt, mb, plt, print_table, rate
from benchmarks.docs import image_frames, image_run
from benchmarks.infra import create_topic, metadata_uri, publish, stored_events, timed_ingest
from bluestream.consumers.decode import encode_message
from bluestream.daemon.config import LimitSettings
from bluestream.storage.zarr_store import descriptor_path

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


def run(ctx: Context) -> Result:
    s = ctx.sizes
    tenant = ctx.tenant("img")
    topic = ctx.topic(tenant)
    create_topic(ctx.kafka, topic, 1)
    frames = image_frames(s.image_shape)
    frame_bytes = frames[0].nbytes
    total_bytes = frame_bytes * s.image_frames
    run_, docs = image_run(s.image_frames, frames)
    key = run_.uid.encode()
    _, wire_bytes, pub_s = publish(ctx.kafka, topic,
                                   ((key, encode_message(name, doc), -1) for name, doc in docs))
    print(f"  published {s.image_frames:,} frames {s.image_shape} uint16 "
          f"({mb(wire_bytes):,.0f} MB on the wire) in {pub_s:.1f} s")

    work = ctx.scratch(NAME)
    uri = metadata_uri("mongo", ctx.mongo, work)
    timing = timed_ingest(kafka=ctx.kafka, topic=topic, group=f"g-{topic}", metadata=uri,
                          zarr_root=work / "zarr", log_dir=work)
    runs, stored, stops = stored_events(uri, tenant)
    assert (runs, stored, stops) == (1, s.image_frames, 1), (runs, stored, stops)
    daemon_mbps = mb(total_bytes) / timing.seconds
    peak = timing.peak_rss_mb[0]
    print(f"  bluestream: {daemon_mbps:,.0f} MB/s ({rate(s.image_frames, timing.seconds):,.0f}"
          f" frames/s, {timing.seconds:.1f} s), peak RSS {peak:.0f} MB")

    written = zarr.open_array(str(work / "zarr"), mode="r", path=descriptor_path(
        tenant, run_.uid, run_.descriptor_uid) + "/data/img")
    # Sanity: the daemon stored the frames bit-exactly (spot checks).
    for i in (0, s.image_frames // 2, s.image_frames - 1):
        assert np.array_equal(written[i], frames[i % len(frames)]), i
    chunking = {"chunks": list(written.chunks), "compressors": repr(written.compressors)}
    plain_dir = work / "plain.zarr"
    plain_s = plain_zarr_write(plain_dir, frames, s.image_frames, written)
    plain_mbps = mb(total_bytes) / plain_s
    print(f"  plain zarr write: {plain_mbps:,.0f} MB/s ({plain_s:.1f} s; chunks "
          f"{written.chunks}, {written.compressors})")
    ctx.drop_scratch(work)

    lim = LimitSettings()
    ratio = daemon_mbps / plain_mbps
    print_table(["writer", "MB/s", "frames/s", "ratio"], [
        ["plain zarr (same chunks/codecs)", plain_mbps, rate(s.image_frames, plain_s), ""],
        ["bluestream end to end", daemon_mbps, rate(s.image_frames, timing.seconds),
         f"{ratio:.2f}"],
    ])
    chart = ctx.out / f"{NAME}.png"
    _chart(chart, plain_mbps, daemon_mbps, timing.rss_samples, peak)
    return Result(
        NAME,
        params={"frames": s.image_frames, "shape": list(s.image_shape), "dtype": "uint16",
                "frame_bytes": frame_bytes, "total_bytes": total_bytes,
                "metadata": "mongo", "batch_max_bytes": lim.batch_max_bytes,
                "batch_max_records": lim.batch_max_records, "queue_batches": lim.queue_batches,
                "plain_block_frames": written.chunks[0] * BLOCK_CHUNKS, **chunking},
        results={"publish_s": pub_s, "wire_bytes": wire_bytes,
                 "bluestream": {**timing.as_dict(), "mb_per_s": daemon_mbps,
                                "frames_per_s": rate(s.image_frames, timing.seconds)},
                 "plain_zarr": {"seconds": plain_s, "mb_per_s": plain_mbps},
                 "ratio": ratio,
                 "rss_mb": {"peak": peak,
                            "samples": [[round(t, 2), round(m, 1)]
                                        for t, m in timing.rss_samples[::5]]}},
        targets=[Target("images: bluestream / plain zarr", ratio, 0.8, "x"),
                 Target("daemon peak RSS, 1 GB of images" if not ctx.quick
                        else "daemon peak RSS, images", peak, 500.0, "MB",
                        higher_is_better=False)],
        charts=[chart.name],
        notes=["MB = 10^6 bytes of image data; plain zarr time excludes building blocks",
               "frames: a pool of 32 distinct 12-bit noise frames, taken in turn"],
    )


def _chart(path: Path, plain: float, daemon: float, samples: list[tuple[float, float]],
           peak: float) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    ax1.bar(["plain zarr", "bluestream"], [plain, daemon], color=["#999999", "#4878a8"])
    ax1.axhline(plain * 0.8, color="#c44", linestyle="--", linewidth=1)
    ax1.text(1.45, plain * 0.8, " 80% target", color="#c44", fontsize=8, va="bottom",
             ha="right")
    for i, v in enumerate((plain, daemon)):
        ax1.text(i, v, fmt(v), ha="center", va="bottom")
    ax1.set_ylabel("MB/s")
    ax1.set_title("Image write bandwidth")
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
