"""Generation: one pipeline call, cached by a schedule or not, timed and with its real NFE counted."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .calibration import StepCallback, step_callback
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


def check_schedule(schedule: Schedule, model: str, steps: int, height: int | None, width: int | None,
                   family: str | None = None) -> list[str]:
    """Refuse a schedule planned for another model (a saved pipeline's family counts as its own) or step
    count; warn about another resolution."""
    if schedule.model not in (model, family):
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


def compare_with_uncached(pipe: Any, prompt: str, seed: int, call_kwargs: dict[str, Any], schedule: Schedule,
                          output: Any, repeat: int, on_run: Callable[[], None] | None = None) -> dict[str, Any]:
    """Quality of a cached `output` against the uncached run, and the wall-clock ratio of the two:
    medians of `repeat` alternating runs in this process, after the reference run as a warm-up; and
    the quality of plain B-step Euler at the same number of evaluations."""
    from .bench.metrics import compare

    def timed(plan: Schedule | None) -> Generation:
        result = generate(pipe, prompt, seed, call_kwargs, plan)
        if on_run is not None:
            on_run()
        return result

    reference = timed(None)
    cached_times, uncached_times = [], []
    for _ in range(repeat):
        cached_times.append(timed(schedule).seconds)
        uncached_times.append(timed(None).seconds)
    cached, uncached = statistics.median(cached_times), statistics.median(uncached_times)
    quality, structure = compare(output, reference.images[0])
    # The same number of model evaluations spent on a B-step Euler grid: what the cache must beat.
    euler = generate(pipe, prompt, seed, {**call_kwargs, "num_inference_steps": schedule.budget})
    if on_run is not None:
        on_run()
    return {"reference_nfe": reference.nfe, "reference_seconds": uncached, "cached_seconds": cached,
            "speedup": uncached / cached, "psnr": quality, "ssim": structure,
            "euler_steps": euler.steps, "euler_nfe": euler.nfe,
            "euler_psnr": compare(euler.images[0], reference.images[0])[0]}
