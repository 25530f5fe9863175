"""The bench's outputs: raw JSON, the markdown report, a Pareto plot and an image grid.

Every file is written through a temporary file and a rename (`files.write_atomic`), so an interrupted
bench never leaves a half-written report behind.
"""

from __future__ import annotations

import io
import json
import math
import os
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from .. import defaults
from ..files import write_atomic
from .metrics import LOW_PSNR, PairWins, pair_distribution, wins_over_best
from .peers import SOLVERS
from .realsize_report import RESULTS_FILE as REALSIZE_FILE
from .realsize_report import bench_text, real_size_section
from .realsize_report import markdown_table as _table
from .runner import TIMING_ATTEMPTS, TIMING_SPREAD

RESULTS_FILE = "results.json"
PSNR_TIE = 0.05  # dB: closer than this is a tie, not a win
SPEED_TIE = 0.03  # relative: wall-time speed-ups closer than this are within timing noise
CURVE_TIE = 0.25  # dB: above an interpolated curve, which mixes in timing noise
PARETO_FILE = "pareto.png"
METRICS = {"latent_psnr": "latent PSNR", "psnr": "decoded PSNR"}

# Whose per-pair distribution the report tabulates: MeanCache (validated and not) and the solvers it must beat.
DISTRIBUTION_METHODS = ("meancache", "meancache_default", *SOLVERS)
BELOW = f"below_{LOW_PSNR:g}_db"
# How the bench measures, as the report says it: markdown with the run's figures as `str.format` fields.
METHOD = bench_text("method.md")


def grid_file(config: str, budget: int) -> str:
    return f"grid_{config}_B{budget}.png"


def write_outputs(results: dict[str, Any], grid: dict[str, dict[str, list[Any]]], out_dir: Path,
                  report_path: Path) -> None:
    """results.json, pareto.png, one grid per configuration and the markdown report."""
    budget = results["ablation_budget"]
    write_atomic(out_dir / RESULTS_FILE, (json.dumps(results, indent=1, default=_json_default) + "\n").encode())
    write_atomic(out_dir / PARETO_FILE, pareto_png(results))
    for config, images in grid.items():
        if images.get("reference") and len(images) > 1:
            write_atomic(out_dir / grid_file(config, budget), grid_png(results, config, images))
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
    """Per configuration (rows): decoded and latent PSNR against measured speed-up, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = results["configs"]
    figure, axes = plt.subplots(len(configs), 2, figsize=(12, 4.6 * len(configs)), squeeze=False)
    markers = "os^vD<>pP*Xh"
    colours = plt.get_cmap("tab20").colors
    for row, config in enumerate(configs):
        for index, key in enumerate(results["methods"]):
            rows = sorted((r for r in config_rows(results, config["key"]) if r["method"] == key),
                          key=lambda r: r["budget"])
            if not rows:
                continue
            ours = key == "meancache"
            style = {"marker": markers[index % len(markers)], "label": results["methods"][key]["label"],
                     "color": "black" if ours else colours[(2 * index) % 20 + (index >= 10)],
                     "linewidth": 2.5 if ours else 1.2, "zorder": 3 if ours else 2}
            if key == "meancache_default":
                style.update(color="dimgray", linestyle="--")
            for column, metric in enumerate(METRICS):
                axes[row][column].plot([r["speedup"] for r in rows], [r[metric] for r in rows], **style)
        for column, name in enumerate(METRICS.values()):
            axis = axes[row][column]
            axis.set_title(f"{config['label']}: {name}", fontsize=9)
            axis.set_xlabel("measured speed-up vs uncached (median wall time)")
            axis.set_ylabel(f"{name} vs uncached output (dB)")
            axis.grid(alpha=0.3)
    axes[0][1].legend(fontsize=7, loc="best")
    budgets = sorted({r["budget"] for r in results["results"]})
    figure.suptitle(f"{results['model']}: quality against speed, N = {results['steps']}, budgets "
                    f"{', '.join(map(str, budgets))}")
    return _figure_bytes(figure)


def grid_png(results: dict[str, Any], config: str, grid: dict[str, list[Any]]) -> bytes:
    """Rows: evaluation prompts (first seed); columns: the uncached reference, then every method, each image with
    its decoded PSNR against the reference below it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["reference", *[key for key in results["methods"] if key in grid]]
    prompts = results["prompts"]["evaluation"]["prompts"]
    seeds = len(results["prompts"]["evaluation"]["seeds"])
    scores = {r["method"]: r.get("psnr_runs", []) for r in budget_rows(results, config, results["ablation_budget"])}
    rows = len(grid["reference"])
    figure, axes = plt.subplots(rows, len(columns), figsize=(1.25 * len(columns), 1.45 * rows + 0.6),
                                squeeze=False)
    for column, key in enumerate(columns):
        title = "uncached" if key == "reference" else results["methods"][key]["label"]
        for row in range(rows):
            axis = axes[row][column]
            axis.imshow(np.asarray(grid[key][row]), interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title("\n".join(textwrap.wrap(title, 16)), fontsize=6)
            if column == 0:
                axis.set_ylabel(prompts[row].replace(" on ", "\non "), fontsize=5)
            pair = row * seeds  # the evaluation pairs run prompt by prompt, every seed of a prompt in turn
            if len(scores.get(key, [])) > pair:
                axis.set_xlabel(f"{scores[key][pair]:.1f} dB", fontsize=5, labelpad=1)
    label = next(c["label"] for c in results["configs"] if c["key"] == config)
    figure.suptitle(f"{label}: B = {results['ablation_budget']} of N = {results['steps']}, seed "
                    f"{results['prompts']['evaluation']['seeds'][0]}", fontsize=8)
    return _figure_bytes(figure)


# -- markdown ------------------------------------------------------------------------------------------


def _nfe(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def _db(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _budgets(budgets: list[int]) -> str:
    return "B = " + ", ".join(map(str, budgets))


def _retried(results: dict[str, Any]) -> str:
    attempts = {(r["config"], r["budget"]): r.get("timing_attempts", 1) for r in results["results"]}
    retried = [f"{c} B = {b} ({n} attempts)" for (c, b), n in sorted(attempts.items()) if n > 1]
    return "retried at " + ", ".join(retried) if retried else "no budget needed a retry in this run"


def _link(out_dir: Path, name: str, report_path: Path) -> str:
    return Path(os.path.relpath(out_dir / name, report_path.parent)).as_posix()


def config_rows(results: dict[str, Any], config: str) -> list[dict[str, Any]]:
    return [r for r in results["results"] if r.get("config") == config]


def budget_rows(results: dict[str, Any], config: str, budget: int) -> list[dict[str, Any]]:
    return [r for r in config_rows(results, config) if r["budget"] == budget]


def config_budgets(results: dict[str, Any], config: str) -> list[int]:
    """Budgets with a MeanCache row in this configuration, the stress budget excluded."""
    return sorted({r["budget"] for r in config_rows(results, config) if r["method"] == "meancache" and not r["stress"]})


def config_info(results: dict[str, Any], config: str) -> dict[str, Any]:
    return next(c for c in results["configs"] if c["key"] == config)


def budget_table(results: dict[str, Any], config: str, budget: int) -> list[str]:
    """One row per method (best of each quality column in bold) and the uncached N-step reference's own row."""
    rows = budget_rows(results, config, budget)
    best = {name: max(r.get(name, -math.inf) for r in rows) for name in ("psnr", "latent_psnr", "accuracy")}

    def cell(r: dict[str, Any], name: str) -> str:
        value = r.get(name)
        return "—" if value is None else f"**{value:.2f}**" if value == best[name] else f"{value:.2f}"

    body = []
    for r in rows:
        label = f"**{r['label']}**" if r["method"] == "meancache" else r["label"]
        body.append([label, _nfe(r["nfe"]), f"{r['speedup']:.2f}×", cell(r, "psnr"), f"{r['ssim']:.4f}",
                     cell(r, "latent_psnr"), cell(r, "accuracy")])
    reference = config_info(results, config)["reference"]
    body.append([f"uncached {results['steps']}-step reference", str(results["steps"]), "1.00×", "—", "—", "—",
                 _db(reference.get("accuracy"))])
    return _table(["method", "NFE", "speed-up", "PSNR (dB)", "SSIM", "latent PSNR (dB)",
                   f"accuracy vs {results['fine_steps']}-step Euler (dB)"], body)


def solver_wins(results: dict[str, Any], config: str, budget: int) -> dict[str, PairWins]:
    """MeanCache against the best solver on each evaluation pair, by latent and by decoded PSNR."""
    rows = {r["method"]: r for r in budget_rows(results, config, budget)}
    solvers = [rows[key] for key in SOLVERS if key in rows]
    if "meancache" not in rows or not solvers:
        return {}
    return {name: wins_over_best(rows["meancache"][f"{name}_runs"], [r[f"{name}_runs"] for r in solvers])
            for name in METRICS}


def wins_line(results: dict[str, Any], config: str, budget: int) -> str:
    """The per-pair comparison with the best solver, as one sentence."""
    wins = solver_wins(results, config, budget)
    if not wins:
        return ""
    parts = [f"by {METRICS[name]} on {w.wins} of {w.pairs} pairs (margin mean {w.mean_margin:+.2f} dB, worst pair "
             f"{w.worst_margin:+.2f} dB)" for name, w in wins.items()]
    return (f"MeanCache beats the best solver on each pair (the best of Euler, UniPC and DPM-Solver++ with B "
            f"steps on that pair) {parts[0]}, and {parts[1]}.")


def distributions(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per configuration, budget and method of `DISTRIBUTION_METHODS`, for latent and decoded PSNR: the per-pair
    distribution (`metrics.pair_distribution`). Wins count against the per-pair best solver: MeanCache's rows
    against Euler, UniPC and DPM-Solver++; each solver's against the other two."""
    entries = []
    for config in results["configs"]:
        key = config["key"]
        for budget in sorted({r["budget"] for r in config_rows(results, key)}):
            rows = {r["method"]: r for r in budget_rows(results, key, budget)}
            for method in (m for m in DISTRIBUTION_METHODS if m in rows):
                peers = [peer for peer in SOLVERS if peer in rows and peer != method]
                entry = {"config": key, "budget": budget, "method": method, "label": rows[method]["label"],
                         "stress": rows[method]["stress"], "wins_against": peers}
                for metric in METRICS:
                    entry[metric] = pair_distribution(rows[method][f"{metric}_runs"],
                                                      [rows[peer][f"{metric}_runs"] for peer in peers]).as_dict()
                entries.append(entry)
    return entries


def _distributions_of(results: dict[str, Any], config: str) -> list[dict[str, Any]]:
    entries = results.get("distributions") or distributions(results)
    return [entry for entry in entries if entry["config"] == config]


def distribution_table(results: dict[str, Any], config: str) -> list[str]:
    """One row per budget and method: median, 10th percentile, minimum, pairs won and pairs below 20 dB, latent
    then decoded; the best of each statistic among the rows of a budget in bold (fewest pairs below 20 dB)."""
    entries = _distributions_of(results, config)
    body = []
    for budget in sorted({e["budget"] for e in entries}, key=lambda b: (b == results.get("stress_budget"), b)):
        group = [e for e in entries if e["budget"] == budget]
        cells: dict[int, list[str]] = {id(e): [] for e in group}
        for metric in METRICS:
            for stat, better in (("median", max), ("p10", max), ("min", max), ("wins", None), (BELOW, min)):
                values = [e[metric][stat] for e in group]
                best = better(values) if better else None
                for e in group:
                    value = e[metric][stat]
                    text = f"{value:.2f}" if isinstance(value, float) else (
                        f"{value} / {e[metric]['pairs']}" if value is not None else "—")
                    cells[id(e)].append(f"**{text}**" if better and value == best and len(group) > 1 else text)
        for e in group:
            label = f"**{e['label']}**" if e["method"] == "meancache" else e["label"]
            body.append([str(budget), label, *cells[id(e)]])
    header = ["B", "method"] + [f"{name}: {stat}" for name in ("latent", "decoded")
                                for stat in ("median", "p10", "min", "won", f"< {LOW_PSNR:g} dB")]
    return _table(header, body)


def _leads(entries: list[dict[str, Any]], metric: str, stat: str) -> list[int]:
    """Budgets (stress budget excluded) at which MeanCache's `stat` beats every solver's by more than `PSNR_TIE`."""
    budgets = []
    for budget in sorted({e["budget"] for e in entries if not e["stress"]}):
        group = {e["method"]: e for e in entries if e["budget"] == budget}
        solvers = [group[key][metric][stat] for key in SOLVERS if key in group]
        if "meancache" in group and solvers and group["meancache"][metric][stat] > max(solvers) + PSNR_TIE:
            budgets.append(budget)
    return budgets


def distribution_lines(results: dict[str, Any], config: str) -> list[str]:
    """What the per-pair distributions say, from the numbers: where MeanCache's median, 10th percentile and
    minimum lie above every solver's, and how many pairs each method leaves below 20 dB."""
    entries = _distributions_of(results, config)
    if not any(e["method"] == "meancache" for e in entries):
        return []
    budgets = sorted({e["budget"] for e in entries if not e["stress"]})
    lines = []
    for metric, name in METRICS.items():
        parts = []
        for stat, what in (("median", "median"), ("p10", "10th percentile"), ("min", "minimum")):
            ahead = _leads(entries, metric, stat)
            parts.append(f"in its {what} at {_budgets(ahead) if ahead else 'no budget'}")
        below: dict[str, int] = {}
        for e in entries:
            if not e["stress"]:
                below[e["label"]] = below.get(e["label"], 0) + e[metric][BELOW]
        pairs = sum(e[metric]["pairs"] for e in entries if e["method"] == "meancache" and not e["stress"])
        lines.append(f"- By {name}, MeanCache lies above every solver (by more than {PSNR_TIE} dB) {parts[0]}, "
                     f"{parts[1]}, {parts[2]}. Pairs below {LOW_PSNR:g} dB at {_budgets(budgets)} together ({pairs} "
                     "per method): " + "; ".join(f"{label} {count}" for label, count in below.items()) + ".")
    return lines


def peers_above(results: dict[str, Any], config: str, budget: int, metric: str
                ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(peer row, MeanCache row) for each peer whose mean `metric` beats MeanCache's by more than `PSNR_TIE` (the
    ablation rows are MeanCache's own variants, not peers: the validation section compares them)."""
    rows = budget_rows(results, config, budget)
    ours = next((r for r in rows if r["method"] == "meancache"), None)
    if ours is None:
        return []
    return [(r, ours) for r in _peer_rows(rows) if r[metric] - ours[metric] > PSNR_TIE]


def _peer_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["method"] != "meancache" and r.get("family") != "ablation"]


def summary_lines(results: dict[str, Any]) -> list[str]:
    """Where MeanCache wins and where a peer still wins, per configuration, from the numbers."""
    lines = []
    for config in results["configs"]:
        key = config["key"]
        budgets = config_budgets(results, key)
        if not budgets:
            continue
        parts = []
        for metric, name in METRICS.items():
            best = [b for b in budgets if not peers_above(results, key, b, metric)]
            parts.append(f"the best {name} of every method at {_budgets(best)}" if best
                         else f"the best {name} at no budget")
        text = f"- **{config['label']}**: MeanCache has {parts[0]}, and {parts[1]}."
        wins = {b: solver_wins(results, key, b) for b in budgets}
        if all(wins.values()):
            text += (" Against the best solver per pair, it wins by latent / decoded PSNR on "
                     + ", ".join(f"{w['latent_psnr'].wins} / {w['psnr'].wins} of {w['psnr'].pairs} pairs at B = {b}"
                                 for b, w in wins.items()) + ".")
        spread = _distributions_of(results, key)
        if any(e["method"] == "meancache" for e in spread):
            tails = [_leads(spread, metric, "p10") for metric in METRICS]
            text += (" Its 10th-percentile latent / decoded PSNR lies above every solver's at "
                     + " / ".join(_budgets(b) if b else "no budget" for b in tails) + ".")
        losses = []
        for b in budgets:
            beaten: dict[str, list[str]] = defaultdict(list)
            for metric, name in METRICS.items():
                for peer, ours in peers_above(results, key, b, metric):
                    beaten[peer["label"]].append(f"{name} {peer[metric]:.2f} vs {ours[metric]:.2f} dB")
            if beaten:
                losses.append(f"B = {b}: " + "; ".join(f"{label} ({', '.join(v)})" for label, v in beaten.items()))
        text += (" A peer still has a higher mean at " + " — ".join(losses) + "." if losses
                 else f" No peer's mean beats it by more than {PSNR_TIE} dB at any budget.")
        lines.append(text)
    return lines


def where_peers_win(results: dict[str, Any], config: str) -> list[str]:
    """One bullet per peer that beats MeanCache's mean latent or decoded PSNR somewhere (by more than
    `PSNR_TIE`), with its speed and a likely reason, from the numbers."""
    wins: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = defaultdict(list)
    for budget in sorted({r["budget"] for r in config_rows(results, config)}):
        above = {peer["method"]: (peer, ours) for metric in METRICS for peer, ours in
                 peers_above(results, config, budget, metric)}
        for key, pair in above.items():
            wins[key].append(pair)
    methods = results["methods"]
    lines = []
    if not wins:
        lines.append(f"- No peer beats MeanCache's mean latent or decoded PSNR by more than {PSNR_TIE} dB at any "
                     "budget in this configuration.")
    for key, entries in sorted(wins.items(), key=lambda item: -len(item[1])):
        where = "; ".join(
            f"B = {p['budget']}: latent {p['latent_psnr']:.2f} vs {o['latent_psnr']:.2f}, decoded {p['psnr']:.2f} vs "
            f"{o['psnr']:.2f} dB at {p['speedup']:.2f}× vs {o['speedup']:.2f}×" for p, o in entries)
        fast = [p["budget"] for p, o in entries if p["speedup"] >= (1 - SPEED_TIE) * o["speedup"]]
        if len(fast) == len(entries):
            speed = f"It is at least as fast in wall time at each (within {100 * SPEED_TIE:g} % timing noise)."
        elif fast:
            speed = (f"At {_budgets(fast)} it is also at least as fast in wall time (within {100 * SPEED_TIE:g} % "
                     "timing noise); elsewhere it trades speed for quality.")
        else:
            speed = "It is slower in wall time at each of them: it trades speed for quality."
        steps = ""
        if methods[key]["family"] == "schedule":
            p, o = entries[0]
            steps = (f" Its compute steps at B = {p['budget']}: {' '.join(map(str, p['settings']['compute_steps']))}; "
                     f"MeanCache's: {' '.join(map(str, o['settings']['compute_steps']))}.")
        lines.append(f"- **{methods[key]['label']}** beats MeanCache at {_plural(len(entries), 'budget')} ({where})."
                     f" {speed}{steps}")
    margins = []
    for budget in sorted({r["budget"] for r in config_rows(results, config)}):
        rows = budget_rows(results, config, budget)
        ours = next((r for r in rows if r["method"] == "meancache"), None)
        peers = _peer_rows(rows)
        if ours and peers:
            best = max(peers, key=lambda r: r["latent_psnr"])
            margins.append(f"B = {budget}: {ours['latent_psnr'] - best['latent_psnr']:+.2f} dB vs {best['label']}")
    if margins:
        lines.append(f"- MeanCache's latent PSNR margin over the best peer (by mean) at each budget: "
                     f"{', '.join(margins)}.")
    return lines + [f"- {line}" for metric in METRICS for line in above_curve(results, config, metric)]


def schedule_diagnostics(results: dict[str, Any], config: str) -> list[str]:
    """What MeanCache's own schedules did, from the numbers: edges with the JVP, their dampings, planned vs
    even spacing with plain reuse."""
    rows: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in config_rows(results, config):
        rows[r["budget"]][r["method"]] = r
    budgets = sorted(b for b in rows if "meancache" in rows[b])
    if not budgets:
        return []
    used = []
    for b in budgets:
        settings = rows[b]["meancache"]["settings"]
        kinds = settings["kinds"]
        dampings = [d for kind, d in zip(kinds, settings["lambdas"]) if kind == "jvp"]
        counts = [f"the JVP with λ = {d:g} on {dampings.count(d)}" for d in sorted(set(dampings))]
        if "exp" in kinds:
            counts.append(f"the exponential integrator on {kinds.count('exp')}")
        recipe = f"recipe {settings['recipe']}: " if settings.get("recipe") else ""
        used.append(f"B = {b} ({recipe}{b - kinds.count('reuse')} of {b} edges" + (
            f": {', '.join(counts)})" if counts else ")"))
    lines = [f"Edges of the kept plan that extrapolate rather than reuse: {'; '.join(used)}."]
    uniform_better = [b for b in budgets if {"reuse", "planner_k0"} <= set(rows[b])
                      and rows[b]["reuse"]["latent_psnr"] > rows[b]["planner_k0"]["latent_psnr"] + PSNR_TIE]
    if uniform_better:
        detail = ", ".join(f"B = {b} ({rows[b]['reuse']['latent_psnr']:.2f} vs "
                           f"{rows[b]['planner_k0']['latent_psnr']:.2f} dB)" for b in uniform_better)
        lines.append(f"With plain reuse on every edge, evenly spaced compute steps beat the planned ones in latent "
                     f"PSNR at {detail}: there the calibrated reuse cost misjudges where evaluations matter.")
    return lines


def above_curve(results: dict[str, Any], config: str, metric: str) -> list[str]:
    """Peers above MeanCache's quality–speed-up curve (interpolated between its budgets): the wall-time view."""
    rows = config_rows(results, config)
    curve = sorted((r["speedup"], r[metric]) for r in rows if r["method"] == "meancache")
    if len(curve) < 2:
        return []
    speeds, values = zip(*curve)
    above: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        if r["method"] != "meancache" and speeds[0] <= r["speedup"] <= speeds[-1]:
            margin = r[metric] - float(np.interp(r["speedup"], speeds, values))
            if margin > CURVE_TIE:
                above[r["label"]].append((r["budget"], margin))
    prefix = (f"At equal measured wall-time speed-up (MeanCache's {METRICS[metric]}–speed-up curve interpolated "
              f"between its budgets, {speeds[0]:.2f}× to {speeds[-1]:.2f}×), ")
    if not above:
        return [prefix + "no peer lies above MeanCache."]
    parts = [f"{label} at {_budgets(sorted(b for b, _ in points))} (up to {max(m for _, m in points):+.2f} dB)"
             for label, points in above.items()]
    return [prefix + f"these peers lie more than {CURVE_TIE} dB above MeanCache: " + "; ".join(parts) + "."]


def validation_table(results: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """Per budget: every candidate recipe's held-out score (the kept one in bold), the runs and cost share of the
    validation, and the kept plan against the default recipe's on the evaluation pairs (means)."""
    records = config.get("validation") or {}
    if not records:
        return []
    names = [c["recipe"] for c in next(iter(records.values()))["candidates"]]
    body = []
    for budget, record in sorted(records.items(), key=lambda item: int(item[0])):
        rows = {r["method"]: r for r in budget_rows(results, config["key"], int(budget))}
        scores = {c["recipe"]: c for c in record["candidates"]}
        cells = []
        for name in names:
            entry = scores.get(name)
            text = "—" if entry is None else f"{entry['score']:.2f}" + (
                f" (= {entry['same_plan_as']})" if entry.get("same_plan_as") else "")
            cells.append(f"**{text}**" if name == record["chosen"] else text)
        compared = ["—", "—"]
        if {"meancache", "meancache_default"} <= set(rows):
            compared = [f"{rows['meancache'][m]:.2f} / {rows['meancache_default'][m]:.2f}" for m in METRICS]
        body.append([budget, *cells, str(record["runs"]), f"{100 * record['cost_share']:.1f} %", *compared])
    return _table(["B", *names, "held-out runs", "cost share", "evaluation latent: kept / default",
                   "evaluation decoded: kept / default"], body)


def validation_lines(results: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """Which recipe validation kept where, and what that changed on the evaluation pairs, from the numbers."""
    records = config.get("validation") or {}
    if not records:
        return []
    default = next((r["settings"].get("recipe") for r in config_rows(results, config["key"])
                    if r["method"] == "meancache_default"), None)
    kept_default = [int(b) for b, r in records.items() if r["chosen"] == default]
    other = {int(b): r["chosen"] for b, r in records.items() if r["chosen"] != default}
    text = (f"Validation kept the default recipe at {_budgets(sorted(kept_default))}" if kept_default
            else "Validation kept the default recipe at no budget")
    if other:
        text += "; another at " + ", ".join(f"B = {b} ({name})" for b, name in sorted(other.items()))
    text += "."
    changes = []
    for budget in sorted(other):
        rows = {r["method"]: r for r in budget_rows(results, config["key"], budget)}
        if {"meancache", "meancache_default"} <= set(rows):
            deltas = [rows["meancache"][m] - rows["meancache_default"][m] for m in METRICS]
            changes.append(f"B = {budget}: {deltas[0]:+.2f} / {deltas[1]:+.2f} dB")
    if changes:
        text += (" Where it chose another recipe, the evaluation pairs' mean latent / decoded PSNR changed against the "
                 "default recipe's plan by " + ", ".join(changes) + ".")
    return [text]


def config_section(results: dict[str, Any], config: dict[str, Any], out_dir: Path, report_path: Path) -> list[str]:
    """Tables, wins, where a peer wins and the schedule diagnostics of one configuration."""
    key, steps = config["key"], results["steps"]
    reference = config["reference"]
    arguments = ", ".join(f"{name}={value!r}" for name, value in config["call_kwargs"].items())
    calibration = config["calibration"]
    lines = [f"## Configuration: {config['label']}", "",
             f"Pipeline call: `{arguments}`; {config['branches']} model "
             f"evaluation{'s' if config['branches'] > 1 else ''} per sampler step uncached (NFE below counts "
             "evaluations per guidance branch). Calibrated on set A in this configuration: "
             f"{len(calibration['prompts'])} prompts × {len(calibration['seeds'])} seeds, of which "
             f"{_plural(len(calibration.get('held_out', [])), 'run')} held out for validating the plan and "
             f"{calibration['trajectories']} trajectories from the others in the error maps. Uncached: "
             f"{reference['seconds_median']:.3f} s per image.", ""]
    if reference.get("accuracy") is not None:
        lines += [f"The uncached {steps}-step reference's own accuracy (latent PSNR against Euler with "
                  f"{results['fine_steps']} steps): mean {reference['accuracy']:.2f} dB, worst pair "
                  f"{min(reference['accuracy_runs']):.2f} dB. Above that level the columns measured against the "
                  f"{steps}-step output reward copying its error; the accuracy column does not.", ""]
    for budget in config_budgets(results, key):
        lines += [f"### {config['label']}: B = {budget} (ideal speed-up {steps / budget:.2f}×)", ""]
        lines += budget_table(results, key, budget) + [""]
        line = wins_line(results, key, budget)
        if line:
            lines += [line, ""]
    table = distribution_table(results, key)
    if len(table) > 2:
        pairs = len(next(r for r in config_rows(results, key))["latent_psnr_runs"])
        lines += [f"### {config['label']}: per-pair distributions", "",
                  f"Over the {pairs} evaluation pairs: median, 10th percentile (linear interpolation between order "
                  f"statistics), minimum; won: pairs on which the method is strictly above the best solver on that "
                  "pair (MeanCache's rows: the best of Euler, UniPC and DPM-Solver++; each solver's: the best of the "
                  f"other two); < {LOW_PSNR:g} dB: pairs below {LOW_PSNR:g} dB. In bold, the best of each column "
                  "within a budget.", ""]
        lines += table + [""] + distribution_lines(results, key) + [""]
    validation = validation_table(results, config)
    if validation:
        margin = next(iter(config["validation"].values())).get("margin")
        keep = (f" (the default recipe, the first column, stays unless another scores more than {margin:g} dB higher)"
                if margin else "")
        lines += [f"### {config['label']}: validation of MeanCache's plan", "",
                  "At each budget `plan(calibration, B, pipe=…)` planned every candidate recipe from set A's map runs, "
                  "ran each distinct schedule cached on set A's held-out runs and kept the one with the best mean "
                  f"latent PSNR against their uncached outputs{keep}. Columns: that score per candidate in dB, the "
                  "kept one in bold; “= X”: the same schedule as candidate X; cost share: the validation's "
                  "evaluations over the calibration's. The last columns compare the kept plan with the default "
                  "recipe's on the evaluation pairs.", ""]
        lines += validation + [""] + validation_lines(results, config) + [""]
    lines += [f"### {config['label']}: where a peer wins", ""] + where_peers_win(results, key) + [""]
    diagnostics = schedule_diagnostics(results, key)
    if diagnostics:
        lines += ["What MeanCache's own schedules did:", "", " ".join(diagnostics), ""]
    stress = results.get("stress_budget")
    if stress and budget_rows(results, key, stress):
        lines += [f"### {config['label']}: stress test B = {stress} (ideal speed-up {steps / stress:.1f}×)", ""]
        lines += budget_table(results, key, stress) + [""]
        line = wins_line(results, key, stress)
        if line:
            lines += [line, ""]
    if (out_dir / grid_file(key, results["ablation_budget"])).exists():
        lines += [f"Outputs at B = {results['ablation_budget']} (rows: evaluation prompts, first seed; columns: the "
                  "uncached reference, then each method):", "",
                  f"![image grid, {config['label']}]"
                  f"({_link(out_dir, grid_file(key, results['ablation_budget']), report_path)})", ""]
    return lines


def left_out_lines(results: dict[str, Any]) -> list[str]:
    """What this model's bench profile leaves out, and why (its config's `bench: note`)."""
    left = results.get("left_out") or {}
    parts = []
    if left.get("methods"):
        parts.append("the peers " + ", ".join(left["methods"]))
    if left.get("ablations"):
        parts.append("the ablations " + ", ".join(left["ablations"]))
    if left.get("resolution_transfer"):
        parts.append("the resolution-transfer ablation")
    if not parts:
        return []
    note = f" {left['note'].strip()}" if left.get("note") else ""
    return [f"Left out for this model: {'; '.join(parts)}.{note}", ""]


def markdown(results: dict[str, Any], out_dir: Path, report_path: Path) -> str:
    steps = results["steps"]
    kwargs = results["call_kwargs"]
    env = results["environment"]
    prompts = results["prompts"]
    n_eval = len(prompts["evaluation"]["prompts"]) * len(prompts["evaluation"]["seeds"])
    size = f"{kwargs.get('height')}×{kwargs.get('width')}" if kwargs.get("height") else "default size"
    labels = " and ".join(c["label"] for c in results["configs"])
    lines = [
        "# Benchmarks: MeanCache against its peers",
        "",
        "Generated by `meancache_cli.bench`; do not edit by hand. Reproduce with:",
        "",
        "```bash",
        results["command"],
        "```",
        "",
        f"Model `{results['model']}`, N = {steps} steps, {size}, configurations: {labels}; torch {env['torch']}, "
        f"diffusers {env['diffusers']}, {env['torch_threads']} CPU threads ({env['processor']}). "
        f"Whole run: {results['total_seconds'] / 60:.1f} min"
        f"{' (quick mode: fewer prompts, one budget, one timing run, reduced ablations)' if results['quick'] else ''}.",
        "",
        *left_out_lines(results),
        "## Summary",
        "",
        f"Means over {n_eval} evaluation images; “a peer still has a higher mean” counts a difference of more than "
        f"{PSNR_TIE} dB.",
        "",
        *summary_lines(results),
        "",
        *METHOD.format(steps=steps, pairs=n_eval, fine_steps=results["fine_steps"],
                       fine_factor=results["fine_steps"] // steps, low_psnr=LOW_PSNR, repeats=results["repeats"],
                       spread=TIMING_SPREAD, attempts=TIMING_ATTEMPTS, retried=_retried(results)).splitlines(),
        "",
    ]
    for role, name in (("calibration_a", "Calibration set A (MeanCache's maps and held-out validation runs, planner "
                                         "K = 0, min-max, MagCache ratios, threshold searches)"),
                       ("calibration_b", "Calibration set B (schedule-transfer ablation only)"),
                       ("evaluation", "Evaluation set")):
        if role not in prompts:
            continue
        entry = prompts[role]
        lines.append(f"- {name}: seeds {entry['seeds']}; prompts: " + "; ".join(f"“{p}”" for p in entry["prompts"]))
    lines += ["", "### Methods", ""]
    lines += _table(["method", "family", "what runs"],
                    [[m["label"], m["family"], m["description"]] for m in results["methods"].values()])
    lines += [""]
    for config in results["configs"]:
        lines += config_section(results, config, out_dir, report_path)
    lines += ablation_sections(results)
    if results["model"] == "demo" or (out_dir / REALSIZE_FILE).exists():
        # `bench --real-size` writes beside the demo's report: another model's report shows it only when it has one.
        lines += real_size_section(out_dir)
    lines += ["## Figures", "",
              f"![PSNR against speed-up, one line per method]({_link(out_dir, PARETO_FILE, report_path)})", "",
              f"Raw numbers, per image and per timed run, and every method's settings: "
              f"[{RESULTS_FILE}]({_link(out_dir, RESULTS_FILE, report_path)}).", ""]
    return "\n".join(lines)


def _variant_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    body = []
    for r in rows:
        kinds = r.get("kinds", [])
        edges = [f"{t}" + (f"ᴶ{d:g}" if kind == "jvp" else "ᴱ" if kind == "exp" else "") for t, kind, d in
                 zip(r.get("compute_steps", []), kinds, r.get("lambdas", []))]
        body.append([r["variant"], " ".join(edges) or "—", _nfe(r["nfe"]), f"{r['psnr']:.2f}", f"{r['ssim']:.4f}",
                     f"{r['latent_psnr']:.2f}", _db(r.get("accuracy"))])
    return body


VARIANT_HEADER = ["variant", "compute steps (ᴶλ: JVP edge, damping λ; ᴱ: exponential edge)", "NFE", "PSNR (dB)", "SSIM",
                  "latent PSNR (dB)", "accuracy (dB)"]


def ablation_sections(results: dict[str, Any]) -> list[str]:
    lines = []
    sections = [
        ("kmax", "Largest order Kmax", "Kmax = 0 is plain velocity reuse on planned steps."),
        ("gamma", "Peak suppression γ", "γ = 0 is the plain shortest path; large γ approaches min-max."),
        ("cost", "Edge cost", "Velocity: E itself; displacement: |σ_s − σ_t|·E."),
        ("lambdas", "Dampings λ the planner may choose", "Reuse (λ = 0) is always allowed."),
        ("estimator", "Estimator on planned vs evenly spaced steps",
         "The same estimator on the planned schedule and on evenly spaced compute steps with the JVP on every edge "
         "after the first."),
        ("transfer_prompts", "Schedule transfer across prompt sets",
         "Planned from calibration set A (the default) or B, both disjoint from the evaluation set; the oracle row "
         "is planned on the evaluation runs themselves, an upper bound on what calibration data can buy."),
    ]
    for config in results["configs"]:
        ablations = results["ablations"].get(config["key"])
        if not ablations:
            continue
        lines += [f"## Ablations: {config['label']} (MeanCache, B = {ablations['budget']}, evaluation set)", "",
                  f"Default: the default recipe ({defaults.RECIPE.name}, Kmax = {defaults.KMAX}), planned from "
                  "calibration set A of this configuration, not validated (each row changes one setting of the "
                  "default recipe).", ""]
        for key, title, note in sections:
            if ablations.get(key):
                lines += [f"### {title}", "", note, ""] + _table(VARIANT_HEADER, _variant_rows(ablations[key])) + [""]
        resolution = ablations.get("resolution")
        if resolution:
            lines += ["### Schedule transfer across resolutions", "",
                      f"Evaluated at {resolution['evaluated_at']} on {len(resolution['pairs'])} images against the "
                      f"uncached {results['steps']}-step output at that size (no fine reference at this size). "
                      + (f"The demo model was trained at {resolution['planned_base']} only, so this size is out of "
                         "its training distribution for every method alike. " if results["model"] == "demo" else "")
                      + f"Calibration at {resolution['evaluated_at']}: seeds "
                      f"{resolution['calibration_high']['seeds']} on calibration set A's prompts.", ""]
            lines += _table(VARIANT_HEADER, _variant_rows(resolution["rows"])) + [""]
    if results["quick"]:
        lines += ["The resolution-transfer ablation and the B = 5 stress test run only in the full bench.", ""]
    if not all(math.isfinite(r[name]) for r in results["results"] for name in METRICS):
        lines += ["Some PSNR values are not finite: see results.json.", ""]
    return lines
