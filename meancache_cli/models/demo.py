"""Tiny shapes-and-colours FLUX pipeline shipped with the package.

The demo lets MeanCache run a real ``diffusers.FluxPipeline`` offline on a CPU in seconds: every part
(tokenizers, text encoders, VAE, transformer, scheduler) is a miniature of the FLUX.1 layout, trained by
``meancache_cli.models.train_demo`` on procedurally drawn 32x32 images such as "a red circle on a blue
background". Always generate with ``height=HEIGHT, width=WIDTH, max_sequence_length=MAX_SEQUENCE_LENGTH``.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw

if TYPE_CHECKING:  # diffusers/transformers are imported lazily: they add over a second to CLI start-up
    from diffusers import FluxPipeline
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 225),
    "yellow": (245, 220, 30),
    "purple": (140, 40, 175),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
VOCABULARY: tuple[str, ...] = ("a", "on", "background", *SHAPES, *COLOURS)
HEIGHT = WIDTH = 32
# The T5 prompt is padded to this length; training used exactly this padding, so generation must too.
MAX_SEQUENCE_LENGTH = 16
DEMO_DIR = Path(__file__).parent / "demo_pipeline"

CLIP_BOS, CLIP_EOS, CLIP_UNK = "<|startoftext|>", "<|endoftext|>", "<|unk|>"
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
TEXT_HIDDEN_SIZE = 64
_SUPERSAMPLE = 4  # draw at 4x and box-filter down, so edges are anti-aliased like real images


def prompt_for(shape: str, fg: str, bg: str) -> str:
    """The one prompt template the demo model was trained on."""
    return f"a {fg} {shape} on a {bg} background"


def random_prompt(rng: np.random.Generator) -> tuple[str, str, str, str]:
    """Draw (prompt, shape, foreground, background) with foreground and background colours distinct."""
    names = list(COLOURS)
    shape = SHAPES[rng.integers(len(SHAPES))]
    fg, bg = (names[i] for i in rng.choice(len(names), size=2, replace=False))
    return prompt_for(shape, fg, bg), shape, fg, bg


def _shape_outline(shape: str, cx: float, cy: float, size: float) -> list[tuple[float, float]]:
    """Polygon (or ellipse bounding box for circles) of a shape whose bounding box side is ``size``."""
    r = size / 2
    if shape in ("circle", "square"):
        return [(cx - r, cy - r), (cx + r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else 0.45 * r
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + r * 0.1 + radius * math.sin(angle)))
    return points


def render(shape: str, fg: str, bg: str, rng: np.random.Generator) -> np.ndarray:
    """Draw one ``fg`` shape on a ``bg`` background at a random position and size (40-75% of the side)."""
    side = HEIGHT * _SUPERSAMPLE
    size = rng.uniform(0.40, 0.75) * side
    margin = _SUPERSAMPLE  # keep a one-pixel border of background so it stays recognisable
    cx, cy = rng.uniform(margin + size / 2, side - margin - size / 2, size=2)
    image = Image.new("RGB", (side, side), COLOURS[bg])
    draw = ImageDraw.Draw(image)
    outline = _shape_outline(shape, cx, cy, size)
    if shape == "circle":
        draw.ellipse(outline, fill=COLOURS[fg])
    elif shape == "square":
        draw.rectangle(outline, fill=COLOURS[fg])
    else:
        draw.polygon(outline, fill=COLOURS[fg])
    return np.asarray(image.resize((WIDTH, HEIGHT), Image.Resampling.BOX), dtype=np.uint8)


def unknown_words(prompt: str) -> list[str]:
    """Words of ``prompt`` the demo tokenizers cannot represent, so the CLI can warn about them."""
    return [word for word in re.findall(r"[a-z]+", prompt.lower()) if word not in VOCABULARY]


def bpe_merge(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges by rank, as the ``tokenizers`` BPE model does, to one word."""
    while len(symbols) > 1:
        rank, i = min((ranks.get(pair, math.inf), i) for i, pair in enumerate(zip(symbols, symbols[1:])))
        if rank == math.inf:
            break
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2 :]]
    return symbols


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """BPE vocabulary and merges that turn every demo word into one ``word</w>`` token.

    A CLIP tokenizer given whole words without merges would split them into characters. Merges are
    appended with the lowest priority until each word merges completely; a lowest-priority merge never
    changes how the earlier words tokenize, so all words stay whole.
    """
    ranks: dict[tuple[str, str], int] = {}
    pieces: list[str] = []
    for word in VOCABULARY:
        symbols = [*word[:-1], word[-1] + "</w>"]
        pieces += symbols
        while len(symbols := bpe_merge(symbols, ranks)) > 1:
            ranks[symbols[0], symbols[1]] = len(ranks)
            pieces.append(symbols[0] + symbols[1])
    ordered = [CLIP_BOS, CLIP_EOS, CLIP_UNK, *(w + "</w>" for w in VOCABULARY), *pieces]
    vocab: dict[str, int] = {}
    for piece in ordered:
        vocab.setdefault(piece, len(vocab))
    return vocab, sorted(ranks, key=ranks.__getitem__)


def build_clip_tokenizer() -> CLIPTokenizer:
    """CLIP BPE tokenizer over the demo vocabulary; BOS=0, EOS=pad=1 (EOS must not be 2, see CLIPTextModel)."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=CLIP_UNK,
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        pad_token=CLIP_EOS,
        model_max_length=MAX_SEQUENCE_LENGTH,
    )


def build_t5_tokenizer() -> T5Tokenizer:
    """T5 Unigram tokenizer whose pieces are the ``▁word`` forms of the demo vocabulary."""
    from transformers import T5Tokenizer

    vocab = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), *((f"▁{word}", -1.0) for word in VOCABULARY)]
    return T5Tokenizer(
        vocab=vocab,
        eos_token=T5_EOS,
        unk_token=T5_UNK,
        pad_token=T5_PAD,
        extra_ids=0,
        model_max_length=MAX_SEQUENCE_LENGTH,
    )


def build_clip_encoder(tokenizer: CLIPTokenizer, seed: int) -> CLIPTextModel:
    """Frozen, randomly initialised one-layer CLIP text encoder; its pooled EOS state conditions FLUX."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=2 * TEXT_HIDDEN_SIZE,
        projection_dim=TEXT_HIDDEN_SIZE,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=MAX_SEQUENCE_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval().requires_grad_(False)


def build_t5_encoder(tokenizer: T5Tokenizer, seed: int) -> T5EncoderModel:
    """Frozen, randomly initialised one-layer T5 encoder; its token states feed FLUX's joint attention."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=TEXT_HIDDEN_SIZE,
        d_kv=TEXT_HIDDEN_SIZE // 2,
        d_ff=2 * TEXT_HIDDEN_SIZE,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=MAX_SEQUENCE_LENGTH,
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval().requires_grad_(False)


def load_demo_pipeline(torch_dtype: torch.dtype = torch.float32) -> FluxPipeline:
    """Load the shipped demo pipeline (fp16 on disk) from the package folder, never touching the network."""
    from diffusers import FluxPipeline

    with warnings.catch_warnings():
        # newer diffusers prefer `dtype=` and warn about `torch_dtype=`, which older releases need.
        warnings.simplefilter("ignore", FutureWarning)
        return FluxPipeline.from_pretrained(DEMO_DIR, torch_dtype=torch_dtype, local_files_only=True)


def dominant_colours(image: Image.Image | np.ndarray) -> tuple[str, str]:
    """(foreground, background) colour names of a demo image, for checking generations against prompts.

    Pixels are snapped to the nearest palette colour; the background is the commonest colour on the border
    and the foreground the commonest other colour anywhere.
    """
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    labels = ((pixels[..., None, :] - palette) ** 2).sum(-1).argmin(-1)
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    names = list(COLOURS)
    background = Counter(border.tolist()).most_common(1)[0][0]
    others = Counter(labels[labels != background].tolist()).most_common(1)
    foreground = others[0][0] if others else background
    return names[foreground], names[background]


@torch.no_grad()
def colour_match_rate(pipe: FluxPipeline, n: int, prompt_seed: int, generator_seed: int) -> float:
    """Share of `n` random-prompt generations whose dominant colours match their prompt (the demo's
    quality measure, used by the training script and the tests)."""
    rng = np.random.default_rng(prompt_seed)
    drawn = [random_prompt(rng) for _ in range(n)]
    images = pipe(
        [prompt for prompt, *_ in drawn],
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=50,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        generator=torch.Generator().manual_seed(generator_seed),
    ).images
    hits = sum(dominant_colours(image) == (fg, bg) for image, (_, _, fg, bg) in zip(images, drawn))
    return hits / n
