"""Benchmark: MeanCache against every peer, side by side, on one model in one process.

`run_bench(...)` runs everything and writes the report; `bench_units(...)` is the exact number of
pipeline calls it makes (a progress bar's total); `meancache bench` is the command line. Imported lazily, so
that importing the bench package stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["bench_settings", "bench_units", "run_bench"]


def __getattr__(name: str) -> Any:
    if name in ("bench_settings", "bench_units", "run_bench"):
        from . import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
