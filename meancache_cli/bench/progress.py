"""The benchmark with a progress bar on stderr, for `meancache bench`; stdout stays clean."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .runner import DEFAULT_OUT, default_report_path


def parse_budgets(text: str | None) -> tuple[int, ...] | None:
    from ..errors import UsageError

    if text is None:
        return None
    try:
        budgets = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"--budgets '{text}' is invalid: give comma-separated integers such as 8,10,13") from None
    if not budgets:
        raise UsageError("--budgets is empty: give comma-separated integers such as 8,10,13")
    return budgets


def run_with_progress(model: str = "demo", quick: bool = False, out: Path | str = DEFAULT_OUT,
                      report: Path | str | None = None, command: str | None = None, console: Any = None,
                      **options: Any) -> dict[str, Any]:
    """`run_bench` with a rich progress bar on stderr (or on `console`); returns the raw results."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .runner import bench_units, run_bench

    out = Path(out)
    report = Path(report) if report is not None else default_report_path(out)
    total = bench_units(model=model, quick=quick, **options)
    console = console or Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(f"benchmarking {model}", total=total)
        return run_bench(model, out, quick, report_path=report, command=command,
                         advance=lambda: progress.advance(task), **options)
