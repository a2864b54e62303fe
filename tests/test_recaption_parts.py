"""Parts of the recaption job that need no engine: config, schema, prompts, thumbnails, browser, histogram."""

from __future__ import annotations

import io
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.recaption import (
    NAMED_PROMPTS,
    PLLAVA_RECAPTION_PROMPT,
    RecaptionConfig,
    output_schema,
    run_recaption,
    thumbnail_strip,
)
from pipelines.report import write_browser, write_length_histogram
from vidlm.config import ConfigError, load_config


def test_default_prompt_is_pllavas_and_templates_name_columns():
    cfg = RecaptionConfig()
    assert cfg.prompt_texts() == {"caption": PLLAVA_RECAPTION_PROMPT}
    assert "background, characters and the actions" in PLLAVA_RECAPTION_PROMPT
    two = load_config(RecaptionConfig, None, ["prompts={caption: pllava_recaption, caption_zh: pllava_recaption_zh}"])
    assert two.prompt_texts()["caption_zh"] == NAMED_PROMPTS["pllava_recaption_zh"]
    names = output_schema(two).names
    for col in ("caption", "prompt_tokens", "output_tokens", "finish_reason"):
        assert col in names
    for col in ("caption_zh", "caption_zh_prompt_tokens", "caption_zh_output_tokens", "caption_zh_finish_reason"):
        assert col in names
    assert "manifest_caption" in names and len(names) == len(set(names))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("prompts={}", "at least one prompt template"),
        ("prompts={Caption: x}", "lowercase column name"),
        ("prompts={error: x}", "output column already"),
        ("prompts={caption: ''}", "text is empty"),
        ("engine.max_model_len=0", "engine.max_model_len"),
    ],
)
def test_bad_config_is_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(RecaptionConfig, None, [override])


def test_video_prompt_ids_hold_one_placeholder():
    from transformers import AutoTokenizer

    from vidlm.models.presets import resolve_model
    from vidlm.models.processing import video_prompt_ids
    from vidlm.models.video_llm import VidlmConfig

    path = resolve_model("tiny")
    c = VidlmConfig.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = video_prompt_ids(tok, "Describe the video.", c.video_token, c.video_token_index, None)
    assert ids.count(c.video_token_index) == 1
    first = video_prompt_ids(tok, "<video>\nDescribe the video.", c.video_token, c.video_token_index, None)
    assert first == ids  # the video goes first unless the template places it
    with_system = video_prompt_ids(tok, "Describe the video.", c.video_token, c.video_token_index, "Be brief.")
    assert len(with_system) != len(ids)
    with pytest.raises(ValueError, match="exactly one"):
        video_prompt_ids(tok, "<video> and <video>", c.video_token, c.video_token_index, None)


def test_thumbnail_strip_is_a_jpeg_of_evenly_spaced_frames():
    from PIL import Image

    frames = np.stack([np.full((32, 48, 3), 10 * i, np.uint8) for i in range(10)])
    strip = Image.open(io.BytesIO(thumbnail_strip(frames, count=3, height=16)))
    assert strip.format == "JPEG" and strip.size == (3 * 24, 16)
    levels = [int(np.asarray(strip)[8, 24 * k + 12].mean()) for k in range(3)]
    assert levels == pytest.approx([0, 40, 90], abs=3)  # frames 0, 4 (rounded 4.5), 9
    assert thumbnail_strip(frames[:0], 3, 16) is None and thumbnail_strip(frames, 0, 16) is None


def _captions(folder, n_files: int, per_file: int):
    folder.mkdir()
    for f in range(n_files):
        ids = [f"clip{f:02d}_{i}" for i in range(per_file)]
        failed = [i % 3 == 2 for i in range(per_file)]
        table = pa.table(
            {
                "clip_id": ids,
                "video_id": [f"v{f}"] * per_file,
                "start_s": [0.0] * per_file,
                "end_s": [2.0] * per_file,
                "num_frames": [None if x else 8 for x in failed],
                "num_visual_tokens": [None if x else 128 for x in failed],
                "caption": [None if x else f"<b>words</b> {' '.join(['w'] * (i + 1))}" for i, x in enumerate(failed)],
                "manifest_caption": ["a rabbit"] * per_file,
                "thumbnail": [None] * per_file,
                "error": ["no such file" if x else None for x in failed],
                "error_type": ["missing_file" if x else None for x in failed],
            }
        )
        pq.write_table(table, folder / f"part-{f}.parquet")
    return folder


def test_browser_lists_every_clip_over_pages_and_escapes_text(tmp_path):
    captions = _captions(tmp_path / "captions", n_files=3, per_file=7)
    pages = write_browser(captions, tmp_path / "browser", ["caption"], clips_per_page=5)
    assert [p.name for p in pages] == ["index.html"] + [f"page-{i:04d}.html" for i in range(2, 6)]
    html = "".join(p.read_text() for p in pages)
    ids = re.findall(r'<div class="clip[^"]*" id="([^"]+)"', html)
    assert sorted(ids) == sorted(f"clip{f:02d}_{i}" for f in range(3) for i in range(7))  # each clip once
    assert "&lt;b&gt;words&lt;/b&gt;" in html and "<b>words</b>" not in html
    assert html.count('class="clip failed"') == 3 * 2 and "missing_file: no such file" in html
    assert "21 clips, 6 failed" in pages[0].read_text() and 'href="page-0005.html"' in pages[0].read_text()


def test_length_histogram_is_a_png(tmp_path):
    captions = _captions(tmp_path / "captions", n_files=1, per_file=6)
    png = write_length_histogram(captions, tmp_path / "lengths.png", ["caption"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = _captions(tmp_path / "none", n_files=0, per_file=0)
    assert write_length_histogram(empty, tmp_path / "x.png", ["caption"]) is None


def test_more_frames_than_the_model_samples_is_refused_before_any_work(tmp_path):
    manifest = tmp_path / "list.txt"
    manifest.write_text("/nonexistent.mp4\n")
    cfg = load_config(RecaptionConfig, None, ["model=tiny", "sampling={mode: uniform, num_frames: 32}"])
    with pytest.raises(ValueError, match="up to 32 frames per clip.*model's 4"):
        run_recaption(manifest, tmp_path / "out", cfg)
    assert not (tmp_path / "out").exists()


def test_an_engine_that_fails_its_warm_up_fails_the_job_instead_of_every_clip(tiny_models):
    """CaptionClips' warm-up: a request the engine fails raises (the Ray task fails, so the job does); a warm-up
    whose frames cannot fit the context uses fewer frames, or none."""
    import asyncio

    from pipelines.caption_clips import CaptionClips
    from vidlm.models.video_llm import VidlmConfig

    stage = CaptionClips.__new__(CaptionClips)  # the stage without its vLLM engine: _generate stands in below
    stage.model_config = VidlmConfig.from_pretrained(tiny_models["pllava"])
    stage.prompts, stage._longest = {"caption": [1, 2, stage.model_config.video_token_index, 3]}, "caption"
    stage.progress, stage.startup_s = None, 0.0
    asked = []

    async def failing(clip_id, template, frames):
        asked.append(len(frames))
        raise ValueError("the engine rejected the request")

    for max_model_len, frames in [(4096, stage.model_config.sampling_config.max_frames_per_clip()), (1, None)]:
        stage._warm, stage._warmed, stage.max_model_len = asyncio.Lock(), False, max_model_len
        stage._generate = failing
        asked.clear()
        if frames is None:  # not even one frame fits: every clip is a context_overflow row, no warm-up request
            asyncio.run(stage._warm_up())
            assert asked == [] and stage._warmed
        else:
            with pytest.raises(RuntimeError, match="failed its warm-up request: ValueError: the engine rejected"):
                asyncio.run(stage._warm_up())
            assert asked == [frames]
