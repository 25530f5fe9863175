"""Average velocity over a skipped interval from a cached Jacobian-vector product (DESIGN.md §2).

Pure tensor math: each function takes the sigmas, latents and velocities it needs and returns a
tensor. Works on torch tensors or numpy arrays alike (only +, -, * and / are used).
"""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def average_velocity(x_a: T, x_b: T, sigma_a: float, sigma_b: float) -> T:
    """`u(a→b)`: the straight-line velocity that carries `x_a` to `x_b`."""
    return (x_b - x_a) / (sigma_b - sigma_a)


def jvp_estimate(x_r: T, v_r: T, x_t: T, sigma_r: float, sigma_t: float) -> T:
    """`J_K(t)`: how the average velocity changes with its end point, read from history.

    `u(r→t) - v_r` is the drift of the average velocity away from the instantaneous one over
    `[r, t]`; dividing by the interval gives a finite-difference Jacobian-vector product.
    """
    return (average_velocity(x_r, x_t, sigma_r, sigma_t) - v_r) / (sigma_t - sigma_r)


def mean_velocity(
    v_t: T, sigma_t: float, sigma_s: float, x_t: T | None = None, x_r: T | None = None,
    v_r: T | None = None, sigma_r: float | None = None,
) -> T:
    """`û_K(t→s) = v_t + (σ_s − σ_t)·J_K(t)`; with no reference step (K = 0) it is `v_t` itself.

    Returning `v_t` unchanged for K = 0 keeps a schedule with B = N bit-identical to the uncached run.
    """
    if x_r is None:
        return v_t
    return v_t + (sigma_s - sigma_t) * jvp_estimate(x_r, v_r, x_t, sigma_r, sigma_t)
