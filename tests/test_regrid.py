"""One calibration at any step count: sigma grids derived as the scheduler makes them, error maps read by σ,
schedules moved by σ with their budget kept."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_planner import random_costs
from tiny import TINY_CALL, tiny_flux_pipeline

from meancache_cli.core.regrid import ShiftedGrid, fit_grid, grid_positions, map_steps, regrid_maps, resample_map
from meancache_cli.core.stability import EdgeErrors, defined_mask
from meancache_cli.errors import FileFormatError, ScheduleMismatchError, UsageError
from meancache_cli.files import Calibration, Schedule, parse_schedule
from meancache_cli.planning import plan_schedule, schedule_on_sigmas

QWEN_SCHEDULER = json.loads((Path(__file__).parents[1] / "meancache_cli/models/real_configs/qwen-image.json")
                            .read_text())["scheduler"]


def flux_style(steps: int, mu: float, **config) -> np.ndarray:
    """Sigmas as FluxPipeline, QwenImagePipeline and ZImagePipeline set them: `linspace(1, 1/N, N)` and mu."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config({"use_dynamic_shifting": True, **config})
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler.sigmas.double().numpy()


def sd3_style(steps: int, shift: float) -> np.ndarray:
    """Sigmas as StableDiffusion3Pipeline and WanPipeline set them: the scheduler's own spacing."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.double().numpy()


GRIDS = {
    "flux, mu 1.15": lambda n: flux_style(n, 1.15),
    "flux, linear shift": lambda n: flux_style(n, 0.7, time_shift_type="linear"),
    "static shift 7 with flux sigmas": lambda n: flux_style(n, 0.0, use_dynamic_shifting=False, shift=7.0),
    "qwen-image, shift_terminal 0.02": lambda n: flux_style(n, 0.8, **QWEN_SCHEDULER),
    "sd3, shift 3": lambda n: sd3_style(n, 3.0),
    "wan, shift 5": lambda n: sd3_style(n, 5.0),
    "dynamic shift, scheduler spacing": lambda n: _scheduler_spacing(n, 1.2),
}


def _scheduler_spacing(steps: int, mu: float) -> np.ndarray:
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    scheduler.set_timesteps(steps, mu=mu)
    return scheduler.sigmas.double().numpy()


@pytest.mark.parametrize("name", GRIDS)
def test_the_derived_grid_is_the_one_the_scheduler_makes(name: str) -> None:
    make = GRIDS[name]
    for n in (10, 50):
        grid = fit_grid(make(n))
        for steps in (3, 20, 28, 30, 40, 50, 80):
            np.testing.assert_allclose(grid.sigmas(steps), make(steps), rtol=0, atol=2e-6, err_msg=f"{n}→{steps}")


def test_the_derived_grid_is_what_a_real_pipeline_runs_at_another_step_count() -> None:
    pipe = tiny_flux_pipeline()
    sigmas = {}
    for steps in (12, 7):
        pipe("a red circle", num_inference_steps=steps, output_type="latent", **TINY_CALL,
             generator=torch.Generator().manual_seed(0))
        sigmas[steps] = pipe.scheduler.sigmas.double().numpy()
    np.testing.assert_allclose(fit_grid(sigmas[12]).sigmas(7), sigmas[7], rtol=0, atol=2e-6)


def test_grids_the_scheduler_does_not_make_are_refused() -> None:
    karras = np.append(np.linspace(1.0, 0.05, 20) ** 3, 0.0)
    karras[0] = 1.0
    with pytest.raises(ValueError, match="not a shifted even grid as FlowMatchEulerDiscreteScheduler makes it"):
        fit_grid(karras)
    with pytest.raises(ValueError, match="a grid of 2 steps does not determine its shift"):
        fit_grid(np.array([1.0, 0.5, 0.0]))
    # Not starting at 1, not ending at 0, flat, rising.
    for bad in ([0.9, 0.6, 0.3, 0.1, 0.0], [1.0, 0.7, 0.4, 0.1], [1.0, 0.7, 0.7, 0.3, 0.0], [1.0, 0.5, 0.8, 0.3, 0.0]):
        with pytest.raises(ValueError, match="must fall from 1 to 0"):
            fit_grid(np.array(bad))
    assert fit_grid(ShiftedGrid(3.0).sigmas(3)).shift == pytest.approx(3.0, rel=1e-6)  # 3 steps are enough


def step_grids(draw: st.DrawFn) -> tuple[list[int], np.ndarray, np.ndarray]:
    n, n_new = draw(st.integers(3, 60)), draw(st.integers(3, 60))
    budget = draw(st.integers(1, min(n, n_new)))
    steps = [0, *sorted(draw(st.sets(st.integers(1, n - 1), min_size=budget - 1, max_size=budget - 1)))]
    shift, terminal = draw(st.floats(0.3, 8.0)), draw(st.sampled_from([None, 0.02]))
    planned = ShiftedGrid(shift, terminal=terminal).sigmas(n)
    new = ShiftedGrid(draw(st.floats(0.3, 8.0)), terminal=terminal).sigmas(n_new)
    return steps, planned, new


@settings(max_examples=200, deadline=None)
@given(st.composite(step_grids)())
@example(([0, 1, 2], ShiftedGrid(1.0, terminal=0.02).sigmas(3), ShiftedGrid(1.0, terminal=0.02).sigmas(4)))
def test_mapped_steps_are_monotone_keep_the_budget_and_the_first_and_last_steps(case) -> None:
    steps, planned, new = case
    mapped = map_steps(steps, planned, new)
    n_new = len(new) - 1
    assert len(mapped) == len(steps) and mapped[0] == 0
    assert all(b > a for a, b in zip(mapped, mapped[1:])) and mapped[-1] < n_new
    if len(steps) > 1 and steps[-1] == len(planned) - 2:
        assert mapped[-1] == n_new - 1
    assert map_steps(steps, planned, planned) == steps
    # Where the nearest steps by σ are already distinct and ascending, they are the answer; a step halfway between
    # two (0.51 between 0.673 and 0.347, say) is nearest to both, so ties say nothing.
    positions = grid_positions(planned[steps], new)
    nearest = np.floor(positions + 0.5).astype(int).tolist()
    tie = np.any(np.abs(positions[1:-1] % 1.0 - 0.5) < 1e-9)
    if not tie and nearest[0] == 0 and all(b > a for a, b in zip(nearest, nearest[1:])) and nearest[-1] < n_new:
        assert mapped[1:-1] == nearest[1:-1]


def test_more_compute_steps_than_steps_do_not_map() -> None:
    grid = ShiftedGrid(3.0)
    with pytest.raises(ValueError, match="10 compute steps do not fit in 8 steps"):
        map_steps(list(range(10)), grid.sigmas(50), grid.sigmas(8))


def _maps(n: int, max_back: int, seed: int) -> EdgeErrors:
    rng = np.random.default_rng(seed)
    reuse_defined, jvp_defined = defined_mask(n, max_back, 2)
    return EdgeErrors(np.where(reuse_defined, rng.random((n + 1, n + 1)), np.nan),
                    np.where(jvp_defined, rng.random((2, max_back, n + 1, n + 1)), np.nan), (0.5, 1.0))


@pytest.mark.parametrize("method", ["linear", "nearest"])
def test_maps_read_on_their_own_grid_are_themselves(method: str) -> None:
    maps, sigmas = _maps(12, 4, 0), ShiftedGrid(3.0).sigmas(12)
    same = regrid_maps(maps, sigmas, sigmas, method)
    assert np.array_equal(same.reuse, maps.reuse, equal_nan=True) and np.array_equal(same.jvp, maps.jvp, equal_nan=True)
    assert same.lambdas == maps.lambdas


def test_linear_reading_is_exact_for_a_map_multilinear_in_p_t_s() -> None:
    """`(s − t)·(2 + p)` is multilinear in the step coordinates and 0 on s = t: wherever every corner of a cell
    is defined, the linear reading gives its value at the fractional steps."""
    n, max_back, n_new = 30, 30, 17
    p, t, s = np.meshgrid(np.arange(n + 1), np.arange(n + 1), np.arange(n + 1), indexing="ij")
    back = t - p - 1
    jvp = np.full((1, max_back, n + 1, n + 1), np.nan)
    ok = (back >= 0) & (back < max_back) & (t < s)
    jvp[0, back[ok], t[ok], s[ok]] = ((s - t) * (2.0 + p))[ok]
    grid = ShiftedGrid(2.0)
    positions = grid_positions(grid.sigmas(n_new), grid.sigmas(n))
    read = resample_map(jvp, positions)
    checked = 0
    for b, i, j in itertools.product(range(read.shape[1]), range(n_new + 1), range(n_new + 1)):
        q = i - b - 1
        if q < 0 or i >= j:
            assert np.isnan(read[0, b, i, j])
            continue
        P, T, S = positions[q], positions[i], positions[j]
        if np.ceil(P) < np.floor(T):  # no corner with p = t, which is undefined
            assert read[0, b, i, j] == pytest.approx((S - T) * (2.0 + P), rel=1e-9)
            checked += 1
    assert checked > 500


def _cost_by_nearest_sigma(maps: EdgeErrors, sigmas: np.ndarray, new: np.ndarray, p: int | None, t: int, s: int,
                           damping: float) -> float:
    """An edge of the new grid costed the plain way: the old steps nearest in σ, read from the maps."""
    old = [int(np.argmin(np.abs(sigmas - new[i]))) if i is not None else None for i in (p, t, s)]
    return maps.value(old[0], old[1], old[2], damping)


def _brute_force(maps: EdgeErrors, sigmas: np.ndarray, new: np.ndarray, budget: int, gamma: float) -> float:
    """The least Σ c^(1+γ) over every path of `budget` edges on the new grid and every option per edge."""
    n_new = len(new) - 1
    best = np.inf
    for inner in itertools.combinations(range(1, n_new), budget - 1):
        nodes = (0, *inner, n_new)
        total = 0.0
        for index, (t, s) in enumerate(zip(nodes, nodes[1:])):
            options = [0.0 if s == t + 1 else _cost_by_nearest_sigma(maps, sigmas, new, None, t, s, 0.0)]
            if index > 0:
                options += [_cost_by_nearest_sigma(maps, sigmas, new, nodes[index - 1], t, s, lam)
                            for lam in maps.lambdas]
            finite = [c for c in options if np.isfinite(c)]
            total += min(finite) ** (1 + gamma) if finite else np.inf
        best = min(best, total)
    return best


def _calibration(maps: EdgeErrors, sigmas: np.ndarray) -> Calibration:
    return Calibration(model="tiny", pipeline_class="FluxPipeline", sigmas=sigmas, errors=maps, step_statistics={},
                       prompts=[], seeds=[])


def test_planning_for_fewer_steps_is_the_best_path_on_that_grid() -> None:
    """Against every path on the N′-step grid, each edge costed from the N-step maps at its nearest sigmas."""
    rng = np.random.default_rng(7)
    for trial in range(40):
        n, n_new = int(rng.integers(5, 11)), None
        n_new = int(rng.integers(3, n))
        max_back = int(rng.integers(1, 4))
        budget = int(rng.integers(1, n_new + 1))
        gamma = float(rng.choice([0.0, 1.0, 4.0]))
        maps = random_costs(rng, n, max_back)
        sigmas = ShiftedGrid(float(rng.uniform(1.0, 4.0))).sigmas(n)
        schedule = plan_schedule(_calibration(maps, sigmas), budget, gamma, steps=n_new, regrid="nearest")
        new = np.asarray(schedule.sigmas)
        assert schedule.num_inference_steps == n_new and schedule.budget == budget and len(new) == n_new + 1
        expected = _brute_force(maps, sigmas, new, budget, gamma)
        assert schedule.predicted_cost ** (1 + gamma) == pytest.approx(expected, rel=1e-6, abs=1e-12), trial


def test_planning_refuses_more_steps_than_calibrated_and_grids_it_cannot_derive() -> None:
    sigmas = ShiftedGrid(3.0).sigmas(10)
    calibration = _calibration(random_costs(np.random.default_rng(0), 10, 2), sigmas)
    with pytest.raises(UsageError, match="steps=12 is more than the calibration's 10 steps: a calibration knows "
                                         "nothing finer than its own grid; calibrate with --steps 12, or plan for "
                                         "10 steps or fewer"):
        plan_schedule(calibration, 4, steps=12)
    with pytest.raises(UsageError, match="budget=7 is out of range: planning for 6 steps, use 1…6"):
        plan_schedule(calibration, 7, steps=6)
    karras = np.append(np.linspace(1.0, 0.05, 10) ** 3, 0.0)
    karras[0] = 1.0
    with pytest.raises(UsageError, match="cannot plan for steps=6 from this calibration: the sigmas are not a "
                                         "shifted even grid .* calibrate with --steps 6"):
        plan_schedule(_calibration(calibration.errors, karras), 3, steps=6)
    same = plan_schedule(calibration, 4, steps=10)
    assert same.notes is None and same.sigmas == pytest.approx(sigmas.tolist(), abs=1e-7)


def test_a_schedule_moves_by_sigma_and_keeps_its_edges() -> None:
    grid = ShiftedGrid(3.0)
    planned = Schedule(model="m", num_inference_steps=50, compute_steps=[0, 8, 13, 30, 47, 49],
                       orders=[0, 1, 1, 1, 1, 0], lambdas=[0.0, 0.5, 0.5, 1.0, 0.5, 0.0],
                       sigmas=grid.sigmas(50).tolist())
    assert schedule_on_sigmas(planned, grid.sigmas(50)) is planned
    moved = schedule_on_sigmas(planned, grid.sigmas(30))
    assert moved.num_inference_steps == 30 and moved.compute_steps[0] == 0 and moved.compute_steps[-1] == 29
    assert moved.budget == 6 and (moved.orders, moved.lambdas) == (planned.orders, planned.lambdas)
    moved.validate("moved")
    # Another resolution shifts the sigmas: the steps follow σ, not the index.
    shifted = schedule_on_sigmas(planned, ShiftedGrid(6.0).sigmas(50))
    assert shifted.compute_steps != planned.compute_steps and shifted.budget == 6
    # Without recorded sigmas the schedule is taken as planned on this run's grid at its own step count.
    bare = Schedule(model="m", num_inference_steps=50, compute_steps=planned.compute_steps, orders=planned.orders,
                    lambdas=planned.lambdas)
    assert schedule_on_sigmas(bare, ShiftedGrid(6.0).sigmas(50)) is bare
    assert schedule_on_sigmas(bare, grid.sigmas(30)).compute_steps == moved.compute_steps
    with pytest.raises(ScheduleMismatchError, match="the schedule makes 6 evaluations per branch but this run has "
                                                    "only 5 steps: use 6 steps or more"):
        schedule_on_sigmas(planned, grid.sigmas(5))


@pytest.mark.parametrize("history", [False, True])
def test_undefined_corners_are_left_out_and_the_weights_renormalized(history: bool) -> None:
    """Old steps 0…4, new steps at old positions 0, 1.5, 1.8, 4. The new edge 0→1 reads (0, 1) and (0, 2) half
    each; with (0, 2) undefined it is (0, 1) alone. The new edge 1→2 reads (1, 1) and (2, 2) (zero-length: error 0),
    (1, 2), and (2, 1), which runs backwards and is left out even where the array holds a number there."""
    reuse = np.arange(25, dtype=np.float64).reshape(5, 5) + 1.0  # finite below the diagonal too
    reuse[0, 2] = np.nan
    positions = np.array([0.0, 1.5, 1.8, 4.0])
    if not history:
        read = resample_map(reuse, positions)
        assert read[0, 1] == reuse[0, 1]
        assert read[1, 2] == pytest.approx(0.4 * reuse[1, 2] / 0.9)
        return
    # [back, t, s] with p = t − back − 1: back 0 reads p = t − 1, whose corners at t = 2 sit at back 1.
    values = np.stack([reuse, reuse + 100.0])
    read = resample_map(values, positions)
    assert read[0, 1, 2] == pytest.approx(0.4 * values[0, 1, 2] / 0.9)
    assert np.isnan(read[0, 0, 1]) and np.isnan(read[1, 1, 2])  # p < 0: no such edge


def test_regrid_reads_linearly_unless_told_and_windows_and_ties_round_as_documented() -> None:
    from meancache_cli.core.regrid import _running_argmin, scale_windows

    old, new = ShiftedGrid(2.0).sigmas(8), ShiftedGrid(2.0).sigmas(5)
    maps = EdgeErrors(np.triu(np.random.default_rng(0).random((9, 9)), 1) + np.tril(np.full((9, 9), np.nan)),
                      np.full((1, 1, 9, 9), np.nan), (1.0,))
    np.testing.assert_array_equal(regrid_maps(maps, old, new).reuse, regrid_maps(maps, old, new, "linear").reuse)
    assert scale_windows([1, 3], [0, 10], 50, 20) == [1, 1]  # 0.4 rounds to 0: a window is at least 1 step
    np.testing.assert_array_equal(_running_argmin(np.array([3.0, 1.0, 1.0, 0.0])), [0, 1, 1, 3])  # the first
    assert map_steps([0], np.array([1.0, 0.0]), ShiftedGrid(2.0).sigmas(4)) == [0]  # one compute step stays at 0


def test_release_windows_scale_with_the_step_count() -> None:
    release = Schedule(model="qwen-image", num_inference_steps=50, compute_steps=[0, 1, 3, 7, 14, 21, 28, 35, 42, 49],
                       orders=[0, 2, 1, 1, 1, 1, 1, 1, 4, 0], estimator="release")
    moved = schedule_on_sigmas(release, ShiftedGrid(2.5, terminal=0.02).sigmas(30))
    ends = [*moved.compute_steps[1:], 30]
    for window, start, end in zip(moved.orders, moved.compute_steps, ends):
        assert (window == 0) == (end - start == 1)
    assert moved.orders[8] == 2  # 4 steps of 50 ≈ 2.4 of 30
    moved.validate("moved")


def test_a_schedule_file_keeps_its_sigmas_and_refuses_bad_ones() -> None:
    schedule = Schedule(model="m", num_inference_steps=3, compute_steps=[0, 2], orders=[0, 1], lambdas=[0.0, 1.0],
                        sigmas=[1.0, 0.75, 0.4, 0.0])
    assert parse_schedule(schedule.to_yaml(), "s") == schedule
    bare = Schedule(model="m", num_inference_steps=3, compute_steps=[0, 2], orders=[0, 1], lambdas=[0.0, 1.0])
    assert "sigmas" not in bare.to_yaml() and parse_schedule(bare.to_yaml(), "s").sigmas is None
    bad = schedule.to_yaml().replace("sigmas: [1.0, 0.75, 0.4, 0.0]", "sigmas: [1.0, 0.75, 0.8, 0.0]")
    with pytest.raises(FileFormatError, match=r"'sigmas' must be num_inference_steps \+ 1 = 4 finite, strictly"):
        parse_schedule(bad, "s")
