"""MeanCache: training-free average-velocity caching for diffusers flow-matching pipelines."""

from .files import Calibration, Schedule, load_calibration, load_schedule, save_schedule
from .hooks import apply_meancache, remove_meancache

__all__ = [
    "Calibration", "Schedule", "apply_meancache", "load_calibration", "load_schedule", "remove_meancache",
    "save_schedule",
]
