"""`run_bench`: MeanCache against every peer, on one model, prompts and seeds, in one process.

Order of work: calibrate (set A, set B, MagCache's ratios), reference runs on the evaluation set,
then per budget: plan or search every method, generate the evaluation set, time them round-robin
against the uncached pipeline; then the ablations at B = 10. Every pipeline call advances the
progress callback once, so `bench_units` is the exact total of a progress bar.
"""

from __future__ import annotations

import inspect
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..calibrate import MapSettings, calibrate, reference_run_kwargs
from ..core.stability import StabilityMaps, edge_costs
from ..files import Calibration, Schedule
from ..hooks import apply_recorder, remove_recorder
from ..models.registry import ModelSpec, load_pipeline, resolve_model
from ..plan import plan_schedule, uniform_schedule
from .authors import release_on_schedule
from .metrics import compare
from .minmax import minmax_path
from .peers import (
    METHODS,
    FullEvaluationCounter,
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
METHOD_ORDER = tuple(METHODS)
FBC_RANGE = (1e-3, 16.0)
TIMING_SPREAD = 1.5
TIMING_ATTEMPTS = 3
MAG_RANGE = (1e-4, 8.0)


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
    kmax_values: tuple[int, ...] = (0, 1)
    gamma_values: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0)
    cost_variants: tuple[tuple[str, float], ...] = (("displacement", 0.5), ("velocity", 0.5), ("velocity", 0.0))
    transfer_resolution: tuple[int, int] | None = None
    resolution_pairs: list[tuple[str, int]] = field(default_factory=list)
    resolution_calibration: PromptSet | None = None
    methods: tuple[str, ...] = METHOD_ORDER

    @property
    def all_budgets(self) -> tuple[int, ...]:
        extra = (self.stress_budget,) if self.stress_budget and self.stress_budget not in self.budgets else ()
        return tuple(self.budgets) + extra

    def ablation_variants(self) -> int:
        return (len(self.kmax_values) + len(self.gamma_values) + len(self.cost_variants) + 3)

    def resolution_variants(self) -> int:
        return 3 if self.transfer_resolution else 0

    def units(self) -> int:
        """Pipeline calls the bench makes: the total of its progress bar."""
        evaluation = len(self.prompts.evaluation.pairs())
        per_budget = (2 * self.search_iterations + 2 + len(self.methods) * evaluation
                      + self.repeats * (1 + len(self.methods)))
        resolution = 0
        if self.transfer_resolution:
            resolution = (len(self.resolution_calibration.pairs()) + len(self.resolution_pairs)
                          + self.resolution_variants() * len(self.resolution_pairs))
        return (2 * len(self.prompts.calibration_a.pairs()) + len(self.prompts.calibration_b.pairs())
                + evaluation + 1 + len(self.all_budgets) * per_budget
                + self.ablation_variants() * evaluation + resolution)


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
    prompt_set = prompt_set or ("shapes" if spec.name == "demo" else "generic")
    prompts = bench_prompts(prompt_set, quick, spec.calibration_prompts or None)
    prompts.check_disjoint()
    kwargs = reference_run_kwargs(spec, steps, height, width, None, dict(call_kwargs or {}))
    settings = BenchSettings(
        model=spec.name, steps=steps, budgets=budgets, quick=quick, repeats=repeats or (1 if quick else 5),
        prompts=prompts, call_kwargs=kwargs, search_iterations=6 if quick else 8,
        stress_budget=None if quick else STRESS_BUDGET, ablation_budget=ABLATION_BUDGET,
    )
    if quick:
        settings.kmax_values, settings.gamma_values = (0, 1), (0.5, 4.0)
        settings.cost_variants = (("displacement", 0.5), ("velocity", 0.5))
    elif kwargs.get("height") and kwargs.get("width"):
        evaluation = prompts.evaluation
        settings.transfer_resolution = (2 * kwargs["height"], 2 * kwargs["width"])
        settings.resolution_pairs = PromptSet(evaluation.prompts[:2], evaluation.seeds).pairs()
        settings.resolution_calibration = PromptSet(prompts.calibration_a.prompts, prompts.calibration_a.seeds[:1])
    return settings, spec


def bench_units(**options: Any) -> int:
    """The progress total of `run_bench(**options)` (same keyword arguments; output options ignored)."""
    allowed = inspect.signature(bench_settings).parameters
    settings, _ = bench_settings(**{k: v for k, v in options.items() if k in allowed})
    return settings.units()


@dataclass
class Run:
    images: list[Any]
    nfe: int
    seconds: float


class Bench:
    """One benchmark run: owns the pipeline, the evaluation counter and the results gathered so far."""

    def __init__(self, settings: BenchSettings, spec: ModelSpec, pipe: Any, advance: Callable[[], None]) -> None:
        self.settings = settings
        self.spec = spec
        self.pipe = pipe
        self.advance = advance
        self.counter = FullEvaluationCounter(pipe.transformer)
        self.results: list[dict[str, Any]] = []
        self.grid: dict[str, list[Any]] = {}
        self.variant_cache: dict[tuple, dict[str, Any]] = {}
        self.calibrations: dict[str, Calibration] = {}

    # -- pipeline calls -------------------------------------------------------------------------------

    def call(self, method: Method | None, prompt: str, seed: int, kwargs: dict[str, Any] | None = None,
             output_type: str = "pil", tick: bool = True) -> Run:
        """One generation, with `method` installed around it (uncached N steps for None)."""
        kwargs = {**(kwargs or self.settings.call_kwargs)}
        kwargs["num_inference_steps"] = method.steps if method is not None else kwargs["num_inference_steps"]
        before = self.counter.count
        with method.applied(self.pipe) if method is not None else nullcontext():
            start = time.perf_counter()
            result = self.pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed),
                               output_type=output_type, **kwargs)
            seconds = time.perf_counter() - start
        if tick:
            self.advance()
        images = result.frames if hasattr(result, "frames") else result.images
        return Run(list(images), self.counter.count - before, seconds)

    def evaluate(self, method: Method, pairs: list[tuple[str, int]], references: list[Any],
                 kwargs: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[Any]]:
        """NFE, PSNR and SSIM of `method` on every pair against its uncached reference."""
        nfe, psnrs, ssims, images = [], [], [], []
        for (prompt, seed), reference in zip(pairs, references):
            run = self.call(method, prompt, seed, kwargs)
            quality = compare(run.images[0], reference)
            nfe.append(run.nfe)
            psnrs.append(quality[0])
            ssims.append(quality[1])
            images.append(run.images[0])
        summary = {"nfe": float(np.mean(nfe)), "nfe_runs": nfe, "psnr": float(np.mean(psnrs)), "psnr_runs": psnrs,
                   "ssim": float(np.mean(ssims)), "ssim_runs": ssims}
        return summary, images

    # -- calibration -----------------------------------------------------------------------------------

    def calibrate(self, prompts: PromptSet, kwargs: dict[str, Any] | None = None) -> Calibration:
        kwargs = kwargs or self.settings.call_kwargs
        ticks = {"steps": 0}

        def on_step() -> None:
            ticks["steps"] += 1
            if ticks["steps"] % kwargs["num_inference_steps"] == 0:
                self.advance()

        return calibrate(self.pipe, self.spec, prompts.prompts, prompts.seeds, kwargs,
                         on_step=on_step)

    def references(self, pairs: list[tuple[str, int]], kwargs: dict[str, Any] | None = None,
                   record: bool = False) -> tuple[list[Any], Calibration | None]:
        """Uncached outputs; with `record`, also the stability maps of these very runs (the oracle)."""
        recorder = apply_recorder(self.pipe) if record else None
        maps: StabilityMaps | None = None
        images = []
        try:
            for prompt, seed in pairs:
                images.append(self.call(None, prompt, seed, kwargs).images[0])
                if recorder is not None:
                    if maps is None:
                        maps = MapSettings().maps(self.pipe.scheduler.sigmas.double().cpu().numpy())
                    for trajectory in recorder.trajectories():
                        maps.add(trajectory.x0, trajectory.velocities)
        finally:
            if recorder is not None:
                remove_recorder(self.pipe)
        if maps is None:
            return images, None
        kwargs = kwargs or self.settings.call_kwargs
        oracle = Calibration(
            model=self.spec.name, pipeline_class=type(self.pipe).__name__, sigmas=np.asarray(maps.sigmas),
            errors=maps.errors(), step_statistics=maps.step_statistics(),
            prompts=sorted({p for p, _ in pairs}), seeds=sorted({s for _, s in pairs}),
            height=kwargs.get("height"), width=kwargs.get("width"), trajectories=maps.count)
        return images, oracle

    # -- methods ---------------------------------------------------------------------------------------

    def schedules(self, budget: int, calibration: Calibration) -> dict[str, Schedule]:
        """The schedule-based methods' plans at `budget` from one calibration."""
        steps = self.settings.steps
        costs = edge_costs(calibration.errors, calibration.sigmas, "displacement").reuse
        path = minmax_path(costs, budget)
        minmax = Schedule(model=calibration.model, num_inference_steps=steps, compute_steps=path.compute_steps,
                          orders=path.orders, gamma=0.0, cost="displacement", predicted_cost=path.objective,
                          edge_costs=path.edge_costs, height=calibration.height, width=calibration.width)
        return {
            "meancache": plan_schedule(calibration, budget),
            "reuse": uniform_schedule(calibration.model, steps, budget),
            "planner_k0": plan_schedule(calibration, budget, kmax=0),
            "minmax": minmax,
        }

    def build_methods(self, budget: int, calibration_ref: Any, mag_ratios: list[float]) -> list[Method]:
        """Every method at `budget`; the dynamic caches searched on the first calibration pair."""
        steps = self.settings.steps
        plans = self.schedules(budget, self.calibrations["A"])
        prompt, seed = self.settings.prompts.calibration_a.pairs()[0]
        iterations = self.settings.search_iterations

        def nfe_of(method: Method) -> int:
            return self.call(method, prompt, seed, output_type="latent", tick=False).nfe

        fbc_threshold, fbc_probes = bisect_threshold(
            lambda threshold: nfe_of(fbcache_method(budget, steps, threshold)), budget, *FBC_RANGE, iterations,
            self.advance)
        mag_threshold, mag_probes = bisect_threshold(
            lambda threshold: nfe_of(magcache_method(budget, steps, threshold, mag_ratios)), budget, *MAG_RANGE,
            iterations, self.advance)
        taylor_scores = {}
        for order in (1, 2):
            run = self.call(taylorseer_method(budget, steps, order), prompt, seed)
            taylor_scores[order] = compare(run.images[0], calibration_ref)[0]
        taylor_order = max(taylor_scores, key=taylor_scores.__getitem__)

        built = {
            "meancache": meancache_method("meancache", plans["meancache"], gamma=0.5, cost="displacement",
                                          predicted_cost=plans["meancache"].predicted_cost),
            "euler": euler_method(budget),
            "unipc": solver_method("unipc", budget),
            "dpmpp": solver_method("dpmpp", budget),
            "reuse": meancache_method("reuse", plans["reuse"]),
            "planner_k0": meancache_method("planner_k0", plans["planner_k0"],
                                           predicted_cost=plans["planner_k0"].predicted_cost),
            "minmax": meancache_method("minmax", plans["minmax"], largest_edge_cost=plans["minmax"].predicted_cost),
            "authors": authors_method(release_on_schedule(plans["meancache"])),
            "fbcache": fbcache_method(budget, steps, fbc_threshold),
            "taylorseer": taylorseer_method(budget, steps, taylor_order),
            "magcache": magcache_method(budget, steps, mag_threshold, mag_ratios),
        }
        built["fbcache"].settings["search"] = [[p.threshold, p.nfe] for p in fbc_probes]
        built["magcache"].settings["search"] = [[p.threshold, p.nfe] for p in mag_probes]
        built["taylorseer"].settings["order_search_psnr"] = {str(k): v for k, v in taylor_scores.items()}
        return [built[key] for key in self.settings.methods]

    def time_methods(self, methods: list[Method]) -> tuple[list[float], dict[str, list[float]], int]:
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
                uncached.append(self.call(None, prompt, seed, tick=attempt == 0).seconds)
                for method in methods:
                    timed[method.key].append(self.call(method, prompt, seed, tick=attempt == 0).seconds)
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
        started = mark = time.perf_counter()
        phases: dict[str, float] = {}
        self.calibrations["A"] = self.calibrate(prompts.calibration_a)
        self.calibrations["B"] = self.calibrate(prompts.calibration_b)
        mag_ratios = calibrate_mag_ratios(self.pipe, prompts.calibration_a.pairs(), settings.call_kwargs,
                                          settings.steps, self.advance)
        pairs = prompts.evaluation.pairs()
        references, oracle = self.references(pairs, record=True)
        self.calibrations["evaluation (oracle)"] = oracle
        calibration_ref = self.references(prompts.calibration_a.pairs()[:1])[0][0]
        grid_rows = [i for i, (_, seed) in enumerate(pairs) if seed == prompts.evaluation.seeds[0]]
        self.grid["reference"] = [references[i] for i in grid_rows]
        reference_seconds: list[float] = []
        phases["calibration and references"] = time.perf_counter() - mark

        for budget in settings.all_budgets:
            mark = time.perf_counter()
            methods = self.build_methods(budget, calibration_ref, mag_ratios)
            rows = []
            for method in methods:
                summary, images = self.evaluate(method, pairs, references)
                rows.append({"budget": budget, "method": method.key, "label": method.info.label,
                             "family": method.info.family, "stress": budget not in settings.budgets,
                             "settings": method.settings, **summary})
                if budget == settings.ablation_budget:
                    self.grid[method.key] = [images[i] for i in grid_rows]
                    if method.key in ("meancache", "planner_k0"):
                        self.variant_cache[("meancache", *self._schedule_key(method))] = summary
            phases[f"B={budget}: search and evaluation"] = time.perf_counter() - mark
            mark = time.perf_counter()
            uncached, timed, attempts = self.time_methods(methods)
            phases[f"B={budget}: timing"] = time.perf_counter() - mark
            reference_seconds += uncached
            for row in rows:
                seconds = statistics.median(timed[row["method"]])
                row.update(seconds=seconds, seconds_runs=timed[row["method"]],
                           reference_seconds=statistics.median(uncached), reference_seconds_runs=uncached,
                           speedup=statistics.median(uncached) / seconds, timing_attempts=attempts)
            self.results += rows

        mark = time.perf_counter()
        ablations = self.ablations(pairs, references)
        phases[f"ablations B={settings.ablation_budget}"] = time.perf_counter() - mark
        mark = time.perf_counter()
        ablations["resolution"] = self.resolution_transfer()
        phases["resolution transfer"] = time.perf_counter() - mark
        return {
            "model": settings.model, "steps": settings.steps, "budgets": list(settings.budgets),
            "stress_budget": settings.stress_budget, "ablation_budget": settings.ablation_budget,
            "quick": settings.quick, "repeats": settings.repeats,
            "call_kwargs": {k: v for k, v in settings.call_kwargs.items() if k != "num_inference_steps"},
            "prompts": {"calibration_a": prompts.calibration_a.as_dict(),
                        "calibration_b": prompts.calibration_b.as_dict(),
                        "evaluation": prompts.evaluation.as_dict()},
            "methods": {key: {"label": METHODS[key].label, "family": METHODS[key].family,
                              "description": METHODS[key].description} for key in settings.methods},
            "reference": {"nfe": settings.steps, "seconds_median": statistics.median(reference_seconds),
                          "seconds_runs": reference_seconds},
            "mag_ratios": mag_ratios,
            "results": self.results,
            "ablations": ablations,
            "environment": environment(),
            "runtime_seconds": time.perf_counter() - started,
            "phase_seconds": phases,
        }

    @staticmethod
    def _schedule_key(method: Method) -> tuple:
        return tuple(method.settings["compute_steps"]), tuple(method.settings["orders"])

    def variant(self, name: str, schedule: Schedule, pairs: list[tuple[str, int]], references: list[Any],
                kwargs: dict[str, Any] | None = None, tag: str = "", **extra: Any) -> dict[str, Any]:
        """A MeanCache schedule evaluated once per distinct (compute steps, orders, setting)."""
        method = meancache_method("meancache", schedule)
        key = ("meancache", *self._schedule_key(method), *((tag,) if tag else ()))
        if key in self.variant_cache:
            for _ in pairs:
                self.advance()
            summary = self.variant_cache[key]
        else:
            summary, _ = self.evaluate(method, pairs, references, kwargs)
            self.variant_cache[key] = summary
        return {"variant": name, "compute_steps": list(schedule.compute_steps), "orders": list(schedule.orders),
                "predicted_cost": schedule.predicted_cost, **extra, **summary}

    def ablations(self, pairs: list[tuple[str, int]], references: list[Any]) -> dict[str, Any]:
        budget = self.settings.ablation_budget
        calibration = self.calibrations["A"]
        out: dict[str, Any] = {"budget": budget}
        out["kmax"] = [self.variant(f"Kmax = {k}", plan_schedule(calibration, budget, kmax=k), pairs, references,
                                    kmax=k) for k in self.settings.kmax_values]
        out["gamma"] = [self.variant(f"γ = {g:g}", plan_schedule(calibration, budget, gamma=g), pairs, references,
                                     gamma=g) for g in self.settings.gamma_values]
        out["cost"] = [self.variant(f"{cost}, γ = {g:g}", plan_schedule(calibration, budget, gamma=g, cost=cost),
                                    pairs, references, cost=cost, gamma=g) for cost, g in self.settings.cost_variants]
        out["transfer_prompts"] = [
            self.variant(f"planned on {name}", plan_schedule(self.calibrations[name], budget), pairs, references,
                         calibration=name, calibration_prompts=self.calibrations[name].prompts,
                         calibration_seeds=self.calibrations[name].seeds)
            for name in ("A", "B", "evaluation (oracle)")]
        return out

    def resolution_transfer(self) -> dict[str, Any] | None:
        """Planned at the model's resolution vs at the target one, both evaluated at the target."""
        settings = self.settings
        if not settings.transfer_resolution:
            return None
        height, width = settings.transfer_resolution
        budget = settings.ablation_budget
        kwargs = {**settings.call_kwargs, "height": height, "width": width}
        calibration_high = self.calibrate(settings.resolution_calibration, kwargs)
        pairs = settings.resolution_pairs
        references, _ = self.references(pairs, kwargs)
        base = f"{settings.call_kwargs.get('height')}x{settings.call_kwargs.get('width')}"
        rows = [
            self.variant(f"MeanCache planned at {base}", plan_schedule(self.calibrations["A"], budget), pairs,
                         references, kwargs, tag=f"{height}x{width}", planned_at=base),
            self.variant(f"MeanCache planned at {height}x{width}", plan_schedule(calibration_high, budget), pairs,
                         references, kwargs, tag=f"{height}x{width}", planned_at=f"{height}x{width}"),
        ]
        summary, _ = self.evaluate(euler_method(budget), pairs, references, kwargs)
        rows.append({"variant": f"Euler, {budget} steps", **summary})
        return {"budget": budget, "evaluated_at": f"{height}x{width}", "planned_base": base,
                "pairs": [list(p) for p in pairs],
                "calibration_high": settings.resolution_calibration.as_dict(), "rows": rows}


def environment() -> dict[str, Any]:
    import diffusers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "diffusers": diffusers.__version__,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def run_bench(
    model: str = "demo",
    out_dir: Path | str = DEFAULT_OUT,
    quick: bool = False,
    budgets: tuple[int, ...] | None = None,
    steps: int | None = None,
    *,
    repeats: int | None = None,
    height: int | None = None,
    width: int | None = None,
    call_kwargs: dict[str, Any] | None = None,
    prompt_set: str | None = None,
    report_path: Path | str | None = None,
    command: str | None = None,
    device: str = "cpu",
    pipe: Any = None,
    advance: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run the whole benchmark and write its outputs under `out_dir`; returns the raw results.

    Writes `results.json`, `pareto.png`, `grid_B<ablation budget>.png` to `out_dir` and the markdown
    report to `report_path` (default: docs/benchmarks.md for out_dir docs/bench, else
    out_dir/benchmarks.md). `advance` is called once per pipeline call; `bench_units(...)` with the
    same options is its exact total.
    """
    import diffusers

    from ..errors import UsageError
    from .report import write_outputs

    out_dir = Path(out_dir)
    report_path = Path(report_path) if report_path is not None else default_report_path(out_dir)
    settings, spec = bench_settings(model, quick, budgets, steps, repeats, height, width, call_kwargs, prompt_set)
    for directory in (out_dir, report_path.parent):
        directory.mkdir(parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK):
            raise UsageError(f"--out {directory} is not writable; choose another directory")
    command = command or default_command(model, quick, out_dir)
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    started = time.perf_counter()
    try:
        pipe = pipe if pipe is not None else load_pipeline(spec, device=device)
        bench = Bench(settings, spec, pipe, advance or (lambda: None))
        try:
            with warnings.catch_warnings():
                # Library deprecation notices would tear through the progress bar on stderr.
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", FutureWarning)
                results = bench.run()
        finally:
            bench.counter.remove()
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    results["command"] = command
    results["total_seconds"] = time.perf_counter() - started
    write_outputs(results, bench.grid, out_dir, report_path)
    return results


def default_report_path(out_dir: Path | str) -> Path:
    """docs/benchmarks.md for the default docs/bench, else OUT/benchmarks.md."""
    if Path(out_dir).resolve() == DEFAULT_OUT.resolve():
        return DEFAULT_OUT.parent / "benchmarks.md"
    return Path(out_dir) / "benchmarks.md"


def default_command(model: str, quick: bool, out_dir: Path) -> str:
    return " ".join(["meancache bench", f"--model {model}", *(["--quick"] if quick else []), f"--out {out_dir}"])

