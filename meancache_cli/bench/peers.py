"""Every method the bench compares, each a small object that installs itself on a pipeline and undoes it.

All methods run on the same pipeline object, one after the other: schedule-based ones through a
transformer hook (MeanCache's own, or the authors' per-step estimator), fewer-step solvers by swapping
the scheduler for the call, diffusers' caches through `transformer.enable_cache` / `disable_cache`.
"""

from __future__ import annotations

import ast
import functools
import io
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import defaults
from ..files import Schedule
from ..hooks import apply_meancache, remove_meancache


@dataclass(frozen=True)
class MethodInfo:
    label: str
    family: str
    description: str


METHODS: dict[str, MethodInfo] = {
    "meancache": MethodInfo(
        "MeanCache", "ours",
        "the validated plan, `plan(calibration, B, pipe=…)` on calibration set A of the same configuration: every "
        "candidate recipe (cost kind, γ, dampings λ, exponential edges) planned on the map runs, each distinct "
        "schedule run cached on the held-out runs, the one with the best latent PSNR kept; û(t→s) per edge from "
        "its estimate (reuse, the damped JVP across the fresh velocity, or the exponential integrator)"),
    "meancache_default": MethodInfo(
        "MeanCache, default recipe, not validated", "ablation",
        f"`plan(calibration, B)` without a pipeline: the default recipe ({defaults.RECIPE.name}, Kmax = "
        f"{defaults.KMAX}; reuse or a damping chosen per edge) from the same calibration, no validation; the effect "
        "of validation is the difference to the MeanCache row"),
    "euler": MethodInfo("Euler (B steps)", "solver", "the pipeline's own Euler scheduler with num_inference_steps = B"),
    "unipc": MethodInfo(
        "UniPC (B steps)", "solver",
        "UniPCMultistepScheduler (bh2, order 2, flow sigmas, same dynamic shift), num_inference_steps = B"),
    "dpmpp": MethodInfo(
        "DPM-Solver++ 2M (B steps)", "solver",
        "DPMSolverMultistepScheduler (dpmsolver++, order 2, flow sigmas, same dynamic shift), num_inference_steps = B"),
    "reuse": MethodInfo("velocity reuse (uniform)", "schedule",
                        "model at every N/B-th step, its velocity reused until the next (uniform_schedule)"),
    "planner_k0": MethodInfo("planner, K = 0", "schedule",
                             "MeanCache's planner restricted to K = 0 (plain velocity reuse on planned steps)"),
    "minmax": MethodInfo("min-max (LeMiCa-style)", "schedule",
                         "leximax path over the K = 0 displacement edge costs: smallest largest edge, velocity reuse"),
    "release": MethodInfo(
        "authors' release schedule", "schedule",
        "the authors' published N = 50 schedule (compute steps and sliding windows of MeanCache4Qwen-Image) run "
        "with their release estimator; only at the budgets they publish (10, 17, 25)"),
    "authors": MethodInfo(
        "authors' estimator, our schedule", "schedule",
        "MeanCache's compute steps, velocity re-estimated at every skipped step from a sliding window reaching "
        "back to the previous compute step (the release estimator on our schedule)"),
    "fbcache": MethodInfo("FirstBlockCache", "cache",
                          "diffusers FirstBlockCacheConfig, threshold bisected to land near B full evaluations"),
    "taylorseer": MethodInfo(
        "TaylorSeer (lite)", "cache",
        "diffusers TaylorSeerCacheConfig in lite mode (blocks skipped, output Taylor-extrapolated), interval "
        "and warm-up chosen to give B full evaluations, order 1 or 2 picked on a calibration prompt"),
    "magcache": MethodInfo(
        "MagCache", "cache",
        "diffusers MagCacheConfig with mag_ratios from its own calibration mode on calibration set A, "
        "threshold bisected to land near B full evaluations"),
}

SOLVERS = ("euler", "unipc", "dpmpp")

SCHEDULE_METHODS = ("meancache", "meancache_default", "reuse", "planner_k0", "minmax", "release", "authors")


@dataclass
class Method:
    """One method at one budget: how to call the pipeline and what to install around the call."""

    key: str
    budget: int
    steps: int
    install: Callable[[Any], Callable[[], None]]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def info(self) -> MethodInfo:
        return METHODS[self.key]

    @contextmanager
    def applied(self, pipe: Any) -> Iterator[None]:
        undo = self.install(pipe)
        try:
            yield
        finally:
            undo()


def schedule_settings(schedule: Schedule) -> dict[str, Any]:
    return {"compute_steps": list(schedule.compute_steps), "orders": list(schedule.orders),
            "lambdas": list(schedule.lambdas), "kinds": list(schedule.kinds), "estimator": schedule.estimator}


def meancache_method(key: str, schedule: Schedule, **settings: Any) -> Method:
    """A schedule run by MeanCache's own hook (K = 0 schedules are plain velocity reuse)."""

    def install(pipe: Any) -> Callable[[], None]:
        apply_meancache(pipe, schedule)
        return lambda: remove_meancache(pipe)

    return Method(key, schedule.budget, schedule.num_inference_steps, install,
                  {**schedule_settings(schedule), **settings})


def authors_method(schedule: Schedule, key: str = "authors") -> Method:
    """The release estimator (a schedule with `estimator: release`), run by the same hook."""
    return meancache_method(key, schedule, windows=list(schedule.orders))


def euler_method(budget: int) -> Method:
    return Method("euler", budget, budget, lambda pipe: (lambda: None), {"num_inference_steps": budget})


def solver_scheduler(kind: str, config: Any) -> Any:
    """A multistep solver that samples the same flow-matching sigmas as the pipeline's Euler scheduler.

    FluxPipeline hands `set_timesteps` no sigmas when `use_flow_sigmas` is set, and always `mu`: with
    `use_dynamic_shifting` the solvers then apply the same resolution-dependent shift `exp(mu)`; without it the
    Euler scheduler ignores `mu` and shifts by its fixed `shift`, and so does the solver (`_static_shift`; DPM-Solver++
    would otherwise stop on the `mu` it cannot use).
    """
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    dynamic = bool(config.get("use_dynamic_shifting", False))
    common = {
        "use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": float(config.get("shift", 1.0)),
        "use_dynamic_shifting": dynamic, "time_shift_type": "exponential",
        "solver_order": 2, "final_sigmas_type": "zero",
    }
    if kind == "unipc":
        solver, extra = UniPCMultistepScheduler, {"solver_type": "bh2"}
    elif kind == "dpmpp":
        solver, extra = DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}
    else:
        raise ValueError(f"unknown solver {kind!r}")
    return (solver if dynamic else _static_shift(solver)).from_config(config, **common, **extra)


@functools.cache
def _static_shift(solver: type) -> type:
    """`solver` whose `set_timesteps` ignores `mu`, as a statically shifted Euler scheduler does."""

    def set_timesteps(self: Any, *args: Any, mu: float | None = None, **kwargs: Any) -> None:
        solver.set_timesteps(self, *args, **kwargs)

    return type(solver.__name__, (solver,), {"set_timesteps": set_timesteps, "__doc__": solver.__doc__})


def solver_method(kind: str, budget: int) -> Method:
    def install(pipe: Any) -> Callable[[], None]:
        original = pipe.scheduler
        pipe.scheduler = solver_scheduler(kind, original.config)

        def undo() -> None:
            pipe.scheduler = original

        return undo

    return Method(kind, budget, budget, install, {"num_inference_steps": budget, "solver_order": 2})


def cache_method(key: str, budget: int, steps: int, config: Any, **settings: Any) -> Method:
    """One of diffusers' cache hooks, enabled on the transformer for the call."""

    def install(pipe: Any) -> Callable[[], None]:
        pipe.transformer.enable_cache(config)
        return pipe.transformer.disable_cache

    return Method(key, budget, steps, install, settings)


def fbcache_method(budget: int, steps: int, threshold: float) -> Method:
    from diffusers import FirstBlockCacheConfig

    return cache_method("fbcache", budget, steps, FirstBlockCacheConfig(threshold=threshold), threshold=threshold)


def taylorseer_nfe(steps: int, interval: int, warmup: int) -> int:
    """Full evaluations of diffusers' TaylorSeer hook: warm-up steps, then every `interval`-th step
    (its rule: compute when `step < warmup` or `(step − warmup − 1) % interval == 0`)."""
    return sum(1 for s in range(steps) if s < warmup or (s - warmup - 1) % interval == 0)


def taylorseer_schedule(steps: int, budget: int, default_warmup: int = 3) -> tuple[int, int]:
    """(interval, warm-up) giving exactly `budget` full evaluations, warm-up nearest diffusers' default 3,
    then the smallest interval; the nearest NFE when no pair is exact."""
    candidates = [
        (abs(taylorseer_nfe(steps, interval, warmup) - budget), abs(warmup - default_warmup), interval, warmup)
        for warmup in range(1, max(2, budget))
        for interval in range(1, steps + 1)
    ]
    _, _, interval, warmup = min(candidates)
    return interval, warmup


def taylorseer_method(budget: int, steps: int, order: int = 1) -> Method:
    from diffusers import TaylorSeerCacheConfig

    interval, warmup = taylorseer_schedule(steps, budget)
    config = TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=warmup, max_order=order,
                                   taylor_factors_dtype=torch.float32, use_lite_mode=True)
    return cache_method("taylorseer", budget, steps, config, cache_interval=interval,
                        disable_cache_before_step=warmup, max_order=order, use_lite_mode=True)


def magcache_limits(steps: int, budget: int) -> tuple[float, int]:
    """(retention_ratio, max_skip_steps) for a budget.

    MagCache's default keeps the first 20% of N steps uncached, which alone exceeds B ≤ 10 of 50; the
    bench keeps the first 20% of the budget instead and lets up to twice the mean gap N/B be skipped.
    """
    retained = max(1, round(0.2 * budget))
    return retained / steps, 2 * math.ceil(steps / budget)


def magcache_method(budget: int, steps: int, threshold: float, ratios: list[float]) -> Method:
    from diffusers import MagCacheConfig

    retention, max_skip = magcache_limits(steps, budget)
    config = MagCacheConfig(threshold=threshold, max_skip_steps=max_skip, retention_ratio=retention,
                            num_inference_steps=steps, mag_ratios=torch.tensor(ratios))
    return cache_method("magcache", budget, steps, config, threshold=threshold, max_skip_steps=max_skip,
                        retention_ratio=retention)


def parse_mag_ratios(text: str) -> list[float]:
    """The ratios MagCache's calibration mode prints (its only output of them) from captured stdout."""
    lines = [line.strip() for line in text.splitlines()]
    for index, line in enumerate(lines):
        if "Calibration Complete" in line:
            for candidate in lines[index + 1:]:
                if candidate.startswith("["):
                    return [float(value) for value in ast.literal_eval(candidate)]
    raise ValueError("MagCache's calibration mode printed no ratios: this diffusers version reports them differently")


def calibrate_mag_ratios(pipe: Any, pairs: list[tuple[str, int]], call_kwargs: dict[str, Any], steps: int,
                         advance: Callable[[], None]) -> list[float]:
    """Mean of the ratios MagCache's own calibration mode measures on each (prompt, seed).

    Its report goes to stdout, which the bench keeps clean: it is captured and parsed here.
    """
    from diffusers import MagCacheConfig

    runs = []
    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    try:
        for prompt, seed in pairs:
            captured = io.StringIO()
            with redirect_stdout(captured):
                pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent",
                     **{**call_kwargs, "num_inference_steps": steps})
            runs.append(parse_mag_ratios(captured.getvalue()))
            advance()
    finally:
        pipe.transformer.disable_cache()
    return [float(value) for value in np.mean(np.array(runs), axis=0)]
