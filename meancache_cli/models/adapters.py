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
    """`σ = sigma_offset + sigma_scale · timestep`, and `dx/dσ = output_sign · output`."""

    sigma_offset: float = 0.0
    sigma_scale: float = 1.0
    output_sign: float = 1.0

    def sigma(self, timestep: torch.Tensor | float) -> float:
        """σ of the step the transformer is asked to evaluate."""
        t = timestep.flatten()[0].item() if isinstance(timestep, torch.Tensor) else float(timestep)
        return self.sigma_offset + self.sigma_scale * t


ADAPTERS: dict[str, ModelAdapter] = {
    # FluxPipeline passes timestep / 1000, which is σ itself.
    "FluxTransformer2DModel": ModelAdapter(),
}


def adapter_for(transformer: torch.nn.Module) -> ModelAdapter:
    """The adapter for a transformer instance, found from its class."""
    name = type(transformer).__name__
    if name not in ADAPTERS:
        supported = ", ".join(sorted(ADAPTERS))
        raise MeanCacheError(
            f"{name} is not a supported flow-matching transformer: MeanCache supports {supported}"
        )
    return ADAPTERS[name]
