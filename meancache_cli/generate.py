"""Generation: one pipeline call, cached by a schedule or not, timed and with its real NFE counted."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from .calibrate import StepCallback, step_callback
from .errors import ScheduleMismatchError
from .files import Schedule
from .hooks import apply_evaluation_counter, apply_meancache, remove_meancache


@dataclass
class Generation:
    """What one call produced and what it cost."""

    images: list[Any]
    nfe: int
    seconds: float
    steps: int


def check_schedule(schedule: Schedule, model: str, steps: int, height: int | None, width: int | None) -> list[str]:
    """Refuse a schedule planned for another model or step count; warn about another resolution."""
    if schedule.model != model:
        raise ScheduleMismatchError(
            f"the schedule was planned for model '{schedule.model}' but this run uses '{model}': "
            f"plan a schedule from a calibration of '{model}'"
        )
    if schedule.num_inference_steps != steps:
        raise ScheduleMismatchError(
            f"the schedule was planned for {schedule.num_inference_steps} steps but this run uses --steps {steps}: "
            f"use --steps {schedule.num_inference_steps} or plan for {steps} steps"
        )
    planned = (schedule.height, schedule.width)
    if None not in planned and planned != (height, width):
        return [f"the schedule was planned at {planned[0]}x{planned[1]}, this run is {height}x{width}: "
                "the sigmas differ, expect lower quality"]
    return []


def generate(
    pipe: Any,
    prompt: str | list[str],
    seed: int | list[int],
    call_kwargs: dict[str, Any],
    schedule: Schedule | None = None,
    on_step: StepCallback | None = None,
    output_type: str = "pil",
) -> Generation:
    """Run the pipeline once; with a schedule, through the MeanCache hook.

    A list of prompts with a list of seeds is one batched call in which image i is drawn from seed i.
    """
    generator = ([torch.Generator("cpu").manual_seed(s) for s in seed] if isinstance(seed, list)
                 else torch.Generator("cpu").manual_seed(seed))
    remove_meancache(pipe)
    counter = apply_evaluation_counter(pipe)
    if schedule is not None:
        apply_meancache(pipe, schedule)
    before = counter.evaluations
    start = time.perf_counter()
    try:
        result = pipe(prompt=prompt, generator=generator, output_type=output_type,
                      callback_on_step_end=step_callback(on_step), **call_kwargs)
    finally:
        seconds = time.perf_counter() - start
        remove_meancache(pipe)
    images = result.frames if hasattr(result, "frames") else result.images
    return Generation(images=list(images), nfe=counter.evaluations - before, seconds=seconds,
                      steps=call_kwargs["num_inference_steps"])
