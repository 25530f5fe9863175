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

import inspect
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch
from diffusers.hooks import HookRegistry, ModelHook

from ..core.estimator import jvp_estimate
from ..errors import ScheduleMismatchError
from ..files import Schedule
from ..models.adapters import ModelAdapter, adapter_for

AUTHORS_HOOK = "meancache_bench_authors_estimator"

T = TypeVar("T")


def authors_velocity(v_prev: T, x_r: T, v_r: T, x_m: T, sigma_r: float, sigma_m: float, sigma_next: float) -> T:
    """`û_m = v_{m−1} + (σ_{m+1} − σ_m)·J_m` with `J_m` from the window `[r, m]` (see the module doc)."""
    return v_prev + (sigma_next - sigma_m) * jvp_estimate(x_r, v_r, x_m, sigma_r, sigma_m)


def windows_for(schedule: Schedule) -> dict[int, int]:
    """Window of each compute step's edge: our order K is their window K (K = 0 and 1 both mean reuse)."""
    return {t: max(k, 1) for t, k in zip(schedule.compute_steps, schedule.orders)}


def _as_tensor(sample: Any) -> torch.Tensor:
    """A list of per-sample tensors as one batch tensor; a tensor as itself."""
    return torch.stack(list(sample)) if isinstance(sample, (list, tuple)) else sample


def _sample_of(output: Any) -> torch.Tensor:
    return _as_tensor(output[0] if isinstance(output, tuple) else output.sample)


def _with_sample(output: Any, sample: torch.Tensor) -> Any:
    """`output` with its sample replaced, in the same structure (tuple or dataclass, list or tensor)."""
    old = output[0] if isinstance(output, tuple) else output.sample
    if isinstance(old, (list, tuple)):
        sample = list(sample.unbind(0))
    return (sample, *output[1:]) if isinstance(output, tuple) else replace(output, sample=sample)


class _Steps:
    """Step and guidance branch of each call: a new timestep is a new step, a σ above the last (or a
    step past the schedule) a new generation, a repeated timestep another guidance branch."""

    def __init__(self, adapter: ModelAdapter, steps: int) -> None:
        self.adapter = adapter
        self.steps = steps
        self.reset()

    def reset(self) -> None:
        self.step, self.branch = -1, 0
        self.timestep: torch.Tensor | None = None
        self.sigma = float("inf")

    def observe(self, timestep: Any) -> bool:
        """Advance on one call; True when this call starts a new generation."""
        timestep = torch.as_tensor(timestep)
        if self.timestep is not None and torch.equal(timestep, self.timestep):
            self.branch += 1
            return False
        sigma = self.adapter.sigma(timestep)
        restart = self.step < 0 or sigma > self.sigma or self.step + 1 >= self.steps
        self.step, self.branch = (0 if restart else self.step + 1), 0
        self.timestep, self.sigma = timestep.detach().clone(), sigma
        return restart


@dataclass
class _Branch:
    latents: dict[int, torch.Tensor]
    velocities: dict[int, torch.Tensor]
    output: Any = None


class AuthorsEstimatorHook(ModelHook):
    """Runs the transformer at the schedule's compute steps; at every other step re-estimates the
    velocity with `authors_velocity` from a sliding window over the latents and velocities so far."""

    _is_stateful = True

    def __init__(self, schedule: Schedule, adapter: ModelAdapter, sigmas: Callable[[], torch.Tensor]) -> None:
        super().__init__()
        self.schedule = schedule
        self.adapter = adapter
        self.sigmas = sigmas
        self.windows = windows_for(schedule)
        self.depth = max(self.windows.values()) + 1
        self.tracker = _Steps(adapter, schedule.num_inference_steps)
        self.branches: list[_Branch] = []
        self.window = 1

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self.signature = inspect.signature(module.forward)
        return module

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.tracker.reset()
        self.branches = []
        return module

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        try:
            return self._forward(*args, **kwargs)
        except BaseException:
            self.reset_state(module)
            raise

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        latents, timestep = _as_tensor(bound[self.adapter.latents_arg]), bound[self.adapter.timestep_arg]
        if self.tracker.observe(timestep):
            self.branches = []
            if len(self.sigmas()) - 1 != self.schedule.num_inference_steps:
                raise ScheduleMismatchError(
                    f"the schedule has {self.schedule.num_inference_steps} steps but the pipeline runs "
                    f"{len(self.sigmas()) - 1}: call it with num_inference_steps={self.schedule.num_inference_steps}")
        m, branch = self.tracker.step, self.tracker.branch
        while len(self.branches) <= branch:
            self.branches.append(_Branch({}, {}))
        history = self.branches[branch]
        history.latents[m] = latents.float()
        for old in [step for step in history.latents if step < m - self.depth]:
            del history.latents[old], history.velocities[old]
        if m in self.windows:
            self.window = self.windows[m]
            output = self.fn_ref.original_forward(*args, **kwargs)
            history.velocities[m] = _sample_of(output).float() * self.adapter.output_sign
            history.output = output
            return output
        sigmas = self.sigmas()
        r = m - min(self.window, m)
        velocity = authors_velocity(
            history.velocities[m - 1], history.latents[r], history.velocities[r], history.latents[m],
            float(sigmas[r]), float(sigmas[m]), float(sigmas[m + 1]),
        )
        history.velocities[m] = velocity
        sample = _sample_of(history.output)
        return _with_sample(history.output, (velocity * self.adapter.output_sign).to(sample.dtype))


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
