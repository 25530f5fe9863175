"""MeanCache: training-free average-velocity caching for diffusers flow-matching pipelines.

The three stages on any supported pipeline object::

    import meancache_cli as mc

    cal = mc.calibrate(pipe, prompts, seeds, num_inference_steps=50, height=1024, width=1024)
    schedule = mc.plan(cal, budget=10, pipe=pipe)   # validated on the calibration's held-out runs
    mc.apply_meancache(pipe, schedule)              # every later pipe(...) call runs cached

The names below are imported on first use, so `import meancache_cli.cli` (the command's start-up)
does not load torch and diffusers before it has set up its signal handling.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .calibration import calibrate
    from .files import Calibration, Schedule, load_calibration, load_schedule, save_schedule
    from .hooks import MeanCacheConfig, apply_meancache, remove_meancache
    from .planning import plan

_EXPORTS = {
    "Calibration": "files", "Schedule": "files", "load_calibration": "files", "load_schedule": "files",
    "save_schedule": "files", "apply_meancache": "hooks", "remove_meancache": "hooks", "calibrate": "calibration",
    "plan": "planning", "MeanCacheConfig": "hooks",
}
__all__ = [
    "Calibration", "MeanCacheConfig", "Schedule", "apply_meancache", "calibrate", "load_calibration",
    "load_schedule", "plan", "remove_meancache", "save_schedule",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
