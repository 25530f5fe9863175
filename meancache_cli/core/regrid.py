"""One calibration, any step count and resolution: sigma grids, error maps and schedules moved by σ.

Three pieces of pure math, each used where a step count or a resolution differs from the one planned for:

- `ShiftedGrid`: the sigmas FlowMatchEulerDiscreteScheduler makes, recovered from one grid it made, so a
  calibration's grid at N steps yields the grid of N′ steps at the same resolution. The scheduler shifts an
  even grid τ from 1 by `σ = a·τ / (1 + (a − 1)·τ)` (a static `shift`, or `e^mu` of the dynamic, resolution-
  dependent one: both are this map), may stretch it so its last step lands on `shift_terminal`, and appends
  σ = 0. FLUX, Qwen-Image, Z-Image, Chroma and HunyuanVideo pass `τ = linspace(1, 1/N, N)` (N even steps
  down to τ = 0; Qwen-Image stretches to 0.02); SD3 and Wan let the scheduler space τ from 1 to the end of
  its 1000 training steps. These are recognised, in that order; Karras, exponential, beta or hand-made
  sigmas are not.
- `regrid_maps`: error maps whose last two axes are [t, s] (history-dependent options with a [back] axis,
  back = t − p − 1, before them) read at the steps of another grid by their σ.
- `map_steps`: a schedule's compute steps moved to the steps of another grid nearest in σ, keeping their
  number: exactly B evaluations per branch wherever the schedule runs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from typing import TypeVar

import numpy as np

REGRID_METHODS = ("linear", "nearest")
TRAIN_STEPS = 1000  # FlowMatchEulerDiscreteScheduler's num_train_timesteps: its own τ grid ends at 1/1000
GRID_TOLERANCE = 1e-5  # the scheduler computes in float32: a grid it made is reproduced to about 1e-7
M = TypeVar("M")


def shift_sigmas(tau: np.ndarray, shift: float) -> np.ndarray:
    """`σ = a·τ / (1 + (a − 1)·τ)`: the scheduler's static shift, and its exponential or linear dynamic
    shift with `a = e^mu` or `a = mu`."""
    return shift * tau / (1.0 + (shift - 1.0) * tau)


@dataclass(frozen=True)
class ShiftedGrid:
    """A flow-matching sigma grid: `shift_sigmas(τ, shift)` over τ from 1, optionally stretched so its last
    step is `terminal`, then σ = 0."""

    shift: float
    end: float | None = None  # τ of the last step when the ends are fixed; None: N even steps down to τ = 0
    terminal: float | None = None  # `shift_terminal`: σ of the last step before 0, whatever N

    def sigmas(self, steps: int) -> np.ndarray:
        """The N + 1 sigmas of this grid at `steps` steps."""
        return _grid_sigmas(np.asarray(self.shift), steps, self.end, self.terminal)


def _grid_sigmas(shift: np.ndarray, steps: int, end: float | None, terminal: float | None) -> np.ndarray:
    """`ShiftedGrid.sigmas` for an array of shifts at once (one grid per shift, along the last axis)."""
    tau = 1.0 - np.arange(steps) / steps if end is None else np.linspace(1.0, end, steps)
    sigmas = shift_sigmas(tau, np.asarray(shift)[..., None])
    if terminal is not None:
        rest = 1.0 - sigmas  # FlowMatchEulerDiscreteScheduler.stretch_shift_to_terminal
        sigmas = 1.0 - rest * (1.0 - terminal) / rest[..., -1:]
    return np.concatenate([sigmas, np.zeros(sigmas.shape[:-1] + (1,))], axis=-1)


def _best_shift(error: Callable[[np.ndarray], np.ndarray]) -> float:
    """The shift that minimizes `error` (of an array of shifts): a scan of log(shift), then golden section."""
    coarse = np.linspace(-12.0, 12.0, 481)
    best = coarse[int(np.argmin(error(np.exp(coarse))))]
    low, high = best - 0.05, best + 0.05
    golden = (np.sqrt(5.0) - 1.0) / 2.0
    for _ in range(60):
        a, b = high - golden * (high - low), low + golden * (high - low)
        error_a, error_b = error(np.exp(np.array([a, b])))
        low, high = (low, b) if error_a < error_b else (a, high)
    return float(np.exp((low + high) / 2.0))


def fit_grid(sigmas: np.ndarray) -> ShiftedGrid:
    """The grid a FlowMatchEulerDiscreteScheduler made with these N + 1 sigmas (N ≥ 3): the first of its
    conventions (module docstring) whose best shift reproduces them to `GRID_TOLERANCE`.

    One grid is also fitted exactly by a stretched grid (the family is a Möbius map of the step index), so
    the order settles it: even steps to 0, fixed ends at the scheduler's own last training step, stretched.
    Raises ValueError when none reproduces the grid.
    """
    sigmas = np.asarray(sigmas, dtype=np.float64)
    n = len(sigmas) - 1
    if n < 3:
        raise ValueError(f"a grid of {n} steps does not determine its shift: it takes 3 steps or more")
    if abs(sigmas[0] - 1.0) > GRID_TOLERANCE or sigmas[-1] != 0 or np.any(np.diff(sigmas) >= 0):
        raise ValueError("the sigmas are not a flow-matching grid: they must fall from 1 to 0")
    last = 1.0 / TRAIN_STEPS
    conventions: list[tuple[Callable[[float], float | None], float | None]] = [  # (τ end for a shift, terminal)
        (lambda shift: None, None),  # even steps to τ = 0 (FLUX, Z-Image, HunyuanVideo, the demo)
        (lambda shift: last, None),  # fixed ends, dynamic shift: the scheduler's own σ_min is 1/1000
        (lambda shift: float(shift_sigmas(np.asarray(last), shift)), None),  # fixed ends, static shift (SD3, Wan)
        (lambda shift: None, float(sigmas[-2])),  # even steps to 0, stretched to shift_terminal (Qwen-Image)
    ]
    closest = np.inf
    for end_of, terminal in conventions:
        def error(shifts: np.ndarray, end_of=end_of, terminal=terminal) -> np.ndarray:
            grids = np.stack([_grid_sigmas(a, n, end_of(a), terminal) for a in shifts])
            return np.sqrt(np.mean((grids - sigmas) ** 2, axis=-1))

        shift = _best_shift(error)
        grid = ShiftedGrid(shift, end_of(shift), terminal)
        off = float(np.max(np.abs(grid.sigmas(n) - sigmas)))
        if off <= GRID_TOLERANCE:
            return grid
        closest = min(closest, off)
    raise ValueError(f"the sigmas are not a shifted even grid as FlowMatchEulerDiscreteScheduler makes it (the "
                     f"closest one is off by {closest:.1e})")


def grid_positions(sigmas: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Where each of `sigmas` lies on `grid` (descending, N + 1 values) as a fractional step index, linear
    in σ between grid points and clipped to 0 … N."""
    grid = np.asarray(grid, dtype=np.float64)
    return np.interp(-np.asarray(sigmas, dtype=np.float64), -grid, np.arange(len(grid), dtype=np.float64))


def _corners(coords: list[np.ndarray], method: str) -> Iterator[tuple[list[np.ndarray], np.ndarray]]:
    """Grid points around fractional coordinates with their weights: the nearest one (weight 1), or the
    2^k corners of the cell with multilinear weights."""
    if method == "nearest":
        yield [np.floor(c + 0.5).astype(np.int64) for c in coords], np.ones(coords[0].shape)
        return
    lows = [np.floor(c) for c in coords]
    for pick in itertools.product((0, 1), repeat=len(coords)):
        weight = np.ones(coords[0].shape)
        for c, low, up in zip(coords, lows, pick):
            weight = weight * ((c - low) if up else (1.0 - (c - low)))
        yield [(low + up).astype(np.int64) for low, up in zip(lows, pick)], weight


def resample_map(values: np.ndarray, positions: np.ndarray, method: str = "linear") -> np.ndarray:
    """One map read at new steps: `positions[i]` is new step i as a fractional old step (`grid_positions`).

    The last two axes are [t, s]. An array with more than two axes is history-dependent: its third-to-last
    axis is [back] with p = t − back − 1, and it keeps its look-back in steps (capped at the new N); leading
    axes (options such as dampings) are carried through. Undefined entries (NaN, beyond the look-back, p ≥ t)
    are left out of an interpolation and its weights renormalized; a zero-length edge (s = t) has error 0,
    the limit of every estimate. NaN where the new edge is undefined or no neighbour is defined.
    """
    if method not in REGRID_METHODS:
        raise ValueError(f"unknown regrid method {method!r}: use one of {', '.join(REGRID_METHODS)}")
    n_old, n_new = values.shape[-1] - 1, len(positions) - 1
    history = values.ndim > 2
    old_back = values.shape[-3] if history else 0
    new_back = min(old_back, n_new)
    t = np.arange(n_new + 1)[:, None]
    s = np.arange(n_new + 1)[None, :]
    if history:
        t, s = t[None], s[None]
        p = t - np.arange(1, new_back + 1)[:, None, None]
        defined = (p >= 0) & (t < s)
        coords = [positions[np.clip(p, 0, n_new)], positions[t], positions[s]]
    else:
        defined = t < s
        coords = [positions[t], positions[s]]
    shape = np.broadcast_shapes(*(c.shape for c in coords))
    coords = [np.broadcast_to(c, shape) for c in coords]
    lead = values.shape[:-3] if history else ()
    total = np.zeros(lead + shape)
    weights = np.zeros(lead + shape)
    for corner, weight in _corners(coords, method):
        *rest, t_c, s_c = [np.clip(c, 0, n_old) for c in corner]
        usable = (weight > 0) & (t_c <= s_c)
        if history:
            back_c = t_c - rest[0] - 1
            usable &= (back_c >= 0) & (back_c < old_back)
            value = values[..., np.clip(back_c, 0, old_back - 1), t_c, s_c]
        else:
            value = values[..., t_c, s_c]
        value = np.where(t_c == s_c, 0.0, value)
        usable = usable & ~np.isnan(value)
        total += np.where(usable, weight * np.nan_to_num(value), 0.0)
        weights += np.where(usable, weight, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        result = np.where(defined & (weights > 0), total / weights, np.nan)
    return result


def regrid_maps(maps: M, sigmas: np.ndarray, new_sigmas: np.ndarray, method: str = "linear") -> M:
    """Every map array of a dataclass (`EdgeErrors`: any field that is an ndarray) read on `new_sigmas` by σ."""
    positions = grid_positions(new_sigmas, sigmas)
    arrays = {f.name: resample_map(getattr(maps, f.name), positions, method)
              for f in fields(maps) if isinstance(getattr(maps, f.name), np.ndarray)}
    return replace(maps, **arrays)


def map_steps(steps: list[int], sigmas: np.ndarray, new_sigmas: np.ndarray) -> list[int]:
    """Compute steps planned on `sigmas` moved onto `new_sigmas`: the strictly ascending steps, as many as
    before, starting at 0, nearest in σ (least squares over their fractional positions, by a dynamic
    program). The same grid gives the same steps, and a compute step on the last step stays on the last step
    (the plan made the final edge one exact Euler step).

    Raises ValueError when the new grid has fewer steps than there are compute steps.
    """
    n_new, count = len(new_sigmas) - 1, len(steps)
    if count > n_new:
        raise ValueError(f"{count} compute steps do not fit in {n_new} steps")
    wanted = grid_positions(np.asarray(sigmas, dtype=np.float64)[list(steps)], new_sigmas)
    slots = np.arange(n_new, dtype=np.float64)
    # cost[k]: the least squared distance of compute steps 0…j with step j on slot k.
    cost = np.where(slots == 0, 0.0, np.inf)
    choices = []
    for j in range(1, count):
        best_before = np.minimum.accumulate(cost)
        arg_before = _running_argmin(cost)
        new = np.full(n_new, np.inf)
        new[1:] = best_before[:-1] + (slots[1:] - wanted[j]) ** 2
        choices.append(np.append(0, arg_before[:-1]))
        cost = new
    slot = n_new - 1 if count > 1 and steps[-1] == len(sigmas) - 2 else int(np.argmin(cost))
    mapped = [slot]
    for choice in reversed(choices):
        slot = int(choice[slot])
        mapped.append(slot)
    return mapped[::-1]


def _running_argmin(values: np.ndarray) -> np.ndarray:
    """For each k, the first index of the smallest of values[0 … k]."""
    result = np.zeros(len(values), dtype=np.int64)
    for k in range(1, len(values)):
        result[k] = k if values[k] < values[result[k - 1]] else result[k - 1]
    return result


def scale_windows(windows: list[int], steps: list[int], n_old: int, n_new: int) -> list[int]:
    """Sliding windows counted in sampler steps (the authors' release estimator), moved to a grid of `n_new`
    steps with the compute `steps` there: a window spans about as much σ as before (w·n_new/n_old steps,
    rounded, at least 1) on an edge that skips a step, and is 0 on an edge that skips none."""
    ends = [*steps[1:], n_new]
    return [max(1, round(w * n_new / n_old)) if end - start > 1 else 0
            for w, start, end in zip(windows, steps, ends)]
