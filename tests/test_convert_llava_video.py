"""`vidlm convert` of lmms-lab LLaVA-Video releases: the converted model equals LLaVA-NeXT's video path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from harness import IMAGE_TOKEN_INDEX, llava_next_reference_logits, write_llava_video_release

from vidlm.models.video_llm import VidlmForConditionalGeneration

BIN = Path(sys.executable).parent


def _convert(src: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / "vidlm", "convert", src, out], capture_output=True, text=True)


@pytest.mark.parametrize(
    ("pool_mode", "newline"),
    [("bilinear", "grid"), ("average", "grid"), ("max", "frame"), ("bilinear", "one_token"), ("average", "no_token")],
)
def test_converted_release_reproduces_the_reference_video_path(tmp_path, pool_mode, newline):
    from vidlm.models.convert import convert_checkpoint

    release = write_llava_video_release(tmp_path / "src", pool_mode, newline)
    ours = VidlmForConditionalGeneration.from_pretrained(convert_checkpoint(release, tmp_path / "out")).eval()
    config = ours.config
    assert config.compressor_config.pool_mode == pool_mode and config.vision_config.num_hidden_layers == 2
    assert pool_mode in config.origin and newline in config.origin

    t = 3
    pixels = torch.randn(t, 3, 28, 28)
    text_before, text_after = [5, 17, 99], [7, 8, 300, 2]
    n = config.num_visual_tokens(t)
    side = 4 if pool_mode == "bilinear" else 3  # 7 x 7 patches: ceil or floor of 7/2
    assert n == t * side * side + {"grid": t * side, "frame": t, "one_token": 1, "no_token": 0}[newline]
    expected = llava_next_reference_logits(release, [*text_before, IMAGE_TOKEN_INDEX, *text_after], pixels)
    ids = torch.tensor([[*text_before, *[config.video_token_index] * n, *text_after]])
    with torch.no_grad():
        got = ours(input_ids=ids, pixel_values_videos=pixels[None]).logits
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4
    # the comparison can fail: a different newline (or none) moves the logits well past the tolerance
    with torch.no_grad():
        ours.compressor.image_newline.add_(1.0) if newline != "no_token" else ours.projector.linear_2.bias.add_(1.0)
        moved = ours(input_ids=ids, pixel_values_videos=pixels[None]).logits
    assert (moved - expected).abs().max().item() > 1e-2


def test_placeholder_is_added_to_the_tokenizer_and_vidlm_model_says_which_config(tmp_path):
    from transformers import AutoTokenizer

    release = write_llava_video_release(tmp_path / "src")
    assert _convert(release, tmp_path / "out").returncode == 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert tokenizer.convert_tokens_to_ids("<video>") == config["video_token_index"] == len(tokenizer) - 1
    assert config["video_token_index"] < config["text_config"]["vocab_size"]
    info = subprocess.run(
        [BIN / "vidlm", "model", tmp_path / "out", "--json", "--frames", "64"], capture_output=True, text=True
    )
    assert info.returncode == 0, info.stderr
    shown = json.loads(info.stdout)
    assert shown["compressor"]["pool_mode"] == "bilinear" and "LLaVA-Video release" in shown["origin"]
    assert shown["visual_tokens"] == 64 * (4 * 4 + 4)  # 7x7 -> 4x4 bilinear, a newline per row


def test_release_fields_it_cannot_reproduce_are_refused_by_name(tmp_path):
    from vidlm.models.convert import convert_checkpoint

    release = write_llava_video_release(tmp_path / "src")
    config = json.loads((release / "config.json").read_text())
    for field, value in (
        ("add_faster_video", True),
        ("mm_spatial_pool_mode", "conv"),
        ("mm_projector_type", "linear"),
        ("mm_vision_tower", "some/clip-tower"),
    ):
        (release / "config.json").write_text(json.dumps(config | {field: value}))
        with pytest.raises(ValueError, match=field):
            convert_checkpoint(release, tmp_path / f"out-{field}")
        assert not (tmp_path / f"out-{field}").exists()
    run = _convert(release, tmp_path / "out-cli")  # the command line: exit 2 with the field named
    assert run.returncode == 2 and "mm_vision_tower" in run.stdout + run.stderr


def test_convert_help_names_every_layout():
    run = subprocess.run([BIN / "vidlm", "convert", "--help"], capture_output=True, text=True, env={"COLUMNS": "300"})
    for layout in ("pllava", "llava-next-video", "llava-video"):
        assert layout in run.stdout
