"""`run_bench`: MeanCache against every peer, on one model, prompts and seeds, in one process.

The bench runs one or more sampling configurations (the embedded models: plain and true CFG, from the `bench:`
entry of the model's config), each with its own calibration, references and tables. Per configuration: uncached
N-step and fine (8×N-step Euler, 2×N quick) references on the evaluation set, calibration (set A, whose first
runs are held out for validation, set B, MagCache's ratios), then per budget: MeanCache's validated plan
(`planning.plan` with the pipeline), plan or search every other method, generate the evaluation set, time them
round-robin against the uncached pipeline; then the ablations at B = 10. Every pipeline call advances the
progress callback once (a validation's unused share of its bound is advanced after it), so `bench_units` is the
exact total of a progress bar; each stage is announced through `stage`.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import defaults
from ..calibration import holdout_count, reference_run_kwargs, run_calibration
from ..core.stability import edge_costs
from ..files import Calibration, Schedule
from ..hooks import apply_evaluation_counter, remove_evaluation_counter
from ..metrics import compare, latent_psnr
from ..models.registry import ModelSpec, load_pipeline, resolve_model
from ..planning import plan, plan_schedule, uniform_schedule
from .authors import release_on_schedule, release_schedule
from .minmax import minmax_path
from .peers import (
    METHODS,
    SCHEDULE_METHODS,
    Method,
    authors_method,
    calibrate_mag_ratios,
    euler_method,
    fbcache_method,
    magcache_method,
    meancache_method,
    solver_method,
    taylorseer_method,
)
from .prompts import BenchPrompts, PromptSet, bench_prompts
from .search import bisect_threshold

DEFAULT_OUT = Path("docs/bench")
DEFAULT_BUDGETS = (8, 10, 13, 17, 25)
QUICK_BUDGETS = (10,)
STRESS_BUDGET = 5
ABLATION_BUDGET = 10
FINE_FACTOR = 8
QUICK_FINE_FACTOR = 2  # a smoke run: the fine reference only has to exist and differ from the N-step one
METHOD_ORDER = tuple(METHODS)
FBC_RANGE = (1e-3, 16.0)
TIMING_SPREAD = 1.5
TIMING_ATTEMPTS = 3
FULL_REPEATS = 3
MAG_RANGE = (1e-4, 8.0)
MAG_CALIBRATION_PAIRS = 4
CALIBRATION_SETS = ("A", "B", "evaluation (oracle)")  # what the schedule-transfer ablation plans from


@dataclass(frozen=True)
class BenchConfig:
    """One sampling configuration: overrides on the model's call arguments (None passes None explicitly)."""

    key: str
    label: str
    overrides: dict[str, Any] = field(default_factory=dict)


CONFIGS: dict[str, BenchConfig] = {
    "plain": BenchConfig("plain", "plain (no guidance)", {"true_cfg_scale": 1.0, "negative_prompt": None}),
    "cfg": BenchConfig("cfg", "true CFG 4, empty negative prompt", {"true_cfg_scale": 4.0, "negative_prompt": ""}),
    "default": BenchConfig("default", "the model's default call arguments"),
}
MODEL_CONFIGS = ("default",)
ABLATIONS = ("kmax", "gamma", "cost", "lambdas", "estimator", "transfer_prompts")


@dataclass(frozen=True)
class BenchProfile:
    """How the bench runs one model, from the `bench:` entry of its config YAML.

    `configs`: the sampling configurations (the embedded models were trained with prompt dropout and run both
    plain and under true CFG; a real model runs its own defaults, with guidance). `prompt_set`: `shapes` for
    the embedded models' trained vocabulary, `generic` otherwise. `skip`: peers the model cannot run (a
    transformer without blocks gives diffusers' block caches nothing to hook). `resolution_transfer`: whether
    the model runs at twice its size. `ablations`: the ablation tables at B = 10 (calibration set B is run only
    for `transfer_prompts`). `note`: why anything is left out, for the report.
    """

    configs: tuple[str, ...] = MODEL_CONFIGS
    prompt_set: str = "generic"
    skip: tuple[str, ...] = ()
    resolution_transfer: bool = True
    ablations: tuple[str, ...] = ABLATIONS
    note: str = ""

    @classmethod
    def of(cls, spec: ModelSpec) -> BenchProfile:
        """The profile in `spec.bench`; an unknown key or value is a one-line error naming the config."""
        from ..errors import MeanCacheError

        entry = dict(spec.bench or {})
        where = f"the bench entry of model {spec.family or spec.name}'s config"
        unknown = sorted(set(entry) - {f.name for f in fields(cls)})
        if unknown:
            names = ", ".join(f.name for f in fields(cls))
            raise MeanCacheError(f"{where} has unknown key {unknown[0]!r}: use {names}")
        for name in ("configs", "skip", "ablations"):
            if name in entry:
                entry[name] = tuple(entry[name])
        profile = cls(**entry)
        choices = {"configs": CONFIGS, "skip": METHODS, "ablations": ABLATIONS}
        for name, allowed in choices.items():
            bad = [value for value in getattr(profile, name) if value not in allowed]
            if bad:
                raise MeanCacheError(f"{where}: {name} holds {bad[0]!r}: use some of {', '.join(allowed)}")
        if "meancache" in profile.skip or not profile.configs:
            raise MeanCacheError(f"{where}: it must run MeanCache in at least one configuration")
        return profile


@dataclass(frozen=True)
class Stage:
    """One stage of a configuration as the progress shows it, and the pipeline calls it makes: exactly, or up to
    that many with `at_most` (a validation learns how many candidate schedules are distinct only by planning)."""

    name: str
    calls: int
    at_most: bool = False


@dataclass
class BenchSettings:
    """Everything that decides what the bench runs (and so how many pipeline calls it makes)."""

    model: str
    steps: int
    budgets: tuple[int, ...]
    quick: bool
    repeats: int
    prompts: BenchPrompts
    call_kwargs: dict[str, Any]
    search_iterations: int
    stress_budget: int | None
    ablation_budget: int
    configs: tuple[BenchConfig, ...] = (CONFIGS["default"],)
    fine_steps: int = 0
    kmax_values: tuple[int, ...] = (0, 1)
    gamma_values: tuple[float, ...] = (0.0, 0.5, 2.0, 4.0, 8.0)
    cost_values: tuple[str, ...] = ("velocity", "displacement")
    lambda_sets: tuple[tuple[float, ...], ...] = ((1.0,), (0.5,), (0.5, 1.0))
    uniform_jvp_lambdas: tuple[float, ...] = (1.0, 0.5)
    transfer_resolution: tuple[int, int] | None = None
    resolution_pairs: list[tuple[str, int]] = field(default_factory=list)
    resolution_calibration: PromptSet | None = None
    methods: tuple[str, ...] = METHOD_ORDER
    ablation_tables: tuple[str, ...] = ABLATIONS
    candidates: tuple[defaults.Recipe, ...] = defaults.CANDIDATES
    profile: BenchProfile = field(default_factory=BenchProfile)

    @property
    def calibrates_b(self) -> bool:
        """Calibration set B serves only the schedule-transfer ablation."""
        return "transfer_prompts" in self.ablation_tables

    @property
    def all_budgets(self) -> tuple[int, ...]:
        extra = (self.stress_budget,) if self.stress_budget and self.stress_budget not in self.budgets else ()
        return tuple(self.budgets) + extra

    def config_kwargs(self, config: BenchConfig) -> dict[str, Any]:
        return {**self.call_kwargs, **config.overrides}

    def methods_at(self, budget: int) -> tuple[str, ...]:
        """The methods that exist at `budget` (the authors publish schedules at a few budgets only)."""
        return tuple(key for key in self.methods
                     if key != "release" or release_schedule(self.model, self.steps, budget) is not None)

    def search_calls(self, budget: int) -> int:
        """Calls spent choosing the dynamic caches' settings at `budget` (threshold bisections, TaylorSeer's order)."""
        methods = self.methods_at(budget)
        return (sum(self.search_iterations for key in ("fbcache", "magcache") if key in methods)
                + 2 * ("taylorseer" in methods))

    def stages(self, config: BenchConfig) -> list[Stage]:
        """The stages of one configuration in the order `Bench.run_config` runs them, with the pipeline calls each
        makes: the plan the progress total is summed from and every stage is held to as it runs."""
        evaluation = len(self.prompts.evaluation.pairs())
        calibration_a = len(self.prompts.calibration_a.pairs())
        steps = f"{self.steps} and {self.fine_steps} steps"
        # The N-step and fine references, and the calibration pair TaylorSeer's order is scored against.
        stages = [Stage(f"references ({evaluation} pairs, {steps})", 2 * evaluation + ("taylorseer" in self.methods))]
        runs = [calibration_a]
        if self.calibrates_b:  # set B and the oracle (the evaluation runs themselves) serve that ablation only
            runs += [len(self.prompts.calibration_b.pairs()), evaluation]
        mag = min(calibration_a, MAG_CALIBRATION_PAIRS) if "magcache" in self.methods else 0
        stages.append(Stage(f"calibration ({' + '.join(map(str, runs))} runs{', MagCache ratios' if mag else ''})",
                            sum(runs) + mag))
        # Each distinct candidate schedule on at most every run calibration set A holds out (`planning.validate`).
        held = holdout_count(None, calibration_a, len(self.prompts.calibration_a.prompts))
        for budget in self.all_budgets:
            methods = len(self.methods_at(budget))
            stages += [
                Stage(f"B = {budget}: validating the plan (up to {len(self.candidates)} candidate schedules on {held} "
                      f"held-out run{'s' if held != 1 else ''})", len(self.candidates) * held, at_most=True),
                Stage(f"B = {budget}: search and evaluation", self.search_calls(budget) + methods * evaluation),
                Stage(f"B = {budget}: timing ({self.repeats} runs per method)", self.repeats * (1 + methods)),
            ]
        variants = sum(map(len, ablation_variants(self).values()))
        stages.append(Stage(f"ablations at B = {self.ablation_budget}", variants * evaluation))
        if self.transfer_resolution and config == self.configs[0]:
            pairs = len(self.resolution_pairs)
            # Calibration and references at the target size, then the three rows of `Bench.resolution_transfer`.
            stages.append(Stage("resolution transfer", len(self.resolution_calibration.pairs()) + pairs + 3 * pairs))
        return stages

    def units(self) -> int:
        """Pipeline calls the bench makes: the total of its progress bar."""
        return sum(stage.calls for config in self.configs for stage in self.stages(config))


def bench_settings(
    model: str = "demo",
    quick: bool = False,
    budgets: tuple[int, ...] | None = None,
    steps: int | None = None,
    repeats: int | None = None,
    height: int | None = None,
    width: int | None = None,
    call_kwargs: dict[str, Any] | None = None,
    prompt_set: str | None = None,
    configs: tuple[str, ...] | None = None,
) -> tuple[BenchSettings, ModelSpec]:
    """Resolve the model and build the settings; fails fast on bad options, before any model loads."""
    from ..errors import UsageError

    spec = resolve_model(model)
    steps = steps or spec.steps
    budgets = tuple(budgets) if budgets else (QUICK_BUDGETS if quick else DEFAULT_BUDGETS)
    for budget in (*budgets, ABLATION_BUDGET):
        if not 1 <= budget <= steps:
            raise UsageError(f"budget {budget} is out of range: use budgets between 1 and --steps {steps}")
    if repeats is not None and repeats < 1:
        raise UsageError(f"repeats {repeats} is invalid: use 1 or more")
    profile = BenchProfile.of(spec)
    configs = tuple(configs) if configs else profile.configs
    unknown = [key for key in configs if key not in CONFIGS]
    if unknown or len(set(configs)) != len(configs):
        raise UsageError(f"configurations {', '.join(configs)} are invalid: use distinct ones of {', '.join(CONFIGS)}")
    prompt_set = prompt_set or profile.prompt_set
    prompts = bench_prompts(prompt_set, quick, spec.calibration_prompts or None)
    prompts.check_disjoint()
    kwargs = reference_run_kwargs(spec, steps, height, width, None, dict(call_kwargs or {}))
    settings = BenchSettings(
        model=spec.name, steps=steps, budgets=budgets, quick=quick, repeats=repeats or FULL_REPEATS,
        prompts=prompts, call_kwargs=kwargs, search_iterations=6 if quick else 8,
        stress_budget=None if quick else STRESS_BUDGET, ablation_budget=ABLATION_BUDGET,
        configs=tuple(CONFIGS[key] for key in configs),
        fine_steps=(QUICK_FINE_FACTOR if quick else FINE_FACTOR) * steps,
        methods=tuple(key for key in METHOD_ORDER if key not in profile.skip), ablation_tables=profile.ablations,
        profile=profile,
    )
    if quick:
        settings.kmax_values, settings.gamma_values = (0, 1), (0.5, 4.0)
        settings.uniform_jvp_lambdas = (1.0,)
    elif profile.resolution_transfer and kwargs.get("height") and kwargs.get("width"):
        evaluation = prompts.evaluation
        settings.transfer_resolution = (2 * kwargs["height"], 2 * kwargs["width"])
        settings.resolution_pairs = PromptSet(evaluation.prompts[:2], evaluation.seeds).pairs()
        settings.resolution_calibration = PromptSet(prompts.calibration_a.prompts, prompts.calibration_a.seeds[:1])
    return settings, spec


def bench_units(**options: Any) -> int:
    """The progress total of `run_bench(**options)`: `options` are `bench_settings`'s."""
    return bench_settings(**options)[0].units()


@dataclass
class Run:
    """One generation: its decoded output, final latents, evaluations per guidance branch, wall time."""

    images: list[Any]
    latents: torch.Tensor
    nfe: float
    seconds: float


@dataclass
class References:
    """The evaluation pairs of one configuration and what every method is measured against there
    (`fine` empty where no fine reference was run)."""

    pairs: list[tuple[str, int]]
    images: list[Any]
    latents: list[torch.Tensor]
    fine: list[torch.Tensor]

    def accuracy(self) -> list[float]:
        """The N-step reference's own error: its latent PSNR against the fine reference."""
        return [latent_psnr(x, fine) for x, fine in zip(self.latents, self.fine)]


def uniform_jvp_schedule(model: str, steps: int, budget: int, damping: float) -> Schedule:
    """Evenly spaced compute steps with MeanCache's estimator (K = 1, damping λ) on every edge after the first."""
    schedule = uniform_schedule(model, steps, budget)
    orders = [0] + [1] * (budget - 1)
    return replace(schedule, orders=orders, lambdas=[damping * k for k in orders],
                   kinds=["jvp" if k and damping else "reuse" for k in orders])


@dataclass(frozen=True)
class Variant:
    """One row of an ablation table: the default recipe with one setting changed. `schedule` plans it from the
    configuration's calibrations by set name (A, B, evaluation (oracle)); `extra` records the setting."""

    name: str
    schedule: Callable[[dict[str, Calibration]], Schedule]
    extra: dict[str, Any] = field(default_factory=dict)


def ablation_variants(settings: BenchSettings) -> dict[str, list[Variant]]:
    """The rows of every ablation table the settings ask for, at the ablation budget."""
    budget = settings.ablation_budget

    def planned(name: str, calibration: str = "A", extra: dict[str, Any] | None = None, **options: Any) -> Variant:
        """Planned from `calibration` with `options` changed; `extra` records them (default: the options)."""
        return Variant(name, lambda sets: plan_schedule(sets[calibration], budget, **options),
                       dict(options) if extra is None else extra)

    def uniform(damping: float) -> Variant:
        return Variant(f"uniform steps, K = 1, λ = {damping:g}",
                       lambda sets: uniform_jvp_schedule(settings.model, settings.steps, budget, damping))

    tables = {
        "kmax": [planned(f"Kmax = {k}", kmax=k) for k in settings.kmax_values],
        "gamma": [planned(f"γ = {g:g}", gamma=g) for g in settings.gamma_values],
        "cost": [planned(f"{cost} cost", cost=cost) for cost in settings.cost_values],
        "lambdas": [planned("λ ∈ {" + ", ".join(f"{v:g}" for v in values) + "}", lambdas=values,
                            extra={"lambdas_allowed": list(values)}) for values in settings.lambda_sets],
        "estimator": [planned("planned schedule (default)"), *map(uniform, settings.uniform_jvp_lambdas)],
        "transfer_prompts": [planned(f"planned on {name}", name, extra={"calibration": name})
                             for name in CALIBRATION_SETS],
    }
    return {name: tables[name] for name in settings.ablation_tables}


class Bench:
    """One benchmark run: owns the pipeline, the evaluation counter and the results gathered so far."""

    def __init__(self, settings: BenchSettings, spec: ModelSpec, pipe: Any, advance: Callable[[], None],
                 stage: Callable[[str], None]) -> None:
        self.settings = settings
        self.spec = spec
        self.pipe = pipe
        self.progress = advance
        self.announce = stage
        self.made = 0  # pipeline calls made so far, which every stage is held to (`running`)
        # Counted where diffusers' block caches cannot fake a forward: the same count for every method.
        self.counter = apply_evaluation_counter(pipe, beneath_block_caches=True)
        self.branches = 1
        self.results: list[dict[str, Any]] = []
        self.grid: dict[str, dict[str, list[Any]]] = {}
        self.variant_cache: dict[tuple, tuple[dict[str, Any], list[Any]]] = {}

    def advance(self) -> None:
        """One pipeline call done (or, planned but answered from a cache, skipped)."""
        self.made += 1
        self.progress()

    @contextmanager
    def running(self, tag: str, stage: Stage, phases: dict[str, float]) -> Iterator[None]:
        """Announce and time `stage`, and hold it to its planned calls: a mismatch is a plan out of step with the
        runner (an error, so a wrong progress total cannot go unseen); an `at_most` stage's unused calls are
        advanced."""
        name = f"{tag}: {stage.name}"
        self.announce(name)
        made, mark = self.made, time.perf_counter()
        yield
        made = self.made - made
        if made > stage.calls or (made < stage.calls and not stage.at_most):
            raise RuntimeError(f"bench stage '{name}' made {made} pipeline calls where BenchSettings.stages "
                               f"plans {stage.calls}")
        for _ in range(stage.calls - made):
            self.advance()
        phases[name] = time.perf_counter() - mark

    # -- pipeline calls -------------------------------------------------------------------------------

    def call(self, method: Method | None, prompt: str, seed: int, kwargs: dict[str, Any],
             output_type: str = "pil", tick: bool = True, steps: int | None = None) -> Run:
        """One generation, with `method` installed around it (uncached for None, `steps` or N steps).

        The final latents come from diffusers' `callback_on_step_end` after the last step, while the
        pipeline still decodes its output as usual.
        """
        final: dict[str, torch.Tensor] = {}

        def keep_latents(pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict:
            final["latents"] = callback_kwargs["latents"]
            return {}

        if method is not None:
            steps = method.steps
        kwargs = {**kwargs, "num_inference_steps": steps or kwargs["num_inference_steps"]}
        before = self.counter.evaluations
        with method.applied(self.pipe) if method is not None else nullcontext():
            start = time.perf_counter()
            result = self.pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed),
                               output_type=output_type, callback_on_step_end=keep_latents, **kwargs)
            seconds = time.perf_counter() - start
        if tick:
            self.advance()
        images = result.frames if hasattr(result, "frames") else result.images
        latents = final["latents"].detach().float().cpu().clone()
        return Run(list(images), latents, (self.counter.evaluations - before) / self.branches, seconds)

    def evaluate(self, method: Method, references: References, kwargs: dict[str, Any]
                 ) -> tuple[dict[str, Any], list[Any]]:
        """NFE, decoded PSNR and SSIM, latent PSNR and (with fine references) accuracy of `method` on every pair."""
        runs: dict[str, list[float]] = {"nfe": [], "psnr": [], "ssim": [], "latent_psnr": []}
        if references.fine:
            runs["accuracy"] = []
        images = []
        for index, (prompt, seed) in enumerate(references.pairs):
            run = self.call(method, prompt, seed, kwargs)
            decoded = compare(run.images[0], references.images[index])
            runs["nfe"].append(run.nfe)
            runs["psnr"].append(decoded[0])
            runs["ssim"].append(decoded[1])
            runs["latent_psnr"].append(latent_psnr(run.latents, references.latents[index]))
            if references.fine:
                runs["accuracy"].append(latent_psnr(run.latents, references.fine[index]))
            images.append(run.images[0])
        summary: dict[str, Any] = {}
        for name, values in runs.items():
            summary[name] = float(np.mean(values))
            summary[f"{name}_runs"] = values
        return summary, images

    # -- calibration and references ----------------------------------------------------------------

    def calibrate(self, prompts: PromptSet, kwargs: dict[str, Any], holdout: int | None = None) -> Calibration:
        """`calibration.run_calibration`, as `meancache calibrate` runs it (its first runs held out by default)."""
        ticks = {"steps": 0}

        def on_step() -> None:
            ticks["steps"] += 1
            if ticks["steps"] % kwargs["num_inference_steps"] == 0:
                self.advance()

        return run_calibration(self.pipe, self.spec.name, prompts.prompts, prompts.seeds, kwargs, on_step=on_step,
                               holdout=holdout)

    def references(self, pairs: list[tuple[str, int]], kwargs: dict[str, Any], fine: bool = True) -> References:
        """Uncached N-step outputs and, with `fine`, the fine (`fine_steps`) latents."""
        runs = [self.call(None, prompt, seed, kwargs) for prompt, seed in pairs]
        fine_latents = [self.call(None, prompt, seed, kwargs, output_type="latent", steps=self.settings.fine_steps
                                  ).latents for prompt, seed in pairs] if fine else []
        return References(pairs, [run.images[0] for run in runs], [run.latents for run in runs], fine_latents)

    def count_branches(self, prompt: str, seed: int, kwargs: dict[str, Any]) -> int:
        """Model evaluations per sampler step of the uncached pipeline (true CFG: 2), from one short run."""
        before = self.counter.evaluations
        steps = 2
        self.pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent",
                  **{**kwargs, "num_inference_steps": steps})
        return max(1, round((self.counter.evaluations - before) / steps))

    # -- methods ---------------------------------------------------------------------------------------

    def validated_plan(self, calibration: Calibration, budget: int) -> Schedule:
        """MeanCache's schedule at `budget`: `planning.plan` with this pipeline, which plans every candidate recipe
        and keeps the one that does best on the calibration's held-out runs (its record in `validation`); each
        held-out run of each distinct candidate schedule is one pipeline call."""
        return plan(calibration, budget, pipe=self.pipe, candidates=self.settings.candidates, on_run=self.advance)

    def schedules(self, budget: int, calibration: Calibration, validated: Schedule) -> dict[str, Schedule]:
        """The schedule-based methods' plans at `budget` from one calibration (MeanCache's: `validated`)."""
        steps = self.settings.steps
        costs = edge_costs(calibration.errors, calibration.sigmas, "displacement").reuse
        path = minmax_path(costs, budget)
        minmax = Schedule(model=calibration.model, num_inference_steps=steps, compute_steps=path.compute_steps,
                          orders=path.orders, gamma=0.0, cost="displacement", predicted_cost=path.objective,
                          edge_costs=path.edge_costs, height=calibration.height, width=calibration.width)
        return {
            "meancache": validated,
            "meancache_default": plan(calibration, budget),
            "reuse": uniform_schedule(calibration.model, steps, budget),
            "planner_k0": plan_schedule(calibration, budget, kmax=0),
            "minmax": minmax,
        }

    def build_methods(self, budget: int, calibration: Calibration, validated: Schedule, calibration_ref: Any,
                      mag_ratios: list[float], kwargs: dict[str, Any]) -> list[Method]:
        """Every method at `budget`; the dynamic caches searched on the first calibration pair."""
        steps = self.settings.steps
        keys = self.settings.methods_at(budget)
        plans = self.schedules(budget, calibration, validated)
        prompt, seed = self.settings.prompts.calibration_a.pairs()[0]
        iterations = self.settings.search_iterations

        def nfe_of(method: Method) -> float:
            return self.call(method, prompt, seed, kwargs, output_type="latent", tick=False).nfe

        meancache, default = plans["meancache"], plans["meancache_default"]
        built = {
            "meancache": meancache_method("meancache", meancache, gamma=meancache.gamma, cost=meancache.cost,
                                          predicted_cost=meancache.predicted_cost,
                                          recipe=meancache.validation["chosen"]),
            "meancache_default": meancache_method("meancache_default", default, gamma=default.gamma, cost=default.cost,
                                                  predicted_cost=default.predicted_cost,
                                                  recipe=defaults.RECIPE.name),
            "euler": euler_method(budget),
            "unipc": solver_method("unipc", budget),
            "dpmpp": solver_method("dpmpp", budget),
            "reuse": meancache_method("reuse", plans["reuse"]),
            "planner_k0": meancache_method("planner_k0", plans["planner_k0"],
                                           predicted_cost=plans["planner_k0"].predicted_cost),
            "minmax": meancache_method("minmax", plans["minmax"], largest_edge_cost=plans["minmax"].predicted_cost),
            "authors": authors_method(release_on_schedule(meancache)),
        }
        if "fbcache" in keys:
            threshold, probes = bisect_threshold(
                lambda threshold: nfe_of(fbcache_method(budget, steps, threshold)), budget, *FBC_RANGE, iterations,
                self.advance)
            built["fbcache"] = fbcache_method(budget, steps, threshold)
            built["fbcache"].settings["search"] = [[p.threshold, p.nfe] for p in probes]
        if "magcache" in keys:
            threshold, probes = bisect_threshold(
                lambda threshold: nfe_of(magcache_method(budget, steps, threshold, mag_ratios)), budget, *MAG_RANGE,
                iterations, self.advance)
            built["magcache"] = magcache_method(budget, steps, threshold, mag_ratios)
            built["magcache"].settings["search"] = [[p.threshold, p.nfe] for p in probes]
        if "taylorseer" in keys:
            scores = {}
            for order in (1, 2):
                run = self.call(taylorseer_method(budget, steps, order), prompt, seed, kwargs)
                scores[order] = compare(run.images[0], calibration_ref)[0]
            built["taylorseer"] = taylorseer_method(budget, steps, max(scores, key=scores.__getitem__))
            built["taylorseer"].settings["order_search_psnr"] = {str(k): v for k, v in scores.items()}
        release = release_schedule(self.settings.model, steps, budget)
        if release is not None:
            built["release"] = authors_method(release, key="release")
        return [built[key] for key in keys]

    def time_methods(self, methods: list[Method], kwargs: dict[str, Any]
                     ) -> tuple[list[float], dict[str, list[float]], int]:
        """Round-robin timed runs on the first evaluation pair (every method already ran: warm).

        When another process loads the CPU, a run can take many times its usual time: if any series
        spreads more than `TIMING_SPREAD` (slowest / fastest), the round-robin runs again, up to
        `TIMING_ATTEMPTS` times, and the steadiest attempt is kept. Retries do not advance the progress.
        """
        prompt, seed = self.settings.prompts.evaluation.pairs()[0]
        attempts = []
        for attempt in range(TIMING_ATTEMPTS):
            uncached: list[float] = []
            timed: dict[str, list[float]] = {method.key: [] for method in methods}
            for _ in range(self.settings.repeats):
                uncached.append(self.call(None, prompt, seed, kwargs, tick=attempt == 0).seconds)
                for method in methods:
                    timed[method.key].append(self.call(method, prompt, seed, kwargs, tick=attempt == 0).seconds)
            spread = max(max(series) / min(series) for series in (uncached, *timed.values()))
            attempts.append((spread, uncached, timed))
            if spread <= TIMING_SPREAD:
                break
        _, uncached, timed = min(attempts, key=lambda entry: entry[0])
        return uncached, timed, len(attempts)

    # -- the bench -------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        settings = self.settings
        prompts = settings.prompts
        started = time.perf_counter()
        phases: dict[str, float] = {}
        configs, ablations = [], {}
        for config in settings.configs:
            summary, ablations[config.key] = self.run_config(config, phases)
            configs.append(summary)
        return {
            "model": settings.model, "steps": settings.steps, "budgets": list(settings.budgets),
            "stress_budget": settings.stress_budget, "ablation_budget": settings.ablation_budget,
            "fine_steps": settings.fine_steps, "quick": settings.quick, "repeats": settings.repeats,
            "call_kwargs": {k: v for k, v in settings.call_kwargs.items() if k != "num_inference_steps"},
            "configs": configs,
            "prompts": {"calibration_a": prompts.calibration_a.as_dict(),
                        **({"calibration_b": prompts.calibration_b.as_dict()} if settings.calibrates_b else {}),
                        "evaluation": prompts.evaluation.as_dict()},
            "left_out": {"methods": [METHODS[key].label for key in METHOD_ORDER if key not in settings.methods],
                         "ablations": [name for name in ABLATIONS if name not in settings.ablation_tables],
                         "resolution_transfer": not settings.profile.resolution_transfer,
                         "note": settings.profile.note},
            "methods": {key: {"label": METHODS[key].label, "family": METHODS[key].family,
                              "description": METHODS[key].description} for key in settings.methods},
            "results": self.results,
            "ablations": ablations,
            "environment": environment(),
            "runtime_seconds": time.perf_counter() - started,
            "phase_seconds": phases,
        }

    def run_config(self, config: BenchConfig, phases: dict[str, float]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Calibration, references, every budget and the ablations of one configuration, stage by stage as
        `BenchSettings.stages` plans them."""
        settings = self.settings
        prompts = settings.prompts
        kwargs = settings.config_kwargs(config)
        pairs = prompts.evaluation.pairs()
        tag = config.key
        planned = iter(settings.stages(config))

        def stage() -> AbstractContextManager[None]:
            return self.running(tag, next(planned), phases)

        with stage():
            self.branches = 1
            self.branches = self.count_branches(*pairs[0], kwargs)
            references = self.references(pairs, kwargs)
            calibration_ref = None
            if "taylorseer" in settings.methods:
                calibration_ref = self.references(prompts.calibration_a.pairs()[:1], kwargs, fine=False).images[0]
        with stage():
            calibrations = {"A": self.calibrate(prompts.calibration_a, kwargs)}
            if settings.calibrates_b:
                calibrations["B"] = self.calibrate(prompts.calibration_b, kwargs)
                calibrations["evaluation (oracle)"] = self.calibrate(prompts.evaluation, kwargs, holdout=0)
            mag_ratios = []
            if "magcache" in settings.methods:
                mag_ratios = calibrate_mag_ratios(self.pipe, prompts.calibration_a.pairs()[:MAG_CALIBRATION_PAIRS],
                                                  kwargs, settings.steps, self.advance)
        calibration = calibrations["A"]
        grid_rows = [i for i, (_, seed) in enumerate(pairs) if seed == prompts.evaluation.seeds[0]]
        self.grid[tag] = {"reference": [references.images[i] for i in grid_rows]}
        reference_seconds: list[float] = []
        validation: dict[str, dict[str, Any]] = {}

        for budget in settings.all_budgets:
            with stage():
                validated = self.validated_plan(calibration, budget)
                validation[str(budget)] = validated.validation
            with stage():
                methods = self.build_methods(budget, calibration, validated, calibration_ref, mag_ratios, kwargs)
                rows = []
                for method in methods:
                    summary, images = self.evaluate_method(tag, method, references, kwargs)
                    rows.append({"config": tag, "budget": budget, "method": method.key, "label": method.info.label,
                                 "family": method.info.family, "stress": budget not in settings.budgets,
                                 "settings": method.settings, **summary})
                    if budget == settings.ablation_budget:
                        self.grid[tag][method.key] = [images[i] for i in grid_rows]
            with stage():
                uncached, timed, attempts = self.time_methods(methods, kwargs)
            reference_seconds += uncached
            for row in rows:
                seconds = statistics.median(timed[row["method"]])
                row.update(seconds=seconds, seconds_runs=timed[row["method"]],
                           reference_seconds=statistics.median(uncached), reference_seconds_runs=uncached,
                           speedup=statistics.median(uncached) / seconds, timing_attempts=attempts)
            self.results += rows

        with stage():
            ablations = self.ablations(tag, calibrations, references, kwargs)
        if settings.transfer_resolution and config == settings.configs[0]:
            with stage():
                ablations["resolution"] = self.resolution_transfer(tag, calibration, kwargs)
        if next(planned, None) is not None:
            raise RuntimeError(f"configuration {tag} ran fewer stages than BenchSettings.stages plans")
        accuracy = references.accuracy()
        summary = {
            "key": tag, "label": config.label,
            "call_kwargs": {k: v for k, v in kwargs.items() if k != "num_inference_steps"},
            "branches": self.branches, "mag_ratios": mag_ratios,
            "calibration": {"prompts": calibration.prompts, "seeds": calibration.seeds,
                            "trajectories": calibration.trajectories,
                            "held_out": [[run.prompt, run.seed] for run in calibration.held_out]},
            "validation": validation,
            "reference": {"nfe": settings.steps, "seconds_median": statistics.median(reference_seconds),
                          "seconds_runs": reference_seconds, "accuracy": float(np.mean(accuracy)),
                          "accuracy_runs": accuracy},
        }
        return summary, ablations

    def evaluate_method(self, tag: str, method: Method, references: References, kwargs: dict[str, Any]
                        ) -> tuple[dict[str, Any], list[Any]]:
        """`evaluate`, once per distinct (configuration, schedule run by MeanCache's hook): a schedule
        evaluated before (the validated plan when it is the default recipe's, an ablation variant equal to a
        method's) is not run again, and its calls are advanced."""
        if method.key not in SCHEDULE_METHODS:
            return self.evaluate(method, references, kwargs)
        key = (tag, *self._schedule_key(method))
        if key in self.variant_cache:
            for _ in references.pairs:
                self.advance()
            return self.variant_cache[key]
        self.variant_cache[key] = self.evaluate(method, references, kwargs)
        return self.variant_cache[key]

    @staticmethod
    def _schedule_key(method: Method) -> tuple:
        settings = method.settings
        return (tuple(settings["compute_steps"]), tuple(settings["orders"]), tuple(settings["lambdas"]),
                tuple(settings["kinds"]), settings["estimator"])

    def variant(self, tag: str, name: str, schedule: Schedule, references: References, kwargs: dict[str, Any],
                **extra: Any) -> dict[str, Any]:
        """A MeanCache schedule evaluated once per distinct (configuration, schedule)."""
        summary, _ = self.evaluate_method(tag, meancache_method("meancache", schedule), references, kwargs)
        return {"variant": name, "compute_steps": list(schedule.compute_steps), "orders": list(schedule.orders),
                "lambdas": list(schedule.lambdas), "kinds": list(schedule.kinds),
                "predicted_cost": schedule.predicted_cost, **extra, **summary}

    def ablations(self, tag: str, calibrations: dict[str, Calibration], references: References,
                  kwargs: dict[str, Any]) -> dict[str, Any]:
        """Every ablation table of `ablation_variants`, evaluated on the evaluation pairs."""
        return {"budget": self.settings.ablation_budget,
                **{name: [self.variant(tag, v.name, v.schedule(calibrations), references, kwargs, **v.extra)
                          for v in variants] for name, variants in ablation_variants(self.settings).items()}}

    def resolution_transfer(self, tag: str, calibration: Calibration, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Planned at the model's resolution vs at the target one, both evaluated at the target."""
        settings = self.settings
        height, width = settings.transfer_resolution
        budget = settings.ablation_budget
        high = {**kwargs, "height": height, "width": width}
        calibration_high = self.calibrate(settings.resolution_calibration, high)
        references = self.references(settings.resolution_pairs, high, fine=False)
        base = f"{kwargs.get('height')}x{kwargs.get('width')}"
        size = f"{height}x{width}"
        rows = [
            self.variant(f"{tag}@{size}", f"MeanCache planned at {base}", plan_schedule(calibration, budget),
                         references, high, planned_at=base),
            self.variant(f"{tag}@{size}", f"MeanCache planned at {size}", plan_schedule(calibration_high, budget),
                         references, high, planned_at=size),
        ]
        summary, _ = self.evaluate(euler_method(budget), references, high)
        rows.append({"variant": f"Euler, {budget} steps", **summary})
        return {"budget": budget, "evaluated_at": size, "planned_base": base, "config": tag,
                "pairs": [list(p) for p in settings.resolution_pairs],
                "calibration_high": settings.resolution_calibration.as_dict(), "rows": rows}


def environment() -> dict[str, Any]:
    import diffusers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "diffusers": diffusers.__version__,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def run_bench(
    out_dir: Path | str = DEFAULT_OUT,
    *,
    report_path: Path | str | None = None,
    command: str | None = None,
    device: str = "cpu",
    pipe: Any = None,
    advance: Callable[[], None] | None = None,
    stage: Callable[[str], None] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Run the whole benchmark of `bench_settings(**options)` (model, quick, budgets, steps, repeats, size, call
    arguments, prompt set, configurations) and write its outputs under `out_dir`; returns the raw results.

    Writes `results.json`, `pareto.png`, `grid_<configuration>_B<ablation budget>.png` to `out_dir` and the markdown
    report to `report_path` (default: docs/benchmarks.md for out_dir docs/bench, else
    out_dir/benchmarks.md). `advance` is called once per pipeline call; `bench_units(...)` with the
    same options is its exact total. `stage` is told the name of each stage as it starts.
    """
    import diffusers

    from ..errors import UsageError
    from .report import distributions, write_outputs

    stage = stage or (lambda name: None)
    out_dir = Path(out_dir)
    report_path = Path(report_path) if report_path is not None else default_report_path(out_dir)
    settings, spec = bench_settings(**options)
    for directory in (out_dir, report_path.parent):
        directory.mkdir(parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK):
            raise UsageError(f"--out {directory} is not writable; choose another directory")
    command = command or default_command(options.get("model", "demo"), settings.quick, out_dir)
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    started = time.perf_counter()
    try:
        pipe = pipe if pipe is not None else load_pipeline(spec, device=device)
        bench = Bench(settings, spec, pipe, advance or (lambda: None), stage)
        try:
            with warnings.catch_warnings():
                # Library deprecation notices would tear through the progress bar on stderr.
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", FutureWarning)
                results = bench.run()
        finally:
            remove_evaluation_counter(pipe)
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    results["distributions"] = distributions(results)
    results["command"] = command
    results["total_seconds"] = time.perf_counter() - started
    stage("writing the report")
    write_outputs(results, bench.grid, out_dir, report_path)
    return results


def default_report_path(out_dir: Path | str) -> Path:
    """docs/benchmarks.md for the default docs/bench, docs/benchmarks-NAME.md for docs/bench-NAME (`make bench`
    writes docs/bench-hard), else OUT/benchmarks.md."""
    out, default = Path(out_dir).resolve(), DEFAULT_OUT.resolve()
    if out.parent == default.parent and (out.name == default.name or out.name.startswith(f"{default.name}-")):
        return DEFAULT_OUT.parent / f"benchmarks{out.name.removeprefix(default.name)}.md"
    return Path(out_dir) / "benchmarks.md"


def default_command(model: str, quick: bool, out_dir: Path) -> str:
    return " ".join(["meancache bench", f"--model {model}", *(["--quick"] if quick else []), f"--out {out_dir}"])

