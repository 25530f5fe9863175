"""The embedded "hard" model: an exactly known flow, wrapped as a real ``diffusers.FluxPipeline``.

On the demo model every method's 10-step output looks like the 50-step one, so a benchmark there cannot tell
a good cache recipe from a fragile one. Real text-to-image models commit late and sharply; this model does
too, by construction, and its difficulty is a set of documented knobs instead of an accident of training.

The data distribution lives in the demo VAE's latent space (FluxPipeline's convention: shifted, scaled and
packed): a mixture of small isotropic Gaussians ``N(μ_k, s² I)``, each ``μ_k`` the latent of one procedurally
rendered demo image ("a red circle on a blue background" at one position and size), 16 per caption, placed
evenly on a line through (size, x, y). The flow ``x_σ = (1 − σ)·x0 + σ·ε`` then has the closed-form velocity
``v = E[ε − x0 | x_σ]``: with ``a = 1 − σ``, ``b = σ`` and ``V = a²s² + b²``, component ``k`` is responsible
for ``x`` in proportion to ``w_k · N(x; a·μ_k, V·I)``, and given ``k``,
``E[ε − x0 | x, k] = (b − a·s²)/V · (x − a·μ_k) − μ_k``.

The prompt sets the weights ``w_k`` like a text-conditioned model: the transformer reads the pooled CLIP
embedding and the T5 token states FluxPipeline passes, subtracts the empty prompt's, and takes a softmax over
captions of ``temperature × ⟨feature, caption key⟩`` (keys precomputed from each caption's own embeddings,
normalised so that a caption's own prompt scores about ``temperature``); a caption's components share its
weight. The empty prompt (true CFG's negative branch) has feature 0 and so gives every component the same
weight: the unconditional model is the whole mixture.

Why it is hard: a trajectory decides late where on its caption's line it lands, and a coarse Euler step
misjudges that; the pipeline's scheduler (``hard_pipeline/scheduler``, a shift of 0.8 at every size instead of the
demo's 3) spaces a 10-step run's σ about evenly, coarse where those decisions are made.
``python -m meancache_cli.models.build_hard`` regenerates ``hard_pipeline/``; docs/models.md has the measured
difficulty.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from ..errors import MeanCacheError
from .demo import DEMO_DIR, MAX_SEQUENCE_LENGTH

if TYPE_CHECKING:
    from diffusers import FluxPipeline

HARD_DIR = Path(__file__).parent / "hard_pipeline"
HEIGHT = WIDTH = 32  # the demo VAE's native size: latents 4x16x16, packed into 64 tokens of 16 channels


class MixtureFlowTransformer2DModel(ModelMixin, ConfigMixin, CacheMixin):
    """The exact velocity of a Gaussian-mixture flow, behind FluxTransformer2DModel's call signature.

    Buffers: ``quantized_means`` (K, D) int8, the packed latents μ_k flattened, in steps of
    ``config.mean_step``; ``component_caption`` (K,), each component's caption index; ``caption_keys``
    (P, F) float16; ``null_pooled`` and ``null_text``, the empty prompt's pooled CLIP embedding and T5 token states.
    Everything is computed in float64, whatever the pipeline's dtype.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        in_channels: int = 16,
        latent_tokens: int = 64,
        num_components: int = 1,
        captions: tuple[str, ...] = ("",),
        data_std: float = 0.05,
        temperature: float = 20.0,
        mean_step: float = 1.0,
        pooled_projection_dim: int = 64,
        joint_attention_dim: int = 64,
        text_tokens: int = MAX_SEQUENCE_LENGTH,
        pooled_scale: float = 1.0,
        text_scale: float = 1.0,
        guidance_embeds: bool = False,
        height: int = HEIGHT,
        width: int = WIDTH,
        build: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        latent_dim = latent_tokens * in_channels
        feature_dim = pooled_projection_dim + text_tokens * joint_attention_dim
        self.register_buffer("quantized_means", torch.zeros(num_components, latent_dim, dtype=torch.int8))
        self.register_buffer("component_caption", torch.zeros(num_components, dtype=torch.long))
        self.register_buffer("caption_keys", torch.zeros(len(captions), feature_dim, dtype=torch.float16))
        self.register_buffer("null_pooled", torch.zeros(pooled_projection_dim))
        self.register_buffer("null_text", torch.zeros(text_tokens, joint_attention_dim))
        self._float64: tuple[tuple, dict[str, torch.Tensor]] | None = None

    def _tensors64(self) -> dict[str, torch.Tensor]:
        """The buffers in float64 (converted once, again only when a buffer changes or moves)."""
        names = ("quantized_means", "component_caption", "caption_keys", "null_pooled", "null_text")
        key = tuple((getattr(self, n).data_ptr(), getattr(self, n)._version, getattr(self, n).device) for n in names)
        if self._float64 is None or self._float64[0] != key:
            tensors = {n: getattr(self, n).double() for n in ("caption_keys", "null_pooled", "null_text")}
            tensors["means"] = self.quantized_means.double() * self.config.mean_step
            tensors["means_sq"] = (tensors["means"] ** 2).sum(1)
            counts = torch.bincount(self.component_caption, minlength=len(self.config.captions))
            tensors["log_share"] = -counts.double().log()[self.component_caption]  # a caption's weight, split
            self._float64 = (key, tensors)
        return self._float64[1]

    @property
    def means(self) -> torch.Tensor:
        """(K, D) float64 component means, in FluxPipeline's packed latent space."""
        return self._tensors64()["means"]

    def text_features(self, pooled: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, F) prompt features relative to the empty prompt's: pooled CLIP, then the T5 states (the first
        `text_tokens` of them; a shorter sequence counts as the empty prompt's beyond its end)."""
        t = self._tensors64()
        pooled = (pooled.double() - t["null_pooled"]) / self.config.pooled_scale
        tokens = min(text.shape[1], self.config.text_tokens)
        states = torch.zeros(text.shape[0], *t["null_text"].shape, dtype=torch.float64, device=text.device)
        states[:, :tokens] = text[:, :tokens].double() - t["null_text"][:tokens]
        return torch.cat([pooled, states.flatten(1) / self.config.text_scale], dim=1)

    def log_weights(self, pooled: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, K) log mixture weights: a softmax over captions, each caption's weight split evenly among its
        components."""
        t = self._tensors64()
        logits = self.config.temperature * self.text_features(pooled, text) @ t["caption_keys"].T
        return torch.log_softmax(logits, dim=1)[:, self.component_caption] + t["log_share"]

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
        """E[ε − x0 | x_σ = x] for flattened latents x (B, D), σ (B,) and log-weights (B, K), in float64."""
        t = self._tensors64()
        x, sigma = x.double(), sigma.double()
        a, b, s2 = (1 - sigma)[:, None], sigma[:, None], self.config.data_std**2
        variance = a * a * s2 + b * b
        # log N(x; a μ_k, V I) up to terms that do not depend on k; softmax subtracts the largest (log-sum-exp)
        logits = log_weights + (a * (x @ t["means"].T) - 0.5 * a * a * t["means_sq"]) / variance
        posterior_mean = torch.softmax(logits, dim=1) @ t["means"]
        return (b - a * s2) / variance * (x - a * posterior_mean) - posterior_mean

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        pooled_projections: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        img_ids: torch.Tensor | None = None,
        txt_ids: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        controlnet_block_samples: Any = None,
        controlnet_single_block_samples: Any = None,
        return_dict: bool = True,
        controlnet_blocks_repeat: bool = False,
    ) -> tuple[torch.Tensor] | Transformer2DModelOutput:
        """FluxTransformer2DModel's signature; `timestep` is σ (FluxPipeline passes t / 1000). The ids, guidance
        and attention arguments are accepted and unused: the velocity depends on the latents, σ and the prompt."""
        batch, tokens, channels = hidden_states.shape
        if tokens * channels != self.quantized_means.shape[1]:
            raise MeanCacheError(
                f"the hard model generates {self.config.height}x{self.config.width} images only "
                f"({self.config.latent_tokens} latent tokens, got {tokens}): use --height "
                f"{self.config.height} --width {self.config.width}"
            )
        if encoder_hidden_states is None or pooled_projections is None or timestep is None:
            raise ValueError("the hard model needs the latents, the timestep and the prompt's encoder_hidden_states "
                             "and pooled_projections")
        sigma = torch.as_tensor(timestep, device=hidden_states.device).flatten().expand(batch)
        log_weights = self.log_weights(pooled_projections, encoder_hidden_states)
        velocity = self.velocity(hidden_states.reshape(batch, -1), sigma, log_weights)
        sample = velocity.reshape(hidden_states.shape).to(hidden_states.dtype)
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)

def load_hard_transformer(directory: Path | str = HARD_DIR / "transformer") -> MixtureFlowTransformer2DModel:
    """The shipped mixture parameters (means as int8 steps, keys float16; computed in float64)."""
    return MixtureFlowTransformer2DModel.from_pretrained(directory, local_files_only=True).eval()


def load_hard_pipeline(torch_dtype: torch.dtype = torch.float32, directory: Path | str = HARD_DIR) -> FluxPipeline:
    """The hard model as a FluxPipeline, offline: the demo's tokenizers, text encoders and VAE (from
    `demo_pipeline/`) around the mixture-flow transformer and the scheduler in `directory`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    directory = Path(directory)
    transformer = load_hard_transformer(directory / "transformer")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(directory / "scheduler", local_files_only=True)
    # FluxPipeline's annotation names FluxTransformer2DModel: from_pretrained logs "Expected types for
    # transformer" for ours, which has the same call signature. Only that logger is quietened, only here.
    type_check = logging.getLogger("diffusers.pipelines.pipeline_utils")
    level = type_check.level
    type_check.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # newer diffusers prefer `dtype=` and warn about `torch_dtype=`, which older releases need.
            warnings.simplefilter("ignore", FutureWarning)
            return FluxPipeline.from_pretrained(DEMO_DIR, transformer=transformer, scheduler=scheduler,
                                                torch_dtype=torch_dtype, local_files_only=True)
    finally:
        type_check.setLevel(level)
