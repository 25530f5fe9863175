"""The authors' public release as a peer: their estimator, on their own published schedules or on ours.

Their release (`MeanCache4Qwen-Image`, `MeanCache4Z-Image`) ships N = 50 schedules as literal tables of
compute steps and per-edge sliding windows; meancache ships them as schedule files with
`estimator: release` (`qwen-image/authors-b10` …), which the MeanCache hook runs with
`core.estimator.release_velocity`. "On our schedule" keeps MeanCache's compute steps and gives each edge
the window that reaches back to the previous compute step, the nearest reading of our K = 1 edges.
"""

from __future__ import annotations

from dataclasses import replace

from ..files import Schedule, load_schedule, shipped_schedules

RELEASE_MODEL = "qwen-image"


def release_schedule(model: str, steps: int, budget: int) -> Schedule | None:
    """The authors' published schedule at `budget`, retargeted to `model` (None where they publish none)."""
    name = f"{RELEASE_MODEL}/authors-b{budget}"
    if name not in shipped_schedules():
        return None
    schedule = load_schedule(name)
    if schedule.num_inference_steps != steps:
        return None
    return replace(schedule, model=model)


def release_on_schedule(schedule: Schedule) -> Schedule:
    """MeanCache's compute steps run with the release estimator: window t − p on K ≥ 1 edges (JVP or exponential),
    1 elsewhere."""
    steps = schedule.compute_steps
    windows = [steps[i] - steps[i - k] if k else 1 for i, k in enumerate(schedule.orders)]
    return replace(schedule, orders=windows, lambdas=[0.0] * len(windows), kinds=["reuse"] * len(windows),
                   estimator="release", validation=None)
