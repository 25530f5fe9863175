"""Shipped schedules: the authors' published ones run with exactly B forwards per branch on their model
family, and the demo's are what `make schedules` makes today."""

from __future__ import annotations

import itertools
import json
import warnings

import pytest
import torch
from cli_helpers import run_cli
from tiny import ForwardCounter
from tiny_models import TINY_MODELS

from meancache_cli import apply_meancache, load_schedule, remove_meancache
from meancache_cli.files import shipped_schedules
from meancache_cli.hooks import ScheduleMappedWarning
from meancache_cli.shipped import BUDGETS, demo_schedules

PROMPT = "a red circle on a blue background"


@pytest.mark.parametrize(("model", "budgets"), [("qwen-image", (10, 17, 25)), ("z-image", (13, 15, 17, 20, 25))])
def test_authors_schedules_run_exactly_budget_forwards_per_branch_at_50_40_and_30_steps(model: str, budgets) -> None:
    """At 50 steps as published; at 40 and 30 moved by σ onto the grid the pipeline makes (a warning says so)."""
    tiny = TINY_MODELS[model]
    pipe = tiny.build()
    counter = ForwardCounter(tiny.embedder(pipe.transformer))
    for budget, steps in itertools.product(budgets, (50, 40, 30)):
        schedule = load_schedule(f"{model}/authors-b{budget}")
        assert schedule.estimator == "release" and schedule.num_inference_steps == 50 and schedule.model == model
        before = counter.calls
        hook = apply_meancache(pipe, schedule)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                latents = pipe(PROMPT, num_inference_steps=steps, output_type="latent",
                               generator=torch.Generator().manual_seed(0), **tiny.call).images
        finally:
            remove_meancache(pipe)
        assert counter.calls - before == budget * tiny.branches, (budget, steps)
        assert torch.isfinite(torch.as_tensor(latents)).all()
        assert len([w for w in caught if w.category is ScheduleMappedWarning]) == (steps != 50)
        assert hook.schedule.num_inference_steps == steps and hook.schedule.compute_steps[-1] == steps - 1


def test_make_schedules_reproduces_the_shipped_demo_schedules() -> None:
    made = demo_schedules(budgets=(10,))
    for stem, schedule in made.items():
        shipped = load_schedule(shipped_schedules()[f"demo/{stem}"])
        assert (schedule.compute_steps, schedule.orders, schedule.lambdas) == (
            shipped.compute_steps, shipped.orders, shipped.lambdas)
        # Map sums are float64 reductions whose order varies with the CPU's kernels: costs agree to ~1e-5 of
        # their scale, steps, orders and dampings exactly.
        scale = max(shipped.edge_costs)
        assert schedule.edge_costs == pytest.approx(shipped.edge_costs, rel=1e-5, abs=1e-5 * scale)
        assert schedule.notes == shipped.notes
    assert {f"demo/{prefix}b{b}" for prefix in ("", "plain-") for b in BUDGETS} <= set(shipped_schedules())


@pytest.mark.parametrize(("model", "options", "forwards"), [
    ("qwen-image", ["--schedule", "qwen-image/authors-b10", "--true-cfg-scale", "4", "--negative-prompt", "x"], 20),
    ("z-image", ["--budget", "13", "--guidance-scale", "0"], 13),
])
def test_cli_runs_a_shipped_schedule_on_a_saved_pipeline_of_its_family(model, options, forwards, capsys,
                                                                       tmp_path) -> None:
    directory = tmp_path / model
    TINY_MODELS[model].build().save_pretrained(directory)
    out = tmp_path / "o.png"
    result = run_cli(["generate", "--model", str(directory), *options, "--prompt", PROMPT, "--height", "32",
                      "--width", "32", "--out", str(out), "--json"], capsys)
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["nfe"] == forwards and summary["steps"] == 50 and out.exists()
