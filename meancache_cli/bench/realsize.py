"""Real-size speed and memory: each family's transformer at its published size, timed on the loop its pipeline runs.

The demo model is too small for wall time to mean anything: its text encoders, VAE and Python loop are a visible
share of a call. Here the transformer is built from the published config (random weights: speed and memory do not
depend on their values) and driven exactly as its pipeline drives it (packed latents, text embeddings of the right
shape, the pipeline's own timesteps with dynamic shift, guidance branches, `scheduler.step`), so MeanCache's hook
sees the real sequence of calls and every ratio measured here is the transformer loop's, which dominates a real
generation. Schedules are evenly spaced (`uniform_schedule`): speed depends only on how many steps compute.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, is_dataclass
from importlib import resources
from typing import Any

import numpy as np
import torch
from diffusers.hooks import HookRegistry, ModelHook

from ..errors import MeanCacheError, UsageError
from ..hooks import COUNTER_HOOK, MEANCACHE_HOOK, apply_evaluation_counter, apply_meancache
from ..models.adapters import unwrap_transformer
from ..models.registry import resolve_model
from ..models.schedulers import euler_scheduler_swap
from ..planning import uniform_schedule

FAMILIES = ("flux", "qwen-image", "wan", "hunyuanvideo")
BUDGETS = (10, 17, 25)
STEPS = 50
# How the transformer is compiled: beneath the hooks (regional: its repeated blocks; whole: its forward), or around
# them (module: `transformer.compile()`; wrapped: `torch.compile(transformer)`), where the hook's bookkeeping runs
# outside the graph. `--compile` takes a comma-separated list of them, or none.
COMPILE_MODES = ("regional", "whole", "module", "wrapped")
DEFAULT_COMPILE = "regional,module,wrapped"
INNER_TIMER = "meancache_realsize_model_timer"
OUTER_TIMER = "meancache_realsize_call_timer"
# Relative L2 difference of the final latents that still counts as "the same output" (bf16 keeps 8 bits).
SAME_OUTPUT_TOLERANCE = {torch.bfloat16: 3e-2, torch.float32: 1e-4}


@dataclass(frozen=True)
class RealConfig:
    """A family's published transformer and scheduler configs, and the text shapes its pipeline passes.

    `text` has one entry per guidance branch: the embedding's length and how many of its positions are the
    prompt's tokens (the rest is what the pipeline pads with: T5 pad outputs for FLUX, zeros for Wan, masked
    positions for HunyuanVideo; Qwen-Image does not pad).
    """

    family: str
    source: str
    transformer: dict[str, Any]
    scheduler: dict[str, Any]
    text: list[dict[str, int]]
    height: int
    width: int
    frames: int | None
    call_kwargs: dict[str, Any]
    reduced: bool = False


def load_real_config(family: str, reduced: bool = False) -> RealConfig:
    """The published config of `family` at the size its registry entry defaults to, or the reduced test size."""
    if family not in FAMILIES:
        raise UsageError(f"--families: unknown family '{family}': use some of {', '.join(FAMILIES)}")
    data = json.loads((resources.files("meancache_cli.models") / "real_configs" / f"{family}.json").read_text())
    spec = resolve_model(family)
    transformer, text = dict(data["transformer"]), data["text"]
    height, width, frames = spec.height, spec.width, spec.frames
    if reduced:
        small = data["reduced"]
        transformer.update(small["transformer"])
        text, height, width, frames = small["text"], small["height"], small["width"], small["frames"]
    return RealConfig(family, data["source"], transformer, data["scheduler"], text, height, width, frames,
                      dict(spec.call_kwargs), reduced)


@dataclass
class Rig:
    """What MeanCache's hook reads from a pipeline (`.transformer`, `.scheduler`), without text encoders or VAE."""

    transformer: torch.nn.Module
    scheduler: Any


def build_transformer(config: dict[str, Any], device: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """The transformer with random weights allocated directly on `device` in `dtype` (a 20B model never exists in
    fp32), and the modules the class keeps in fp32 cast back, as `from_pretrained(torch_dtype=dtype)` does."""
    import diffusers

    model_class = getattr(diffusers, config["_class_name"])
    torch.manual_seed(seed)
    previous, verbosity = torch.get_default_dtype(), diffusers.utils.logging.get_verbosity()
    torch.set_default_dtype(dtype)
    # A published config may carry keys the installed class no longer takes (Qwen-Image's pooled_projection_dim).
    diffusers.utils.logging.set_verbosity_error()
    try:
        with torch.device(device):
            model = model_class.from_config(config)
    finally:
        torch.set_default_dtype(previous)
        diffusers.utils.logging.set_verbosity(verbosity)
    keep = model_class._keep_in_fp32_modules or []
    for name, param in model.named_parameters():
        if any(part in keep for part in name.split(".")):
            param.data = param.data.float()
    return model.eval().requires_grad_(False)


def build_scheduler(config: dict[str, Any]) -> tuple[Any, str | None]:
    """The pipeline's scheduler, swapped for flow-matching Euler where the tool swaps it (Wan ships UniPC)."""
    import diffusers

    rig = Rig(torch.nn.Identity(), getattr(diffusers, config["_class_name"]).from_config(config))
    note = euler_scheduler_swap(rig)
    return rig.scheduler, note


@dataclass
class LoopInputs:
    """What one pipeline call hands the transformer, prepared once: the start latents, each guidance branch's
    keyword arguments, and how the pipeline turns a scheduler timestep into the transformer's argument."""

    latents: torch.Tensor
    model_dtype: torch.dtype
    branches: list[tuple[str, dict[str, Any]]]
    set_timesteps: Callable[[Any, int], torch.Tensor]
    timestep: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    combine: Callable[[list[torch.Tensor]], torch.Tensor]
    context: Callable[[Any, int], dict[str, Any]] = lambda scheduler, i: {}

    @property
    def tokens(self) -> int:
        """Image or video tokens per branch: the attention length the transformer's cost grows with."""
        return _tokens(self.latents)


def _tokens(latents: torch.Tensor) -> int:
    return int(latents.shape[1]) if latents.dim() == 3 else int(np.prod(latents.shape[2:]) // 4)


def _text(config: RealConfig, width: int, device: str, dtype: torch.dtype, generator: torch.Generator,
          zero_padding: bool = False) -> list[torch.Tensor]:
    """One embedding per branch, (1, length, width); positions past the prompt are zero when the pipeline pads so."""
    embeds = []
    for entry in config.text:
        embed = torch.randn(1, entry["length"], width, generator=generator)
        if zero_padding:
            embed[:, entry["prompt"]:] = 0
        embeds.append(embed.to(device, dtype))
    return embeds


def _flow_timesteps(tokens: int, device: str) -> Callable[[Any, int], torch.Tensor]:
    """FluxPipeline and QwenImagePipeline: sigmas linspace(1, 1/N, N) with mu from the image's token count."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    def set_timesteps(scheduler: Any, steps: int) -> torch.Tensor:
        c = scheduler.config
        mu = calculate_shift(tokens, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        return retrieve_timesteps(scheduler, steps, device, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)[0]

    return set_timesteps


def _bf16_timestep_over_1000(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """FLUX and Qwen-Image cast the timestep to the latents' dtype, then pass t / 1000 (= σ)."""
    return t.expand(x.shape[0]).to(x.dtype) / 1000


# -- pipeline-specific inputs: the one place that knows how each pipeline prepares its transformer's arguments -----
# FLUX and Qwen-Image pack latents with their pipelines' private static helpers (`_pack_latents`,
# `_prepare_latent_image_ids`): diffusers has no public packing function, and the public `prepare_latents` needs a
# pipeline instance (its VAE scale factor) and draws its own noise in the model's dtype on the device, which would
# change the start latents.


def flux_inputs(config: RealConfig, device: str, dtype: torch.dtype, generator: torch.Generator) -> LoopInputs:
    from diffusers import FluxPipeline

    t = config.transformer
    height, width = 2 * (config.height // 16), 2 * (config.width // 16)
    channels = t["in_channels"] // 4
    noise = torch.randn(1, channels, height, width, generator=generator).to(device, dtype)
    latents = FluxPipeline._pack_latents(noise, 1, channels, height, width)
    (prompt,) = _text(config, t["joint_attention_dim"], device, dtype, generator)
    kwargs = {
        "guidance": torch.full([1], float(config.call_kwargs.get("guidance_scale", 3.5)), device=device,
                               dtype=torch.float32) if t.get("guidance_embeds") else None,
        "pooled_projections": torch.randn(1, t["pooled_projection_dim"], generator=generator).to(device, dtype),
        "encoder_hidden_states": prompt,
        "txt_ids": torch.zeros(prompt.shape[1], 3, device=device, dtype=dtype),
        "img_ids": FluxPipeline._prepare_latent_image_ids(1, height // 2, width // 2, device, dtype),
        "joint_attention_kwargs": {},
    }
    return LoopInputs(latents, dtype, [("cond", kwargs)], _flow_timesteps(latents.shape[1], device),
                      _bf16_timestep_over_1000, lambda outputs: outputs[0])


def qwen_image_inputs(config: RealConfig, device: str, dtype: torch.dtype, generator: torch.Generator) -> LoopInputs:
    from diffusers import QwenImagePipeline

    t = config.transformer
    height, width = 2 * (config.height // 16), 2 * (config.width // 16)
    channels = t["in_channels"] // 4
    noise = torch.randn(1, 1, channels, height, width, generator=generator).to(device, dtype)
    latents = QwenImagePipeline._pack_latents(noise, 1, channels, height, width)
    scale = float(config.call_kwargs.get("true_cfg_scale", 4.0))
    branches = [(name, {"guidance": None, "encoder_hidden_states_mask": None, "encoder_hidden_states": embeds,
                        "img_shapes": [[(1, height // 2, width // 2)]], "attention_kwargs": {}})
                for name, embeds in zip(("cond", "uncond"), _text(config, t["joint_attention_dim"], device, dtype,
                                                                  generator))]

    def combine(outputs: list[torch.Tensor]) -> torch.Tensor:
        """True CFG with QwenImagePipeline's rescale to the conditional prediction's norm."""
        cond, uncond = outputs
        guided = uncond + scale * (cond - uncond)
        return guided * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(guided, dim=-1, keepdim=True))

    return LoopInputs(latents, dtype, branches, _flow_timesteps(latents.shape[1], device), _bf16_timestep_over_1000,
                      combine)


def _video_latents(config: RealConfig, device: str, generator: torch.Generator) -> torch.Tensor:
    """(1, C, (F − 1)/4 + 1, H/8, W/8) in float32: Wan and HunyuanVideo keep their loop's latents in float32."""
    frames = (config.frames - 1) // 4 + 1
    shape = (1, config.transformer["in_channels"], frames, config.height // 8, config.width // 8)
    return torch.randn(*shape, generator=generator).to(device)


def wan_inputs(config: RealConfig, device: str, dtype: torch.dtype, generator: torch.Generator) -> LoopInputs:
    latents = _video_latents(config, device, generator)
    scale = float(config.call_kwargs.get("guidance_scale", 5.0))
    prompts = _text(config, config.transformer["text_dim"], device, dtype, generator, zero_padding=True)
    branches = [(name, {"encoder_hidden_states": embeds, "attention_kwargs": None})
                for name, embeds in zip(("cond", "uncond"), prompts)]

    def set_timesteps(scheduler: Any, steps: int) -> torch.Tensor:
        scheduler.set_timesteps(steps, device=device)
        return scheduler.timesteps

    def context(scheduler: Any, i: int) -> dict[str, Any]:
        """WanPipeline tells cache hooks the step index and σ."""
        return {"step_index": i, "sigma": float(scheduler.sigmas[i]), "num_inference_steps": len(scheduler.timesteps)}

    return LoopInputs(latents, dtype, branches, set_timesteps, lambda t, x: t.expand(x.shape[0]),
                      lambda outputs: outputs[1] + scale * (outputs[0] - outputs[1]), context)


def hunyuanvideo_inputs(config: RealConfig, device: str, dtype: torch.dtype, generator: torch.Generator) -> LoopInputs:
    from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

    t = config.transformer
    latents = _video_latents(config, device, generator)
    (prompt,) = _text(config, t["text_embed_dim"], device, dtype, generator)
    mask = torch.zeros(1, config.text[0]["length"], dtype=dtype, device=device)  # the pipeline casts it so
    mask[:, : config.text[0]["prompt"]] = 1
    guidance = float(config.call_kwargs.get("guidance_scale", 6.0))
    kwargs = {
        "encoder_hidden_states": prompt, "encoder_attention_mask": mask,
        "pooled_projections": torch.randn(1, t["pooled_projection_dim"], generator=generator).to(device, dtype),
        "guidance": torch.tensor([guidance], dtype=dtype, device=device) * 1000.0, "attention_kwargs": None,
    }

    def set_timesteps(scheduler: Any, steps: int) -> torch.Tensor:
        return retrieve_timesteps(scheduler, steps, device, sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])[0]

    return LoopInputs(latents, dtype, [("cond", kwargs)], set_timesteps, lambda t, x: t.expand(x.shape[0]).to(x.dtype),
                      lambda outputs: outputs[0])


INPUTS: dict[str, Callable[[RealConfig, str, torch.dtype, torch.Generator], LoopInputs]] = {
    "flux": flux_inputs, "qwen-image": qwen_image_inputs, "wan": wan_inputs, "hunyuanvideo": hunyuanvideo_inputs,
}


def denoise(rig: Rig, inputs: LoopInputs, steps: int) -> torch.Tensor:
    """The pipeline's denoising loop on the transformer alone: one call per branch per step, the guidance
    combination, `scheduler.step` (Euler: x += (σ_{i+1} − σ_i)·v), then the hook reset a pipeline call ends with."""
    timesteps = inputs.set_timesteps(rig.scheduler, steps)
    rig.scheduler.set_begin_index(0)
    x = inputs.latents
    for i, t in enumerate(timesteps):
        model_input, timestep = x.to(inputs.model_dtype), inputs.timestep(t, x)
        outputs = []
        for name, kwargs in inputs.branches:
            with rig.transformer.cache_context(name, **inputs.context(rig.scheduler, i)):
                outputs.append(rig.transformer(hidden_states=model_input, timestep=timestep, **kwargs,
                                               return_dict=False)[0])
        x = rig.scheduler.step(inputs.combine(outputs), t, x, return_dict=False)[0]
    # What DiffusionPipeline.maybe_free_model_hooks does after each call (`transformer._reset_stateful_cache`), through
    # the hook registry's public method.
    HookRegistry.check_if_exists_or_initialize(unwrap_transformer(rig.transformer)).reset_stateful_hooks()
    return x


# -- instrumentation -------------------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class CallTimer(ModelHook):
    """Device-synchronized wall time of every call that passes this point of the hook chain.

    Registered innermost it times the model's own forward; registered outermost, the whole call (hooks included).
    The synchronization makes it a diagnostic pass only: the speed-ups come from unsynchronized loops.
    """

    def __init__(self, device: str, after: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.device, self.after = device, after
        self.times: list[float] = []
        self.start = 0.0

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        synchronize(self.device)
        self.start = time.perf_counter()
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        synchronize(self.device)
        self.times.append(time.perf_counter() - self.start)
        if self.after is not None:
            self.after()
        return output


def held_bytes(state: Any) -> int:
    """Bytes of the distinct tensor storages reachable from a hook's state (containers, dataclasses, this package's
    objects), so the number does not depend on how the hook lays its history out."""
    seen: set[int] = set()
    storages: dict[int, int] = {}
    stack = [state]
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, (torch.nn.Module, str, bytes, int, float, bool, type(None))):
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set)):
            stack.extend(item)
        elif is_dataclass(item) and not isinstance(item, type):
            stack.extend(getattr(item, f.name) for f in fields(item))
        elif type(item).__module__.startswith("meancache_cli"):
            stack.extend(vars(item).values())
    return sum(storages.values())


@dataclass
class Instruments:
    """The hooks of one measured run: real evaluations, model and call times, and the most the cache held."""

    counter: Any
    inner: CallTimer | None = None
    outer: CallTimer | None = None
    cache: Any = None
    held: int = 0
    evaluated: list[bool] = field(default_factory=list)

    def after_call(self) -> None:
        """Called by the outer timer: did this call reach the model, and what does the cache hold now?"""
        self.evaluated.append(len(self.inner.times) > sum(self.evaluated))
        if self.cache is not None:
            self.held = max(self.held, held_bytes(vars(self.cache)))

    def hook_seconds(self) -> tuple[float, float]:
        """(mean time of a call the cache answered without the model, total time the hooks added to the loop)."""
        inner = iter(self.inner.times)
        skipped, added = [], 0.0
        for total, evaluated in zip(self.outer.times, self.evaluated):
            own = total - next(inner) if evaluated else total
            added += own
            if not evaluated:
                skipped.append(total)
        return (statistics.fmean(skipped) if skipped else 0.0), added


@contextmanager
def instrumented(rig: Rig, budget: int | None, steps: int, timed: bool = False,
                 device: str = "cpu") -> Iterator[Instruments]:
    """Counter (innermost, so it counts only forwards that run), optional model timer, MeanCache at `budget`
    (evenly spaced, K = 0) unless None, optional call timer outermost; removed outermost first on exit (a diffusers
    hook removed from under another would cut the chain)."""
    registry = HookRegistry.check_if_exists_or_initialize(unwrap_transformer(rig.transformer))
    registered: list[str] = []
    try:
        instruments = Instruments(counter=apply_evaluation_counter(rig))
        registered.append(COUNTER_HOOK)
        if timed:
            instruments.inner = CallTimer(device)
            registry.register_hook(instruments.inner, INNER_TIMER)
            registered.append(INNER_TIMER)
        if budget is not None:
            instruments.cache = apply_meancache(rig, uniform_schedule("realsize", steps, budget))
            registered.append(MEANCACHE_HOOK)
        if timed:
            instruments.outer = CallTimer(device, instruments.after_call)
            registry.register_hook(instruments.outer, OUTER_TIMER)
            registered.append(OUTER_TIMER)
        yield instruments
    finally:
        for name in reversed(registered):
            registry.remove_hook(name, recurse=False)


# -- measurement -----------------------------------------------------------------------------------------------


def _peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> int | None:
    return int(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else None


def run_once(rig: Rig, inputs: LoopInputs, steps: int, budget: int | None, device: str) -> dict[str, Any]:
    """One timed, unsynchronized-inside loop: wall seconds, real evaluations, peak memory, the final latents."""
    with instrumented(rig, budget, steps) as tools:
        synchronize(device)
        _peak_reset(device)
        start = time.perf_counter()
        x = denoise(rig, inputs, steps)
        synchronize(device)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "nfe": tools.counter.evaluations, "peak_bytes": _peak(device), "latents": x}


def diagnose(rig: Rig, inputs: LoopInputs, steps: int, budget: int, device: str) -> dict[str, Any]:
    """One synchronized pass at `budget`: real evaluations, the hooks' own time, the most the cache held."""
    with instrumented(rig, budget, steps, timed=True, device=device) as tools:
        denoise(rig, inputs, steps)
        skipped, added = tools.hook_seconds()
    return {"nfe": tools.counter.evaluations, "hook_ms_per_skipped_call": 1e3 * skipped,
            "hook_ms_per_loop": 1e3 * added, "cache_held_bytes": tools.held}


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float32."""
    a, b = a.float(), b.float()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-12))


def timing_rounds(rig: Rig, inputs: LoopInputs, steps: int, budgets: list[int], repeats: int,
                  device: str) -> dict[int | None, list[dict[str, Any]]]:
    """Round-robin: every repeat runs uncached then each budget, so drift in clocks or load hits all alike."""
    runs: dict[int | None, list[dict[str, Any]]] = {None: [], **{b: [] for b in budgets}}
    for repeat in range(repeats):
        for budget in runs:
            run = run_once(rig, inputs, steps, budget, device)
            if repeat:
                del run["latents"]  # one final latents per method is enough, and the rest would count in the peaks
            runs[budget].append(run)
    return runs


def summarize(runs: dict[int | None, list[dict[str, Any]]], steps: int, branches: int) -> dict[str, Any]:
    """Medians, ms per transformer call (uncached loop), speed-ups against the N/B limit, peak memory."""
    uncached = runs[None]
    base = statistics.median(r["seconds"] for r in uncached)
    peaks = [r["peak_bytes"] for r in uncached if r["peak_bytes"] is not None]
    result: dict[str, Any] = {
        "uncached": {"seconds": [r["seconds"] for r in uncached], "median_s": base, "nfe": uncached[0]["nfe"],
                     "ms_per_call": 1e3 * base / (steps * branches), "peak_bytes": max(peaks) if peaks else None},
        "budgets": [],
    }
    for budget, rows in runs.items():
        if budget is None:
            continue
        median = statistics.median(r["seconds"] for r in rows)
        peaks = [r["peak_bytes"] for r in rows if r["peak_bytes"] is not None]
        result["budgets"].append({
            "budget": budget, "nfe": rows[0]["nfe"], "seconds": [r["seconds"] for r in rows], "median_s": median,
            "speedup": base / median, "limit": steps / budget, "peak_bytes": max(peaks) if peaks else None,
        })
    return result


def cache_bound_bytes(latent_elements: int, output_bytes: int, kmax: int = 0, exponential: bool = False) -> int:
    """What MeanCache keeps per guidance branch (`hooks.BranchHistory`): the last computed output in the model's
    dtype, the edge's average velocity and the K previous compute steps' velocities in float32 and, with
    exponential edges, those steps' latents in float32. It does not grow with the budget or the edge lengths."""
    return latent_elements * (output_bytes + 4 * (kmax + 1) + 4 * kmax * exponential)


def compile_modes(text: str) -> list[str]:
    """`--compile`: comma-separated modes (each once, in the order given), or none."""
    if text.strip() == "none":
        return []
    modes = list(dict.fromkeys(mode.strip() for mode in text.split(",") if mode.strip()))
    bad = [mode for mode in modes if mode not in COMPILE_MODES] or ([] if modes else [text])
    if bad:
        raise UsageError(f"--compile {bad[0]} is unknown: use some of {','.join(COMPILE_MODES)} (comma-separated), "
                         "or none")
    return modes


@contextmanager
def compiled(rig: Rig, mode: str, backend: str) -> Iterator[None]:
    """The transformer compiled one way while the block runs, eager again after it (dynamo reset on both sides).

    regional and whole compile beneath the hooks, which then run entirely in Python; module and wrapped compile the
    whole call, hooks included: their bookkeeping is `torch.compiler.disable`d, so dynamo traces the model's
    forward and breaks the graph around it.
    """
    import torch._dynamo

    torch._dynamo.reset()
    model = rig.transformer
    try:
        if mode == "regional":
            model.compile_repeated_blocks(fullgraph=True, backend=backend)
        elif mode == "whole":
            model.forward = torch.compile(model.forward, backend=backend)
        elif mode == "module":
            model.compile(backend=backend)
        elif mode == "wrapped":
            rig.transformer = torch.compile(model, backend=backend)
        else:
            raise UsageError(f"--compile {mode} is unknown: use some of {','.join(COMPILE_MODES)}, or none")
        yield
    finally:
        rig.transformer = model
        model.__dict__.pop("forward", None)  # whole: the compiled forward; else the plain one the hooks put back
        for module in model.modules():
            module._compiled_call_impl = None
        torch._dynamo.reset()


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def measure_family(config: RealConfig, device: str, dtype: torch.dtype, steps: int = STEPS,
                   budgets: list[int] | None = None, repeats: int = 3, compile_mode: str = DEFAULT_COMPILE,
                   compile_backend: str = "inductor", log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Every number of one family's row: eager speed and memory per budget, the hooks' own cost, and (unless
    `compile_mode` is none) the same on the transformer compiled each way it lists, its outputs checked against
    eager."""
    modes = compile_modes(compile_mode)
    budgets = sorted(budgets or BUDGETS)
    started = time.perf_counter()
    log(f"{config.family}: building {config.transformer['_class_name']} on {device}")
    scheduler, scheduler_note = build_scheduler(config.scheduler)
    rig = Rig(build_transformer(config.transformer, device, dtype), scheduler)
    generator = torch.Generator().manual_seed(1)
    inputs = INPUTS[config.family](config, device, rig.transformer.dtype, generator)
    branches = len(inputs.branches)
    params = sum(p.numel() for p in rig.transformer.parameters())
    row: dict[str, Any] = {
        "family": config.family, "source": config.source, "class": config.transformer["_class_name"],
        "reduced": config.reduced, "parameters": params, "dtype": str(rig.transformer.dtype).removeprefix("torch."),
        "height": config.height, "width": config.width, "frames": config.frames, "tokens": inputs.tokens,
        "latent_shape": list(inputs.latents.shape), "branches": branches, "text": config.text, "steps": steps,
        "repeats": repeats, "scheduler_note": scheduler_note,
        "weights_bytes": sum(p.numel() * p.element_size() for p in rig.transformer.parameters()),
    }
    with torch.no_grad():
        log(f"{config.family}: diagnostic pass (synchronized) at B = {', '.join(map(str, budgets))}")
        diagnostics = {b: diagnose(rig, inputs, steps, b, device) for b in budgets}
        log(f"{config.family}: timing uncached and cached, {repeats} round(s)")
        eager_runs = timing_rounds(rig, inputs, steps, budgets, repeats, device)
        row["eager"] = summarize(eager_runs, steps, branches)
        latent_elements = inputs.latents[:1].numel()
        output_bytes = torch.empty(0, dtype=inputs.model_dtype).element_size()
        for entry in row["eager"]["budgets"]:
            found = diagnostics[entry["budget"]]
            entry.update({key: found[key] for key in ("hook_ms_per_skipped_call", "hook_ms_per_loop",
                                                      "cache_held_bytes")})
            entry["diagnostic_nfe"] = found["nfe"]
            entry["cache_bound_bytes"] = branches * cache_bound_bytes(latent_elements, output_bytes)
        reference = {None: eager_runs[None][0]["latents"], **{b: eager_runs[b][0]["latents"] for b in budgets}}
        row["finite"] = bool(all(torch.isfinite(x).all() for x in reference.values()))
        if modes:
            row["compiled"] = [measure_compiled(rig, inputs, steps, budgets, repeats, device, mode, compile_backend,
                                                reference, log) for mode in modes]
    row["seconds"] = time.perf_counter() - started
    del rig
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def measure_compiled(rig: Rig, inputs: LoopInputs, steps: int, budgets: list[int], repeats: int, device: str,
                     mode: str, backend: str, reference: dict[int | None, torch.Tensor],
                     log: Callable[[str], None]) -> dict[str, Any]:
    """MeanCache on the transformer compiled one way: warm-up (a cached generation, then an uncached one: the graphs
    each compiles), then timed rounds; its outputs against eager."""
    log(f"compiling ({mode}, {backend}) and warming up")
    with compiled(rig, mode, backend):
        start = time.perf_counter()
        warmup_graphs = {}
        for budget, name in [(budgets[0], "cached"), (None, "uncached")]:
            graphs = graphs_compiled()
            run_once(rig, inputs, steps, budget, device)
            warmup_graphs[name] = graphs_compiled() - graphs
        warmup = time.perf_counter() - start
        graphs = graphs_compiled()
        log(f"timing the compiled transformer ({mode}), {repeats} round(s)")
        runs = timing_rounds(rig, inputs, steps, budgets, repeats, device)
        after_warmup = graphs_compiled() - graphs
    result = summarize(runs, steps, len(inputs.branches))
    tolerance = SAME_OUTPUT_TOLERANCE.get(inputs.model_dtype, 3e-2)
    differences = {budget: relative_difference(rows[0]["latents"], reference[budget]) for budget, rows in runs.items()}
    result.update({
        "mode": mode, "backend": backend, "warmup_s": warmup, "warmup_graphs": warmup_graphs,
        "graphs_after_warmup": after_warmup, "uncached_difference": differences[None], "tolerance": tolerance,
    })
    for entry in result["budgets"]:
        entry["difference"] = differences[entry["budget"]]
        entry["same_output"] = differences[entry["budget"]] <= tolerance
    return result


def environment(device: str) -> dict[str, Any]:
    import diffusers

    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else platform.processor()
    return {"device": device, "device_name": name or platform.machine(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda if device.startswith("cuda") else None}


def check_device(device: str | None, reduced: bool) -> str:
    """The device to run on; full size needs CUDA (one-line errors otherwise)."""
    if reduced:
        return device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = device or "cuda"
    if not device.startswith("cuda"):
        raise UsageError(f"--real-size at full size needs --device cuda, not {device}: the transformers have 1.3B to "
                         "20B parameters; add --reduced for the small CPU run")
    if not torch.cuda.is_available():
        raise MeanCacheError(f"--real-size needs a CUDA GPU and torch {torch.__version__} sees none; add --reduced "
                             "for the small CPU run that checks the code path")
    return device


def run_real_size(families: str | None, device: str | None, reduced: bool, steps: int | None,
                  budgets: tuple[int, ...] | None, repeats: int | None, compile_mode: str,
                  log: Callable[[str], None], compile_backend: str = "inductor",
                  on_result: Callable[[dict[str, Any]], None] = lambda results: None) -> dict[str, Any]:
    """Measure each family in turn (one transformer in memory at a time) and return the results document.

    `families` is comma-separated (all four when None); steps, budgets and repeats default to 50, (10, 17, 25), 3.
    `on_result` gets the document after each family, so a family that fails late does not lose the others.
    """
    steps, budgets, repeats = steps or STEPS, sorted(budgets or BUDGETS), repeats or 3
    compile_modes(compile_mode)
    if repeats < 1:
        raise UsageError(f"--repeats {repeats} is invalid: use 1 or more")
    bad = [b for b in budgets if not 1 <= b <= steps]
    if bad:
        raise UsageError(f"--budgets {bad[0]} is out of range: use 1…{steps}")
    names = [name.strip() for name in (families or ",".join(FAMILIES)).split(",") if name.strip()]
    configs = [load_real_config(name, reduced) for name in names]
    device = check_device(device, reduced)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    env = environment(device)
    results: dict[str, Any] = {"kind": "meancache-realsize", "steps": steps, "budgets": budgets, "rows": []}
    for config in configs:
        try:
            row = measure_family(config, device, dtype, steps, budgets, repeats, compile_mode, compile_backend, log)
        except torch.cuda.OutOfMemoryError:
            kept = ", ".join(r["family"] for r in results["rows"]) or "none"
            raise MeanCacheError(f"{config.family} does not fit in this GPU's memory (rows kept: {kept}); use a "
                                 "larger GPU, or --families without it") from None
        results["rows"].append({**row, "environment": env})
        on_result(results)
    return results
