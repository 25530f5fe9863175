"""How each transformer family exposes σ and the velocity (DESIGN.md §6).

The hooks work in the sampler's convention: `σ` falls from 1 to 0 and the velocity is `dx/dσ`.
An adapter maps a transformer's timestep argument and output onto that convention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MeanCacheError


@dataclass(frozen=True)
class ModelAdapter:
    """`σ = sigma_offset + sigma_scale · timestep`, and `dx/dσ = output_sign · output`.

    `latents_arg` and `timestep_arg` name the transformer's forward arguments that carry the latents
    and the timestep (positional or keyword). The latents may be a tensor or a list of per-sample
    tensors; the output's sample then has the same structure.
    """

    sigma_offset: float = 0.0
    sigma_scale: float = 1.0
    output_sign: float = 1.0
    latents_arg: str = "hidden_states"
    timestep_arg: str = "timestep"

    def sigma(self, timestep: torch.Tensor | float) -> float:
        """σ of the step the transformer is asked to evaluate."""
        t = timestep.flatten()[0].item() if isinstance(timestep, torch.Tensor) else float(timestep)
        return self.sigma_offset + self.sigma_scale * t


ADAPTERS: dict[str, ModelAdapter] = {
    # FluxPipeline, QwenImagePipeline and ChromaPipeline pass timestep / 1000, which is σ itself.
    "FluxTransformer2DModel": ModelAdapter(),
    "QwenImageTransformer2DModel": ModelAdapter(),
    "ChromaTransformer2DModel": ModelAdapter(),
    # The embedded hard model (models/hard.py) runs in a FluxPipeline: the same t / 1000 = σ.
    "MixtureFlowTransformer2DModel": ModelAdapter(),
    # StableDiffusion3Pipeline, HunyuanVideoPipeline and WanPipeline pass the scheduler's timestep, 1000 · σ.
    "SD3Transformer2DModel": ModelAdapter(sigma_scale=1e-3),
    "HunyuanVideoTransformer3DModel": ModelAdapter(sigma_scale=1e-3),
    "WanTransformer3DModel": ModelAdapter(sigma_scale=1e-3),
    # ZImagePipeline calls transformer(x, t, cap_feats) with x a list of per-sample latents and the reversed
    # time t = (1000 - timestep) / 1000 = 1 - σ, and steps the scheduler with the negated output.
    "ZImageTransformer2DModel": ModelAdapter(
        sigma_offset=1.0, sigma_scale=-1.0, output_sign=-1.0, latents_arg="x", timestep_arg="t",
    ),
}


def unwrap_transformer(module: torch.nn.Module) -> torch.nn.Module:
    """The transformer beneath `torch.compile`'s wrapper: `torch.compile(transformer)` returns an `OptimizedModule`
    whose `_orig_mod` is the model (its hooks, config and `cache_context` are the model's)."""
    while isinstance(getattr(module, "_orig_mod", None), torch.nn.Module):
        module = module._orig_mod
    return module


def adapter_for_class(model_class: type) -> ModelAdapter | None:
    """The adapter of the nearest class in `model_class`'s hierarchy that has one, so a subclass of a supported
    transformer (a fine-tune's own class, a wrapper that adds a method) reads σ and the output as its base does."""
    for base in model_class.__mro__:
        if base.__name__ in ADAPTERS:
            return ADAPTERS[base.__name__]
    return None


def adapter_for(transformer: torch.nn.Module) -> ModelAdapter:
    """The adapter for a transformer instance, found from its class hierarchy (beneath a `torch.compile` wrapper)."""
    adapter = adapter_for_class(type(unwrap_transformer(transformer)))
    if adapter is None:
        supported = ", ".join(sorted(ADAPTERS))
        raise MeanCacheError(
            f"{type(unwrap_transformer(transformer)).__name__} is not a supported flow-matching transformer: "
            f"MeanCache supports {supported} (and their subclasses)"
        )
    return adapter
