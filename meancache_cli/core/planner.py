"""Peak-suppressed shortest path with exactly B edges (DESIGN.md §4).

Nodes are sampler steps `0 … N`; an edge `t→s` with order K runs the model once at `t` and hands
`û_K(t→s)` to every step in `[t, s)`. Minimizing `Σ w^(1+γ)` instead of `Σ w` spreads the error:
γ = 0 is the plain shortest path, a large γ approaches the min-max path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Path:
    """A schedule as the planner sees it: where the model runs and with which order."""

    compute_steps: list[int]
    orders: list[int]
    edge_costs: list[float]
    objective: float


def plan_path(costs: np.ndarray, budget: int, gamma: float = 0.5, max_skip: int | None = None) -> Path:
    """Exact dynamic program over `costs` (shape (Kmax+1, N+1, N+1), NaN = no edge).

    `O(B·N²·(Kmax+1))`. Ties go to the smaller K, then to the earlier step, so the result is
    deterministic and a budget of N picks the exact Euler edges.
    """
    n = costs.shape[1] - 1
    if not 1 <= budget <= n:
        raise ValueError(f"budget {budget} is outside 1…{n}: use a budget between 1 and the number of steps")
    if gamma < 0 or not np.isfinite(gamma):
        raise ValueError(f"gamma {gamma} must be a finite number ≥ 0")
    weights = np.where(np.isnan(costs), np.inf, np.power(np.abs(costs), 1.0 + gamma))
    if max_skip is not None:
        span = np.arange(n + 1)[None, :] - np.arange(n + 1)[:, None]
        weights[:, span > max_skip] = np.inf
    best_order = np.argmin(weights, axis=0)
    edge = np.take_along_axis(weights, best_order[None], axis=0)[0]

    total = np.full(n + 1, np.inf)
    total[0] = 0.0
    parents = np.zeros((budget + 1, n + 1), dtype=int)
    for b in range(1, budget + 1):
        candidates = total[:, None] + edge
        parents[b] = np.argmin(candidates, axis=0)
        total = candidates[parents[b], np.arange(n + 1)]
    if not np.isfinite(total[n]):
        raise ValueError(
            f"no schedule reaches step {n} in exactly {budget} evaluations with these edges: "
            "raise --max-skip or the budget, or calibrate with a larger Kmax"
        )
    steps = [n]
    for b in range(budget, 0, -1):
        steps.append(int(parents[b][steps[-1]]))
    steps.reverse()
    starts, ends = steps[:-1], steps[1:]
    orders = [int(best_order[t, s]) for t, s in zip(starts, ends)]
    return Path(
        compute_steps=starts,
        orders=orders,
        edge_costs=[float(abs(costs[k, t, s])) for k, t, s in zip(orders, starts, ends)],
        objective=float(total[n]),
    )
