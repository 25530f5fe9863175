"""Diffusers hooks on `pipe.transformer`: a recorder for calibration and the MeanCache sampler.

Both see every transformer call. A call with a new timestep starts a new sampler step; further
calls at the same timestep are guidance branches (true CFG calls the transformer once per branch),
and each branch keeps its own history. σ values come from the pipeline's scheduler at run time, so
the estimator uses the sigmas the sampler really steps through.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .core.estimator import mean_velocity
from .errors import MeanCacheError, ScheduleMismatchError
from .files import Schedule, load_schedule
from .models.adapters import ModelAdapter, adapter_for

MEANCACHE_HOOK = "meancache"
RECORDER_HOOK = "meancache_recorder"
COUNTER_HOOK = "meancache_evaluation_counter"

SigmaSource = Callable[[], torch.Tensor]


def _scheduler_sigmas(pipe: Any) -> SigmaSource:
    """Read the sigmas lazily: the pipeline sets them inside its own call."""
    return lambda: pipe.scheduler.sigmas


def _stacked(sample: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """A list of per-sample tensors (Z-Image) as one batch tensor; a tensor as itself."""
    return torch.stack(list(sample)) if isinstance(sample, (list, tuple)) else sample


def replace_output(output: Any, sample: torch.Tensor) -> Any:
    """The transformer's output with its sample swapped, in the same structure (tuple or dataclass, list or tensor)."""
    old = output[0] if isinstance(output, tuple) else output.sample
    if isinstance(old, (list, tuple)):
        sample = list(sample.unbind(0))
    if isinstance(output, tuple):
        return (sample, *output[1:])
    return replace(output, sample=sample)


def output_sample(output: Any) -> torch.Tensor:
    return _stacked(output[0] if isinstance(output, tuple) else output.sample)


class StepTracker:
    """Turns the stream of transformer calls into (step, branch) pairs.

    A new timestep starts a new step; a σ above the previous one, or a step past the last, starts a
    new generation (the pipeline also resets the hook after each call).
    """

    def __init__(self, adapter: ModelAdapter, sigmas: SigmaSource) -> None:
        self.adapter = adapter
        self.sigmas = sigmas
        self.reset()

    def reset(self) -> None:
        self.step = -1
        self.branch = 0
        self.last_timestep: torch.Tensor | None = None
        self.last_sigma = float("inf")

    def observe(self, timestep: torch.Tensor) -> bool:
        """Advance on one call; True when this call starts a new generation."""
        timestep = torch.as_tensor(timestep)
        if self.last_timestep is not None and torch.equal(timestep, self.last_timestep):
            self.branch += 1
            return False
        sigma = self.adapter.sigma(timestep)
        steps = len(self.sigmas()) - 1
        restart = self.step < 0 or sigma > self.last_sigma or self.step + 1 >= steps
        self.step = 0 if restart else self.step + 1
        self.branch = 0
        self.last_timestep = timestep.detach().clone()
        self.last_sigma = sigma
        expected = float(self.sigmas()[self.step])
        # A bf16 timestep is rounded to 8 significant bits: allow its precision, not just 1e-3.
        precision = torch.finfo(timestep.dtype).eps if timestep.is_floating_point() else 0.0
        if abs(sigma - expected) > max(1e-3, precision) * max(1.0, abs(expected)):
            raise MeanCacheError(
                f"step {self.step}: the transformer got σ={sigma:.4f} but the scheduler is at σ={expected:.4f}; "
                "the pipeline's scheduler must be a one-call-per-step flow-matching scheduler "
                "(FlowMatchEulerDiscreteScheduler)"
            )
        return restart


class ForwardArgs:
    """Finds the latents and the timestep (named by the adapter) among a forward call's arguments."""

    def __init__(self, forward: Callable[..., Any], adapter: ModelAdapter) -> None:
        self.signature = inspect.signature(forward)
        self.names = adapter.latents_arg, adapter.timestep_arg

    def bind(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        return _stacked(bound[self.names[0]]), bound[self.names[1]]


@dataclass
class BranchHistory:
    """What one guidance branch has seen: latents and velocities per step, and the current edge."""

    latents: dict[int, torch.Tensor] = field(default_factory=dict)
    velocities: dict[int, torch.Tensor] = field(default_factory=dict)
    edge_velocity: torch.Tensor | None = None
    output: Any = None


class SamplerHook(ModelHook):
    """Base of the hooks that follow the sampler: steps and guidance branches from each call's
    timestep, a history per branch, and a clean state after every generation or aborted one."""

    _is_stateful = True

    def __init__(self, adapter: ModelAdapter, sigmas: SigmaSource) -> None:
        super().__init__()
        self.adapter = adapter
        self.sigmas = sigmas
        self.tracker = StepTracker(adapter, sigmas)
        self.branches: list[BranchHistory] = []

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self.forward_args = ForwardArgs(module.forward, self.adapter)
        return module

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.tracker.reset()
        self.branches = []
        return module

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.sampler_forward(*args, **kwargs)
        except BaseException:
            # An aborted generation must not leak its history into the next one.
            self.reset_state(module)
            raise

    def sampler_forward(self, *args: Any, **kwargs: Any) -> Any:
        """The hook's own work for one transformer call."""
        raise NotImplementedError

    def branch_history(self) -> BranchHistory:
        """The history of the branch the current call belongs to."""
        while len(self.branches) <= self.tracker.branch:
            self.branches.append(BranchHistory())
        return self.branches[self.tracker.branch]


class EvaluationCounterHook(ModelHook):
    """Counts transformer forwards that really run. Registered innermost, before any cache hook."""

    def __init__(self) -> None:
        super().__init__()
        self.evaluations = 0

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        self.evaluations += 1
        return args, kwargs


def apply_evaluation_counter(pipe: Any) -> EvaluationCounterHook:
    """Count real evaluations of `pipe.transformer`; call before applying a cache hook."""
    registry = HookRegistry.check_if_exists_or_initialize(pipe.transformer)
    if registry.get_hook(MEANCACHE_HOOK) is not None:
        raise MeanCacheError("apply the evaluation counter before MeanCache, so skipped steps are not counted")
    existing = registry.get_hook(COUNTER_HOOK)
    if existing is not None:
        return existing
    hook = EvaluationCounterHook()
    registry.register_hook(hook, COUNTER_HOOK)
    return hook


@dataclass(frozen=True)
class MeanCacheConfig:
    """What the MeanCache hook needs: the schedule and how to read this model."""

    schedule: Schedule
    adapter: ModelAdapter


class MeanCacheHook(SamplerHook):
    """Runs the transformer only at the schedule's compute steps and hands every step of an edge
    `t→s` the same average velocity `û_K(t→s)`, so the Euler steps compose to one jump."""

    def __init__(self, config: MeanCacheConfig, sigmas: SigmaSource) -> None:
        super().__init__(config.adapter, sigmas)
        self.config = config
        schedule = config.schedule
        self.edges = {
            t: (order, end)
            for t, order, end in zip(
                schedule.compute_steps, schedule.orders,
                [*schedule.compute_steps[1:], schedule.num_inference_steps],
            )
        }
        self.window = max(schedule.orders)

    def sampler_forward(self, *args: Any, **kwargs: Any) -> Any:
        latents, timestep = self.forward_args.bind(args, kwargs)
        if self.tracker.observe(timestep):
            self._start_generation()
        step = self.tracker.step
        history = self.branch_history()
        history.latents[step] = latents
        if step in self.edges:
            output = self.fn_ref.original_forward(*args, **kwargs)
            return self._start_edge(history, step, output)
        history.velocities[step] = history.edge_velocity
        return replace_output(history.output, (history.edge_velocity * self.adapter.output_sign).to(
            output_sample(history.output).dtype))

    def _start_generation(self) -> None:
        steps = len(self.sigmas()) - 1
        expected = self.config.schedule.num_inference_steps
        if steps != expected:
            raise ScheduleMismatchError(
                f"the schedule was planned for num_inference_steps={expected} but the pipeline runs {steps} steps: "
                f"generate with {expected} steps or plan a schedule for {steps}"
            )
        self.branches = []

    def _start_edge(self, history: BranchHistory, t: int, output: Any) -> Any:
        """Run at a compute step: estimate `û_K(t→s)` from history, then keep only what later steps read."""
        order, end = self.edges[t]
        sign = self.adapter.output_sign
        sample = output_sample(output)
        v_t = sample.float() * sign
        history.velocities[t] = v_t
        history.output = output
        for old in [m for m in history.latents if m < t - self.window]:
            del history.latents[old], history.velocities[old]
        if order == 0:
            history.edge_velocity = v_t
            return output
        sigmas = self.sigmas()
        r = t - order
        history.edge_velocity = mean_velocity(
            v_t, float(sigmas[t]), float(sigmas[end]), history.latents[t].float(),
            history.latents[r].float(), history.velocities[r], float(sigmas[r]),
        )
        return replace_output(output, (history.edge_velocity * sign).to(sample.dtype))


def apply_meancache(pipe: Any, schedule: Schedule | str | Path) -> MeanCacheHook:
    """Make every later `pipe(...)` call run the cached sampler that `schedule` describes."""
    if not isinstance(schedule, Schedule):
        schedule = load_schedule(schedule)
    schedule.validate("schedule")
    registry = HookRegistry.check_if_exists_or_initialize(pipe.transformer)
    if registry.get_hook(MEANCACHE_HOOK) is not None:
        registry.remove_hook(MEANCACHE_HOOK, recurse=False)
    hook = MeanCacheHook(MeanCacheConfig(schedule, adapter_for(pipe.transformer)), _scheduler_sigmas(pipe))
    registry.register_hook(hook, MEANCACHE_HOOK)
    return hook


def remove_meancache(pipe: Any) -> None:
    """Restore the plain transformer forward."""
    registry = HookRegistry.check_if_exists_or_initialize(pipe.transformer)
    registry.remove_hook(MEANCACHE_HOOK, recurse=False)


@dataclass
class Trajectory:
    """One branch of one uncached run: start latents and the velocity `dx/dσ` at every step."""

    x0: torch.Tensor
    velocities: torch.Tensor


class RecorderHook(SamplerHook):
    """Records `x_0` and `v_i` per branch during uncached reference runs (calibration).

    The recording outlives the hook's reset at the end of the pipeline call: it is cleared when the
    next generation starts.
    """

    def __init__(self, adapter: ModelAdapter, sigmas: SigmaSource) -> None:
        super().__init__(adapter, sigmas)
        self.x0: list[torch.Tensor] = []
        self.velocities: list[list[torch.Tensor]] = []

    def sampler_forward(self, *args: Any, **kwargs: Any) -> Any:
        latents, timestep = self.forward_args.bind(args, kwargs)
        if self.tracker.observe(timestep):
            self.x0, self.velocities = [], []
        output = self.fn_ref.original_forward(*args, **kwargs)
        branch = self.tracker.branch
        if branch == len(self.x0):
            self.x0.append(latents.detach().float().cpu())
            self.velocities.append([])
        self.velocities[branch].append(output_sample(output).detach().float().cpu() * self.adapter.output_sign)
        return output

    def trajectories(self) -> list[Trajectory]:
        """The last run's trajectories, one per guidance branch."""
        return [Trajectory(x0, torch.stack(vs)) for x0, vs in zip(self.x0, self.velocities)]


def apply_recorder(pipe: Any) -> RecorderHook:
    """Record every later uncached `pipe(...)` call's trajectory."""
    registry = HookRegistry.check_if_exists_or_initialize(pipe.transformer)
    hook = RecorderHook(adapter_for(pipe.transformer), _scheduler_sigmas(pipe))
    registry.register_hook(hook, RECORDER_HOOK)
    return hook


def remove_recorder(pipe: Any) -> None:
    HookRegistry.check_if_exists_or_initialize(pipe.transformer).remove_hook(RECORDER_HOOK, recurse=False)
