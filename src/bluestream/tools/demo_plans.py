"""The demo's experiment: a bluesky RunEngine with ophyd's simulated devices, publishing
through bluesky-kafka's own Publisher — the producer facilities run today, unchanged.

Runs in a worker thread (the RunEngine runs its own event loop); the RunEngine is
built without signal handlers for that reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["DEMO_DEPENDENCIES", "IMAGE_SHAPE", "PlanResult", "missing_dependencies",
           "run_demo_plans"]

DEMO_DEPENDENCIES = ("bluesky", "ophyd", "bluesky_kafka", "matplotlib")
IMAGE_SHAPE = (128, 128)
IMAGE_FRAMES = 8
SCAN_POINTS = 31


@dataclass(frozen=True)
class PlanResult:
    label: str  # what the demo calls it ("count", "scan", "images")
    uid: str  # start uid


def missing_dependencies() -> list[str]:
    """The optional packages the demo needs that are not installed."""
    import importlib.util

    return [m for m in DEMO_DEPENDENCIES if importlib.util.find_spec(m) is None]


def _frames(shape: tuple[int, int]) -> Callable[[], np.ndarray]:
    """A detector image: a Gaussian spot drifting across the frame, with Poisson noise."""
    rng = np.random.default_rng(2024)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    state = {"i": 0}

    def frame() -> np.ndarray:
        i = state["i"]
        state["i"] += 1
        cy, cx = shape[0] * (0.3 + 0.05 * i), shape[1] * (0.25 + 0.07 * i)
        spot = 3000 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 9.0 ** 2))
        out: np.ndarray = rng.poisson(spot + 100).astype(np.uint16)
        return out

    return frame


def run_demo_plans(topic: str, bootstrap: str,
                   say: Callable[[str, str], None]) -> list[PlanResult]:
    """Run the three plans, publishing every document to ``topic``; ``say(step, text)``
    announces each one. Returns the runs' start uids."""
    from bluesky import RunEngine
    from bluesky.plans import count, scan
    from bluesky_kafka import Publisher  # type: ignore[import-untyped]
    from ophyd.sim import DirectImage, SynAxis, SynGauss  # type: ignore[import-untyped]

    motor = SynAxis(name="motor")
    det = SynGauss("det", motor, "motor", center=0.5, Imax=1000, sigma=0.8,
                   random_state=np.random.RandomState(7))
    det.noise.put("uniform")  # ophyd's "poisson" breaks on numpy 2
    det.noise_multiplier.put(25)
    cam = DirectImage(func=_frames(IMAGE_SHAPE), name="cam")

    RE: Any = RunEngine({}, call_returns_result=False, context_managers=[])
    publisher = Publisher(topic=topic, bootstrap_servers=bootstrap, key=topic,
                          flush_on_stop_doc=True)
    starts: list[str] = []

    def remember(name: str, doc: dict[str, Any]) -> None:
        if name == "start":
            starts.append(str(doc["uid"]))

    RE.subscribe(publisher)
    RE.subscribe(remember)
    md = {"purpose": "bluestream demo", "sample": "simulated"}
    plans: list[tuple[str, str, Any]] = [
        ("count", "count: 5 readings of a simulated detector",
         count([det], num=5, md=md)),
        ("scan", f"scan: detector vs motor, {SCAN_POINTS} points from -3 to 3",
         scan([det], motor, -3, 3, SCAN_POINTS, md=md)),
        ("images", f"image series: {IMAGE_FRAMES} frames of {IMAGE_SHAPE[0]}x"
                   f"{IMAGE_SHAPE[1]} uint16", count([cam], num=IMAGE_FRAMES, md=md)),
    ]
    results = []
    for label, text, plan in plans:
        say(label, f"publishing {text}")
        RE(plan)
        results.append(PlanResult(label, starts[-1]))
    publisher.flush()
    return results
