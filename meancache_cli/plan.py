"""Planning: a calibration's error map and a budget become a schedule (§4), at the calibration's step count
or fewer; and a schedule moved by σ onto the sigmas a run really uses."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from .core.planner import plan_path
from .core.regrid import fit_grid, map_steps, regrid_maps, scale_windows
from .core.stability import EdgeMaps, edge_costs
from .errors import ScheduleMismatchError, UsageError
from .files import Calibration, Schedule, sha256_of

DEFAULT_GAMMA = 4.0
DEFAULT_COST = "velocity"
REGRID_METHOD = "linear"
SAME_GRID = 1e-4  # sigmas closer than this are one grid (a schedule stores them to 7 digits)


def plan_schedule(
    calibration: Calibration,
    budget: int,
    gamma: float = DEFAULT_GAMMA,
    cost: str = DEFAULT_COST,
    max_skip: int | None = None,
    kmax: int = 1,
    calibration_path: str | Path | None = None,
    lambdas: tuple[float, ...] | None = None,
    steps: int | None = None,
    regrid: str = REGRID_METHOD,
) -> Schedule:
    """The cheapest schedule with exactly `budget` model evaluations; `kmax = 0` plans velocity reuse
    only, `lambdas` restricts the dampings to a subset of the calibrated ones. `steps` (at most the
    calibration's N) plans for another step count: the maps are read at that grid's sigmas (`regrid`:
    linear or nearest)."""
    n = calibration.num_inference_steps
    steps = n if steps is None else steps
    if steps > n:
        raise UsageError(f"--steps {steps} is more than the calibration's {n} steps: a calibration knows nothing "
                         f"finer than its own grid; calibrate with --steps {steps}, or plan for {n} steps or fewer")
    if not 1 <= budget <= steps:
        where = "the calibration has" if steps == n else "planning for"
        raise UsageError(f"--budget {budget} is out of range: {where} {steps} steps, use 1…{steps}")
    if not (np.isfinite(gamma) and gamma >= 0):
        raise UsageError(f"--gamma {gamma} is invalid: use a finite number ≥ 0 (a large γ such as 8 approaches "
                         "the min-max path)")
    if kmax not in (0, 1):
        raise UsageError(f"--kmax {kmax} is out of range: use 0 (velocity reuse only) or 1 (the JVP from the "
                         "previous compute step, the planner's largest order)")
    if max_skip is not None and max_skip < 1:
        raise UsageError(f"--max-skip {max_skip} is invalid: use 1 or more")
    calibrated = calibration.errors.lambdas
    unknown = [value for value in lambdas or () if value not in calibrated]
    if unknown:
        raise UsageError(f"--lambdas {','.join(f'{v:g}' for v in unknown)} not calibrated: use some of "
                         f"{','.join(f'{v:g}' for v in calibrated)} or calibrate with --lambdas")
    errors = calibration.errors.select(tuple(sorted(lambdas))) if lambdas else calibration.errors
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
        lambdas=path.lambdas, gamma=float(gamma), cost=cost, predicted_cost=path.objective,
        edge_costs=path.edge_costs, max_skip=max_skip, height=calibration.height, width=calibration.width,
        frames=calibration.frames, calibration=source, notes=notes, sigmas=_stored(sigmas),
    )


def _stored(sigmas: np.ndarray) -> list[float]:
    """Sigmas as a schedule file keeps them: 7 significant digits, as precise as the scheduler's float32."""
    return [float(f"{value:.7g}") for value in sigmas]


def maps_on_steps(sigmas: np.ndarray, errors: EdgeMaps, steps: int, method: str) -> tuple[np.ndarray, EdgeMaps]:
    """The sigmas the scheduler makes for `steps` at the calibration's resolution, and the maps read there."""
    try:
        grid = fit_grid(sigmas)
    except ValueError as error:
        raise UsageError(f"cannot plan for --steps {steps} from this calibration: {error}; calibrate with "
                         f"--steps {steps}") from None
    new_sigmas = grid.sigmas(steps)
    return new_sigmas, regrid_maps(errors, sigmas, new_sigmas, method)


def schedule_on_sigmas(schedule: Schedule, sigmas: np.ndarray) -> Schedule:
    """The schedule as it runs on a generation's sigmas: itself when planned on them, else its compute steps
    moved to the steps nearest in σ, as many as planned (orders and dampings stay with their edges; the
    release estimator's windows, counted in steps, are scaled to the new step count).

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


def uniform_schedule(model: str, steps: int, budget: int) -> Schedule:
    """Velocity reuse at evenly spaced steps (K = 0 everywhere): the plain caching baseline."""
    if not 1 <= budget <= steps:
        raise UsageError(f"budget {budget} is out of range: use 1…{steps}")
    compute = [i * steps // budget for i in range(budget)]
    return Schedule(model=model, num_inference_steps=steps, compute_steps=compute, orders=[0] * len(compute),
                    gamma=0.0, cost="velocity")
