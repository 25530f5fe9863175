"""An independent replay of the cached sampler, written from docs/design.md §2 and §6 alone.

It imports nothing from meancache_cli. During a hooked pipeline run a plain PyTorch pre-hook records
the arguments of every transformer call; the replay then runs the bare transformer itself at the
schedule's compute steps, builds each branch's estimate

    û(t→s) = v_t + λ·(σ_s − σ_t)·(v_t − v_p) / (2·(σ_t − σ_p)),   p = the K-th previous compute step,

or, on an exponential edge (DESIGN.md §4, DPM-Solver++(2M) read as a mean velocity), with x̂₀ = x − σ·v and
λ(σ) = log((1 − σ)/σ): D = (1 + 1/(2r))·x̂₀_t − (1/(2r))·x̂₀_p, x_s = (σ_s/σ_t)·x_t − (1 − σ_s)(e^(−h) − 1)·D,
û = (x_s − x_t)/(σ_s − σ_t) (first order, D = x̂₀_t, where σ_p = 1 or σ_s = 0); then it
combines the branches as the pipeline does, and takes the Euler steps itself. The hooked pipeline's
latents must equal the replay's at every step.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

# dx/dσ = sign · output (design §6): Z-Image's pipeline negates the transformer output before stepping.
OUTPUT_SIGN = {"ZImageTransformer2DModel": -1.0}
LATENTS_ARG = {"ZImageTransformer2DModel": "x"}
Combine = Callable[[list[torch.Tensor]], torch.Tensor]


def single(outputs: list[torch.Tensor]) -> torch.Tensor:
    return outputs[0]


def linear_cfg(scale: float) -> Combine:
    """FLUX true CFG, Chroma, Wan: the first call is the prompt, the second the negative prompt."""
    return lambda outputs: outputs[1] + scale * (outputs[0] - outputs[1])


def qwen_cfg(scale: float) -> Combine:
    """Qwen-Image: linear CFG, then rescaled to the prompt branch's norm over the last dimension."""

    def combine(outputs: list[torch.Tensor]) -> torch.Tensor:
        mixed = outputs[1] + scale * (outputs[0] - outputs[1])
        return mixed * (torch.norm(outputs[0], dim=-1, keepdim=True) / torch.norm(mixed, dim=-1, keepdim=True))

    return combine


def _tensor(value: Any) -> torch.Tensor:
    return torch.stack(list(value)) if isinstance(value, (list, tuple)) else value


class CallLog:
    """Every transformer call's arguments, bound to the model class's own forward signature."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.signature = inspect.signature(type(transformer).forward)
        self.latents_arg = LATENTS_ARG.get(type(transformer).__name__, "hidden_states")
        self.calls: list[dict[str, Any]] = []
        self.handle = transformer.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        bound = self.signature.bind(module, *args, **kwargs).arguments
        bound.pop("self")
        self.calls.append({name: (value.clone() if isinstance(value, torch.Tensor) else value)
                           for name, value in bound.items()})

    def close(self) -> None:
        self.handle.remove()

    def latents(self, call: int) -> torch.Tensor:
        return _tensor(self.calls[call][self.latents_arg]).float()


def dpm_solver_2m(x_t: torch.Tensor, x0_t: torch.Tensor, x0_p: torch.Tensor, sigma_p: float, sigma_t: float,
                  sigma_s: float) -> torch.Tensor:
    """x_s of one DPM-Solver++(2M) step in data prediction, in the flow parametrization x = (1 − σ)·x₀ + σ·ε."""
    if sigma_s == 0.0:
        return x0_t
    lam = lambda sigma: math.log((1 - sigma) / sigma)  # noqa: E731
    h = lam(sigma_s) - lam(sigma_t)
    d = x0_t if sigma_p >= 1.0 else None
    if d is None:
        r = (lam(sigma_t) - lam(sigma_p)) / h
        d = (1 + 1 / (2 * r)) * x0_t - (1 / (2 * r)) * x0_p
    return (sigma_s / sigma_t) * x_t - (1 - sigma_s) * (math.exp(-h) - 1) * d


def replay(transformer: torch.nn.Module, log: CallLog, steps: list[int], orders: list[int], lambdas: list[float],
           sigmas: list[float], branches: int = 1, combine: Combine = single,
           kinds: list[str] | None = None) -> list[torch.Tensor]:
    """Latents x_0 … x_N of the cached sampler, computed step by step without the hook. `kinds` marks the
    exponential edges ("exp"); every other edge is the damped JVP (reuse where K = 0 or λ = 0)."""
    sign = OUTPUT_SIGN.get(type(transformer).__name__, 1.0)
    n = len(sigmas) - 1
    ends = steps[1:] + [n]
    kinds = kinds or ["jvp"] * len(steps)
    edge = {t: (i, s, k, lam, kind) for i, (t, s, k, lam, kind) in enumerate(zip(steps, ends, orders, lambdas, kinds))}
    computed: list[dict[int, torch.Tensor]] = [{} for _ in range(branches)]
    seen: dict[int, torch.Tensor] = {}
    estimate: list[torch.Tensor] = [torch.empty(0)] * branches
    x = log.latents(0)
    xs = [x]
    for m in range(n):
        if m in edge:
            i, s, k, lam, kind = edge[m]
            seen[m] = x
            for b in range(branches):
                arguments = dict(log.calls[m * branches + b])
                value = arguments[log.latents_arg]
                arguments[log.latents_arg] = list(x.unbind(0)) if isinstance(value, (list, tuple)) else x
                with torch.no_grad():
                    output = transformer(**arguments)
                v_t = sign * _tensor(output[0] if isinstance(output, tuple) else output.sample).float()
                u = v_t
                if k > 0 and kind == "exp":
                    p = steps[i - k]
                    x_s = dpm_solver_2m(x, x - sigmas[m] * v_t, seen[p] - sigmas[p] * computed[b][p], sigmas[p],
                                        sigmas[m], sigmas[s])
                    u = (x_s - x) / (sigmas[s] - sigmas[m])
                elif k > 0 and lam > 0:
                    p = steps[i - k]
                    v_p = computed[b][p]
                    u = v_t + lam * (sigmas[s] - sigmas[m]) * (v_t - v_p) / (2 * (sigmas[m] - sigmas[p]))
                computed[b][m] = v_t
                estimate[b] = u
        velocity = sign * combine([sign * u for u in estimate])
        x = x + (sigmas[m + 1] - sigmas[m]) * velocity
        xs.append(x)
    return xs
