"""Bluesky documents for the benchmarks, built directly as dicts (event-model's
``compose_event`` validates each event and would dominate generating 200,000 of them).

Start, descriptor and stop come from event-model's composers, so they are the real thing;
events and event pages have exactly the fields a RunEngine emits.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import event_model
import numpy as np

from bluestream.consumers.decode import encode_message

__all__ = ["Run", "expected_columns", "image_frames", "image_run", "scalar_run"]

Doc = dict[str, Any]


@dataclass
class Run:
    """One run: its documents (lazily, for images) and what a reader should find."""

    uid: str
    descriptor_uid: str
    n_events: int
    docs: list[tuple[str, Doc]]

    def encoded(self) -> list[bytes]:
        return [encode_message(name, doc) for name, doc in self.docs]


def _uid() -> str:
    return str(uuid.uuid4())


def scalar_run(n_events: int, *, fields: int = 10, page_events: int = 0, scan_id: int = 1,
               t0: float | None = None) -> Run:
    """``n_events`` events of ``fields`` float fields, as single events or, with
    ``page_events``, as event pages of that many events."""
    t0 = time.time() if t0 is None else t0
    bundle = event_model.compose_run(time=t0, metadata={"scan_id": scan_id,
                                                        "plan_name": "bench_count"})
    keys = {f"f{i}": {"dtype": "number", "shape": [], "source": f"sim:f{i}", "units": "mm"}
            for i in range(fields)}
    desc = bundle.compose_descriptor(name="primary", data_keys=keys, time=t0)
    d_uid = desc.descriptor_doc["uid"]
    docs: list[tuple[str, Doc]] = [("start", bundle.start_doc),
                                   ("descriptor", desc.descriptor_doc)]
    if page_events <= 0:
        for i in range(1, n_events + 1):
            t = t0 + i * 1e-3
            docs.append(("event", {
                "descriptor": d_uid, "uid": _uid(), "seq_num": i, "time": t,
                "data": {k: i * 0.5 + j for j, k in enumerate(keys)},
                "timestamps": {k: t for k in keys}, "filled": {},
            }))
    else:
        for first in range(1, n_events + 1, page_events):
            seq = list(range(first, min(first + page_events, n_events + 1)))
            times = [t0 + i * 1e-3 for i in seq]
            docs.append(("event_page", {
                "descriptor": d_uid, "uid": [_uid() for _ in seq], "seq_num": seq,
                "time": times,
                "data": {k: [i * 0.5 + j for i in seq] for j, k in enumerate(keys)},
                "timestamps": {k: times for k in keys}, "filled": {},
            }))
    stop = bundle.compose_stop(time=t0 + n_events * 1e-3 + 1, exit_status="success")
    stop["num_events"] = {"primary": n_events}
    docs.append(("stop", stop))
    return Run(bundle.start_doc["uid"], d_uid, n_events, docs)


def expected_columns(run_: Run) -> dict[str, np.ndarray]:
    """What reading ``run_``'s events back must give, from its own documents: time,
    seq_num, uid and ``data/<key>`` columns in seq_num order (events or event pages)."""
    rows: dict[str, list[Any]] = {"time": [], "seq_num": [], "uid": []}
    data: dict[str, list[Any]] = {}
    for name, doc in run_.docs:
        if name not in ("event", "event_page"):
            continue
        page = name == "event_page"
        for column in rows:
            rows[column].extend(doc[column] if page else [doc[column]])
        for key, values in doc["data"].items():
            data.setdefault(key, []).extend(values if page else [values])
    order = np.argsort(rows["seq_num"], kind="stable")
    out = {k: np.asarray(v)[order] for k, v in rows.items()}
    out.update({f"data/{k}": np.asarray(v)[order] for k, v in data.items()})
    return out


def image_frames(shape: tuple[int, int], pool: int = 32, seed: int = 8) -> list[np.ndarray]:
    """A pool of distinct 12-bit detector-like frames (uint16, noise: little to compress).

    Frames are taken from the pool in turn, so 1 GB of events does not need 1 GB of RAM.
    """
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 4096, size=shape, dtype=np.uint16) for _ in range(pool)]


def image_run(n_frames: int, frames: list[np.ndarray], *, scan_id: int = 1,
              t0: float | None = None) -> tuple[Run, Iterator[tuple[str, Doc]]]:
    """A run of ``n_frames`` single image events; the events are generated lazily."""
    t0 = time.time() if t0 is None else t0
    shape = list(frames[0].shape)
    bundle = event_model.compose_run(time=t0, metadata={"scan_id": scan_id,
                                                        "plan_name": "bench_images"})
    keys = {"img": {"dtype": "array", "shape": shape, "source": "sim:img",
                    "dtype_numpy": "<u2"}}
    desc = bundle.compose_descriptor(name="primary", data_keys=keys, time=t0)
    d_uid = desc.descriptor_doc["uid"]
    head: list[tuple[str, Doc]] = [("start", bundle.start_doc),
                                   ("descriptor", desc.descriptor_doc)]

    def generate() -> Iterator[tuple[str, Doc]]:
        yield from head
        for i in range(1, n_frames + 1):
            t = t0 + i * 1e-2
            yield "event", {"descriptor": d_uid, "uid": _uid(), "seq_num": i, "time": t,
                            "data": {"img": frames[(i - 1) % len(frames)]},
                            "timestamps": {"img": t}, "filled": {}}
        stop = bundle.compose_stop(time=t0 + n_frames * 1e-2 + 1, exit_status="success")
        stop["num_events"] = {"primary": n_frames}
        yield "stop", stop

    return Run(bundle.start_doc["uid"], d_uid, n_frames, head), generate()
