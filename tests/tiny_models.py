"""Tiny real diffusers pipelines of every supported family, random weights, built offline for the tests.

Each factory builds the pipeline class the registry names, from the real diffusers and transformers
classes with miniature configs (one or two layers, hidden sizes of 8-64). Tokenizers are built in
code: the CLIP and T5 ones of the demo model, and byte-level (Qwen2) or metaspace (Llama) BPE
tokenizers whose merges make every word of the pipelines' prompt templates and of the demo vocabulary
one token, so a prompt reaches its text encoder as words (DESIGN.md §9).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
    ChromaPipeline,
    ChromaTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
from tiny import tiny_flux_pipeline
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    LlamaConfig,
    LlamaModel,
    LlamaTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3Model,
    UMT5Config,
    UMT5EncoderModel,
)

from meancache_cli.models import demo

QWEN_IMAGE_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
LLAMA_SPECIALS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
# Enough of a Qwen chat template for ZImagePipeline's `apply_chat_template(..., add_generation_prompt=True)`.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = sorted(
    {*demo.VOCABULARY, "user", "assistant", "system"}
    | set(re.findall(r"[A-Za-z]+", QWEN_IMAGE_TEMPLATE + DEFAULT_PROMPT_TEMPLATE["template"]))
)


def _word_bpe(alphabet: list[str], pieces: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A vocabulary of `alphabet` plus merges that turn each of `pieces` into one token.

    Merges are appended at the lowest priority until a piece merges completely, so they never change
    how an earlier piece tokenizes (the demo's CLIP tokenizer is built the same way).
    """
    ranks: dict[tuple[str, str], int] = {}
    merged: list[str] = []
    for piece in pieces:
        while len(symbols := demo.bpe_merge(list(piece), ranks)) > 1:
            ranks[symbols[0], symbols[1]] = len(ranks)
            merged.append(symbols[0] + symbols[1])
    vocab: dict[str, int] = {}
    for token in [*alphabet, *merged]:
        vocab.setdefault(token, len(vocab))
    return vocab, sorted(ranks, key=ranks.__getitem__)


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (byte-level BPE)."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for byte in range(256):
        if byte in visible:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def qwen_tokenizer(chat_template: str | None = None) -> Qwen2Tokenizer:
    """Byte-level BPE (Qwen2) tokenizer: every byte is a token, every known word one token.

    The Qwen-Image system prompt comes out as 34 tokens, the number QwenImagePipeline drops.
    """
    pieces = [p for word in WORDS for p in (word, "Ġ" + word)]
    vocab, merges = _word_bpe([*QWEN_SPECIALS, *_byte_alphabet()], pieces)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=1024)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIALS[1:])})
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def llama_tokenizer() -> LlamaTokenizer:
    """Metaspace BPE (Llama) tokenizer over printable ASCII, every known word one `▁word` token.

    HunyuanVideo's prompt template comes out as the 95 tokens its pipeline crops (`crop_start`).
    """
    alphabet = ["<unk>", "<s>", "</s>", "▁", *(chr(c) for c in range(ord("!"), ord("~") + 1)), "\n"]
    vocab, merges = _word_bpe(alphabet, ["\n\n", *(p for word in WORDS for p in (word, "▁" + word))])
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, model_max_length=1024)
    tokenizer.pad_token = "</s>"
    tokenizer.add_bos_token = True
    tokenizer.update_post_processor()
    tokenizer.add_special_tokens({"additional_special_tokens": list(LLAMA_SPECIALS)})
    return tokenizer


def _clip(model_class: type, tokenizer: Any, hidden: int, seed: int, positions: int = demo.MAX_SEQUENCE_LENGTH) -> Any:
    """A one-layer CLIP text encoder over `tokenizer` (the pipeline decides how many positions it pads to)."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=hidden,
        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return model_class(config).eval().requires_grad_(False)


def _flux_vae(latent_channels: int = 4, **kwargs: Any) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=latent_channels,
        layers_per_block=1, norm_num_groups=4, sample_size=32, **kwargs,
    )


def tiny_qwen_image_pipeline(seed: int = 0) -> QwenImagePipeline:
    tokenizer = qwen_tokenizer()
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    )
    vae = AutoencoderKLQwenImage(
        base_dim=24, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    )
    ids = {"bos_token_id": tokenizer.convert_tokens_to_ids("<|im_start|>"), "eos_token_id": tokenizer.eos_token_id}
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 2, "vocab_size": len(tokenizer), "max_position_embeddings": 1024,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0, **ids,
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        vocab_size=len(tokenizer), image_token_id=0, video_token_id=0, vision_start_token_id=0,
        vision_end_token_id=0, **ids,
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval().requires_grad_(False)
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=16, max_image_seq_len=256, base_shift=0.5, max_shift=0.9, shift_terminal=0.02,
        use_dynamic_shifting=True, time_shift_type="exponential",
    )
    return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)


def tiny_hunyuanvideo_pipeline(seed: int = 0) -> HunyuanVideoPipeline:
    tokenizer, clip_tokenizer = llama_tokenizer(), demo.build_clip_tokenizer()
    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=demo.TEXT_HIDDEN_SIZE, rope_axes_dim=(2, 4, 4),
    )
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4,
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    text_encoder = LlamaModel(config).eval().requires_grad_(False)
    return HunyuanVideoPipeline(
        text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        # HunyuanVideoPipeline pads its CLIP prompt to 77 tokens whatever the tokenizer says.
        text_encoder_2=_clip(CLIPTextModel, clip_tokenizer, demo.TEXT_HIDDEN_SIZE, seed, positions=77),
        tokenizer_2=clip_tokenizer,
    )


def tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    clip_tokenizer, t5_tokenizer = demo.build_clip_tokenizer(), demo.build_t5_tokenizer()
    half = demo.TEXT_HIDDEN_SIZE // 2  # the two CLIP encoders' states, side by side, are padded to T5's width
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=demo.TEXT_HIDDEN_SIZE, caption_projection_dim=16, pooled_projection_dim=2 * half,
        out_channels=4,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_flux_vae(shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=_clip(CLIPTextModelWithProjection, clip_tokenizer, half, seed), tokenizer=clip_tokenizer,
        text_encoder_2=_clip(CLIPTextModelWithProjection, clip_tokenizer, half, seed + 1), tokenizer_2=clip_tokenizer,
        text_encoder_3=demo.build_t5_encoder(t5_tokenizer, seed), tokenizer_3=t5_tokenizer,
    )


def tiny_wan_pipeline(seed: int = 0) -> WanPipeline:
    """With the UniPC scheduler Wan2.1 ships (flow_shift 3.0), so loading it exercises the scheduler swap."""
    tokenizer = demo.build_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=1, rope_max_seq_len=32,
    )
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    )
    config = UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=16, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(config).eval().requires_grad_(False)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000,
    )
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer)


def tiny_z_image_pipeline(seed: int = 0) -> ZImagePipeline:
    tokenizer = qwen_tokenizer(CHAT_TEMPLATE)
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=1, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 4, 4], axes_lens=[256, 32, 32],
    )
    with torch.no_grad():  # created with torch.empty: fix them, or they may hold NaNs
        transformer.x_pad_token.fill_(1.0)
        transformer.cap_pad_token.fill_(1.0)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    text_encoder = Qwen3Model(config).eval().requires_grad_(False)
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_flux_vae(shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
    )


def tiny_chroma_pipeline(seed: int = 0) -> ChromaPipeline:
    tokenizer = demo.build_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=demo.TEXT_HIDDEN_SIZE, axes_dims_rope=(4, 6, 6),
        approximator_num_channels=8, approximator_hidden_dim=32, approximator_layers=1,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256, base_shift=0.5, max_shift=1.15,
    )
    return ChromaPipeline(scheduler=scheduler, vae=_flux_vae(shift_factor=0.0, scaling_factor=1.0),
                          text_encoder=demo.build_t5_encoder(tokenizer, seed), tokenizer=tokenizer,
                          transformer=transformer)


@dataclass(frozen=True)
class TinyModel:
    """A registered model's tiny stand-in: how to build it and how the tests drive it."""

    name: str
    build: Callable[[], Any]
    embedder: Callable[[torch.nn.Module], torch.nn.Module]  # runs once per real transformer evaluation
    branches: int  # transformer calls per sampler step with `call`
    call: dict[str, Any]  # pipeline keyword arguments for a fast run (size, frames, guidance)
    no_guidance: dict[str, Any]  # what turns guidance off, for a one-call-per-step run
    frames: int | None = None


SMALL = {"height": 32, "width": 32}
VIDEO = {"height": 16, "width": 16, "num_frames": 5}

TINY_MODELS: dict[str, TinyModel] = {
    model.name: model
    for model in [
        TinyModel("flux", tiny_flux_pipeline, lambda t: t.x_embedder, 1,
                  {**SMALL, "max_sequence_length": demo.MAX_SEQUENCE_LENGTH}, {}),
        TinyModel("qwen-image", tiny_qwen_image_pipeline, lambda t: t.img_in, 2,
                  {**SMALL, "true_cfg_scale": 4.0, "negative_prompt": "a black background", "max_sequence_length": 16},
                  {"true_cfg_scale": 1.0, "negative_prompt": None}),
        TinyModel("hunyuanvideo", tiny_hunyuanvideo_pipeline, lambda t: t.x_embedder, 1, VIDEO, {}, frames=5),
        TinyModel("sd3", tiny_sd3_pipeline, lambda t: t.pos_embed, 1, SMALL, {"guidance_scale": 1.0}),
        TinyModel("wan", tiny_wan_pipeline, lambda t: t.patch_embedding, 2, {**VIDEO, "max_sequence_length": 16},
                  {"guidance_scale": 1.0}, frames=5),
        TinyModel("z-image", tiny_z_image_pipeline, lambda t: t.all_x_embedder["2-1"], 1,
                  {**SMALL, "max_sequence_length": 64}, {"guidance_scale": 0.0}),
        TinyModel("chroma", tiny_chroma_pipeline, lambda t: t.x_embedder, 2,
                  {**SMALL, "max_sequence_length": demo.MAX_SEQUENCE_LENGTH}, {"guidance_scale": 1.0}),
    ]
}
