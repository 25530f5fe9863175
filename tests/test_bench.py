"""The benchmark: its pure parts (min-max DP, the authors' per-step estimator, searches, metrics), peers
counted on a real tiny pipeline, and one quick run."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from meancache_cli.bench.authors import release_schedule
from meancache_cli.bench.metrics import wins_over_best
from meancache_cli.bench.minmax import minmax_path
from meancache_cli.bench.peers import METHODS, SCHEDULE_METHODS, SOLVERS, parse_mag_ratios
from meancache_cli.bench.runner import bench_settings
from meancache_cli.bench.search import bisect_threshold
from meancache_cli.core.estimator import release_velocity
from meancache_cli.metrics import PSNR_CAP, latent_psnr
from meancache_cli.models.demo import DEMO_DIR


def _random_costs(rng: np.random.Generator, n: int, integer: bool) -> np.ndarray:
    costs = np.full((n + 1, n + 1), np.nan)
    for t in range(n):
        for s in range(t + 1, n + 1):
            costs[t, s] = float(rng.integers(0, 5)) if integer else rng.random()
    return costs


def _paths(n: int, budget: int):
    for inner in itertools.combinations(range(1, n), budget - 1):
        yield [0, *inner, n]


@pytest.mark.parametrize("integer", [False, True], ids=["distinct-costs", "tied-costs"])
def test_minmax_path_matches_brute_force(integer: bool) -> None:
    rng = np.random.default_rng(7)
    for _ in range(120):
        n = int(rng.integers(2, 8))
        budget = int(rng.integers(1, n + 1))
        costs = _random_costs(rng, n, integer)
        path = minmax_path(costs, budget)
        assert path.compute_steps[0] == 0 and len(path.compute_steps) == budget and path.orders == [0] * budget
        vectors = [tuple(sorted((costs[a, b] for a, b in zip(p, p[1:])), reverse=True)) for p in _paths(n, budget)]
        assert path.objective == min(v[0] for v in vectors)  # the smallest largest edge
        assert tuple(sorted(path.edge_costs, reverse=True)) == min(vectors)  # and leximax among those


def test_minmax_path_skips_missing_edges_and_checks_the_budget() -> None:
    costs = _random_costs(np.random.default_rng(1), 6, False)
    costs[0, 3:] = np.nan  # no edge from 0 past step 2
    for budget in (2, 3, 4):
        assert minmax_path(costs, budget).compute_steps[1] <= 2
    with pytest.raises(ValueError, match="budget"):
        minmax_path(costs, 7)
    costs[:, 6] = np.nan
    with pytest.raises(ValueError, match="no schedule reaches step 6"):
        minmax_path(costs, 3)


def test_release_velocity_formula() -> None:
    x_r, v_r, x_m = torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([0.2])
    sigma_r, sigma_m, sigma_next, v_prev = 1.0, 0.6, 0.5, torch.tensor([3.0])
    jvp = ((0.2 - 1.0) / (0.6 - 1.0) - 2.0) / (0.6 - 1.0)  # (u(r→m) − v_r) / (σ_m − σ_r)
    expected = 3.0 + (0.5 - 0.6) * jvp
    got = release_velocity(v_prev, x_r, v_r, x_m, sigma_r, sigma_m, sigma_next)
    assert got.item() == pytest.approx(expected)
    # Window 1: one Euler step's average velocity is the velocity it used, so the estimate is plain reuse.
    x_prev = torch.tensor([0.7])
    x_now = x_prev + (0.6 - 0.7) * v_prev
    assert torch.allclose(release_velocity(v_prev, x_prev, v_prev, x_now, 0.7, 0.6, 0.5), v_prev)


@pytest.fixture(scope="module")
def tiny_pipe():
    from tiny import tiny_flux_pipeline

    return tiny_flux_pipeline()


def _forwards(pipe, method, steps: int, **call) -> int:
    """Real evaluations of the tiny pipeline's transformer under `method`, counted inside the model."""
    from tiny import TINY_CALL, ForwardCounter

    counter = ForwardCounter(pipe.transformer.single_transformer_blocks[-1].attn)
    with method.applied(pipe):
        pipe("a red circle", num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
             output_type="latent", **TINY_CALL, **call)
    return counter.calls


@pytest.mark.parametrize("budget", [5, 10, 17])
def test_taylorseer_method_runs_the_model_exactly_budget_times(tiny_pipe, budget: int) -> None:
    from meancache_cli.bench.peers import taylorseer_method

    assert _forwards(tiny_pipe, taylorseer_method(budget, 50), 50) == budget


@pytest.mark.parametrize("budget", [10, 17, 25])
def test_release_peer_runs_exactly_budget_forwards_per_branch(tiny_pipe, budget: int) -> None:
    from meancache_cli.bench.peers import authors_method

    schedule = release_schedule("tiny", 50, budget)
    assert schedule is not None and schedule.estimator == "release" and schedule.budget == budget
    method = authors_method(schedule, key="release")
    assert _forwards(tiny_pipe, method, 50) == budget
    assert _forwards(tiny_pipe, method, 50, true_cfg_scale=4.0, negative_prompt="") == 2 * budget


def test_release_schedule_exists_only_where_the_authors_publish_one() -> None:
    assert release_schedule("demo", 50, 13) is None
    assert release_schedule("demo", 40, 10) is None
    assert release_schedule("demo", 50, 10).compute_steps == [0, 1, 3, 7, 14, 21, 28, 35, 42, 49]


def test_latent_psnr_uses_the_reference_range_as_peak() -> None:
    reference = torch.tensor([[-1.0, 1.0], [0.0, 0.5]])  # range 2
    shifted = reference + 0.1  # mse 0.01
    assert latent_psnr(shifted, reference) == pytest.approx(10 * math.log10(4 / 0.01))
    # Scaling latents and reference together scales the peak with them: the same PSNR.
    assert latent_psnr(3 * shifted, 3 * reference) == pytest.approx(10 * math.log10(4 / 0.01))
    assert latent_psnr(reference.clone(), reference) == PSNR_CAP
    with pytest.raises(ValueError, match="cannot be compared"):
        latent_psnr(reference[0], reference)


def test_wins_count_against_the_best_peer_on_each_pair() -> None:
    # Peer 0 is best on average, but peer 1 is best on pair 0: the per-pair best counts there.
    wins = wins_over_best([30.0, 33.0, 29.0, 40.0], [[29.0, 32.0, 30.0, 41.0], [31.0, 30.0, 28.0, 30.0]])
    assert (wins.wins, wins.pairs) == (1, 4)
    assert wins.mean_margin == pytest.approx((-1 + 1 - 1 - 1) / 4)
    assert wins.worst_margin == -1.0
    assert wins_over_best([30.0], [[30.0]]).wins == 0  # a tie is not a win
    with pytest.raises(ValueError):
        wins_over_best([30.0, 31.0], [[30.0]])


def test_parse_mag_ratios_reads_magcache_calibration_output() -> None:
    text = ("\n[MagCache] Calibration Complete. Copy these values to MagCacheConfig(mag_ratios=...):\n"
            "[1.0, 0.98, 1.02]\n\n")
    assert parse_mag_ratios(text) == [1.0, 0.98, 1.02]
    with pytest.raises(ValueError):
        parse_mag_ratios("nothing here")


def test_bisect_threshold_lands_on_the_budget_and_keeps_progress_exact() -> None:
    ticks = []
    threshold, probes = bisect_threshold(lambda t: max(1, round(50 / (1 + 40 * t))), 10, 1e-3, 4.0, 12,
                                         lambda: ticks.append(1))
    assert round(50 / (1 + 40 * threshold)) == 10
    assert len(ticks) == 12 and len(probes) <= 12


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, object, int, int, list[str], object, dict]:
    """One quick bench: on the demo model when it is present, else on the tiny random pipeline; with the pipeline
    it ran on and its options."""
    from meancache_cli.bench import bench_units, run_bench
    from meancache_cli.models.registry import load_pipeline, resolve_model

    out = tmp_path_factory.mktemp("bench")
    if (DEMO_DIR / "model_index.json").is_file():
        options: dict = {"model": "demo", "call_kwargs": {"true_cfg_scale": 1.0}}
    else:
        from tiny import tiny_flux_pipeline

        model_dir = tmp_path_factory.mktemp("tiny")
        tiny_flux_pipeline().save_pretrained(model_dir)
        options = {"model": str(model_dir), "height": 32, "width": 32, "prompt_set": "shapes",
                   "call_kwargs": {"max_sequence_length": 16}, "configs": ("plain", "cfg")}
    ticks, stages = [], []
    options["repeats"] = 1  # the suite checks what the bench writes, not its timing: one timed run is enough
    pipe = load_pipeline(resolve_model(options["model"]))
    results = run_bench(out_dir=out, quick=True, advance=lambda: ticks.append(1), stage=stages.append, pipe=pipe,
                        **options)
    return results, out, len(ticks), bench_units(quick=True, **options), stages, pipe, options


def test_quick_bench_writes_every_output(quick_bench) -> None:
    results, out, ticks, units, stages = quick_bench[:5]
    for name in ("results.json", "benchmarks.md", "pareto.png", "grid_plain_B10.png", "grid_cfg_B10.png"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "results.json").read_text())["budgets"] == [10]
    assert ticks == units
    assert not list(out.glob("*.tmp"))
    # Every stage announced is one `BenchSettings.stages` plans, in its order (each held to its calls as it ran).
    settings, _ = bench_settings(quick=True, **quick_bench[6])
    assert stages == [f"{c.key}: {stage.name}" for c in settings.configs for stage in settings.stages(c)] + [
        "writing the report"]
    assert stages[0].startswith("plain: references") and any(s.startswith("cfg: B = 10") for s in stages)


def test_a_stage_is_held_to_the_calls_its_plan_counts() -> None:
    from tiny import tiny_flux_pipeline

    from meancache_cli.bench.runner import Bench, Stage

    settings, spec = bench_settings("demo", quick=True)
    ticks, phases = [], {}
    bench = Bench(settings, spec, tiny_flux_pipeline(), lambda: ticks.append(1), lambda name: None)
    with bench.running("plain", Stage("validating", 3, at_most=True), phases):
        bench.advance()
    assert len(ticks) == 3 and "plain: validating" in phases  # the unused bound is advanced
    for made, stage in ((2, Stage("timing", 1)), (0, Stage("timing", 1)), (4, Stage("validating", 3, at_most=True))):
        with pytest.raises(RuntimeError, match=f"'plain: {stage.name}' made {made} pipeline calls where "
                                               f"BenchSettings.stages plans {stage.calls}"):
            with bench.running("plain", stage, phases):
                for _ in range(made):
                    bench.advance()


def test_quick_bench_runs_both_configurations_with_their_own_guidance(quick_bench) -> None:
    configs = {c["key"]: c for c in quick_bench[0]["configs"]}
    assert set(configs) == {"plain", "cfg"}
    assert configs["plain"]["call_kwargs"]["true_cfg_scale"] == 1.0
    assert configs["plain"]["call_kwargs"]["negative_prompt"] is None
    guided = configs["cfg"]["call_kwargs"]
    assert (guided["true_cfg_scale"], guided["negative_prompt"]) == (4.0, "")
    assert (configs["plain"]["branches"], configs["cfg"]["branches"]) == (1, 2)
    for config in configs.values():
        reference = config["reference"]
        assert len(reference["accuracy_runs"]) == len(quick_bench[0]["prompts"]["evaluation"]["prompts"])
        assert 0 < reference["accuracy"] < 100  # 50 Euler steps differ from 100 (quick: 2 × N)


def test_quick_bench_budget_10_lands_every_method_near_10_evaluations(quick_bench) -> None:
    results = quick_bench[0]
    for config in ("plain", "cfg"):
        rows = {r["method"]: r for r in results["results"] if r["budget"] == 10 and r["config"] == config}
        assert set(rows) == set(METHODS)
        for key, row in rows.items():
            if key in SCHEDULE_METHODS or key in SOLVERS:
                assert row["nfe_runs"] == [10] * len(row["nfe_runs"]), (config, key)
            else:
                assert abs(row["nfe"] - 10) <= 2, (config, key, row["nfe_runs"])
            for name in ("psnr", "ssim", "latent_psnr", "accuracy"):
                assert math.isfinite(row[name]), (config, key, name)
            assert row["speedup"] > 0
        ablations = results["ablations"][config]
        for table in ("kmax", "gamma", "cost", "lambdas", "estimator", "transfer_prompts"):
            assert all(math.isfinite(r["latent_psnr"]) for r in ablations[table]), (config, table)


def test_quick_bench_report_names_the_peers_configurations_and_prompt_sets(quick_bench) -> None:
    results, out = quick_bench[0], quick_bench[1]
    report = (out / "benchmarks.md").read_text()
    assert report.splitlines()[0].startswith("# ")
    assert results["command"] in report
    for method in METHODS.values():
        assert method.label in report
    for name in ("UniPC", "DPM-Solver++", "FirstBlockCache", "TaylorSeer", "MagCache", "LeMiCa", "where a peer wins",
                 "## Summary", "latent PSNR", "accuracy vs 100-step Euler", "uncached 50-step reference",
                 "MeanCache beats the best solver on each pair", "dynamic range (max − min)", "per-pair distributions",
                 "validation of MeanCache's plan", "pairs below 20 dB", "10th-percentile latent / decoded PSNR"):
        assert name in report, name
    for config in results["configs"]:
        assert f"## Configuration: {config['label']}" in report
    assert "K = 0 on every edge" not in report
    prompts = results["prompts"]
    assert not set(prompts["calibration_a"]["prompts"]) & set(prompts["evaluation"]["prompts"])
    assert not set(prompts["calibration_a"]["seeds"]) & set(prompts["evaluation"]["seeds"])
    for prompt in prompts["calibration_a"]["prompts"] + prompts["evaluation"]["prompts"]:
        assert prompt in report


def test_quick_bench_meancache_is_the_plan_validated_on_held_out_calibration_runs(quick_bench) -> None:
    """The meancache rows carry the validation record, and their schedule is what `plan(..., pipe=...)` makes from
    a calibration of set A in the same configuration (the default recipe's plan is its own row)."""
    from meancache_cli.bench.runner import CONFIGS, bench_settings
    from meancache_cli.calibration import run_calibration
    from meancache_cli.planning import plan

    results, pipe, options = quick_bench[0], quick_bench[5], quick_bench[6]
    rows = {(r["config"], r["method"]): r for r in results["results"] if r["budget"] == 10}
    for config in results["configs"]:
        record = config["validation"]["10"]
        assert len(config["calibration"]["held_out"]) >= 1
        assert record["runs"] >= 1 and 0 < record["cost_share"] <= 1 / 3 + 1e-9
        names = [candidate["recipe"] for candidate in record["candidates"]]
        assert record["chosen"] in names and len(names) == len(set(names)) > 1
        assert all(np.isfinite(candidate["score"]) for candidate in record["candidates"])
        assert rows[(config["key"], "meancache")]["settings"]["recipe"] == record["chosen"]
        assert rows[(config["key"], "meancache_default")]["label"] == "MeanCache, default recipe, not validated"
    settings, spec = bench_settings(quick=True, **{k: v for k, v in options.items() if k != "repeats"})
    set_a = settings.prompts.calibration_a
    calibration = run_calibration(pipe, spec.name, set_a.prompts, set_a.seeds,
                                  settings.config_kwargs(CONFIGS["plain"]))
    expected = plan(calibration, 10, pipe=pipe)
    got = rows[("plain", "meancache")]["settings"]
    assert (got["compute_steps"], got["orders"], got["lambdas"], got["kinds"]) == (
        expected.compute_steps, expected.orders, expected.lambdas, expected.kinds)
    assert results["configs"][0]["validation"]["10"] == expected.validation


def test_quick_bench_records_the_distributions_of_meancache_and_the_solvers(quick_bench) -> None:
    results = quick_bench[0]
    entries = {(e["config"], e["method"]): e for e in results["distributions"] if e["budget"] == 10}
    for config in ("plain", "cfg"):
        for method in ("meancache", "meancache_default", *SOLVERS):
            entry = entries[(config, method)]
            for metric in ("latent_psnr", "psnr"):
                stats = entry[metric]
                assert stats["min"] <= stats["p10"] <= stats["median"]
                assert 0 <= stats["wins"] <= stats["pairs"] == len(results["prompts"]["evaluation"]["prompts"])


def _spread_row(method: str, budget: int, latent: list[float], decoded: list[float]) -> dict:
    row = _row(method, budget, float(np.mean(decoded)), 4.0, float(np.mean(latent)), latent)
    row["psnr_runs"] = decoded
    return row


def _percentile_10(values: list[float]) -> float:
    """The 10th percentile by linear interpolation between order statistics, written out."""
    ordered = sorted(values)
    position = 0.1 * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def test_distributions_match_an_independent_computation_on_constructed_pairs() -> None:
    from meancache_cli.bench.report import distribution_lines, distribution_table, distributions

    latent = {"meancache": [30.0, 12.0, 45.0, 41.0, 19.5, 38.0, 50.0],
              "euler": [25.0, 22.0, 30.0, 28.0, 18.0, 39.0, 20.0],
              "unipc": [31.0, 15.0, 33.0, 35.0, 21.0, 30.0, 44.0],
              "dpmpp": [29.0, 11.0, 46.0, 36.0, 19.0, 37.0, 49.0]}
    decoded = {key: [value - 3.0 * (index % 2) for index, value in enumerate(values)]
               for key, values in latent.items()}
    results = _results([_spread_row(key, 10, latent[key], decoded[key]) for key in latent])
    entries = {e["method"]: e for e in distributions(results)}
    assert set(entries) == set(latent)
    for method in latent:
        others = [key for key in ("euler", "unipc", "dpmpp") if key != method]
        for metric, values in (("latent_psnr", latent), ("psnr", decoded)):
            ours = values[method]
            ordered = sorted(ours)
            stats = entries[method][metric]
            assert stats["median"] == pytest.approx(ordered[len(ordered) // 2])  # 7 pairs: the 4th value
            assert stats["p10"] == pytest.approx(_percentile_10(ours))
            assert stats["min"] == ordered[0]
            best = [max(values[key][i] for key in others) for i in range(len(ours))]
            assert stats["wins"] == sum(1 for a, b in zip(ours, best) if a > b), (method, metric)
            assert stats["below_20_db"] == sum(1 for value in ours if value < 20.0)
            assert stats["pairs"] == 7
    # Spot values, by hand: MeanCache's latent p10 sits 0.6 of the way from 12 to 19.5.
    assert entries["meancache"]["latent_psnr"]["p10"] == pytest.approx(12.0 + 0.6 * 7.5)
    assert entries["meancache"]["latent_psnr"]["wins"] == 2  # pairs 3 (41 > 36) and 6 (50 > 49)
    table = "\n".join(distribution_table(results, "plain"))
    assert "**MeanCache**" in table and "2 / 7" in table
    lines = " ".join(distribution_lines(results, "plain"))
    assert "Pairs below 20 dB at B = 10 together (7 per method): MeanCache 2; Euler (B steps) 1" in lines


def _row(method: str, budget: int, psnr: float, speedup: float, latent: float | None = None,
         runs: list[float] | None = None) -> dict:
    latent = psnr if latent is None else latent
    runs = runs or [latent]
    return {"config": "plain", "method": method, "label": METHODS[method].label, "budget": budget, "psnr": psnr,
            "ssim": 0.9, "latent_psnr": latent, "speedup": speedup, "nfe": budget, "stress": False,
            "psnr_runs": [psnr] * len(runs), "latent_psnr_runs": runs,
            "settings": {"compute_steps": [0, 5], "orders": [0, 1], "lambdas": [0.0, 0.5]}}


def _results(rows: list[dict]) -> dict:
    return {"methods": {k: {"label": m.label, "family": m.family} for k, m in METHODS.items()},
            "configs": [{"key": "plain", "label": "plain (no guidance)"}], "results": rows}


def test_where_peers_win_names_the_peer_and_the_budget_from_the_numbers() -> None:
    from meancache_cli.bench.report import where_peers_win

    results = _results([
        _row("meancache", 10, 30.0, 4.0), _row("unipc", 10, 31.0, 4.5), _row("euler", 10, 25.0, 4.6),
        _row("meancache", 20, 35.0, 2.0), _row("unipc", 20, 34.0, 2.2), _row("euler", 20, 33.0, 2.3),
    ])
    text = " ".join(where_peers_win(results, "plain"))
    assert ("UniPC (B steps)** beats MeanCache at 1 budget (B = 10: latent 31.00 vs 30.00, decoded 31.00 vs 30.00 dB "
            "at 4.50× vs 4.00×)") in text
    assert "at least as fast in wall time" in text
    assert "Euler (B steps)** beats" not in text
    assert "B = 20: +1.00 dB vs UniPC" in text
    results["results"] = [r for r in results["results"] if r["method"] != "unipc"]
    results["results"].append(_row("reuse", 10, 30.01, 4.0))  # a tie within 0.05 dB is not a win
    # MeanCache's own unvalidated row is an ablation, compared in the validation section, not a peer.
    results["results"].append({**_row("meancache_default", 10, 40.0, 4.0), "family": "ablation"})
    assert "No peer beats MeanCache's mean latent or decoded PSNR" in " ".join(where_peers_win(results, "plain"))


def test_summary_and_wins_line_come_from_the_per_pair_numbers() -> None:
    from meancache_cli.bench.report import summary_lines, wins_line

    results = _results([
        _row("meancache", 10, 40.0, 4.0, 45.0, [44.0, 46.0, 45.0]),
        _row("euler", 10, 38.0, 4.2, 40.0, [45.0, 38.0, 37.0]),
        _row("dpmpp", 10, 41.0, 4.1, 42.0, [43.0, 47.0, 36.0]),
    ])
    assert wins_line(results, "plain", 10).startswith(
        "MeanCache beats the best solver on each pair (the best of Euler, UniPC and DPM-Solver++ with B steps on "
        "that pair) by latent PSNR on 1 of 3 pairs (margin mean +2.00 dB, worst pair -1.00 dB), and by decoded PSNR "
        "on 0 of 3 pairs (margin mean -1.00 dB")
    summary = " ".join(summary_lines(results))
    assert "the best latent PSNR of every method at B = 10" in summary
    assert "the best decoded PSNR at no budget" in summary
    assert "B = 10: DPM-Solver++ 2M (B steps) (decoded PSNR 41.00 vs 40.00 dB)" in summary


def test_stage_log_prints_one_plain_line_per_stage_with_calls_done() -> None:
    import io

    from rich.console import Console

    from meancache_cli.progress import StageLog

    buffer = io.StringIO()
    log = StageLog(Console(file=buffer, width=40), total=10)
    log.stage("plain: references [2 pairs]")
    for _ in range(3):
        log.advance()
    log.stage("cfg: B = 10: timing")
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 2  # no wrapping, even past the console width
    assert lines[0].endswith("0/10 calls: plain: references [2 pairs]")
    assert lines[1].endswith("3/10 calls: cfg: B = 10: timing")


def test_bench_profile_comes_from_the_model_config() -> None:
    from dataclasses import replace

    from meancache_cli.bench.runner import CONFIGS, BenchProfile, bench_settings, default_report_path
    from meancache_cli.errors import MeanCacheError
    from meancache_cli.models.registry import ModelSpec

    demo, _ = bench_settings("demo", quick=True)
    assert [c.key for c in demo.configs] == ["plain", "cfg"]
    assert demo.prompts.evaluation.prompts[0] == "a yellow star on a purple background"
    assert demo.methods == tuple(METHODS) and demo.transfer_resolution is None  # quick: no resolution transfer
    assert bench_settings("demo")[0].transfer_resolution == (64, 64)
    flux, _ = bench_settings("flux", quick=True)
    assert flux.configs == (CONFIGS["default"],) and flux.prompts.evaluation.prompts[0].startswith("an astronaut")
    spec = ModelSpec(name="x", pipeline_class="FluxPipeline",
                     bench={"configs": ["plain"], "skip": ["fbcache", "magcache", "taylorseer"], "ablations": ["kmax"],
                            "resolution_transfer": False})
    profile = BenchProfile.of(spec)
    assert (profile.configs, profile.skip, profile.ablations) == (("plain",), ("fbcache", "magcache", "taylorseer"),
                                                                  ("kmax",))
    for entry, message in (({"config": ["plain"]}, "unknown key 'config'"), ({"skip": ["euler2"]}, "'euler2'"),
                           ({"skip": ["meancache"]}, "must run MeanCache"), ({"ablations": ["nope"]}, "'nope'")):
        with pytest.raises(MeanCacheError, match=message):
            BenchProfile.of(replace(spec, bench=entry))
    assert default_report_path("docs/bench").as_posix() == "docs/benchmarks.md"
    assert default_report_path("docs/bench-hard").as_posix() == "docs/benchmarks-hard.md"
    assert default_report_path("/tmp/b").as_posix() == "/tmp/b/benchmarks.md"


@pytest.mark.parametrize("dynamic", [False, True], ids=["static-shift", "dynamic-shift"])
def test_solvers_sample_the_sigmas_of_the_pipelines_euler_scheduler(dynamic: bool) -> None:
    """FluxPipeline passes mu to every scheduler; a statically shifted Euler scheduler ignores it, so must the
    solvers (DPM-Solver++ used to stop on it), and both solvers then step through Euler's sigmas, shifted alike."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from meancache_cli.bench.peers import solver_scheduler

    euler = FlowMatchEulerDiscreteScheduler(shift=3.0 if dynamic else 0.8, use_dynamic_shifting=dynamic)
    mu = 0.7
    euler.set_timesteps(sigmas=np.linspace(1.0, 1 / 10, 10), mu=mu)
    for kind in ("unipc", "dpmpp"):
        solver = solver_scheduler(kind, euler.config)
        solver.set_timesteps(10, mu=mu)
        # Their own grid ends at 1/1000 rather than 1/10 before the shift: close, not equal.
        assert torch.allclose(solver.sigmas.float(), euler.sigmas.float(), atol=3e-3), kind


def test_hard_model_is_benched_like_the_demo_without_the_block_caches() -> None:
    from meancache_cli.bench.runner import ABLATIONS, bench_settings, bench_units

    demo, _ = bench_settings("demo")
    hard, spec = bench_settings("hard")
    assert spec.name == "hard" and [c.key for c in hard.configs] == [c.key for c in demo.configs] == ["plain", "cfg"]
    assert hard.prompts == demo.prompts  # the shapes prompts: the captions both models know
    assert hard.config_kwargs(hard.configs[1]) == demo.config_kwargs(demo.configs[1])
    assert set(METHODS) - set(hard.methods) == {"fbcache", "taylorseer", "magcache"}
    assert hard.transfer_resolution is None and demo.transfer_resolution == (64, 64)
    assert hard.ablation_tables == ABLATIONS
    assert bench_units(model="hard") < bench_units(model="demo")


def test_bench_command_refuses_a_budget_beyond_the_steps_before_anything_runs(tmp_path, capsys) -> None:
    from cli_helpers import run_cli

    out = tmp_path / "bench"
    result = run_cli(["bench", "--quick", "--budgets", "60", "--out", str(out)], capsys)
    assert result.code == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "error: budget 60 is out of range: use budgets between 1 and --steps 50"]
    assert not list(out.glob("*"))  # no report, no results, nothing half-written
