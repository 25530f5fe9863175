"""The shipped demo FLUX pipeline: whole-word tokenization and prompt-following generations."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from meancache_cli.models import demo  # noqa: E402


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
