"""How hard the embedded "hard" model is: fewer-step Euler against the 50-step output, plain and with true CFG 4.

Run: python docs/experiments/hard_model_check.py [--grid docs/experiments/hard_model_grid.png] [--demo-scheduler]
16 held-out (prompt, seed) pairs: the bench's 8 evaluation prompts (none is a calibration prompt of
configs/hard.yaml) with seeds 0 and 1. Per budget B (Euler with B steps, the pipeline's own scheduler): median,
10th percentile and minimum latent PSNR (peak = the 50-step latent's max − min) and decoded PSNR against the
50-step output, and on how many pairs the output lands on another mixture component than the 50-step run's
(nearest component mean; "caption" counts those whose component belongs to another caption, e.g. another
shape). Output: docs/experiments/hard_model_check.log; with --demo-scheduler (the same mixture sampled with the
demo's scheduler, resolution-dependent shift 3, instead of the hard pipeline's static 0.8):
hard_model_check_demo_scheduler.log.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from PIL import Image  # noqa: E402

from meancache_cli.bench.prompts import SHAPES_EVAL  # noqa: E402
from meancache_cli.metrics import latent_psnr, psnr  # noqa: E402
from meancache_cli.models.demo import DEMO_DIR  # noqa: E402
from meancache_cli.models.hard import HEIGHT, MAX_SEQUENCE_LENGTH, WIDTH, load_hard_pipeline  # noqa: E402

SEEDS = (0, 1)
PAIRS = [(prompt, seed) for seed in SEEDS for prompt in SHAPES_EVAL]
BUDGETS = (8, 10, 13, 25)
REFERENCE_STEPS = 50


@torch.no_grad()
def run(pipe, prompt: str, seed: int, steps: int, cfg: float) -> tuple[torch.Tensor, np.ndarray]:
    """(final packed latents, decoded uint8 image) of one Euler run."""
    guidance = {"true_cfg_scale": cfg, "negative_prompt": ""} if cfg > 1 else {"true_cfg_scale": 1.0}
    latents = pipe(prompt, height=HEIGHT, width=WIDTH, num_inference_steps=steps,
                   max_sequence_length=MAX_SEQUENCE_LENGTH, generator=torch.Generator().manual_seed(seed),
                   output_type="latent", **guidance).images
    unpacked = pipe._unpack_latents(latents, HEIGHT, WIDTH, pipe.vae_scale_factor)
    unpacked = unpacked / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    image = pipe.image_processor.postprocess(pipe.vae.decode(unpacked).sample, output_type="np")[0]
    return latents[0], (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def nearest_component(pipe, latents: torch.Tensor) -> int:
    means = pipe.transformer.means.double()
    return int(((means - latents.double().reshape(1, -1)) ** 2).sum(1).argmin())


def measure(pipe, cfg: float) -> tuple[list[str], dict]:
    """Lines of the table for one guidance setting, and the runs (for the grid)."""
    transformer = pipe.transformer
    caption_of = transformer.component_caption.tolist()
    runs = {(p, s): {b: run(pipe, p, s, b, cfg) for b in (*BUDGETS, REFERENCE_STEPS)} for p, s in PAIRS}
    label = f"true CFG {cfg:g} (empty negative prompt)" if cfg > 1 else "plain (true_cfg_scale 1)"
    lines = [f"{label}: Euler-B vs Euler-{REFERENCE_STEPS}, {len(PAIRS)} pairs",
             f"{'B':>3} | {'latent PSNR dB: median  p10   min':>34} | {'decoded PSNR dB: median  p10   min':>35} | "
             "other component / caption"]
    for budget in BUDGETS:
        latent, decoded, component, caption = [], [], 0, 0
        for pair in PAIRS:
            (x, image), (ref_x, ref_image) = runs[pair][budget], runs[pair][REFERENCE_STEPS]
            latent.append(latent_psnr(x, ref_x))
            decoded.append(psnr(image, ref_image))
            k, ref_k = nearest_component(pipe, x), nearest_component(pipe, ref_x)
            component += k != ref_k
            caption += caption_of[k] != caption_of[ref_k]
        stats = [f"{np.median(v):6.1f} {np.percentile(v, 10):5.1f} {np.min(v):5.1f}" for v in (latent, decoded)]
        lines.append(f"{budget:>3} | {'':>15}{stats[0]} | {'':>16}{stats[1]} | {component:>2} / {caption:<2} "
                     f"of {len(PAIRS)}")
    return lines, runs


def grid(runs: dict, budget: int, path: str, scale: int = 3) -> None:
    """All pairs, in two blocks of rows; per pair: 50 steps, `budget` steps and their difference (x4, on white)
    plain, then the same with true CFG."""
    def difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (255 - np.clip(np.abs(a.astype(int) - b.astype(int)).max(-1, keepdims=True) * 4, 0, 255)).repeat(
            3, -1).astype(np.uint8)

    def row(pair: tuple) -> list[np.ndarray]:
        tiles = []
        for cfg in runs:
            reference, fewer = runs[cfg][pair][REFERENCE_STEPS][1], runs[cfg][pair][budget][1]
            tiles += [reference, fewer, difference(fewer, reference)]
        return tiles

    gap, white = 4, 255
    rows = [np.concatenate([part for tile in row(pair) for part in (tile, np.full((HEIGHT, gap, 3), white,
                                                                                  np.uint8))], axis=1)
            for pair in PAIRS]
    half = len(rows) // 2
    blocks = [np.concatenate([part for r in rows[i:i + half] for part in (r, np.full((gap, r.shape[1], 3), white,
                                                                                     np.uint8))], axis=0)
              for i in (0, half)]
    image = np.concatenate([blocks[0], np.full((blocks[0].shape[0], 4 * gap, 3), white, np.uint8), blocks[1]], axis=1)
    Image.fromarray(image).resize((image.shape[1] * scale, image.shape[0] * scale), Image.Resampling.NEAREST).save(path)


def per_pair(pipe, runs: dict, budget: int) -> list[str]:
    """One line per pair at `budget` steps: PSNRs and where the output lands against the 50-step one."""
    caption_of = pipe.transformer.component_caption.tolist()
    per_caption = caption_of.count(0)
    lines = [f"per pair, Euler-{budget} vs Euler-{REFERENCE_STEPS}: latent / decoded PSNR dB, 50-step component "
             "(caption index.position on its line) -> Euler-B component"]
    for prompt, seed in PAIRS:
        (x, image), (ref_x, ref_image) = runs[(prompt, seed)][budget], runs[(prompt, seed)][REFERENCE_STEPS]
        k, ref_k = nearest_component(pipe, x), nearest_component(pipe, ref_x)
        where = "same" if k == ref_k else (f"{caption_of[k]}.{k % per_caption}" + (
            f" ({abs(k - ref_k)} along the line)" if caption_of[k] == caption_of[ref_k] else " (another caption)"))
        lines.append(f"  {prompt + f' seed {seed}':<48} {latent_psnr(x, ref_x):5.1f} / {psnr(image, ref_image):5.1f}"
                     f"   {caption_of[ref_k]}.{ref_k % per_caption} -> {where}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", help="also write a PNG grid: pairs by rows, 50 vs 10 steps, plain then CFG 4")
    parser.add_argument("--demo-scheduler", action="store_true", help="sample with the demo pipeline's scheduler")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = load_hard_pipeline()
    if args.demo_scheduler:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(DEMO_DIR / "scheduler")
    pipe.set_progress_bar_config(disable=True)
    pipe("a red circle on a blue background", height=HEIGHT, width=WIDTH, num_inference_steps=2,
         max_sequence_length=MAX_SEQUENCE_LENGTH)  # warm-up
    times = {}
    for cfg in (1.0, 4.0):
        guidance = {"true_cfg_scale": cfg, "negative_prompt": ""} if cfg > 1 else {}
        start = time.perf_counter()
        for _ in range(5):
            pipe("a red circle on a blue background", height=HEIGHT, width=WIDTH, num_inference_steps=50,
                 max_sequence_length=MAX_SEQUENCE_LENGTH, **guidance)
        times[cfg] = (time.perf_counter() - start) / 5
    config = pipe.transformer.config
    scheduler = ("the demo's, shift 3 at this size" if args.demo_scheduler
                 else f"static shift {pipe.scheduler.config.shift}")
    print(f"hard model: {config.num_components} components, {len(config.captions)} captions, "
          f"s = {config.data_std}, temperature = {config.temperature}, scheduler: {scheduler}; "
          f"{HEIGHT}x{WIDTH}, latents "
          f"{config.latent_tokens}x{config.in_channels}; torch {torch.__version__}, 1 thread")
    print(f"one 50-step generation (decoded to PIL), mean of 5: plain {times[1.0]:.3f} s, "
          f"true CFG 4 {times[4.0]:.3f} s\n")
    all_runs = {}
    for cfg in (1.0, 4.0):
        lines, all_runs[cfg] = measure(pipe, cfg)
        print("\n".join([*lines, *per_pair(pipe, all_runs[cfg], 10)]) + "\n", flush=True)
    if args.grid:
        grid(all_runs, 10, args.grid)
        print(f"grid: {args.grid}: the {len(PAIRS)} pairs in the order above, two blocks of {len(PAIRS) // 2} rows; "
              "columns: plain 50 steps, plain 10 steps, their difference (x4), then the same under true CFG 4")


if __name__ == "__main__":
    main()
