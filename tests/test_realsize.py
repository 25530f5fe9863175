"""`meancache bench --real-size` at reduced size on the CPU: the code path the GPU run takes.

The transformers are the real diffusers classes, built from the packaged published configs with a few blocks and
small latents. Real evaluations are counted inside the model (a pre-hook on its input embedder), so a skipped
step that still ran the model would show; the loop's inputs are checked against what the real pipelines pass.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import ROOT, run_cli
from tiny_models import TINY_MODELS

from meancache_cli.bench.realsize import (
    DEFAULT_COMPILE,
    FAMILIES,
    INPUTS,
    RealConfig,
    Rig,
    build_scheduler,
    build_transformer,
    compile_modes,
    denoise,
    environment,
    instrumented,
    load_real_config,
    measure_family,
)
from meancache_cli.bench.realsize_report import COMMAND, TITLE, merge, replace_section, section
from meancache_cli.errors import UsageError
from meancache_cli.models.schedulers import euler_scheduler_swap

EMBEDDERS = {"flux": "x_embedder", "qwen-image": "img_in", "wan": "patch_embedding", "hunyuanvideo": "x_embedder"}
STEPS = 8
BACKEND = "eager"


def reduced_rig(family: str) -> tuple[Rig, Any]:
    config = load_real_config(family, reduced=True)
    rig = Rig(build_transformer(config.transformer, "cpu", torch.float32), build_scheduler(config.scheduler)[0])
    return rig, INPUTS[family](config, "cpu", torch.float32, torch.Generator().manual_seed(1))


def record_calls(transformer: torch.nn.Module) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    transformer.register_forward_pre_hook(lambda module, args, kwargs: calls.append(dict(kwargs)), with_kwargs=True)
    return calls


def same_call(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    """Same arguments: tensors of the same shape and dtype, equal where the pipeline's values are not random."""
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        if isinstance(value, torch.Tensor):
            assert (ours[name].shape, ours[name].dtype) == (value.shape, value.dtype), name
            if name in ("timestep", "guidance", "img_ids", "txt_ids"):
                assert torch.equal(ours[name], value), name
        else:
            assert ours[name] == value, name


@pytest.mark.parametrize("family", FAMILIES)
def test_the_loop_passes_the_transformer_what_its_pipeline_passes(family: str) -> None:
    """The real pipeline (tiny parts) and the bench's loop on its transformer make the same sequence of calls:
    argument names, shapes, dtypes, and the timesteps (dynamic shift included) value for value."""
    tiny = TINY_MODELS[family]
    pipe = tiny.build()
    shipped = {"_class_name": type(pipe.scheduler).__name__, **pipe.scheduler.config}
    euler_scheduler_swap(pipe)  # what load_pipeline does to Wan; the bench swaps the same way
    pipe.set_progress_bar_config(disable=True)
    calls = record_calls(pipe.transformer)
    pipe("a red circle on a blue background", num_inference_steps=6, output_type="latent", **tiny.call)
    text = [{"length": c["encoder_hidden_states"].shape[1], "prompt": c["encoder_hidden_states"].shape[1]}
            for c in calls[: tiny.branches]]
    # The tiny image VAEs downsample 2× where the real ones downsample 8×: scale the pixel size to match.
    scale = 8 // getattr(pipe, "vae_scale_factor", 8) if tiny.frames is None else 1
    config = RealConfig(family, "tiny", dict(pipe.transformer.config), shipped, text, tiny.call["height"] * scale,
                        tiny.call["width"] * scale, tiny.frames, dict(tiny.call))
    rig = Rig(pipe.transformer, build_scheduler(config.scheduler)[0])
    inputs = INPUTS[family](config, "cpu", pipe.transformer.dtype, torch.Generator().manual_seed(0))
    ours = record_calls(pipe.transformer)
    with torch.no_grad():
        denoise(rig, inputs, 6)
    assert len(ours) == len(calls) - len(ours) == 6 * tiny.branches
    for mine, theirs in zip(ours, calls):
        same_call(mine, theirs)


@pytest.mark.parametrize("family", FAMILIES)
def test_meancache_runs_the_model_b_times_per_branch(family: str) -> None:
    """Packaged configs at reduced size: B real evaluations per branch with MeanCache, N without, and B = N is
    the uncached loop bit for bit (the hook and the loop agree on every step)."""
    rig, inputs = reduced_rig(family)
    branches = len(inputs.branches)
    calls = record_calls(getattr(rig.transformer, EMBEDDERS[family]))
    with torch.no_grad():
        uncached = denoise(rig, inputs, STEPS)
        evaluated_uncached = len(calls)
        with instrumented(rig, 3, STEPS) as tools:
            cached = denoise(rig, inputs, STEPS)
        evaluated_cached = len(calls) - evaluated_uncached
        with instrumented(rig, STEPS, STEPS):
            every_step = denoise(rig, inputs, STEPS)
    assert evaluated_uncached == STEPS * branches
    assert evaluated_cached == tools.counter.evaluations == 3 * branches
    assert torch.equal(every_step, uncached)
    assert torch.isfinite(cached).all() and not torch.allclose(cached, uncached)


def test_meancache_on_a_compiled_transformer_matches_eager() -> None:
    """Compiled each way, beneath the hooks or around them: the same final latents as eager, B evaluations, at most
    3 graphs for the first cached generation and no recompilation once warm (the eager backend: dynamo traces and
    guards as with inductor, without a C++ build on the CPU). The rows then render as measured ones."""
    modes = ["regional", "whole", "module", "wrapped"]
    row = measure_family(load_real_config("flux", reduced=True), "cpu", torch.float32, steps=STEPS, budgets=[3],
                         repeats=1, compile_mode=",".join(modes), compile_backend=BACKEND)
    assert [compiled["mode"] for compiled in row["compiled"]] == modes
    for compiled in row["compiled"]:
        (cached,) = compiled["budgets"]
        assert (compiled["uncached"]["nfe"], cached["nfe"]) == (STEPS, 3), compiled["mode"]
        assert cached["same_output"] and compiled["uncached_difference"] <= compiled["tolerance"], compiled["mode"]
        assert 1 <= compiled["warmup_graphs"]["cached"] <= 3 and compiled["graphs_after_warmup"] == 0, compiled["mode"]
    text = "\n".join(section({"budgets": [3], "rows": [{**row, "reduced": False, "environment": environment("cpu")}]}))
    assert "| FLUX.1 [dev] | 128×128: 64 tokens | 16 |" in text
    assert all(f"| FLUX.1 [dev] | {mode} |" in text for mode in modes)
    assert "Not measured yet** (Qwen-Image, Wan 2.1 T2V 1.3B, HunyuanVideo)" in text


def test_compile_modes_are_a_list_or_none() -> None:
    assert compile_modes(DEFAULT_COMPILE) == ["regional", "module", "wrapped"]
    assert compile_modes("whole, whole") == ["whole"] and compile_modes("none") == []
    with pytest.raises(UsageError, match="--compile max-autotune is unknown"):
        compile_modes("regional,max-autotune")


def test_reduced_run_from_the_command_line_writes_results_and_section(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench"
    result = run_cli(["bench", "--real-size", "--reduced", "--device", "cpu", "--families", "qwen-image", "--steps",
                      str(STEPS), "--budgets", "3", "--repeats", "1", "--compile", "none", "--out", str(out),
                      "--json"], capsys)
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["rows"][0]["family"] == "qwen-image"
    (row,) = json.loads((out / "realsize.json").read_text())["rows"]
    (cached,) = row["eager"]["budgets"]
    assert (row["branches"], row["eager"]["uncached"]["nfe"], cached["nfe"]) == (2, 2 * STEPS, 2 * 3)
    # Exactly what the bound counts, and the scheduler's σ table (N + 1 float32) the hook references.
    assert cached["cache_bound_bytes"] <= cached["cache_held_bytes"] <= cached["cache_bound_bytes"] + 4 * (STEPS + 1)
    report = (out / "benchmarks.md").read_text()
    assert TITLE in report and COMMAND in report and "Reduced-size smoke run" in report
    assert "Not measured yet" in report  # a reduced run never passes for the real-size measurement


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_full_size_without_cuda_says_so_in_one_line(capsys) -> None:
    result = run_cli(["bench", "--real-size"], capsys)
    assert result.code == 1
    assert result.stderr.count("\n") == 1 and "CUDA" in result.stderr and "Traceback" not in result.stderr
    result = run_cli(["bench", "--real-size", "--device", "cpu"], capsys)
    assert result.code == 2 and result.stderr.count("\n") == 1 and "--reduced" in result.stderr


def test_bench_help_documents_real_size(capsys) -> None:
    result = run_cli(["bench", "--help"], capsys)
    assert result.code == 0
    assert all(option in result.stdout for option in ("--real-size", "--reduced", "--families", "--compile"))


def test_the_committed_report_section_is_what_the_code_renders() -> None:
    """docs/benchmarks.md carries the section for the results committed beside it (none yet: pending, with the
    command that fills it)."""
    from meancache_cli.bench.realsize_report import load_results

    report = (ROOT / "docs" / "benchmarks.md").read_text()
    expected = "\n".join(section(load_results(ROOT / "docs" / "bench")))
    assert expected.strip() in report
    assert f"```bash\n{COMMAND}\n```" in report


def test_a_run_replaces_only_its_own_rows_and_section() -> None:
    old = {"rows": [{"family": "wan", "reduced": False, "v": 1}, {"family": "flux", "reduced": False, "v": 1},
                    {"family": "flux", "reduced": True, "v": 1}]}
    new = {"budgets": [10], "rows": [{"family": "flux", "reduced": False, "v": 2}]}
    rows = merge(old, new)["rows"]
    assert [(r["family"], r["reduced"], r["v"]) for r in rows] == [("flux", False, 2), ("wan", False, 1),
                                                                    ("flux", True, 1)]
    text = f"# B\n\n## A\n\na\n\n{TITLE}\n\nold\n\n## C\n\nc\n"
    assert replace_section(text, [TITLE, "", "new"]) == f"# B\n\n## A\n\na\n\n{TITLE}\n\nnew\n\n## C\n\nc\n"
    assert replace_section("# B\n", [TITLE, "", "new"]) == f"# B\n\n{TITLE}\n\nnew\n"
