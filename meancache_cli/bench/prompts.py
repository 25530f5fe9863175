"""Prompt and seed sets of the benchmark: two calibration sets (A, B) and one evaluation set, disjoint.

The demo model knows one template ("a <colour> <shape> on a <colour> background"); the generic sets
serve any other text-to-image pipeline. Calibration set A is the model's own default calibration set
when its config has one, so the bench plans exactly as `meancache calibrate` + `plan` would.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError

SHAPES_A = [
    "a red circle on a blue background",
    "a yellow star on a black background",
    "a white triangle on a green background",
    "a purple square on a white background",
]
SHAPES_B = [
    "a green square on a yellow background",
    "a orange circle on a black background",
    "a blue star on a white background",
    "a black triangle on a orange background",
]
SHAPES_EVAL = [
    "a yellow star on a purple background",
    "a red square on a green background",
    "a blue triangle on a yellow background",
    "a white circle on a black background",
    "a orange star on a blue background",
    "a green circle on a red background",
    "a purple triangle on a orange background",
    "a black star on a green background",
]

GENERIC_A = [
    "a lighthouse on a rocky coast at sunset",
    "a bowl of ramen on a wooden table",
    "a portrait of an old fisherman, soft light",
    "a city street in the rain at night",
]
GENERIC_B = [
    "a red fox in a snowy forest",
    "a sailing boat on a calm lake at dawn",
    "a cup of coffee next to an open book",
    "a mountain village under a starry sky",
]
GENERIC_EVAL = [
    "an astronaut riding a horse on the moon",
    "a bouquet of sunflowers in a glass vase",
    "a cat sleeping on a windowsill",
    "a futuristic train crossing a desert",
    "a plate of sushi, studio photograph",
    "a waterfall in a tropical jungle",
    "an owl perched on a snowy branch",
    "a vintage car parked by the sea",
]

PROMPT_SETS = {"shapes": (SHAPES_A, SHAPES_B, SHAPES_EVAL), "generic": (GENERIC_A, GENERIC_B, GENERIC_EVAL)}

# Four seeds on four prompts: 16 calibration runs (32 trajectories under true CFG), which planned
# schedules measured more robust under guidance than 8.
SEEDS_A = [1000, 1001, 1002, 1003]
SEEDS_B = [2000, 2001]
SEEDS_EVAL = [0, 1, 2]


@dataclass(frozen=True)
class PromptSet:
    """Prompts and seeds of one role; every (prompt, seed) pair is one generation."""

    prompts: list[str]
    seeds: list[int]

    def pairs(self) -> list[tuple[str, int]]:
        return [(prompt, seed) for prompt in self.prompts for seed in self.seeds]

    def as_dict(self) -> dict[str, list]:
        return {"prompts": list(self.prompts), "seeds": list(self.seeds)}


@dataclass(frozen=True)
class BenchPrompts:
    calibration_a: PromptSet
    calibration_b: PromptSet
    evaluation: PromptSet

    def check_disjoint(self) -> None:
        """Calibration and evaluation share no prompt and no seed (DESIGN.md §7)."""
        for name, other in (("calibration A", self.calibration_a), ("calibration B", self.calibration_b)):
            shared = set(other.prompts) & set(self.evaluation.prompts)
            seeds = set(other.seeds) & set(self.evaluation.seeds)
            if shared or seeds:
                raise UsageError(f"{name} and evaluation share {sorted(shared) or sorted(seeds)}: "
                                 "calibration and evaluation prompts/seeds must be disjoint")


def bench_prompts(prompt_set: str, quick: bool, default_calibration: list[str] | None = None) -> BenchPrompts:
    """The three sets for `prompt_set` ('shapes' or 'generic'); quick mode keeps a few of each."""
    if prompt_set not in PROMPT_SETS:
        raise UsageError(f"unknown prompt set {prompt_set!r}: use one of {', '.join(PROMPT_SETS)}")
    set_a, set_b, evaluation = PROMPT_SETS[prompt_set]
    set_a = [p for p in (default_calibration or set_a) if p not in evaluation] or set_a
    if quick:
        return BenchPrompts(PromptSet(set_a[:2], SEEDS_A[:2]), PromptSet(set_b[:2], SEEDS_B[:1]),
                            PromptSet(evaluation[:2], SEEDS_EVAL[:1]))
    return BenchPrompts(PromptSet(set_a, SEEDS_A), PromptSet(set_b, SEEDS_B), PromptSet(evaluation, SEEDS_EVAL))
