"""Train the tiny demo FLUX pipeline shipped in ``meancache_cli/models/demo_pipeline``.

Run once by maintainers (about half an hour on two CPU cores), never at install time::

    python -m meancache_cli.models.train_demo [--out DIR] [--quick]

Text encoders stay frozen at their seeded random weights; the VAE and then the transformer are trained on
procedurally drawn shapes, the transformer with the rectified-flow objective in exactly the convention
``FluxPipeline`` + ``FlowMatchEulerDiscreteScheduler`` sample with.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)

from meancache_cli.models import demo  # noqa: E402

SEED = 20240611
LATENT_CHANNELS = 4
LATENT_SIDE = demo.HEIGHT // 2  # two VAE blocks: downsample factor 2
DEMO_SHIFT = 3.0  # sampling shift at the demo resolution, like FLUX's resolution-dependent shift


@dataclass(frozen=True)
class Budget:
    """Sizes of one training run."""

    images: int
    vae_steps: int
    vae_batch: int
    flow_steps: int
    flow_batch: int


FULL = Budget(images=32768, vae_steps=1200, vae_batch=32, flow_steps=5000, flow_batch=64)
QUICK = Budget(images=1024, vae_steps=40, vae_batch=32, flow_steps=40, flow_batch=32)


def log(message: str) -> None:
    """Progress goes to stderr so stdout stays clean."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def all_prompts() -> list[tuple[str, str, str]]:
    """Every (shape, foreground, background) combination, in a fixed order that indexes the text table."""
    return [(s, f, b) for s in demo.SHAPES for f in demo.COLOURS for b in demo.COLOURS if f != b]


def make_dataset(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` rendered images in [-1, 1] (N, 3, H, W) and the index of each one's prompt in ``all_prompts``."""
    combos = all_prompts()
    picks = rng.integers(len(combos), size=n)
    images = np.stack([demo.render(*combos[i], rng) for i in picks])
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return pixels, torch.from_numpy(picks)


def build_vae() -> AutoencoderKL:
    """Two-block KL autoencoder: 32x32x3 images <-> 16x16x4 latents, packed 2x2 into 64 FLUX tokens."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=demo.HEIGHT,
        mid_block_add_attention=False,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def build_transformer() -> FluxTransformer2DModel:
    """FLUX transformer in miniature: 2 double + 2 single blocks, 4 heads of 32, no guidance embedding."""
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=demo.TEXT_HIDDEN_SIZE,
        pooled_projection_dim=demo.TEXT_HIDDEN_SIZE,
        guidance_embeds=False,
        axes_dims_rope=(4, 14, 14),
    )


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Dynamic shifting tuned so the demo's 64 image tokens get mu = ln 3 (shift 3), 256 tokens get 1.5."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=DEMO_SHIFT,
        use_dynamic_shifting=True,
        base_image_seq_len=(LATENT_SIDE // 2) ** 2,
        max_image_seq_len=4 * (LATENT_SIDE // 2) ** 2,
        base_shift=math.log(DEMO_SHIFT),
        max_shift=1.5,
    )


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 5% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def batches(n: int, batch: int, generator: torch.Generator) -> itertools.chain:
    """Endless shuffled mini-batch indices over ``n`` items."""
    return itertools.chain.from_iterable(
        torch.randperm(n, generator=generator).split(batch) for _ in itertools.count()
    )


def train_vae(vae: AutoencoderKL, pixels: torch.Tensor, budget: Budget, generator: torch.Generator) -> None:
    """Reconstruction (MSE) plus a small KL term, enough to keep the latent space smooth for diffusion."""
    optimiser = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: cosine_lr(s, budget.vae_steps, 50))
    vae.train()
    for step, idx in zip(range(budget.vae_steps), batches(len(pixels), budget.vae_batch, generator)):
        x = pixels[idx]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        mse = F.mse_loss(recon, x)
        loss = mse + 1e-5 * posterior.kl().mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 100 == 0 or step == budget.vae_steps - 1:
            log(f"vae step {step}/{budget.vae_steps} mse {mse.item():.5f}")
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """Posterior means of all images; sets the VAE's shift/scaling factors from their statistics."""
    means = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(256)])
    shift, scale = means.mean().item(), 1.0 / means.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    log(f"latent shift_factor {shift:.4f} scaling_factor {scale:.4f}")
    latents = (means - shift) * scale
    return FluxPipeline._pack_latents(latents, len(latents), LATENT_CHANNELS, LATENT_SIDE, LATENT_SIDE)


def sample_sigmas(n: int, generator: torch.Generator) -> torch.Tensor:
    """Noise levels where the sampler spends its steps: half logit-normal, half uniform, then shifted by 3."""
    logit_normal = torch.sigmoid(torch.randn(n, generator=generator))
    uniform = torch.rand(n, generator=generator)
    u = torch.where(torch.rand(n, generator=generator) < 0.5, logit_normal, uniform)
    return DEMO_SHIFT * u / (1 + (DEMO_SHIFT - 1) * u)


def train_transformer(
    pipe: FluxPipeline,
    latents: torch.Tensor,
    prompt_ids: torch.Tensor,
    budget: Budget,
    generator: torch.Generator,
) -> FluxTransformer2DModel:
    """Rectified flow, x_sigma = (1 - sigma) x0 + sigma noise, velocity target noise - x0; returns the EMA."""
    transformer = pipe.transformer
    texts = [demo.prompt_for(*combo) for combo in all_prompts()] + [""]
    with torch.no_grad():
        sequence, pooled, text_ids = pipe.encode_prompt(
            texts, prompt_2=None, device=torch.device("cpu"), max_sequence_length=demo.MAX_SEQUENCE_LENGTH
        )
    empty = len(texts) - 1
    image_ids = FluxPipeline._prepare_latent_image_ids(
        1, LATENT_SIDE // 2, LATENT_SIDE // 2, "cpu", torch.float32
    )
    ema = copy.deepcopy(transformer).requires_grad_(False)
    optimiser = torch.optim.AdamW(transformer.parameters(), lr=1e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: cosine_lr(s, budget.flow_steps, 200))
    transformer.train()
    running = 0.0
    for step, idx in zip(range(budget.flow_steps), batches(len(latents), budget.flow_batch, generator)):
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=generator)
        sigma = sample_sigmas(len(idx), generator)
        drop = torch.rand(len(idx), generator=generator) < 0.1  # unconditional 10% of the time, for true CFG
        text = torch.where(drop, empty, prompt_ids[idx])
        noisy = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        velocity = transformer(
            hidden_states=noisy,
            timestep=sigma,
            pooled_projections=pooled[text],
            encoder_hidden_states=sequence[text],
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        loss = F.mse_loss(velocity, noise - x0)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for averaged, live in zip(ema.parameters(), transformer.parameters()):
                averaged.lerp_(live, 1 - decay)
        running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == budget.flow_steps - 1:
            log(f"flow step {step}/{budget.flow_steps} loss {running:.4f} lr {schedule.get_last_lr()[0]:.2e}")
    return ema.eval()


def main(argv: list[str] | None = None) -> None:
    """Train every part, then save the whole pipeline (fp16 weights) with ``save_pretrained``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=demo.DEMO_DIR, help="where to save the pipeline")
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test run (useless model)")
    args = parser.parse_args(argv)
    budget = QUICK if args.quick else FULL
    start = time.time()
    # Sharpening attention underflows exp() into denormals, which slow CPU training down by 10x or more.
    torch.set_flush_denormal(True)
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    rng = np.random.default_rng(SEED)

    clip_tokenizer, t5_tokenizer = demo.build_clip_tokenizer(), demo.build_t5_tokenizer()
    pipe = FluxPipeline(
        scheduler=build_scheduler(),
        vae=build_vae(),
        text_encoder=demo.build_clip_encoder(clip_tokenizer, SEED + 1),
        tokenizer=clip_tokenizer,
        text_encoder_2=demo.build_t5_encoder(t5_tokenizer, SEED + 2),
        tokenizer_2=t5_tokenizer,
        transformer=build_transformer(),
    )
    pipe.set_progress_bar_config(disable=True)
    log(f"rendering {budget.images} images")
    pixels, prompt_ids = make_dataset(budget.images, rng)
    train_vae(pipe.vae, pixels, budget, generator)
    latents = encode_latents(pipe.vae, pixels)
    log(f"VAE done after {time.time() - start:.0f}s")
    pipe.transformer = train_transformer(pipe, latents, prompt_ids, budget, generator)
    log(f"transformer done after {time.time() - start:.0f}s")
    log(f"colour accuracy on 40 fresh prompts: {demo.colour_match_rate(pipe, 40, SEED + 3, SEED + 3):.0%}")

    shutil.rmtree(args.out, ignore_errors=True)
    pipe.to(torch.float16).save_pretrained(args.out, safe_serialization=True)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    log(f"saved to {args.out} ({size / 1e6:.1f} MB) after {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
