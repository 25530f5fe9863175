"""Peak-suppressed shortest path with exactly B edges (DESIGN.md §4).

Nodes are sampler steps `0 … N`; an edge `t→s` with order K runs the model once at `t` and hands
`û_K(t→s)` to every step in `[t, s)`. Minimizing `Σ w^(1+γ)` instead of `Σ w` spreads the error:
γ = 0 is the plain shortest path, a large γ approaches the min-max path.

An order K ≥ 1 reads the velocities of steps `t−K … t−1`. Only steps the model really evaluated
carry information: at a skipped step the history holds the estimate itself, and `J_K` built on it
collapses to the previous edge's slope. So an edge may use order K only when the K steps before `t`
were all computed — the condition under which the calibrated error `E_K` is what the sampler gets.
The program therefore tracks, per node, how many consecutive steps before it were computed.
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


def computed_run(compute_steps: list[int], index: int) -> int:
    """How many steps right before `compute_steps[index]` were computed too (the usable history)."""
    run = 0
    while index - run - 1 >= 0 and compute_steps[index - run - 1] == compute_steps[index] - run - 1:
        run += 1
    return run


def plan_path(costs: np.ndarray, budget: int, gamma: float = 0.5, max_skip: int | None = None) -> Path:
    """Exact dynamic program over `costs` (shape (Kmax+1, N+1, N+1), NaN = no edge).

    State: (node, computed run before it, capped at Kmax); `O(B·N²·Kmax²)`. Ties go to the smaller
    K, then to the earlier step, so the result is deterministic and a budget of N picks the exact
    Euler edges.
    """
    kmax, n = costs.shape[0] - 1, costs.shape[1] - 1
    if not 1 <= budget <= n:
        raise ValueError(f"budget {budget} is outside 1…{n}: use a budget between 1 and the number of steps")
    if gamma < 0 or not np.isfinite(gamma):
        raise ValueError(f"gamma {gamma} must be a finite number ≥ 0")
    weights = np.where(np.isnan(costs), np.inf, np.power(np.abs(costs), 1.0 + gamma))
    span = np.arange(n + 1)[None, :] - np.arange(n + 1)[:, None]
    if max_skip is not None:
        weights[:, span > max_skip] = np.inf
    # best[r, t, s]: cheapest order for edge t→s when r steps before t were computed; order[r, t, s]: its K.
    best = np.minimum.accumulate(weights, axis=0)
    order = np.zeros_like(best, dtype=int)
    for k in range(1, kmax + 1):
        order[k] = np.where(weights[k] < best[k - 1], k, order[k - 1])

    states = kmax + 1
    total = np.full((n + 1, states), np.inf)
    total[0, 0] = 0.0
    parents = np.zeros((budget + 1, n + 1, states, 2), dtype=int)
    nodes = np.arange(n + 1)
    for b in range(1, budget + 1):
        new = np.full((n + 1, states), np.inf)
        for run in range(states):
            # candidates[t, s] = reach t with `run` computed steps before it, then take edge t→s.
            candidates = total[:, run][:, None] + best[run]
            # A unit edge t→t+1 extends the run of computed steps; a longer edge resets it to zero.
            unit = np.full(n + 1, np.inf)
            unit[1:] = np.diagonal(candidates, offset=1)
            candidates[nodes[:-1], nodes[1:]] = np.inf
            origin = np.argmin(candidates, axis=0)
            longer = candidates[origin, nodes]
            for target, value, start in ((min(run + 1, kmax), unit, nodes - 1), (0, longer, origin)):
                better = value < new[:, target]
                new[better, target] = value[better]
                parents[b, better, target, 0] = start[better]
                parents[b, better, target, 1] = run
        total = new
    end_run = int(np.argmin(total[n]))
    if not np.isfinite(total[n, end_run]):
        raise ValueError(
            f"no schedule reaches step {n} in exactly {budget} evaluations with these edges: "
            "raise --max-skip or the budget, or calibrate with a larger Kmax"
        )
    steps, runs = [n], [end_run]
    for b in range(budget, 0, -1):
        t, run = parents[b, steps[-1], runs[-1]]
        steps.append(int(t))
        runs.append(int(run))
    steps.reverse()
    runs.reverse()
    starts, ends = steps[:-1], steps[1:]
    orders = [int(order[r, t, s]) for r, t, s in zip(runs, starts, ends)]
    return Path(
        compute_steps=starts,
        orders=orders,
        edge_costs=[float(abs(costs[k, t, s])) for k, t, s in zip(orders, starts, ends)],
        objective=float(total[n, end_run]),
    )
