"""Stability maps from reference trajectories (DESIGN.md §3).

`E_K(t, s)` is how far the estimated average velocity `û_K(t→s)` lands from the true one `u(t→s)`
on an uncached trajectory; the planner turns it into edge costs. Maps are averaged over every
trajectory added, so a trajectory can be dropped as soon as it has been added.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .estimator import average_velocity, mean_velocity

COST_KINDS = ("displacement", "velocity")


def euler_trajectory(x0: torch.Tensor, velocities: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Latents `x_0 … x_N` that Euler steps with `velocities` produce from `x0`.

    With guidance each branch gets its own trajectory: the guidance weights sum to one, so the
    combined error is the weighted sum of the branches' errors against their own trajectories.
    """
    steps = (sigmas[1:] - sigmas[:-1]).reshape(-1, *([1] * (velocities.dim() - 1)))
    increments = torch.cumsum(steps * velocities, dim=0)
    return torch.cat([x0[None], x0[None] + increments], dim=0)


def trajectory_errors(xs: torch.Tensor, vs: torch.Tensor, sigmas: torch.Tensor, kmax: int) -> np.ndarray:
    """`E_K(t, s) = mean |u(t→s) − û_K(t→s)|` for one trajectory, NaN where the edge is undefined.

    `xs` holds `x_0 … x_N` (N+1 entries), `vs` the velocities `v_0 … v_{N-1}`, `sigmas` N+1 values.
    """
    n = vs.shape[0]
    xs = xs.reshape(n + 1, -1).double()
    vs = vs.reshape(n, -1).double()
    sig = sigmas.double()
    errors = np.full((kmax + 1, n + 1, n + 1), np.nan)
    for t in range(n):
        ends = torch.arange(t + 1, n + 1)
        sigma_s = sig[ends][:, None]
        u = average_velocity(xs[t][None], xs[ends], sig[t], sigma_s)
        for k in range(min(kmax, t) + 1):
            r = t - k
            if k == 0:
                u_hat = vs[t][None]
            else:
                u_hat = mean_velocity(vs[t][None], sig[t], sigma_s, xs[t], xs[r], vs[r], sig[r])
            errors[k, t, t + 1:] = (u - u_hat).abs().mean(dim=1).numpy()
    return errors


def velocity_changes(xs: torch.Tensor, vs: torch.Tensor, sigmas: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Relative step-to-step change of the instantaneous velocity `v_i` and of the average velocity
    to the end `u(i→N)`: the observation that motivates caching the average rather than `v`."""
    n = vs.shape[0]
    v = vs.reshape(n, -1).double()
    x = xs.reshape(n + 1, -1).double()
    sig = sigmas.double()
    u = torch.stack([average_velocity(x[i], x[n], sig[i], sig[n]) for i in range(n)])
    inst = np.full(n, np.nan)
    avg = np.full(n, np.nan)
    inst[1:] = ((v[1:] - v[:-1]).abs().mean(1) / v[:-1].abs().mean(1).clamp_min(1e-12)).numpy()
    avg[1:] = ((u[1:] - u[:-1]).abs().mean(1) / u[:-1].abs().mean(1).clamp_min(1e-12)).numpy()
    return inst, avg


@dataclass
class StabilityMaps:
    """Running sums of the error map and per-step statistics over reference trajectories."""

    sigmas: np.ndarray
    kmax: int
    error_sum: np.ndarray = field(init=False)
    velocity_norm_sum: np.ndarray = field(init=False)
    velocity_change_sum: np.ndarray = field(init=False)
    mean_velocity_change_sum: np.ndarray = field(init=False)
    count: int = 0

    def __post_init__(self) -> None:
        n = len(self.sigmas) - 1
        self.error_sum = np.zeros((self.kmax + 1, n + 1, n + 1))
        self.velocity_norm_sum = np.zeros(n)
        self.velocity_change_sum = np.zeros(n)
        self.mean_velocity_change_sum = np.zeros(n)

    def add(self, x0: torch.Tensor, velocities: torch.Tensor) -> None:
        """Add one trajectory (one branch of one run): its start latents and its N velocities."""
        sigmas = torch.as_tensor(self.sigmas, dtype=torch.float64)
        vs = velocities.double()
        xs = euler_trajectory(x0.double(), vs, sigmas)
        self.error_sum += trajectory_errors(xs, vs, sigmas, self.kmax)
        inst, avg = velocity_changes(xs, vs, sigmas)
        self.velocity_norm_sum += vs.reshape(len(vs), -1).abs().mean(1).numpy()
        self.velocity_change_sum += inst
        self.mean_velocity_change_sum += avg
        self.count += 1

    def merge(self, other: StabilityMaps) -> None:
        """Fold in sums gathered elsewhere (another process, another shard)."""
        self.error_sum += other.error_sum
        self.velocity_norm_sum += other.velocity_norm_sum
        self.velocity_change_sum += other.velocity_change_sum
        self.mean_velocity_change_sum += other.mean_velocity_change_sum
        self.count += other.count

    def sums(self) -> dict[str, np.ndarray]:
        """The running sums as arrays, to persist a partial calibration (a shard)."""
        return {"error_sum": self.error_sum, "velocity_norm_sum": self.velocity_norm_sum,
                "velocity_change_sum": self.velocity_change_sum,
                "mean_velocity_change_sum": self.mean_velocity_change_sum, "count": np.array([self.count])}

    @classmethod
    def from_sums(cls, sigmas: np.ndarray, sums: dict[str, np.ndarray]) -> StabilityMaps:
        maps = cls(sigmas, sums["error_sum"].shape[0] - 1)
        for name, value in sums.items():
            setattr(maps, name, int(value[0]) if name == "count" else value.copy())
        return maps

    def errors(self) -> np.ndarray:
        """Mean `E_K(t, s)`, shape (Kmax+1, N+1, N+1), NaN where undefined."""
        if self.count == 0:
            raise ValueError("no trajectory was added to the stability maps")
        return self.error_sum / self.count

    def step_statistics(self) -> dict[str, np.ndarray]:
        """Mean per-step velocity statistics, for reports and plots."""
        return {
            "velocity_norm": self.velocity_norm_sum / self.count,
            "velocity_change": self.velocity_change_sum / self.count,
            "mean_velocity_change": self.mean_velocity_change_sum / self.count,
        }


def edge_costs(errors: np.ndarray, sigmas: np.ndarray, kind: str) -> np.ndarray:
    """Edge weights for the planner: `E_K` itself (velocity) or `|σ_s − σ_t|·E_K` (displacement).

    The one-step edge `t→t+1` with K = 0 is an exact Euler step and weighs 0.
    """
    if kind not in COST_KINDS:
        raise ValueError(f"unknown cost kind {kind!r}: use one of {', '.join(COST_KINDS)}")
    costs = errors.copy()
    if kind == "displacement":
        costs = costs * np.abs(sigmas[None, None, :] - sigmas[None, :, None])
    n = len(sigmas) - 1
    costs[0, np.arange(n), np.arange(1, n + 1)] = 0.0
    return costs
