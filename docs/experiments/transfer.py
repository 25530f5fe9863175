"""Calibrate once, run anywhere: what a schedule loses at another step count or resolution (issue 17).

Latent PSNR against the uncached run at the same step count and size, on held-out (prompt, seed) pairs, for

- steps: N′ ∈ {20, 28, 40}, B = N′/5 and N′/3 rounded (and B = 8 at N′ = 28):
    native     planned from a calibration at N′ steps (the reference point),
    from-50    planned at N′ from the 50-step calibration, maps read by σ (linear; nearest as an ablation),
    mapped-50  the 50-step schedule at the same B, run at N′ with its compute steps moved by σ;
- sizes: 50 steps, B = 10 and 17, a schedule planned at one size run at the other, by σ (what generate
  does) and by index (--strict-schedule), against one planned at that size;

each plain and under true CFG 4, with B-step Euler for scale. Every cached run is checked to make exactly
B evaluations per branch. Loss = native − variant, mean over pairs (median and worst pair beside it).

Run: python docs/experiments/transfer.py [--model demo] [--sizes 32,64] > docs/experiments/transfer.log
For another embedded model (e.g. --model hard) the prompt set follows the bench (`shapes` for the demo,
`generic` otherwise): pass --prompt-set shapes for a model that draws the demo's shapes.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import diffusers
import torch

from meancache_cli.bench.prompts import PROMPT_SETS
from meancache_cli.calibration import MapSettings, reference_run_kwargs, run_calibration
from meancache_cli.files import Schedule
from meancache_cli.generate import generate
from meancache_cli.hooks import ScheduleMappedWarning
from meancache_cli.metrics import latent_psnr
from meancache_cli.models.registry import load_pipeline, resolve_model
from meancache_cli.planning import plan_schedule, schedule_on_sigmas

CAL_SEEDS = [1000, 1001]
EVAL_SEEDS = [0, 1]
STEPS = (20, 28, 40)
BASE_STEPS = 50


def budgets(steps: int) -> list[int]:
    chosen = {round(steps / 5), round(steps / 3)}
    if steps == 28:
        chosen.add(8)
    return sorted(chosen)


class Bench:
    """One model, one guidance setting: calibrations, schedules and latents, each computed once."""

    def __init__(self, model: str, cfg: float, prompt_set: str | None) -> None:
        self.spec = resolve_model(model)
        self.pipe = load_pipeline(self.spec)
        prompt_set = prompt_set or ("shapes" if self.spec.name == "demo" else "generic")
        set_a, set_b, evaluation = PROMPT_SETS[prompt_set]
        self.calibration_prompts = set_a + set_b
        self.pairs = [(prompt, seed) for prompt in evaluation for seed in EVAL_SEEDS]
        self.guidance = {"true_cfg_scale": cfg, "negative_prompt": ""} if cfg > 1 else {"true_cfg_scale": 1.0}
        self.branches = 2 if cfg > 1 else 1
        self.calibrations: dict[tuple[int, int], object] = {}
        self.references: dict[tuple[int, int], list[torch.Tensor]] = {}

    def kwargs(self, steps: int, size: int) -> dict:
        return reference_run_kwargs(self.spec, steps, size, size, None, self.guidance)

    def calibration(self, steps: int, size: int):
        key = (steps, size)
        if key not in self.calibrations:
            self.calibrations[key] = run_calibration(self.pipe, self.spec.name, self.calibration_prompts, CAL_SEEDS,
                                                     self.kwargs(steps, size), MapSettings(), holdout=0)
        return self.calibrations[key]

    def latents(self, steps: int, size: int, schedule: Schedule | None = None, strict: bool = False) -> list:
        out = []
        for prompt, seed in self.pairs:
            result = generate(self.pipe, prompt, seed, self.kwargs(steps, size), schedule, output_type="latent",
                              strict=strict)
            if schedule is not None:
                assert result.nfe == schedule.budget * self.branches, (result.nfe, schedule.budget)
            out.append(result.images[0])
        return out

    def reference(self, steps: int, size: int) -> list[torch.Tensor]:
        if (steps, size) not in self.references:
            self.references[(steps, size)] = self.latents(steps, size)
        return self.references[(steps, size)]

    def psnr(self, steps: int, size: int, latents: list) -> list[float]:
        return [latent_psnr(x, ref) for x, ref in zip(latents, self.reference(steps, size))]


def line(label: str, values: list[float], native: list[float] | None) -> str:
    text = f"    {label:<34} mean {statistics.mean(values):6.2f}  median {statistics.median(values):6.2f}  " \
           f"min {min(values):6.2f}"
    if native is not None:
        losses = [a - b for a, b in zip(native, values)]
        text += (f"   loss: mean {statistics.mean(losses):+5.2f}  median {statistics.median(losses):+5.2f}  "
                 f"worst {max(losses):+5.2f}")
    return text


def step_transfer(bench: Bench, size: int) -> None:
    base = bench.calibration(BASE_STEPS, size)
    for steps in STEPS:
        native_cal = bench.calibration(steps, size)
        for budget in budgets(steps):
            print(f"  N'={steps} B={budget} (size {size})", flush=True)
            native = bench.psnr(steps, size, bench.latents(steps, size, plan_schedule(native_cal, budget)))
            print(line(f"native {steps}-step calibration", native, None))
            for method in ("linear", "nearest"):
                planned = plan_schedule(base, budget, steps=steps, regrid=method)
                values = bench.psnr(steps, size, bench.latents(steps, size, planned))
                print(line(f"from-50 plan --steps {steps} ({method})", values, native))
            mapped = plan_schedule(base, budget)
            values = bench.psnr(steps, size, bench.latents(steps, size, mapped))
            print(line("mapped-50 (50-step schedule by σ)", values, native))
            euler = bench.psnr(steps, size, bench.latents(budget, size))
            print(line(f"{budget}-step Euler", euler, native), flush=True)


def size_transfer(bench: Bench, sizes: tuple[int, int]) -> None:
    for planned_size, run_size in (sizes, sizes[::-1]):
        for budget in (10, 17):
            print(f"  planned at {planned_size}x{planned_size}, run at {run_size}x{run_size}, N={BASE_STEPS} "
                  f"B={budget}", flush=True)
            native = bench.psnr(BASE_STEPS, run_size, bench.latents(
                BASE_STEPS, run_size, plan_schedule(bench.calibration(BASE_STEPS, run_size), budget)))
            print(line(f"native ({run_size}x{run_size} calibration)", native, None))
            other = plan_schedule(bench.calibration(BASE_STEPS, planned_size), budget)
            by_sigma = bench.psnr(BASE_STEPS, run_size, bench.latents(BASE_STEPS, run_size, other))
            print(line("by σ (generate's default)", by_sigma, native))
            moved = schedule_on_sigmas(other, bench.pipe.scheduler.sigmas.double().numpy())  # the last run's grid
            by_index = bench.psnr(BASE_STEPS, run_size, bench.latents(BASE_STEPS, run_size, other, strict=True))
            print(line("by index (--strict-schedule)", by_index, native))
            print(f"    compute steps planned {' '.join(map(str, other.compute_steps))}; by σ "
                  f"{' '.join(map(str, moved.compute_steps))}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--prompt-set", default=None)
    parser.add_argument("--sizes", default="32,64", help="two sizes for the resolution transfer ('' to skip)")
    parser.add_argument("--cfg", default="1,4", help="true CFG scales (1 = plain)")
    args = parser.parse_args()
    diffusers.utils.logging.set_verbosity_error()
    warnings.simplefilter("ignore", ScheduleMappedWarning)
    torch.set_num_threads(1)
    start = time.time()
    for cfg in (float(v) for v in args.cfg.split(",")):
        bench = Bench(args.model, cfg, args.prompt_set)
        label = "plain" if cfg <= 1 else f"true CFG {cfg:g}"
        print(f"== {bench.spec.name}, {label}: calibration {len(bench.calibration_prompts)} prompts x "
              f"{len(CAL_SEEDS)} seeds, {len(bench.pairs)} held-out pairs", flush=True)
        size = bench.spec.height
        step_transfer(bench, size)
        if args.sizes:
            sizes = tuple(int(v) for v in args.sizes.split(","))
            size_transfer(bench, sizes)
    print(f"done in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
