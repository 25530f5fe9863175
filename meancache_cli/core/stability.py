"""Stability maps from reference trajectories (DESIGN.md §3).

The estimate of an edge `t→s` depends on the compute step `p` before it, so its error is a function
of (p, t, s): `E(p, t, s) = mean |u(t→s) − û(t→s; p)|` on uncached trajectories, for `p` within a
look-back of `max_back` steps, for each damping λ of the JVP estimate and for the exponential-integrator
edge. Plain reuse (K = 0) does not depend on `p`. Maps are running sums over every trajectory added, so a
trajectory can be dropped once added.

Shapes of the `EdgeErrors` maps, N steps: `reuse` is (N+1, N+1) indexed [t, s]; `jvp` is
(len(λ), max_back, N+1, N+1) indexed [λ, t − p − 1, t, s]; `exp` is (1, max_back, N+1, N+1) indexed
[0, t − p − 1, t, s]; NaN where the edge is undefined. Work per trajectory ≈ N²·max_back·(len(λ) + 1)·D/2
for D latent elements (a fixed random subset of at most `max_elements`), memory
(1 + (len(λ) + 1)·max_back)·N² doubles.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .. import defaults
from .estimator import average_velocity, exponential_coefficient, jvp_estimate

COST_KINDS = ("displacement", "velocity")
EDGE_KINDS = ("reuse", "jvp", "exp")  # the estimate an edge uses: v_t, the damped JVP, the exponential integrator
SUBSET_SEED = 0


@dataclass
class EdgeErrors:
    """The error of every edge option, one map per edge kind (`EDGE_KINDS`, each field named after the estimate
    whose error it holds, not the estimate itself): reuse `[t, s]`, the JVP estimate `[λ, t − p − 1, t, s]` and
    the exponential-integrator edge `[0, t − p − 1, t, s]`. As `E` (velocity error) or, from `edge_costs`, as
    the planner's edge costs."""

    reuse: np.ndarray
    jvp: np.ndarray
    lambdas: tuple[float, ...]
    exp: np.ndarray | None = None  # None: no exponential edge (every entry NaN)

    def __post_init__(self) -> None:
        if self.exp is None:
            self.exp = np.full((1, *self.jvp.shape[1:]), np.nan)

    @property
    def num_steps(self) -> int:
        return self.reuse.shape[0] - 1

    @property
    def max_back(self) -> int:
        return self.jvp.shape[1]

    def value(self, p: int | None, t: int, s: int, damping: float, kind: str = "jvp") -> float:
        """The entry of edge `t→s` estimated with reference `p`: the JVP with damping λ, or the exponential
        integrator (`kind="exp"`); reuse when p is None, or λ = 0 for the JVP."""
        if p is None or kind == "reuse" or (kind == "jvp" and damping == 0):
            return float(self.reuse[t, s])
        if not 1 <= t - p <= self.max_back:
            return float("nan")
        if kind == "exp":
            return float(self.exp[0, t - p - 1, t, s])
        return float(self.jvp[self.lambdas.index(damping), t - p - 1, t, s])

    def select(self, lambdas: tuple[float, ...], exponential: bool = True) -> EdgeErrors:
        """The same maps restricted to some of the calibrated dampings, with or without the exponential edge
        (without: its entries are NaN, so the planner never picks it)."""
        index = [self.lambdas.index(value) for value in lambdas]
        exp = self.exp if exponential else np.full_like(self.exp, np.nan)
        return EdgeErrors(self.reuse, self.jvp[index], tuple(lambdas), exp)


def defined_mask(n: int, max_back: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Where `reuse` and the history-dependent maps (`count` options) of an N-step map are defined: t < s, and
    for the latter also p = t − b − 1 ≥ 0."""
    t, s = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    reuse = t < s
    back = np.arange(1, max_back + 1)[:, None, None]
    jvp = reuse[None] & (t[None] - back >= 0)
    return reuse, np.broadcast_to(jvp, (count, max_back, n + 1, n + 1))


def euler_trajectory(x0: torch.Tensor, velocities: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Latents `x_0 … x_N` that Euler steps with `velocities` produce from `x0`.

    With guidance each branch gets its own trajectory: the dσ-weighted average of that branch's
    velocity over an interval is what its estimate must predict.
    """
    steps = (sigmas[1:] - sigmas[:-1]).reshape(-1, *([1] * (velocities.dim() - 1)))
    increments = torch.cumsum(steps * velocities, dim=0)
    return torch.cat([x0[None], x0[None] + increments], dim=0)


def element_subset(total: int, max_elements: int | None) -> torch.Tensor | None:
    """A fixed random subset of latent elements (same for every trajectory and process), or None for all.

    The mean of |·| over a uniform random subset is an unbiased estimate of the mean over all elements.
    """
    if max_elements is None or total <= max_elements:
        return None
    generator = torch.Generator().manual_seed(SUBSET_SEED)
    return torch.randperm(total, generator=generator)[:max_elements].sort().values


def trajectory_errors(xs: torch.Tensor, vs: torch.Tensor, sigmas: torch.Tensor, max_back: int,
                      lambdas: tuple[float, ...]) -> EdgeErrors:
    """Error maps of one trajectory: `xs` holds `x_0 … x_N`, `vs` the velocities `v_0 … v_{N−1}`."""
    n = vs.shape[0]
    xs = xs.reshape(n + 1, -1).double()
    vs = vs.reshape(n, -1).double()
    sig = sigmas.double()
    data = xs[:n] - sig[:n, None] * vs  # the data prediction x̂₀ at every step
    reuse = np.full((n + 1, n + 1), np.nan)
    jvp = np.full((len(lambdas), max_back, n + 1, n + 1), np.nan)
    exp = np.full((1, max_back, n + 1, n + 1), np.nan)
    for t in range(n):
        ends = torch.arange(t + 1, n + 1)
        spans = (sig[ends] - sig[t])[:, None]
        residual = average_velocity(xs[t][None], xs[ends], sig[t], sig[ends][:, None]) - vs[t][None]
        reuse[t, t + 1:] = residual.abs().mean(dim=1).numpy()
        for back in range(1, min(max_back, t) + 1):
            p = t - back
            correction = spans * jvp_estimate(vs[p], vs[t], sig[p], sig[t])[None]
            for index, damping in enumerate(lambdas):
                jvp[index, back - 1, t, t + 1:] = (residual - damping * correction).abs().mean(dim=1).numpy()
            coefficients = torch.tensor([exponential_coefficient(float(sig[p]), float(sig[t]), float(sig[s]))
                                         for s in ends.tolist()], dtype=torch.float64)[:, None]
            exponential = residual - coefficients * (data[t] - data[p])[None]
            exp[0, back - 1, t, t + 1:] = exponential.abs().mean(dim=1).numpy()
    return EdgeErrors(reuse, jvp, tuple(lambdas), exp)


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


SUM_NAMES = ("reuse_sum", "jvp_sum", "exp_sum", "velocity_norm_sum", "velocity_change_sum", "mean_velocity_change_sum",
             "latent_elements_sum")


@dataclass
class StabilityMaps:
    """Running sums of the error maps and per-step statistics over reference trajectories.

    Every field that grows with the trajectories is a plain sum, so sums from other processes or
    shards add up to the sums of one run over all of them.
    """

    sigmas: np.ndarray
    max_back: int
    lambdas: tuple[float, ...] = defaults.LAMBDAS
    max_elements: int | None = defaults.MAX_ELEMENTS
    reuse_sum: np.ndarray = field(init=False)
    jvp_sum: np.ndarray = field(init=False)
    exp_sum: np.ndarray = field(init=False)
    velocity_norm_sum: np.ndarray = field(init=False)
    velocity_change_sum: np.ndarray = field(init=False)
    mean_velocity_change_sum: np.ndarray = field(init=False)
    latent_elements_sum: np.ndarray = field(init=False)
    count: int = 0

    def __post_init__(self) -> None:
        n = len(self.sigmas) - 1
        self.max_back = min(self.max_back, n)
        self.lambdas = tuple(float(value) for value in self.lambdas)
        self.reuse_sum = np.zeros((n + 1, n + 1))
        self.jvp_sum = np.zeros((len(self.lambdas), self.max_back, n + 1, n + 1))
        self.exp_sum = np.zeros((1, self.max_back, n + 1, n + 1))
        self.velocity_norm_sum = np.zeros(n)
        self.velocity_change_sum = np.zeros(n)
        self.mean_velocity_change_sum = np.zeros(n)
        self.latent_elements_sum = np.zeros(1)

    @property
    def latent_elements(self) -> int:
        """Elements of one latent (all branches and runs alike)."""
        return round(float(self.latent_elements_sum[0]) / self.count) if self.count else 0

    @property
    def elements(self) -> int:
        """Latent elements the maps are measured on (all of them, or the fixed random subset)."""
        return min(self.latent_elements, self.max_elements or self.latent_elements)

    def add(self, x0: torch.Tensor, velocities: torch.Tensor) -> None:
        """Add one trajectory (one branch of one run): its start latents and its N velocities."""
        sigmas = torch.as_tensor(self.sigmas, dtype=torch.float64)
        subset = element_subset(x0.numel(), self.max_elements)
        self.latent_elements_sum += x0.numel()
        x0 = x0.reshape(-1).double()
        vs = velocities.reshape(len(velocities), -1).double()
        if subset is not None:
            x0, vs = x0[subset], vs[:, subset]
        xs = euler_trajectory(x0, vs, sigmas)
        maps = trajectory_errors(xs, vs, sigmas, self.max_back, self.lambdas)
        self.reuse_sum += np.nan_to_num(maps.reuse)
        self.jvp_sum += np.nan_to_num(maps.jvp)
        self.exp_sum += np.nan_to_num(maps.exp)
        inst, avg = velocity_changes(xs, vs, sigmas)
        self.velocity_norm_sum += vs.abs().mean(1).numpy()
        self.velocity_change_sum += np.nan_to_num(inst)
        self.mean_velocity_change_sum += np.nan_to_num(avg)
        self.count += 1

    def merge(self, other: StabilityMaps) -> None:
        """Fold in sums gathered elsewhere (another process, another shard)."""
        for name in SUM_NAMES:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.count += other.count

    def sums(self) -> dict[str, np.ndarray]:
        """The running sums as arrays, to persist a partial calibration (a shard) or add across processes."""
        return {**{name: getattr(self, name) for name in SUM_NAMES}, "count": np.array([self.count])}

    @classmethod
    def from_sums(cls, sigmas: np.ndarray, sums: dict[str, np.ndarray], lambdas: tuple[float, ...],
                  max_elements: int | None) -> StabilityMaps:
        maps = cls(sigmas, sums["jvp_sum"].shape[1], lambdas, max_elements)
        for name in SUM_NAMES:
            setattr(maps, name, np.array(sums[name], dtype=np.float64))
        maps.count = int(sums["count"][0])
        return maps

    def errors(self) -> EdgeErrors:
        """Mean error maps, NaN where undefined."""
        if self.count == 0:
            raise ValueError("no trajectory was added to the stability maps")
        n = len(self.sigmas) - 1
        reuse_defined, jvp_defined = defined_mask(n, self.max_back, len(self.lambdas))
        reuse = np.where(reuse_defined, self.reuse_sum / self.count, np.nan)
        jvp = np.where(jvp_defined, self.jvp_sum / self.count, np.nan)
        exp = np.where(defined_mask(n, self.max_back, 1)[1], self.exp_sum / self.count, np.nan)
        return EdgeErrors(reuse, jvp, self.lambdas, exp)

    def step_statistics(self) -> dict[str, np.ndarray]:
        """Mean per-step velocity statistics, for reports and plots."""
        stats = {
            "velocity_norm": self.velocity_norm_sum / self.count,
            "velocity_change": self.velocity_change_sum / self.count,
            "mean_velocity_change": self.mean_velocity_change_sum / self.count,
        }
        for name in ("velocity_change", "mean_velocity_change"):
            stats[name][0] = np.nan  # no step before step 0
        return stats


def edge_costs(errors: EdgeErrors, sigmas: np.ndarray, kind: str) -> EdgeErrors:
    """Edge weights for the planner: `E` itself (velocity) or `|σ_s − σ_t|·E` (displacement).

    The one-step edge `t→t+1` reusing `v_t` is an exact Euler step and weighs 0.
    """
    if kind not in COST_KINDS:
        raise ValueError(f"unknown cost kind {kind!r}: use one of {', '.join(COST_KINDS)}")
    scale = np.abs(sigmas[None, :] - sigmas[:, None]) if kind == "displacement" else 1.0
    reuse = errors.reuse * scale
    n = len(sigmas) - 1
    reuse[np.arange(n), np.arange(1, n + 1)] = 0.0
    return replace(errors, reuse=reuse, jvp=errors.jvp * scale, exp=errors.exp * scale)
