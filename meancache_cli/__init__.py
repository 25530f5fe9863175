"""MeanCache: training-free average-velocity caching for diffusers flow-matching pipelines.

The names below are imported on first use, so `import meancache_cli.cli` (the command's start-up)
does not load torch and diffusers before it has set up its signal handling.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .files import Calibration, Schedule, load_calibration, load_schedule, save_schedule
    from .hooks import apply_meancache, remove_meancache

_EXPORTS = {
    "Calibration": "files", "Schedule": "files", "load_calibration": "files", "load_schedule": "files",
    "save_schedule": "files", "apply_meancache": "hooks", "remove_meancache": "hooks",
}
__all__ = [
    "Calibration", "Schedule", "apply_meancache", "load_calibration", "load_schedule", "remove_meancache",
    "save_schedule",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
