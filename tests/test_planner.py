import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meancache_cli.core.planner import generalized_cost, path_cost, plan_path, plan_stability
from meancache_cli.core.stability import EdgeErrors, defined_mask


def random_costs(rng: np.random.Generator, n: int, max_back: int, lambdas: tuple[float, ...] = (0.5, 1.0),
                 values: tuple[float, ...] | None = None, exponential: bool = True) -> EdgeErrors:
    """Random edge costs on the defined entries (NaN elsewhere), exact Euler edges at 0; the exponential edge's
    map too unless `exponential` is False."""
    shape_jvp = (len(lambdas), max_back, n + 1, n + 1)
    shape_exp = (1, max_back, n + 1, n + 1)
    if values is None:
        scale = rng.choice([0.1, 1.0, 10.0])
        reuse, jvp, exp = (rng.random(shape) * scale for shape in ((n + 1, n + 1), shape_jvp, shape_exp))
    else:
        reuse, jvp, exp = (rng.choice(values, shape) for shape in ((n + 1, n + 1), shape_jvp, shape_exp))
    reuse_defined, jvp_defined = defined_mask(n, max_back, len(lambdas))
    reuse, jvp = np.where(reuse_defined, reuse, np.nan), np.where(jvp_defined, jvp, np.nan)
    exp = np.where(jvp_defined[:1], exp, np.nan) if exponential else None
    reuse[np.arange(n), np.arange(1, n + 1)] = 0.0
    return EdgeErrors(reuse, jvp, lambdas, exp)


def paths(n: int, budget: int, max_skip: int | None = None):
    for inner in itertools.combinations(range(1, n), budget - 1):
        nodes = (0, *inner, n)
        if max_skip is None or all(b - a <= max_skip for a, b in zip(nodes, nodes[1:])):
            yield nodes


def edge_options(costs: EdgeErrors, nodes: tuple[int, ...], kmax: int) -> list[tuple[float, int, float, str]]:
    """Per edge its cheapest (cost, K, λ, kind): reuse first, then the dampings in order, then the exponential
    edge; the earliest wins a tie."""
    chosen = []
    for i, (t, s) in enumerate(zip(nodes, nodes[1:])):
        options = [(costs.reuse[t, s], 0, 0.0, "reuse")]
        if i > 0 and kmax >= 1 and t - nodes[i - 1] <= costs.max_back:
            back = t - nodes[i - 1] - 1
            options += [(costs.jvp[j, back, t, s], 1, lam, "jvp") for j, lam in enumerate(costs.lambdas)]
            options.append((costs.exp[0, back, t, s], 1, 1.0, "exp"))
        finite = [option for option in options if not np.isnan(option[0])]
        chosen.append(min(finite, key=lambda option: option[0]) if finite else (np.inf, 0, 0.0, "reuse"))
    return chosen


def brute_force(costs: EdgeErrors, budget: int, gamma: float, max_skip: int | None = None,
                kmax: int = 1) -> tuple[float, tuple[int, ...], list[tuple[float, int, float]]]:
    """The optimum Σ c^(1+γ) over every path 0→N with `budget` edges, every option per edge given the
    previous compute step; among equal optima the path whose steps are smallest read from the end."""
    n = costs.num_steps
    best = None
    for nodes in sorted(paths(n, budget, max_skip), key=lambda nodes: nodes[::-1]):
        options = edge_options(costs, nodes, kmax)
        value = sum(option[0] ** (1 + gamma) for option in options)
        if best is None or value < best[0]:
            best = (value, nodes, options)
    return best


def test_matches_brute_force_on_small_random_graphs() -> None:
    rng = np.random.default_rng(0)
    for _ in range(150):
        n, max_back = int(rng.integers(2, 9)), int(rng.integers(1, 4))
        budget = int(rng.integers(1, n + 1))
        gamma = float(rng.choice([0.0, 0.5, 1.0, 2.0, 4.0]))
        max_skip = None if rng.random() < 0.7 else int(rng.integers(-(-n // budget), n + 1))
        kmax = int(rng.random() < 0.8)
        costs = random_costs(rng, n, max_back)
        path = plan_path(costs, budget, gamma, max_skip, kmax)
        value, nodes, options = brute_force(costs, budget, gamma, max_skip, kmax)
        # The optimum, its path and each edge's cost as the brute force reads them from the maps and sums them.
        assert path.objective ** (1 + gamma) == pytest.approx(value, rel=1e-9, abs=1e-12)
        assert path.objective == pytest.approx(value ** (1 / (1 + gamma)), rel=1e-9, abs=1e-12)
        assert path.compute_steps == list(nodes[:-1])
        assert path.edge_costs == pytest.approx([option[0] for option in options], rel=1e-12, abs=1e-15)
        for k, lam, kind in zip(path.orders, path.lambdas, path.kinds):
            assert (k == 0) == (lam == 0) == (kind == "reuse") and k <= kmax


def test_ties_go_to_the_earlier_steps_then_to_reuse_then_to_the_smaller_damping_then_to_the_jvp() -> None:
    """Costs in {1, 2, 4} tie often; the planner's documented tie-break is what the brute force picks."""
    rng = np.random.default_rng(5)
    for _ in range(150):
        n, max_back = int(rng.integers(3, 8)), int(rng.integers(1, 3))
        budget = int(rng.integers(2, n + 1))
        gamma = float(rng.choice([0.0, 1.0]))
        costs = random_costs(rng, n, max_back, values=(1.0, 2.0, 4.0))
        path = plan_path(costs, budget, gamma)
        _, nodes, options = brute_force(costs, budget, gamma)
        assert path.compute_steps == list(nodes[:-1])
        assert path.orders == [option[1] for option in options]
        assert path.lambdas == [option[2] for option in options] and path.kinds == [option[3] for option in options]


def test_the_jvp_edge_reads_its_previous_compute_step() -> None:
    """A cheap JVP edge 3→6 with p = 1 only: the planner must compute step 1 right before step 3."""
    n = 6
    costs = random_costs(np.random.default_rng(0), n, 3, values=(2.0,))
    costs.jvp[:, 1, 3, 6] = [0.5, 0.01]  # p = 3 − 2 = 1, λ = 1 cheapest
    costs.jvp[:, 0, 1, 3] = [0.1, 0.2]  # p = 0, λ = 0.5 cheapest
    path = plan_path(costs, 3, 0.0)
    assert path.compute_steps == [0, 1, 3] and path.orders == [0, 1, 1] and path.lambdas == [0.0, 0.5, 1.0]
    assert path.edge_costs == [0.0, 0.1, 0.01]
    assert plan_path(costs, 3, 0.0, kmax=0).orders == [0, 0, 0]


def test_generalized_cost_is_in_the_units_of_the_edges() -> None:
    assert generalized_cost([0.3, 0.4], 0.0) == pytest.approx(0.7)
    assert generalized_cost([0.3, 0.4], 1.0) == pytest.approx(0.5)
    assert generalized_cost([0.3, 0.4], 200.0) == pytest.approx(0.4, rel=1e-2)
    assert generalized_cost([0.0, 0.0], 2.0) == 0.0
    assert generalized_cost([], 0.5) == 0.0  # no edge, no cost


def test_larger_gamma_drives_the_peak_towards_the_min_max_path() -> None:
    """The largest edge of the optimum is within B^(1/(1+γ)) of the min-max path, for every γ."""
    rng = np.random.default_rng(1)
    for _ in range(60):
        n, max_back = int(rng.integers(3, 8)), int(rng.integers(1, 3))
        budget = int(rng.integers(1, n + 1))
        costs = random_costs(rng, n, max_back)
        best_peak = min(max(option[0] for option in edge_options(costs, nodes, 1)) for nodes in paths(n, budget))
        for gamma in (0.0, 0.5, 2.0, 16.0):
            peak = max(plan_path(costs, budget, gamma).edge_costs)
            assert peak <= budget ** (1 / (1 + gamma)) * best_peak + 1e-12


def test_the_schedule_does_not_depend_on_the_unit_of_the_costs() -> None:
    """Costs in any unit (1e-30 or 1e30 times larger) give the same schedule, even where a large γ would
    under- or overflow `c^(1+γ)` in that unit."""
    rng = np.random.default_rng(3)
    for _ in range(20):
        n, max_back = int(rng.integers(4, 8)), int(rng.integers(1, 3))
        budget = int(rng.integers(2, n))
        costs = random_costs(rng, n, max_back)
        path = plan_path(costs, budget, 20.0)
        for unit in (1e-30, 1e30):
            scaled = plan_path(EdgeErrors(costs.reuse * unit, costs.jvp * unit, costs.lambdas, costs.exp * unit),
                               budget, 20.0)
            assert (scaled.compute_steps, scaled.orders, scaled.lambdas, scaled.kinds) == (
                path.compute_steps, path.orders, path.lambdas, path.kinds)
            assert scaled.objective == pytest.approx(path.objective * unit)


def test_a_missing_jvp_option_leaves_the_reuse_option_of_its_edge() -> None:
    """NaN marks a missing option, not a missing edge: without any JVP option the planner plans as with kmax = 0."""
    rng = np.random.default_rng(4)
    for _ in range(20):
        n, max_back = int(rng.integers(3, 8)), int(rng.integers(1, 3))
        budget = int(rng.integers(1, n + 1))
        costs = random_costs(rng, n, max_back)
        no_jvp = EdgeErrors(costs.reuse, np.full_like(costs.jvp, np.nan), costs.lambdas)  # and no exponential edge
        path, reuse_only = plan_path(no_jvp, budget, 0.5), plan_path(costs, budget, 0.5, kmax=0)
        assert (path.compute_steps, path.orders, path.lambdas) == (reuse_only.compute_steps, reuse_only.orders,
                                                                   reuse_only.lambdas)


def test_budget_equal_to_steps_takes_every_exact_euler_edge() -> None:
    costs = random_costs(np.random.default_rng(2), 12, 3)
    path = plan_path(costs, 12, 0.5)
    assert path.compute_steps == list(range(12)) and path.orders == [0] * 12 and path.objective == 0.0


def test_rejects_impossible_requests() -> None:
    costs = random_costs(np.random.default_rng(3), 10, 2)
    with pytest.raises(ValueError, match="budget 11 is outside 1…10"):
        plan_path(costs, 11, 0.5)
    with pytest.raises(ValueError, match="budget 0 is outside"):
        plan_path(costs, 0, 0.5)
    with pytest.raises(ValueError, match="gamma -1"):
        plan_path(costs, 3, -1.0)
    with pytest.raises(ValueError, match="no schedule reaches step 10 in exactly 3"):
        plan_path(costs, 3, 0.5, max_skip=2)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 30), max_back=st.integers(1, 8), gamma=st.floats(0, 8), seed=st.integers(0, 2**31),
    budget_fraction=st.floats(0, 1),
)
def test_always_returns_a_valid_path_with_exactly_b_evaluations(
    n: int, max_back: int, gamma: float, seed: int, budget_fraction: float
) -> None:
    budget = max(1, round(budget_fraction * n))
    costs = random_costs(np.random.default_rng(seed), n, max_back)
    path = plan_path(costs, budget, gamma)
    assert len(path.compute_steps) == len(path.orders) == len(path.lambdas) == budget
    assert path.compute_steps[0] == 0 and all(b > a for a, b in zip(path.compute_steps, path.compute_steps[1:]))
    assert path.compute_steps[-1] < n and path.orders[0] == 0
    assert all(k in (0, 1) for k in path.orders) and np.isfinite(path.objective)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 7), max_back=st.integers(1, 6), gamma=st.sampled_from([0.0, 0.5, 3.0]),
       seed=st.integers(0, 2**31), budget_fraction=st.floats(0, 1))
def test_dp_optimum_equals_brute_force(n: int, max_back: int, gamma: float, seed: int, budget_fraction: float) -> None:
    budget = max(1, round(budget_fraction * n))
    costs = random_costs(np.random.default_rng(seed), n, max_back)
    value, _, _ = brute_force(costs, budget, gamma)
    assert plan_path(costs, budget, gamma).objective ** (1 + gamma) == pytest.approx(value, rel=1e-9, abs=1e-12)


def test_a_path_priced_on_its_own_maps_costs_its_objective() -> None:
    rng = np.random.default_rng(6)
    for _ in range(30):
        n, max_back = int(rng.integers(3, 9)), int(rng.integers(1, 4))
        budget, gamma = int(rng.integers(1, n + 1)), float(rng.choice([0.0, 1.0, 4.0]))
        costs = random_costs(rng, n, max_back)
        path = plan_path(costs, budget, gamma)
        assert path_cost(costs, path, gamma) == pytest.approx(path.objective, rel=1e-12, abs=1e-15)


def test_plan_stability_compares_each_half_plan_on_the_other_half() -> None:
    """Identical halves agree completely; otherwise the regret is the brute-force optimum's excess, computed
    edge by edge from the maps (not through the planner's own pricing)."""
    rng = np.random.default_rng(7)
    costs = random_costs(rng, 7, 2)
    assert plan_stability(costs, costs, 3, 2.0) == (3, 0.0)
    for _ in range(20):
        a, b = random_costs(rng, 7, 2), random_costs(rng, 7, 2)
        shared, regret = plan_stability(a, b, 3, 2.0)
        optimum_a, nodes_a, _ = brute_force(a, 3, 2.0)
        optimum_b, nodes_b, _ = brute_force(b, 3, 2.0)

        def priced(costs: EdgeErrors, planned: EdgeErrors, nodes: tuple[int, ...]) -> float:
            """The other half's plan: its options chosen on `planned`, priced on `costs`."""
            total = 0.0
            for i, (t, s) in enumerate(zip(nodes, nodes[1:])):
                _, k, lam, kind = edge_options(planned, nodes, 1)[i]
                total += abs(costs.value(nodes[i - 1] if k else None, t, s, lam, kind)) ** 3
            return total ** (1 / 3)

        expected = max(priced(b, a, nodes_a) / optimum_b ** (1 / 3) - 1,
                       priced(a, b, nodes_b) / optimum_a ** (1 / 3) - 1)
        assert regret == pytest.approx(max(0.0, expected), rel=1e-9, abs=1e-12)
        assert shared == len(set(nodes_a[:-1]) & set(nodes_b[:-1]))
