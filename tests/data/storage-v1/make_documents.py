"""Writes ``documents.jsonl``: the source documents of the ``storage-v1`` fixture.

Deterministic (fixed uids, times and values), so running it again writes the same bytes.
How the storage next to it was produced from this file is in ``README.md``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import event_model

T0 = 1_700_000_000.0
Docs = list[tuple[str, dict[str, Any]]]


def _uid(run: int, kind: int, n: int = 0) -> str:
    """A fixed, valid-looking uuid4 string: run, document kind and number in the digits."""
    return f"{run:02x}{kind:06x}-0000-4000-8000-{n:012x}"


def scalar_run() -> Docs:
    """count: 5 events of a float, an int and a string field; a baseline stream."""
    t0 = T0
    bundle = event_model.compose_run(uid=_uid(0xA1, 1), time=t0, metadata={
        "scan_id": 101, "plan_name": "count", "sample": {"name": "Si"},
        "purpose": "fixture scalar run"})
    keys = {"det": {"dtype": "number", "shape": [], "source": "sim:det", "units": "counts"},
            "n": {"dtype": "integer", "shape": [], "source": "sim:n"},
            "mode": {"dtype": "string", "shape": [], "source": "sim:mode"}}
    desc = bundle.compose_descriptor(name="primary", data_keys=keys, uid=_uid(0xA1, 2),
                                     time=t0 + 0.5)
    base = bundle.compose_descriptor(
        name="baseline", uid=_uid(0xA1, 3), time=t0 + 0.25,
        data_keys={"slit": {"dtype": "number", "shape": [], "source": "sim:slit",
                            "units": "mm"}})
    docs: Docs = [("start", bundle.start_doc), ("descriptor", base.descriptor_doc),
                  ("event", base.compose_event(data={"slit": 1.25}, timestamps={"slit": t0},
                                               seq_num=1, uid=_uid(0xA1, 4, 1),
                                               time=t0 + 0.3)),
                  ("descriptor", desc.descriptor_doc)]
    for i in range(1, 6):
        data = {"det": 0.5 * i * i, "n": i, "mode": "fast" if i % 2 else "slow"}
        docs.append(("event", desc.compose_event(
            data=data, timestamps=dict.fromkeys(data, t0 + i), seq_num=i,
            uid=_uid(0xA1, 5, i), time=t0 + i)))
    docs.append(("event", base.compose_event(data={"slit": 1.5}, timestamps={"slit": t0 + 6},
                                             seq_num=2, uid=_uid(0xA1, 4, 2), time=t0 + 6)))
    docs.append(("stop", bundle.compose_stop(uid=_uid(0xA1, 6), time=t0 + 7)))
    return docs


def image_run() -> Docs:
    """count of an area detector: 3 frames of 6x8 uint16 plus a scalar."""
    t0 = T0 + 100
    bundle = event_model.compose_run(uid=_uid(0xB2, 1), time=t0, metadata={
        "scan_id": 102, "plan_name": "count", "sample": {"name": "Ge"}})
    keys = {"cam": {"dtype": "array", "shape": [6, 8], "dtype_numpy": "<u2",
                    "source": "sim:cam"},
            "temp": {"dtype": "number", "shape": [], "source": "sim:temp", "units": "K"}}
    desc = bundle.compose_descriptor(name="primary", data_keys=keys, uid=_uid(0xB2, 2),
                                     time=t0 + 0.5)
    docs: Docs = [("start", bundle.start_doc), ("descriptor", desc.descriptor_doc)]
    for i in range(1, 4):
        frame = [[(r * 8 + c) * 100 + i for c in range(8)] for r in range(6)]
        docs.append(("event", desc.compose_event(
            data={"cam": frame, "temp": 290.0 + i}, timestamps={"cam": t0 + i, "temp": t0 + i},
            seq_num=i, uid=_uid(0xB2, 5, i), time=t0 + i)))
    docs.append(("stop", bundle.compose_stop(uid=_uid(0xB2, 6), time=t0 + 5)))
    return docs


def page_run() -> Docs:
    """scan whose 4 events arrive as one event_page."""
    t0 = T0 + 200
    bundle = event_model.compose_run(uid=_uid(0xC3, 1), time=t0, metadata={
        "scan_id": 103, "plan_name": "scan", "motors": ["motor"]})
    keys = {"motor": {"dtype": "number", "shape": [], "source": "sim:motor", "units": "mm"},
            "det": {"dtype": "number", "shape": [], "source": "sim:det"}}
    desc = bundle.compose_descriptor(name="primary", data_keys=keys, uid=_uid(0xC3, 2),
                                     time=t0 + 0.5)
    events = []
    for i in range(1, 5):
        data = {"motor": -1.0 + 0.5 * (i - 1), "det": float(10 * i)}
        events.append(desc.compose_event(data=data, timestamps=dict.fromkeys(data, t0 + i),
                                         seq_num=i, uid=_uid(0xC3, 5, i), time=t0 + i))
    page = event_model.pack_event_page(*events)
    return [("start", bundle.start_doc), ("descriptor", desc.descriptor_doc),
            ("event_page", page),
            ("stop", bundle.compose_stop(uid=_uid(0xC3, 6), time=t0 + 6))]


def main(out: Path) -> None:
    lines = [json.dumps([name, doc], sort_keys=True)
             for name, doc in (*scalar_run(), *image_run(), *page_run())]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("documents.jsonl"))
