"""Planning: a calibration's error map and a budget become a schedule (§4), validated when a pipeline is at hand,
at the calibration's step count or fewer; and a schedule moved by σ onto the sigmas a run really uses.

No recipe (cost kind, γ, dampings, edge families) wins on every model and configuration (DESIGN.md §4), so
with a pipeline `plan` plans every candidate recipe, runs each distinct schedule cached on the calibration's
held-out runs, and keeps the one whose final latents come closest to the uncached ones. The runs cost B
evaluations each: the number of held-out runs used is capped so validation stays within
`defaults.VALIDATION_SHARE` of the calibration's own evaluations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import defaults
from .core.planner import plan_path
from .core.regrid import fit_grid, map_steps, regrid_maps, scale_windows
from .core.stability import COST_KINDS, EdgeErrors, edge_costs
from .errors import ScheduleMismatchError, UsageError
from .files import Calibration, Schedule, sha256_of

REGRID_METHOD = "linear"
SAME_GRID = 1e-4  # sigmas closer than this are one grid (a schedule stores them to 7 digits)


def plan_schedule(
    calibration: Calibration,
    budget: int,
    gamma: float = defaults.RECIPE.gamma,
    cost: str = defaults.RECIPE.cost,
    max_skip: int | None = None,
    kmax: int = defaults.KMAX,
    calibration_path: str | Path | None = None,
    lambdas: tuple[float, ...] | None = None,
    exponential: bool = defaults.RECIPE.exponential,
    steps: int | None = None,
    regrid: str = REGRID_METHOD,
) -> Schedule:
    """The cheapest schedule with exactly `budget` model evaluations; `kmax = 0` plans velocity reuse
    only, `lambdas` restricts the dampings to a subset of the calibrated ones, `exponential` lets edges use
    the exponential integrator. `steps` (at most the calibration's N) plans for another step count: the maps
    are read at that grid's sigmas (`regrid`: linear or nearest)."""
    n = calibration.num_inference_steps
    steps = n if steps is None else steps
    if steps > n:
        raise UsageError(f"steps={steps} is more than the calibration's {n} steps: a calibration knows nothing "
                         f"finer than its own grid; calibrate with --steps {steps}, or plan for {n} steps or fewer")
    if not 1 <= budget <= steps:
        where = "the calibration has" if steps == n else "planning for"
        raise UsageError(f"budget={budget} is out of range: {where} {steps} steps, use 1…{steps}")
    if not (np.isfinite(gamma) and gamma >= 0):
        raise UsageError(f"gamma={gamma} is invalid: use a finite number ≥ 0 (a large γ such as 8 approaches "
                         "the min-max path)")
    if cost not in COST_KINDS:
        raise UsageError(f"cost={cost!r} is unknown: use one of {', '.join(COST_KINDS)}")
    if kmax not in (0, 1):
        raise UsageError(f"kmax={kmax} is out of range: use 0 (velocity reuse only) or 1 (the JVP from the "
                         "previous compute step, the planner's largest order)")
    if max_skip is not None and max_skip < 1:
        raise UsageError(f"max_skip={max_skip} is invalid: use 1 or more")
    calibrated = calibration.errors.lambdas
    unknown = [value for value in lambdas or () if value not in calibrated]
    if unknown:
        raise UsageError(f"lambdas={','.join(f'{v:g}' for v in unknown)} not calibrated: use some of "
                         f"{','.join(f'{v:g}' for v in calibrated)} or calibrate with those lambdas")
    errors = calibration.errors.select(tuple(sorted(lambdas)) if lambdas else calibrated, exponential)
    sigmas, notes = calibration.sigmas, None
    if steps != n:
        sigmas, errors = maps_on_steps(calibration.sigmas, errors, steps, regrid)
        notes = f"planned for {steps} steps from a {n}-step calibration: its error maps read at these sigmas ({regrid})"
    try:
        path = plan_path(edge_costs(errors, sigmas, cost), budget, gamma, max_skip, kmax)
    except ValueError as error:
        raise UsageError(str(error)) from None
    source = None
    if calibration_path is not None and str(calibration_path) != "-":
        source = {"path": str(calibration_path), "sha256": sha256_of(calibration_path)}
    return Schedule(
        model=calibration.model, num_inference_steps=steps, compute_steps=path.compute_steps, orders=path.orders,
        lambdas=path.lambdas, kinds=path.kinds, gamma=float(gamma), cost=cost, predicted_cost=path.objective,
        edge_costs=path.edge_costs, max_skip=max_skip, height=calibration.height, width=calibration.width,
        frames=calibration.frames, calibration=source, notes=notes, sigmas=_stored(sigmas),
    )


def _stored(sigmas: np.ndarray) -> list[float]:
    """Sigmas as a schedule file keeps them: 7 significant digits, as precise as the scheduler's float32."""
    return [float(f"{value:.7g}") for value in sigmas]


def maps_on_steps(sigmas: np.ndarray, errors: EdgeErrors, steps: int, method: str) -> tuple[np.ndarray, EdgeErrors]:
    """The sigmas the scheduler makes for `steps` at the calibration's resolution, and the maps read there."""
    try:
        grid = fit_grid(sigmas)
    except ValueError as error:
        raise UsageError(f"cannot plan for steps={steps} from this calibration: {error}; calibrate with "
                         f"--steps {steps}") from None
    new_sigmas = grid.sigmas(steps)
    return new_sigmas, regrid_maps(errors, sigmas, new_sigmas, method)


def schedule_on_sigmas(schedule: Schedule, sigmas: np.ndarray) -> Schedule:
    """The schedule as it runs on a generation's sigmas: itself when planned on them, else its compute steps
    moved to the steps nearest in σ, as many as planned (orders, dampings and kinds stay with their edges;
    the release estimator's windows, counted in steps, are scaled to the new step count).

    A schedule that records no sigmas was planned, as far as it says, at this run's resolution: its grid is
    this run's grid at its own step count. Raises ScheduleMismatchError when it cannot run here.
    """
    n, planned_n = len(sigmas) - 1, schedule.num_inference_steps
    if schedule.sigmas is not None:
        planned = np.asarray(schedule.sigmas, dtype=np.float64)
        if len(planned) == len(sigmas) and np.max(np.abs(planned - sigmas)) <= SAME_GRID:
            return schedule
    elif n == planned_n:
        return schedule
    else:
        try:
            planned = fit_grid(sigmas).sigmas(planned_n)
        except ValueError as error:
            raise ScheduleMismatchError(
                f"the schedule was planned for {planned_n} steps and records no sigmas, and this run's {n} steps "
                f"do not show the grid to map it onto ({error}): generate with {planned_n} steps") from None
    if schedule.budget > n:
        raise ScheduleMismatchError(
            f"the schedule makes {schedule.budget} evaluations per branch but this run has only {n} steps: use "
            f"{schedule.budget} steps or more, or a schedule with a smaller budget")
    steps = map_steps(schedule.compute_steps, planned, sigmas)
    orders = (scale_windows(schedule.orders, steps, planned_n, n) if schedule.estimator == "release"
              else schedule.orders)
    return replace(schedule, num_inference_steps=n, compute_steps=steps, orders=orders, sigmas=_stored(sigmas))


def plan_recipe(calibration: Calibration, budget: int, recipe: defaults.Recipe, **options: Any) -> Schedule:
    """`plan_schedule` with a recipe's cost, γ, dampings and edge families."""
    return plan_schedule(calibration, budget, recipe.gamma, recipe.cost, lambdas=recipe.lambdas,
                         exponential=recipe.exponential, **options)


def uniform_schedule(model: str, steps: int, budget: int) -> Schedule:
    """Velocity reuse at evenly spaced steps (K = 0 everywhere): the plain caching baseline."""
    if not 1 <= budget <= steps:
        raise UsageError(f"budget={budget} is out of range: use 1…{steps}")
    compute = [i * steps // budget for i in range(budget)]
    return Schedule(model=model, num_inference_steps=steps, compute_steps=compute, orders=[0] * len(compute),
                    gamma=0.0, cost="velocity")


def _same_plan(a: Schedule, b: Schedule) -> bool:
    return (a.compute_steps, a.orders, a.lambdas, a.kinds) == (b.compute_steps, b.orders, b.lambdas, b.kinds)


def validation_runs(calibration: Calibration, schedules: int, budget: int) -> int:
    """Held-out runs to validate `schedules` distinct schedules on: all of them, or as many as keep the
    validation's evaluations within `defaults.VALIDATION_SHARE` of the calibration's (at least one)."""
    affordable = math.floor(defaults.VALIDATION_SHARE * calibration.evaluations_per_branch / (schedules * budget))
    return max(1, min(len(calibration.held_out), affordable))


def held_out_scores(pipe: Any, calibration: Calibration, schedule: Schedule, runs: int,
                    on_run: Callable[[], None] | None = None) -> list[float]:
    """Latent PSNR of `schedule` run cached on the first `runs` held-out runs, against their uncached outputs."""
    from .generate import generate
    from .metrics import latent_psnr

    kwargs = {**calibration.call_kwargs, "num_inference_steps": calibration.num_inference_steps}
    scores = []
    for run in calibration.held_out[:runs]:
        latents = generate(pipe, run.prompt, run.seed, kwargs, schedule, output_type="latent").images
        scores.append(latent_psnr(torch.stack([torch.as_tensor(x) for x in latents]), torch.from_numpy(run.final)))
        if on_run is not None:
            on_run()
    return scores


def validate(pipe: Any, calibration: Calibration, budget: int, candidates: Sequence[defaults.Recipe],
             on_run: Callable[[], None] | None = None, **options: Any) -> Schedule:
    """Plan every candidate recipe, score each distinct schedule on the held-out runs, return the best with
    every candidate's scores in its `validation`.

    The first candidate is the incumbent: another replaces it only when it scores more than
    `defaults.VALIDATION_MARGIN` dB higher (a few held-out runs cannot tell recipes apart by less); among the
    others the earliest wins a tie."""
    if not calibration.held_out:
        raise UsageError("the calibration has no held-out runs to validate on: calibrate with holdout ≥ 1 "
                         "(--holdout), or plan without a pipeline")
    if options.get("steps") not in (None, calibration.num_inference_steps):
        raise UsageError(f"steps={options['steps']}: the held-out runs were made with the calibration's "
                         f"{calibration.num_inference_steps} steps, so validation plans for those; plan for other "
                         "steps without a pipeline")
    if not candidates:
        raise UsageError("no candidate recipe to validate: give at least one")
    planned = [plan_recipe(calibration, budget, recipe, **options) for recipe in candidates]
    distinct: list[int] = []
    for index, schedule in enumerate(planned):
        if not any(_same_plan(schedule, planned[other]) for other in distinct):
            distinct.append(index)
    runs = validation_runs(calibration, len(distinct), budget)
    scores = {index: held_out_scores(pipe, calibration, planned[index], runs, on_run) for index in distinct}
    entries, best = [], None
    for index, (recipe, schedule) in enumerate(zip(candidates, planned)):
        same = next(other for other in distinct if _same_plan(schedule, planned[other]))
        score = float(np.mean(scores[same]))
        if best is None or score > best[0] + (defaults.VALIDATION_MARGIN if best[1] == 0 else 0.0):
            best = (score, index)
        entries.append({"recipe": recipe.name, **asdict(recipe), "lambdas": list(recipe.lambdas),
                        "psnr": [round(value, 3) for value in scores[same]], "score": round(score, 3),
                        "same_plan_as": candidates[same].name if same != index else None})
    calibration_evaluations = calibration.evaluations_per_branch
    evaluations = len(distinct) * runs * budget
    validation = {
        "chosen": candidates[best[1]].name, "metric": "mean latent PSNR (dB) on held-out calibration runs",
        "margin": defaults.VALIDATION_MARGIN, "runs": runs, "evaluations_per_branch": evaluations,
        "calibration_evaluations_per_branch": calibration_evaluations,
        "cost_share": round(evaluations / calibration_evaluations, 4), "candidates": entries,
    }
    return replace(planned[best[1]], validation=validation)


def plan(calibration: Calibration, budget: int, pipe: Any = None, *,
         candidates: Sequence[defaults.Recipe] | None = None, cost: str | None = None, gamma: float | None = None,
         lambdas: tuple[float, ...] | None = None, exponential: bool | None = None,
         on_run: Callable[[], None] | None = None, **options: Any) -> Schedule:
    """A schedule with exactly `budget` evaluations from `calibration`.

    Without `pipe`: the recipe given by `cost`, `gamma`, `lambdas` and `exponential` (defaults: `defaults.RECIPE`).
    With `pipe` (the calibrated pipeline): validated — every recipe of `candidates` (default `defaults.CANDIDATES`;
    a recipe given through the keywords is the only candidate) is run on the held-out calibration runs and the
    best is kept, with every candidate's score in `schedule.validation`. `options`: `max_skip`, `kmax`,
    `calibration_path`.
    """
    given = {name: value for name, value in (("cost", cost), ("gamma", gamma), ("lambdas", lambdas),
                                              ("exponential", exponential)) if value is not None}
    recipe = replace(defaults.RECIPE, **given)
    if pipe is None:
        return plan_recipe(calibration, budget, recipe, **options)
    if candidates is None:
        candidates = [recipe] if given else defaults.CANDIDATES
    return validate(pipe, calibration, budget, candidates, on_run, **options)
