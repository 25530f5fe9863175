"""Per-pair statistics of the bench: wins over the best of several peers, and each method's distribution of
per-pair PSNRs (the PSNR itself is `meancache_cli.metrics`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PairWins:
    """Ours against the best peer on each pair: how often ours is strictly higher, and by how much."""

    wins: int
    pairs: int
    mean_margin: float
    worst_margin: float


def wins_over_best(ours: Sequence[float], peers: Sequence[Sequence[float]]) -> PairWins:
    """Per pair, `ours − max(peers)`: one peer per row, one pair per column (a per-pair best, not the
    best peer on average, so a peer that is good on some pairs only still counts there)."""
    if not peers:
        raise ValueError("no peer to compare with")
    best = np.max(np.asarray(peers, dtype=np.float64), axis=0)
    margins = np.asarray(ours, dtype=np.float64) - best
    if margins.shape != best.shape or not margins.size:
        raise ValueError(f"{len(ours)} values of ours against peers with {best.size} pairs each")
    return PairWins(int(np.sum(margins > 0)), int(margins.size), float(margins.mean()), float(margins.min()))


LOW_PSNR = 20.0  # dB: a pair below this has visibly left its reference (on the hard model: often another image)


@dataclass(frozen=True)
class PairDistribution:
    """One method's per-pair PSNRs summarized: median, 10th percentile (linear interpolation between order
    statistics), minimum, pairs won against the per-pair best peer (None without peers) and pairs below
    `LOW_PSNR`."""

    median: float
    p10: float
    minimum: float
    wins: int | None
    pairs: int
    below: int

    def as_dict(self) -> dict[str, float | int | None]:
        return {"median": self.median, "p10": self.p10, "min": self.minimum, "wins": self.wins,
                "pairs": self.pairs, f"below_{LOW_PSNR:g}_db": self.below}


def pair_distribution(values: Sequence[float], peers: Sequence[Sequence[float]] = ()) -> PairDistribution:
    """The distribution of `values` (one per pair), with its wins over the best of `peers` on each pair
    (`wins_over_best`)."""
    array = np.asarray(values, dtype=np.float64)
    if not array.size:
        raise ValueError("no pair to summarize")
    wins = wins_over_best(array, peers).wins if len(peers) else None
    return PairDistribution(float(np.median(array)), float(np.percentile(array, 10)), float(array.min()), wins,
                            int(array.size), int(np.sum(array < LOW_PSNR)))
