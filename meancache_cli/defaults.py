"""Every default of the method in one torch-free place: the CLI, calibration, planning and the bench read them.

`Recipe` is how a calibration becomes a schedule (cost kind, γ, dampings, edge families); `CANDIDATES` are
the recipes a plan validates on held-out calibration runs when a pipeline is at hand (DESIGN.md §4: no
single recipe wins on every model and configuration).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_BACK = 25  # look-back in steps: how far before an edge its previous compute step may lie
LAMBDAS = (0.5, 1.0)  # JVP dampings λ the maps measure
MAX_ELEMENTS = 65536  # maps on a fixed random subset of at most this many latent elements
HOLDOUT = 4  # calibration runs kept out of the maps, for validating plans (at most a third of the runs)
AUTO_MAX_RUNS = 32  # `--runs auto`: the most map runs it adds
STABLE_REGRET = 0.05  # `--runs auto` stops once plans from two halves of the runs cost ≤ 5 % more than each other's
VALIDATION_SHARE = 1 / 3  # validation may cost at most this share of the calibration's model evaluations
VALIDATION_MARGIN = 0.5  # dB by which a candidate must beat the default recipe on the held-out runs to replace it
KMAX = 1  # the planner's largest order: 1 = the JVP (or the exponential edge) from the previous compute step

# What the command line runs when an option is left out (where the library has the same parameter, it
# defaults to the same value).
MODEL = "demo"  # the embedded demo model: runs anywhere, offline
DEVICE = "cpu"
PLAN_OUT = "-"  # plan writes the schedule to stdout (a pipeline into generate --schedule -)
SEED = 0  # generate --seed
BATCH_SIZE = 1  # generate --prompts: prompts per pipeline call
REPEAT = 3  # generate --compare: timed runs of each variant (the median is reported)


@dataclass(frozen=True)
class Recipe:
    """How to plan: the edge cost (`velocity`: E, `displacement`: |Δσ|·E), γ, the JVP dampings the planner may
    use and whether it may use the exponential-integrator edge."""

    cost: str = "velocity"
    gamma: float = 4.0
    lambdas: tuple[float, ...] = LAMBDAS
    exponential: bool = False

    @property
    def name(self) -> str:
        lambdas = ",".join(f"{value:g}" for value in self.lambdas)
        return f"{self.cost} γ{self.gamma:g} λ{{{lambdas}}}" + (" +exp" if self.exponential else "")


RECIPE = Recipe()  # planned without a pipeline: chosen on the demo (docs/results.md)
CANDIDATES = (
    RECIPE,
    Recipe(cost="displacement"),
    Recipe(exponential=True),
    Recipe(cost="displacement", exponential=True),
    Recipe(cost="displacement", gamma=2.0, lambdas=(1.0,)),
)
