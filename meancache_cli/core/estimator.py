"""Average velocity over a skipped interval from a cached Jacobian-vector product (DESIGN.md §2).

Pure tensor math on torch tensors or numpy arrays alike (only +, -, * and / are used).

MeanCache's estimator reads the JVP across the fresh velocity: with `p` the K-th compute step before
`t` (a velocity the model really computed) and `v_t` just computed,

    J(t) = (v_t − ū(p→t)) / (σ_t − σ_p),   ū(p→t) = (v_p + v_t) / 2
    û(t→s) = v_t + λ · (σ_s − σ_t) · J(t)

which is exact when v is affine in σ. λ ∈ [0, 1] damps the correction (λ = 0 or K = 0: reuse v_t).

The exponential-integrator edge reads the same two computed steps the way DPM-Solver++(2M) does: data
predictions `x̂₀ = x − σ·v` at p and t, extrapolated linearly in `λ(σ) = log((1 − σ)/σ)` and integrated
exactly, handed out as the mean velocity of the jump it makes (see `exponential_velocity`).
"""

from __future__ import annotations

import math
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


def log_snr(sigma: float) -> float:
    """`λ(σ) = log((1 − σ)/σ)`, the half log signal-to-noise ratio of `x = (1 − σ)·x₀ + σ·ε`."""
    return math.log((1.0 - sigma) / sigma)


def exponential_coefficient(sigma_p: float, sigma_t: float, sigma_s: float) -> float:
    """`c` in `û(t→s) = v_t + c·(x̂₀_t − x̂₀_p)`: DPM-Solver++(2M)'s second-order term as a mean velocity.

    With `h = λ_s − λ_t` and `r = (λ_t − λ_p)/h` the step is `x_s = (σ_s/σ_t)·x_t − (1 − σ_s)(e^(−h) − 1)·D`,
    `D = x̂₀_t + (x̂₀_t − x̂₀_p)/(2r)`; its first-order part is exactly the Euler step with `v_t`, so
    `c = (1 − σ_s)(1 − e^(−h)) / (2r·(σ_s − σ_t))`. It is 0 where the method falls back to first order:
    `σ_p = 1` (r = ∞) and `σ_s = 0` (h = ∞, the final step, as DPM-Solver++ takes it with `lower_order_final`).
    """
    if sigma_p >= 1.0 or sigma_s <= 0.0:
        return 0.0
    h = log_snr(sigma_s) - log_snr(sigma_t)
    r = (log_snr(sigma_t) - log_snr(sigma_p)) / h
    return (1.0 - sigma_s) * -math.expm1(-h) / (2.0 * r * (sigma_s - sigma_t))


def exponential_velocity(x_t: T, v_t: T, sigma_t: float, sigma_s: float, x_p: T, v_p: T, sigma_p: float) -> T:
    """`û(t→s)` of the exponential-integrator edge: `(x_s − x_t)/(σ_s − σ_t)` for DPM-Solver++(2M)'s `x_s`,
    from the data predictions at t and at the previous compute step p (it needs their latents)."""
    c = exponential_coefficient(sigma_p, sigma_t, sigma_s)
    if c == 0.0:
        return v_t
    return v_t + c * ((x_t - sigma_t * v_t) - (x_p - sigma_p * v_p))


def release_velocity(v_prev: T, x_r: T, v_r: T, x_m: T, sigma_r: float, sigma_m: float, sigma_next: float) -> T:
    """The estimator as the authors' public release applies it, at a skipped step `m`.

    `û_m = v_{m−1} + (σ_{m+1} − σ_m)·J_m` with `J_m = (u(r→m) − v_r) / (σ_m − σ_r)` read from a window
    `[r, m]` of logged steps that slides with m (and so contains earlier estimates). Window 1 gives
    J = 0, plain reuse: one Euler step's average velocity is the velocity it used.
    """
    jvp = (average_velocity(x_r, x_m, sigma_r, sigma_m) - v_r) / (sigma_m - sigma_r)
    return v_prev + (sigma_next - sigma_m) * jvp
