"""The real-size results file and the benchmark report's "Real-size speed (GPU)" section.

The demo bench's report renders this section from `realsize.json` too, so regenerating it never drops GPU rows.
Each run replaces only its own families' rows, so a GPU user can fill the table one family at a time;
reduced-size rows (a smoke run of the code path) are listed apart and never pass for real-size measurements.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from ..files import write_atomic

RESULTS_FILE = "realsize.json"
COMMAND = "meancache bench --real-size"
TITLE = "## Real-size speed (GPU)"
LABELS = {"flux": "FLUX.1 [dev]", "qwen-image": "Qwen-Image", "wan": "Wan 2.1 T2V 1.3B",
          "hunyuanvideo": "HunyuanVideo"}
ORDER = list(LABELS)


def merge(previous: dict[str, Any] | None, results: dict[str, Any]) -> dict[str, Any]:
    """`results` with the rows of `previous` it does not replace (same family and same reduced flag)."""
    fresh = {(row["family"], row["reduced"]) for row in results["rows"]}
    kept = [row for row in (previous or {}).get("rows", []) if (row["family"], row["reduced"]) not in fresh]
    rows = sorted(kept + results["rows"], key=lambda row: (row["reduced"], ORDER.index(row["family"])))
    return {**results, "rows": rows}


def load_results(out_dir: Path) -> dict[str, Any] | None:
    path = Path(out_dir) / RESULTS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_real_size(results: dict[str, Any], out_dir: Path, report_path: Path) -> dict[str, Any]:
    """Merge into OUT/realsize.json and rewrite the report's real-size section (creating both if needed)."""
    Path(out_dir).mkdir(exist_ok=True)
    merged = merge(load_results(out_dir), results)
    write_atomic(Path(out_dir) / RESULTS_FILE, (json.dumps(merged, indent=1) + "\n").encode())
    text = report_path.read_text() if report_path.is_file() else "# Benchmarks\n"
    write_atomic(report_path, replace_section(text, section(merged)).encode())
    return merged


def summary(results: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """Per family: ms per call and speed-up per budget, as JSON rows and as text lines."""
    rows = [{"family": r["family"], "ms_per_call": r["eager"]["uncached"]["ms_per_call"],
             "speedups": {b["budget"]: b["speedup"] for b in r["eager"]["budgets"]}} for r in results["rows"]]
    text = "\n".join(f"{r['family']}: {r['ms_per_call']:.1f} ms per call, speed-up "
                     + ", ".join(f"B={b} {s:.2f}x" for b, s in r["speedups"].items()) for r in rows)
    return rows, text


def replace_section(text: str, lines: list[str]) -> str:
    """`text` with its real-size section (title to the next `## ` heading) replaced by `lines`, or them appended."""
    old = text.splitlines()
    new = "\n".join(lines).rstrip("\n").splitlines()
    if TITLE not in old:
        return "\n".join([*old, "", *new]) + "\n"
    start = old.index(TITLE)
    end = next((i for i in range(start + 1, len(old)) if old[i].startswith("## ")), len(old))
    return "\n".join([*old[:start], *new, "", *old[end:]]).rstrip("\n") + "\n"


def real_size_section(out_dir: Path) -> list[str]:
    """The section for the demo bench's report, from OUT/realsize.json when a real-size run left one."""
    return section(load_results(out_dir))


# -- markdown --------------------------------------------------------------------------------------------------


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table, here and in the bench's report."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]



def size_text(bytes_: int | None) -> str:
    if bytes_ is None:
        return "—"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if bytes_ >= scale:
            return f"{bytes_ / scale:.1f} {unit}"
    return f"{bytes_} B"


def count_text(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return str(count)


def shape_text(row: dict[str, Any]) -> str:
    frames = f", {row['frames']} frames" if row.get("frames") else ""
    branches = f", {row['branches']} branches (CFG)" if row["branches"] > 1 else ""
    return f"{row['height']}×{row['width']}{frames}: {row['tokens']} tokens{branches}"


def text_shape(text: list[dict[str, int]]) -> str:
    """Text positions per branch, and how many of them are the prompt's tokens where the rest is padding."""
    return " / ".join(f"{t['length']}" + (f" ({t['prompt']} prompt)" if t["prompt"] < t["length"] else "")
                      for t in text)


def _speedups(summary: dict[str, Any]) -> list[str]:
    return [f"{b['speedup']:.2f}× of {b['limit']:.2f}×" for b in summary["budgets"]]


def bench_text(name: str) -> str:
    """A markdown text shipped beside the bench's modules (the reports' fixed methodology)."""
    return (resources.files(__package__) / name).read_text(encoding="utf-8")


# How the section measures, and what the cache holds.
HOW = [*bench_text("realsize_how.md").splitlines(), ""]
BOUND = [*bench_text("realsize_bound.md").splitlines(), ""]


def pending_rows() -> list[list[str]]:
    """What the command will measure, and the cache bound that needs no GPU: computed from the configs."""
    from .realsize import FAMILIES, cache_bound_bytes, load_real_config

    rows = []
    for family in FAMILIES:
        config = load_real_config(family)
        elements, tokens = latent_size(config)
        branches = len(config.text)
        bound = size_text(branches * cache_bound_bytes(elements, 2))
        row = {"height": config.height, "width": config.width, "frames": config.frames, "tokens": tokens,
               "branches": branches}
        rows.append([LABELS[family], config.source.split(":")[0], shape_text(row), text_shape(config.text),
                     bound])
    return rows


def latent_size(config: Any) -> tuple[int, int]:
    """(latent elements per branch, transformer tokens) of `config` at its size, as the pipeline prepares them."""
    t = config.transformer
    if config.frames is None:
        height, width = 2 * (config.height // 16), 2 * (config.width // 16)
        tokens = (height // 2) * (width // 2)
        return tokens * t["in_channels"], tokens
    frames = (config.frames - 1) // 4 + 1
    elements = t["in_channels"] * frames * (config.height // 8) * (config.width // 8)
    return elements, frames * (config.height // 16) * (config.width // 16)


def section(results: dict[str, Any] | None) -> list[str]:
    """The whole section: how it is measured, the command, then the tables (or what is still pending)."""
    rows = (results or {}).get("rows", [])
    full = [row for row in rows if not row["reduced"]]
    reduced = [row for row in rows if row["reduced"]]
    lines = [TITLE, "", *HOW, "Fill or refresh this section (and `docs/bench/realsize.json`) with:", "", "```bash",
             COMMAND, "```", ""]
    missing = [LABELS[f] for f in ORDER if f not in {row["family"] for row in full}]
    if missing:
        lines += [f"**Not measured yet** ({', '.join(missing)}): the full-size run needs a CUDA GPU, and none was "
                  "available to this work. Qwen-Image needs a GPU with about 48 GB (its 20B parameters are 41 GB in "
                  "bf16); `--families` runs a subset, and each run replaces only its own families' "
                  "rows.", ""]
    if full:
        lines += measured(full, results["budgets"])
    else:
        lines += markdown_table(["model", "config", "size (tokens per branch)", "text positions per branch",
                         "cache bound (bf16)"], pending_rows()) + [""]
    lines += BOUND
    if reduced:
        lines += ["Reduced-size smoke run (a few blocks, small latents: it checks the code path, its times say "
                  "nothing about real-size speed):", ""]
        lines += markdown_table(["model", "size", "device", "NFE uncached / cached", "speed-up"],
                        [[LABELS[r["family"]], shape_text(r), r["environment"]["device_name"] or r["environment"][
                            "device"], f"{r['eager']['uncached']['nfe']} / "
                          + ", ".join(str(b["nfe"]) for b in r["eager"]["budgets"]),
                          ", ".join(_speedups(r["eager"]))] for r in reduced]) + [""]
    return lines


def graphs_text(compiled: dict[str, Any]) -> str:
    warmup = compiled.get("warmup_graphs")
    first = f"{warmup['cached']} / {warmup['uncached']}, then " if warmup else ""
    return f"{first}{compiled['graphs_after_warmup']}"


def measured(rows: list[dict[str, Any]], budgets: list[int]) -> list[str]:
    environments = {(r["environment"]["device_name"], r["environment"]["torch"], r["environment"]["diffusers"],
                     r["environment"]["cuda"]) for r in rows}
    lines = [f"Measured on {name}, torch {torch_}, diffusers {diffusers}, CUDA {cuda}." for name, torch_, diffusers,
             cuda in sorted(environments)]
    repeats = sorted({r["repeats"] for r in rows})
    lines += [f"Median of {', '.join(map(str, repeats))} timed run(s) per method.", ""]
    header = ["model", "size (tokens)", "text positions", "parameters", "ms / call", "uncached loop",
              *[f"B = {b}" for b in budgets]]
    lines += markdown_table(header, [[LABELS[r["family"]], shape_text(r), text_shape(r["text"]),
                                      count_text(r["parameters"]), f"{r['eager']['uncached']['ms_per_call']:.1f}",
                                      f"{r['eager']['uncached']['median_s']:.2f} s", *_speedups(r["eager"])]
                                     for r in rows])
    lines += ["", "Hook cost and memory:", ""]
    memory = []
    for r in rows:
        first = r["eager"]["budgets"][0]
        memory.append([
            LABELS[r["family"]], f"{first['hook_ms_per_skipped_call']:.3f} ms", f"{first['hook_ms_per_loop']:.1f} ms",
            size_text(r["eager"]["uncached"]["peak_bytes"]),
            " / ".join(size_text(b["peak_bytes"]) for b in r["eager"]["budgets"]),
            " / ".join(size_text(b["cache_held_bytes"]) for b in r["eager"]["budgets"]),
            size_text(first["cache_bound_bytes"]),
        ])
    per_budget = " / ".join(map(str, budgets))
    lines += markdown_table(["model", f"hook / skipped call (B = {budgets[0]})", f"hook / loop (B = {budgets[0]})",
                     "peak uncached", f"peak cached B = {per_budget}", "cache held", "bound"], memory)
    compiled = [(r, c) for r in rows for c in r.get("compiled", [])]
    if compiled:
        lines += ["", "MeanCache on the compiled transformer (speed-ups against the compiled uncached loop):", ""]
        lines += markdown_table(
            ["model", "mode", "ms / call", *[f"B = {b}" for b in budgets], "difference vs eager, cached",
             "uncached", "same output", "graphs: cached / uncached warm-up, then"],
            [[LABELS[r["family"]], c["mode"], f"{c['uncached']['ms_per_call']:.1f}", *_speedups(c),
              " / ".join(f"{b['difference']:.1e}" for b in c["budgets"]), f"{c['uncached_difference']:.1e}",
              "yes" if all(b["same_output"] for b in c["budgets"]) else f"no (tolerance {c['tolerance']:.0e})",
              graphs_text(c)] for r, c in compiled])
    if not all(r["finite"] for r in rows):
        lines += ["", "Some final latents were not finite (random weights): the differences above may not mean much."]
    return lines + [""]
