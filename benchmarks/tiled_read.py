"""Scenario 9 - remote read (issue 14): ``read()`` over HTTP through ``bluestream tiled``
(a Tiled server process on 127.0.0.1) with the stock client (``tiled.client.from_uri``
+ bluesky-tiled-plugins) against the local ``read()`` of the same runs, Mongo metadata:
a 100,000-event scalar run (10 float fields) and a 1,000-frame image run (512x512
uint16). Both written first in process, outside the timing; best of ``read_repeats``;
the values read remotely are checked against the documents. Targets: images >= 0.5 of
the local frames/s; scalars within 3x of the local time.

Beside them, the floor of any server for the image read: the same frames, held in memory
by a trivial HTTP server (Starlette on uvicorn, the same stack as Tiled's, one
``memoryview`` per response), fetched the way the stock client fetches an array (``httpx``,
requests of at most 100 MiB on frame boundaries, joined with dask on its threads). What
the stock client costs by itself bounds the ratio any server can reach here.
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
#: The stock client's largest request (tiled.client.array RESPONSE_BYTESIZE_LIMIT).
CLIENT_REQUEST_BYTES = 100 * 1024 * 1024


def _floor_server(port: int, frames_file: str) -> None:
    """The trivial server of the floor: ``GET /frames?start=&stop=`` answers those rows
    of the frames, from memory."""
    import numpy as np
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    frames = np.load(frames_file)

    async def get(request: Request) -> Response:
        a, b = int(request.query_params["start"]), int(request.query_params["stop"])
        return Response(memoryview(frames[a:b]).cast("B"),
                        media_type="application/octet-stream")

    uvicorn.run(Starlette(routes=[Route("/frames", get)]), host="127.0.0.1", port=port,
                log_level="warning")


def _floor_read(url: str, shape: tuple[int, ...], dtype: Any) -> Any:
    """The frames fetched as the stock client fetches an array: pieces of at most
    100 MiB on frame boundaries, joined by dask on its threads."""
    import dask
    import dask.array as da
    import numpy as np

    per = max(1, CLIENT_REQUEST_BYTES // (int(np.prod(shape[1:])) * np.dtype(dtype).itemsize))
    with httpx.Client(timeout=120) as http:
        def get(a: int, b: int) -> Any:
            body = http.get(f"{url}/frames", params={"start": a, "stop": b}).read()
            return np.frombuffer(body, dtype=dtype).reshape((b - a, *shape[1:]))

        parts = [da.from_delayed(dask.delayed(get)(a, min(a + per, shape[0])),
                                 shape=(min(a + per, shape[0]) - a, *shape[1:]), dtype=dtype)
                 for a in range(0, shape[0], per)]
        return da.concatenate(parts).compute()


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


def _timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _measure_floor(work: Any, log: Any, frames: Any, shape: tuple[int, ...], dtype: Any,
                   repeats: int, checks: list[Check]) -> float:
    import numpy as np

    n = shape[0]
    whole = np.stack([np.asarray(frames[i % len(frames)], dtype=dtype) for i in range(n)])
    path = work / "floor-frames.npy"
    np.save(path, whole)
    port = _port()
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from benchmarks.tiled_read import _floor_server;"
         " _floor_server(int(sys.argv[1]), sys.argv[2])", str(port), str(path)],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{url}/frames", params={"start": 0, "stop": 1}, timeout=2)
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the floor server did not start") from None
                time.sleep(0.2)
        t_floor, got = best_of(lambda: _floor_read(url, shape, dtype), repeats)
        checks.append(frames_match("floor read values", got, frames, n))
        return t_floor
    finally:
        proc.terminate()
        proc.wait(30)
        path.unlink(missing_ok=True)


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
            # The first read builds the server's stream (reused after: the run is closed);
            # reported beside the best, which the targets use, as the local read's is.
            t_first = _timed(lambda: remote(scalars.uid))
            t_remote, ds = best_of(lambda: remote(scalars.uid), s.read_repeats)
            cols = {"time": ds["time"].values,
                    **{f"data/{k}": ds[k].values for k in ds.data_vars}}
            want = {k: v for k, v in expected_columns(scalars).items() if k in cols}
            checks.append(same_columns("remote read scalar values", cols, want))
            del ds
            t_local_img, _ = best_of(lambda: local(images.uid), s.read_repeats)
            t_first_img = _timed(lambda: remote(images.uid))
            t_remote_img, ds = best_of(lambda: remote(images.uid), s.read_repeats)
            checks.append(frames_match("remote read image values", ds["img"].values, frames,
                                       s.read_image_frames))
            shape, dtype = ds["img"].shape, ds["img"].dtype
            del ds
        finally:
            client.context.close()
            proc.terminate()
            proc.wait(30)
        t_floor = _measure_floor(work, log, frames, shape, dtype, s.read_repeats, checks)
    ctx.drop_scratch(work)
    n, f = s.read_scalar_events, s.read_image_frames
    frame_mb = mb(frames[0].nbytes)
    img_ratio = t_local_img / t_remote_img
    scalar_factor = t_remote / t_local
    print_table(["read()", "local s", "over HTTP s", "remote / local speed"], [
        [f"{n:,} scalar events", t_local, t_remote, f"{t_local / t_remote:.2f}"],
        ["  its first read over HTTP", t_local, t_first, f"{t_local / t_first:.2f}"],
        [f"{f:,} frames {s.image_shape}", t_local_img, t_remote_img, f"{img_ratio:.2f}"],
        ["  its first read over HTTP", t_local_img, t_first_img,
         f"{t_local_img / t_first_img:.2f}"],
        ["the same frames, trivial server (floor)", t_local_img, t_floor,
         f"{t_local_img / t_floor:.2f}"],
    ])
    chart = ctx.out / f"{NAME}.png"
    bar_chart(chart, "read() locally and through bluestream tiled",
              ["scalars local", "scalars HTTP", "images local", "images HTTP",
               "images, trivial server"],
              [t_local, t_remote, t_local_img, t_remote_img, t_floor], "s")
    return Result(
        NAME,
        params={"scalar_events": n, "fields": s.scalar_fields, "frames": f,
                "shape": list(s.image_shape), "metadata": "mongo", "server": "bluestream "
                "tiled (tiled 0.2.20, uvicorn), same machine", "repeats": s.read_repeats},
        results={"scalar": {"local_s": t_local, "remote_s": t_remote,
                            "remote_first_s": t_first,
                            "remote_events_per_s": rate(n, t_remote),
                            "time_factor": scalar_factor},
                 "image": {"local_s": t_local_img, "remote_s": t_remote_img,
                           "remote_first_s": t_first_img,
                           "remote_mb_per_s": frame_mb * f / t_remote_img,
                           "ratio": img_ratio,
                           "floor_s": t_floor, "floor_ratio": t_local_img / t_floor,
                           "remote_vs_floor": t_floor / t_remote_img}},
        targets=[TILED_IMAGES_VS_LOCAL.target("images over HTTP / local read()", img_ratio),
                 TILED_SCALAR_TIME_VS_LOCAL.target("scalars over HTTP: time / local time",
                                                   scalar_factor)],
        charts=[chart.name], checks=checks,
        notes=["server, client and stores share the 2 cores",
               "remote read: the stock client's read() of the stream (arrays fetched "
               "in requests of at most 100 MiB, the internal table in one request)",
               "floor: the same frames from memory through a trivial Starlette/uvicorn "
               "server, fetched as the stock client fetches (httpx, <= 100 MiB requests, "
               "dask join): no server can make the remote read faster than that here",
               "first read: the first remote read of each run, which builds the server's "
               "view of the stream (closed runs' streams are reused after); the targets "
               "use the best of the repeats, as for the local read"],
    )
