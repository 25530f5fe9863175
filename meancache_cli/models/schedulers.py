"""One model call per sampler step: replace a pipeline's multistep flow scheduler by flow-matching Euler."""

from __future__ import annotations

import inspect
from typing import Any


class SchedulerSwapWarning(UserWarning):
    """The pipeline's own scheduler was replaced by FlowMatchEulerDiscreteScheduler."""


def euler_scheduler_swap(pipe: Any) -> str | None:
    """Give `pipe` a FlowMatchEulerDiscreteScheduler with its scheduler's shift; say what changed, or None.

    MeanCache hands each sampler step one velocity and reads σ from `scheduler.sigmas`, so it needs one
    transformer call per step on the flow-matching sigmas. Wan ships UniPC (a multistep solver whose
    config holds the shift as `flow_shift`); the uncached reference then runs Euler too.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    old = pipe.scheduler
    if isinstance(old, FlowMatchEulerDiscreteScheduler):
        return None
    config = dict(old.config)
    shift = config.get("flow_shift", config.get("shift", 1.0))
    known = inspect.signature(FlowMatchEulerDiscreteScheduler.__init__).parameters
    shared = {name: value for name, value in config.items() if name in known}
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config({**shared, "shift": shift})
    return (f"{type(pipe).__name__} ships {type(old).__name__}; MeanCache needs one model call per step, so this run "
            f"uses FlowMatchEulerDiscreteScheduler with the same shift ({shift:g}), cached and uncached alike")
