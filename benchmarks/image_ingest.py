"""Scenario 2 - image ingest: 512x512 uint16 frames as single events, already in Kafka.

bluestream end to end (daemon subprocess, Mongo metadata, until committed) against the
slower of its two limits: the raw consume limit (the faster of aiokafka and
confluent-kafka fetching + decoding the same topic) and the storage limit, a plain Zarr
write of the same frames into an array with the chunking and codecs the daemon chose
(read back from what it wrote), in chunk-aligned blocks. Also reported, no target: a raw
sequential write of the same bytes to one file on the same filesystem, fsync included.
The daemon's resident memory is sampled throughout (this is the 1 GB ingest whose peak
RSS scenario 5 asks for): it must stay bounded by ``limits.batch_max_bytes`` and co.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store

from benchmarks.checks import Check, equal, frames_match, no_data_loss
from benchmarks.common import (
    IMAGES_VS_BOUND,
    PEAK_RSS,
    Context,
    Result,
    fmt,
    mb,
    plt,
    print_table,
    rate,
)
from benchmarks.docs import image_frames, image_run
from benchmarks.infra import checked_ingest, create_topic, end_offsets, publish
from benchmarks.scalar_ingest import AIOKAFKA, CONFLUENT, raw_consumers
from bluestream.consumers.decode import encode_message
from bluestream.layout import descriptor_path
from bluestream.settings import LimitSettings

NAME = "image_ingest"
__all__ = ["NAME", "plain_zarr_write", "raw_disk_write", "run"]

BLOCK_CHUNKS = 16  # chunks per write call in the plain-Zarr baseline


def plain_zarr_write(path: Path | Store, frames: list[np.ndarray], n: int,
                     like: zarr.Array[Any]) -> float:
    """Write ``n`` frames (taken from ``frames`` in turn) like the daemon's array, into a
    directory or a zarr store; returns seconds spent in Zarr (building the blocks is not
    counted)."""
    shape = frames[0].shape
    store = str(path) if isinstance(path, Path) else path
    arr = zarr.create_array(store=store, shape=(n, *shape), chunks=like.chunks,
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


def raw_disk_write(path: Path, frames: list[np.ndarray], n: int) -> tuple[float, float]:
    """Write the bytes of ``n`` frames (taken from ``frames`` in turn) sequentially to one
    new file, one ``write`` per frame, and fsync it. Returns (seconds including the
    fsync, seconds of the fsync alone)."""
    views = [memoryview(f.tobytes()) for f in frames]  # (not timed)
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(n):
            view = views[i % len(views)]
            while view:
                view = view[os.write(fd, view):]
        synced = time.perf_counter()
        os.fsync(fd)
    finally:
        os.close(fd)
    done = time.perf_counter()
    return done - started, done - synced


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
    raws = raw_consumers(ctx.kafka, topic, end_offsets(ctx.kafka, topic))
    raw: dict[str, dict[str, Any]] = {}
    for client, (msgs, _, secs) in raws.items():
        suffix = "" if client == "aiokafka" else f" ({client})"
        checks.append(equal(f"raw consume saw every message{suffix}", msgs,
                            s.image_frames + 3))
        raw[client] = {"client": AIOKAFKA if client == "aiokafka" else CONFLUENT,
                       "seconds": secs, "mb_per_s": total_mb / secs}
        print(f"  (a) raw {client} consume+decode: {total_mb / secs:,.0f} MB/s")
    limit_client = max(raw, key=lambda c: raw[c]["mb_per_s"])
    limit_mbps = raw[limit_client]["mb_per_s"]

    work = ctx.scratch(NAME)
    timing, _, failures = checked_ingest(
        kafka=ctx.kafka, topic=topic, group=f"g-{topic}", backend="mongo", mongo=ctx.mongo,
        tenant=tenant, work=work, expected=(1, s.image_frames, 1))
    checks.append(no_data_loss("daemon", failures))
    daemon_mbps = total_mb / timing.seconds
    peak = timing.peak_rss
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
    # The raw disk write: same bytes, same filesystem (the scratch dir), removed at once.
    disk_file = work / "raw-disk-write.bin"
    disk_s, fsync_s = raw_disk_write(disk_file, frames, s.image_frames)
    checks.append(equal("raw disk write wrote every byte", disk_file.stat().st_size,
                        total_bytes))
    disk_file.unlink()
    disk_mbps = total_mb / disk_s
    print(f"  (d) raw sequential disk write + fsync: {disk_mbps:,.0f} MB/s ({disk_s:.1f} s, "
          f"fsync {fsync_s:.2f} s)")
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
    bound_mbps = min(plain_mbps, limit_mbps)
    bound_is = "plain_zarr" if plain_mbps <= limit_mbps else "limit"
    ratio_bound = daemon_mbps / bound_mbps
    plain_wec_mbps = total_mb / plain_wec_s
    frames_s = {k: rate(s.image_frames, v["seconds"]) for k, v in raw.items()}

    def limit_mark(client: str) -> str:
        return " (limit)" if client == limit_client else ""

    print_table(["writer", "MB/s", "frames/s", "vs plain zarr", "vs bound"], [
        *([f"(a) raw {c} consume+decode{limit_mark(c)}", v["mb_per_s"], frames_s[c],
           f"{v['mb_per_s'] / plain_mbps:.2f}", f"{v['mb_per_s'] / bound_mbps:.2f}"]
          for c, v in raw.items()),
        ["(c) plain zarr (same chunks/codecs)", plain_mbps, rate(s.image_frames, plain_s),
         "1.00", f"{plain_mbps / bound_mbps:.2f}"],
        ["(d) raw disk write, one file + fsync", disk_mbps, rate(s.image_frames, disk_s),
         f"{disk_mbps / plain_mbps:.2f}", f"{disk_mbps / bound_mbps:.2f}"],
        ["(b) bluestream end to end", daemon_mbps, rate(s.image_frames, timing.seconds),
         f"{ratio:.2f}", f"{ratio_bound:.2f}"],
        ["what-if: plain zarr, write_empty_chunks", plain_wec_mbps,
         rate(s.image_frames, plain_wec_s), f"{plain_wec_mbps / plain_mbps:.2f}",
         f"{plain_wec_mbps / bound_mbps:.2f}"],
        ["what-if: bluestream, write_empty_chunks", wec_mbps,
         rate(s.image_frames, wec.seconds), f"{wec_mbps / plain_mbps:.2f}",
         f"{wec_mbps / bound_mbps:.2f}"],
    ])
    print(f"  bound = min(plain zarr, limit) = {bound_is}, {bound_mbps:,.0f} MB/s; "
          f"bluestream / raw disk write = {daemon_mbps / disk_mbps:.2f}")
    chart = ctx.out / f"{NAME}.png"
    _chart(chart, {"raw aiokafka": raw["aiokafka"]["mb_per_s"],
                   "raw confluent": raw["confluent-kafka"]["mb_per_s"],
                   "plain zarr": plain_mbps, "disk write\n+ fsync": disk_mbps,
                   "bluestream": daemon_mbps, "bluestream\n(wec what-if)": wec_mbps},
           bound_mbps, timing.rss_samples, peak)
    return Result(
        NAME,
        params={"frames": s.image_frames, "shape": list(s.image_shape), "dtype": "uint16",
                "frame_bytes": frame_bytes, "total_bytes": total_bytes,
                "metadata": "mongo", "batch_max_bytes": lim.batch_max_bytes,
                "batch_max_records": lim.batch_max_records,
                "batch_max_events": lim.batch_max_events,
                "plain_block_frames": written.chunks[0] * BLOCK_CHUNKS,
                "raw_clients": [AIOKAFKA, CONFLUENT], **chunking},
        results={"publish_s": pub_s, "wire_bytes": wire_bytes,
                 "raw_consume": raw["aiokafka"],
                 "raw_consume_confluent": raw["confluent-kafka"],
                 "limit": {"mb_per_s": limit_mbps, "client": limit_client},
                 "bluestream": {**timing.as_dict(), "mb_per_s": daemon_mbps,
                                "frames_per_s": rate(s.image_frames, timing.seconds),
                                "data_loss_retries": failures},
                 "plain_zarr": {"seconds": plain_s, "mb_per_s": plain_mbps},
                 "raw_disk_write": {"seconds": disk_s, "fsync_s": fsync_s,
                                    "mb_per_s": disk_mbps},
                 "bound": {"mb_per_s": bound_mbps, "is": bound_is},
                 "ratio": ratio,
                 "ratio_to_limit": daemon_mbps / limit_mbps,
                 "ratio_to_bound": ratio_bound,
                 "ratio_to_disk_write": daemon_mbps / disk_mbps,
                 "whatif_write_empty_chunks": {
                     "env": WEC_ENV, "bluestream_mb_per_s": wec_mbps,
                     "bluestream_peak_rss_mb": wec.peak_rss,
                     "plain_zarr_mb_per_s": plain_wec_mbps,
                     "data_loss_retries": wec_failures},
                 "rss_mb": timing.rss_json()},
        targets=[IMAGES_VS_BOUND.target("images: bluestream / min(plain zarr, limit)",
                                        ratio_bound),
                 PEAK_RSS.target("daemon peak RSS: images, 1 GB" if not ctx.quick
                                 else "daemon peak RSS: images", peak)],
        charts=[chart.name], checks=checks,
        notes=["MB = 10^6 bytes of image data; plain zarr time excludes building blocks",
               "frames: a pool of 32 distinct 12-bit noise frames, taken in turn",
               "raw consume = fetch + decode_message with comparable fetch settings: "
               "raw_consume by aiokafka (the daemon's settings), raw_consume_confluent by "
               "confluent-kafka (librdkafka); limit = the faster",
               "bound = min(plain zarr, limit); ratio = bluestream / plain zarr (as before), "
               "ratio_to_bound is the target's",
               "raw disk write: the same bytes, one write() per frame, to one file in the "
               "scratch directory (the Zarr scratch's filesystem), fsync timed; no target",
               "rss_mb: the daemon's VmHWM (peak) and VmRSS sampled every 0.05 s"],
    )


def _chart(path: Path, bars: dict[str, float], bound: float,
           samples: list[tuple[float, float]], peak: float) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 4))
    colors = ["#999999", "#bbbbbb", "#777777", "#a0a080", "#4878a8", "#8fb0d0"]
    ax1.bar(list(bars), list(bars.values()), color=colors[:len(bars)])
    line = bound * IMAGES_VS_BOUND.value
    ax1.axhline(line, color="#c44", linestyle="--", linewidth=1)
    ax1.text(len(bars) - 0.5, line, f"{IMAGES_VS_BOUND.value:.0%} of min(plain zarr, limit)",
             color="#c44", fontsize=8, va="bottom", ha="right")
    ax1.tick_params(axis="x", labelsize=8)
    for i, v in enumerate(bars.values()):
        ax1.text(i, v, fmt(v), ha="center", va="bottom")
    ax1.set_ylabel("MB/s")
    ax1.set_title("Image ingest bandwidth")
    if samples:
        ax2.plot([t for t, _ in samples], [m for _, m in samples], color="#4878a8")
    ax2.axhline(PEAK_RSS.value, color="#c44", linestyle="--", linewidth=1)
    ax2.text(0, PEAK_RSS.value, f" {PEAK_RSS.value:.0f} MB target", color="#c44", fontsize=8,
             va="bottom")
    ax2.set_ylim(0, max(PEAK_RSS.value * 1.1, peak * 1.1))
    ax2.set_xlabel("s since first assignment")
    ax2.set_ylabel("daemon RSS (MB)")
    ax2.set_title(f"Daemon memory while ingesting (peak {peak:.0f} MB)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
