import numpy as np
import pytest
import torch
from tiny import TINY_CALL, ForwardCounter, tiny_flux_pipeline

from meancache_cli import Schedule, apply_meancache, remove_meancache
from meancache_cli.core.estimator import mean_velocity
from meancache_cli.errors import ScheduleMismatchError
from meancache_cli.hooks import apply_evaluation_counter, apply_recorder, remove_recorder

PROMPT = "a red circle on a blue background"
N = 12


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux_pipeline()


def run(pipe, seed: int = 0, **kwargs) -> np.ndarray:
    args = {**TINY_CALL, "num_inference_steps": N, "output_type": "np", **kwargs}
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), **args).images


def schedule(steps: list[int], orders: list[int]) -> Schedule:
    return Schedule(model="tiny", num_inference_steps=N, compute_steps=steps, orders=orders)


CACHED = schedule([0, 1, 2, 6, 7, 8], [0, 0, 2, 0, 1, 2])
B = len(CACHED.compute_steps)


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


def test_every_step_of_an_edge_gets_the_estimated_average_velocity(pipe) -> None:
    """Replays the hook's inputs through the bare transformer and the estimator, step by step."""
    seen: list[tuple[torch.Tensor, torch.Tensor, dict]] = []

    def capture(module, args, kwargs, output):
        seen.append((kwargs["hidden_states"].clone(), output[0].clone(), dict(kwargs)))

    handle = pipe.transformer.register_forward_hook(capture, with_kwargs=True)
    apply_meancache(pipe, CACHED)
    try:
        run(pipe, seed=7)
    finally:
        remove_meancache(pipe)
        handle.remove()
    sigmas = pipe.scheduler.sigmas
    assert len(seen) == N
    velocities: dict[int, torch.Tensor] = {}
    ends = [*CACHED.compute_steps[1:], N]
    for t, k, s in zip(CACHED.compute_steps, CACHED.orders, ends):
        x_t, returned, kwargs = seen[t]
        with torch.no_grad():
            v_t = pipe.transformer(**kwargs)[0]
        expected = v_t if k == 0 else mean_velocity(
            v_t, float(sigmas[t]), float(sigmas[s]), x_t, seen[t - k][0], velocities[t - k], float(sigmas[t - k]))
        torch.testing.assert_close(returned, expected, rtol=1e-5, atol=1e-6)
        velocities[t] = v_t
        for m in range(t + 1, s):
            assert torch.equal(seen[m][1], returned)
            velocities[m] = returned
    assert max(CACHED.orders) == 2


def test_schedule_for_other_step_count_is_refused(pipe) -> None:
    apply_meancache(pipe, CACHED)
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
