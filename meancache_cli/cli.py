"""The `meancache` command: parse, call the library, print. Results go to stdout, progress to stderr."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from . import defaults, options, progress
from .errors import INTERRUPTED_EXIT, Interrupted, MeanCacheError, UsageError, as_flags, describe, raise_on_signals

app = typer.Typer(
    cls=options.Group, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Training-free average-velocity caching for diffusers flow-matching pipelines.",
)
stderr = Console(stderr=True)
DEBUG = {"on": False}


@app.callback()
def main_options(debug: options.DebugOption = False, version: options.VersionOption = False) -> None:
    DEBUG["on"] = debug
    if not debug:
        # Libraries' FutureWarnings and notices are for their developers, not for someone running a command.
        warnings.simplefilter("ignore")


def progress_bar(description: str, total: int | None, enabled: bool = True) -> Any:
    """`progress.progress_bar` on stderr."""
    return progress.progress_bar(stderr, description, total, enabled)


def emit(data: dict[str, Any], as_json: bool, text: str, to_stderr: bool = False) -> None:
    """Print the result: JSON on stdout, or human text on stdout (stderr when stdout carries a file)."""
    if as_json:
        print(json.dumps(data))
    elif to_stderr:
        stderr.print(text, highlight=False, soft_wrap=True)
    else:
        print(text)


def warn(message: str | None) -> None:
    """One line on stderr, like errors; nothing for None."""
    if message is not None:
        stderr.print(f"warning: {message}", style="yellow", highlight=False, soft_wrap=True)


def load(spec: Any, device: str, dtype: str | None, offload: bool, call_kwargs: dict[str, Any]) -> Any:
    """Load a resolved model behind a spinner, check the image size it will run at and print what the
    loader noticed; returns the pipeline."""
    from .models.loading import check_image_size, load_model

    with stderr.status(f"loading {spec.name}", spinner="dots"):
        _, pipe, notices = load_model(spec, device, dtype, offload)
    check_image_size(pipe, call_kwargs.get("height"), call_kwargs.get("width"))
    for notice in notices:
        warn(notice)
    return pipe


@app.command(cls=options.Command)
def calibrate(
    out: options.CalibrationOutOption,
    model: options.ModelOption = defaults.MODEL,
    prompt: options.CalibrationPromptOption = None, prompts: options.PromptsFileOption = None,
    seeds: options.SeedsOption = None,
    steps: options.ModelStepsOption = None,
    height: options.HeightOption = None, width: options.WidthOption = None, frames: options.FramesOption = None,
    max_back: options.MaxBackOption = defaults.MAX_BACK,
    lambdas: options.MeasuredLambdasOption = options.LAMBDAS_TEXT,
    max_elements: options.MaxElementsOption = defaults.MAX_ELEMENTS,
    holdout: options.HoldoutOption = None,
    runs: options.RunsOption = None, max_runs: options.MaxRunsOption = defaults.AUTO_MAX_RUNS,
    true_cfg_scale: options.CfgOption = None, negative_prompt: options.NegativeOption = None,
    guidance_scale: options.GuidanceOption = None,
    resume: options.ResumeOption = False,
    device: options.DeviceOption = defaults.DEVICE, dtype: options.DtypeOption = None,
    offload: options.OffloadOption = False,
    as_json: options.JsonOption = False,
) -> None:
    """Run the uncached pipeline on a few prompts and seeds and record its error maps."""
    from .calibration import MapSettings, PlanStability, calibrate_to_file, reference_run_kwargs
    from .distributed import current_world
    from .models.registry import resolve_model

    options.check_map_options(max_back, max_elements, runs)
    settings = MapSettings(max_back, options.parse_lambdas(lambdas), max_elements or None)
    to_stdout = options.check_output(out, as_json)
    spec = resolve_model(model)
    steps = steps if steps is not None else spec.steps
    options.check_steps(steps)
    prompt_list = options.read_prompts(prompt or [], prompts, spec.calibration_prompts)
    if not prompt_list:
        raise UsageError("no calibration prompt: pass --prompt TEXT or --prompts FILE")
    seed_list = options.parse_seeds(seeds) if seeds is not None else spec.calibration_seeds
    warn(options.vocabulary_warning(spec, prompt_list))
    options.check_frames(spec, frames)
    options.check_size(height, width)
    kwargs = reference_run_kwargs(spec, steps, height, width, frames,
                                  options.guidance_kwargs(true_cfg_scale, negative_prompt, guidance_scale))
    world = current_world()
    pipe = load(spec, world.device(device), dtype, offload, kwargs)
    auto = runs == "auto"

    def stability(figure: Any) -> None:
        stderr.print(f"after {figure.map_runs} map runs: plan regret {100 * figure.regret:.1f} %, "
                     f"{figure.shared_steps}/{figure.budget} compute steps shared", highlight=False)

    written = calibrate_to_file(
        out, pipe, spec.name, prompt_list, seed_list, kwargs, settings, holdout=holdout,
        auto_max_runs=max_runs if auto else None, resume=resume, world=world, on_stability=stability,
        progress=lambda runs: progress_bar(f"calibrating {spec.name}: {'up to ' if auto else ''}{runs} runs",
                                           runs * steps, enabled=world.is_main))
    if written is None:
        return
    calibration, reused = written.calibration, written.reused
    made = len(prompt_list) * len(calibration.seeds)
    summary = {"output": str(out), "model": spec.name, "steps": steps, "max_back": calibration.max_back,
               "lambdas": list(settings.lambdas), "runs": made, "held_out": len(calibration.held_out),
               "seeds": calibration.seeds, "reused": reused, "trajectories": calibration.trajectories,
               "elements": calibration.elements, "processes": world.size, "stability": calibration.stability}
    text = (f"wrote {out}: {made} reference runs ({len(calibration.held_out)} held out for validation, "
            f"{calibration.trajectories} trajectories in the maps), N={steps}, look-back {calibration.max_back}, "
            f"λ {lambdas}" + (f"; {reused} of the runs were reused from the interrupted calibration" if resume else ""))
    if calibration.stability is not None:
        text += "\nplan stability: " + PlanStability(**calibration.stability).describe()
    emit(summary, as_json, text, to_stderr=to_stdout)


@app.command("plan", cls=options.Command)
def plan(
    calibration: options.CalibrationFileOption,
    budget: options.BudgetOption,
    model: options.ValidateModelOption = None,
    gamma: options.GammaOption = None, cost: options.CostOption = None, lambdas: options.PlanLambdasOption = None,
    exponential: options.ExponentialOption = None,
    max_skip: options.MaxSkipOption = None, kmax: options.KmaxOption = defaults.KMAX,
    steps: options.PlanStepsOption = None,
    device: options.DeviceOption = defaults.DEVICE, dtype: options.DtypeOption = None,
    out: options.ScheduleOutOption = defaults.PLAN_OUT,
    as_json: options.JsonOption = False,
) -> None:
    """Choose the compute steps: the cheapest path with exactly BUDGET model evaluations, validated on held-out
    calibration runs when --model is given."""
    from .files import load_calibration, reference_from, save_schedule
    from .inspection import schedule_text
    from .planning import plan as make_plan

    to_stdout = options.check_output(out, as_json)
    if steps is not None:
        options.check_steps(steps)
    cal = load_calibration(calibration)
    recipe = {"cost": cost, "gamma": gamma, "exponential": exponential,
              "lambdas": options.parse_lambdas(lambdas) if lambdas is not None else None}
    pipe = None
    if model is not None:
        from .models.registry import resolve_model

        spec = resolve_model(model)
        if cal.model not in (spec.name, spec.family):
            raise UsageError(f"the calibration is of model '{cal.model}', not '{spec.name}': pass --model {cal.model}")
        pipe = load(spec, device, dtype, False, cal.call_kwargs)
    with progress_bar("validating on held-out runs", None, enabled=pipe is not None) as advance:
        schedule = make_plan(cal, budget, pipe, max_skip=max_skip, kmax=kmax, calibration_path=calibration,
                             on_run=advance, steps=steps, **recipe)
    if schedule.calibration is not None and not to_stdout:
        schedule = replace(schedule, calibration={**schedule.calibration, "path": reference_from(out, calibration)})
    save_schedule(schedule, out)
    steps = schedule.num_inference_steps
    summary = {"output": out, "budget": schedule.budget, "num_inference_steps": steps,
               "compute_steps": schedule.compute_steps, "orders": schedule.orders, "lambdas": schedule.lambdas,
               "kinds": schedule.kinds, "cost": schedule.cost, "gamma": schedule.gamma,
               "edge_costs": schedule.edge_costs, "predicted_cost": schedule.predicted_cost,
               "speedup_ideal": steps / schedule.budget, "validation": schedule.validation}
    emit(summary, as_json, schedule_text(schedule), to_stderr=to_stdout)


app.command("schedule", cls=options.Command, help="Alias of plan.")(plan)


@app.command(cls=options.Command)
def generate(
    out: options.GenerateOutOption,
    prompt: options.PromptOption = None,
    prompts: options.BatchPromptsOption = None, batch_size: options.BatchSizeOption = defaults.BATCH_SIZE,
    context_parallel: options.ContextParallelOption = None,
    model: options.ModelOption = defaults.MODEL,
    schedule: options.ScheduleOption = None, budget: options.ShippedBudgetOption = None,
    no_cache: options.NoCacheOption = False,
    steps: options.GenerateStepsOption = None, strict_schedule: options.StrictScheduleOption = False,
    seed: options.SeedOption = defaults.SEED,
    height: options.HeightOption = None, width: options.WidthOption = None, frames: options.FramesOption = None,
    fps: options.FpsOption = None,
    true_cfg_scale: options.CfgOption = None, negative_prompt: options.NegativeOption = None,
    guidance_scale: options.GuidanceOption = None,
    compare: options.CompareOption = False, repeat: options.RepeatOption = defaults.REPEAT,
    device: options.DeviceOption = defaults.DEVICE, dtype: options.DtypeOption = None,
    offload: options.OffloadOption = False,
    as_json: options.JsonOption = False,
) -> None:
    """Generate an image or a video, running the model only at the schedule's compute steps."""
    from .batch import generate_batch, plan_jobs
    from .calibration import reference_run_kwargs
    from .distributed import current_world, enable_context_parallel
    from .files import load_schedule, shipped_schedule_for
    from .generate import check_schedule, compare_with_uncached, provenance, save_output
    from .generate import generate as run_generation
    from .models.registry import resolve_model

    options.check_generate_options(schedule, budget, no_cache, prompt, prompts, repeat, batch_size)
    spec = resolve_model(model)
    if budget is not None:
        schedule = shipped_schedule_for(spec.family or spec.name, budget)
    options.check_frames(spec, frames)
    prompt_list, out, fallback = options.generate_outputs(spec, prompt, prompts, out, fps)
    warn(fallback)
    options.check_seed(seed, count=len(prompt_list))
    options.check_size(height, width)
    plan = load_schedule(schedule) if schedule is not None else None
    steps = steps if steps is not None else (plan.num_inference_steps if plan else spec.steps)
    options.check_steps(steps)
    kwargs = reference_run_kwargs(spec, steps, height, width, frames,
                                  options.guidance_kwargs(true_cfg_scale, negative_prompt, guidance_scale))
    if plan is not None:
        for message in check_schedule(plan, spec.name, steps, kwargs.get("height"), kwargs.get("width"),
                                      spec.family, strict_schedule):
            warn(message)
    warn(options.vocabulary_warning(spec, prompt_list))
    world = current_world()
    pipe = load(spec, world.device(device), dtype, offload, kwargs)
    if context_parallel is not None:
        enable_context_parallel(pipe, context_parallel, world)
    if prompts is not None:
        jobs = plan_jobs(prompt_list, seed, out, ".png" if spec.fps is None else ".gif")
        done = generate_batch(
            pipe, spec, jobs, kwargs, plan, out, batch_size, world, fps, strict=strict_schedule,
            progress=lambda left: progress_bar(f"generating {left} outputs", left, enabled=world.is_main))
        if done is not None:
            emit(done, as_json, f"wrote {done.pop('written')} outputs to {out} (manifest.jsonl); "
                 f"{done['generated']} generated here")
        return
    with progress_bar("generating", steps) as advance:
        result = run_generation(pipe, prompt, seed, kwargs, plan, on_step=advance, strict=strict_schedule)
    video = {"frames": len(result.images[0])} if spec.fps is not None else {}
    summary = {"output": str(out), "nfe": result.nfe, "steps": steps, "seconds": result.seconds,
               "model": spec.name, "seed": seed, "cached": plan is not None, **video}
    save_output(result.images[0], out, spec, fps,
                provenance(plan, model=spec.name, prompt=prompt, seed=seed, steps=steps, nfe=result.nfe, **video))
    text = f"wrote {out}: {result.nfe} model evaluations for {steps} steps in {result.seconds:.2f} s"
    if compare and plan is not None:
        with progress_bar("timing cached vs uncached", 2 * repeat + 2) as advance:
            summary.update(compare_with_uncached(pipe, prompt, seed, kwargs, plan, result.images[0], repeat,
                                                 on_run=advance, strict=strict_schedule))
        text += (f"\nuncached: {summary['reference_nfe']} evaluations; speed-up {summary['speedup']:.2f}x "
                 f"(median of {repeat}); PSNR {summary['psnr']:.2f} dB, SSIM {summary['ssim']:.3f} vs uncached"
                 f"\n{summary['euler_steps']}-step Euler ({summary['euler_nfe']} evaluations, as cached): "
                 f"PSNR {summary['euler_psnr']:.2f} dB vs uncached")
    emit(summary, as_json, text)


@app.command(cls=options.Command)
def bench(
    model: options.ModelOption = defaults.MODEL,
    quick: Annotated[bool, typer.Option("--quick", help="Smoke run: few prompts, B = 10, 3 timed runs each.")] = False,
    out: Annotated[Path, typer.Option("--out", help="Directory for results.json and figures.")] = Path("docs/bench"),
    report: Annotated[Path | None, typer.Option(
        "--report", help=("Markdown report (default docs/benchmarks.md for --out docs/bench, "
                          "docs/benchmarks-NAME.md for docs/bench-NAME, else OUT/benchmarks.md)."))] = None,
    budgets: Annotated[str | None, typer.Option(
        help="Comma-separated budgets B (default 8,10,13,17,25; 10,17,25 with --real-size).")] = None,
    steps: Annotated[int | None, typer.Option(help="Sampler steps N (model default if omitted).")] = None,
    repeats: Annotated[int | None, typer.Option(help="Timed runs per method (default 3).")] = None,
    device: Annotated[str | None, typer.Option(
        "--device", help="Torch device (default cpu; cuda with --real-size).")] = None,
    real_size: Annotated[bool, typer.Option("--real-size", help=(
        "Speed and memory at real size instead: FLUX.1-dev, Qwen-Image, Wan 2.1 1.3B and HunyuanVideo "
        "transformers from their published configs, random bf16 weights on CUDA, at their default size; N = 50 "
        "uncached vs MeanCache at B = 10, 17, 25 on the loop their pipeline runs, eager and with torch.compile. "
        "Writes OUT/realsize.json and the report's real-size section."))] = False,
    reduced: Annotated[bool, typer.Option(
        "--reduced", help="With --real-size: a few blocks and small latents, on any device (checks the code path).",
    )] = False,
    families: Annotated[str | None, typer.Option(
        "--families", help="With --real-size: comma-separated subset of flux,qwen-image,wan,hunyuanvideo.")] = None,
    compile_mode: Annotated[str | None, typer.Option("--compile", help=(
        "With --real-size: the compiled rows, comma-separated: regional (repeated blocks), whole (the forward), "
        "module (transformer.compile()), wrapped (torch.compile(transformer)); or none. Default: "
        "regional,module,wrapped."))] = None,
    as_json: options.JsonOption = False,
) -> None:
    """Benchmark MeanCache against every peer on one model, prompts and seeds, in one process;
    or, with --real-size, its speed and memory on full-size transformers (needs CUDA)."""
    import shlex

    from .bench.runner import bench_units, default_report_path, run_bench
    from .outputs import check_output_folder

    if not real_size and (reduced or families or compile_mode is not None):
        raise UsageError("--reduced, --families and --compile apply only with --real-size")
    check_output_folder(out)
    if real_size:
        bench_real_size(out, report, options.parse_budgets(budgets), steps, repeats, device, reduced, families,
                        compile_mode, quick, model, as_json)
        return
    out.mkdir(exist_ok=True)
    report = report or default_report_path(out)
    command = "meancache " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    settings = {"budgets": options.parse_budgets(budgets), "steps": steps, "repeats": repeats}
    total = bench_units(model=model, quick=quick, **settings)
    with progress.stage_progress(stderr, f"benchmarking {model}", total) as (advance, stage):
        results = run_bench(out, report_path=report, command=command, advance=advance, stage=stage,
                            device=device or defaults.DEVICE, model=model, quick=quick, **settings)
    emit({"report": str(report), "out": str(out), "budgets": sorted(results.get("budgets", []))}, as_json,
         f"wrote {report} and {out}/")


def bench_real_size(out: Path, report: Path | None, budgets: tuple[int, ...] | None, steps: int | None,
                    repeats: int | None, device: str | None, reduced: bool, families: str | None,
                    compile_mode: str | None, quick: bool, model: str, as_json: bool) -> None:
    """`bench --real-size`: measure, merge into OUT/realsize.json, rewrite the report's real-size section."""
    from .bench.realsize import DEFAULT_COMPILE, run_real_size
    from .bench.realsize_report import summary, write_real_size
    from .bench.runner import default_report_path

    if quick or model != defaults.MODEL:
        raise UsageError("--quick and --model do not apply to --real-size: use --repeats 1 and --families")
    report = report or default_report_path(out)
    results = run_real_size(families, device, reduced, steps, budgets, repeats, compile_mode or DEFAULT_COMPILE,
                            log=lambda line: stderr.print(line, highlight=False),
                            on_result=lambda partial: write_real_size(partial, out, report))
    rows, text = summary(results)
    emit({"report": str(report), "results": str(out / "realsize.json"), "rows": rows}, as_json,
         f"{text}\nwrote {report} and {out / 'realsize.json'}")


@app.command("inspect", cls=options.Command)
def inspect_file(
    path: options.InspectPathArgument,
    plot: options.PlotOption = None,
    calibration: options.PlotCalibrationOption = None,
    cost: options.PlotCostOption = defaults.RECIPE.cost,
    as_json: options.JsonOption = False,
) -> None:
    """Summarize a calibration or a schedule, and plot the error map with the chosen path."""
    from .core.stability import COST_KINDS
    from .files import Schedule, load_file
    from .inspection import calibration_to_plot, summary, summary_text
    from .inspection import plot as plot_file

    if cost not in COST_KINDS:
        raise UsageError(f"--cost {cost} is unknown: use one of {', '.join(COST_KINDS)}")
    if plot is not None:
        from .outputs import check_output_directory

        check_output_directory(plot, flag="--plot")
    item = load_file(path)
    data = summary(item)
    if plot is not None:
        schedule = item if isinstance(item, Schedule) else None
        plot_file(calibration_to_plot(item, path, calibration), plot, schedule, cost)
        data["plot"] = str(plot)
    emit(data, as_json, summary_text(data))


@app.command(cls=options.Command)
def models(as_json: options.JsonOption = False) -> None:
    """List the registered models."""
    from .models.registry import registered_models

    specs = registered_models()
    rows = [{"name": s.name, "repo_id": s.repo_id, "pipeline": s.pipeline_class, "description": s.description}
            for s in specs]
    text = "\n".join(f"{r['name']:<14} {r['repo_id'] or '(embedded)':<40} {r['pipeline']}" for r in rows)
    emit({"models": rows}, as_json, text)


def fail(message: str, code: int) -> None:
    """One line on stderr, never wrapped, then exit with `code`."""
    print(message, file=sys.stderr)
    sys.exit(code)


def main() -> None:
    """Entry point: one-line errors with documented exit codes (2 usage, 1 runtime, 130 interrupted)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    # torchao, when installed, logs at import (inside `import diffusers`) the kernels it cannot load here.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    raise_on_signals()
    try:
        code = app(standalone_mode=False, prog_name="meancache")
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        fail("interrupted", INTERRUPTED_EXIT)
    except Interrupted as error:
        fail(f"interrupted: {error}", error.exit_code)
    except MeanCacheError as error:
        if DEBUG["on"]:
            raise
        fail(f"error: {as_flags(str(error))}", error.exit_code)
    except Exception as error:
        if hasattr(error, "format_message") and hasattr(error, "exit_code"):
            # typer's (vendored) click usage errors: bad option values, missing options; with no
            # arguments at all typer has printed the help already and the message is empty.
            if not error.format_message():
                sys.exit(error.exit_code)
            fail(f"error: {error.format_message()} (see --help)", error.exit_code)
        if DEBUG["on"]:
            raise
        fail(f"error: {describe(error)}", 1)
    if code == INTERRUPTED_EXIT:
        fail("interrupted", INTERRUPTED_EXIT)  # typer turns Ctrl-C into a returned exit code outside standalone mode
