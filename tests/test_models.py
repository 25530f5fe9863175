"""Every supported pipeline family on its real diffusers classes, tiny random weights, loaded from disk.

For each family: calibrate → plan → generate through the command line on a saved pipeline directory;
the exact number of real transformer evaluations; B = N bit-identical to the uncached run; and the
adapter's σ mapping and output sign checked against what the sampler really does, both in a plain run
and through the hook's estimator (a wrong sign or a reversed time fails these, Z-Image included).
"""

from __future__ import annotations

import inspect
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run_cli
from oracle import CallLog, linear_cfg, qwen_cfg, replay, single
from PIL import Image
from tiny import ForwardCounter
from tiny_models import TINY_MODELS, TinyModel

from meancache_cli import Schedule, apply_meancache, load_calibration, remove_meancache
from meancache_cli.calibration import reference_run_kwargs
from meancache_cli.generate import generate
from meancache_cli.models.adapters import adapter_for
from meancache_cli.models.demo import DEMO_DIR
from meancache_cli.models.registry import load_pipeline, resolve_model
from meancache_cli.models.schedulers import SchedulerSwapWarning
from meancache_cli.outputs import read_provenance

N = 6
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module", params=list(TINY_MODELS))
def tiny(request, tmp_path_factory):
    """(model, saved pipeline directory, pipeline loaded back by `load_pipeline`, warnings while loading)."""
    model: TinyModel = TINY_MODELS[request.param]
    directory = tmp_path_factory.mktemp(model.name)
    model.build().save_pretrained(directory)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = load_pipeline(resolve_model(str(directory)))
    swaps = [w for w in caught if issubclass(w.category, SchedulerSwapWarning)]
    return model, str(directory), pipe, swaps


def cli_options(model: TinyModel) -> list[str]:
    """The model's fast-run settings as command-line options (sequence lengths stay the pipeline's)."""
    names = {"height": "--height", "width": "--width", "num_frames": "--frames", "guidance_scale": "--guidance-scale",
             "true_cfg_scale": "--true-cfg-scale", "negative_prompt": "--negative-prompt"}
    return [part for key, value in model.call.items() if key in names for part in (names[key], str(value))]


def run(pipe, model: TinyModel, schedule: Schedule | None = None, guidance: bool = True, **kwargs):
    call = {**model.call, **({} if guidance else model.no_guidance), "num_inference_steps": N, **kwargs}
    return generate(pipe, PROMPT, 3, call, schedule, output_type="np")


def test_cli_calibrate_plan_generate(tiny, capsys, tmp_path) -> None:
    model, directory, _, _ = tiny
    options = cli_options(model)
    calibration = tmp_path / "cal.safetensors"
    calibrated = run_cli(["calibrate", "--model", directory, "--prompt", PROMPT, "--prompt", "a green star",
                          "--seeds", "0,1", "--holdout", "1", "--steps", str(N), "--max-back", "2", *options, "--out",
                          str(calibration), "--json"], capsys)
    assert calibrated.code == 0, calibrated.stderr
    assert json.loads(calibrated.stdout)["trajectories"] == 3 * model.branches  # 4 runs, 1 held out
    schedule = tmp_path / "s.yaml"
    planned = run_cli(["plan", "--calibration", str(calibration), "--budget", "3", "--model", directory, "--out",
                       str(schedule), "--json"], capsys)
    assert planned.code == 0, planned.stderr
    validation = json.loads(planned.stdout)["validation"]
    assert validation["runs"] == 1 and all(math.isfinite(c["score"]) for c in validation["candidates"])
    out = tmp_path / ("video.gif" if model.frames else "image.png")
    generated = run_cli(["generate", "--model", directory, "--schedule", str(schedule), "--prompt", PROMPT,
                         *options, "--out", str(out), "--json"], capsys)
    assert generated.code == 0, generated.stderr
    summary = json.loads(generated.stdout)
    assert summary["nfe"] == 3 * model.branches and summary["steps"] == N
    size = (model.call["width"], model.call["height"])
    with Image.open(out) as written:
        assert written.size == size
        assert getattr(written, "n_frames", 1) == (model.frames or 1)
    assert read_provenance(out)["nfe"] == 3 * model.branches


def test_exactly_budget_forwards_and_full_budget_is_bit_identical(tiny) -> None:
    model, _, pipe, _ = tiny
    counter = ForwardCounter(model.embedder(pipe.transformer))
    cached = run(pipe, model, Schedule(model="tiny", num_inference_steps=N, compute_steps=[0, 1, 2], orders=[0, 0, 2],
                                       lambdas=[0.0, 0.0, 1.0]))
    assert counter.calls == cached.nfe == 3 * model.branches
    reference = run(pipe, model)
    assert counter.calls == 3 * model.branches + N * model.branches
    full = run(pipe, model, Schedule(model="tiny", num_inference_steps=N, compute_steps=list(range(N)), orders=[0] * N))
    shape = (1, model.frames, 16, 16, 3) if model.frames else (1, 32, 32, 3)
    assert np.asarray(reference.images).shape == shape
    assert np.array_equal(np.asarray(full.images), np.asarray(reference.images))
    assert not np.array_equal(np.asarray(cached.images), np.asarray(reference.images))


def crowded_sigmas(pipe) -> None:
    """HunyuanVideo's shift 7 on every family: near σ = 1 consecutive timesteps then lie closer than bf16
    resolves, as on the real models (HunyuanVideo at 50 steps, FLUX from about 90)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=7.0,
                                                                 use_dynamic_shifting=False)


def bf16_schedule(steps: int) -> Schedule:
    """Skips step 1 and uses K = 1 and 2 on computed runs: 8 evaluations per branch."""
    third = steps // 3
    return Schedule(model="tiny", num_inference_steps=steps, orders=[0, 0, 1, 2, 0, 1, 0, 0],
                    lambdas=[0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0],
                    compute_steps=[0, 2, 3, 4, third, third + 1, 2 * third, steps - 1])


# The pipelines that hand the transformer a timestep rounded to bf16 (the others pass it in fp32).
BF16_TIMESTEPS = {"flux", "qwen-image", "hunyuanvideo", "chroma"}


def bf16_latents(pipe, model: TinyModel, steps: int, schedule: Schedule | None) -> torch.Tensor:
    call = {**model.call, "height": 16, "width": 16, **({"num_frames": 1} if model.frames else {}),
            "num_inference_steps": steps}
    result = generate(pipe, PROMPT, 3, call, schedule, output_type="latent")
    return torch.stack([torch.as_tensor(image) for image in result.images])


def test_bf16_steps_come_from_the_scheduler(tiny) -> None:
    """In bf16 steps whose timesteps round to one value stay separate steps, not guidance branches: B = N is
    bit-identical to the uncached bf16 run and B < N runs exactly B real evaluations per branch."""
    model, directory, _, _ = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SchedulerSwapWarning)
        pipe = load_pipeline(resolve_model(directory), dtype=torch.bfloat16)
    crowded_sigmas(pipe)
    counter = ForwardCounter(model.embedder(pipe.transformer))
    for steps in (50, 100):
        recorder = CallRecorder(pipe)
        reference = bf16_latents(pipe, model, steps, None)
        recorder.handle.remove()
        timesteps = [float(t.flatten()[0]) for _, t, _ in recorder.calls[::model.branches]]
        repeats = sum(a == b for a, b in zip(timesteps, timesteps[1:]))
        assert (repeats > 0) == (model.name in BF16_TIMESTEPS)
        full = Schedule(model="tiny", num_inference_steps=steps, compute_steps=list(range(steps)), orders=[0] * steps)
        assert torch.equal(bf16_latents(pipe, model, steps, full), reference)
        before = counter.calls
        cached = bf16_latents(pipe, model, steps, bf16_schedule(steps))
        assert counter.calls - before == 8 * model.branches
        assert torch.isfinite(cached.float()).all() and not torch.equal(cached, reference)


class CallRecorder:
    """A plain PyTorch forward hook on the transformer: the latents, timestep and output of every call."""

    def __init__(self, pipe) -> None:
        self.adapter = adapter_for(pipe.transformer)
        self.signature = inspect.signature(pipe.transformer.forward)
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.handle = pipe.transformer.register_forward_hook(self._record, with_kwargs=True)

    @staticmethod
    def _tensor(value) -> torch.Tensor:
        return torch.stack(list(value)) if isinstance(value, (list, tuple)) else value

    def _record(self, module, args, kwargs, output) -> None:
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        sample = output[0] if isinstance(output, tuple) else output.sample
        self.calls.append((self._tensor(bound[self.adapter.latents_arg]).detach().float().clone(),
                           bound[self.adapter.timestep_arg].detach().clone(), self._tensor(sample).detach().float()))

    def latents(self) -> list[torch.Tensor]:
        self.handle.remove()
        return [x for x, _, _ in self.calls]


def sampler_velocity(latents: list[torch.Tensor], sigmas: torch.Tensor, m: int) -> torch.Tensor:
    """The velocity the sampler really stepped with at step m: (x_{m+1} - x_m) / (σ_{m+1} - σ_m)."""
    return (latents[m + 1] - latents[m]) / float(sigmas[m + 1] - sigmas[m])


def test_adapter_sigma_and_sign_match_the_sampler(tiny) -> None:
    """σ read from the timestep is the scheduler's σ, and output_sign · output is the Euler step's dx/dσ."""
    model, _, pipe, _ = tiny
    recorder = CallRecorder(pipe)
    run(pipe, model, guidance=False)
    latents, sigmas, adapter = recorder.latents(), pipe.scheduler.sigmas, recorder.adapter
    assert len(recorder.calls) == N
    for m, (_, timestep, output) in enumerate(recorder.calls):
        assert adapter.sigma(timestep) == pytest.approx(float(sigmas[m]), abs=1e-5)
        if m + 1 < N:
            torch.testing.assert_close(sampler_velocity(latents, sigmas, m), adapter.output_sign * output,
                                       rtol=1e-4, atol=1e-4)


# How each family runs its guidance branches in the oracle test: call overrides, calls per step, combination.
ORACLE_GUIDANCE = {
    "flux": ({"true_cfg_scale": 3.0, "negative_prompt": "a white star"}, 2, linear_cfg(3.0)),
    "qwen-image": ({}, 2, qwen_cfg(4.0)),
    "hunyuanvideo": ({}, 1, single),
    "sd3": ({"guidance_scale": 1.0}, 1, single),  # batched CFG is one call: checked unguided here
    "wan": ({"guidance_scale": 3.0}, 2, linear_cfg(3.0)),
    "z-image": ({"guidance_scale": 0.0}, 1, single),
    "chroma": ({"guidance_scale": 3.0}, 2, linear_cfg(3.0)),
}
ORACLE_SCHEDULE = Schedule(model="tiny", num_inference_steps=N, compute_steps=[0, 1, 3, 4], orders=[0, 1, 1, 2],
                           lambdas=[0.0, 1.0, 0.5, 1.0])


def test_hooked_pipeline_equals_an_independent_replay(tiny) -> None:
    """Every family, guidance branches included: the latents at every step and the final latents equal a
    replay that runs the bare transformer and the estimator formula itself (tests/oracle.py)."""
    model, _, pipe, _ = tiny
    overrides, branches, combine = ORACLE_GUIDANCE[model.name]
    finals: list[torch.Tensor] = []

    def keep(pipe, step, timestep, kwargs):
        finals.append(kwargs["latents"].detach().float().clone())
        return {}

    log = CallLog(pipe.transformer)
    apply_meancache(pipe, ORACLE_SCHEDULE)
    try:
        pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(3), output_type="latent",
             callback_on_step_end=keep, **{**model.call, **overrides, "num_inference_steps": N})
    finally:
        remove_meancache(pipe)
        log.close()
    assert len(log.calls) == N * branches
    xs = replay(pipe.transformer, log, ORACLE_SCHEDULE.compute_steps, ORACLE_SCHEDULE.orders,
                ORACLE_SCHEDULE.lambdas, [float(s) for s in pipe.scheduler.sigmas], branches, combine)
    for m in range(1, N):
        torch.testing.assert_close(log.latents(m * branches), xs[m], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(finals[-1].flatten(), xs[N].flatten(), rtol=1e-4, atol=1e-5)
    assert (xs[N] - xs[4]).abs().max() > 1e-3  # the replayed edges really move the latents


def test_only_wan_needs_its_scheduler_swapped(tiny) -> None:
    model, _, pipe, swaps = tiny
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    if model.name == "wan":
        assert len(swaps) == 1 and "UniPCMultistepScheduler" in str(swaps[0].message)
        assert pipe.scheduler.config.shift == 3.0
    else:
        assert swaps == []


# Saved tiny pipelines and the family whose defaults they get; the tiny FLUX transformer embeds no
# guidance, which is what tells FLUX.1 [schnell] from [dev].
FAMILIES = {**{name: name for name in TINY_MODELS}, "flux": "flux-schnell"}


def test_local_directory_gets_its_family_defaults(tiny) -> None:
    model, directory, _, _ = tiny
    spec = resolve_model(directory)
    family = resolve_model(FAMILIES[model.name])
    assert (spec.name, spec.path, spec.family, spec.repo_id) == (directory, Path(directory), family.name, None)
    for name in ("pipeline_class", "steps", "height", "width", "frames", "fps", "call_kwargs", "calibration_prompts",
                 "calibration_seeds"):
        assert getattr(spec, name) == getattr(family, name), name
    if model.name == "hunyuanvideo":  # the registered size, not the pipeline's 720x1280, 129 frames
        assert reference_run_kwargs(spec, spec.steps, None, None, None, {}) == {
            "guidance_scale": 6.0, "num_inference_steps": 50, "height": 320, "width": 512, "num_frames": 61}
        assert reference_run_kwargs(spec, 4, 16, 32, 5, {"guidance_scale": 3.0}) == {
            "guidance_scale": 3.0, "num_inference_steps": 4, "height": 16, "width": 32, "num_frames": 5}


def test_flux_directory_is_dev_schnell_or_demo_by_its_transformer(tmp_path) -> None:
    """All three are FluxPipeline: FLUX.1 [dev] embeds guidance, [schnell] does not, the demo has its own sizes."""
    demo = resolve_model(str(DEMO_DIR))
    assert demo.family == "demo" and (demo.height, demo.call_kwargs) == (32, resolve_model("demo").call_kwargs)
    for embeds, name in ((True, "flux"), (False, "flux-schnell")):
        directory = tmp_path / name
        (directory / "transformer").mkdir(parents=True)
        (directory / "model_index.json").write_text(json.dumps(
            {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}))
        (directory / "transformer" / "config.json").write_text(json.dumps(
            {"_class_name": "FluxTransformer2DModel", "guidance_embeds": embeds}))
        spec = resolve_model(str(directory))
        assert spec.family == name and spec.steps == resolve_model(name).steps


def test_saved_qwen_image_directory_calibrates_with_true_cfg_by_default(capsys, tmp_path) -> None:
    """Qwen-Image's default true CFG (scale 4, negative prompt " ") applies to its saved directory: two
    trajectories per run; --true-cfg-scale 1 still turns it off."""
    directory = tmp_path / "qwen"
    TINY_MODELS["qwen-image"].build().save_pretrained(directory)
    base = ["calibrate", "--model", str(directory), "--prompt", PROMPT, "--seeds", "0", "--steps", "3",
            "--height", "32", "--width", "32", "--max-back", "1", "--json"]
    guided = run_cli([*base, "--out", str(tmp_path / "cfg.safetensors")], capsys)
    assert guided.code == 0, guided.stderr
    assert json.loads(guided.stdout)["trajectories"] == 2
    calibration = load_calibration(tmp_path / "cfg.safetensors")
    assert calibration.guidance == {"true_cfg_scale": 4.0, "negative_prompt": " "}
    plain = run_cli([*base, "--true-cfg-scale", "1", "--out", str(tmp_path / "plain.safetensors")], capsys)
    assert plain.code == 0, plain.stderr
    assert json.loads(plain.stdout)["trajectories"] == 1


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_video_is_written_with_its_frames_size_and_fps(suffix, capsys, tmp_path) -> None:
    """MP4 out of the box (imageio-ffmpeg is a dependency), and GIF: read back frame count, size and fps."""
    import imageio.v2 as imageio

    model = TINY_MODELS["hunyuanvideo"]
    directory = tmp_path / "hv"
    model.build().save_pretrained(directory)
    out = tmp_path / f"clip{suffix}"
    result = run_cli(["generate", "--model", str(directory), "--no-cache", "--steps", "2", "--prompt", PROMPT,
                      "--height", "16", "--width", "32", "--frames", "5", "--fps", "10", "--out", str(out), "--json"],
                     capsys)
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["output"] == str(out) and "GIF" not in result.stderr
    if suffix == ".mp4":
        with imageio.get_reader(out, format="FFMPEG") as reader:
            meta = reader.get_meta_data()
            assert (reader.count_frames(), meta["size"], meta["fps"]) == (5, (32, 16), 10)
            assert meta["codec"] == "h264"
    else:
        with Image.open(out) as gif:
            assert (gif.n_frames, gif.size, gif.info["duration"]) == (5, (32, 16), 100)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_missing_weights_fail_in_one_line_naming_the_repo(capsys, tmp_path) -> None:
    out = tmp_path / "o.png"
    result = run_cli(["generate", "--model", "flux", "--prompt", "x", "--no-cache", "--out", str(out)], capsys)
    assert result.code == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "black-forest-labs/FLUX.1-dev" in result.stderr and "--model /path/to/saved/pipeline" in result.stderr
    assert not out.exists()


def test_unsupported_local_pipeline_is_refused_before_loading(capsys, tmp_path) -> None:
    """Only model_index.json exists: the refusal must come before any weight is read."""
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "CogVideoXPipeline", "transformer": ["diffusers", "CogVideoXTransformer3DModel"]}))
    result = run_cli(["generate", "--model", str(tmp_path), "--prompt", "x", "--no-cache", "--out",
                      str(tmp_path / "o.png")], capsys)
    assert result.code == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "CogVideoXTransformer3DModel is not a supported flow-matching transformer" in result.stderr


def test_frames_on_an_image_model_is_a_usage_error(capsys, tmp_path) -> None:
    result = run_cli(["generate", "--model", "demo", "--no-cache", "--prompt", "a red circle", "--frames", "5",
                      "--out", str(tmp_path / "o.png")], capsys)
    assert result.code == 2 and "makes images, not videos" in result.stderr


def test_cached_run_through_the_public_api_removes_cleanly(tiny) -> None:
    """apply_meancache/remove_meancache on each family: the plain forward is restored."""
    model, _, pipe, _ = tiny
    apply_meancache(pipe, Schedule(model="tiny", num_inference_steps=N, compute_steps=[0, 1], orders=[0, 1],
                                   lambdas=[0.0, 1.0]))
    remove_meancache(pipe)
    counter = ForwardCounter(model.embedder(pipe.transformer))
    pipe(PROMPT, num_inference_steps=2, output_type="latent", **model.call)
    assert counter.calls == 2 * model.branches
