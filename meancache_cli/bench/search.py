"""Settings search for the dynamic caches: land each near a budget of B full model evaluations."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Probe:
    threshold: float
    nfe: float


def bisect_threshold(nfe_at: Callable[[float], float], budget: int, low: float, high: float, iterations: int,
                     advance: Callable[[], None] = lambda: None) -> tuple[float, list[Probe]]:
    """Bisection in log-threshold on a cache whose NFE falls as its threshold rises.

    Stops at the first threshold giving exactly `budget` evaluations; otherwise returns the probe
    nearest the budget (at equal distance, the one under it). `advance` is called once per iteration,
    skipped iterations included, so a progress bar's total stays exact.
    """
    lo, hi = math.log(low), math.log(high)
    probes: list[Probe] = []
    for done in range(iterations):
        mid = (lo + hi) / 2
        probe = Probe(math.exp(mid), nfe_at(math.exp(mid)))
        probes.append(probe)
        advance()
        if probe.nfe == budget:
            for _ in range(iterations - done - 1):
                advance()
            break
        if probe.nfe > budget:
            lo = mid
        else:
            hi = mid
    best = min(probes, key=lambda p: (abs(p.nfe - budget), p.nfe > budget))
    return best.threshold, probes
