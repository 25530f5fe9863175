"""MeanCache on a compiled transformer, and on transformers whose class is not one of diffusers' own.

Graphs are counted by a dynamo backend that runs each graph as traced (like the `eager` backend: dynamo traces,
guards and recompiles as it does for inductor, without a C++ build) and counts how many it was handed. The hook's
bookkeeping runs outside the compiled code, so a cached generation compiles the model's graph and no per-step
variant of it. Outputs are compared to eager within a float32 tolerance, not bit for bit: a compiled graph may
order its floating-point work differently on another CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch._dynamo
from diffusers import FluxTransformer2DModel
from peft import LoraConfig
from tiny import TINY_CALL, tiny_flux_pipeline
from torchao.quantization import Int8WeightOnlyConfig, quantize_

from meancache_cli import Schedule, apply_meancache, remove_meancache
from meancache_cli.errors import MeanCacheError
from meancache_cli.hooks import apply_evaluation_counter
from meancache_cli.models.adapters import ADAPTERS, adapter_for

PROMPT = "a red circle on a blue background"
N = 12
CACHED = Schedule(model="tiny", num_inference_steps=N, compute_steps=[0, 1, 2, 6, 7, 8], orders=[0, 1, 2, 1, 1, 2],
                  lambdas=[0.0, 1.0, 0.5, 1.0, 0.5, 1.0])
B = len(CACHED.compute_steps)
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


class GraphCounter:
    """A dynamo backend: runs each graph it is handed as traced, and counts them."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.graphs += 1
        return graph.forward


@pytest.fixture
def backend():
    torch._dynamo.reset()
    yield GraphCounter()
    torch._dynamo.reset()


def latents(pipe, seed: int = 0) -> torch.Tensor:
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), num_inference_steps=N, output_type="latent",
                **TINY_CALL).images


@pytest.fixture(scope="module")
def eager() -> dict[str, torch.Tensor]:
    """The eager pipeline's final latents, uncached and cached."""
    pipe = tiny_flux_pipeline()
    uncached = latents(pipe)
    apply_meancache(pipe, CACHED)
    return {"uncached": uncached, "cached": latents(pipe)}


def compile_module(pipe, backend) -> None:
    pipe.transformer.compile(backend=backend)


def wrap_module(pipe, backend) -> None:
    pipe.transformer = torch.compile(pipe.transformer, backend=backend)


def compile_blocks(pipe, backend) -> None:
    pipe.transformer.compile_repeated_blocks(fullgraph=True, backend=backend)


@pytest.mark.parametrize("compile_transformer", [compile_module, wrap_module, compile_blocks])
def test_a_cached_generation_compiles_no_graph_per_step(compile_transformer, backend, eager) -> None:
    """`transformer.compile()`, `torch.compile(transformer)` and `compile_repeated_blocks`: the first cached
    generation compiles at most 3 graphs (the model's own, traced again beneath the hook), the next one none; B real
    evaluations; the outputs are eager's."""
    pipe = tiny_flux_pipeline()
    compile_transformer(pipe, backend)
    counter = apply_evaluation_counter(pipe)
    uncached = latents(pipe)
    compiled_uncached = backend.graphs
    apply_meancache(pipe, CACHED)
    cached = latents(pipe)
    compiled_cached = backend.graphs - compiled_uncached
    again = latents(pipe)
    assert compiled_uncached >= 1 and compiled_cached <= 3
    assert backend.graphs == compiled_uncached + compiled_cached  # the second cached generation compiled nothing
    assert counter.evaluations == N + 2 * B
    torch.testing.assert_close(uncached, eager["uncached"], **TOLERANCE)
    torch.testing.assert_close(cached, eager["cached"], **TOLERANCE)
    torch.testing.assert_close(again, cached, **TOLERANCE)
    remove_meancache(pipe)
    torch.testing.assert_close(latents(pipe), eager["uncached"], **TOLERANCE)
    assert counter.evaluations == 2 * N + 2 * B


def with_lora(pipe) -> None:
    torch.manual_seed(1)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                            target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_out"]))


def with_int8_weights(pipe) -> None:
    quantize_(pipe.transformer, Int8WeightOnlyConfig())


@pytest.mark.parametrize("modify", [with_lora, with_int8_weights])
def test_lora_and_int8_weights_compose_with_transformer_compile(modify, backend) -> None:
    """The stack GPU users run: a LoRA adapter (peft) or torchao int8 weights, `transformer.compile()`, MeanCache."""
    reference = tiny_flux_pipeline()
    modify(reference)
    apply_meancache(reference, CACHED)
    expected = latents(reference)
    pipe = tiny_flux_pipeline()
    modify(pipe)
    pipe.transformer.compile(backend=backend)
    apply_meancache(pipe, CACHED)
    cached = latents(pipe)
    compiled = backend.graphs
    latents(pipe)
    assert 1 <= compiled <= 3 and backend.graphs == compiled
    torch.testing.assert_close(cached, expected, **TOLERANCE)


class TunedFlux(FluxTransformer2DModel):
    """A fine-tune's own class: a subclass of a supported transformer."""

    def describe(self) -> str:
        return "tuned"


def test_a_subclass_of_a_supported_transformer_gets_its_base_adapter(eager) -> None:
    pipe = tiny_flux_pipeline()
    tuned = TunedFlux.from_config(pipe.transformer.config)
    tuned.load_state_dict(pipe.transformer.state_dict())
    pipe.transformer = tuned.eval().requires_grad_(False)
    assert adapter_for(pipe.transformer) is ADAPTERS["FluxTransformer2DModel"]
    apply_meancache(pipe, CACHED)
    torch.testing.assert_close(latents(pipe), eager["cached"], **TOLERANCE)


def test_an_unknown_transformer_is_refused_in_one_line_even_compiled() -> None:
    with pytest.raises(MeanCacheError, match=r"^Linear is not a supported flow-matching transformer") as error:
        adapter_for(torch.compile(torch.nn.Linear(2, 2)))
    assert "\n" not in str(error.value)
