"""calibrate → plan → generate through the command line, on a tiny FluxPipeline saved to disk."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run_cli, run_process
from PIL import Image

from meancache_cli import load_calibration, load_schedule
from meancache_cli.hooks import ScheduleMappedWarning
from meancache_cli.models.registry import load_pipeline, resolve_model
from meancache_cli.outputs import read_provenance

SIZE = ["--height", "32", "--width", "32"]


def test_calibration_file_holds_the_run(calibration, model_dir) -> None:
    loaded = load_calibration(calibration)
    assert loaded.trajectories == 3  # 4 runs, the first (seed 0, first prompt) held out of the maps
    [held] = loaded.held_out
    assert (held.prompt, held.seed) == ("a red circle", 0)
    pipe = load_pipeline(resolve_model(model_dir))
    uncached = pipe(held.prompt, generator=torch.Generator("cpu").manual_seed(held.seed), output_type="latent",
                    **loaded.call_kwargs).images
    np.testing.assert_allclose(held.final, uncached.numpy(), rtol=0, atol=1e-5)
    assert held.noise.shape == held.final.shape and not np.allclose(held.noise, held.final)
    assert loaded.call_kwargs.items() >= {"num_inference_steps": 10, "height": 32, "width": 32}.items()
    assert loaded.stability["map_runs"] == 3 and loaded.stability["budget"] == 2
    assert loaded.errors.reuse.shape == (11, 11) and loaded.errors.jvp.shape == (2, 3, 11, 11)
    assert loaded.prompts == ["a red circle", "a blue star"] and loaded.seeds == [0, 1]
    assert loaded.model == model_dir and loaded.pipeline_class == "FluxPipeline"
    assert (loaded.height, loaded.width) == (32, 32)
    assert np.isnan(loaded.errors.jvp[1, 2, 1, 5]) and loaded.errors.jvp[1, 0, 1, 5] > 0
    assert loaded.sigmas[0] == 1.0 and loaded.sigmas[-1] == 0.0


def test_plan_to_stdout_feeds_generate_through_a_pipe(calibration, model_dir, tmp_path) -> None:
    planned = run_process(["plan", "--calibration", calibration, "--budget", "4"])
    assert planned.returncode == 0, planned.stderr.decode()
    assert b"compute steps:" in planned.stderr and planned.stdout.startswith(b"format_version: 3")
    out = tmp_path / "cached.png"
    generated = run_process(["generate", "--model", model_dir, "--schedule", "-", "--prompt", "a red circle",
                             *SIZE, "--out", str(out), "--json"], stdin=planned.stdout)
    assert generated.returncode == 0, generated.stderr.decode()
    summary = json.loads(generated.stdout)
    assert summary["nfe"] == 4 and summary["steps"] == 10 and summary["output"] == str(out)
    assert summary["seconds"] > 0
    assert Image.open(out).size == (32, 32)
    provenance = read_provenance(out)
    assert provenance["nfe"] == 4 and provenance["seed"] == 0 and len(provenance["schedule_sha256"]) == 64


def test_plan_writes_a_schedule_with_exactly_the_budget(calibration, capsys, tmp_path) -> None:
    out = tmp_path / "s.yaml"
    result = run_cli(["plan", "--calibration", calibration, "--budget", "3", "--gamma", "1", "--out", str(out),
                      "--json"], capsys)
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    schedule = load_schedule(out)
    assert schedule.budget == 3 and summary["compute_steps"] == schedule.compute_steps
    assert schedule.gamma == 1.0 and schedule.calibration["path"] == calibration
    assert result.stderr == ""
    alias = run_cli(["schedule", "--calibration", calibration, "--budget", "3", "--gamma", "1", "--out",
                     str(tmp_path / "t.yaml")], capsys)
    assert alias.code == 0 and "compute steps: " + " ".join(map(str, schedule.compute_steps)) in alias.stdout
    assert load_schedule(tmp_path / "t.yaml") == schedule


def test_uncached_generation_counts_every_step(model_dir, capsys, tmp_path) -> None:
    out = tmp_path / "plain.png"
    result = run_cli(["generate", "--model", model_dir, "--no-cache", "--steps", "6", "--prompt", "a red circle",
                      *SIZE, "--out", str(out), "--json"], capsys)
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["nfe"] == 6
    assert read_provenance(out)["schedule_sha256"] is None


def test_schedule_for_other_steps_is_refused_when_strict_and_nothing_written(calibration, model_dir, capsys,
                                                                           tmp_path) -> None:
    schedule = tmp_path / "s.yaml"
    assert run_cli(["plan", "--calibration", calibration, "--budget", "4", "--out", str(schedule)], capsys).code == 0
    out = tmp_path / "x.png"
    result = run_cli(["generate", "--model", model_dir, "--schedule", str(schedule), "--steps", "20",
                      "--strict-schedule", "--prompt", "a red circle", *SIZE, "--out", str(out)], capsys)
    assert result.code == 1
    assert result.stderr.strip() == (
        "error: the schedule was planned for 10 steps but this run uses --steps 20: use --steps 10 or plan for "
        "20 steps (without --strict-schedule it is mapped by σ)")
    assert not out.exists()
    fewer = run_cli(["generate", "--model", model_dir, "--schedule", str(schedule), "--steps", "3",
                     "--prompt", "a red circle", *SIZE, "--out", str(out)], capsys)
    assert fewer.code == 1 and fewer.stderr.strip() == (
        "error: the schedule makes 4 evaluations per branch but --steps 3 is fewer: use --steps 4 or more, or a "
        "schedule with a smaller budget")
    assert not out.exists()
    other = run_cli(["generate", "--model", "demo", "--schedule", str(schedule), "--prompt", "a red circle",
                     "--out", str(out)], capsys)
    assert other.code == 1 and f"planned for model '{model_dir}' but this run uses 'demo'" in other.stderr
    assert not out.exists()


def test_no_arguments_prints_usage_and_exits_2(capsys) -> None:
    result = run_cli([], capsys)
    assert result.code == 2
    assert "Usage: meancache [OPTIONS] COMMAND" in result.stdout + result.stderr
    assert "error" not in result.stderr


def test_version_and_flags_shown_as_flags(capsys) -> None:
    from importlib.metadata import version

    shown = run_cli(["--version"], capsys)
    assert shown.code == 0 and shown.stdout == f"meancache {version('meancache-cli')}\n"
    for command in (["--help"], ["plan", "--help"], ["generate", "--help"], ["calibrate", "--help"]):
        result = run_cli(command, capsys)
        assert result.code == 0 and "--help" in result.stdout
        assert "<bool>" not in result.stdout, command
    assert "--no-cache " in run_cli(["generate", "--help"], capsys).stdout


def test_an_empty_negative_prompt_runs_true_cfg(model_dir, capsys, tmp_path) -> None:
    cfg = ["--true-cfg-scale", "4", "--negative-prompt", ""]
    out = tmp_path / "cal.safetensors"
    calibrated = run_cli(["calibrate", "--model", model_dir, "--prompt", "a red circle", "--seeds", "0", "--steps", "4",
                          "--max-back", "1", *SIZE, *cfg, "--out", str(out), "--json"], capsys)
    assert calibrated.code == 0, calibrated.stderr
    assert json.loads(calibrated.stdout)["trajectories"] == 2  # the prompt and the empty negative prompt
    guidance = load_calibration(out).guidance
    assert (guidance["true_cfg_scale"], guidance["negative_prompt"]) == (4.0, "")
    generated = run_cli(["generate", "--model", model_dir, "--no-cache", "--steps", "3", "--prompt", "a red circle",
                         *SIZE, *cfg, "--out", str(tmp_path / "o.png"), "--json"], capsys)
    assert generated.code == 0, generated.stderr
    assert json.loads(generated.stdout)["nfe"] == 6


def test_stderr_holds_no_blank_line_and_no_library_warning(calibration, model_dir, tmp_path) -> None:
    schedule, image = tmp_path / "s.yaml", tmp_path / "o.png"
    long_prompt = "a red circle " + " ".join(f"word{i}" for i in range(11000))  # 100k characters: Linux allows 128k
    commands = [
        ["calibrate", "--model", model_dir, "--prompt", "a red circle", "--seeds", "0", "--steps", "3", *SIZE,
         "--max-back", "1", "--out", str(tmp_path / "c.safetensors"), "--json"],
        ["plan", "--calibration", calibration, "--budget", "4", "--out", str(schedule), "--json"],
        ["generate", "--model", model_dir, "--schedule", str(schedule), "--prompt", long_prompt, *SIZE,
         "--out", str(image), "--json"],
        ["generate", "--model", model_dir, "--schedule", str(schedule), "--prompt", "a red circle", *SIZE,
         "--out", str(image)],
        ["inspect", str(schedule), "--json"],
    ]
    for command in commands:
        result = run_process(command)
        assert result.returncode == 0, result.stderr.decode()
        assert result.stderr == b"", (command[0], result.stderr.decode()[:500])
        assert long_prompt[20:80] not in result.stdout.decode()


def test_a_long_prompt_is_not_echoed_back(capsys, tmp_path) -> None:
    words = ["zz" + a + b + c for a in "abcdefghij" for b in "abcdefghij" for c in "abcdefghij"]
    long_prompt = "a red circle on a blue background " + " ".join(words * 16) + " " + "q" * 1000
    result = run_cli(["generate", "--model", "demo", "--no-cache", "--steps", "2", "--prompt", long_prompt,
                      "--out", str(tmp_path / "o.png")], capsys)
    assert result.code == 0, result.stderr[:500]
    assert f"the demo model does not know {'q' * 24}…, zzaaa, zzaab, zzaac, zzaad" in result.stderr
    assert "and 993 more; its vocabulary is" in result.stderr and len(result.stderr) < 400


def test_inspect_finds_the_calibration_beside_the_schedule(calibration, capsys, tmp_path, monkeypatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "cal.safetensors").write_bytes(Path(calibration).read_bytes())
    monkeypatch.chdir(tmp_path)
    planned = run_cli(["plan", "--calibration", "work/cal.safetensors", "--budget", "4", "--out", "work/s.yaml"],
                      capsys)
    assert planned.code == 0, planned.stderr
    assert load_schedule(work / "s.yaml").calibration["path"] == "cal.safetensors"
    monkeypatch.chdir(work)  # then from elsewhere: the schedule's own directory, not the cwd, anchors the path
    for where in (work, tmp_path.parent):
        monkeypatch.chdir(where)
        result = run_cli(["inspect", str(work / "s.yaml"), "--plot", str(tmp_path / "map.png")], capsys)
        assert result.code == 0, result.stderr
        assert (tmp_path / "map.png").exists()
        (tmp_path / "map.png").unlink()
    (work / "cal.safetensors").rename(tmp_path / "moved.safetensors")
    missing = run_cli(["inspect", str(work / "s.yaml"), "--plot", str(tmp_path / "map.png")], capsys)
    assert missing.code == 1 and missing.stderr == (
        "error: the schedule's calibration cal.safetensors is neither beside the schedule nor in the working "
        "directory: pass --calibration FILE\n")


def test_compare_puts_budget_step_euler_beside_the_cache(calibration, model_dir, capsys, tmp_path) -> None:
    schedule = tmp_path / "s.yaml"
    assert run_cli(["plan", "--calibration", calibration, "--budget", "4", "--out", str(schedule)], capsys).code == 0
    result = run_cli(["generate", "--model", model_dir, "--schedule", str(schedule), "--prompt", "a red circle",
                      *SIZE, "--compare", "--repeat", "1", "--out", str(tmp_path / "o.png"), "--json"], capsys)
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["nfe"], summary["reference_nfe"], summary["euler_nfe"], summary["euler_steps"]) == (4, 10, 4, 4)
    assert 0 < summary["euler_psnr"] <= 100 and 0 < summary["psnr"] <= 100 and summary["speedup"] > 0


def test_plan_with_the_model_validates_the_candidates_and_says_what_it_cost(calibration, model_dir, capsys,
                                                                             tmp_path) -> None:
    out = tmp_path / "v.yaml"
    result = run_cli(["plan", "--calibration", calibration, "--budget", "4", "--model", model_dir, "--out", str(out)],
                     capsys)
    assert result.code == 0, result.stderr
    schedule = load_schedule(out)
    validation = schedule.validation
    assert validation["runs"] == 1 and len(validation["candidates"]) == 5
    assert f"* {validation['chosen']}" in result.stdout and "validated on 1 held-out runs" in result.stdout
    assert f"= {100 * validation['cost_share']:.0f} % of the calibration's 40" in result.stdout
    as_json = run_cli(["plan", "--calibration", calibration, "--budget", "4", "--model", model_dir, "--cost",
                       "displacement", "--exp", "--out", str(tmp_path / "d.yaml"), "--json"], capsys)
    assert as_json.code == 0, as_json.stderr
    [only] = json.loads(as_json.stdout)["validation"]["candidates"]
    assert only["recipe"] == "displacement γ4 λ{0.5,1} +exp" and only["exponential"] is True


def test_plan_refuses_a_model_other_than_the_calibrated_one(calibration, capsys) -> None:
    result = run_cli(["plan", "--calibration", calibration, "--budget", "4", "--model", "demo"], capsys)
    assert result.code == 2 and "the calibration is of model" in result.stderr and "not 'demo'" in result.stderr


def test_calibrate_runs_auto_prints_the_stability_figure(model_dir, capsys, tmp_path) -> None:
    out = tmp_path / "auto.safetensors"
    result = run_cli(["calibrate", "--model", model_dir, "--prompt", "a red circle", "--seeds", "0", "--runs", "auto",
                      "--max-runs", "2", "--steps", "10", *SIZE, "--max-back", "3", "--out", str(out), "--json"],
                     capsys)
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["held_out"] == 1 and summary["seeds"] == [0, 1, 2] and summary["runs"] == 3
    assert summary["stability"]["map_runs"] == 2 and "after 2 map runs: plan regret" in result.stderr
    text = run_cli(["calibrate", "--model", model_dir, "--prompt", "a red circle", "--seeds", "0,1,2", "--steps", "10",
                    *SIZE, "--max-back", "3", "--out", str(tmp_path / "fixed.safetensors")], capsys)
    assert "plan stability: plans from two halves of the 2 map runs (B = 2) share" in text.stdout
def test_plan_for_fewer_steps_runs_natively_there(calibration, model_dir, capsys, tmp_path) -> None:
    """A 10-step calibration plans for 6 steps on the very sigmas the pipeline runs at 6 steps: generate
    then has nothing to map and nothing to say."""
    schedule = tmp_path / "s6.yaml"
    planned = run_cli(["plan", "--calibration", calibration, "--budget", "3", "--steps", "6", "--out",
                       str(schedule)], capsys)
    assert planned.code == 0, planned.stderr
    assert "3 of 6 steps" in planned.stdout and "from a 10-step calibration" in planned.stdout
    loaded = load_schedule(schedule)
    assert loaded.num_inference_steps == 6 and loaded.budget == 3 and len(loaded.sigmas) == 7
    generated = run_cli(["generate", "--model", model_dir, "--schedule", str(schedule), "--prompt", "a red circle",
                         *SIZE, "--out", str(tmp_path / "o.png"), "--json"], capsys)
    assert generated.code == 0 and generated.stderr == ""
    assert json.loads(generated.stdout)["nfe"] == 3 and json.loads(generated.stdout)["steps"] == 6
    more = run_cli(["plan", "--calibration", calibration, "--budget", "3", "--steps", "12"], capsys)
    assert more.code == 2 and more.stderr == (
        "error: --steps 12 is more than the calibration's 10 steps: a calibration knows nothing finer than its own "
        "grid; calibrate with --steps 12, or plan for 10 steps or fewer\n")


def test_a_schedule_runs_mapped_by_sigma_at_other_steps_and_sizes(calibration, model_dir, capsys, tmp_path) -> None:
    from meancache_cli.calibration import reference_run_kwargs
    from meancache_cli.generate import generate

    schedule = tmp_path / "s.yaml"
    assert run_cli(["plan", "--calibration", calibration, "--budget", "4", "--out", str(schedule)], capsys).code == 0
    out = tmp_path / "o.png"
    moved = run_cli(["generate", "--model", model_dir, "--schedule", str(schedule), "--steps", "7",
                     "--prompt", "a red circle", *SIZE, "--out", str(out), "--json"], capsys)
    assert moved.code == 0, moved.stderr
    assert moved.stderr == (
        "warning: the schedule was planned for 10 steps, this run uses --steps 7: its compute steps are mapped by σ "
        "onto the 7-step grid, 4 evaluations per branch as planned (--strict-schedule refuses instead)\n")
    assert json.loads(moved.stdout)["nfe"] == 4
    # The library does the same as the command.
    spec = resolve_model(model_dir)
    pipe, kwargs = load_pipeline(spec), reference_run_kwargs(spec, 7, 32, 32, None, {})
    with pytest.warns(ScheduleMappedWarning, match="mapped by σ"):
        library = generate(pipe, "a red circle", 0, kwargs, load_schedule(schedule))
    assert library.nfe == 4
    np.testing.assert_allclose(np.asarray(library.images[0], dtype=float), np.asarray(Image.open(out), dtype=float),
                               atol=1)
    larger = run_cli(["generate", "--model", model_dir, "--schedule", str(schedule), "--prompt", "a red circle",
                      "--height", "64", "--width", "64", "--out", str(out), "--json"], capsys)
    assert larger.code == 0, larger.stderr
    assert larger.stderr.startswith("warning: the schedule was planned at 32x32, this run is 64x64: its compute "
                                    "steps are mapped by σ onto this run's sigmas; on the demo model (32 vs 64 px) "
                                    "that lost 1.0 dB on average")
    assert json.loads(larger.stdout)["nfe"] == 4


def test_a_shipped_fifty_step_schedule_runs_at_thirty_steps_with_its_budget(capsys, tmp_path) -> None:
    result = run_cli(["generate", "--model", "demo", "--budget", "10", "--steps", "30", "--prompt",
                      "a red circle on a blue background", "--out", str(tmp_path / "o.png"), "--json"], capsys)
    assert result.code == 0, result.stderr
    assert "planned for 50 steps, this run uses --steps 30" in result.stderr
    summary = json.loads(result.stdout)
    assert summary["nfe"] == 20 and summary["steps"] == 30  # 10 per guidance branch
