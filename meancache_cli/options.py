"""The command line's options: their declarations (flag, help), parsing and checks, kept beside `cli.py` so
that it stays a thin shell (parse, call the library, print).

These belong to the CLI, not the library: each message names a flag (`--seeds`, `--height`), while the
library's functions check their keywords in their own words (`budget=`, which the CLI turns into flags).
`cli.py` is their only user. Like it they import the library lazily, so a bad option is refused at once.
The defaults the options show come from `defaults.py`, given where `cli.py` declares each parameter.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from . import defaults
from .errors import MeanCacheError, UsageError


class _BareFlags:
    """typer's help shows a flag as `--json <bool>`, as if it took a value: show flags bare."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class Command(_BareFlags, TyperCommand):
    pass


class Group(_BareFlags, TyperGroup):
    pass


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("meancache-cli")
    except PackageNotFoundError:
        return "unknown (not installed)"


def print_version(value: bool) -> None:
    """--version: print it and exit before any command runs."""
    if value:
        print(f"meancache {package_version()}")
        raise typer.Exit()


# Options before the command, and options several commands share.
DebugOption = Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")]
VersionOption = Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True,
                                             callback=print_version)]
ModelOption = Annotated[str, typer.Option("--model", help="Registered model name or local pipeline directory.")]
HeightOption = Annotated[int | None, typer.Option(help="Image height (model default if omitted).")]
WidthOption = Annotated[int | None, typer.Option(help="Image width (model default if omitted).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
CfgOption = Annotated[float | None, typer.Option("--true-cfg-scale", help="True CFG scale (needs a negative prompt).")]
NegativeOption = Annotated[str | None, typer.Option("--negative-prompt", help="Negative prompt for true CFG.")]
GuidanceOption = Annotated[float | None, typer.Option("--guidance-scale", help="Embedded guidance scale.")]
DeviceOption = Annotated[str, typer.Option("--device", help="Torch device.")]
FramesOption = Annotated[int | None, typer.Option("--frames", help="Video frames (video models; default if omitted).")]
DtypeOption = Annotated[str | None, typer.Option("--dtype", help="bf16, fp16 or fp32 (default: bf16 on CUDA, fp32).")]
OffloadOption = Annotated[bool, typer.Option("--offload", help="Keep each part on the CPU until it runs.")]

# calibrate
CalibrationOutOption = Annotated[Path, typer.Option("--out", help="Calibration file to write (.safetensors).")]
CalibrationPromptOption = Annotated[list[str] | None, typer.Option(
    "--prompt", help="A calibration prompt (repeatable).")]
PromptsFileOption = Annotated[Path | None, typer.Option("--prompts", help="File with one prompt per line.")]
SeedsOption = Annotated[str | None, typer.Option(help="Comma-separated seeds (model default if omitted).")]
ModelStepsOption = Annotated[int | None, typer.Option(help="Sampler steps N (model default if omitted).")]
MaxBackOption = Annotated[int, typer.Option(
    "--max-back", help="Look-back in steps: edge costs are measured for a previous compute step up to this far "
    "before the edge.")]
LAMBDAS_TEXT = ",".join(f"{value:g}" for value in defaults.LAMBDAS)  # calibrate's default --lambdas, as typed
MeasuredLambdasOption = Annotated[str, typer.Option(help="Comma-separated JVP dampings λ in (0, 1] to measure.")]
MaxElementsOption = Annotated[int, typer.Option(
    "--max-elements", help="Measure the maps on a fixed random subset of this many latent elements (0: all).")]
HoldoutOption = Annotated[int | None, typer.Option(
    "--holdout", help=f"Runs kept out of the maps to validate plans on (default: up to {defaults.HOLDOUT}, at "
    "most a third).")]
RunsOption = Annotated[str | None, typer.Option(
    "--runs", help="auto: add seeds until plans from two halves of the runs agree (see --max-runs).")]
MaxRunsOption = Annotated[int, typer.Option("--max-runs", help="With --runs auto: the most map runs.")]
ResumeOption = Annotated[bool, typer.Option("--resume", help="Reuse the runs an interrupted calibration saved.")]

# plan
CalibrationFileOption = Annotated[str, typer.Option("--calibration", help="Calibration file, or - for stdin.")]
BudgetOption = Annotated[int, typer.Option("--budget", help="Model evaluations per generation (B).")]
ValidateModelOption = Annotated[str | None, typer.Option("--model", help=(
    "The calibrated model: validate candidate recipes by cached runs on the calibration's held-out runs and "
    "keep the best (without it: plan the default recipe, or the one the options below give)."))]
GammaOption = Annotated[float | None, typer.Option(help=(
    "Peak suppression γ ≥ 0: minimizes Σ cost^(1+γ) (0 = plain shortest path; large → min-max). "
    f"Default {defaults.RECIPE.gamma:g}."))]
CostOption = Annotated[str | None, typer.Option(
    help=f"Edge cost: velocity (E) or displacement (|Δσ|·E). Default {defaults.RECIPE.cost}.")]
PlanLambdasOption = Annotated[str | None, typer.Option(
    help="Comma-separated dampings λ the planner may use (a subset of the calibration's).")]
ExponentialOption = Annotated[bool | None, typer.Option(
    "--exp/--no-exp", help="Let edges use the exponential integrator (DPM-Solver++(2M) as a mean velocity).")]
MaxSkipOption = Annotated[int | None, typer.Option("--max-skip", help="Longest edge in steps.")]
KmaxOption = Annotated[int, typer.Option(
    help="Largest order K: 0 = velocity reuse only, 1 = the JVP from the previous compute step.")]
PlanStepsOption = Annotated[int | None, typer.Option(
    help="Sampler steps to plan for, at most the calibration's (default: the calibration's).")]
ScheduleOutOption = Annotated[str, typer.Option("--out", help="Schedule file to write, or - for stdout.")]

# generate
GenerateOutOption = Annotated[Path, typer.Option(
    "--out", help="Image (.png, .jpg, .webp) or video (.mp4, .gif) to write; a directory with --prompts.")]
PromptOption = Annotated[str | None, typer.Option("--prompt", help="The prompt.")]
BatchPromptsOption = Annotated[Path | None, typer.Option(
    "--prompts", help="File with one prompt per line: numbered outputs and manifest.jsonl in --out DIR.")]
BatchSizeOption = Annotated[int, typer.Option("--batch-size", help="Prompts per pipeline call with --prompts.")]
ContextParallelOption = Annotated[int | None, typer.Option(
    "--context-parallel", help="Split each generation across N GPUs (diffusers context parallelism, torchrun).")]
ScheduleOption = Annotated[str | None, typer.Option(
    "--schedule", help="Schedule file, - for stdin, or a shipped schedule (qwen-image/authors-b10).")]
ShippedBudgetOption = Annotated[int | None, typer.Option(
    "--budget", help="Use the shipped schedule for this model and budget (no calibration needed).")]
NoCacheOption = Annotated[bool, typer.Option("--no-cache", help="Run the uncached pipeline.")]
GenerateStepsOption = Annotated[int | None, typer.Option(
    help="Sampler steps N (the schedule's if omitted; another N runs the schedule mapped by σ).")]
StrictScheduleOption = Annotated[bool, typer.Option(
    "--strict-schedule", help="Refuse a schedule planned for other steps instead of mapping it by σ.")]
SeedOption = Annotated[int, typer.Option(help="Random seed.")]
FpsOption = Annotated[int | None, typer.Option("--fps", help="Video frames per second (model default).")]
CompareOption = Annotated[bool, typer.Option("--compare", help="Also run uncached: report speed-up and PSNR.")]
RepeatOption = Annotated[int, typer.Option(help="Timed runs per variant with --compare (median).")]

# inspect
InspectPathArgument = Annotated[str, typer.Argument(help="A calibration or a schedule file (- for stdin).")]
PlotOption = Annotated[Path | None, typer.Option("--plot", help="Write a PNG: error map, path, velocity change.")]
PlotCalibrationOption = Annotated[str | None, typer.Option(
    "--calibration", help="Calibration to draw a schedule on (default: the one it was planned from).")]
PlotCostOption = Annotated[str, typer.Option(help="Map to draw: displacement or velocity.")]



SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes seeds below 2^64


def parse_seeds(text: str) -> list[int]:
    parts = [part.strip() for part in text.split(",")]
    if not any(parts):
        raise UsageError("--seeds is empty: give comma-separated integers such as 0,1,2")
    try:
        seeds = [int(part) for part in parts]
    except ValueError:
        raise UsageError(f"--seeds '{text}' is invalid: give comma-separated integers such as 0,1,2") from None
    for seed in seeds:
        check_seed(seed, "--seeds")
    return seeds


def check_seed(seed: int, flag: str = "--seed", count: int = 1) -> None:
    """Seeds `seed` … `seed + count − 1` must all be valid torch seeds."""
    if seed < 0 or seed + count - 1 >= SEED_LIMIT:
        extra = f" (with {count} prompts, seeds up to {seed + count - 1} are used)" if count > 1 else ""
        raise UsageError(f"{flag} {seed} is out of range{extra}: use an integer from 0 to 2^64 − 1")


def read_prompts(prompts: list[str], prompts_file: Path | None, defaults: list[str]) -> list[str]:
    """The --prompt values, then the lines of --prompts FILE (`-` for stdin; `#` starts a comment)."""
    if prompts_file is not None:
        from .files import read_bytes

        raw = read_bytes(prompts_file, "--prompts")
        try:
            text: str | None = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is None or "\0" in text:
            raise MeanCacheError(f"--prompts {prompts_file} is not a UTF-8 text file: save the prompts as UTF-8 "
                                 "text, one per line")
        lines = [line.strip() for line in text.splitlines()]
        from_file = [line for line in lines if line and not line.startswith("#")]
        if not from_file:
            raise UsageError(f"--prompts {prompts_file} holds no prompt: write one prompt per line")
        prompts = [*prompts, *from_file]
    return prompts or defaults


def vocabulary_warning(spec: Any, prompts: list[str]) -> str | None:
    """The demo and hard models know only the demo's words: which ones of `prompts` they will not understand (None:
    all known)."""
    if spec.name not in ("demo", "hard"):
        return None
    from .models.demo import VOCABULARY, unknown_words

    unknown = sorted({word for prompt in prompts for word in unknown_words(prompt)})
    if not unknown:
        return None
    return f"the {spec.name} model does not know {shorten(unknown)}; its vocabulary is: {' '.join(VOCABULARY)}"


def shorten(words: list[str], count: int = 8, length: int = 24) -> str:
    """A few of `words`, each cut to `length` characters: a message never echoes a whole long prompt."""
    shown = [word if len(word) <= length else word[:length] + "…" for word in words[:count]]
    more = f" and {len(words) - count} more" if len(words) > count else ""
    return ", ".join(shown) + more


def check_steps(steps: int) -> None:
    if steps < 2:
        raise UsageError(f"--steps {steps} is too small: use 2 or more")


def check_size(height: int | None, width: int | None) -> None:
    for flag, value in (("--height", height), ("--width", width)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} {value} is invalid: use a positive number of pixels (omit it for the default)")


def check_frames(spec: Any, frames: int | None) -> None:
    if frames is not None and spec.fps is None:
        raise UsageError(f"--frames: {spec.name} makes images, not videos; leave --frames out")
    if frames is not None and frames < 1:
        raise UsageError(f"--frames {frames} is invalid: use 1 or more")


def guidance_kwargs(cfg: float | None, negative: str | None, guidance: float | None) -> dict[str, Any]:
    """Guidance options for the pipeline call; an empty negative prompt is the usual one for true CFG."""
    for flag, value in (("--true-cfg-scale", cfg), ("--guidance-scale", guidance)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UsageError(f"{flag} {value} is invalid: use a finite number ≥ 0")
    if cfg is not None and cfg > 1 and negative is None:
        raise UsageError('--true-cfg-scale needs --negative-prompt: true CFG runs the negative prompt as a branch '
                         '(--negative-prompt "" is the usual one)')
    return {"true_cfg_scale": cfg, "negative_prompt": negative, "guidance_scale": guidance}


def parse_lambdas(text: str) -> tuple[float, ...]:
    """Comma-separated dampings in (0, 1], sorted."""
    try:
        values = sorted({float(part) for part in text.split(",")})
    except ValueError:
        values = []
    if not values or not all(0 < value <= 1 for value in values):
        raise UsageError(f"--lambdas {text!r} is invalid: give comma-separated dampings in (0, 1], e.g. 0.5,1")
    return tuple(values)


def parse_budgets(text: str | None) -> tuple[int, ...] | None:
    """bench's --budgets: comma-separated integers (None when not given)."""
    if text is None:
        return None
    try:
        budgets = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"--budgets '{text}' is invalid: give comma-separated integers such as 8,10,13") from None
    if not budgets:
        raise UsageError("--budgets is empty: give comma-separated integers such as 8,10,13")
    return budgets


def check_map_options(max_back: int, max_elements: int, runs: str | None) -> None:
    """calibrate's --max-back, --max-elements and --runs."""
    if max_back < 1:
        raise UsageError(f"--max-back {max_back} is invalid: use 1 or more")
    if max_elements < 0:
        raise UsageError(f"--max-elements {max_elements} is invalid: use 0 (all elements) or more")
    if runs not in (None, "auto"):
        raise UsageError(f"--runs {runs} is invalid: use --runs auto, or give the runs as --prompt/--seeds")


def check_output(out: str | Path, as_json: bool) -> bool:
    """--out FILE can be written; returns whether it is stdout, which --json cannot share."""
    from .files import writes_to_stdout
    from .outputs import check_output_directory

    to_stdout = writes_to_stdout(out)
    if as_json and to_stdout:
        raise UsageError(f"--json and --out {out} both write to stdout: give --out FILE with --json")
    check_output_directory(out)
    return to_stdout


def generate_outputs(spec: Any, prompt: str | None, prompts: Path | None, out: Path,
                     fps: int | None) -> tuple[list[str], Path, str | None]:
    """generate's prompts and where they go: the lines of --prompts FILE into the folder --out, or the one --prompt
    into the file --out (a video's may change, the third value says why); and --fps."""
    from .outputs import check_output_folder, check_output_path, video_output_path

    video = spec.fps is not None
    if prompts is not None:
        prompt_list = read_prompts([], prompts, [])
        check_output_folder(out)
    else:
        check_output_path(out, video=video)
    if fps is not None and fps < 1:
        raise UsageError(f"--fps {fps} is invalid: use 1 or more")
    if video and prompts is None:
        out, fallback = video_output_path(out)
        return [prompt], out, fallback
    return (prompt_list if prompts is not None else [prompt]), out, None


def check_generate_options(schedule: str | None, budget: int | None, no_cache: bool, prompt: str | None,
                           prompts: Path | None, repeat: int, batch_size: int) -> None:
    """generate's choices that exclude each other or need one another, and its counts."""
    if sum((schedule is not None, budget is not None, no_cache)) > 1:
        raise UsageError("--schedule, --budget and --no-cache exclude each other: pass one")
    if schedule is None and budget is None and not no_cache:
        raise UsageError("no schedule: pass --schedule FILE (from 'meancache plan'), --budget B (a shipped schedule) "
                         "or --no-cache")
    if (prompt is None) == (prompts is None):
        raise UsageError("pass either --prompt TEXT (one output) or --prompts FILE (a directory of outputs)")
    for flag, value in (("--repeat", repeat), ("--batch-size", batch_size)):
        if value < 1:
            raise UsageError(f"{flag} {value} is invalid: use 1 or more")
