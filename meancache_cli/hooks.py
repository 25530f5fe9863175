"""Diffusers hooks on `pipe.transformer`: a recorder for calibration and the MeanCache sampler.

Both see every transformer call. The scheduler's step index says which sampler step a call belongs
to; further calls within one step are guidance branches (true CFG calls the transformer once per
branch), and each branch keeps its own history. σ values come from the pipeline's scheduler at run time, so
the estimator uses the sigmas the sampler really steps through.

Under `torch.compile` (`transformer.compile()`, `torch.compile(transformer)`) the hooks run inside the compiled
call: their bookkeeping is `torch.compiler.disable`d, so dynamo traces only the model's own forward and the per-step
Python state (step, branch, history) never becomes a guard that recompiles at every step.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, CacheContext, StateManager

from .core.estimator import exponential_velocity, mean_velocity, release_velocity
from .errors import MeanCacheError, ScheduleMismatchError
from .files import Schedule, load_schedule
from .models.adapters import ModelAdapter, adapter_for, unwrap_transformer
from .planning import schedule_on_sigmas

MEANCACHE_HOOK = "meancache"
RECORDER_HOOK = "meancache_recorder"
COUNTER_HOOK = "meancache_evaluation_counter"


class SigmaSource:
    """The pipeline's scheduler and its sigmas, read at call time: the pipeline sets both inside its own call,
    and the scheduler may be swapped between calls."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    @property
    def scheduler(self) -> Any:
        return self.pipe.scheduler

    def __call__(self) -> torch.Tensor:
        return self.pipe.scheduler.sigmas


@contextmanager
def _hooks_of(pipe: Any) -> Iterator[HookRegistry]:
    """The transformer's hook registry, to add or remove hooks beneath accelerate's offload wrapper.

    `enable_model_cpu_offload` wraps `transformer.forward`, and the pipeline re-creates that wrapper at
    the end of every call around the forward it wrapped first: a hook registered on top of it would be
    dropped after one generation. So the wrapper is lifted off while hooks change and put back on top.
    Beneath `torch.compile(transformer)` the hooks go on the model itself, where the pipeline's `cache_context` and
    hook resets reach them.
    """
    module = unwrap_transformer(pipe.transformer)
    offload = getattr(module, "_hf_hook", None)
    if offload is not None:
        from accelerate.hooks import remove_hook_from_module

        remove_hook_from_module(module)
    try:
        yield HookRegistry.check_if_exists_or_initialize(module)
    finally:
        if offload is not None:
            from accelerate.hooks import add_hook_to_module

            add_hook_to_module(module, offload)


def _remove_hook(pipe: Any, name: str) -> None:
    if HookRegistry.check_if_exists_or_initialize(unwrap_transformer(pipe.transformer)).get_hook(name) is None:
        return
    with _hooks_of(pipe) as registry:
        registry.remove_hook(name, recurse=False)


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

    The step is the scheduler's own step index, never a change of timestep: in bf16 two consecutive
    timesteps can round to one value (DESIGN.md §9). Further calls within one scheduler step are guidance
    branches. A generation starts at the first call after the scheduler's sigmas were set anew
    (`set_timesteps` builds a new tensor) or after a reset (the pipeline resets the hook after each call).
    """

    def __init__(self, adapter: ModelAdapter, sigmas: SigmaSource) -> None:
        self.adapter = adapter
        self.sigmas = sigmas
        self.reset()

    def reset(self) -> None:
        self.step = -1
        self.branch = 0
        self.generation_sigmas: torch.Tensor | None = None

    def observe(self, timestep: torch.Tensor) -> bool:
        """Advance on one call; True when this call starts a new generation."""
        timestep = torch.as_tensor(timestep)
        scheduler = self.sigmas.scheduler
        sigmas = scheduler.sigmas
        index = _step_index(scheduler)
        restart = self.step < 0 or sigmas is not self.generation_sigmas or index < self.step
        if not restart and index == self.step:
            self.branch += 1
            return False
        self.step, self.branch, self.generation_sigmas = index, 0, sigmas
        steps = len(sigmas) - 1
        sigma = self.adapter.sigma(timestep)
        expected = float(sigmas[index]) if index < steps else float("nan")
        # A bf16 timestep is rounded to 8 significant bits: allow its precision, not just 1e-3.
        precision = torch.finfo(timestep.dtype).eps if timestep.is_floating_point() else 0.0
        if not abs(sigma - expected) <= max(1e-3, precision) * max(1.0, abs(expected)):
            raise MeanCacheError(
                f"step {index} of {steps}: the transformer got σ={sigma:.4f} but the scheduler is at "
                f"σ={expected:.4f}; the pipeline's scheduler must be a one-call-per-step flow-matching scheduler "
                "(FlowMatchEulerDiscreteScheduler)"
            )
        return restart


def _step_index(scheduler: Any) -> int:
    """The step the scheduler is about to take: its step index once it has stepped, before that its begin
    index (pipelines that start part-way set it) or 0."""
    index = getattr(scheduler, "step_index", None)
    if index is None:
        index = getattr(scheduler, "begin_index", None)
    return 0 if index is None else int(index)


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
    """What one guidance branch has seen: latents and velocities by step, and the current edge."""

    latents: dict[int, torch.Tensor] = field(default_factory=dict)
    velocities: dict[int, torch.Tensor] = field(default_factory=dict)
    edge_velocity: torch.Tensor | None = None
    output: Any = None


class CacheContextName(StateManager):
    """The name a diffusers pipeline gives each denoiser call (`with transformer.cache_context("cond"):`).

    diffusers hands the context to every `StateManager` of a stateful hook on the transformer; this one keeps
    only the name, which keys the guidance branch's history (`None` where the pipeline sets no context).
    """

    def __init__(self) -> None:
        super().__init__(BaseState)
        self.name: str | None = None

    def set_context(self, context: CacheContext | None) -> None:
        super().set_context(context)
        self.name = None if context is None else context.name


class SamplerHook(ModelHook):
    """Base of the hooks that follow the sampler: steps and guidance branches from each call's
    timestep, a history per branch, and a clean state after every generation or aborted one.

    A branch is the pipeline's cache-context name ("cond", "uncond") where it sets one, else the call's
    position within its step, so histories stay apart even when a pipeline calls its branches in another
    order or skips one at some steps."""

    _is_stateful = True

    def __init__(self, adapter: ModelAdapter, sigmas: SigmaSource) -> None:
        super().__init__()
        self.adapter = adapter
        self.sigmas = sigmas
        self.tracker = StepTracker(adapter, sigmas)
        self.context = CacheContextName()
        self.branches: dict[str | int, BranchHistory] = {}
        self.call: tuple[BranchHistory, int, torch.Tensor] | None = None  # the call in progress

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self.forward_args = ForwardArgs(module.forward, self.adapter)
        return module

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.tracker.reset()
        self.branches = {}
        self.call = None
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

    def branch_key(self) -> str | int:
        """The guidance branch of the current call: its cache-context name, else its position in the step."""
        return self.context.name if self.context.name is not None else self.tracker.branch

    def branch_history(self) -> BranchHistory:
        """The history of the branch the current call belongs to."""
        return self.branches.setdefault(self.branch_key(), BranchHistory())


class EvaluationCounterHook(ModelHook):
    """Counts transformer forwards that really run. Registered innermost, before any cache hook."""

    def __init__(self) -> None:
        super().__init__()
        self.evaluations = 0

    @torch.compiler.disable
    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        self.evaluations += 1
        return args, kwargs


def apply_evaluation_counter(pipe: Any, beneath_block_caches: bool = False) -> EvaluationCounterHook:
    """Count real evaluations of `pipe.transformer`; call before applying a cache hook.

    With `beneath_block_caches` the count is taken where diffusers' block-level caches (FirstBlockCache, MagCache,
    TaylorSeer-lite) cannot fake a forward: they still call a block they skip and return cached tensors from
    their hook on it, so the counter goes on the first sub-module (with parameters) of the last transformer block,
    which runs only when the whole model really runs. A transformer without blocks gives those caches nothing to
    hook: there the counter goes on the transformer as without the option.
    """
    module = unwrap_transformer(pipe.transformer)
    probe = _block_probe(module) if beneath_block_caches else None
    registry = HookRegistry.check_if_exists_or_initialize(probe if probe is not None else module)
    if probe is None and registry.get_hook(MEANCACHE_HOOK) is not None:
        raise MeanCacheError("apply the evaluation counter before MeanCache, so skipped steps are not counted")
    existing = registry.get_hook(COUNTER_HOOK)
    if existing is not None:
        return existing
    hook = EvaluationCounterHook()
    if probe is not None:
        registry.register_hook(hook, COUNTER_HOOK)
        return hook
    with _hooks_of(pipe) as registry:
        registry.register_hook(hook, COUNTER_HOOK)
    return hook


def remove_evaluation_counter(pipe: Any) -> None:
    """Remove the evaluation counter, wherever `apply_evaluation_counter` put it."""
    probe = _block_probe(unwrap_transformer(pipe.transformer))
    if probe is not None:
        HookRegistry.check_if_exists_or_initialize(probe).remove_hook(COUNTER_HOOK, recurse=False)
    _remove_hook(pipe, COUNTER_HOOK)


def _block_probe(transformer: torch.nn.Module) -> torch.nn.Module | None:
    """The first sub-module with parameters of the last transformer block in execution order (Flux: of
    `single_transformer_blocks[-1]`); None for a transformer without a block list."""
    from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS

    lists = [module for name, module in transformer.named_children()
             if name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(module, torch.nn.ModuleList) and len(module)]
    if not lists:
        return None
    return next(module for module in lists[-1][-1].children() if any(True for _ in module.parameters()))


@dataclass(frozen=True)
class MeanCacheConfig:
    r"""Configuration for MeanCache, applied with `apply_meancache(pipe, config)` (like diffusers'
    `FirstBlockCacheConfig` with `apply_first_block_cache`).

    Args:
        schedule (`Schedule`, `str` or `Path`):
            Where the model runs and how each skipped step is estimated: a `Schedule` from `plan`, a schedule
            file, or a shipped schedule's name such as `"demo/b10"`. Its `estimator` picks MeanCache's hook or
            the authors' release estimator.
        adapter (`ModelAdapter`, *optional*, defaults to `None`):
            How to read σ from the transformer's timestep and the sign of its output. `None` finds it from the
            transformer's class; pass one only for a transformer family MeanCache does not know.
        strict (`bool`, defaults to `False`):
            At another step count than planned, refuse the schedule (`ScheduleMismatchError`) instead of moving
            its compute steps by σ onto the run's sigmas; at another resolution, take them by index.

    Example:
        >>> from meancache_cli import MeanCacheConfig, apply_meancache, remove_meancache
        >>> from meancache_cli.models.demo import load_demo_pipeline
        >>> pipe = load_demo_pipeline()
        >>> hook = apply_meancache(pipe, MeanCacheConfig(schedule="demo/b10"))
        >>> image = pipe("a red circle on a blue background", num_inference_steps=50, height=32, width=32,
        ...              max_sequence_length=16, true_cfg_scale=4.0, negative_prompt="").images[0]
        >>> remove_meancache(pipe)
    """

    schedule: Schedule | str | Path
    adapter: ModelAdapter | None = None
    strict: bool = False


class ScheduleMappedWarning(UserWarning):
    """A schedule runs on another grid than it was planned on: its compute steps were moved by σ."""


class ScheduleHook(SamplerHook):
    """Runs the transformer only at the schedule's compute steps; the subclass says what every other
    step gets instead of a model velocity. At each generation's start the schedule is put on the sigmas
    the scheduler really made (`schedule_on_sigmas`), so it runs by σ at any step count and resolution."""

    def __init__(self, config: MeanCacheConfig, sigmas: SigmaSource) -> None:
        super().__init__(config.adapter, sigmas)
        self.config = config
        self.grid: tuple[float, ...] | None = None
        self._follow(config.schedule)

    def _follow(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self.edges = {edge.start: (index, edge) for index, edge in enumerate(schedule.edges)}

    def sampler_forward(self, *args: Any, **kwargs: Any) -> Any:
        # Only the model call is traced under torch.compile: the three steps around it run eagerly.
        if self._begin_call(args, kwargs):
            return self._computed_call(self.fn_ref.original_forward(*args, **kwargs))
        return self._skipped_call()

    @torch.compiler.disable
    def _begin_call(self, args: tuple, kwargs: dict) -> bool:
        """Place the call (step, branch, history); True when the model runs at this step."""
        latents, timestep = self.forward_args.bind(args, kwargs)
        if self.tracker.observe(timestep):
            self._start_generation()
        self.call = (self.branch_history(), self.tracker.step, latents)
        return self.tracker.step in self.edges

    @torch.compiler.disable
    def _computed_call(self, output: Any) -> Any:
        (history, step, latents), self.call = self.call, None
        history.output = output
        return self.computed(history, step, latents, output)

    @torch.compiler.disable
    def _skipped_call(self) -> Any:
        (history, step, latents), self.call = self.call, None
        velocity = self.skipped(history, step, latents)
        return replace_output(history.output, (velocity * self.adapter.output_sign).to(
            output_sample(history.output).dtype))

    def computed(self, history: BranchHistory, step: int, latents: torch.Tensor, output: Any) -> Any:
        """The output handed to the sampler at a compute step."""
        raise NotImplementedError

    def skipped(self, history: BranchHistory, step: int, latents: torch.Tensor) -> torch.Tensor:
        """The velocity `dx/dσ` handed to the sampler at a skipped step."""
        raise NotImplementedError

    def _start_generation(self) -> None:
        sigmas = self.sigmas()
        steps = len(sigmas) - 1
        planned = self.config.schedule
        if not self.config.strict:
            self._map_onto(tuple(sigmas.detach().double().cpu().tolist()))
        elif steps != planned.num_inference_steps:
            raise ScheduleMismatchError(
                f"the schedule was planned for num_inference_steps={planned.num_inference_steps} but the pipeline runs "
                f"{steps} steps: generate with {planned.num_inference_steps} steps or plan a schedule for {steps} "
                "(without strict it is mapped by σ)"
            )
        self.branches = {}

    def _map_onto(self, grid: tuple[float, ...]) -> None:
        """Follow the schedule moved onto this generation's sigmas; once per new grid (another step count or
        size), with a warning when it moved."""
        if grid == self.grid:
            return
        self.grid = grid
        planned = self.config.schedule
        self._follow(schedule_on_sigmas(planned, np.asarray(grid)))
        if self.schedule is not planned:
            steps = " ".join(map(str, self.schedule.compute_steps))
            warnings.warn(
                f"the schedule planned for {planned.num_inference_steps} steps runs on this generation's "
                f"{len(grid) - 1}-step sigmas, mapped by σ: compute steps {steps} ({planned.budget} evaluations per "
                "branch)", ScheduleMappedWarning, stacklevel=3)


class MeanCacheHook(ScheduleHook):
    """Hands every step of an edge `t→s` the same average velocity `û(t→s)`, so the Euler steps
    compose to one jump; `û` reads the fresh `v_t` and the K-th previous compute step's velocity (and, for
    an exponential edge, both steps' latents)."""

    @property
    def depth(self) -> int:
        return max(self.schedule.orders)

    @property
    def keeps_latents(self) -> bool:
        return "exp" in self.schedule.kinds

    def computed(self, history: BranchHistory, step: int, latents: torch.Tensor, output: Any) -> Any:
        index, edge = self.edges[step]
        sample = output_sample(output)
        v_t = sample.float() * self.adapter.output_sign
        history.edge_velocity = v_t
        if edge.kind != "reuse":
            sigmas = self.sigmas()
            p = self.schedule.compute_steps[index - edge.order]
            sigma_p, sigma_t, sigma_s = float(sigmas[p]), float(sigmas[step]), float(sigmas[edge.end])
            if edge.kind == "exp":
                history.edge_velocity = exponential_velocity(latents.float(), v_t, sigma_t, sigma_s,
                                                             history.latents[p], history.velocities[p], sigma_p)
            else:
                history.edge_velocity = mean_velocity(v_t, sigma_t, sigma_s, history.velocities[p], sigma_p,
                                                      edge.damping)
        if self.depth:
            history.velocities[step] = v_t
            if self.keeps_latents:
                history.latents[step] = latents.float()
            for old in sorted(history.velocities)[:-self.depth]:
                del history.velocities[old]
                history.latents.pop(old, None)
        if history.edge_velocity is v_t:
            return output
        return replace_output(output, (history.edge_velocity * self.adapter.output_sign).to(sample.dtype))

    def skipped(self, history: BranchHistory, step: int, latents: torch.Tensor) -> torch.Tensor:
        return history.edge_velocity


class ReleaseEstimatorHook(ScheduleHook):
    """The estimator as the authors' release applies it: at every skipped step the velocity is
    re-estimated from a sliding window over the logged latents and velocities (`release_velocity`)."""

    def __init__(self, config: MeanCacheConfig, sigmas: SigmaSource) -> None:
        super().__init__(config, sigmas)
        self.window = 1

    @property
    def depth(self) -> int:
        return max([1, *self.schedule.orders]) + 1

    def computed(self, history: BranchHistory, step: int, latents: torch.Tensor, output: Any) -> Any:
        self.window = max(self.edges[step][1].order, 1)
        self._log(history, step, latents, output_sample(output).float() * self.adapter.output_sign)
        return output

    def skipped(self, history: BranchHistory, step: int, latents: torch.Tensor) -> torch.Tensor:
        sigmas = self.sigmas()
        r = step - min(self.window, step)
        velocity = release_velocity(
            history.velocities[step - 1], history.latents[r], history.velocities[r], latents.float(),
            float(sigmas[r]), float(sigmas[step]), float(sigmas[step + 1]))
        self._log(history, step, latents, velocity)
        return velocity

    def _log(self, history: BranchHistory, step: int, latents: torch.Tensor, velocity: torch.Tensor) -> None:
        history.latents[step] = latents.float()
        history.velocities[step] = velocity
        for old in [m for m in history.latents if m < step - self.depth]:
            del history.latents[old], history.velocities[old]


HOOKS_BY_ESTIMATOR: dict[str, type[ScheduleHook]] = {"meancache": MeanCacheHook, "release": ReleaseEstimatorHook}


def apply_meancache(pipe: Any, schedule: MeanCacheConfig | Schedule | str | Path, strict: bool = False) -> ScheduleHook:
    """Make every later `pipe(...)` call run the cached sampler that `schedule` (or a `MeanCacheConfig`)
    describes (its `estimator` picks MeanCache's or the authors' release estimator).

    A generation at another step count or resolution runs the schedule moved by σ onto its sigmas, with
    as many evaluations per branch as planned (a `ScheduleMappedWarning` says so); `strict` refuses another
    step count and takes the steps by index."""
    config = schedule if isinstance(schedule, MeanCacheConfig) else MeanCacheConfig(schedule, strict=strict)
    plan = config.schedule if isinstance(config.schedule, Schedule) else load_schedule(config.schedule)
    plan.validate("schedule")
    config = replace(config, schedule=plan, adapter=config.adapter or adapter_for(pipe.transformer))
    hook = HOOKS_BY_ESTIMATOR[plan.estimator](config, SigmaSource(pipe))
    with _hooks_of(pipe) as registry:
        if registry.get_hook(MEANCACHE_HOOK) is not None:
            registry.remove_hook(MEANCACHE_HOOK, recurse=False)
        registry.register_hook(hook, MEANCACHE_HOOK)
    return hook


def remove_meancache(pipe: Any) -> None:
    """Restore the plain transformer forward."""
    _remove_hook(pipe, MEANCACHE_HOOK)


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
        self.x0: dict[str | int, torch.Tensor] = {}
        self.velocities: dict[str | int, list[torch.Tensor]] = {}

    def sampler_forward(self, *args: Any, **kwargs: Any) -> Any:
        latents = self._begin_call(args, kwargs)
        return self._record(latents, self.fn_ref.original_forward(*args, **kwargs))

    @torch.compiler.disable
    def _begin_call(self, args: tuple, kwargs: dict) -> torch.Tensor:
        latents, timestep = self.forward_args.bind(args, kwargs)
        if self.tracker.observe(timestep):
            self.x0, self.velocities = {}, {}
        return latents

    @torch.compiler.disable
    def _record(self, latents: torch.Tensor, output: Any) -> Any:
        branch = self.branch_key()
        if branch not in self.x0:
            self.x0[branch] = latents.detach().float().cpu()
            self.velocities[branch] = []
        self.velocities[branch].append(output_sample(output).detach().float().cpu() * self.adapter.output_sign)
        return output

    def trajectories(self) -> list[Trajectory]:
        """The last run's trajectories, one per guidance branch."""
        return [Trajectory(self.x0[branch], torch.stack(self.velocities[branch])) for branch in self.x0]


def apply_recorder(pipe: Any) -> RecorderHook:
    """Record every later uncached `pipe(...)` call's trajectory."""
    hook = RecorderHook(adapter_for(pipe.transformer), SigmaSource(pipe))
    with _hooks_of(pipe) as registry:
        registry.register_hook(hook, RECORDER_HOOK)
    return hook


def remove_recorder(pipe: Any) -> None:
    _remove_hook(pipe, RECORDER_HOOK)
