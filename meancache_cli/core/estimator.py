"""Average velocity over a skipped interval from a cached Jacobian-vector product (DESIGN.md §2).

Pure tensor math on torch tensors or numpy arrays alike (only +, -, * and / are used).

MeanCache's estimator reads the JVP across the fresh velocity: with `p` the K-th compute step before
`t` (a velocity the model really computed) and `v_t` just computed,

    J(t) = (v_t − ū(p→t)) / (σ_t − σ_p),   ū(p→t) = (v_p + v_t) / 2
    û(t→s) = v_t + λ · (σ_s − σ_t) · J(t)

which is exact when v is affine in σ. λ ∈ [0, 1] damps the correction (λ = 0 or K = 0: reuse v_t).
"""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def average_velocity(x_a: T, x_b: T, sigma_a: float, sigma_b: float) -> T:
    """`u(a→b)`: the straight-line velocity that carries `x_a` to `x_b`."""
    return (x_b - x_a) / (sigma_b - sigma_a)


def jvp_estimate(v_p: T, v_t: T, sigma_p: float, sigma_t: float) -> T:
    """`J(t) = (v_t − (v_p + v_t)/2) / (σ_t − σ_p)`: MeanFlow's `du/dσ` at the end of the previous
    interval, whose average velocity comes from its two computed ends."""
    return (v_t - v_p) / (2.0 * (sigma_t - sigma_p))


def mean_velocity(v_t: T, sigma_t: float, sigma_s: float, v_p: T | None = None, sigma_p: float | None = None,
                  damping: float = 1.0) -> T:
    """`û(t→s) = v_t + λ·(σ_s − σ_t)·J(t)`; without a reference velocity (K = 0) or with λ = 0 it is `v_t`.

    Returning `v_t` itself there keeps a schedule with B = N bit-identical to the uncached run.
    """
    if v_p is None or damping == 0:
        return v_t
    return v_t + (damping * (sigma_s - sigma_t)) * jvp_estimate(v_p, v_t, sigma_p, sigma_t)


def release_velocity(v_prev: T, x_r: T, v_r: T, x_m: T, sigma_r: float, sigma_m: float, sigma_next: float) -> T:
    """The estimator as the authors' public release applies it, at a skipped step `m`.

    `û_m = v_{m−1} + (σ_{m+1} − σ_m)·J_m` with `J_m = (u(r→m) − v_r) / (σ_m − σ_r)` read from a window
    `[r, m]` of logged steps that slides with m (and so contains earlier estimates). Window 1 gives
    J = 0, plain reuse: one Euler step's average velocity is the velocity it used.
    """
    jvp = (average_velocity(x_r, x_m, sigma_r, sigma_m) - v_r) / (sigma_m - sigma_r)
    return v_prev + (sigma_next - sigma_m) * jvp
