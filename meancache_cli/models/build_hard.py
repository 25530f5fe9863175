"""Build the hard model's parameters in ``meancache_cli/models/hard_pipeline/`` (deterministic, a few seconds)::

    python -m meancache_cli.models.build_hard [--out DIR]

Every (shape, foreground, background) caption of the demo gets ``COMPONENTS_PER_CAPTION`` images drawn by
``demo.render`` at placements evenly spaced on a line through (size, x, y) placement space, seeded by (SEED,
caption index); their VAE latents (posterior means), shifted and scaled the way FluxPipeline samples them,
packed and stored as int8 steps of ``MEAN_STEP``, are the mixture means. Caption keys come from the demo's own
text encoders. The scheduler is the demo's with a shift ``SHIFT`` at every size. The difficulty knobs are the number
and spacing of components, ``DATA_STD``, ``TEMPERATURE`` and ``SHIFT`` (see ``hard.py`` and docs/models.md).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

from meancache_cli.models import demo  # noqa: E402
from meancache_cli.models.hard import HARD_DIR, HEIGHT, WIDTH, MixtureFlowTransformer2DModel  # noqa: E402

SEED = 20260401
COMPONENTS_PER_CAPTION = 16
SPACING = 0.03  # between neighbouring components, as a fraction of each of render's ranges (size, x, y)
DATA_STD = 0.05
TEMPERATURE = 20.0
SHIFT = 0.8  # the scheduler's static shift
MEAN_STEP = 1 / 16  # int8 quantization step of the means: ±7.9, the VAE latents reach ±7.3


def captions() -> list[tuple[str, str, str]]:
    """Every (shape, foreground, background) with distinct colours, in a fixed order: 224 captions."""
    return [(s, f, b) for s in demo.SHAPES for f in demo.COLOURS for b in demo.COLOURS if f != b]


class Placement:
    """Stands in for the generator ``demo.render`` draws a shape's size and centre from.

    ``render`` asks ``uniform(0.40, 0.75)`` for the size, then ``uniform(low, high, size=2)`` for the centre;
    each answer is the given fraction of the range asked for, so the shape is drawn exactly where the build
    places it. ``done`` checks that ``render`` drew all three and no more.
    """

    def __init__(self, size: float, x: float, y: float) -> None:
        self._fractions = [float(size), float(x), float(y)]

    def uniform(self, low: float, high: float, size: int | None = None) -> float | np.ndarray:
        count = 1 if size is None else size
        if count > len(self._fractions):
            raise RuntimeError("demo.render drew more values than a Placement holds: update build_hard")
        taken, self._fractions = self._fractions[:count], self._fractions[count:]
        values = np.array([low + f * (high - low) for f in taken])
        return float(values[0]) if size is None else values

    def done(self) -> None:
        if self._fractions:
            raise RuntimeError("demo.render drew fewer values than a Placement holds: update build_hard")


def placements(index: int, count: int = COMPONENTS_PER_CAPTION) -> np.ndarray:
    """(count, 3) fractions of render's (size, x, y) ranges for caption `index`: evenly spaced on a line
    through a random point, in a random direction (seeded by SEED and the caption index)."""
    rng = np.random.default_rng([SEED, index])
    centre = rng.uniform(0.3, 0.7, size=3)
    direction = rng.normal(size=3)
    offsets = (np.arange(count) - (count - 1) / 2) * SPACING
    return centre + offsets[:, None] * (direction / np.linalg.norm(direction))


def render_caption(index: int, count: int = COMPONENTS_PER_CAPTION) -> np.ndarray:
    """(count, H, W, 3) uint8 images of caption `index`, one per placement."""
    images = []
    for fractions in placements(index, count):
        placement = Placement(*fractions)
        images.append(demo.render(*captions()[index], placement))
        placement.done()
    return np.stack(images)


@torch.no_grad()
def encode(pipe, images: np.ndarray) -> torch.Tensor:
    """Images → (N, tokens · channels) float32 latents in FluxPipeline's sampling space: the VAE posterior
    mean, shifted and scaled as FluxPipeline undoes before decoding, packed into 2x2 tokens."""
    vae = pipe.vae
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(256)])
    latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    n, channels, height, width = latents.shape
    return pipe._pack_latents(latents, n, channels, height, width).reshape(n, -1).float()


@torch.no_grad()
def text_embeddings(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled CLIP (N, 64), T5 states (N, L, 64)) exactly as FluxPipeline passes them to the transformer."""
    text, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, max_sequence_length=demo.MAX_SEQUENCE_LENGTH)
    return pooled.float(), text.float()


def caption_keys(pooled: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Keys (P, F) from the captions' embeddings (rows) relative to the empty prompt's (last row).

    Each block (pooled, T5) is divided by its mean norm so both count; the mean key, the direction every
    prompt shares ("some prompt rather than none"), is projected out; each key is scaled to 1 / (mean norm of
    the projected features), so a caption's own prompt scores about 1 against its key and, times the
    temperature, about `temperature`.
    """
    pooled, text = pooled.double(), text.double().flatten(1)
    pooled_rel, text_rel = pooled[:-1] - pooled[-1], text[:-1] - text[-1]
    pooled_scale, text_scale = pooled_rel.norm(dim=1).mean().item(), text_rel.norm(dim=1).mean().item()
    features = torch.cat([pooled_rel / pooled_scale, text_rel / text_scale], dim=1)
    axis = features.mean(0) / features.mean(0).norm()
    projected = features - (features @ axis)[:, None] * axis
    norms = projected.norm(dim=1, keepdim=True)
    return (projected / norms / norms.mean()).float(), pooled_scale, text_scale


def caption_means(pipe, indices, components_per_caption: int = COMPONENTS_PER_CAPTION) -> torch.Tensor:
    """(len(indices) · components_per_caption, D) float32 means of the given captions' components."""
    return encode(pipe, np.concatenate([render_caption(i, components_per_caption) for i in indices]))


def quantize(means: torch.Tensor) -> torch.Tensor:
    """int8 steps of MEAN_STEP (the shipped means are these steps times MEAN_STEP)."""
    steps = torch.round(means.double() / MEAN_STEP)
    if steps.abs().max() > 127:
        raise RuntimeError(f"a latent reaches {means.abs().max():.2f}, beyond int8 steps of {MEAN_STEP}")
    return steps.to(torch.int8)


def scheduler(pipe) -> FlowMatchEulerDiscreteScheduler:
    """The demo's flow-matching Euler scheduler with a shift of SHIFT at every size instead of its
    resolution-dependent one (3 at 32x32): dynamic shifting whose base and max shift are both log(SHIFT), so
    FluxPipeline's `mu` is always log(SHIFT) — the multistep solvers (UniPC, DPM-Solver++), which FluxPipeline
    can only drive with dynamic shifting, then step on the same sigmas."""
    return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=True, shift=SHIFT,
                                                       base_shift=math.log(SHIFT), max_shift=math.log(SHIFT))


def build(pipe, components_per_caption: int = COMPONENTS_PER_CAPTION, data_std: float = DATA_STD,
          temperature: float = TEMPERATURE) -> MixtureFlowTransformer2DModel:
    """The hard model's transformer from the demo pipeline's VAE and text encoders."""
    labels = captions()
    prompts = [demo.prompt_for(*label) for label in labels]
    pooled, text = text_embeddings(pipe, [*prompts, ""])
    keys, pooled_scale, text_scale = caption_keys(pooled, text)
    means = caption_means(pipe, range(len(labels)), components_per_caption)
    transformer = MixtureFlowTransformer2DModel(
        in_channels=pipe.transformer.config.in_channels,
        latent_tokens=(HEIGHT // pipe.vae_scale_factor // 2) * (WIDTH // pipe.vae_scale_factor // 2),
        num_components=len(means),
        captions=prompts,
        data_std=data_std,
        temperature=temperature,
        mean_step=MEAN_STEP,
        pooled_projection_dim=pooled.shape[1],
        joint_attention_dim=text.shape[2],
        text_tokens=text.shape[1],
        pooled_scale=pooled_scale,
        text_scale=text_scale,
        build={"seed": SEED, "components_per_caption": components_per_caption, "spacing": SPACING,
               "script": "python -m meancache_cli.models.build_hard"},
    )
    transformer.quantized_means.copy_(quantize(means))
    transformer.component_caption.copy_(torch.arange(len(labels)).repeat_interleave(components_per_caption))
    transformer.caption_keys.copy_(keys)
    transformer.null_pooled.copy_(pooled[-1])
    transformer.null_text.copy_(text[-1])
    return transformer.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HARD_DIR, help="pipeline folder (the transformer goes in "
                        "OUT/transformer)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # bit-for-bit the same latents run after run
    pipe = demo.load_demo_pipeline()
    transformer = build(pipe)
    transformer.save_pretrained(args.out / "transformer", safe_serialization=True)
    scheduler(pipe).save_pretrained(args.out / "scheduler")
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"wrote {args.out}: {transformer.config.num_components} components, "
          f"{len(transformer.config.captions)} captions, {size / 1e6:.1f} MB", file=sys.stderr)


if __name__ == "__main__":
    main()
