"""MeanCache on a quantized transformer: torchao int8 weight-only, loaded through diffusers' TorchAoConfig.

It is the quantization diffusers supports that runs on the CPU here (bitsandbytes' diffusers quantizer refuses a
machine without a GPU; docs/models.md). The hook reads only the transformer's inputs and outputs, so a quantized
model must give B real evaluations and finite outputs, and B = N must be its own uncached run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel, TorchAoConfig
from tiny import TINY_CALL, ForwardCounter, tiny_flux_pipeline
from torchao.quantization import Int8Tensor, Int8WeightOnlyConfig

from meancache_cli import Schedule, apply_meancache, remove_meancache

PROMPT = "a red circle on a blue background"
N = 10
CACHED = Schedule(model="tiny", num_inference_steps=N, compute_steps=[0, 1, 2, 5, 7], orders=[0, 1, 1, 1, 1],
                  lambdas=[0.0, 1.0, 0.5, 1.0, 1.0])


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """The tiny FLUX pipeline, and the same with its transformer loaded int8 weight-only from the saved weights."""
    plain = tiny_flux_pipeline()
    path = tmp_path_factory.mktemp("tiny-flux-transformer")
    plain.transformer.save_pretrained(path)
    quantized = tiny_flux_pipeline()
    quantized.transformer = FluxTransformer2DModel.from_pretrained(
        path, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()), torch_dtype=torch.float32)
    return plain, quantized


def run(pipe, seed: int = 0) -> np.ndarray:
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), num_inference_steps=N, output_type="latent",
                **TINY_CALL).images.numpy()


def test_the_weights_are_int8_and_change_the_output(pipes) -> None:
    plain, quantized = pipes
    assert isinstance(quantized.transformer.transformer_blocks[0].attn.to_q.weight, Int8Tensor)
    assert not np.array_equal(run(plain), run(quantized))


def test_int8_weights_run_budget_evaluations_with_finite_outputs(pipes) -> None:
    _, pipe = pipes
    counter = ForwardCounter(pipe.transformer.x_embedder)
    reference = run(pipe, seed=4)
    apply_meancache(pipe, CACHED)
    try:
        cached = run(pipe, seed=4)
        apply_meancache(pipe, Schedule(model="tiny", num_inference_steps=N, compute_steps=list(range(N)),
                                       orders=[0] * N))
        every_step = run(pipe, seed=4)
    finally:
        remove_meancache(pipe)
    assert counter.calls == N + len(CACHED.compute_steps) + N
    assert np.isfinite(cached).all() and not np.array_equal(cached, reference)
    assert np.array_equal(every_step, reference)
