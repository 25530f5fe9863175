"""The library's three stages on a pipeline object, held-out calibration runs, and plans validated on them."""

import math

import numpy as np
import pytest
import torch
from oracle import CallLog
from tiny import TINY_CALL, ForwardCounter, tiny_flux_pipeline

import meancache_cli as mc
from meancache_cli import defaults
from meancache_cli.calibration import run_calibration
from meancache_cli.errors import UsageError
from meancache_cli.planning import plan_recipe, plan_schedule

PROMPTS = ["a red circle on a blue background", "a green star on a white background"]
CALL = {**TINY_CALL, "num_inference_steps": 12}
B = 4


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux_pipeline()


@pytest.fixture(scope="module")
def calibration(pipe):
    """2 prompts × 3 seeds = 6 runs: the first seed's two are held out (a third), four make the maps."""
    return mc.calibrate(pipe, PROMPTS, [3, 4, 5], model="tiny", max_back=4, **CALL)


def cached_latents(pipe, schedule, prompt: str, seed: int) -> np.ndarray:
    mc.apply_meancache(pipe, schedule)
    try:
        return pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent",
                    **CALL).images.numpy()
    finally:
        mc.remove_meancache(pipe)


def psnr(latents: np.ndarray, reference: np.ndarray) -> float:
    """Latent PSNR written out: peak = the reference's range."""
    peak = float(reference.max() - reference.min())
    return 10 * math.log10(peak**2 / float(np.mean((latents.astype(np.float64) - reference) ** 2)))


def test_calibration_holds_out_the_first_seed_and_keeps_its_noise_and_uncached_output(pipe, calibration) -> None:
    assert [(run.prompt, run.seed) for run in calibration.held_out] == [(PROMPTS[0], 3), (PROMPTS[1], 3)]
    assert calibration.trajectories == 4 and calibration.seeds == [3, 4, 5] and calibration.model == "tiny"
    assert calibration.call_kwargs == CALL
    run = calibration.held_out[1]
    log = CallLog(pipe.transformer)
    try:
        uncached = pipe(run.prompt, generator=torch.Generator("cpu").manual_seed(run.seed), output_type="latent",
                        **CALL).images
    finally:
        log.close()
    np.testing.assert_array_equal(run.noise, log.latents(0).numpy())  # same code path: exact
    np.testing.assert_array_equal(run.final, uncached.numpy())
    assert calibration.stability["map_runs"] == 4 and calibration.stability["budget"] == 2


def test_without_a_pipeline_plan_is_the_default_recipe(calibration) -> None:
    schedule = mc.plan(calibration, B)
    assert schedule == plan_schedule(calibration, B) and schedule.validation is None
    assert (schedule.cost, schedule.gamma) == (defaults.RECIPE.cost, defaults.RECIPE.gamma)
    assert "exp" not in schedule.kinds
    given = mc.plan(calibration, B, cost="displacement", exponential=True)
    assert given == plan_schedule(calibration, B, cost="displacement", exponential=True)


def test_validation_runs_each_distinct_plan_on_the_held_out_runs_and_keeps_the_best(pipe, calibration) -> None:
    counter = ForwardCounter(pipe.transformer.x_embedder)
    schedule = mc.plan(calibration, B, pipe=pipe)
    validation = schedule.validation
    planned = [plan_recipe(calibration, B, recipe) for recipe in defaults.CANDIDATES]
    distinct = {(tuple(s.compute_steps), tuple(s.kinds), tuple(s.lambdas)) for s in planned}
    runs = validation["runs"]
    assert counter.calls == len(distinct) * runs * B
    assert validation["evaluations_per_branch"] == len(distinct) * runs * B
    assert validation["cost_share"] <= defaults.VALIDATION_SHARE or runs == 1
    assert [entry["recipe"] for entry in validation["candidates"]] == [r.name for r in defaults.CANDIDATES]
    for entry, plan in zip(validation["candidates"], planned):
        expected = [psnr(cached_latents(pipe, plan, run.prompt, run.seed), run.final)
                    for run in calibration.held_out[:runs]]
        assert entry["psnr"] == pytest.approx(expected, abs=2e-3)
        assert entry["score"] == pytest.approx(np.mean(expected), abs=2e-3)
    scores = [entry["score"] for entry in validation["candidates"]]
    challenger = scores.index(max(scores[1:]), 1)  # the earliest best among the others
    best = challenger if scores[challenger] > scores[0] + validation["margin"] else 0
    assert validation["margin"] == 0.5 and validation["chosen"] == defaults.CANDIDATES[best].name
    chosen = planned[best]
    assert (schedule.compute_steps, schedule.kinds, schedule.lambdas) == (chosen.compute_steps, chosen.kinds,
                                                                          chosen.lambdas)


def test_a_recipe_given_with_a_pipeline_is_the_only_candidate(pipe, calibration) -> None:
    schedule = mc.plan(calibration, B, pipe=pipe, cost="displacement", gamma=2.0)
    [entry] = schedule.validation["candidates"]
    assert entry["recipe"] == "displacement γ2 λ{0.5,1}" and schedule.validation["chosen"] == entry["recipe"]


def test_validation_needs_held_out_runs(pipe) -> None:
    calibration = mc.calibrate(pipe, PROMPTS[:1], [0, 1], holdout=0, max_back=2, **CALL)
    assert calibration.held_out == []
    with pytest.raises(UsageError, match="no held-out runs to validate on: calibrate with holdout ≥ 1"):
        mc.plan(calibration, B, pipe=pipe)
    with pytest.raises(UsageError, match="holdout=2 is out of range: 2 runs leave none for the maps; use 0…1"):
        mc.calibrate(pipe, PROMPTS[:1], [0, 1], holdout=2, **CALL)


def test_runs_auto_adds_seeds_until_the_halves_agree_or_the_cap(pipe) -> None:
    figures = []
    calibration = run_calibration(pipe, "tiny", PROMPTS, [7], CALL, auto_max_runs=4, on_stability=figures.append)
    assert [(run.prompt, run.seed) for run in calibration.held_out] == [(PROMPTS[0], 7), (PROMPTS[1], 7)]
    map_runs = calibration.trajectories
    assert map_runs in (2, 4) and calibration.seeds == [7, 8, 9][: 1 + map_runs // 2]
    assert [figure.map_runs for figure in figures] == list(range(2, map_runs + 1, 2))
    assert (figures[-1].regret <= defaults.STABLE_REGRET) or map_runs == 4
    assert calibration.stability["regret"] == pytest.approx(figures[-1].regret)


def test_the_public_api_applies_a_validated_schedule(pipe, calibration) -> None:
    schedule = mc.plan(calibration, B, pipe=pipe)
    counter = ForwardCounter(pipe.transformer.x_embedder)
    latents = cached_latents(pipe, schedule, "a yellow square on a black background", 11)
    assert counter.calls == B and np.isfinite(latents).all()
    with pytest.raises(UsageError, match="runs='often' is invalid: use 'auto'"):
        mc.calibrate(pipe, PROMPTS, [0], runs="often", **CALL)
    with pytest.raises(UsageError, match="give num_inference_steps"):
        mc.calibrate(pipe, PROMPTS, [0], height=32)
