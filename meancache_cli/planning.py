"""Planning: a calibration's error map and a budget become a schedule (§4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .core.planner import plan_path
from .core.stability import edge_costs
from .errors import UsageError
from .files import Calibration, Schedule, sha256_of

DEFAULT_GAMMA = 4.0
DEFAULT_COST = "velocity"


def plan_schedule(
    calibration: Calibration,
    budget: int,
    gamma: float = DEFAULT_GAMMA,
    cost: str = DEFAULT_COST,
    max_skip: int | None = None,
    kmax: int = 1,
    calibration_path: str | Path | None = None,
    lambdas: tuple[float, ...] | None = None,
) -> Schedule:
    """The cheapest schedule with exactly `budget` model evaluations; `kmax = 0` plans velocity reuse
    only, `lambdas` restricts the dampings to a subset of the calibrated ones."""
    n = calibration.num_inference_steps
    if not 1 <= budget <= n:
        raise UsageError(f"--budget {budget} is out of range: the calibration has {n} steps, use 1…{n}")
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
    try:
        path = plan_path(edge_costs(errors, calibration.sigmas, cost), budget, gamma, max_skip, kmax)
    except ValueError as error:
        raise UsageError(str(error)) from None
    source = None
    if calibration_path is not None and str(calibration_path) != "-":
        source = {"path": str(calibration_path), "sha256": sha256_of(calibration_path)}
    return Schedule(
        model=calibration.model, num_inference_steps=n, compute_steps=path.compute_steps, orders=path.orders,
        lambdas=path.lambdas, gamma=float(gamma), cost=cost, predicted_cost=path.objective,
        edge_costs=path.edge_costs, max_skip=max_skip, height=calibration.height, width=calibration.width,
        frames=calibration.frames, calibration=source,
    )


def uniform_schedule(model: str, steps: int, budget: int) -> Schedule:
    """Velocity reuse at evenly spaced steps (K = 0 everywhere): the plain caching baseline."""
    if not 1 <= budget <= steps:
        raise UsageError(f"budget {budget} is out of range: use 1…{steps}")
    compute = [i * steps // budget for i in range(budget)]
    return Schedule(model=model, num_inference_steps=steps, compute_steps=compute, orders=[0] * len(compute),
                    gamma=0.0, cost="velocity")
