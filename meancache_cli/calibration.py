"""Calibration: uncached reference runs recorded by the hook and folded into stability maps (§3).

Each (prompt, seed) run is reduced to its own map sums and saved as a shard beside the output before
it is merged, so an interrupted calibration resumes where it stopped and gives the same result.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save

from .core.stability import DEFAULT_LAMBDAS, DEFAULT_MAX_ELEMENTS, StabilityMaps
from .distributed import World
from .errors import FileFormatError, UsageError
from .files import Calibration, write_atomic
from .hooks import apply_recorder, remove_recorder
from .models.registry import ModelSpec

StepCallback = Callable[[], None]
DEFAULT_MAX_BACK = 25


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


def shard_directory(out: str | Path) -> Path:
    """Where per-run partial results live while a calibration writing `out` is in progress."""
    out = Path(out)
    return out.with_name(f".{out.name}.shards")


@dataclass(frozen=True)
class MapSettings:
    """What the error maps measure: the look-back in steps, the dampings λ, the latent elements used."""

    max_back: int = DEFAULT_MAX_BACK
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
    max_elements: int | None = DEFAULT_MAX_ELEMENTS

    def maps(self, sigmas: np.ndarray) -> StabilityMaps:
        return StabilityMaps(sigmas, self.max_back, self.lambdas, self.max_elements)


def _shard_name(spec: ModelSpec, call_kwargs: dict[str, Any], settings: MapSettings, prompt: str, seed: int) -> str:
    """A run's identity: a shard is reused only by a run with the very same settings."""
    key = json.dumps([spec.name, call_kwargs, asdict(settings), prompt, seed], sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:24] + ".safetensors"


def reference_run(pipe: Any, recorder: Any, prompt: str, seed: int, call_kwargs: dict[str, Any],
                  settings: MapSettings, on_step: StepCallback | None) -> StabilityMaps:
    """One uncached run, reduced to the map sums of its guidance branches."""
    pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent",
         callback_on_step_end=step_callback(on_step), **call_kwargs)
    maps = settings.maps(pipe.scheduler.sigmas.double().cpu().numpy())
    for trajectory in recorder.trajectories():
        maps.add(trajectory.x0, trajectory.velocities)
    return maps


def calibrate(
    pipe: Any,
    spec: ModelSpec,
    prompts: Sequence[str],
    seeds: Sequence[int],
    call_kwargs: dict[str, Any],
    settings: MapSettings | None = None,
    on_step: StepCallback | None = None,
    shards: Path | None = None,
    on_resumed: Callable[[int], None] | None = None,
    world: World | None = None,
    on_saved: Callable[[], None] | None = None,
) -> Calibration:
    """Run the uncached pipeline once per (prompt, seed) and average the error maps of every branch.

    With `shards`, each run's sums are saved there first (then `on_saved` is called) and runs already
    saved are not run again (`on_resumed` is called with the steps they stand for).
    Under torchrun each rank runs its share of the pairs and the sums are added across ranks.
    """
    world = world or World()
    settings = settings or MapSettings()
    runs = [(prompt, seed) for prompt in prompts for seed in seeds]
    if len(runs) < world.size:
        raise UsageError(f"{len(runs)} (prompt, seed) pairs cannot be shared by {world.size} processes: "
                         "add prompts or seeds, or start fewer processes")
    total: StabilityMaps | None = None
    recorder = apply_recorder(pipe)
    try:
        for prompt, seed in world.share(runs):
            shard = shards / _shard_name(spec, call_kwargs, settings, prompt, seed) if shards else None
            if shard is not None and shard.exists():
                maps = _load_shard(shard, settings)
                if on_resumed is not None:
                    on_resumed(call_kwargs["num_inference_steps"])
            else:
                maps = reference_run(pipe, recorder, prompt, seed, call_kwargs, settings, on_step)
                if shard is not None:
                    shard.parent.mkdir(exist_ok=True)
                    write_atomic(shard, save({"sigmas": np.asarray(maps.sigmas), **maps.sums()}))
                    if on_saved is not None:
                        on_saved()
            if total is None:
                total = maps
            else:
                total.merge(maps)
    finally:
        remove_recorder(pipe)
    if world.size > 1:
        total = StabilityMaps.from_sums(total.sigmas, world.sum_arrays(total.sums()), settings.lambdas,
                                        settings.max_elements)
    guidance = {name: call_kwargs[name] for name in ("guidance_scale", "true_cfg_scale", "negative_prompt")
                if name in call_kwargs}
    return Calibration(
        model=spec.name, pipeline_class=type(pipe).__name__, sigmas=np.asarray(total.sigmas),
        errors=total.errors(), step_statistics=total.step_statistics(), prompts=list(prompts), seeds=list(seeds),
        height=call_kwargs.get("height"), width=call_kwargs.get("width"), frames=call_kwargs.get("num_frames"),
        guidance=guidance, trajectories=total.count, elements=total.elements, latent_elements=total.latent_elements,
    )


def _load_shard(shard: Path, settings: MapSettings) -> StabilityMaps:
    """The map sums of a run saved by an interrupted calibration; a damaged one is named, with the way out."""
    try:
        arrays = load_file(shard)
        return StabilityMaps.from_sums(arrays.pop("sigmas"), arrays, settings.lambdas, settings.max_elements)
    except (SafetensorError, OSError, KeyError, ValueError):
        raise FileFormatError(f"the saved run {shard} is unreadable (truncated or corrupted): delete it and run "
                              "again with --resume, or calibrate without --resume") from None


def remove_shards(out: str | Path) -> None:
    shutil.rmtree(shard_directory(out), ignore_errors=True)
