"""The shipped demo FLUX pipeline: whole-word tokenization and prompt-following generations."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from cli_helpers import run_cli  # noqa: E402

from meancache_cli.calibration import reference_run_kwargs  # noqa: E402
from meancache_cli.models import demo  # noqa: E402
from meancache_cli.models.registry import resolve_model  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    pipeline = demo.load_demo_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_prompt_tokenizes_into_whole_words(pipe):
    prompt = "a purple star on a yellow background"
    words = prompt.split()
    clip, t5 = pipe.tokenizer, pipe.tokenizer_2
    clip_vocab, t5_vocab = clip.get_vocab(), t5.get_vocab()
    expected_clip = [clip.bos_token_id, *(clip_vocab[f"{w}</w>"] for w in words), clip.eos_token_id]
    expected_t5 = [*(t5_vocab[f"▁{w}"] for w in words), t5.eos_token_id]
    assert clip(prompt).input_ids == expected_clip
    assert t5(prompt).input_ids == expected_t5
    assert clip.unk_token_id not in expected_clip and t5.unk_token_id not in expected_t5
    # CLIPTextModel pools at the first EOS only when eos_token_id != 2 (the legacy argmax rule).
    assert pipe.text_encoder.config.eos_token_id == clip.eos_token_id != 2
    # the tokenizers built for training and the saved ones agree
    assert demo.build_clip_tokenizer()(prompt).input_ids == expected_clip
    assert demo.build_t5_tokenizer()(prompt).input_ids == expected_t5


def test_generations_follow_prompt_colours(pipe):
    rate = demo.colour_match_rate(pipe, 40, prompt_seed=12345, generator_seed=0)
    print(f"demo colour match rate: {rate:.0%}")
    assert rate >= 0.9


def test_unknown_words_flags_out_of_vocabulary():
    assert demo.unknown_words("A red Dragon on a blue background!") == ["dragon"]
    assert demo.unknown_words("a white square on a black background") == []


def foreground_mask(image: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of pixels nearer the foreground colour than the background's.

    The background colour is the median of the border; the foreground colour starts at the pixel farthest
    from it and becomes the mean of the pixels nearer to it (two-means), so no palette is assumed.
    """
    height, width, _ = image.shape
    pixels = image.reshape(-1, 3).astype(np.float64)
    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]]).astype(np.float64)
    background = np.median(border, axis=0)
    foreground = pixels[((pixels - background) ** 2).sum(1).argmax()]
    for _ in range(10):
        nearer = ((pixels - foreground) ** 2).sum(1) < ((pixels - background) ** 2).sum(1)
        foreground = pixels[nearer].mean(0)
    mask = nearer.reshape(height, width)
    largest: list[tuple[int, int]] = []
    seen = np.zeros_like(mask)
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start], stack, region = True, [start], []
        while stack:
            y, x = stack.pop()
            region.append((y, x))
            for q in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= q[0] < height and 0 <= q[1] < width and mask[q] and not seen[q]:
                    seen[q] = True
                    stack.append(q)
        largest = max(largest, region, key=len)
    out = np.zeros_like(mask)
    out[tuple(np.array(largest).T)] = True
    return out


def convex_hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of 2-D integer points (monotone chain, shoelace)."""
    ordered = sorted(set(map(tuple, points.tolist())))

    def half(sequence: list) -> list:
        hull: list = []
        for p in sequence:
            while len(hull) >= 2 and ((hull[-1][0] - hull[-2][0]) * (p[1] - hull[-2][1])
                                      - (hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0])) <= 0:
                hull.pop()
            hull.append(p)
        return hull[:-1]

    hull = half(ordered) + half(ordered[::-1])
    return 0.5 * abs(sum(a[0] * b[1] - b[0] * a[1] for a, b in zip(hull, hull[1:] + hull[:1])))


def classify_shape(image: np.ndarray) -> str:
    """circle, square, triangle or star from the foreground's geometry alone, never from the renderer.

    The star is the one non-convex shape: its area over its convex hull's (solidity) is about 0.6, the
    others' about 0.9 or more. The convex ones differ in how much of their bounding box they fill:
    square 1, circle π/4, triangle ½. The thresholds lie between the classes' ideal values.
    """
    mask = foreground_mask(image)
    ys, xs = np.nonzero(mask)
    if len(ys) < 9:
        return "nothing"
    corners = np.concatenate([np.stack([ys + dy, xs + dx], 1) for dy in (0, 1) for dx in (0, 1)])
    solidity = len(ys) / convex_hull_area(corners)
    fill = len(ys) / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    if solidity < 0.8:
        return "star"
    return "square" if fill >= 0.88 else "circle" if fill >= 0.66 else "triangle"


def test_shape_classifier_reads_rendered_shapes() -> None:
    """The check itself: right on every clean training-style render (random size, position, colours)."""
    rng = np.random.default_rng(0)
    drawn = [demo.random_prompt(rng) for _ in range(200)]
    assert all(classify_shape(demo.render(shape, fg, bg, rng)) == shape for _, shape, fg, bg in drawn)


SHAPE_PROMPTS, SHAPE_STEPS = 64, 20


def test_generations_draw_the_prompted_shape_with_the_default_guidance(pipe) -> None:
    """With the demo's config defaults (true CFG 4, empty negative prompt) the shape is right for ≥ 95 % of
    64 random prompts and seeds. 20 steps instead of 50 keep it fast; the rate is the same (measured: 96-100 %
    over four sets of 48 at either step count, 60-75 % unguided)."""
    spec = resolve_model("demo")
    call = reference_run_kwargs(spec, SHAPE_STEPS, None, None, None, {})
    assert (call["true_cfg_scale"], call["negative_prompt"]) == (4.0, "")
    rng = np.random.default_rng(64)
    drawn = [demo.random_prompt(rng) for _ in range(SHAPE_PROMPTS)]
    generators = [torch.Generator().manual_seed(i) for i in range(len(drawn))]
    images = pipe([prompt for prompt, *_ in drawn], generator=generators, output_type="np", **call).images
    images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    hits = sum(classify_shape(image) == shape for image, (_, shape, _, _) in zip(images, drawn))
    print(f"demo shape match rate with true CFG: {hits}/{SHAPE_PROMPTS}")
    assert hits >= 0.95 * SHAPE_PROMPTS


def test_true_cfg_scale_1_runs_the_demo_unguided(capsys, tmp_path) -> None:
    """True CFG by default calls the transformer twice per step; --true-cfg-scale 1 once."""
    base = ["generate", "--model", "demo", "--no-cache", "--steps", "3", "--prompt",
            "a red circle on a blue background", "--json"]
    guided = run_cli([*base, "--out", str(tmp_path / "guided.png")], capsys)
    plain = run_cli([*base, "--true-cfg-scale", "1", "--out", str(tmp_path / "plain.png")], capsys)
    assert guided.code == plain.code == 0, guided.stderr + plain.stderr
    assert (json.loads(guided.stdout)["nfe"], json.loads(plain.stdout)["nfe"]) == (6, 3)
