"""Generation: one pipeline call, cached by a schedule or not, timed and with its real NFE counted; its output
written with its provenance."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .calibration import StepCallback, step_callback
from .errors import ScheduleMismatchError
from .files import Schedule
from .hooks import apply_evaluation_counter, apply_meancache, remove_meancache
from .models.registry import ModelSpec
from .outputs import save_image, save_video

# What a schedule lost at another resolution, mapped by σ (docs/experiments/transfer.log, README).
RESOLUTION_TRANSFER = ("on the demo model (32 vs 64 px) that lost 1.0 dB on average and up to 4.7 dB against a "
                       "schedule planned at the run's size (by index 1.8 dB): calibrate at this size for the best "
                       "schedule")


@dataclass
class Generation:
    """What one call produced and what it cost."""

    images: list[Any]
    nfe: int
    seconds: float
    steps: int


def check_schedule(schedule: Schedule, model: str, steps: int, height: int | None, width: int | None,
                   family: str | None = None, strict: bool = False) -> list[str]:
    """Refuse a schedule planned for another model (a saved pipeline's family counts as its own); say how
    one planned for another step count or resolution runs here (moved by σ), or with `strict` refuse
    another step count and take the steps by index."""
    if schedule.model not in (model, family):
        raise ScheduleMismatchError(
            f"the schedule was planned for model '{schedule.model}' but this run uses '{model}': "
            f"plan a schedule from a calibration of '{model}'"
        )
    messages = []
    planned_steps = schedule.num_inference_steps
    if planned_steps != steps:
        if strict:
            raise ScheduleMismatchError(
                f"the schedule was planned for {planned_steps} steps but this run uses --steps {steps}: "
                f"use --steps {planned_steps} or plan for {steps} steps (without --strict-schedule it is mapped by σ)"
            )
        if schedule.budget > steps:
            raise ScheduleMismatchError(
                f"the schedule makes {schedule.budget} evaluations per branch but --steps {steps} is fewer: use "
                f"--steps {schedule.budget} or more, or a schedule with a smaller budget")
        messages.append(f"the schedule was planned for {planned_steps} steps, this run uses --steps {steps}: its "
                        f"compute steps are mapped by σ onto the {steps}-step grid, {schedule.budget} evaluations per "
                        "branch as planned (--strict-schedule refuses instead)")
    planned = (schedule.height, schedule.width)
    if None not in planned and planned != (height, width):
        where = f"the schedule was planned at {planned[0]}x{planned[1]}, this run is {height}x{width}"
        if strict or schedule.sigmas is None:
            why = "--strict-schedule" if strict else "the schedule records no sigmas (plan it again to map it by σ)"
            messages.append(f"{where}: {why}, so its steps are taken by index on other sigmas; expect lower quality")
        else:
            messages.append(f"{where}: its compute steps are mapped by σ onto this run's sigmas; "
                            f"{RESOLUTION_TRANSFER}")
    return messages


def generate(
    pipe: Any,
    prompt: str | list[str],
    seed: int | list[int],
    call_kwargs: dict[str, Any],
    schedule: Schedule | None = None,
    on_step: StepCallback | None = None,
    output_type: str = "pil",
    strict: bool = False,
) -> Generation:
    """Run the pipeline once; with a schedule, through the MeanCache hook (`strict`: see `apply_meancache`).

    A list of prompts with a list of seeds is one batched call in which image i is drawn from seed i.
    """
    generator = ([torch.Generator("cpu").manual_seed(s) for s in seed] if isinstance(seed, list)
                 else torch.Generator("cpu").manual_seed(seed))
    remove_meancache(pipe)
    counter = apply_evaluation_counter(pipe)
    if schedule is not None:
        apply_meancache(pipe, schedule, strict)
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


def provenance(schedule: Schedule | None, **facts: Any) -> dict[str, Any]:
    """How an output was made, as its PNG text chunk or video comment (and a batch's manifest line) records it:
    `facts` (model, prompt, seed, steps, NFE; a batch adds index, file, seconds and batch size) and the sha256 of
    the schedule, None when uncached."""
    return {**facts, "schedule_sha256": schedule.sha256() if schedule is not None else None}


def save_output(item: Any, path: str | Path, spec: ModelSpec, fps: int | None, provenance: dict[str, Any]) -> None:
    """A generated image, or the frames of a video when the model makes videos (at `fps`, else the model's own
    rate), written with its provenance."""
    if spec.fps is not None:
        save_video(item, path, fps or spec.fps, provenance)
    else:
        save_image(item, path, provenance)


def compare_with_uncached(pipe: Any, prompt: str, seed: int, call_kwargs: dict[str, Any], schedule: Schedule,
                          output: Any, repeat: int, on_run: Callable[[], None] | None = None,
                          strict: bool = False) -> dict[str, Any]:
    """Quality of a cached `output` against the uncached run, and the wall-clock ratio of the two:
    medians of `repeat` alternating runs in this process, after the reference run as a warm-up; and
    the quality of plain B-step Euler at the same number of evaluations."""
    from .metrics import compare

    def timed(plan: Schedule | None) -> Generation:
        result = generate(pipe, prompt, seed, call_kwargs, plan, strict=strict)
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
