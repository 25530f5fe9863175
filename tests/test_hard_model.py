"""The shipped hard model: a closed-form Gaussian-mixture flow behind a real FluxPipeline."""

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from cli_helpers import run_cli  # noqa: E402
from diffusers import FluxPipeline  # noqa: E402

from meancache_cli.calibration import reference_run_kwargs  # noqa: E402
from meancache_cli.errors import MeanCacheError  # noqa: E402
from meancache_cli.files import load_calibration  # noqa: E402
from meancache_cli.models import build_hard, demo, hard  # noqa: E402
from meancache_cli.models.registry import load_pipeline, resolve_model  # noqa: E402

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def pipe():
    pipeline = load_pipeline(resolve_model("hard"))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def embeddings(pipe):
    """(pooled CLIP, T5 states) of PROMPT, another prompt and the empty one, as FluxPipeline computes them."""
    with torch.no_grad():
        text, pooled, _ = pipe.encode_prompt([PROMPT, "a white star on a black background", ""], prompt_2=None,
                                             max_sequence_length=demo.MAX_SEQUENCE_LENGTH)
    return pooled, text


def caption_index(pipe, prompt: str) -> int:
    return list(pipe.transformer.config.captions).index(prompt)


def test_loads_offline_as_a_flux_pipeline_and_generates_finite_latents(pipe) -> None:
    assert isinstance(pipe, FluxPipeline)
    assert isinstance(pipe.transformer, hard.MixtureFlowTransformer2DModel)
    config = pipe.transformer.config
    assert config.in_channels == 4 * pipe.vae.config.latent_channels and not config.guidance_embeds
    spec = resolve_model("hard")
    call = reference_run_kwargs(spec, spec.steps, None, None, None, {})
    assert (call["height"], call["width"], call["true_cfg_scale"], call["negative_prompt"]) == (32, 32, 4.0, "")
    latents = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="latent", **call).images
    assert call["num_inference_steps"] == 50
    assert latents.shape == (1, config.latent_tokens, config.in_channels) and torch.isfinite(latents).all()


def oracle_log_weights(transformer, pooled: np.ndarray, text: np.ndarray) -> np.ndarray:
    """w_k from the documented rule, in numpy: a softmax over captions of temperature × ⟨feature, key⟩, the
    feature being the prompt's pooled and T5 embeddings minus the empty prompt's, each block divided by its scale;
    a caption's weight split evenly over its components."""
    config = transformer.config
    feature = np.concatenate([
        (pooled - transformer.null_pooled.double().numpy()) / config.pooled_scale,
        (text - transformer.null_text.double().numpy()).reshape(-1) / config.text_scale,
    ])
    logits = config.temperature * transformer.caption_keys.double().numpy() @ feature
    log_caption = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    caption_of = transformer.component_caption.numpy()
    return log_caption[caption_of] - np.log(np.bincount(caption_of)[caption_of])


def oracle_velocity(means: np.ndarray, log_w: np.ndarray, s: float, x: np.ndarray, sigma: float) -> np.ndarray:
    """E[ε − x0 | x_σ = x] for x0 ~ Σ w_k N(μ_k, s² I), ε ~ N(0, I), x_σ = (1 − σ) x0 + σ ε: Bayes over the
    components (x_σ | k ~ N((1 − σ) μ_k, ((1 − σ)² s² + σ²) I)), then the Gaussian conditional means of x0 and ε."""
    a, b = 1.0 - sigma, sigma
    variance = a * a * s * s + b * b
    residual = x[None, :] - a * means
    log_joint = log_w - (residual**2).sum(1) / (2 * variance) - 0.5 * x.size * np.log(2 * np.pi * variance)
    responsibility = np.exp(log_joint - log_joint.max())
    responsibility /= responsibility.sum()
    x0_given_k = means + (a * s * s / variance) * residual
    eps_given_k = (b / variance) * residual
    return responsibility @ (eps_given_k - x0_given_k)


def test_velocity_is_the_closed_form_posterior_expectation(pipe, embeddings) -> None:
    transformer = pipe.transformer
    pooled, text = (e.double() for e in embeddings)
    means = (transformer.quantized_means.double() * transformer.config.mean_step).numpy()
    s = transformer.config.data_std
    rng = np.random.default_rng(0)
    red_circle = np.flatnonzero(transformer.component_caption.numpy() == caption_index(pipe, PROMPT))
    checked = 0
    for row in (0, 2):  # the prompt, and the empty prompt (true CFG's negative branch)
        log_w = oracle_log_weights(transformer, pooled[row].numpy(), text[row].numpy())
        for sigma in (1e-6, 0.05, 0.3, 0.6, 0.9, 1 - 1e-6):
            noise = rng.standard_normal(means.shape[1])
            for x in ((1 - sigma) * means[rng.choice(red_circle)] + sigma * noise,
                      (1 - sigma) * means[rng.integers(len(means))] + sigma * noise + 0.3 * rng.standard_normal(
                          means.shape[1]), noise * 1.5):
                expected = oracle_velocity(means, log_w, s, x, sigma)
                hidden = torch.from_numpy(x).reshape(1, transformer.config.latent_tokens, -1)
                (got,) = transformer(hidden, encoder_hidden_states=text[row:row + 1],
                                     pooled_projections=pooled[row:row + 1],
                                     timestep=torch.tensor([sigma], dtype=torch.float64), return_dict=False)
                assert got.dtype == torch.float64 and torch.isfinite(got).all()
                np.testing.assert_allclose(got.reshape(-1).numpy(), expected, rtol=1e-7,
                                           atol=1e-7 * np.abs(expected).max())
                checked += 1
    assert checked == 36
    # float32 latents (the pipeline's) come back as float32 of the same velocity
    x = torch.randn(2, transformer.config.latent_tokens, transformer.config.in_channels)
    out = transformer(x, encoder_hidden_states=text[:2].float(), pooled_projections=pooled[:2].float(),
                      timestep=torch.tensor([0.4, 0.4])).sample
    assert out.dtype == torch.float32 and out.shape == x.shape
    log_w = oracle_log_weights(transformer, pooled[1].numpy(), text[1].numpy())
    expected = oracle_velocity(means, log_w, s, x[1].reshape(-1).double().numpy(), 0.4)
    np.testing.assert_allclose(out[1].reshape(-1).double().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_the_prompt_sets_the_weights_and_the_empty_prompt_spreads_them(pipe, embeddings) -> None:
    transformer = pipe.transformer
    pooled, text = embeddings
    weights = transformer.log_weights(pooled, text).exp()
    caption_of = transformer.component_caption
    per_caption = torch.zeros(3, len(transformer.config.captions), dtype=torch.float64)
    per_caption.index_add_(1, caption_of, weights)
    red_circle, white_star = caption_index(pipe, PROMPT), caption_index(pipe, "a white star on a black background")
    assert per_caption[0].argmax() == red_circle and per_caption[0, red_circle] > 0.8
    assert per_caption[1].argmax() == white_star and per_caption[1, white_star] > 0.8
    assert per_caption[0, white_star] < 1e-3 and per_caption[1, red_circle] < 1e-3
    # the empty prompt: every component the same weight (the unconditional model is the whole mixture)
    torch.testing.assert_close(weights[2], torch.full_like(weights[2], 1 / len(caption_of)))
    # at small σ the posterior sits on the prompt's components: the 50-step output is one of them, and looks it
    image = pipe(PROMPT, height=32, width=32, max_sequence_length=demo.MAX_SEQUENCE_LENGTH, num_inference_steps=50,
                 true_cfg_scale=1.0, generator=torch.Generator().manual_seed(3), output_type="latent").images
    nearest = int(((transformer.means - image.reshape(1, -1).double()) ** 2).sum(1).argmin())
    assert caption_of[nearest] == red_circle
    decoded = pipe(PROMPT, height=32, width=32, max_sequence_length=demo.MAX_SEQUENCE_LENGTH,
                   generator=torch.Generator().manual_seed(3)).images[0]
    assert demo.dominant_colours(decoded) == ("red", "blue")


def test_true_cfg_calls_the_transformer_twice_per_step(pipe) -> None:
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        base = {"height": 32, "width": 32, "max_sequence_length": demo.MAX_SEQUENCE_LENGTH, "num_inference_steps": 5,
                "output_type": "latent"}
        pipe(PROMPT, true_cfg_scale=4.0, negative_prompt="", **base)
        guided = len(calls)
        pipe(PROMPT, true_cfg_scale=1.0, **base)
    finally:
        handle.remove()
    assert (guided, len(calls) - guided) == (10, 5)


def test_other_sizes_are_refused_in_one_line(pipe) -> None:
    with pytest.raises(MeanCacheError, match="generates 32x32 images only"):
        pipe(PROMPT, height=48, width=48, num_inference_steps=2, max_sequence_length=demo.MAX_SEQUENCE_LENGTH)


def test_generate_and_calibrate_run_through_the_cli(capsys, tmp_path) -> None:
    result = run_cli(["generate", "--model", "hard", "--no-cache", "--steps", "10", "--prompt", PROMPT, "--json",
                      "--out", str(tmp_path / "hard.png")], capsys)
    assert result.code == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["model"], data["nfe"], data["steps"]) == ("hard", 20, 10)
    assert (tmp_path / "hard.png").is_file()
    out = tmp_path / "hard.cal.safetensors"
    result = run_cli(["calibrate", "--model", "hard", "--prompt", PROMPT, "--seeds", "0", "--steps", "10",
                      "--max-back", "3", "--out", str(out)], capsys)
    assert result.code == 0, result.stderr
    calibration = load_calibration(out)
    assert (calibration.model, calibration.num_inference_steps, calibration.max_back) == ("hard", 10, 3)
    assert calibration.trajectories == 2  # one run, two guidance branches
    # its sigmas are the hard scheduler's (static shift), not the demo's
    assert np.allclose(calibration.sigmas[:-1], np.linspace(1, 0.1, 10) * 0.8 / (1 - 0.2 * np.linspace(1, 0.1, 10)))
    words = run_cli(["generate", "--model", "hard", "--no-cache", "--steps", "2", "--prompt", "a red dragon",
                     "--out", str(tmp_path / "dragon.png")], capsys)
    assert words.code == 0 and "the hard model does not know dragon" in words.stderr


def test_a_saved_hard_pipeline_gets_the_hard_defaults(pipe, tmp_path) -> None:
    pipe.save_pretrained(tmp_path / "saved")
    spec = resolve_model(str(tmp_path / "saved"))
    assert (spec.family, spec.height, spec.call_kwargs) == ("hard", 32, resolve_model("hard").call_kwargs)


def test_the_build_script_reproduces_the_shipped_parameters(pipe) -> None:
    """Rebuilt from the demo's parts: the means of a few captions (to half an int8 step, plus float32 slack for
    another CPU's VAE arithmetic), every caption key, the bookkeeping and the scheduler."""
    demo_pipe = demo.load_demo_pipeline()
    shipped = pipe.transformer
    config = shipped.config
    assert list(config.captions) == [demo.prompt_for(*label) for label in build_hard.captions()]
    assert (config.data_std, config.temperature, config.mean_step) == (
        build_hard.DATA_STD, build_hard.TEMPERATURE, build_hard.MEAN_STEP)
    per_caption = build_hard.COMPONENTS_PER_CAPTION
    assert config.num_components == per_caption * len(config.captions)
    assert torch.equal(shipped.component_caption, torch.arange(len(config.captions)).repeat_interleave(per_caption))
    indices = [0, 101, len(config.captions) - 1]
    rebuilt = build_hard.caption_means(demo_pipe, indices).double()
    stored = torch.cat([shipped.means[i * per_caption:(i + 1) * per_caption] for i in indices])
    assert (rebuilt - stored).abs().max() <= config.mean_step / 2 + 1e-4
    pooled, text = build_hard.text_embeddings(demo_pipe, [*config.captions, ""])
    keys, pooled_scale, text_scale = build_hard.caption_keys(pooled, text)
    assert pooled_scale == pytest.approx(config.pooled_scale, rel=1e-5)
    assert text_scale == pytest.approx(config.text_scale, rel=1e-5)
    torch.testing.assert_close(shipped.caption_keys.float(), keys, rtol=2e-3, atol=2e-5)
    torch.testing.assert_close(shipped.null_pooled, pooled[-1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(shipped.null_text, text[-1], rtol=1e-4, atol=1e-5)
    expected = build_hard.scheduler(demo_pipe).config
    assert {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")} == {
        k: v for k, v in expected.items() if not k.startswith("_")}
    # A shift of SHIFT at every size: dynamic shifting whose base and max shift are both log(SHIFT).
    assert expected.use_dynamic_shifting and expected.base_shift == expected.max_shift == math.log(build_hard.SHIFT)
    sigmas = pipe.scheduler.__class__.from_config(expected)
    sigmas.set_timesteps(sigmas=np.linspace(1.0, 0.1, 10), mu=expected.base_shift)
    tau = np.linspace(1.0, 0.1, 10)
    np.testing.assert_allclose(sigmas.sigmas[:-1].numpy(), 0.8 * tau / (1 - 0.2 * tau), rtol=1e-6)
