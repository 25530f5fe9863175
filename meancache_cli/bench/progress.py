"""The benchmark with a progress bar on stderr, for `meancache bench`; stdout stays clean."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .runner import DEFAULT_OUT, default_report_path


def run_with_progress(model: str = "demo", quick: bool = False, out: Path | str = DEFAULT_OUT,
                      report: Path | str | None = None, command: str | None = None, console: Any = None,
                      **options: Any) -> dict[str, Any]:
    """`run_bench` with progress on stderr (or on `console`); returns the raw results.

    On a terminal: a rich progress bar. Otherwise (a log file, CI) a bar is invisible until the end,
    so one line per stage is printed instead, with the elapsed time and the pipeline calls done.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .runner import bench_units, run_bench

    out = Path(out)
    report = Path(report) if report is not None else default_report_path(out)
    total = bench_units(model=model, quick=quick, **options)
    console = console or Console(stderr=True)
    if not console.is_terminal:
        return run_bench(model, out, quick, report_path=report, command=command,
                         **StageLog(console, total).callbacks(), **options)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(f"benchmarking {model}", total=total)
        return run_bench(model, out, quick, report_path=report, command=command,
                         advance=lambda: progress.advance(task),
                         stage=lambda name: progress.update(task, description=name), **options)


class StageLog:
    """One plain line per bench stage: elapsed time, pipeline calls done of the total, the stage."""

    def __init__(self, console: Any, total: int) -> None:
        self.console = console
        self.total = total
        self.done = 0
        self.started = time.perf_counter()

    def advance(self) -> None:
        self.done += 1

    def stage(self, name: str) -> None:
        elapsed = time.perf_counter() - self.started
        self.console.print(f"[{elapsed:7.1f} s] {self.done}/{self.total} calls: {name}", markup=False,
                           highlight=False, soft_wrap=True)

    def callbacks(self) -> dict[str, Any]:
        return {"advance": self.advance, "stage": self.stage}
