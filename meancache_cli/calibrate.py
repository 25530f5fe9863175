"""Calibration: uncached reference runs recorded by the hook and folded into stability maps (§3)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .core.stability import StabilityMaps
from .files import Calibration
from .hooks import apply_recorder, remove_recorder
from .models.registry import ModelSpec

StepCallback = Callable[[], None]


def step_callback(on_step: StepCallback | None) -> Callable[..., dict] | None:
    """A diffusers `callback_on_step_end` that reports each finished sampler step."""
    if on_step is None:
        return None

    def callback(pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        on_step()
        return {}

    return callback


def reference_run_kwargs(spec: ModelSpec, steps: int, height: int | None, width: int | None,
                         frames: int | None, extra: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for one pipeline call: model defaults, then the command line's choices."""
    kwargs: dict[str, Any] = {**spec.call_kwargs, "num_inference_steps": steps}
    for name, value in (("height", height or spec.height), ("width", width or spec.width),
                        ("num_frames", frames or spec.frames)):
        if value is not None:
            kwargs[name] = value
    kwargs.update({name: value for name, value in extra.items() if value is not None})
    return kwargs


def calibrate(
    pipe: Any,
    spec: ModelSpec,
    prompts: Sequence[str],
    seeds: Sequence[int],
    call_kwargs: dict[str, Any],
    kmax: int = 5,
    on_step: StepCallback | None = None,
) -> Calibration:
    """Run the uncached pipeline once per (prompt, seed) and average the error maps of every branch."""
    recorder = apply_recorder(pipe)
    maps: StabilityMaps | None = None
    try:
        for prompt in prompts:
            for seed in seeds:
                pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent",
                     callback_on_step_end=step_callback(on_step), **call_kwargs)
                sigmas = pipe.scheduler.sigmas.double().cpu().numpy()
                if maps is None:
                    maps = StabilityMaps(sigmas, kmax)
                for trajectory in recorder.trajectories():
                    maps.add(trajectory.x0, trajectory.velocities)
    finally:
        remove_recorder(pipe)
    guidance = {name: call_kwargs[name] for name in ("guidance_scale", "true_cfg_scale", "negative_prompt")
                if name in call_kwargs}
    return Calibration(
        model=spec.name, pipeline_class=type(pipe).__name__, sigmas=np.asarray(maps.sigmas),
        errors=maps.errors(), step_statistics=maps.step_statistics(), prompts=list(prompts), seeds=list(seeds),
        height=call_kwargs.get("height"), width=call_kwargs.get("width"), frames=call_kwargs.get("num_frames"),
        guidance=guidance, trajectories=maps.count,
    )
