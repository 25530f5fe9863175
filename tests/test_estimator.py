import math

import numpy as np
import pytest
import torch
from oracle import dpm_solver_2m

from meancache_cli.core.estimator import (
    average_velocity,
    exponential_velocity,
    jvp_estimate,
    mean_velocity,
    release_velocity,
)
from meancache_cli.core.stability import (
    EdgeErrors,
    StabilityMaps,
    edge_costs,
    element_subset,
    euler_trajectory,
    trajectory_errors,
)


def affine_trajectory(sigmas: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact solution of dx/dσ = a + b·σ sampled at `sigmas`, and the velocities there."""
    xs = torch.stack([a * s + 0.5 * b * s**2 for s in sigmas])
    vs = torch.stack([a + b * s for s in sigmas[:-1]])
    return xs, vs


@pytest.mark.parametrize("back", [1, 2, 5])
def test_estimate_is_exact_for_affine_velocity(back: int) -> None:
    sigmas = torch.linspace(1, 0, 11, dtype=torch.float64) ** 1.7
    a, b = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    xs, vs = affine_trajectory(sigmas, a, b)
    for t in range(back, 10):
        for s in range(t + 1, 11):
            u = average_velocity(xs[t], xs[s], sigmas[t], sigmas[s])
            p = t - back
            u_hat = mean_velocity(vs[t], sigmas[t], sigmas[s], vs[p], sigmas[p])
            torch.testing.assert_close(u_hat, u, rtol=1e-10, atol=1e-10)


def test_estimate_by_hand() -> None:
    """σ_p = 0.8, σ_t = 0.6, σ_s = 0.2, v_p = 1, v_t = 2: J = (2 − 1)/(2·(0.6 − 0.8)) = −2.5,
    û = 2 + λ·(0.2 − 0.6)·(−2.5) = 2 + λ."""
    v_p, v_t = torch.tensor([1.0], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64)
    assert jvp_estimate(v_p, v_t, 0.8, 0.6).item() == pytest.approx(-2.5)
    assert mean_velocity(v_t, 0.6, 0.2, v_p, 0.8).item() == pytest.approx(3.0)
    assert mean_velocity(v_t, 0.6, 0.2, v_p, 0.8, damping=0.5).item() == pytest.approx(2.5)


def test_reuse_returns_the_velocity_itself() -> None:
    v_t = torch.randn(4)
    assert mean_velocity(v_t, 0.6, 0.2) is v_t
    assert mean_velocity(v_t, 0.6, 0.2, torch.randn(4), 0.8, damping=0.0) is v_t


def test_plain_reuse_is_wrong_for_affine_velocity() -> None:
    sigmas = torch.linspace(1, 0, 11, dtype=torch.float64)
    xs, vs = affine_trajectory(sigmas, torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64))
    u = average_velocity(xs[2], xs[6], sigmas[2], sigmas[6])
    assert (mean_velocity(vs[2], sigmas[2], sigmas[6]) - u).abs().max() > 0.1


def test_release_velocity_by_hand() -> None:
    """Window [r, m] with x_r = 0, x_m = 1, σ_r = 1, σ_m = 0.5: u(r→m) = −2; v_r = −1 gives
    J = (−2 + 1)/(0.5 − 1) = 2, and û_m = v_{m−1} + (σ_{m+1} − σ_m)·J = 3 + (0.25 − 0.5)·2 = 2.5."""
    one = torch.ones(1, dtype=torch.float64)
    value = release_velocity(3 * one, 0 * one, -one, one, 1.0, 0.5, 0.25)
    assert value.item() == pytest.approx(2.5)


def naive_maps(xs: torch.Tensor, vs: torch.Tensor, sigmas: torch.Tensor, max_back: int,
               lambdas: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """E(p, t, s) straight from DESIGN.md §3, one entry at a time, without the library's estimator."""
    n = len(vs)
    reuse = np.full((n + 1, n + 1), np.nan)
    jvp = np.full((len(lambdas), max_back, n + 1, n + 1), np.nan)
    for t in range(n):
        for s in range(t + 1, n + 1):
            u = (xs[s] - xs[t]) / (sigmas[s] - sigmas[t])
            reuse[t, s] = float((u - vs[t]).abs().mean())
            for p in range(max(0, t - max_back), t):
                for j, lam in enumerate(lambdas):
                    slope = (vs[t] - (vs[p] + vs[t]) / 2) / (sigmas[t] - sigmas[p])
                    jvp[j, t - p - 1, t, s] = float((u - vs[t] - lam * (sigmas[s] - sigmas[t]) * slope).abs().mean())
    return reuse, jvp


def test_error_maps_match_a_naive_implementation_of_the_definition() -> None:
    torch.manual_seed(0)
    sigmas = torch.linspace(1, 0, 8, dtype=torch.float64) ** 1.3
    vs = torch.randn(7, 6, dtype=torch.float64).cumsum(0)
    xs = euler_trajectory(torch.randn(6, dtype=torch.float64), vs, sigmas)
    maps = trajectory_errors(xs, vs, sigmas, max_back=3, lambdas=(0.5, 1.0))
    reuse, jvp = naive_maps(xs, vs, sigmas, 3, (0.5, 1.0))
    np.testing.assert_allclose(maps.reuse, reuse, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(maps.jvp, jvp, rtol=1e-12, equal_nan=True)
    assert maps.value(2, 4, 7, 0.5) == pytest.approx(jvp[0, 1, 4, 7]) and maps.value(None, 4, 7, 0.0) == reuse[4, 7]
    assert np.isnan(maps.value(0, 4, 7, 1.0))  # 4 steps back: beyond the look-back of 3


def test_error_map_of_an_affine_velocity_is_zero_for_the_full_jvp_only() -> None:
    sigmas = torch.linspace(1, 0, 9, dtype=torch.float64)
    xs, vs = affine_trajectory(sigmas, torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64))
    maps = trajectory_errors(xs, vs, sigmas, max_back=2, lambdas=(0.5, 1.0))
    assert maps.reuse.shape == (9, 9) and maps.jvp.shape == (2, 2, 9, 9)
    assert np.isnan(maps.jvp[0, 0, 0, 5]) and np.isnan(maps.reuse[4, 4]) and np.isnan(maps.jvp[1, 1, 1, 3])
    assert np.nanmax(maps.jvp[1]) < 1e-10
    assert np.nanmin(maps.jvp[0][:, :, 2:]) > 0 and maps.reuse[0, 8] > 0.1


def test_euler_trajectory_reproduces_the_sampler() -> None:
    sigmas = torch.linspace(1, 0, 6, dtype=torch.float64)
    x0, vs = torch.randn(2, 3, dtype=torch.float64), torch.randn(5, 2, 3, dtype=torch.float64)
    xs = euler_trajectory(x0, vs, sigmas)
    x = x0
    for i in range(5):
        x = x + (sigmas[i + 1] - sigmas[i]) * vs[i]
    torch.testing.assert_close(xs[-1], x)
    assert xs.shape == (6, 2, 3)


def test_stability_maps_are_the_mean_over_trajectories_and_merge_exactly() -> None:
    sigmas = np.linspace(1, 0, 7)
    runs = [(torch.randn(4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)) for _ in range(3)]
    whole, left, right = (StabilityMaps(sigmas, 2, (0.5, 1.0), None) for _ in range(3))
    for i, (x0, vs) in enumerate(runs):
        whole.add(x0, vs)
        (left if i < 2 else right).add(x0, vs)
    left.merge(right)
    np.testing.assert_allclose(left.errors().jvp, whole.errors().jvp, equal_nan=True)
    assert whole.count == 3 and whole.elements == 4 and whole.latent_elements == 4
    each = [naive_maps(euler_trajectory(x0, vs, torch.tensor(sigmas)), vs, torch.tensor(sigmas), 2, (0.5, 1.0))
            for x0, vs in runs]
    np.testing.assert_allclose(whole.errors().reuse, np.mean([r for r, _ in each], axis=0), rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(whole.errors().jvp, np.mean([j for _, j in each], axis=0), rtol=1e-12, equal_nan=True)
    # The exponential map and the per-step statistics are means over the runs too, written out here by hand.
    grid = torch.tensor(sigmas)
    trajectories = [euler_trajectory(x0, vs, grid) for x0, vs in runs]
    exp = np.mean([naive_exponential_map(xs, vs, grid, 2) for xs, (_, vs) in zip(trajectories, runs)], axis=0)
    np.testing.assert_allclose(whole.errors().exp, exp, rtol=1e-9, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(left.errors().exp, exp, rtol=1e-9, atol=1e-12, equal_nan=True)

    def change(series: list[torch.Tensor]) -> list[float]:
        return [float((b - a).abs().mean() / a.abs().mean()) for a, b in zip(series, series[1:])]

    stats = whole.step_statistics()
    ends = [[(xs[i] - xs[-1]) / (sigmas[i] - sigmas[-1]) for i in range(6)] for xs in trajectories]
    np.testing.assert_allclose(stats["velocity_norm"], np.mean([[float(v.abs().mean()) for v in vs] for _, vs in runs],
                                                               axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats["velocity_change"][1:], np.mean([change(list(vs)) for _, vs in runs], axis=0),
                               rtol=1e-9)
    np.testing.assert_allclose(stats["mean_velocity_change"][1:], np.mean([change(u) for u in ends], axis=0),
                               rtol=1e-9)
    assert np.isnan(stats["velocity_change"][0]) and np.isnan(stats["mean_velocity_change"][0])


def test_one_trajectory_is_its_own_mean_and_keeps_the_dampings() -> None:
    """A calibration of a single run (one prompt, one seed) has error maps: that run's, with its dampings."""
    sigmas = np.linspace(1, 0, 5)
    x0, vs = torch.randn(3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    maps = StabilityMaps(sigmas, 2, (0.25, 1.0), None)
    maps.add(x0, vs)
    errors = maps.errors()
    reuse, jvp = naive_maps(euler_trajectory(x0, vs, torch.tensor(sigmas)), vs, torch.tensor(sigmas), 2, (0.25, 1.0))
    np.testing.assert_allclose(errors.reuse, reuse, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(errors.jvp, jvp, rtol=1e-12, equal_nan=True)
    assert errors.lambdas == (0.25, 1.0)


def test_sums_round_trip_and_a_subset_of_elements_is_fixed() -> None:
    sigmas = np.linspace(1, 0, 5)
    maps = StabilityMaps(sigmas, 4, (1.0,), max_elements=3)
    maps.add(torch.randn(10), torch.randn(4, 10))
    maps.add(torch.randn(10), torch.randn(4, 10))
    assert maps.elements == 3 and maps.latent_elements == 10
    again = StabilityMaps.from_sums(sigmas, maps.sums(), (1.0,), 3)
    np.testing.assert_array_equal(again.errors().jvp, maps.errors().jvp)
    assert again.count == 2 and again.latent_elements == 10
    assert torch.equal(element_subset(10, 3), element_subset(10, 3)) and element_subset(10, 10) is None
    assert again.max_elements == 3
    # The capped maps are the maps of those elements alone.
    subset = element_subset(10, 3)
    x0, vs = torch.randn(10), torch.randn(4, 10)
    capped, alone = StabilityMaps(sigmas, 4, (1.0,), max_elements=3), StabilityMaps(sigmas, 4, (1.0,), None)
    capped.add(x0, vs)
    alone.add(x0[subset], vs[:, subset])
    np.testing.assert_array_equal(capped.errors().jvp, alone.errors().jvp)
    assert maps.max_back == 4 and StabilityMaps(sigmas, 9).max_back == 4  # look-back capped at N


@pytest.mark.parametrize(("sigma_p", "sigma_t", "sigma_s"), [(0.9, 0.6, 0.3), (0.55, 0.5, 0.05), (0.3, 0.2, 0.19)])
def test_exponential_edge_is_the_mean_velocity_of_a_dpm_solver_2m_step(sigma_p, sigma_t, sigma_s) -> None:
    """û(t→s) carries x_t to DPM-Solver++(2M)'s x_s, written out from DESIGN.md §4 in tests/oracle.py."""
    x_t, v_t, x_p, v_p = torch.randn(4, 7, dtype=torch.float64)
    u = exponential_velocity(x_t, v_t, sigma_t, sigma_s, x_p, v_p, sigma_p)
    x_s = dpm_solver_2m(x_t, x_t - sigma_t * v_t, x_p - sigma_p * v_p, sigma_p, sigma_t, sigma_s)
    torch.testing.assert_close(x_t + (sigma_s - sigma_t) * u, x_s, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(u, v_t)


def test_exponential_edge_falls_back_to_euler_where_dpm_solver_is_first_order() -> None:
    """From σ_p = 1 (r = ∞) and to σ_s = 0 (h = ∞) DPM-Solver++ takes a first-order step: the Euler step with
    v_t, returned as v_t itself; a first-order DPM-Solver++ step is exactly Euler."""
    x_t, v_t, x_p, v_p = torch.randn(4, 5, dtype=torch.float64)
    assert exponential_velocity(x_t, v_t, 0.7, 0.4, x_p, v_p, 1.0) is v_t
    assert exponential_velocity(x_t, v_t, 0.2, 0.0, x_p, v_p, 0.5) is v_t
    euler = dpm_solver_2m(x_t, x_t - 0.7 * v_t, x_p, 1.0, 0.7, 0.4)
    torch.testing.assert_close(euler, x_t + (0.4 - 0.7) * v_t, rtol=1e-12, atol=1e-12)


def naive_exponential_map(xs: torch.Tensor, vs: torch.Tensor, sigmas: torch.Tensor, max_back: int) -> np.ndarray:
    """E_exp(p, t, s) = mean |u(t→s) − (x_s^DPM − x_t)/(σ_s − σ_t)|, one entry at a time, from the oracle."""
    n = len(vs)
    exp = np.full((1, max_back, n + 1, n + 1), np.nan)
    sig = [float(s) for s in sigmas]
    for t in range(1, n):
        for p in range(max(0, t - max_back), t):
            for s in range(t + 1, n + 1):
                u = (xs[s] - xs[t]) / (sig[s] - sig[t])
                x_s = dpm_solver_2m(xs[t], xs[t] - sig[t] * vs[t], xs[p] - sig[p] * vs[p], sig[p], sig[t], sig[s])
                exp[0, t - p - 1, t, s] = float((u - (x_s - xs[t]) / (sig[s] - sig[t])).abs().mean())
    return exp


def test_exponential_error_map_matches_its_definition_and_the_planner_can_read_it() -> None:
    torch.manual_seed(1)
    sigmas = torch.linspace(1, 0, 9, dtype=torch.float64) ** 1.4
    vs = torch.randn(8, 5, dtype=torch.float64).cumsum(0)
    xs = euler_trajectory(torch.randn(5, dtype=torch.float64), vs, sigmas)
    maps = trajectory_errors(xs, vs, sigmas, max_back=3, lambdas=(1.0,))
    expected = naive_exponential_map(xs, vs, sigmas, 3)
    np.testing.assert_allclose(maps.exp, expected, rtol=1e-9, atol=1e-12, equal_nan=True)
    assert maps.value(3, 5, 8, 1.0, "exp") == pytest.approx(expected[0, 1, 5, 8])
    assert math.isnan(maps.value(1, 5, 8, 1.0, "exp"))  # 4 steps back: beyond the look-back
    without = maps.select((1.0,), exponential=False)
    assert np.isnan(without.exp).all() and np.array_equal(without.jvp, maps.jvp, equal_nan=True)
    assert np.array_equal(maps.select((1.0,)).exp, maps.exp, equal_nan=True)  # kept unless left out
    assert maps.value(3, 5, 8, 0.0, "exp") == maps.value(3, 5, 8, 1.0, "exp")  # no damping on this edge kind
    assert maps.value(3, 5, 8, 0.0) == maps.reuse[5, 8] and maps.value(3, 5, 8, 1.0) == maps.jvp[0, 1, 5, 8]
    assert EdgeErrors(maps.reuse, maps.jvp, (1.0,)).exp.shape == (1, *maps.jvp.shape[1:])  # none: all NaN


def test_edge_costs_displacement_scales_by_interval_and_zeroes_euler_steps() -> None:
    sigmas = np.array([1.0, 0.6, 0.2, 0.0])
    reuse = np.full((4, 4), np.nan)
    reuse[0, 1], reuse[0, 2], reuse[1, 2], reuse[1, 3] = 2.0, 3.0, 4.0, 6.0
    jvp, exp = np.full((1, 1, 4, 4), np.nan), np.full((1, 1, 4, 4), np.nan)
    jvp[0, 0, 1, 3], exp[0, 0, 1, 3] = 5.0, 7.0
    errors = EdgeErrors(reuse, jvp, (1.0,), exp)
    disp = edge_costs(errors, sigmas, "displacement")
    assert disp.reuse[0, 2] == pytest.approx(3.0 * 0.8) and disp.reuse[1, 3] == pytest.approx(6.0 * 0.6)
    assert disp.jvp[0, 0, 1, 3] == pytest.approx(5.0 * 0.6) and disp.exp[0, 0, 1, 3] == pytest.approx(7.0 * 0.6)
    assert disp.reuse[0, 1] == 0 and disp.reuse[1, 2] == 0
    vel = edge_costs(errors, sigmas, "velocity")
    assert vel.reuse[0, 2] == 3.0 and vel.jvp[0, 0, 1, 3] == 5.0 and vel.exp[0, 0, 1, 3] == 7.0
    assert errors.reuse[0, 1] == 2.0  # the maps themselves untouched
    with pytest.raises(ValueError, match="unknown cost kind 'nope'"):
        edge_costs(errors, sigmas, "nope")
