"""How the demo model's shipped schedules are made (`make schedules`), so they never drift from the code.

A fixed recipe: the demo's calibration prompts with four seeds, N = 50, once guided (true CFG 4 with an
empty negative prompt, the demo's default) and once plain, then `plan` with its defaults at each
budget. Guided schedules are `demo/b<B>.yaml` (what `generate --model demo --budget B` picks), plain
ones `demo/plain-b<B>.yaml`. The authors' schedules beside them are copied from their release.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from .calibration import reference_run_kwargs, run_calibration
from .files import SHIPPED_SCHEDULES, Schedule
from .models.registry import load_pipeline, resolve_model
from .planning import plan_schedule

BUDGETS = (8, 10, 13, 17, 25)
SEEDS = (1000, 1001, 1002, 1003)
CONFIGURATIONS: dict[str, dict[str, Any]] = {
    "": {"true_cfg_scale": 4.0, "negative_prompt": ""},
    "plain-": {"true_cfg_scale": 1.0, "negative_prompt": None},
}


def demo_schedules(budgets: tuple[int, ...] = BUDGETS) -> dict[str, Schedule]:
    """The demo's schedules by file stem, made by the recipe above."""
    spec = resolve_model("demo")
    pipe = load_pipeline(spec)
    schedules = {}
    for prefix, guidance in CONFIGURATIONS.items():
        kwargs = reference_run_kwargs(spec, spec.steps, None, None, None, guidance)
        calibration = run_calibration(pipe, spec.name, spec.calibration_prompts, list(SEEDS), kwargs, holdout=0)
        for budget in budgets:
            schedule = plan_schedule(calibration, budget)
            notes = (f"made by 'make schedules' (meancache_cli/shipped.py): demo calibration prompts, seeds "
                     f"{list(SEEDS)}, {'true CFG 4, empty negative prompt' if prefix == '' else 'no guidance'}, "
                     f"{calibration.trajectories} trajectories; plan defaults")
            schedules[f"{prefix}b{budget}"] = replace(schedule, notes=notes)
    return schedules


def write_demo_schedules(directory: Path = SHIPPED_SCHEDULES / "demo") -> None:
    from .files import save_schedule

    directory.mkdir(parents=True, exist_ok=True)
    for stem, schedule in demo_schedules().items():
        save_schedule(schedule, directory / f"{stem}.yaml")


if __name__ == "__main__":
    write_demo_schedules()
