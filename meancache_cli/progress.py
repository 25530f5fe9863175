"""Progress on stderr, for every command: a rich bar on a terminal; elsewhere (a log file, CI), where a transient
bar shows nothing but a blank line, one plain line per stage for work that announces its stages (the bench)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

Advance = Callable[[], None]
Stage = Callable[[str], None]


@contextmanager
def progress_bar(console: Any, description: str, total: int | None, enabled: bool = True) -> Iterator[Advance]:
    """A progress bar on `console`; yields a function that advances it by one."""
    with stage_progress(console, description, total, enabled, stage_lines=False) as (advance, _):
        yield advance


@contextmanager
def stage_progress(console: Any, description: str, total: int | None, enabled: bool = True,
                   stage_lines: bool = True) -> Iterator[tuple[Advance, Stage]]:
    """A progress bar on `console`; yields (advance by one, name the current stage). Off a terminal, with
    `stage_lines`, each stage prints one line instead (`StageLog`)."""
    if not (enabled and console.is_terminal):
        log = StageLog(console, total)
        yield log.advance, (log.stage if enabled and stage_lines else lambda name: None)
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda: progress.advance(task), lambda name: progress.update(task, description=name)


class StageLog:
    """One plain line per stage: elapsed time, pipeline calls done of the total, the stage."""

    def __init__(self, console: Any, total: int | None) -> None:
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
