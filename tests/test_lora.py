"""MeanCache on a transformer with a LoRA adapter loaded through peft, as diffusers loads one.

The adapter's weights are random and nonzero (`init_lora_weights=False`), so it changes every evaluation: a cache
that ran the base model, or lost the adapter on a skipped step's bookkeeping, would show.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig
from tiny import TINY_CALL, ForwardCounter, tiny_flux_pipeline

import meancache_cli as mc
from meancache_cli import Schedule, apply_meancache, remove_meancache

PROMPT = "a red circle on a blue background"
N = 10
CFG = {"true_cfg_scale": 3.0, "negative_prompt": "a green star"}


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_flux_pipeline()
    torch.manual_seed(1)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                            target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_out"]),
                                 adapter_name="style")
    return pipe


def run(pipe, seed: int = 0, **kwargs) -> np.ndarray:
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), num_inference_steps=N, output_type="np",
                **TINY_CALL, **kwargs).images


def test_the_adapter_changes_the_output(pipe) -> None:
    adapted = run(pipe)
    pipe.transformer.disable_adapters()
    try:
        base = run(pipe)
    finally:
        pipe.transformer.enable_adapters()
    assert np.abs(adapted - base).max() > 1e-3


@pytest.mark.parametrize("cfg", [{}, CFG])
def test_budget_equal_to_steps_is_the_adapted_run_bit_for_bit(pipe, cfg: dict) -> None:
    reference = run(pipe, seed=3, **cfg)
    apply_meancache(pipe, Schedule(model="tiny", num_inference_steps=N, compute_steps=list(range(N)), orders=[0] * N))
    try:
        cached = run(pipe, seed=3, **cfg)
    finally:
        remove_meancache(pipe)
    assert np.array_equal(reference, cached)


def test_calibrated_with_the_adapter_then_cached_at_budget(pipe) -> None:
    """Calibrate on the adapted model, plan B = 5, generate: B real evaluations per branch, finite output."""
    call = {**TINY_CALL, "num_inference_steps": N}
    calibration = mc.calibrate(pipe, [PROMPT, "a blue star"], [0], model="tiny-lora", max_back=2, **call)
    pipe.transformer.disable_adapters()
    try:
        base = mc.calibrate(pipe, [PROMPT, "a blue star"], [0], model="tiny-lora", max_back=2, **call)
    finally:
        pipe.transformer.enable_adapters()
    assert calibration.trajectories == 2 and np.isfinite(calibration.errors.reuse).any()
    assert not np.allclose(calibration.errors.reuse, base.errors.reuse, equal_nan=True)  # it saw the adapter
    schedule = mc.plan(calibration, 5)
    counter = ForwardCounter(pipe.transformer.x_embedder)
    apply_meancache(pipe, schedule)
    try:
        plain, guided = run(pipe), run(pipe, **CFG)
    finally:
        remove_meancache(pipe)
    assert counter.calls == 5 + 2 * 5
    assert np.isfinite(plain).all() and np.isfinite(guided).all()
    assert not np.array_equal(plain, run(pipe))
