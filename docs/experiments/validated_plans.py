"""Validated plans against the solvers, per pair: does checking the recipe on held-out runs hold up on new pairs?

Run: python docs/experiments/validated_plans.py MODEL CFG [PAIRS]   (MODEL demo or hard; CFG 1 = plain)

Calibrates with the CLI's defaults (the model's calibration prompts and seeds, held-out runs included), then
per budget plans the default recipe, every candidate recipe, and the validated plan (`plan(..., pipe=pipe)`),
and runs them with Euler, UniPC and DPM-Solver++ at B steps on PAIRS evaluation pairs (prompts disjoint from
the calibration's). Prints, per method, latent and decoded PSNR against the uncached 50-step output: median,
10th percentile, minimum, pairs won against the best solver on that pair, pairs below 20 dB.
"""

import sys
import time

import diffusers
import numpy as np
import torch

from meancache_cli import defaults
from meancache_cli.bench.peers import solver_scheduler
from meancache_cli.bench.prompts import SHAPES_EVAL
from meancache_cli.calibration import reference_run_kwargs, run_calibration
from meancache_cli.hooks import apply_meancache, remove_meancache
from meancache_cli.metrics import compare, latent_psnr
from meancache_cli.models.registry import load_pipeline, resolve_model
from meancache_cli.planning import plan, plan_recipe

diffusers.utils.logging.set_verbosity_error()
torch.set_num_threads(1)
model, cfg = sys.argv[1], float(sys.argv[2])
count = int(sys.argv[3]) if len(sys.argv) > 3 else 32
budgets = tuple(int(b) for b in sys.argv[4].split(",")) if len(sys.argv) > 4 else (8, 10, 13)
spec = resolve_model(model)
pipe = load_pipeline(spec)
guidance = {"true_cfg_scale": cfg, "negative_prompt": ""} if cfg > 1 else {"true_cfg_scale": 1.0}
base = reference_run_kwargs(spec, spec.steps, None, None, None, guidance)
if cfg <= 1:
    base.pop("negative_prompt", None)


def run(prompt: str, seed: int, steps: int = 50, schedule=None, solver: str | None = None):
    """Final latents and the decoded image of one generation."""
    original = pipe.scheduler
    final = {}

    def keep(pipe_, step, timestep, kwargs):
        final["latents"] = kwargs["latents"]
        return {}

    if solver:
        pipe.scheduler = solver_scheduler(solver, original.config)
    if schedule is not None:
        apply_meancache(pipe, schedule)
    try:
        image = pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="pil",
                     callback_on_step_end=keep, **{**base, "num_inference_steps": steps}).images[0]
    finally:
        if schedule is not None:
            remove_meancache(pipe)
        pipe.scheduler = original
    return final["latents"].double(), image


start = time.time()
calibration = run_calibration(pipe, spec.name, spec.calibration_prompts, spec.calibration_seeds, base)
calibrate_seconds = time.time() - start
print(f"{model} cfg {cfg:g}: calibrated {len(spec.calibration_prompts) * len(calibration.seeds)} runs "
      f"({len(calibration.held_out)} held out) in {calibrate_seconds:.0f} s; stability {calibration.stability}",
      flush=True)
seeds = range(-(-count // len(SHAPES_EVAL)))
pairs = [(prompt, seed) for seed in seeds for prompt in SHAPES_EVAL][:count]
references = [run(prompt, seed) for prompt, seed in pairs]


def scores(**options) -> tuple[np.ndarray, np.ndarray]:
    latent, decoded = [], []
    for (prompt, seed), (ref_latents, ref_image) in zip(pairs, references):
        latents, image = run(prompt, seed, **options)
        latent.append(latent_psnr(latents, ref_latents))
        decoded.append(compare(image, ref_image)[0])
    return np.array(latent), np.array(decoded)


def line(name: str, values: tuple[np.ndarray, np.ndarray], best: tuple[np.ndarray, np.ndarray] | None) -> str:
    parts = []
    for index, kind in enumerate(("latent", "decoded")):
        v = values[index]
        won = f" won {int(np.sum(v > best[index]))}/{len(v)}" if best is not None else ""
        parts.append(f"{kind} med {np.median(v):5.1f} p10 {np.percentile(v, 10):5.1f} min {v.min():5.1f}"
                     f"{won} <20dB {int(np.sum(v < 20))}")
    return f"  {name:34s} " + " | ".join(parts)


for budget in budgets:
    t0 = time.time()
    solvers = {name: scores(steps=budget, solver=None if name == "euler" else name)
               for name in ("euler", "unipc", "dpmpp")}
    best = tuple(np.max([s[i] for s in solvers.values()], axis=0) for i in range(2))
    validated = plan(calibration, budget, pipe=pipe)
    rows = {name: line(name, values, None) for name, values in solvers.items()}
    rows["validated: " + validated.validation["chosen"]] = line("validated", scores(schedule=validated), best)
    for recipe in defaults.CANDIDATES:
        rows[recipe.name] = line(recipe.name, scores(schedule=plan_recipe(calibration, budget, recipe)), best)
    print(f"B = {budget} ({time.time() - t0:.0f} s); validation chose {validated.validation['chosen']} "
          f"(cost {100 * validated.validation['cost_share']:.0f} % of calibration); held-out scores "
          + ", ".join(f"{c['recipe']}: {c['score']:.1f}" for c in validated.validation["candidates"]), flush=True)
    for name, text in rows.items():
        print(text.replace("validated", name, 1) if name.startswith("validated") else text, flush=True)
print(f"total {time.time() - start:.0f} s")
