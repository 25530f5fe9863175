"""The estimator as the authors' public release applies it: re-estimated at every skipped step.

Our reading of `MeanCache4Qwen-Image/Mc_qwenimage.py` (UnicomAI/MeanCache): the pipeline logs, per
step i, the latents `x_i` it starts from, the latents `x_{i+1}` it ends at and the velocity it used
(the model's at a compute step, the estimate at a skipped step). At a skipped step m of an edge whose
rule has window `w` (their `edge_order`: 'v_diff_mean' = 1, 'v_diff_mean_jvp1_sK' = K), with
`r = m − min(w, m)`:

    J_m = ( u(r→m) − v_r ) / (σ_m − σ_r)          u(r→m) = (x_m − x_r) / (σ_m − σ_r)
    û_m = v_{m−1} + (σ_{m+1} − σ_m) · J_m           (v_{m−1}: the velocity used one step earlier)

so the window slides with m, the history includes earlier estimates, and the velocity drifts step by
step instead of one `û(t→s)` serving the whole edge (DESIGN.md §2). Window 1 makes `J_m` zero (one
Euler step's average velocity is the velocity it used): plain reuse. Their window is the paper's K,
which is also ours (`r = t − K`, where K = 1 likewise gives J = 0): an edge of order K runs with window
max(K, 1). The two differ only in where the window ends: at the compute step t for MeanCache, at the
current step m for the release.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from diffusers.hooks import HookRegistry

from ..core.estimator import jvp_estimate
from ..errors import ScheduleMismatchError
from ..files import Schedule
from ..hooks import SamplerHook, output_sample, replace_output
from ..models.adapters import ModelAdapter, adapter_for

AUTHORS_HOOK = "meancache_bench_authors_estimator"

T = TypeVar("T")


def authors_velocity(v_prev: T, x_r: T, v_r: T, x_m: T, sigma_r: float, sigma_m: float, sigma_next: float) -> T:
    """`û_m = v_{m−1} + (σ_{m+1} − σ_m)·J_m` with `J_m` from the window `[r, m]` (see the module doc)."""
    return v_prev + (sigma_next - sigma_m) * jvp_estimate(x_r, v_r, x_m, sigma_r, sigma_m)


def windows_for(schedule: Schedule) -> dict[int, int]:
    """Window of each compute step's edge: our order K is their window K (K = 0 and 1 both mean reuse)."""
    return {t: max(k, 1) for t, k in zip(schedule.compute_steps, schedule.orders)}


class AuthorsEstimatorHook(SamplerHook):
    """Runs the transformer at the schedule's compute steps; at every other step re-estimates the
    velocity with `authors_velocity` from a sliding window over the latents and velocities so far."""

    def __init__(self, schedule: Schedule, adapter: ModelAdapter, sigmas: Callable[[], torch.Tensor]) -> None:
        super().__init__(adapter, sigmas)
        self.schedule = schedule
        self.windows = windows_for(schedule)
        self.depth = max(self.windows.values()) + 1
        self.window = 1

    def sampler_forward(self, *args: Any, **kwargs: Any) -> Any:
        latents, timestep = self.forward_args.bind(args, kwargs)
        if self.tracker.observe(timestep):
            self.branches = []
            if len(self.sigmas()) - 1 != self.schedule.num_inference_steps:
                raise ScheduleMismatchError(
                    f"the schedule has {self.schedule.num_inference_steps} steps but the pipeline runs "
                    f"{len(self.sigmas()) - 1}: call it with num_inference_steps={self.schedule.num_inference_steps}")
        m = self.tracker.step
        history = self.branch_history()
        history.latents[m] = latents.float()
        for old in [step for step in history.latents if step < m - self.depth]:
            del history.latents[old], history.velocities[old]
        if m in self.windows:
            self.window = self.windows[m]
            output = self.fn_ref.original_forward(*args, **kwargs)
            history.velocities[m] = output_sample(output).float() * self.adapter.output_sign
            history.output = output
            return output
        sigmas = self.sigmas()
        r = m - min(self.window, m)
        velocity = authors_velocity(
            history.velocities[m - 1], history.latents[r], history.velocities[r], history.latents[m],
            float(sigmas[r]), float(sigmas[m]), float(sigmas[m + 1]),
        )
        history.velocities[m] = velocity
        sample = output_sample(history.output)
        return replace_output(history.output, (velocity * self.adapter.output_sign).to(sample.dtype))


def apply_authors_estimator(pipe: Any, schedule: Schedule) -> AuthorsEstimatorHook:
    """Make later `pipe(...)` calls run the authors' per-step estimator on `schedule`'s compute steps."""
    registry = HookRegistry.check_if_exists_or_initialize(pipe.transformer)
    if registry.get_hook(AUTHORS_HOOK) is not None:
        registry.remove_hook(AUTHORS_HOOK, recurse=False)
    hook = AuthorsEstimatorHook(schedule, adapter_for(pipe.transformer), lambda: pipe.scheduler.sigmas)
    registry.register_hook(hook, AUTHORS_HOOK)
    return hook


def remove_authors_estimator(pipe: Any) -> None:
    HookRegistry.check_if_exists_or_initialize(pipe.transformer).remove_hook(AUTHORS_HOOK, recurse=False)
