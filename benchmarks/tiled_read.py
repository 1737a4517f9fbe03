"""Scenario 9 - remote read (issue 14): ``read()`` over HTTP through ``bluestream tiled``
(a Tiled server process on 127.0.0.1) with the stock client (``tiled.client.from_uri``
+ bluesky-tiled-plugins) against the local ``read()`` of the same runs, Mongo metadata:
a 100,000-event scalar run (10 float fields) and a 1,000-frame image run (512x512
uint16). Both written first in process, outside the timing; best of ``read_repeats``;
the values read remotely are checked against the documents. Targets: images >= 0.5 of
the local frames/s; scalars within 3x of the local time.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import Any

import httpx

import bluestream
from benchmarks.checks import Check, frames_match, same_columns
from benchmarks.common import (
    TILED_IMAGES_VS_LOCAL,
    TILED_SCALAR_TIME_VS_LOCAL,
    Context,
    Result,
    bar_chart,
    best_of,
    mb,
    print_table,
    rate,
)
from benchmarks.docs import expected_columns, image_frames, image_run, scalar_run
from benchmarks.inprocess import ingest_in_process

NAME = "tiled_read"
__all__ = ["NAME", "run"]
KEY = "benchkey"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(uri: str, zarr_root: str, tenant: str, log: Any) -> tuple[subprocess.Popen[bytes],
                                                                     str]:
    port = _port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLUESTREAM_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bluestream", "tiled", "--metadata", uri, "--zarr-root",
         zarr_root, "--tenant", tenant, "--api-key", KEY, "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            raise RuntimeError("bluestream tiled exited at start")
        try:
            if httpx.get(f"{url}/api/v1/", timeout=2).status_code < 500:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError("bluestream tiled did not answer within 90 s")
        time.sleep(0.3)


def run(ctx: Context) -> Result:
    from tiled.client import from_uri

    s = ctx.sizes
    tenant = ctx.tenant("tl")
    work = ctx.scratch(NAME)
    zarr_root = work / "zarr"
    uri = ctx.mongo
    scalars = scalar_run(s.read_scalar_events, fields=s.scalar_fields)
    ingest_in_process(uri, zarr_root, tenant, scalars.docs)
    frames = image_frames(s.image_shape)
    images, image_docs = image_run(s.read_image_frames, frames)
    ingest_in_process(uri, zarr_root, tenant, image_docs)
    checks: list[Check] = []

    def local(uid: str) -> Any:
        with bluestream.open_catalog(tenant, metadata=uri, zarr_root=zarr_root) as cat:
            return cat[uid]["primary"].read()

    with (work / "server.log").open("ab") as log:
        proc, url = _start(uri, str(zarr_root), tenant, log)
        client = from_uri(url, api_key=KEY)
        try:
            def remote(uid: str) -> Any:
                return client[tenant][uid]["primary"].read()

            t_local, _ = best_of(lambda: local(scalars.uid), s.read_repeats)
            t_remote, ds = best_of(lambda: remote(scalars.uid), s.read_repeats)
            cols = {"time": ds["time"].values,
                    **{f"data/{k}": ds[k].values for k in ds.data_vars}}
            want = {k: v for k, v in expected_columns(scalars).items() if k in cols}
            checks.append(same_columns("remote read scalar values", cols, want))
            del ds
            t_local_img, _ = best_of(lambda: local(images.uid), s.read_repeats)
            t_remote_img, ds = best_of(lambda: remote(images.uid), s.read_repeats)
            checks.append(frames_match("remote read image values", ds["img"].values, frames,
                                       s.read_image_frames))
            del ds
        finally:
            client.context.close()
            proc.terminate()
            proc.wait(30)
    ctx.drop_scratch(work)
    n, f = s.read_scalar_events, s.read_image_frames
    frame_mb = mb(frames[0].nbytes)
    img_ratio = t_local_img / t_remote_img
    scalar_factor = t_remote / t_local
    print_table(["read()", "local s", "over HTTP s", "remote / local speed"], [
        [f"{n:,} scalar events", t_local, t_remote, f"{t_local / t_remote:.2f}"],
        [f"{f:,} frames {s.image_shape}", t_local_img, t_remote_img, f"{img_ratio:.2f}"],
    ])
    chart = ctx.out / f"{NAME}.png"
    bar_chart(chart, "read() locally and through bluestream tiled",
              ["scalars local", "scalars HTTP", "images local", "images HTTP"],
              [t_local, t_remote, t_local_img, t_remote_img], "s")
    return Result(
        NAME,
        params={"scalar_events": n, "fields": s.scalar_fields, "frames": f,
                "shape": list(s.image_shape), "metadata": "mongo", "server": "bluestream "
                "tiled (tiled 0.2.20, uvicorn), same machine", "repeats": s.read_repeats},
        results={"scalar": {"local_s": t_local, "remote_s": t_remote,
                            "remote_events_per_s": rate(n, t_remote),
                            "time_factor": scalar_factor},
                 "image": {"local_s": t_local_img, "remote_s": t_remote_img,
                           "remote_mb_per_s": frame_mb * f / t_remote_img,
                           "ratio": img_ratio}},
        targets=[TILED_IMAGES_VS_LOCAL.target("images over HTTP / local read()", img_ratio),
                 TILED_SCALAR_TIME_VS_LOCAL.target("scalars over HTTP: time / local time",
                                                   scalar_factor)],
        charts=[chart.name], checks=checks,
        notes=["server, client and stores share the 2 cores",
               "remote read: the stock client's read() of the stream (arrays fetched "
               "block by block, the internal table in one request)"],
    )
