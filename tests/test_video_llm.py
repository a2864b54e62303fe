"""The transformers video LLM: presets' token arithmetic, save/load, placeholders, the smol default."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vidlm.models.compressors import VisualMotion
from vidlm.models.presets import PRESETS, build_preset, preset_config
from vidlm.models.processing import expand_video_tokens, preprocess_frames
from vidlm.models.video_llm import VidlmConfig, VidlmForConditionalGeneration


@pytest.mark.parametrize(
    ("name", "tokens"),
    [
        ("pllava-7b", 16 * 12 * 12),  # PLLaVA §4.1: "16 x 12 x 12 x d"
        ("pllava-34b", 16 * 12 * 12),
        ("llava-video-7b", 64 * 169),  # Table 4: 64 frames at M/p^2 = 169
        ("llava-video-72b", 21 * 169 + 43 * 36),  # V = (64, 729, 3, 2) from the pooled grids (README)
        ("topa-llama2-7b", 10),  # TOPA: one feature per frame, 10 frames
    ],
)
def test_paper_presets_token_counts(name, tokens):
    config = preset_config(name)
    assert config.num_visual_tokens(config.sampling_config.max_frames_per_clip()) == tokens


PROMPT_ROOM = 256
"""Text tokens a preset's context must hold besides its visual tokens (a recaption prompt and a caption)."""


@pytest.mark.parametrize("name", [n for n in PRESETS if not n.startswith(("tiny", "smol"))])
def test_paper_presets_hold_their_visual_tokens_and_a_prompt(name):
    config = preset_config(name)
    frames = config.sampling_config.max_frames_per_clip()
    context = config.text_config.max_position_embeddings
    assert context >= config.num_visual_tokens(frames) + PROMPT_ROOM
    # the released LLMs' own context: Vicuna v1.5, Llama-2 and Yi-34B 4096, Qwen2 32768
    assert context == (32768 if config.text_config.model_type == "qwen2" else 4096)
    assert config.video_token_index < config.text_config.vocab_size


def test_pllava_34b_placeholder_is_llava_next_34b_s():
    # Yi-34B's 64,000-token vocabulary: 32000 is an ordinary token; llava-v1.6-34b-hf puts <image> at 64000
    config = preset_config("pllava-34b")
    assert (config.video_token, config.video_token_index, config.text_config.vocab_size) == ("<image>", 64000, 64064)


def test_every_preset_builds_its_config_and_unknown_names_fail():
    for name in PRESETS:
        preset_config(name).validate_parts()
    with pytest.raises(ValueError, match="known: pllava-7b"):
        preset_config("pllava-8b")
    with pytest.raises(ValueError, match="vidlm convert"):
        build_preset("pllava-7b")


def test_a_materialised_model_another_process_finished_first_is_kept(tmp_path):
    """``write_once`` of a directory that another process renamed into place while this one wrote its own: the
    first one stays, this one's copy is discarded; a failed write leaves nothing behind."""
    from vidlm.models._builders import write_once

    out = tmp_path / "models" / "m"

    def write_while_another_finishes(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text('{"mine": true}')
        out.mkdir(parents=True)
        (out / "config.json").write_text('{"first": true}')

    assert write_once(out, write_while_another_finishes) == out
    assert (out / "config.json").read_text() == '{"first": true}'
    assert [p.name for p in out.parent.iterdir()] == ["m"]
    assert write_once(out, lambda tmp: pytest.fail("a finished directory is not written again")) == out

    def fail(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_once(tmp_path / "other", fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_build_overrides_change_fields_and_fields_of_a_part():
    base, _ = build_preset("tiny")
    model, _ = build_preset("tiny", {"compressor": {"kind": "mean"}, "text_config.initializer_range": 0.02})
    assert model.config.compressor_config.kind == "mean" and model.config.text_config.initializer_range == 0.02
    narrow = model.language_model.model.layers[0].mlp.up_proj.weight.std().item()
    wide = base.language_model.model.layers[0].mlp.up_proj.weight.std().item()
    assert narrow == pytest.approx(0.02, rel=0.1) and wide == pytest.approx(0.2, rel=0.1)


def test_contradictory_parts_are_rejected():
    with pytest.raises(ValueError, match="topa_linear"):
        VidlmConfig(vision_config={"model_type": "clip_vision_model"}, compressor={"kind": "global"})


@pytest.mark.parametrize("value", ["false", True, 1, ["clip"], "frame", "difference"])
def test_center_visual_tokens_must_be_a_known_centering(value):
    with pytest.raises(ValueError, match="center_visual_tokens must be null, 'clip', 'frames', 'differences'"):
        VidlmConfig(vision_config={"model_type": "clip_vision_model"}, center_visual_tokens=value)


@pytest.mark.parametrize("name", ["visual_position_embedding", "visual_summary_token", "visual_motion"])
@pytest.mark.parametrize("value", ["true", 1, None, [True]])
def test_patch_options_must_be_a_bool_of_a_patch_model(name, value):
    with pytest.raises(ValueError, match=f"{name} must be true or false"):
        VidlmConfig(vision_config={"model_type": "clip_vision_model"}, **{name: value})
    with pytest.raises(ValueError, match=f"{name} needs a patch grid"):
        VidlmConfig(
            vision_config={"model_type": "clip_vision_model"},
            compressor={"kind": "global"},
            projector="topa_linear",
            **{name: True},
        )


def test_the_summary_token_is_the_projector_of_the_clip_s_largest_patch_features(tmp_path):
    """One token more per clip, last, after the centring: the vector the ``words`` recipe trains
    (the projector of the maximum of the tower's patch features over the clip), counted by the config and the
    processor alike."""
    from vidlm.models.processing import VidlmProcessor

    model, tokenizer = build_preset("tiny", {"center_visual_tokens": "clip", "visual_summary_token": True})
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = VidlmForConditionalGeneration.from_pretrained(tmp_path).eval()
    config = loaded.config
    assert config.visual_summary_token is True
    plain = VidlmConfig.from_pretrained(tmp_path)
    plain.visual_summary_token = False
    count = config.num_visual_tokens(4)
    assert count == plain.num_visual_tokens(4) + 1
    assert VidlmProcessor.from_pretrained(tmp_path).num_visual_tokens(4) == count
    frames = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    clip = loaded.preprocess(frames)
    with torch.no_grad():
        tokens = loaded.get_video_features([clip])[0]
        _, patches = loaded.vision_tower(clip)  # (T, h, w, Dv)
        summary = loaded.projector(patches.flatten(0, -2).max(dim=0).values)
        config.visual_summary_token = False
        rest = loaded.get_video_features([clip])[0]
    assert tokens.shape == (count, config.text_config.hidden_size)
    assert torch.allclose(tokens[-1], summary, atol=1e-5)  # not centred
    assert torch.allclose(tokens[:-1], rest, atol=1e-6)  # the clip's other tokens as without it
    assert rest.mean(0).abs().max() < 1e-5 and summary.abs().max() > 1e-3


def test_the_motion_is_where_each_channel_s_peak_went():
    """A channel whose features peak on the left edge in the first frame and on the right edge in the last moves by
    +2 in x (the grid spans -1 to 1); one that stays put moves by 0; the frames between do not count; reversed
    frames reverse the motion."""
    motion = VisualMotion((3, 5), dim=2, out_dim=4)
    with torch.no_grad():
        motion.linear.weight.copy_(torch.eye(4))  # reads the displacement (x of each channel, then y)
        motion.linear.bias.zero_()
    x = torch.zeros(3, 3, 5, 2)  # (T, h, w, Dv)
    x[0, 1, 0, 0] = x[-1, 1, 4, 0] = 50.0  # channel 0: row 1, from column 0 to column 4
    x[1, 2, 2, 0] = 50.0  # ... and elsewhere in between
    x[:, 0, 2, 1] = 50.0  # channel 1: row 0, column 2 throughout
    with torch.no_grad():
        moved = motion(x)
        back = motion(x.flip(0))
    assert torch.allclose(moved, torch.tensor([2.0, 0.0, 0.0, 0.0]), atol=1e-4), moved
    assert torch.allclose(back, -moved, atol=1e-4)
    with pytest.raises(ValueError, match=r"expected patch features \(T, 3, 5, 2\)"):
        motion(torch.zeros(3, 5, 3, 2))


def test_the_summary_token_adds_the_motion_of_the_clip_s_patch_features(tmp_path):
    """With ``visual_motion`` the summary token is the projector of the clip's largest patch features plus their
    motion (saved and loaded with the model); the clip's token count and its other tokens are as without it."""
    from vidlm.models.processing import VidlmProcessor

    overrides = {"center_visual_tokens": "clip", "visual_summary_token": True, "visual_motion": True}
    model, tokenizer = build_preset("tiny", overrides)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = VidlmForConditionalGeneration.from_pretrained(tmp_path).eval()
    config = loaded.config
    assert torch.equal(loaded.visual_motion.linear.weight, model.visual_motion.linear.weight)
    plain = VidlmConfig.from_pretrained(tmp_path)
    plain.visual_motion = False
    count = config.num_visual_tokens(4)
    assert count == plain.num_visual_tokens(4) == VidlmProcessor.from_pretrained(tmp_path).num_visual_tokens(4)
    clip = loaded.preprocess(np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8))
    with torch.no_grad():
        tokens = loaded.get_video_features([clip])[0]
        _, patches = loaded.vision_tower(clip)  # (T, h, w, Dv)
        summary = loaded.projector(patches.flatten(0, -2).max(dim=0).values)
        motion = loaded.visual_motion(patches)
        loaded.visual_motion = None
        rest = loaded.get_video_features([clip])[0]
    assert tokens.shape == (count, config.text_config.hidden_size)
    assert torch.allclose(tokens[-1], summary + motion, atol=1e-5) and motion.abs().max() > 1e-3
    assert torch.allclose(tokens[:-1], rest[:-1], atol=1e-6) and torch.allclose(rest[-1], summary, atol=1e-5)


def test_preprocess_resizes_crops_and_normalises():
    frames = np.full((2, 40, 80, 3), 255, np.uint8)
    x = preprocess_frames(frames, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x, torch.ones_like(x))  # (1 - 0.5) / 0.5
    with pytest.raises(ValueError, match="uint8"):
        preprocess_frames(frames.astype(np.float32), 32, (0, 0, 0), (1, 1, 1))
    assert expand_video_tokens([1, 9, 2], 9, 3) == [1, 9, 9, 9, 2]
    with pytest.raises(ValueError, match="exactly one"):
        expand_video_tokens([1, 2], 9, 3)


def test_save_load_round_trip_and_generate(tmp_path):
    model, tokenizer = build_preset("tiny")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = VidlmForConditionalGeneration.from_pretrained(tmp_path).eval()
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    frames = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    n = loaded.config.num_visual_tokens(4)
    ids = torch.tensor(
        [expand_video_tokens([1, loaded.config.video_token_index, 2], loaded.config.video_token_index, n)]
    )
    pixels = loaded.preprocess(frames)[None]
    out = loaded.generate(input_ids=ids, pixel_values_videos=pixels, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 5)
    with pytest.raises(ValueError, match="placeholders"):
        loaded(input_ids=ids[:, :-3], pixel_values_videos=pixels)


@pytest.mark.parametrize("variant", ["pllava", "topa", "mean"])
def test_the_words_loss_is_each_clip_s_summary_and_trains_the_tower_and_the_projector(tiny_models, variant):
    """``caption_words``: no LLM run; the loss is ``caption_word_loss`` of each clip's vector -- a patch model's
    projector of the maximum of the tower's patch features over frames and patches, plus their motion where the model
    has it, and for a model with region summaries (``mean``) their loss, each caption sentence matched to a region;
    for TOPA's ``global`` compressor
    the maximum over frames of their unit-norm pooled embeddings through its linear projector and temporal embedding
    (not projected onto the memory: TOPA eq. 2 is applied at inference, and passes no gradient) -- and it trains the
    tower and the projector."""
    from vidlm.models.caption_words import caption_word_loss, region_word_loss

    model = VidlmForConditionalGeneration.from_pretrained(tiny_models[variant]).train()
    rng = np.random.default_rng(0)
    clips = [model.preprocess(rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)) for n in (3, 2)]
    words = [torch.tensor([5, 9, 11]), torch.tensor([9, 20])]
    sentences, empty = [[torch.tensor([5, 9]), torch.tensor([9, 11])], [torch.tensor([9, 20])]], torch.tensor([30])
    loss = model(pixel_values_videos=clips, caption_words=words, caption_sentences=sentences, empty_words=empty).loss
    with torch.no_grad():
        inputs = []
        for clip in clips:
            pooled, patches = model.vision_tower(clip)
            if variant != "topa":
                inputs.append(patches.flatten(0, -2).max(dim=0).values)
                continue
            unit = pooled / pooled.norm(dim=-1, keepdim=True)  # (T, D)
            tokens = unit @ model.projector.proj.weight.T + model.projector.proj.bias  # (T, Dl)
            tokens = tokens + model.projector.temporal_embedding.weight[: len(clip)]  # TOPA's temporal embedding
            inputs.append(tokens.max(dim=0).values)
        vectors = torch.stack(inputs)
        if variant != "topa":
            vectors = model.projector(vectors)
        if variant == "mean":
            vectors = vectors + torch.stack([model.visual_motion(model.vision_tower(c)[1]) for c in clips])
        expected = caption_word_loss(vectors, words, model.get_input_embeddings())
        if variant == "mean":
            regions = torch.stack([model.visual_regions(model.vision_tower(c)[1], model.projector) for c in clips])
            expected = expected + region_word_loss(regions, sentences, empty, model.get_input_embeddings())
    assert torch.isclose(loss, expected, rtol=1e-4), (loss, expected)
    loss.backward()
    for part in [model.vision_tower, model.projector] + [model.visual_motion, model.visual_regions] * (
        variant == "mean"
    ):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()), part
    with pytest.raises(ValueError, match="pixel_values_videos"):
        model(video_features=[torch.zeros(3, 8)], caption_words=words)
    if variant == "mean":
        with pytest.raises(ValueError, match="region summaries need the captions' sentences"):
            model(pixel_values_videos=clips, caption_words=words)


def test_topa_modality_projection_is_applied_at_inference(tiny_models):
    model = VidlmForConditionalGeneration.from_pretrained(tiny_models["topa"]).eval()
    pixels = model.preprocess(np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8))
    with torch.no_grad():
        projected = model.get_video_features(pixels[None])[0]
        memory = model.modality_memory.clone()
        model.modality_memory = None
        raw = model.get_video_features(pixels[None])[0]
    assert projected.shape == raw.shape == (3, model.config.text_config.hidden_size)
    assert not torch.allclose(projected, raw)
    assert memory.abs().sum() > 0  # the memory was saved and loaded with the weights


def test_centred_visual_tokens_are_the_tokens_less_their_clip_mean(tmp_path):
    model, tokenizer = build_preset("tiny", overrides={"center_visual_tokens": "clip"})
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = VidlmForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.center_visual_tokens == "clip"
    clips = [np.random.default_rng(s).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8) for s in (0, 1)]
    clips[1][:, 20:40, 20:40] = (220, 40, 40)  # an object on the second clip
    with torch.no_grad():
        centred = loaded.get_video_features([loaded.preprocess(f) for f in clips])
        loaded.config.center_visual_tokens = None
        raw = loaded.get_video_features([loaded.preprocess(f) for f in clips])
    for c, r in zip(centred, raw, strict=True):
        assert c.shape == r.shape == (loaded.config.num_visual_tokens(4), loaded.config.text_config.hidden_size)
        assert torch.allclose(c.mean(0), torch.zeros_like(c[0]), atol=1e-5)  # each clip on its own
        assert torch.allclose(c, r - r.mean(0), atol=1e-6)
        assert r.mean(0).abs().max() > 1e-3  # there was a shared part to remove


@pytest.mark.parametrize("tied", [True, False])
def test_the_llm_s_own_tying_of_its_embeddings_is_the_model_s(tied, tmp_path):
    model, tokenizer = build_preset("tiny", overrides={"text_config.tie_word_embeddings": tied})
    assert model.config.tie_word_embeddings is tied
    same = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert same is tied
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is tied
    loaded = VidlmForConditionalGeneration.from_pretrained(tmp_path)
    assert (loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight) is tied
    assert torch.equal(loaded.get_output_embeddings().weight, model.get_output_embeddings().weight)


@pytest.mark.slow
def test_smol_generates_fluent_text():
    from vidlm.models.presets import resolve_model

    path = resolve_model("smol")
    model = VidlmForConditionalGeneration.from_pretrained(path).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text

    frames = np.random.default_rng(0).integers(0, 256, (8, 120, 160, 3), dtype=np.uint8)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "<video>\nDescribe the video."}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    vid = model.config.video_token_index
    full = torch.tensor([expand_video_tokens(prompt_ids, vid, model.config.num_visual_tokens(8))])
    out = model.generate(
        input_ids=full, pixel_values_videos=model.preprocess(frames)[None], max_new_tokens=24, do_sample=False
    )
    caption = tokenizer.decode(out[0, full.shape[1] :], skip_special_tokens=True)
    words = caption.split()
    assert len(words) >= 5 and sum(w.strip(".,").isalpha() for w in words) >= 0.8 * len(words), caption


def test_siglip_tower_has_no_cls_and_gives_the_full_grid():
    from vidlm.models._builders import vision_config
    from vidlm.models.vision_tower import HFVisionTower

    torch.manual_seed(0)
    tower = HFVisionTower(vision_config("siglip_vision_model", 56, 14, 32, 2, 2, 64), feature_layer=-1).eval()
    with torch.no_grad():
        pooled, patches = tower(torch.randn(3, 3, 56, 56))
        hidden = tower.vision_model(torch.randn(1, 3, 56, 56), output_hidden_states=True).hidden_states[-1]
    assert pooled.shape == (3, 32) and patches.shape == (3, 4, 4, 32)
    assert hidden.shape[1] == 16  # 4x4 patches, no CLS token to drop
    with pytest.raises(ValueError, match="pixel_values"):
        tower(torch.randn(1, 3, 64, 64))


def test_auto_classes_load_a_vidlm_directory_without_remote_code(tiny_models):
    """``AutoModelForImageTextToText`` / ``AutoProcessor`` give the vidlm classes, and the processor's inputs are
    the ones the model's own path builds (prompt ids with the placeholder expanded, preprocessed frames)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vidlm.models.processing import VidlmProcessor, video_prompt_ids

    path = tiny_models["pllava"]
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert isinstance(model, VidlmForConditionalGeneration) and isinstance(processor, VidlmProcessor)
    c = model.config
    ids = video_prompt_ids(processor.tokenizer, "Describe the video.", c.video_token, c.video_token_index, None)
    text = processor.tokenizer.decode(ids)
    frames = np.random.default_rng(0).integers(0, 256, (3, 50, 70, 3), dtype=np.uint8)
    inputs = processor(text=text, videos=frames)
    assert inputs["input_ids"][0].tolist() == expand_video_tokens(ids, c.video_token_index, c.num_visual_tokens(3))
    torch.testing.assert_close(inputs["pixel_values_videos"][0], model.preprocess(frames))
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 3)
    with pytest.raises(ValueError, match="one video per prompt"):
        processor(text=[text, text], videos=frames)
    with pytest.raises(ValueError, match="no video was given"):
        processor(text=text)
    with pytest.raises(ValueError, match="exactly one video placeholder"):
        processor(text=text + text, videos=frames)
    with pytest.raises(ValueError, match="uint8"):
        processor(text=text, videos=frames.astype(np.float32))
    with pytest.raises(ValueError, match="same number of frames"):
        processor(text=[text, text], videos=[frames, frames[:2]])
    assert processor(text="no video here")["input_ids"].shape[0] == 1


def test_frame_centred_tokens_keep_only_what_changes_between_frames(tmp_path):
    grid = build_preset("tiny")[0].config.compressor_config.grid[0]
    every_patch = {"kind": "pllava", "pooling_shape": (4, grid, grid)}  # a token per patch and frame
    model, tokenizer = build_preset("tiny", overrides={"center_visual_tokens": "frames", "compressor": every_patch})
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = VidlmForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.center_visual_tokens == "frames"
    still = np.repeat(np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8), 4, axis=0)
    moving = still.copy()
    for t in range(4):  # an object moving right over the same background
        moving[t, 20:36, 8 + 12 * t : 24 + 12 * t] = (220, 40, 40)
    with torch.no_grad():
        centred = loaded.get_video_features([loaded.preprocess(f) for f in (still, moving)])
        loaded.config.center_visual_tokens = None
        raw = loaded.get_video_features([loaded.preprocess(f) for f in (still, moving)])
    width = loaded.config.text_config.hidden_size
    assert centred[0].shape == raw[0].shape == (4 * grid * grid, width)
    assert centred[0].abs().max() < 1e-5  # nothing moves: nothing is left
    by_frame = raw[1].reshape(4, grid * grid, width)
    assert torch.allclose(centred[1], (by_frame - by_frame.mean(0)).reshape(-1, width), atol=1e-5)
    change = centred[1].reshape(4, grid, grid, width).norm(dim=-1).amax(0)  # (grid, grid): most over frames
    path = change[20 * grid // 64 : 36 * grid // 64 + 1]  # the patch rows the object crosses
    rest = torch.cat([change[: 20 * grid // 64], change[36 * grid // 64 + 1 :]])
    assert path.mean() > 3 * rest.mean(), (path.mean(), rest.mean())  # the tower's attention spreads a little


def test_frame_differences_with_position_embeddings_carry_where_an_object_went(tmp_path):
    grid = build_preset("tiny")[0].config.compressor_config.grid[0]
    every_patch = {"kind": "pllava", "pooling_shape": (4, grid, grid)}  # a token per patch and frame
    overrides = {"center_visual_tokens": "differences", "visual_position_embedding": True, "compressor": every_patch}
    model, tokenizer = build_preset("tiny", overrides=overrides)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = VidlmForConditionalGeneration.from_pretrained(tmp_path).eval()
    width = loaded.config.text_config.hidden_size
    embedding = loaded.visual_position_embedding.weight
    assert embedding.shape == (grid, grid, width) and embedding.std() > 0.01  # saved and loaded
    assert torch.equal(embedding, model.visual_position_embedding.weight)
    still = np.repeat(np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8), 4, axis=0)
    right, left = still.copy(), still.copy()
    for t in range(4):  # an object moving right over the same background, and the same frames backwards
        right[t, 20:36, 8 + 12 * t : 24 + 12 * t] = (220, 40, 40)
        left[3 - t, 20:36, 8 + 12 * t : 24 + 12 * t] = (220, 40, 40)
    clips = [loaded.preprocess(f) for f in (still, right, left)]
    with torch.no_grad():
        tokens = [x.reshape(4, grid, grid, width) for x in loaded.get_video_features(clips)]
        loaded.config.center_visual_tokens, loaded.visual_position_embedding = None, None
        raw = [x.reshape(4, grid, grid, width) for x in loaded.get_video_features(clips)]
    assert torch.allclose(tokens[0], embedding.expand(4, -1, -1, -1), atol=1e-5)  # nothing moves: where, only
    for x, r in zip(tokens[1:], raw[1:], strict=True):
        assert torch.allclose(x[0], r[0] - r.mean(0) + embedding, atol=1e-5)  # the first frame less the mean
        assert torch.allclose(x[1:], r[1:] - r[:-1] + embedding, atol=1e-5)  # then the frame differences
    # the same frames backwards: the later frames' differences are the forward ones reversed and negated, so the
    # sense of the motion is in every one of them (frame centring gives both clips the same set of frames)
    assert torch.allclose(tokens[2][1:] - embedding, -(tokens[1][1:] - embedding).flip(0), atol=1e-5)
    assert (tokens[1][1:] - embedding).norm() > 1e-2
