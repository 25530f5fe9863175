"""Peak-suppressed shortest path with exactly B edges, each costed given its history (DESIGN.md §4).

Nodes are sampler steps `0 … N`; an edge `t→s` runs the model once at `t` and hands `û(t→s)` to every
step in `[t, s)`. Its estimate reads the previous compute step `p`, so its cost depends on (p, t, s)
and the program runs over states (previous compute step, current compute step): `O(B·N²·max_back)`.
On each edge it picks the cheapest option: reuse `v_t` (K = 0), or from `p` (K = 1) the JVP estimate with
one of the calibrated dampings λ or the exponential-integrator edge (where its map is not NaN).

Minimizing `Σ c^(1+γ)` instead of `Σ c` spreads the error: γ = 0 is the plain shortest path, a large γ
approaches the min-max path. Ties go to the earlier predecessor, then to reuse, then to the smaller λ,
then to the JVP over the exponential edge, so the result is deterministic, and a budget of N picks the
exact Euler edges (reuse on t→t+1 weighs 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .stability import EdgeErrors


@dataclass(frozen=True)
class PlannedPath:
    """A schedule as the planner sees it: where the model runs, with which estimate, order and damping."""

    compute_steps: list[int]
    orders: list[int]
    lambdas: list[float]
    kinds: list[str]
    edge_costs: list[float]
    objective: float


def generalized_cost(edge_costs: list[float], gamma: float) -> float:
    """`(Σ c^(1+γ))^(1/(1+γ))`: the objective in the units of the edge costs (γ = 0: their sum; γ → ∞: their max)."""
    costs = np.asarray(edge_costs, dtype=np.float64)
    peak = float(costs.max()) if costs.size else 0.0
    if peak <= 0:
        return 0.0
    return peak * float(np.sum((costs / peak) ** (1.0 + gamma))) ** (1.0 / (1.0 + gamma))


def plan_path(costs: EdgeErrors, budget: int, gamma: float, max_skip: int | None = None,
              kmax: int = 1) -> PlannedPath:
    """Exact dynamic program over `costs` (NaN = no such edge option); `kmax = 0` allows reuse only."""
    n, back_max = costs.num_steps, costs.max_back if kmax >= 1 else 0
    if not 1 <= budget <= n:
        raise ValueError(f"budget {budget} is outside 1…{n}: use a budget between 1 and the number of steps")
    if gamma < 0 or not np.isfinite(gamma):
        raise ValueError(f"gamma {gamma} must be a finite number ≥ 0")
    finite = np.concatenate([values[np.isfinite(values)] for values in (costs.reuse, costs.jvp, costs.exp)])
    scale = float(np.abs(finite).max()) if finite.size and np.abs(finite).max() > 0 else 1.0

    def weigh(values: np.ndarray) -> np.ndarray:
        weights = np.where(np.isnan(values), np.inf, np.power(np.abs(values) / scale, 1.0 + gamma))
        if max_skip is not None:
            span = np.arange(n + 1)[None, :] - np.arange(n + 1)[:, None]
            weights[..., span > max_skip] = np.inf
        return weights

    reuse = weigh(costs.reuse)
    # best[b − 1], choice[b − 1]: weight and option (0 reuse, j + 1 damping j, len(λ) + 1 the exponential
    # edge) of edge t→s when p = t − b.
    options = np.concatenate([np.broadcast_to(reuse, (1, back_max, n + 1, n + 1)),
                              weigh(costs.jvp[:, :back_max]), weigh(costs.exp[:, :back_max])], axis=0)
    best, choice = options.min(axis=0), options.argmin(axis=0)

    nodes = np.arange(n + 1)
    total = np.full((n + 1, n + 1), np.inf)  # total[t, s]: cheapest path with b edges whose last is t→s
    total[0] = reuse[0]
    parents = np.zeros((budget + 1, n + 1, n + 1), dtype=np.int32)
    for b in range(2, budget + 1):
        new = np.full((n + 1, n + 1), np.inf)
        parent = np.zeros((n + 1, n + 1), dtype=np.int32)
        # Predecessors beyond the look-back (earliest first) can only be followed by reuse.
        far = np.full(n + 1, np.inf)
        far_parent = np.zeros(n + 1, dtype=np.int32)
        for t in range(back_max + 1, n + 1):
            window = total[: t - back_max, t]
            far_parent[t] = int(np.argmin(window))
            far[t] = window[far_parent[t]]
        candidates = [(far[:, None] + reuse, far_parent[:, None])]
        for back in range(back_max, 0, -1):
            previous = np.full(n + 1, np.inf)
            previous[back:] = total[nodes[back:] - back, nodes[back:]]
            candidates.append((previous[:, None] + best[back - 1], (nodes - back)[:, None]))
        for value, start in candidates:
            better = value < new
            new[better] = value[better]
            parent[better] = np.broadcast_to(start, better.shape)[better]
        total, parents[b] = new, parent
    last = int(np.argmin(total[:, n]))
    if not np.isfinite(total[last, n]):
        raise ValueError(
            f"no schedule reaches step {n} in exactly {budget} evaluations with these edges: "
            "raise --max-skip or the budget"
        )
    steps = [n, last]
    for b in range(budget, 1, -1):
        steps.append(int(parents[b, steps[-1], steps[-2]]))
    steps.reverse()
    orders, dampings, kinds, edge_costs = [], [], [], []
    for index, (t, s) in enumerate(zip(steps[:-1], steps[1:])):
        p = steps[index - 1] if index > 0 else None
        option = int(choice[t - p - 1, t, s]) if p is not None and t - p <= back_max else 0
        kind = "reuse" if option == 0 else "jvp" if option <= len(costs.lambdas) else "exp"
        damping = costs.lambdas[option - 1] if kind == "jvp" else 1.0 if kind == "exp" else 0.0
        orders.append(0 if kind == "reuse" else 1)
        dampings.append(float(damping))
        kinds.append(kind)
        edge_costs.append(abs(costs.value(p, t, s, damping, kind)))
    return PlannedPath(compute_steps=steps[:-1], orders=orders, lambdas=dampings, kinds=kinds, edge_costs=edge_costs,
                objective=generalized_cost(edge_costs, gamma))


def path_cost(costs: EdgeErrors, path: PlannedPath, gamma: float) -> float:
    """The objective of `path`'s edges, each with its own estimate, priced on other maps `costs`."""
    ends = [*path.compute_steps[1:], costs.num_steps]
    values = [abs(costs.value(path.compute_steps[index - 1] if index else None, t, s, damping, kind))
              for index, (t, s, damping, kind) in enumerate(zip(path.compute_steps, ends, path.lambdas, path.kinds))]
    return generalized_cost(values, gamma)


def plan_stability(costs_a: EdgeErrors, costs_b: EdgeErrors, budget: int, gamma: float) -> tuple[int, float]:
    """Compute steps shared by the plans of two independent map estimates, and their regret: the larger
    relative excess of one half's plan, priced on the other half's maps, over that half's own plan."""
    path_a, path_b = plan_path(costs_a, budget, gamma), plan_path(costs_b, budget, gamma)
    shared = len(set(path_a.compute_steps) & set(path_b.compute_steps))
    regrets = [path_cost(costs_b, path_a, gamma) / path_b.objective - 1 if path_b.objective > 0 else 0.0,
               path_cost(costs_a, path_b, gamma) / path_a.objective - 1 if path_a.objective > 0 else 0.0]
    return shared, max(0.0, *regrets)
