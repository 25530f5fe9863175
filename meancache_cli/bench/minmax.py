"""Min-max (LeMiCa-style) schedules: the path 0 → N with exactly B edges whose largest edge is smallest.

LeMiCa ("lexicographic minimax path caching") picks the compute steps whose worst skipped interval does
the least damage, instead of the smallest total damage. Among the many paths that share the smallest
maximum, it keeps the one whose second-largest edge is smallest, then the third, and so on: the
lexicographic minimax (leximax) order on the edge costs sorted from largest to smallest. That order
survives adding the same edge to two paths, so an exact dynamic program over (edges used, node) keeps
one best sorted cost vector per state. `O(B²·N²)` tuple work: well under a second for N = 50.
"""

from __future__ import annotations

from bisect import insort

import numpy as np

from ..core.planner import PlannedPath


def _with_edge(costs_desc: tuple[float, ...], cost: float) -> tuple[float, ...]:
    """`costs_desc` (sorted from largest to smallest) with `cost` inserted in its place."""
    merged = list(costs_desc)
    insort(merged, cost, key=lambda value: -value)
    return tuple(merged)


def minmax_path(costs: np.ndarray, budget: int) -> PlannedPath:
    """The leximax-optimal path `0 → N` with exactly `budget` edges over K = 0 edge costs.

    `costs` is the `(N+1, N+1)` reuse cost map (edge `t → s` at `[t, s]`, NaN or inf where there is no
    edge): a min-max schedule reuses the velocity, it does not extrapolate it. `objective` is the largest
    edge cost of the path.
    """
    n = costs.shape[0] - 1
    if not 1 <= budget <= n:
        raise ValueError(f"budget {budget} is outside 1…{n}: use a budget between 1 and the number of steps")
    weights = np.where(np.isnan(costs), np.inf, np.abs(costs))
    # best[s] = (sorted costs, previous node) of the best path 0 → s with b edges.
    best: dict[int, tuple[tuple[float, ...], int]] = {0: ((), -1)}
    parents: list[dict[int, int]] = []
    for b in range(1, budget + 1):
        layer: dict[int, tuple[tuple[float, ...], int]] = {}
        # A node s can still reach N with the remaining budget − b edges only if s ≤ N − (budget − b).
        for s in range(b, n - (budget - b) + 1):
            for t, (path_costs, _) in best.items():
                if t >= s or not np.isfinite(weights[t, s]):
                    continue
                candidate = _with_edge(path_costs, float(weights[t, s]))
                if s not in layer or candidate < layer[s][0]:
                    layer[s] = (candidate, t)
        best = layer
        parents.append({s: t for s, (_, t) in layer.items()})
    if n not in best:
        raise ValueError(f"no schedule reaches step {n} in exactly {budget} evaluations with these edges")
    steps = [n]
    for b in range(budget, 0, -1):
        steps.append(parents[b - 1][steps[-1]])
    steps.reverse()
    starts, ends = steps[:-1], steps[1:]
    edge_costs = [float(weights[t, s]) for t, s in zip(starts, ends)]
    return PlannedPath(compute_steps=starts, orders=[0] * budget, lambdas=[0.0] * budget, kinds=["reuse"] * budget,
                       edge_costs=edge_costs, objective=max(edge_costs))
