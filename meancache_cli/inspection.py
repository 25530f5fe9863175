"""What a calibration or a schedule holds, as text and as a plot on its calibration (`meancache inspect`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import defaults
from .core.stability import edge_costs
from .errors import FileFormatError, MeanCacheError, UsageError
from .files import Calibration, Schedule, load_calibration, resolve_reference

COST_LABELS = {"displacement": "displacement error |σ_s − σ_t|·E", "velocity": "velocity error E"}


def summary(item: Calibration | Schedule) -> dict[str, Any]:
    """The facts a user checks first, as plain data (printed as text or JSON)."""
    if isinstance(item, Schedule):
        return {
            "kind": "schedule", "model": item.model, "num_inference_steps": item.num_inference_steps,
            "budget": item.budget, "ideal_speedup": item.num_inference_steps / item.budget,
            "estimator": item.estimator, "gamma": item.gamma, "cost": item.cost, "compute_steps": item.compute_steps,
            "orders": item.orders, "lambdas": item.lambdas, "kinds": item.kinds,
            "edge_lengths": [edge.end - edge.start for edge in item.edges],
            "predicted_cost": item.predicted_cost, "resolution": [item.height, item.width],
            "calibration": item.calibration, **({"notes": item.notes} if item.notes else {}),
            **({"validated_choice": item.validation["chosen"]} if item.validation else {}),
        }
    return {
        "kind": "calibration", "model": item.model, "pipeline_class": item.pipeline_class,
        "num_inference_steps": item.num_inference_steps, "max_back": item.max_back,
        "lambdas": list(item.errors.lambdas), "trajectories": item.trajectories, "prompts": item.prompts,
        "seeds": item.seeds, "resolution": [item.height, item.width], "guidance": item.guidance,
        "elements": f"{item.elements} of {item.latent_elements}",
        "sigma_first_last": [float(item.sigmas[0]), float(item.sigmas[-2])],
        "mean_error_reuse": float(np.nanmean(item.errors.reuse)),
        "mean_error_jvp_previous_step": {f"{lam:g}": float(np.nanmean(item.errors.jvp[i, 0]))
                                         for i, lam in enumerate(item.errors.lambdas)},
        "mean_error_exp_previous_step": float(np.nanmean(item.errors.exp[0, 0])),
        "held_out": [f"{run.prompt} (seed {run.seed})" for run in item.held_out],
        "plan_stability": item.stability,
    }


def summary_text(data: dict[str, Any]) -> str:
    return "\n".join(f"{key}: {value}" for key, value in data.items())


def schedule_text(schedule: Schedule) -> str:
    """A planned schedule as `plan` prints it: its steps, edges and costs, and its validation when it has one."""
    steps = schedule.num_inference_steps
    text = (f"compute steps: {' '.join(map(str, schedule.compute_steps))}\n"
            f"edges:         {' '.join(map(edge_label, schedule.kinds, schedule.lambdas))}"
            "   (reuse v_t; jvp λ: the damped JVP; exp: the exponential integrator)\n"
            f"edge costs:    {' '.join(f'{c:.3g}' for c in schedule.edge_costs)}   ({schedule.cost} error)\n"
            f"predicted cost: {schedule.predicted_cost:.4g} = (Σ cost^(1+γ))^(1/(1+γ)), γ = {schedule.gamma:g}\n"
            f"{schedule.budget} of {steps} steps, ideal speed-up {steps / schedule.budget:.1f}x"
            + (f"\n{schedule.notes}" if schedule.notes else ""))
    if schedule.validation is not None:
        text += "\n" + validation_text(schedule.validation)
    return text


def edge_label(kind: str, damping: float) -> str:
    return f"jvp{damping:g}" if kind == "jvp" else kind


def validation_text(validation: dict[str, Any]) -> str:
    """The candidates' scores, the chosen one marked, and what the validation cost."""
    lines = [f"validated on {validation['runs']} held-out runs ({validation['metric']}):"]
    for entry in validation["candidates"]:
        mark = "*" if entry["recipe"] == validation["chosen"] else " "
        same = f"  (same plan as {entry['same_plan_as']})" if entry["same_plan_as"] else ""
        lines.append(f" {mark} {entry['recipe']:<36} {entry['score']:6.2f} dB   min {min(entry['psnr']):6.2f}{same}")
    lines.append(f"validation cost: {validation['evaluations_per_branch']} model evaluations per branch = "
                 f"{100 * validation['cost_share']:.0f} % of the calibration's "
                 f"{validation['calibration_evaluations_per_branch']}")
    return "\n".join(lines)


def calibration_to_plot(item: Calibration | Schedule, path: str | Path, calibration: str | None = None) -> Calibration:
    """What the plot of the file at `path` is drawn on: a calibration itself; for a schedule, `calibration` when
    given, else the calibration it names (beside the schedule, else in the working directory)."""
    if isinstance(item, Calibration):
        return item
    named = (item.calibration or {}).get("path")
    if calibration is None and named is None:
        raise UsageError("this schedule names no calibration: pass --calibration FILE to plot it")
    source = calibration or resolve_reference(path, named)
    if calibration is None and not Path(source).exists():
        raise MeanCacheError(f"the schedule's calibration {named} is neither beside the schedule nor in the "
                             "working directory: pass --calibration FILE")
    return load_calibration(source)


def plot(calibration: Calibration, out: str | Path, schedule: Schedule | None = None,
         cost: str = defaults.RECIPE.cost) -> None:
    """Heatmaps over (t, s), log scale: the reuse cost, and the best JVP cost over λ with the previous
    compute step one edge-length back (a uniform grid's history), with the schedule's path on both; and
    the per-step change of the instantaneous vs the average velocity."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    from .files import write_atomic

    costs = edge_costs(calibration.errors, calibration.sigmas, cost)
    n = calibration.num_inference_steps
    t, s = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    back = np.clip(s - t, 1, costs.max_back) - 1
    jvp = np.fmin.reduce(costs.jvp, axis=0)[back, t, s]
    if schedule is not None and schedule.num_inference_steps != n:
        raise FileFormatError(
            f"the schedule has {schedule.num_inference_steps} steps, the calibration {n}: "
            "plot a schedule planned from this calibration"
        )
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    for axis, values, label in ((axes[0], costs.reuse, "reuse v_t (K = 0)"),
                                (axes[1], jvp, "JVP, p = t − (s − t), best λ (K = 1)")):
        shown = np.where(values > 0, values, np.nan)  # exact Euler steps: nothing to show on a log scale
        image = axis.imshow(shown.T, origin="lower", cmap="viridis", norm=LogNorm(), aspect="auto")
        fig.colorbar(image, ax=axis, label=COST_LABELS[cost])
        axis.set_xlabel("start step t")
        axis.set_ylabel("end step s")
        axis.set_title(f"{calibration.model}, N={n}: {label}", fontsize=9)
        if schedule is not None:
            ends = [*schedule.compute_steps[1:], n]
            axis.plot(schedule.compute_steps, ends, "o-", color="red", label=f"schedule B={schedule.budget}")
            for edge in schedule.edges:
                label = {"reuse": "K0", "jvp": f"K{edge.order} λ{edge.damping:g}", "exp": f"K{edge.order} exp"}
                axis.annotate(label[edge.kind], (edge.start, edge.end), textcoords="offset points",
                              xytext=(4, -10), color="red", fontsize=6)
            axis.legend(loc="upper left")
    right = axes[2]
    stats = calibration.step_statistics
    steps = np.arange(calibration.num_inference_steps)
    right.semilogy(steps, stats["velocity_change"], label="instantaneous velocity v_i")
    right.semilogy(steps, stats["mean_velocity_change"], label="average velocity u(i→N)")
    right.set_xlabel("step i")
    right.set_ylabel("relative change from step i−1")
    right.set_title("step-to-step change")
    right.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    write_atomic(out, buffer.getvalue())
