import warnings
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
import torch
from oracle import CallLog, linear_cfg, replay
from tiny import TINY_CALL, ForwardCounter, tiny_flux_pipeline

from meancache_cli import MeanCacheConfig, Schedule, apply_meancache, load_schedule, remove_meancache, save_schedule
from meancache_cli.calibration import MapSettings, run_calibration
from meancache_cli.errors import ScheduleMismatchError
from meancache_cli.generate import generate
from meancache_cli.hooks import ScheduleMappedWarning, apply_evaluation_counter, apply_recorder, remove_recorder
from meancache_cli.models.adapters import ModelAdapter
from meancache_cli.models.registry import load_pipeline, resolve_model

PROMPT = "a red circle on a blue background"
N = 12


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux_pipeline()


def run(pipe, seed: int = 0, **kwargs) -> np.ndarray:
    args = {**TINY_CALL, "num_inference_steps": N, "output_type": "np", **kwargs}
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), **args).images


def schedule(steps: list[int], orders: list[int], lambdas: list[float] | None = None) -> Schedule:
    return Schedule(model="tiny", num_inference_steps=N, compute_steps=steps, orders=orders, lambdas=lambdas or [])


CACHED = schedule([0, 1, 2, 6, 7, 8], [0, 1, 2, 1, 1, 2], [0.0, 1.0, 0.5, 1.0, 0.5, 1.0])
B = len(CACHED.compute_steps)
# Exponential edges beside JVP and reuse ones: 3→7 reads step 2, 7→9 its second previous compute step (2 again);
# 9→12 ends at σ = 0 and 2→3 would read σ_p = 1 (p = 0), where the exponential edge is first order (c = 0).
MIXED = Schedule(model="tiny", num_inference_steps=N, compute_steps=[0, 2, 3, 7, 9], orders=[0, 1, 1, 2, 1],
                 lambdas=[0.0, 1.0, 1.0, 1.0, 1.0], kinds=["reuse", "jvp", "exp", "exp", "exp"])


def test_runs_exactly_budget_real_forwards(pipe) -> None:
    counter = ForwardCounter(pipe.transformer.x_embedder)
    apply_meancache(pipe, CACHED)
    try:
        run(pipe)
    finally:
        remove_meancache(pipe)
    assert counter.calls == B
    run(pipe)
    assert counter.calls == B + N


def test_exponential_edges_run_budget_forwards_and_change_the_output(pipe) -> None:
    counter = ForwardCounter(pipe.transformer.x_embedder)
    as_jvp = replace(MIXED, kinds=["reuse", "jvp", "jvp", "jvp", "jvp"])
    outputs = []
    for plan in (MIXED, as_jvp):
        apply_meancache(pipe, plan)
        try:
            outputs.append(run(pipe, seed=4))
        finally:
            remove_meancache(pipe)
    assert counter.calls == 2 * MIXED.budget
    assert not np.allclose(outputs[0], outputs[1], atol=1e-6)
    # Second-order exponential edges (σ_p < 1, σ_s > 0), or they would all be plain reuse and the replay below
    # would not check the formula.
    steps = MIXED.compute_steps
    assert [e.start for i, e in enumerate(MIXED.edges) if e.kind == "exp" and steps[i - e.order] > 0 and e.end < N] == [
        3, 7]


def test_true_cfg_runs_budget_forwards_per_branch(pipe) -> None:
    counter = ForwardCounter(pipe.transformer.x_embedder)
    apply_meancache(pipe, CACHED)
    try:
        run(pipe, true_cfg_scale=3.0, negative_prompt="a black square on a white background")
    finally:
        remove_meancache(pipe)
    assert counter.calls == 2 * B


@pytest.mark.parametrize("cfg", [{}, {"true_cfg_scale": 3.0, "negative_prompt": "a green star"}])
def test_budget_equal_to_steps_is_bit_identical_to_uncached(pipe, cfg: dict) -> None:
    reference = run(pipe, seed=3, **cfg)
    apply_meancache(pipe, schedule(list(range(N)), [0] * N))
    try:
        cached = run(pipe, seed=3, **cfg)
    finally:
        remove_meancache(pipe)
    assert np.array_equal(reference, cached)


def test_consecutive_generations_are_identical(pipe) -> None:
    apply_meancache(pipe, CACHED)
    try:
        first, second = run(pipe, seed=5), run(pipe, seed=5)
    finally:
        remove_meancache(pipe)
    assert np.array_equal(first, second)
    assert not np.array_equal(first, run(pipe, seed=5))


@pytest.mark.parametrize("cfg", [None, 2.5])
@pytest.mark.parametrize("plan", [CACHED, MIXED], ids=["jvp", "exp"])
def test_cached_latents_equal_an_independent_replay(pipe, cfg: float | None, plan: Schedule) -> None:
    """The hooked pipeline against tests/oracle.py, which runs the bare transformer and the estimator formulas
    itself; with true CFG the two branches see different prompts, so their histories differ."""
    guidance = {"true_cfg_scale": cfg, "negative_prompt": "a black square on a white background"} if cfg else {}
    branches = 2 if cfg else 1
    log = CallLog(pipe.transformer)
    apply_meancache(pipe, plan)
    try:
        final = pipe(PROMPT, generator=torch.Generator().manual_seed(7), output_type="latent",
                     **{**TINY_CALL, "num_inference_steps": N}, **guidance).images
    finally:
        remove_meancache(pipe)
        log.close()
    assert len(log.calls) == N * branches
    if cfg:
        assert not torch.equal(log.calls[0]["encoder_hidden_states"], log.calls[1]["encoder_hidden_states"])
    xs = replay(pipe.transformer, log, plan.compute_steps, plan.orders, plan.lambdas,
                [float(s) for s in pipe.scheduler.sigmas], branches, linear_cfg(cfg) if cfg else (lambda o: o[0]),
                plan.kinds)
    for m in range(1, N):
        torch.testing.assert_close(log.latents(m * branches), xs[m], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(final.float(), xs[N], rtol=1e-5, atol=1e-6)


def test_release_estimator_runs_its_own_hook_with_exactly_budget_forwards(pipe) -> None:
    shipped = load_schedule("qwen-image/authors-b10")
    release = Schedule(model="tiny", num_inference_steps=N, compute_steps=[0, 1, 3, 7, 9, 11],
                       orders=[0, 2, 1, 3, 1, 0], estimator="release")
    counter = ForwardCounter(pipe.transformer.x_embedder)
    hook = apply_meancache(pipe, release)
    try:
        cached = run(pipe, seed=2)
    finally:
        remove_meancache(pipe)
    assert type(hook).__name__ == "ReleaseEstimatorHook" and shipped.estimator == "release"
    assert counter.calls == 6
    as_reuse = schedule(release.compute_steps, [0] * 6)
    apply_meancache(pipe, as_reuse)
    try:
        reused = run(pipe, seed=2)
    finally:
        remove_meancache(pipe)
    assert not np.allclose(cached, reused, atol=1e-6)  # windows 2 and 3 re-estimate inside their edges


def test_schedule_for_other_step_count_is_mapped_by_sigma_or_refused_when_strict(pipe) -> None:
    counter = ForwardCounter(pipe.transformer.x_embedder)
    apply_meancache(pipe, CACHED)
    try:
        with pytest.warns(ScheduleMappedWarning, match="planned for 12 steps runs on this generation's 8-step sigmas, "
                          r"mapped by σ: compute steps 0 1 2 4 5 6 \(6 evaluations per branch\)"):
            run(pipe, num_inference_steps=8)
        with warnings.catch_warnings():  # the same grid again: mapped once, said once
            warnings.simplefilter("error", ScheduleMappedWarning)
            run(pipe, num_inference_steps=8)
    finally:
        remove_meancache(pipe)
    assert counter.calls == 2 * B
    apply_meancache(pipe, CACHED, strict=True)
    try:
        with pytest.raises(ScheduleMismatchError, match="planned for num_inference_steps=12 but the pipeline runs 8"):
            run(pipe, num_inference_steps=8)
        # An aborted generation does not poison the next one.
        counter = ForwardCounter(pipe.transformer.x_embedder)
        run(pipe)
        assert counter.calls == B
    finally:
        remove_meancache(pipe)


def test_evaluation_counter_counts_only_real_forwards(pipe) -> None:
    counter = apply_evaluation_counter(pipe)
    start = counter.evaluations
    apply_meancache(pipe, CACHED)
    try:
        run(pipe)
    finally:
        remove_meancache(pipe)
    assert counter.evaluations - start == B


def test_recorder_keeps_one_trajectory_per_branch(pipe) -> None:
    recorder = apply_recorder(pipe)
    try:
        run(pipe, true_cfg_scale=2.0, negative_prompt="a white star")
    finally:
        remove_recorder(pipe)
    trajectories = recorder.trajectories()
    assert len(trajectories) == 2
    assert trajectories[0].velocities.shape == (N, 1, 64, 16)
    assert not torch.equal(trajectories[0].velocities, trajectories[1].velocities)
    torch.testing.assert_close(trajectories[0].x0, trajectories[1].x0)


def test_hooks_survive_model_cpu_offload(model_dir) -> None:
    """enable_model_cpu_offload re-wraps the transformer's forward at the end of every pipeline call (its CPU
    code path does the same as on an accelerator): recorder, counter and MeanCache must stay in place."""
    spec = resolve_model(model_dir)
    plain, offloaded = load_pipeline(spec), load_pipeline(spec, offload=True)
    assert hasattr(offloaded.transformer, "_hf_hook")
    kwargs = {**TINY_CALL, "num_inference_steps": N}
    prompts, seeds = [PROMPT, "a green star"], [0, 1]
    expected = run_calibration(plain, spec.name, prompts, seeds, kwargs, MapSettings(max_back=2), holdout=0)
    got = run_calibration(offloaded, spec.name, prompts, seeds, kwargs, MapSettings(max_back=2), holdout=0)
    assert got.trajectories == expected.trajectories == 4
    for name in ("reuse", "jvp"):
        np.testing.assert_allclose(getattr(got.errors, name), getattr(expected.errors, name), rtol=1e-5, atol=1e-9,
                                   equal_nan=True)
    counter = ForwardCounter(offloaded.transformer.x_embedder)
    reference = generate(plain, PROMPT, 5, kwargs, CACHED, output_type="np").images
    for _ in range(2):
        result = generate(offloaded, PROMPT, 5, kwargs, CACHED, output_type="np")
        # Offloading runs another code path (accelerate's device moves): float32 tolerance, not bit-equality.
        assert result.nfe == B
        np.testing.assert_allclose(np.asarray(result.images), np.asarray(reference), rtol=0,
                                   atol=50 * np.finfo(np.float32).eps)
    assert counter.calls == 2 * B
    assert generate(offloaded, PROMPT, 5, kwargs, output_type="np").nfe == N
    assert counter.calls == 2 * B + N


def denoise(pipe, order_at: Callable[[int], tuple[str, str]], named: bool, seed: int = 9) -> torch.Tensor:
    """A hand-written true-CFG loop over the pipeline's public parts (scale 2.5): at each step the branches
    are called in the order `order_at(step)` gives, inside `cache_context` when `named`."""
    from contextlib import nullcontext

    embeds = {name: pipe.encode_prompt(prompt, prompt, max_sequence_length=TINY_CALL["max_sequence_length"])
              for name, prompt in (("cond", PROMPT), ("uncond", "a black square on a white background"))}
    latents, image_ids = pipe.prepare_latents(1, pipe.transformer.config.in_channels // 4, 32, 32, torch.float32,
                                              "cpu", torch.Generator().manual_seed(seed))
    pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / N, N), mu=1.0)
    pipe.scheduler.set_begin_index(0)
    for step, t in enumerate(pipe.scheduler.timesteps):
        outputs = {}
        for name in order_at(step):
            prompt_embeds, pooled, text_ids = embeds[name]
            with pipe.transformer.cache_context(name) if named else nullcontext():
                outputs[name] = pipe.transformer(hidden_states=latents, timestep=t.expand(1) / 1000, guidance=None,
                                                 pooled_projections=pooled, encoder_hidden_states=prompt_embeds,
                                                 txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
        velocity = outputs["uncond"] + 2.5 * (outputs["cond"] - outputs["uncond"])
        latents = pipe.scheduler.step(velocity, t, latents, return_dict=False)[0]
    return latents


def test_guidance_branches_are_keyed_by_the_pipelines_cache_context(pipe) -> None:
    """FLUX names its calls "cond" and "uncond": a loop that swaps their order at odd steps gets the same
    cached output as the usual order. Without names the hook falls back to call order and mixes them up."""
    usual = lambda step: ("cond", "uncond")  # noqa: E731
    swapped = lambda step: ("uncond", "cond") if step % 2 else ("cond", "uncond")  # noqa: E731
    outputs = {}
    for key, order, named in (("usual", usual, True), ("swapped", swapped, True), ("unnamed", swapped, False)):
        hook = apply_meancache(pipe, CACHED)
        try:
            outputs[key] = denoise(pipe, order, named)
            assert set(hook.branches) == ({"cond", "uncond"} if named else {0, 1})
        finally:
            remove_meancache(pipe)
    assert torch.equal(outputs["usual"], outputs["swapped"])
    assert not torch.allclose(outputs["usual"], outputs["unnamed"], atol=1e-4)


def test_a_config_object_applies_like_the_schedule_itself(pipe, tmp_path) -> None:
    path = tmp_path / "s.yaml"
    save_schedule(CACHED, path)
    results = []
    for config in (CACHED, MeanCacheConfig(schedule=str(path)), MeanCacheConfig(CACHED, adapter=ModelAdapter())):
        hook = apply_meancache(pipe, config)
        try:
            results.append(run(pipe, seed=6))
        finally:
            remove_meancache(pipe)
        assert hook.schedule == CACHED and hook.config.adapter == ModelAdapter()
    assert all(np.array_equal(results[0], other) for other in results[1:])


def test_full_evaluation_counter_counts_real_evaluations_only() -> None:
    from tiny import TINY_CALL, tiny_flux_pipeline

    from meancache_cli.bench.peers import fbcache_method, meancache_method
    from meancache_cli.hooks import apply_evaluation_counter, remove_evaluation_counter
    from meancache_cli.planning import uniform_schedule

    pipe = tiny_flux_pipeline()
    counter = apply_evaluation_counter(pipe, beneath_block_caches=True)
    block_calls = []
    pipe.transformer.single_transformer_blocks[-1].register_forward_pre_hook(lambda *_: block_calls.append(1))
    for method, expected in ((meancache_method("reuse", uniform_schedule("tiny", 12, 4)), 4),
                             (fbcache_method(4, 12, 0.3), None)):
        before, block_calls[:] = counter.evaluations, []
        with method.applied(pipe):
            pipe("a red circle", num_inference_steps=12, generator=torch.Generator().manual_seed(0),
                 output_type="latent", **TINY_CALL)
        if expected is not None:
            assert counter.evaluations - before == expected
        else:  # FirstBlockCache calls the last block at every step, but runs it only when it recomputes
            assert len(block_calls) == 12 and 1 <= counter.evaluations - before < 12
    remove_evaluation_counter(pipe)
    before = counter.evaluations
    pipe("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="latent",
         **TINY_CALL)
    assert counter.evaluations == before and len(block_calls) == 12 + 3  # removed from the block it sat on


def test_full_evaluation_counter_counts_a_transformer_without_blocks() -> None:
    """The hard model's transformer has no blocks to probe: the counter sits beneath MeanCache's hook there."""
    import contextlib

    from meancache_cli.bench.peers import meancache_method
    from meancache_cli.hooks import apply_evaluation_counter, remove_evaluation_counter
    from meancache_cli.models.hard import load_hard_pipeline
    from meancache_cli.planning import uniform_schedule

    pipe = load_hard_pipeline()
    counter = apply_evaluation_counter(pipe, beneath_block_caches=True)
    call = {"num_inference_steps": 12, "height": 32, "width": 32, "max_sequence_length": 16, "output_type": "latent"}
    reuse = meancache_method("reuse", uniform_schedule("hard", 12, 4))
    for method, guidance, expected in ((None, 1.0, 12), (reuse, 1.0, 4), (reuse, 4.0, 8)):
        before = counter.evaluations
        with method.applied(pipe) if method is not None else contextlib.nullcontext():
            pipe("a red circle on a blue background", generator=torch.Generator().manual_seed(0),
                 true_cfg_scale=guidance, negative_prompt="" if guidance > 1 else None, **call)
        assert counter.evaluations - before == expected
    remove_evaluation_counter(pipe)


def test_outputs_keep_their_structure_when_the_sample_is_replaced() -> None:
    """Tuples and dataclasses, a batch tensor or a list of per-sample tensors (Z-Image): the hook reads the sample
    as one batch and hands back the structure the pipeline expects, other fields untouched."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    from meancache_cli.hooks import output_sample, replace_output

    batch, new = torch.arange(6.0).reshape(2, 3), -torch.arange(6.0).reshape(2, 3)
    extra = torch.ones(1)
    for output in ((batch, extra), (list(batch.unbind(0)), extra), Transformer2DModelOutput(sample=batch),
                   Transformer2DModelOutput(sample=list(batch.unbind(0)))):
        assert torch.equal(output_sample(output), batch)
        replaced = replace_output(output, new)
        assert type(replaced) is type(output) and torch.equal(output_sample(replaced), new)
        sample = replaced[0] if isinstance(replaced, tuple) else replaced.sample
        original = output[0] if isinstance(output, tuple) else output.sample
        assert type(sample) is type(original)
        if isinstance(output, tuple):
            assert len(replaced) == 2 and replaced[1] is extra


def test_applying_again_replaces_the_hook_and_removal_leaves_none(pipe) -> None:
    from diffusers.hooks import HookRegistry

    from meancache_cli.hooks import MEANCACHE_HOOK, RECORDER_HOOK
    from meancache_cli.planning import uniform_schedule

    counter = ForwardCounter(pipe.transformer.x_embedder)
    apply_meancache(pipe, CACHED)
    apply_meancache(pipe, uniform_schedule("tiny", N, 3))
    try:
        run(pipe)
    finally:
        remove_meancache(pipe)
    assert counter.calls == 3  # the second schedule alone
    apply_recorder(pipe)
    remove_recorder(pipe)
    registry = HookRegistry.check_if_exists_or_initialize(pipe.transformer)
    assert registry.get_hook(MEANCACHE_HOOK) is None and registry.get_hook(RECORDER_HOOK) is None
    run(pipe)
    assert counter.calls == 3 + N


class _Toy(torch.nn.Module):
    """A 'transformer' with a nonlinear velocity field; FLUX-like signature and tuple output."""

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, return_dict: bool = False) -> tuple:
        sigma = timestep.reshape(-1, *([1] * (hidden_states.dim() - 1)))
        return (torch.sin(3 * hidden_states) * (1 + sigma) - hidden_states**2,)


def _release_loop(velocity, x: torch.Tensor, sigmas: list[float], compute: list[int], windows: list[int]):
    """The release's denoising loop as we read it, with its log lists (independent of the hook)."""
    n = len(sigmas) - 1
    edge_window = [0] * n
    for start, end, window in zip(compute, [*compute[1:], n], windows):
        edge_window[start:end] = [window] * (end - start)
    log = {"latents_pre": [], "sigmas_pre": [], "sigmas": [], "v": [], "latents": []}
    for i in range(n):
        if i in compute:
            v = velocity(x, sigmas[i])
        else:
            length = len(log["v"])
            i0, i1 = length - min(edge_window[i - 1], length), length - 1
            denom = log["sigmas"][i1] - log["sigmas_pre"][i0]
            avg_u = (log["latents"][i1] - log["latents_pre"][i0]) / denom
            jvp = (log["v"][i0] - avg_u) / denom
            v = log["v"][-1] - jvp * (sigmas[i + 1] - sigmas[i])
        log["latents_pre"].append(x)
        log["sigmas_pre"].append(sigmas[i])
        log["sigmas"].append(sigmas[i + 1])
        log["v"].append(v)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
        log["latents"].append(x)
    return x


def test_release_hook_matches_the_release_loop_step_by_step() -> None:
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.hooks import HookRegistry

    from meancache_cli.hooks import MEANCACHE_HOOK, ReleaseEstimatorHook, SigmaSource

    n = 20
    scheduler = FlowMatchEulerDiscreteScheduler()
    rig = SimpleNamespace(scheduler=scheduler)
    schedule = Schedule(model="toy", num_inference_steps=n, compute_steps=[0, 1, 2, 6, 11, 15],
                        orders=[0, 0, 2, 1, 3, 1], estimator="release")
    module = _Toy()
    hook = ReleaseEstimatorHook(MeanCacheConfig(schedule, ModelAdapter()), SigmaSource(rig))
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, MEANCACHE_HOOK)
    x0 = torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(0))
    calls = {"model": 0}

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        calls["model"] += 1
        return _Toy.forward(module, x, torch.tensor(sigma).expand(len(x)))[0]

    scheduler.set_timesteps(sigmas=torch.linspace(1.0, 0.0, n + 1)[:-1].tolist())
    sigmas = scheduler.sigmas
    expected = _release_loop(velocity, x0.clone(), sigmas.tolist(), schedule.compute_steps, schedule.orders)
    for _ in range(2):  # a second generation starts the schedule again from step 0
        scheduler.set_timesteps(sigmas=torch.linspace(1.0, 0.0, n + 1)[:-1].tolist())
        x = x0.clone()
        for i, t in enumerate(scheduler.timesteps):
            out = module(hidden_states=x, timestep=scheduler.sigmas[i].expand(2))[0]
            x = scheduler.step(out, t, x).prev_sample
        assert torch.allclose(x, expected, atol=1e-5)
    assert calls["model"] == schedule.budget


def test_the_counter_goes_beneath_meancache_and_the_hook_keeps_only_its_look_back(pipe) -> None:
    """Applied after MeanCache the counter would count skipped steps as evaluations: refused. And the hook keeps the
    velocities (and, with exponential edges, latents) of at most `max(orders)` compute steps per branch."""
    from meancache_cli.errors import MeanCacheError

    hook = apply_meancache(pipe, MIXED)
    try:
        with pytest.raises(MeanCacheError, match="apply the evaluation counter before MeanCache"):
            apply_evaluation_counter(pipe)
        kept = []
        original = hook.computed

        def computed(history, step, latents, output):
            result = original(history, step, latents, output)
            kept.append((sorted(history.velocities), sorted(history.latents)))
            return result

        hook.computed = computed
        run(pipe)
    finally:
        remove_meancache(pipe)
    depth = max(MIXED.orders)
    assert [velocities for velocities, _ in kept] == [[0], [0, 2], [2, 3], [3, 7], [7, 9]]
    assert all(len(latents) <= depth and latents == velocities for velocities, latents in kept)
