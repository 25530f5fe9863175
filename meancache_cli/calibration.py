"""Calibration: uncached reference runs recorded by the hook and folded into stability maps (§3).

Runs are (prompt, seed) pairs taken seed by seed. The first few are held out of the maps: their start
noise and uncached final latents are kept in the calibration, so a plan can be validated on runs its maps
never saw (`planning.validate`). The map runs are split into two halves whose plans are compared: how much
the plan still depends on which runs were drawn (`PlanStability`); `auto_max_runs` adds seeds until that
figure settles. Each run is reduced to its own map sums (or, held out, to its two latents) and saved as a
shard beside the output before it is merged, so an interrupted calibration resumes where it stopped and
gives the same result.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save

from . import defaults
from .core.planner import plan_stability
from .core.stability import StabilityMaps, edge_costs
from .distributed import World
from .errors import FileFormatError, Interrupted, UsageError
from .files import Calibration, HeldOutRun, save_calibration, write_atomic
from .hooks import RecorderHook, apply_recorder, remove_recorder
from .models.registry import ModelSpec

StepCallback = Callable[[], None]
# Given how many runs (or outputs) are ahead, opens the callback that sees each step (or output) done.
Progress = Callable[[int], AbstractContextManager[StepCallback | None]]
JSON_VALUES = (str, int, float, bool, type(None))


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

    max_back: int = defaults.MAX_BACK
    lambdas: tuple[float, ...] = defaults.LAMBDAS
    max_elements: int | None = defaults.MAX_ELEMENTS

    def maps(self, sigmas: np.ndarray) -> StabilityMaps:
        return StabilityMaps(sigmas, self.max_back, self.lambdas, self.max_elements)


def _shard_name(model: str, call_kwargs: dict[str, Any], settings: MapSettings, prompt: str, seed: int,
                held_out: bool) -> str:
    """A run's identity: a shard is reused only by a run with the very same settings and role."""
    key = json.dumps([model, call_kwargs, asdict(settings), prompt, seed, held_out], sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:24] + ".safetensors"


@dataclass
class RunRecord:
    """One uncached run: its map sums (a map run) or its start noise and final latents (a held-out run)."""

    maps: StabilityMaps | None = None
    held_out: HeldOutRun | None = None


def reference_run(pipe: Any, recorder: RecorderHook, prompt: str, seed: int, call_kwargs: dict[str, Any],
                  settings: MapSettings, on_step: StepCallback | None, held_out: bool = False) -> RunRecord:
    """One uncached run, reduced to the map sums of its guidance branches, or kept whole when held out."""
    result = pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent",
                  callback_on_step_end=step_callback(on_step), **call_kwargs)
    trajectories = recorder.trajectories()
    if held_out:
        final = torch.as_tensor(result.frames if hasattr(result, "frames") else result.images).float().cpu().numpy()
        return RunRecord(held_out=HeldOutRun(prompt, seed, trajectories[0].x0.numpy(), final))
    maps = settings.maps(pipe.scheduler.sigmas.double().cpu().numpy())
    for trajectory in trajectories:  # every guidance branch of the run
        maps.add(trajectory.x0, trajectory.velocities)
    return RunRecord(maps=maps)


def run_pairs(prompts: Sequence[str], seeds: Sequence[int], extend: bool) -> Iterator[tuple[str, int]]:
    """(prompt, seed) pairs seed by seed: every prompt with the first seed, then with the next; with `extend`
    the seeds go on past the given ones (consecutive integers), for `--runs auto`."""
    more = itertools.count(max(seeds) + 1) if extend else iter(())
    for seed in itertools.chain(seeds, more):
        for prompt in prompts:
            yield prompt, seed


def holdout_count(holdout: int | None, runs: int | None, prompts: int) -> int:
    """Runs kept out of the maps: as asked, else at most `defaults.HOLDOUT` and a third of the runs (one seed's
    worth of prompts when the number of runs is open)."""
    if holdout is None:
        return min(defaults.HOLDOUT, runs // 3 if runs is not None else prompts)
    if holdout < 0 or (runs is not None and holdout > runs - 1):
        limit = f"0…{runs - 1}" if runs is not None else "0 or more"
        raise UsageError(f"holdout={holdout} is out of range: {runs} runs leave none for the maps; use {limit}")
    return holdout


@dataclass(frozen=True)
class PlanStability:
    """How much the plan depends on which runs were drawn: plans from two halves of the map runs (default
    recipe, `budget`), the compute steps they share and their regret — the relative excess cost of each half's
    plan on the other half's maps, the larger of the two (0: both halves plan equally well for each other)."""

    budget: int
    map_runs: int
    shared_steps: int
    regret: float

    def describe(self) -> str:
        return (f"plans from two halves of the {self.map_runs} map runs (B = {self.budget}) share "
                f"{self.shared_steps} of {self.budget} compute steps; each costs {100 * self.regret:.1f} % more "
                "on the other half's maps than that half's own plan")


def stability_budget(steps: int) -> int:
    """The budget the stability figure is measured at: N/5, the regime MeanCache is for."""
    return max(2, round(steps / 5))


def plan_stability_of(halves: Sequence[StabilityMaps], map_runs: int,
                      recipe: defaults.Recipe = defaults.RECIPE) -> PlanStability:
    """The stability figure of two halves of the map runs, planned with `recipe`."""
    sigmas = np.asarray(halves[0].sigmas)
    budget = min(stability_budget(len(sigmas) - 1), len(sigmas) - 1)
    costs = [edge_costs(half.errors().select(recipe.lambdas, recipe.exponential), sigmas, recipe.cost)
             for half in halves]
    shared, regret = plan_stability(costs[0], costs[1], budget, recipe.gamma)
    return PlanStability(budget, map_runs, shared, regret)


def run_calibration(
    pipe: Any,
    model: str,
    prompts: Sequence[str],
    seeds: Sequence[int],
    call_kwargs: dict[str, Any],
    settings: MapSettings | None = None,
    on_step: StepCallback | None = None,
    shards: Path | None = None,
    on_resumed: Callable[[int], None] | None = None,
    world: World | None = None,
    on_saved: Callable[[Path], None] | None = None,
    holdout: int | None = None,
    auto_max_runs: int | None = None,
    on_stability: Callable[[PlanStability], None] | None = None,
) -> Calibration:
    """Run the uncached pipeline once per (prompt, seed), hold the first `holdout` runs out and average the
    error maps of every branch of the others.

    With `auto_max_runs`, seeds are added one at a time (every prompt per seed) until the plans of the two
    halves of the map runs agree to `defaults.STABLE_REGRET`, or the map runs reach the cap; `on_stability`
    sees the figure after each seed. With `shards`, each run is saved there first (`on_saved` gets the shard's path
    just before its atomic write, so an interrupt can tell a finished shard from one never written)
    and runs already saved are not run again (`on_resumed` is called with the steps they stand for). Under
    torchrun each rank runs its share of the pairs and the results are added across ranks.
    """
    world = world or World()
    settings = settings or MapSettings()
    auto = auto_max_runs is not None
    if auto and world.size > 1:
        raise UsageError("runs='auto' decides after each seed whether to go on: run it in one process, or give "
                         "the seeds and a fixed number of runs under torchrun")
    if auto and auto_max_runs < 2:
        raise UsageError(f"max_runs={auto_max_runs} is too small: the stability figure compares two halves, use 2 "
                         "or more")
    total_runs = None if auto else len(prompts) * len(seeds)
    held = holdout_count(holdout, total_runs, len(prompts))
    if total_runs is not None and total_runs - held < world.size:
        raise UsageError(f"{total_runs - held} map runs cannot be shared by {world.size} processes: "
                         "add prompts or seeds, or start fewer processes")
    halves: list[StabilityMaps | None] = [None, None]
    held_runs: list[HeldOutRun] = []
    used_seeds: list[int] = []
    stability: PlanStability | None = None
    recorder = apply_recorder(pipe)
    try:
        pairs = run_pairs(prompts, seeds, auto)
        if total_runs is not None:
            pairs = itertools.islice(pairs, total_runs)
        map_runs = 0
        for index, (prompt, seed) in enumerate(pairs):
            if seed not in used_seeds:
                used_seeds.append(seed)
            if index < held:  # rank 0 runs every held-out run: it alone writes the calibration
                if world.is_main:
                    held_runs.append(_run_or_resume(pipe, recorder, model, prompt, seed, call_kwargs, settings,
                                                    on_step, shards, on_resumed, on_saved, True).held_out)
                continue
            half, mine = map_runs % 2, map_runs % world.size == world.rank
            map_runs += 1
            if mine:
                maps = _run_or_resume(pipe, recorder, model, prompt, seed, call_kwargs, settings, on_step, shards,
                                      on_resumed, on_saved, False).maps
                if halves[half] is None:
                    halves[half] = maps
                else:
                    halves[half].merge(maps)
            if auto and map_runs % len(prompts) == 0 and map_runs >= 2:
                stability = plan_stability_of(halves, map_runs)
                if on_stability is not None:
                    on_stability(stability)
                if stability.regret <= defaults.STABLE_REGRET or map_runs + len(prompts) > auto_max_runs:
                    break
    finally:
        remove_recorder(pipe)
    if world.size > 1:
        halves = _sum_across(world, halves, settings)
    if halves[0] is None:
        raise UsageError("no run is left for the maps: lower holdout or add prompts or seeds")
    total = StabilityMaps.from_sums(halves[0].sigmas, halves[0].sums(), settings.lambdas, settings.max_elements)
    if halves[1] is not None:
        total.merge(halves[1])
        if stability is None:  # runs="auto" measured it on these very halves before it stopped
            stability = plan_stability_of(halves, map_runs)
    guidance = {name: call_kwargs[name] for name in ("guidance_scale", "true_cfg_scale", "negative_prompt")
                if name in call_kwargs}
    return Calibration(
        model=model, pipeline_class=type(pipe).__name__, sigmas=np.asarray(total.sigmas),
        errors=total.errors(), step_statistics=total.step_statistics(), prompts=list(prompts), seeds=used_seeds,
        height=call_kwargs.get("height"), width=call_kwargs.get("width"), frames=call_kwargs.get("num_frames"),
        guidance=guidance, trajectories=total.count, elements=total.elements, latent_elements=total.latent_elements,
        call_kwargs={name: value for name, value in call_kwargs.items() if isinstance(value, JSON_VALUES)},
        held_out=held_runs,
        stability=asdict(stability) if stability is not None else None,
    )


def calibrate(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], *, model: str | None = None,
              max_back: int = defaults.MAX_BACK, lambdas: Sequence[float] = defaults.LAMBDAS,
              max_elements: int | None = defaults.MAX_ELEMENTS, holdout: int | None = None, runs: str | None = None,
              max_runs: int = defaults.AUTO_MAX_RUNS, on_step: StepCallback | None = None,
              **call_kwargs: Any) -> Calibration:
    """Calibrate `pipe` on `prompts` × `seeds`: the library's `meancache calibrate`.

    `call_kwargs` are the pipeline's own (num_inference_steps, height, width, true_cfg_scale, negative_prompt,
    max_sequence_length, …) and are used for every run, and again when a plan is validated. `holdout` runs
    (default: up to 4, at most a third) are kept out of the maps for validation; `runs="auto"` adds seeds
    after `seeds` until the plan is stable or `max_runs` map runs were made. `model` names the calibration
    (default: the pipeline's class name).
    """
    if runs not in (None, "auto"):
        raise UsageError(f"runs={runs!r} is invalid: use 'auto', or leave it out to run every prompt with every seed")
    if not prompts or not seeds:
        raise UsageError("calibration needs at least one prompt and one seed")
    if "num_inference_steps" not in call_kwargs:
        raise UsageError("give num_inference_steps: the calibration is made for one step count")
    settings = MapSettings(max_back, tuple(sorted(float(value) for value in lambdas)), max_elements)
    return run_calibration(pipe, model or type(pipe).__name__, prompts, seeds, call_kwargs, settings, on_step=on_step,
                           holdout=holdout, auto_max_runs=max_runs if runs == "auto" else None)


@dataclass(frozen=True)
class WrittenCalibration:
    """What `calibrate_to_file` wrote, and how many of its runs came from an interrupted calibration's shards."""

    calibration: Calibration
    reused: int


def calibrate_to_file(
    out: str | Path,
    pipe: Any,
    model: str,
    prompts: Sequence[str],
    seeds: Sequence[int],
    call_kwargs: dict[str, Any],
    settings: MapSettings,
    *,
    holdout: int | None = None,
    auto_max_runs: int | None = None,
    resume: bool = False,
    world: World | None = None,
    progress: Progress | None = None,
    on_stability: Callable[[PlanStability], None] | None = None,
) -> WrittenCalibration | None:
    """`run_calibration` written to `out`, resumable: `meancache calibrate`.

    Each run is saved in `shard_directory(out)` until the calibration is written; an interrupt raises
    Interrupted saying how many runs are saved there, and with `resume` the runs saved before are reused
    (without it they are removed first). `progress(runs)`, given the runs this process makes (at most, with
    `auto_max_runs`), opens the callback that sees each sampler step; a reused run reports all of its steps.
    Returns what rank 0 wrote, with the runs reused by all processes; None on the other ranks.
    """
    world = world or World()
    total = None if auto_max_runs is not None else len(prompts) * len(seeds)
    held = holdout_count(holdout, total, len(prompts))
    if not resume and world.is_main:
        remove_shards(out)
    world.barrier()
    mine = (auto_max_runs if total is None else len(world.share(range(total - held)))) + (held if world.is_main else 0)
    done = {"reused": 0}
    written: list[Path] = []  # shards this process started to write; only finished ones exist (atomic writes)
    with progress(mine) if progress is not None else nullcontext() as on_step:

        def resumed(steps: int) -> None:
            done["reused"] += 1
            for _ in range(steps if on_step is not None else 0):
                on_step()

        try:
            calibration = run_calibration(pipe, model, prompts, seeds, call_kwargs, settings, on_step=on_step,
                                          shards=shard_directory(out), on_resumed=resumed, on_saved=written.append,
                                          world=world, holdout=held, auto_max_runs=auto_max_runs,
                                          on_stability=on_stability)
        except KeyboardInterrupt:
            share = "" if world.size == 1 else " of this process's share"
            saved = done["reused"] + sum(shard.exists() for shard in written)
            raise Interrupted(f"{saved} of {mine} reference runs{share} are saved in "
                              f"{shard_directory(out)}; run the same command with --resume to continue") from None
    reused = int(world.sum_arrays({"reused": np.array([done["reused"]])})["reused"][0])
    if not world.is_main:
        return None
    save_calibration(calibration, out)
    remove_shards(out)
    return WrittenCalibration(calibration, reused)


def _run_or_resume(pipe: Any, recorder: RecorderHook, model: str, prompt: str, seed: int,
                   call_kwargs: dict[str, Any], settings: MapSettings, on_step: StepCallback | None,
                   shards: Path | None, on_resumed: Callable[[int], None] | None,
                   on_saved: Callable[[Path], None] | None, held_out: bool) -> RunRecord:
    """A run from its shard when an interrupted calibration saved it, else run (and saved when sharding)."""
    shard = shards / _shard_name(model, call_kwargs, settings, prompt, seed, held_out) if shards else None
    if shard is not None and shard.exists():
        record = _load_shard(shard, settings, prompt, seed, held_out)
        if on_resumed is not None:
            on_resumed(call_kwargs["num_inference_steps"])
        return record
    record = reference_run(pipe, recorder, prompt, seed, call_kwargs, settings, on_step, held_out)
    if shard is not None:
        shard.parent.mkdir(exist_ok=True)
        if held_out:
            arrays = {"noise": record.held_out.noise, "final": record.held_out.final}
        else:
            arrays = {"sigmas": np.asarray(record.maps.sigmas), **record.maps.sums()}
        if on_saved is not None:
            on_saved(shard)
        write_atomic(shard, save(arrays))
    return record


def _load_shard(shard: Path, settings: MapSettings, prompt: str, seed: int, held_out: bool) -> RunRecord:
    """A run saved by an interrupted calibration; a damaged one is named, with the way out."""
    try:
        arrays = load_file(shard)
        if held_out:
            return RunRecord(held_out=HeldOutRun(prompt, seed, arrays["noise"], arrays["final"]))
        return RunRecord(maps=StabilityMaps.from_sums(arrays.pop("sigmas"), arrays, settings.lambdas,
                                                      settings.max_elements))
    except (SafetensorError, OSError, KeyError, ValueError):
        raise FileFormatError(f"the saved run {shard} is unreadable (truncated or corrupted): delete it and run "
                              "again with --resume, or calibrate without --resume") from None


def _sum_across(world: World, halves: list[StabilityMaps | None],
                settings: MapSettings) -> list[StabilityMaps | None]:
    """Each half's sums added over all ranks (a rank with no run in a half adds zeros; a half no rank ran is
    None)."""
    template = next(half for half in halves if half is not None)
    summed = []
    for half in halves:
        sums = world.sum_arrays((half or settings.maps(template.sigmas)).sums())
        summed.append(StabilityMaps.from_sums(template.sigmas, sums, settings.lambdas, settings.max_elements)
                      if sums["count"][0] else None)
    return summed


def remove_shards(out: str | Path) -> None:
    shutil.rmtree(shard_directory(out), ignore_errors=True)
