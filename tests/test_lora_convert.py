"""LoRA (what trains, alpha merge) and checkpoint conversion from PLLaVA and llava-hf layouts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from harness import write_pllava_config
from safetensors.torch import load_file, save_file

from vidlm.models.lora import LoraSettings, TrainableConfig, apply_trainable, merge_lora
from vidlm.models.presets import build_preset
from vidlm.models.video_llm import VidlmForConditionalGeneration

BIN = Path(sys.executable).parent
Q = "language_model.model.layers.0.self_attn.q_proj"


def _trained_lora(tmp_path, r=4, alpha=32.0):
    model, tokenizer = build_preset("tiny")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    peft_model = apply_trainable(model, TrainableConfig(lora=LoraSettings(r=r, alpha=alpha)))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the update non-trivial
            torch.nn.init.normal_(p, std=0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    return peft_model.state_dict()


def test_what_trains_is_configuration(tmp_path):
    model, _ = build_preset("tiny")
    peft_model = apply_trainable(model, TrainableConfig(lora=LoraSettings(r=4)))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("q_proj.lora_A" in n for n in trainable) and any("v_proj.lora_B" in n for n in trainable)
    assert not any("k_proj" in n or "vision_tower" in n for n in trainable)
    assert any("projector" in n for n in trainable)
    assert not any(n.endswith("q_proj.base_layer.weight") for n in trainable)

    model, _ = build_preset("tiny")
    full = apply_trainable(model, TrainableConfig(vision_tower="full", projector="frozen", llm="frozen"))
    assert all(p.requires_grad == n.startswith("vision_tower.") for n, p in full.named_parameters())

    model, _ = build_preset("tiny", {"visual_position_embedding": True})  # the connector trains as the projector
    peft_model = apply_trainable(model, TrainableConfig(lora=LoraSettings(r=4)))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("visual_position_embedding" in n for n in trainable)
    peft_model.save_pretrained(tmp_path)  # and is saved in the adapter, beside the LoRA weights
    assert any("visual_position_embedding" in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    model, _ = build_preset("tiny", {"visual_position_embedding": True})
    frozen = apply_trainable(model, TrainableConfig(projector="frozen", llm="full"))
    assert not frozen.visual_position_embedding.weight.requires_grad

    model, _ = build_preset("tiny", {"tie_word_embeddings": False, "text_config.tie_word_embeddings": False})
    kept = apply_trainable(model, TrainableConfig(llm="full", freeze_input_embeddings=True))
    trainable = {n for n, p in kept.named_parameters() if p.requires_grad}
    assert "language_model.lm_head.weight" in trainable and any("q_proj" in n for n in trainable)
    assert not kept.language_model.get_input_embeddings().weight.requires_grad
    with pytest.raises(ValueError, match="freeze_input_embeddings needs llm: full"):
        TrainableConfig(llm="lora", freeze_input_embeddings=True)


@pytest.mark.parametrize("alpha", [4.0, 32.0])
def test_merged_weights_equal_w0_plus_scaled_ba(tmp_path, alpha):
    r = 4
    sd = _trained_lora(tmp_path / "m", r=r)
    merged = VidlmForConditionalGeneration.from_pretrained(merge_lora(tmp_path / "m", tmp_path / "out", alpha=alpha))
    base = VidlmForConditionalGeneration.from_pretrained(tmp_path / "m")
    a = sd[f"base_model.model.{Q}.lora_A.default.weight"]
    b = sd[f"base_model.model.{Q}.lora_B.default.weight"]
    expected = base.state_dict()[f"{Q}.weight"] + (alpha / r) * b @ a  # PLLaVA §3.4
    assert torch.allclose(merged.state_dict()[f"{Q}.weight"], expected, atol=1e-6)
    assert not torch.allclose(expected, base.state_dict()[f"{Q}.weight"])


def test_vidlm_merge_command(tmp_path):
    _trained_lora(tmp_path / "m")
    run = subprocess.run(
        [BIN / "vidlm", "merge", tmp_path / "m", tmp_path / "out", "--alpha", "4"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out" / "config.json").is_file() and (tmp_path / "out" / "tokenizer.json").is_file()
    bad = subprocess.run([BIN / "vidlm", "merge", tmp_path / "out", tmp_path / "x"], capture_output=True, text=True)
    assert bad.returncode == 2 and "no LoRA adapter" in bad.stderr + bad.stdout


def _llava_next_video(tmp_path):
    from transformers import AutoTokenizer, LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    from vidlm.models._builders import add_video_token, smollm2_dir, vision_config
    from vidlm.models.presets import preset_config

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    video_id = add_video_token(tokenizer, "<video>")
    text = preset_config("tiny").text_config.to_dict() | {"vocab_size": len(tokenizer)}
    config = LlavaNextVideoConfig(
        vision_config=vision_config("clip_vision_model", 64, 8, 32, 2, 2, 64).to_dict(),
        text_config=text,
        video_token_index=video_id,
        image_token_index=0,
        spatial_pool_stride=2,
    )
    torch.manual_seed(0)
    ref = LlavaNextVideoForConditionalGeneration(config).eval()
    ref.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return ref, video_id


@pytest.mark.parametrize("layout", ["legacy", "transformers>=4.52"])
def test_llava_next_video_conversion_matches_llava_hf_logits(tmp_path, layout):
    ref, video_id = _llava_next_video(tmp_path / "src")
    weights = load_file(tmp_path / "src" / "model.safetensors")
    assert "language_model.model.embed_tokens.weight" in weights  # the layout released checkpoints use
    if layout != "legacy":  # rewrite with the names of checkpoints saved after transformers 4.52
        renamed = {}
        for k, v in weights.items():
            for old, new in (
                ("language_model.model.", "model.language_model."),
                ("language_model.lm_head.", "lm_head."),
                ("vision_tower.", "model.vision_tower."),
                ("multi_modal_projector.", "model.multi_modal_projector."),
                ("image_newline", "model.image_newline"),
            ):
                if k.startswith(old):
                    k = new + k[len(old) :]
                    break
            renamed[k] = v.contiguous()
        save_file(renamed, tmp_path / "src" / "model.safetensors")
    run = subprocess.run([BIN / "vidlm", "convert", tmp_path / "src", tmp_path / "out"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    ours = VidlmForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    assert ours.config.compressor_config.kind == "slowfast" and ours.config.pool_before_projector

    t = 3
    pixels = torch.randn(1, t, 3, 64, 64)
    ids = torch.tensor([[5, 6] + [video_id] * ours.config.num_visual_tokens(t) + [7, 8]])
    with torch.no_grad():
        expected = ref(input_ids=ids, pixel_values_videos=pixels).logits
        got = ours(input_ids=ids, pixel_values_videos=pixels).logits
    assert torch.allclose(got, expected, atol=1e-5)


def test_pllava_conversion_with_peft_lora_keys(tmp_path):
    """A checkpoint with PllavaForConditionalGeneration's names, the LLM wrapped by peft as PLLaVA trains it."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = build_preset("tiny")
    r = 8
    llm = get_peft_model(model.language_model, LoraConfig(r=r, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    for name, p in llm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    tower = model.vision_tower.state_dict()
    weights = {f"vision_tower.{k}": v for k, v in tower.items() if k.startswith("vision_model.")}  # CLIPVisionModel
    weights |= {f"multi_modal_projector.{k}": v for k, v in model.projector.state_dict().items()}
    weights |= {f"language_model.{k}": v.clone() for k, v in llm.state_dict().items()}
    assert f"language_model.base_model.model.{Q[len('language_model.') :]}.base_layer.weight" in weights
    assert f"language_model.base_model.model.{Q[len('language_model.') :]}.lora_A.default.weight" in weights
    src = tmp_path / "pllava"
    src.mkdir()
    save_file(weights, src / "model.safetensors")
    tokenizer.save_pretrained(src)
    write_pllava_config(src, model.config)
    out = tmp_path / "vidlm"
    run = subprocess.run([BIN / "vidlm", "convert", src, out], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (out / "adapter" / "adapter_config.json").is_file()
    converted = VidlmForConditionalGeneration.from_pretrained(out)
    inner = Q[len("language_model.") :]
    w0 = weights[f"language_model.base_model.model.{inner}.base_layer.weight"]
    assert torch.equal(converted.state_dict()[f"{Q}.weight"], w0)
    assert torch.equal(converted.projector.linear_1.weight, model.projector.linear_1.weight)
    assert converted.config.compressor_config.pooling_shape == (4, 4, 4)

    merged = VidlmForConditionalGeneration.from_pretrained(merge_lora(out, tmp_path / "merged", alpha=4))
    a = weights[f"language_model.base_model.model.{inner}.lora_A.default.weight"]
    b = weights[f"language_model.base_model.model.{inner}.lora_B.default.weight"]
    assert torch.allclose(merged.state_dict()[f"{Q}.weight"], w0 + (4 / r) * b @ a, atol=1e-6)
