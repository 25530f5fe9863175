"""What a calibration or a schedule holds, as text and as a plot (`meancache inspect`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .core.stability import edge_costs
from .errors import FileFormatError
from .files import Calibration, Schedule

COST_LABELS = {"displacement": "displacement error |σ_s − σ_t|·E_K", "velocity": "velocity error E_K"}


def summary(item: Calibration | Schedule) -> dict[str, Any]:
    """The facts a user checks first, as plain data (printed as text or JSON)."""
    if isinstance(item, Schedule):
        return {
            "kind": "schedule", "model": item.model, "num_inference_steps": item.num_inference_steps,
            "budget": item.budget, "ideal_speedup": item.num_inference_steps / item.budget,
            "gamma": item.gamma, "cost": item.cost, "compute_steps": item.compute_steps, "orders": item.orders,
            "edge_lengths": [e - s for s, e in zip(item.compute_steps,
                                                   [*item.compute_steps[1:], item.num_inference_steps])],
            "predicted_cost": item.predicted_cost, "resolution": [item.height, item.width],
            "calibration": item.calibration,
        }
    return {
        "kind": "calibration", "model": item.model, "pipeline_class": item.pipeline_class,
        "num_inference_steps": item.num_inference_steps, "kmax": item.kmax, "trajectories": item.trajectories,
        "prompts": item.prompts, "seeds": item.seeds, "resolution": [item.height, item.width],
        "guidance": item.guidance, "sigma_first_last": [float(item.sigmas[0]), float(item.sigmas[-2])],
        "mean_error_by_k": [float(np.nanmean(item.errors[k])) for k in range(item.kmax + 1)],
    }


def summary_text(data: dict[str, Any]) -> str:
    return "\n".join(f"{key}: {value}" for key, value in data.items())


def plot(calibration: Calibration, out: str | Path, schedule: Schedule | None = None,
         cost: str = "displacement") -> None:
    """Heatmap of the best-K edge cost over (t, s), log scale, with the schedule's path; and the per-step
    change of the instantaneous vs the average velocity."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    from .files import write_atomic

    costs = edge_costs(calibration.errors, calibration.sigmas, cost)
    best = np.fmin.reduce(costs, axis=0)
    best[best <= 0] = np.nan  # exact Euler steps: nothing to show on a log scale
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    image = left.imshow(best.T, origin="lower", cmap="viridis", norm=LogNorm(), aspect="auto")
    fig.colorbar(image, ax=left, label=COST_LABELS[cost] + " (best K)")
    left.set_xlabel("start step t")
    left.set_ylabel("end step s")
    title = f"{calibration.model}: N={calibration.num_inference_steps}, Kmax={calibration.kmax}"
    if schedule is not None:
        if schedule.num_inference_steps != calibration.num_inference_steps:
            raise FileFormatError(
                f"the schedule has {schedule.num_inference_steps} steps, the calibration "
                f"{calibration.num_inference_steps}: plot a schedule planned from this calibration"
            )
        ends = [*schedule.compute_steps[1:], schedule.num_inference_steps]
        left.plot(schedule.compute_steps, ends, "o-", color="red", label=f"schedule B={schedule.budget}")
        for t, s, k in zip(schedule.compute_steps, ends, schedule.orders):
            left.annotate(f"K{k}", (t, s), textcoords="offset points", xytext=(4, -10), color="red", fontsize=7)
        left.legend(loc="upper left")
    left.set_title(title)
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
