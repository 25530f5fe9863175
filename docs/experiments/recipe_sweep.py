"""The sweep that chose `plan`'s defaults: latent PSNR against the 50-step output on the demo model.

Run: python docs/experiments/recipe_sweep.py [true CFG scale, 1 = plain]. 8 evaluation prompts (seed 0),
calibration on 8 other prompts x 2 seeds. Logs beside this file.
"""

import sys
import time

import diffusers
import numpy as np
import torch

from meancache_cli.bench.peers import solver_scheduler
from meancache_cli.bench.prompts import SHAPES_A, SHAPES_B, SHAPES_EVAL
from meancache_cli.calibration import MapSettings, run_calibration
from meancache_cli.hooks import apply_meancache, remove_meancache
from meancache_cli.models.registry import load_pipeline, resolve_model
from meancache_cli.planning import plan_schedule, uniform_schedule

diffusers.utils.logging.set_verbosity_error()
torch.set_num_threads(1)
cfg = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
spec = resolve_model("demo")
pipe = load_pipeline(spec)
base = {"height": 32, "width": 32, "max_sequence_length": 16, "num_inference_steps": 50}
if cfg > 1:
    base.update(true_cfg_scale=cfg, negative_prompt="")


def run(prompt, seed, steps=50, sched=None, solver=None):
    orig = pipe.scheduler
    if solver:
        pipe.scheduler = solver_scheduler(solver, orig.config)
    if sched:
        apply_meancache(pipe, sched)
    try:
        out = pipe(
            prompt=prompt,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="latent",
            **{**base, "num_inference_steps": steps},
        ).images
    finally:
        if sched:
            remove_meancache(pipe)
        pipe.scheduler = orig
    return out.double()


def lpsnr(x, ref):
    peak = float(ref.max() - ref.min())
    mse = float(((x - ref) ** 2).mean())
    return 10 * np.log10(peak**2 / mse)


t0 = time.time()
cal = run_calibration(pipe, spec.name, SHAPES_A + SHAPES_B, [1000, 1001], base, settings=MapSettings(), holdout=0)
print("calibrated", cal.trajectories, time.time() - t0, flush=True)
pairs = [(p, s) for p in SHAPES_EVAL for s in (0,)]
refs = [run(p, s) for p, s in pairs]
res = {}


def evaluate(name, **kw):
    v = [lpsnr(run(p, s, **kw), r) for (p, s), r in zip(pairs, refs)]
    res[name] = v
    return np.mean(v), np.min(v)


for B in (8, 10, 13, 17, 25):
    line = {}
    line["euler"] = evaluate(f"euler{B}", steps=B)
    line["unipc"] = evaluate(f"unipc{B}", steps=B, solver="unipc")
    line["dpmpp"] = evaluate(f"dpmpp{B}", steps=B, solver="dpmpp")
    for cost in ("velocity", "displacement"):
        for g in (0.5, 2.0, 4.0):
            for lams in ((1.0,), (0.5, 1.0)):
                s = plan_schedule(cal, B, gamma=g, cost=cost, lambdas=lams)
                line[f"{cost[:3]} g{g} l{len(lams)}"] = evaluate(f"{cost}{g}{lams}{B}", sched=s)
    s = plan_schedule(cal, B, kmax=0, gamma=0.5)
    line["k0"] = evaluate(f"k0{B}", sched=s)
    u = uniform_schedule("demo", 50, B)
    line["uniform"] = evaluate(f"uni{B}", sched=u)
    u1 = uniform_schedule("demo", 50, B)
    from meancache_cli.files import Schedule

    u2 = Schedule(model="demo", num_inference_steps=50, compute_steps=u1.compute_steps, orders=[0] + [1] * (B - 1),
                  lambdas=[0.0] + [1.0] * (B - 1))
    line["uniform+jvp"] = evaluate(f"unijvp{B}", sched=u2)
    best_solver = max(line[k][0] for k in ("euler", "unipc", "dpmpp"))
    print(f"B={B} best solver {best_solver:.1f}", flush=True)
    for k, (m, mn) in line.items():
        print(f"   {k:22s} mean {m:6.2f} min {mn:6.2f}  margin {m - best_solver:+.2f}", flush=True)
print("total", time.time() - t0)
