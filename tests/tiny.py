"""Tiny real diffusers pipelines with random weights, built offline for the tests."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

from meancache_cli.models import demo


class ForwardCounter:
    """Counts forwards of a module inside the transformer: runs only when the model really evaluates."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        module.register_forward_pre_hook(self._count)

    def _count(self, module: torch.nn.Module, args: tuple) -> None:
        self.calls += 1


def tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """A FluxPipeline whose parts are a few thousand random weights; 32×32 images."""
    clip_tokenizer, t5_tokenizer = demo.build_clip_tokenizer(), demo.build_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=demo.TEXT_HIDDEN_SIZE,
        pooled_projection_dim=demo.TEXT_HIDDEN_SIZE, axes_dims_rope=(4, 6, 6),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
        layers_per_block=1, norm_num_groups=4, sample_size=32, shift_factor=0.0, scaling_factor=1.0,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256, base_shift=0.5, max_shift=1.15,
    )
    pipe = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=demo.build_clip_encoder(clip_tokenizer, seed),
        tokenizer=clip_tokenizer, text_encoder_2=demo.build_t5_encoder(t5_tokenizer, seed),
        tokenizer_2=t5_tokenizer, transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


TINY_CALL = {"height": 32, "width": 32, "max_sequence_length": demo.MAX_SEQUENCE_LENGTH}
