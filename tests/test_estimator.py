import numpy as np
import pytest
import torch

from meancache_cli.core.estimator import average_velocity, jvp_estimate, mean_velocity
from meancache_cli.core.stability import StabilityMaps, edge_costs, euler_trajectory, trajectory_errors


def affine_trajectory(sigmas: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact solution of dx/dσ = a + b·σ sampled at `sigmas`, and the velocities there."""
    xs = torch.stack([a * s + 0.5 * b * s**2 for s in sigmas])
    vs = torch.stack([a + b * s for s in sigmas[:-1]])
    return xs, vs


@pytest.mark.parametrize("k", [1, 2, 3])
def test_estimate_is_exact_for_affine_velocity(k: int) -> None:
    sigmas = torch.linspace(1, 0, 11, dtype=torch.float64) ** 1.7
    a, b = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    xs, vs = affine_trajectory(sigmas, a, b)
    for t in range(k, 10):
        for s in range(t + 1, 11):
            u = average_velocity(xs[t], xs[s], sigmas[t], sigmas[s])
            r = t - k
            u_hat = mean_velocity(vs[t], sigmas[t], sigmas[s], xs[t], xs[r], vs[r], sigmas[r])
            torch.testing.assert_close(u_hat, u, rtol=1e-10, atol=1e-10)


def test_plain_reuse_is_wrong_for_affine_velocity() -> None:
    sigmas = torch.linspace(1, 0, 11, dtype=torch.float64)
    xs, vs = affine_trajectory(sigmas, torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64))
    u = average_velocity(xs[2], xs[6], sigmas[2], sigmas[6])
    v_t = vs[2]
    assert (mean_velocity(v_t, sigmas[2], sigmas[6]) - u).abs().max() > 0.1
    assert mean_velocity(v_t, sigmas[2], sigmas[6]) is v_t


def test_jvp_estimate_is_the_slope_of_the_average_velocity() -> None:
    sigmas = torch.tensor([1.0, 0.5], dtype=torch.float64)
    xs, vs = affine_trajectory(torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64), torch.zeros(1), torch.ones(1))
    # v = σ, so u(r→t) = (σ_r + σ_t)/2 and J = 1/2 exactly.
    assert jvp_estimate(xs[0], vs[0], xs[1], sigmas[0], sigmas[1]).item() == pytest.approx(0.5)


def test_error_map_is_zero_for_affine_velocity_and_nan_where_undefined() -> None:
    sigmas = torch.linspace(1, 0, 9, dtype=torch.float64)
    xs, vs = affine_trajectory(sigmas, torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64))
    errors = trajectory_errors(xs, vs, sigmas, kmax=2)
    assert errors.shape == (3, 9, 9)
    assert np.isnan(errors[1, 0, 5]) and np.isnan(errors[0, 4, 4]) and np.isnan(errors[2, 1, 3])
    assert np.nanmax(errors[1:]) < 1e-10
    assert errors[0, 0, 8] > 0.1


def test_euler_trajectory_reproduces_the_sampler() -> None:
    sigmas = torch.linspace(1, 0, 6, dtype=torch.float64)
    x0, vs = torch.randn(2, 3, dtype=torch.float64), torch.randn(5, 2, 3, dtype=torch.float64)
    xs = euler_trajectory(x0, vs, sigmas)
    x = x0
    for i in range(5):
        x = x + (sigmas[i + 1] - sigmas[i]) * vs[i]
    torch.testing.assert_close(xs[-1], x)
    assert xs.shape == (6, 2, 3)


def test_stability_maps_average_and_merge() -> None:
    sigmas = np.linspace(1, 0, 7)
    runs = [(torch.randn(4), torch.randn(6, 4)) for _ in range(4)]
    whole, left, right = StabilityMaps(sigmas, 2), StabilityMaps(sigmas, 2), StabilityMaps(sigmas, 2)
    for i, (x0, vs) in enumerate(runs):
        whole.add(x0, vs)
        (left if i < 2 else right).add(x0, vs)
    left.merge(right)
    np.testing.assert_allclose(left.errors(), whole.errors(), equal_nan=True)
    assert whole.count == 4
    single = StabilityMaps(sigmas, 2)
    single.add(*runs[0])
    assert not np.allclose(single.errors(), whole.errors(), equal_nan=True)


def test_edge_costs_displacement_scales_by_interval_and_zeroes_euler_steps() -> None:
    sigmas = np.array([1.0, 0.6, 0.0])
    errors = np.full((2, 3, 3), np.nan)
    errors[0, 0, 1], errors[0, 0, 2], errors[0, 1, 2], errors[1, 1, 2] = 2.0, 3.0, 4.0, 5.0
    disp = edge_costs(errors, sigmas, "displacement")
    assert disp[0, 0, 2] == pytest.approx(3.0) and disp[1, 1, 2] == pytest.approx(3.0)
    assert disp[0, 0, 1] == 0 and disp[0, 1, 2] == 0
    vel = edge_costs(errors, sigmas, "velocity")
    assert vel[0, 0, 2] == 3.0 and vel[1, 1, 2] == 5.0
    with pytest.raises(ValueError, match="unknown cost kind 'nope'"):
        edge_costs(errors, sigmas, "nope")
