"""The bench's outputs: raw JSON, the markdown report, a Pareto plot and an image grid.

Every file is written through a temporary file and a rename (`files.write_atomic`), so an interrupted
bench never leaves a half-written report behind.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ..files import write_atomic
from .realsize_report import real_size_section

RESULTS_FILE = "results.json"
PSNR_TIE = 0.05  # dB: closer than this is a tie, not a win
SPEED_TIE = 0.03  # relative: wall-time speed-ups closer than this are within timing noise
CURVE_TIE = 0.25  # dB: above an interpolated curve, which mixes in timing noise
PARETO_FILE = "pareto.png"

WHY = {
    "euler": "a B-step Euler grid evaluates the model at every point it steps from, so no velocity is ever stale",
    "unipc": "a multistep solver spends each evaluation on a fresh state and combines it with the previous one "
             "for second-order accuracy, which on a smooth velocity field needs no cache at all",
    "dpmpp": "a multistep solver spends each evaluation on a fresh state and combines it with the previous one "
             "for second-order accuracy, which on a smooth velocity field needs no cache at all",
    "reuse": "its evenly spaced compute steps evaluate the model earlier and more often at high noise than the "
             "planned schedule (see the schedule diagnostics below)",
    "planner_k0": "where its schedule differs, the JVP-corrected edges MeanCache chose cost more than they saved",
    "minmax": "bounding the largest edge places the compute steps differently from minimizing Σw^(1+γ)",
    "authors": "re-estimating the velocity at every skipped step from the newest latents follows the curvature "
               "inside an edge that one average velocity per edge smooths over",
    "fbcache": "it runs the first block at every step and recomputes whenever that block's output moves, so its "
               "evaluations land where this prompt needs them (at the price of that block at every step)",
    "taylorseer": "it extrapolates the model output with a Taylor series in the step index, which tracks a "
                  "smoothly changing output",
    "magcache": "its skips follow the measured residual magnitudes of this model, decided per prompt",
}


def grid_file(budget: int) -> str:
    return f"grid_B{budget}.png"


def write_outputs(results: dict[str, Any], grid: dict[str, list[Any]], out_dir: Path, report_path: Path) -> None:
    """results.json, pareto.png, the grid and the markdown report."""
    budget = results["ablation_budget"]
    write_atomic(out_dir / RESULTS_FILE, (json.dumps(results, indent=1, default=_json_default) + "\n").encode())
    write_atomic(out_dir / PARETO_FILE, pareto_png(results))
    if grid.get("reference"):
        write_atomic(out_dir / grid_file(budget), grid_png(results, grid))
    write_atomic(report_path, markdown(results, out_dir, report_path).encode())


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


# -- figures -------------------------------------------------------------------------------------------


def _figure_bytes(figure: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def pareto_png(results: dict[str, Any]) -> bytes:
    """PSNR against measured speed-up and against ideal speed-up N/NFE, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    markers = "os^vD<>pP*Xh"
    colours = plt.get_cmap("tab20").colors
    for index, key in enumerate(results["methods"]):
        rows = sorted((r for r in results["results"] if r["method"] == key), key=lambda r: r["budget"])
        if not rows:
            continue
        ours = key == "meancache"
        style = {"marker": markers[index % len(markers)], "label": results["methods"][key]["label"],
                 "color": "black" if ours else colours[(2 * index) % 20 + (index >= 10)],
                 "linewidth": 2.5 if ours else 1.2, "zorder": 3 if ours else 2}
        psnr = [r["psnr"] for r in rows]
        axes[0].plot([r["speedup"] for r in rows], psnr, **style)
        axes[1].plot([results["steps"] / max(r["nfe"], 1e-9) for r in rows], psnr, **style)
    axes[0].set_xlabel("measured speed-up vs uncached (median wall time)")
    axes[1].set_xlabel("ideal speed-up N / NFE")
    axes[0].set_ylabel("PSNR vs uncached output (dB)")
    for axis in axes:
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="best")
    figure.suptitle(f"{results['model']}: quality against speed, N = {results['steps']}, budgets "
                    f"{', '.join(str(b) for b in sorted({r['budget'] for r in results['results']}))}")
    return _figure_bytes(figure)


def grid_png(results: dict[str, Any], grid: dict[str, list[Any]]) -> bytes:
    """Rows: evaluation prompts (first seed); columns: the uncached reference, then every method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["reference", *[key for key in results["methods"] if key in grid]]
    prompts = results["prompts"]["evaluation"]["prompts"]
    rows = len(grid["reference"])
    figure, axes = plt.subplots(rows, len(columns), figsize=(1.25 * len(columns), 1.35 * rows + 0.6),
                                squeeze=False)
    for column, key in enumerate(columns):
        title = "uncached" if key == "reference" else results["methods"][key]["label"]
        for row in range(rows):
            axis = axes[row][column]
            axis.imshow(np.asarray(grid[key][row]), interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(title.replace(" (", "\n("), fontsize=6)
            if column == 0:
                axis.set_ylabel(prompts[row].replace(" on ", "\non "), fontsize=5)
    figure.suptitle(f"B = {results['ablation_budget']} of N = {results['steps']}, seed "
                    f"{results['prompts']['evaluation']['seeds'][0]}", fontsize=8)
    return _figure_bytes(figure)


# -- markdown ------------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _nfe(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def _retried(results: dict[str, Any]) -> str:
    attempts = {r["budget"]: r.get("timing_attempts", 1) for r in results["results"]}
    retried = [f"B = {b} ({n} attempts)" for b, n in sorted(attempts.items()) if n > 1]
    return "retried at " + ", ".join(retried) if retried else "no budget needed a retry in this run"


def _link(out_dir: Path, name: str, report_path: Path) -> str:
    return Path(os.path.relpath(out_dir / name, report_path.parent)).as_posix()


def budget_rows(results: dict[str, Any], budget: int) -> list[dict[str, Any]]:
    return [r for r in results["results"] if r["budget"] == budget]


def budget_table(results: dict[str, Any], budget: int) -> list[str]:
    rows = budget_rows(results, budget)
    best = max(r["psnr"] for r in rows)
    body = []
    for r in rows:
        psnr = f"{r['psnr']:.2f}"
        label = f"**{r['label']}**" if r["method"] == "meancache" else r["label"]
        body.append([label, _nfe(r["nfe"]), f"{r['speedup']:.2f}×", f"**{psnr}**" if r["psnr"] == best else psnr,
                     f"{r['ssim']:.4f}"])
    return _table(["method", "NFE", "speed-up", "PSNR (dB)", "SSIM"], body)


def where_peers_win(results: dict[str, Any]) -> list[str]:
    """One bullet per peer that beats MeanCache's PSNR somewhere (by more than `PSNR_TIE`), from the numbers."""
    wins: dict[str, list[tuple[int, float, float, float, float]]] = defaultdict(list)
    margins = []
    for budget in sorted({r["budget"] for r in results["results"]}):
        rows = {r["method"]: r for r in budget_rows(results, budget)}
        ours = rows.get("meancache")
        if ours is None:
            continue
        peers = [r for key, r in rows.items() if key != "meancache"]
        if peers:
            best_peer = max(peers, key=lambda r: r["psnr"])
            margins.append((budget, ours["psnr"] - best_peer["psnr"], best_peer["label"]))
        for r in peers:
            if r["psnr"] - ours["psnr"] > PSNR_TIE:
                wins[r["method"]].append((budget, r["psnr"], ours["psnr"], r["speedup"], ours["speedup"]))
    methods = results["methods"]
    lines = []
    if not wins:
        lines.append(f"No peer beats MeanCache's mean PSNR by more than {PSNR_TIE} dB at any budget in this run.")
    for key, entries in sorted(wins.items(), key=lambda item: -len(item[1])):
        where = "; ".join(f"B = {b}: {p:.2f} vs {o:.2f} dB at {sp:.2f}× vs {so:.2f}×" for b, p, o, sp, so in entries)
        fast = [b for b, _, _, sp, so in entries if sp >= (1 - SPEED_TIE) * so]
        if len(fast) == len(entries):
            speed = "It is at least as fast in wall time at each (within 3 % timing noise): better on both axes."
        elif fast:
            speed = (f"At B = {', '.join(map(str, fast))} it is also at least as fast in wall time (within 3 % "
                     "timing noise); elsewhere it trades speed for quality.")
        else:
            speed = "It is slower in wall time at each of them: it trades speed for quality."
        lines.append(f"- **{methods[key]['label']}** beats MeanCache in PSNR at {len(entries)} budget"
                     f"{'s' if len(entries) > 1 else ''} ({where}). {speed} Likely because "
                     f"{WHY.get(key, 'of its settings (see results.json)')}.")
    if margins:
        text = ", ".join(f"B = {b}: {m:+.2f} dB vs {label}" for b, m, label in margins)
        lines.append(f"- MeanCache's PSNR margin over the best peer at each budget: {text}.")
    return lines + [f"- {line}" for line in above_curve(results)]


def schedule_diagnostics(results: dict[str, Any]) -> list[str]:
    """What MeanCache's own schedules did, from the numbers: orders used, planned vs even spacing, first edge."""
    rows = defaultdict(dict)
    for r in results["results"]:
        rows[r["budget"]][r["method"]] = r
    budgets = sorted(b for b in rows if "meancache" in rows[b])
    if not budgets:
        return []
    lines = []
    with_jvp = {b: sum(k > 0 for k in rows[b]["meancache"]["settings"]["orders"]) for b in budgets}
    if not any(with_jvp.values()):
        lines.append("At every budget the planner chose K = 0 on every edge: the stability map never rates the "
                     "JVP-corrected average velocity below plain reuse on this model, so MeanCache ran as velocity "
                     "reuse on planned steps (its rows match “planner, K = 0”).")
    else:
        used = ", ".join(f"B = {b}: {n} of {b} edges" for b, n in with_jvp.items())
        lines.append(f"Edges where the planner chose K ≥ 1 (JVP-corrected): {used}.")
    uniform_better = [b for b in budgets if {"reuse", "planner_k0"} <= set(rows[b])
                      and rows[b]["reuse"]["psnr"] > rows[b]["planner_k0"]["psnr"]]
    if uniform_better:
        detail = ", ".join(f"B = {b} ({rows[b]['reuse']['psnr']:.2f} vs {rows[b]['planner_k0']['psnr']:.2f} dB)"
                           for b in uniform_better)
        first = {b: rows[b]["meancache"]["settings"]["compute_steps"][1] if b > 1 else results["steps"]
                 for b in uniform_better}
        spans = ", ".join(f"0→{first[b]} at B = {b} (even spacing: 0→{results['steps'] // b})" for b in uniform_better)
        lines.append(f"Evenly spaced compute steps beat the planned ones, both with plain reuse, at {detail}: the "
                     f"calibrated edge cost misjudges where evaluations matter. MeanCache's first edge spans {spans}; "
                     "the local cost of an early edge is small because σ barely moves near 1, but an error made "
                     "early is carried through every later step.")
    return lines


def above_curve(results: dict[str, Any]) -> list[str]:
    """Peers above MeanCache's PSNR–speed-up curve (interpolated between its budgets): the wall-time view."""
    curve = sorted((r["speedup"], r["psnr"]) for r in results["results"] if r["method"] == "meancache")
    if len(curve) < 2:
        return []
    speeds, psnrs = zip(*curve)
    above: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in results["results"]:
        if r["method"] != "meancache" and speeds[0] <= r["speedup"] <= speeds[-1]:
            margin = r["psnr"] - float(np.interp(r["speedup"], speeds, psnrs))
            if margin > CURVE_TIE:
                above[r["label"]].append((r["budget"], margin))
    prefix = (f"At equal measured wall-time speed-up (MeanCache's PSNR–speed-up curve interpolated between its "
              f"budgets, {speeds[0]:.2f}× to {speeds[-1]:.2f}×), ")
    if not above:
        return [prefix + "no peer lies above MeanCache."]
    parts = [f"{label} at B = {', '.join(str(b) for b, _ in sorted(points))} (up to "
             f"{max(m for _, m in points):+.2f} dB)" for label, points in above.items()]
    return [prefix + f"these peers lie more than {CURVE_TIE} dB above MeanCache: " + "; ".join(parts) + "."]


def markdown(results: dict[str, Any], out_dir: Path, report_path: Path) -> str:
    steps = results["steps"]
    kwargs = results["call_kwargs"]
    env = results["environment"]
    prompts = results["prompts"]
    main_budgets = results["budgets"]
    n_eval = len(prompts["evaluation"]["prompts"]) * len(prompts["evaluation"]["seeds"])
    size = f"{kwargs.get('height')}×{kwargs.get('width')}" if kwargs.get("height") else "default size"
    lines = [
        "# Benchmarks: MeanCache against its peers",
        "",
        "Generated by `meancache_cli.bench`; do not edit by hand. Reproduce with:",
        "",
        "```bash",
        results["command"],
        "```",
        "",
        f"Model `{results['model']}`, N = {steps} steps, {size}; torch {env['torch']}, diffusers "
        f"{env['diffusers']}, {env['torch_threads']} CPU threads ({env['processor']}). "
        f"Whole run: {results['total_seconds'] / 60:.1f} min"
        f"{' (quick mode: fewer prompts, one budget, one timing run, reduced ablations)' if results['quick'] else ''}.",
        "",
        "## How it is measured",
        "",
        f"- **Quality**: PSNR and SSIM of the decoded image against the uncached {steps}-step output with the same "
        f"prompt and seed, mean over {n_eval} evaluation images (PSNR capped at 100 dB per image).",
        "- **NFE**: full model evaluations per image, counted for every method the same way: a forward pre-hook on "
        "the first sub-module of the transformer's last block, which runs only when the whole model runs "
        "(block-level caches call the block itself even when they skip it).",
        f"- **Speed-up**: median of {results['repeats']} timed runs of the uncached pipeline divided by the median "
        f"of {results['repeats']} timed runs of the method, whole pipeline call (text encoders and VAE included), "
        "in the same process, round-robin, after every method has already run (warm-up). Uncached: "
        f"{results['reference']['seconds_median']:.3f} s per image.",
        f"- Timing: when another process loads the CPU, one run can take many times its usual time; if any timed "
        f"series spreads more than 1.5× (slowest / fastest), the round-robin is repeated (up to 3 times) and the "
        f"steadiest attempt kept: {_retried(results)}.",
        "- Every schedule-based method runs exactly B evaluations; the dynamic caches have their threshold or "
        "interval searched on one calibration prompt to land near B, so their NFE on the evaluation set can differ.",
        "",
        "Calibration and evaluation prompts and seeds are disjoint:",
        "",
    ]
    for role, name in (("calibration_a", "Calibration set A (MeanCache, planner K = 0, min-max, MagCache ratios, "
                                         "threshold searches)"),
                       ("calibration_b", "Calibration set B (schedule-transfer ablation only)"),
                       ("evaluation", "Evaluation set")):
        entry = prompts[role]
        lines.append(f"- {name}: seeds {entry['seeds']}; prompts: " + "; ".join(f"“{p}”" for p in entry["prompts"]))
    lines += ["", "### Methods", ""]
    lines += _table(["method", "family", "what runs"],
                    [[m["label"], m["family"], m["description"]] for m in results["methods"].values()])
    lines += ["", "## Results per budget", ""]
    for budget in main_budgets:
        lines += [f"### B = {budget} (ideal speed-up {steps / budget:.2f}×)", ""]
        lines += budget_table(results, budget) + [""]
    lines += ["## Where a peer wins", ""]
    lines += where_peers_win(results) + [""]
    diagnostics = schedule_diagnostics(results)
    if diagnostics:
        lines += ["What MeanCache's own schedules did:", "", " ".join(diagnostics), ""]
    stress = results.get("stress_budget")
    if stress and budget_rows(results, stress):
        lines += [f"## Stress test: B = {stress} (ideal speed-up {steps / stress:.1f}×)", ""]
        lines += budget_table(results, stress) + [""]
    lines += ablation_sections(results)
    lines += real_size_section(out_dir)
    lines += ["## Figures", "",
              f"![PSNR against speed-up, one line per method]({_link(out_dir, PARETO_FILE, report_path)})", ""]
    if (out_dir / grid_file(results["ablation_budget"])).exists():
        lines += [f"Outputs at B = {results['ablation_budget']} (rows: evaluation prompts, first seed; columns: the "
                  "uncached reference, then each method):", "",
                  f"![image grid]({_link(out_dir, grid_file(results['ablation_budget']), report_path)})", ""]
    lines += [f"Raw numbers, per image and per timed run, and every method's settings: "
              f"[{RESULTS_FILE}]({_link(out_dir, RESULTS_FILE, report_path)}).", ""]
    return "\n".join(lines)


def _variant_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    return [[r["variant"], " ".join(map(str, r["compute_steps"])), " ".join(map(str, r["orders"])), _nfe(r["nfe"]),
             f"{r['psnr']:.2f}", f"{r['ssim']:.4f}"] for r in rows]


VARIANT_HEADER = ["variant", "compute steps", "orders K", "NFE", "PSNR (dB)", "SSIM"]


def ablation_sections(results: dict[str, Any]) -> list[str]:
    ablations = results["ablations"]
    budget = ablations["budget"]
    lines = [f"## Ablations (MeanCache, B = {budget}, evaluation set)", "",
             "Default: displacement cost, γ = 0.5, Kmax = 5, planned from calibration set A.", ""]
    sections = [
        ("kmax", "Largest order Kmax", "K = 0 is plain velocity reuse on planned steps."),
        ("gamma", "Peak suppression γ", "γ = 0 is the plain shortest path; large γ approaches min-max."),
        ("cost", "Edge cost", "Displacement: |σ_s − σ_t|·E_K; velocity: E_K itself."),
        ("transfer_prompts", "Schedule transfer across prompt sets",
         "Planned from calibration set A (the default) or B, both disjoint from the evaluation set; the oracle row "
         "is planned on the evaluation runs themselves, an upper bound on what calibration data can buy."),
    ]
    for key, title, note in sections:
        if ablations.get(key):
            lines += [f"### {title}", "", note, ""] + _table(VARIANT_HEADER, _variant_rows(ablations[key])) + [""]
    resolution = ablations.get("resolution")
    if resolution:
        lines += ["### Schedule transfer across resolutions", "",
                  f"Evaluated at {resolution['evaluated_at']} on {len(resolution['pairs'])} images against the "
                  f"uncached {results['steps']}-step output at that size. "
                  + (f"The demo model was trained at {resolution['planned_base']} only, so this size is out of its "
                     "training distribution for every method alike. " if results["model"] == "demo" else "")
                  + f"Calibration at {resolution['evaluated_at']}: seeds "
                  f"{resolution['calibration_high']['seeds']} on calibration set A's prompts.", ""]
        rows = []
        for r in resolution["rows"]:
            rows.append([r["variant"], " ".join(map(str, r.get("compute_steps", []))) or "—",
                         " ".join(map(str, r.get("orders", []))) or "—", _nfe(r["nfe"]), f"{r['psnr']:.2f}",
                         f"{r['ssim']:.4f}"])
        lines += _table(VARIANT_HEADER, rows) + [""]
    elif results["quick"]:
        lines += ["The resolution-transfer ablation and the B = 5 stress test run only in the full bench.", ""]
    if not math.isfinite(sum(r["psnr"] for r in results["results"])):
        lines += ["Some PSNR values are not finite: see results.json.", ""]
    return lines
