"""The command line's option parsing and checks, kept beside `cli.py` so that it stays a thin shell.

These belong to the CLI, not the library: each message names a flag (`--seeds`, `--height`), while the
library's functions check their keywords in their own words (`budget=`, which the CLI turns into flags).
`cli.py` is their only user. Like it they import the library lazily, so a bad option is refused at once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .errors import MeanCacheError, UsageError

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
    """The demo model knows only its own words: which ones of `prompts` it will not understand (None: all known)."""
    if spec.name != "demo":
        return None
    from .models.demo import VOCABULARY, unknown_words

    unknown = sorted({word for prompt in prompts for word in unknown_words(prompt)})
    if not unknown:
        return None
    return f"the demo model does not know {shorten(unknown)}; its vocabulary is: {' '.join(VOCABULARY)}"


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
