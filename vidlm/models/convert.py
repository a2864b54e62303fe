"""Bring released checkpoints into the vidlm format (``vidlm convert SRC OUT``).

Two layouts are read:

- **PLLaVA** (``PllavaForConditionalGeneration``, magic-research/PLLaVA): ``vision_tower.vision_model.*``
  (CLIPVisionModel), ``multi_modal_projector.linear_{1,2}.*``, and the LLM either plain
  (``language_model.model.*``, ``language_model.lm_head.*``) or wrapped by peft as PLLaVA trains it
  (``language_model.base_model.model.*`` with ``*.base_layer.weight`` and ``lora_A/lora_B.default.weight``).
  ``config.json`` gives ``pooling_shape``, ``num_frames`` and ``image_token_index`` (PLLaVA writes the video
  placeholder as ``<image>``). A separate peft directory (PLLaVA's ``lora_dir``) is read too.
- **llava-hf LLaVA-NeXT-Video** (``LlavaNextVideoForConditionalGeneration``), in the layout before
  transformers 4.52 (``vision_tower.*``, ``multi_modal_projector.*``, ``language_model.model.*``) and after
  it (``model.vision_tower.*``, ``model.multi_modal_projector.*``, ``model.language_model.*``, ``lm_head.*``).
  Its ``AvgPool2d(spatial_pool_stride)`` before the projector is SlowFast with every frame slow,
  ``p = stride``, and ``pool_before_projector``.

The output is a vidlm model directory (``config.json``, safetensors shards by huggingface_hub, the
tokenizer files copied) and, when LoRA weights were found, a peft adapter in ``OUT/adapter`` with
``r`` read from the weights and ``alpha`` given (PLLaVA trains at 32); ``vidlm merge --alpha 4`` then
gives PLLaVA's post-training mix (PLLaVA §3.4).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file

from vidlm.models.lora import ADAPTER_DIR, LoraSettings, lora_config
from vidlm.models.presets import PLLAVA_POOLING_SHAPE
from vidlm.models.video_llm import CLIP_MEAN, CLIP_STD, VidlmConfig

__all__ = ["convert_checkpoint", "detect_layout"]

Layout = Literal["pllava", "llava-next-video"]
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
)
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


def detect_layout(src: Path) -> Layout:
    """Which layout ``src/config.json`` describes.

    Raises:
        ValueError: neither PLLaVA nor LLaVA-NeXT-Video.
    """
    config = json.loads((src / "config.json").read_text())
    archs = config.get("architectures") or []
    if "PllavaForConditionalGeneration" in archs or "pooling_shape" in config:
        return "pllava"
    if config.get("model_type") == "llava_next_video" or "LlavaNextVideoForConditionalGeneration" in archs:
        return "llava-next-video"
    raise ValueError(f"{src}: neither a PLLaVA nor a LLaVA-NeXT-Video checkpoint (architectures={archs})")


def _read_weights(src: Path) -> dict[str, torch.Tensor]:
    files = sorted(p for p in src.glob("*.safetensors") if not p.name.startswith("adapter_"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {src}")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(f))
    return weights


def _rename(key: str, layout: Layout) -> str | None:
    """A source key -> vidlm key (``None``: dropped)."""
    if layout == "llava-next-video":
        for old, new in (
            ("model.vision_tower.", "vision_tower."),
            ("model.multi_modal_projector.", "projector."),
            ("model.language_model.", "language_model.model."),
            ("lm_head.", "language_model.lm_head."),
        ):
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        if "image_newline" in key:
            return None  # images only
    key = key.replace("multi_modal_projector.", "projector.", 1) if key.startswith("multi_modal_projector.") else key
    key = key.replace("language_model.base_model.model.", "language_model.", 1)  # PLLaVA's peft wrapper
    key = key.replace(".base_layer.", ".")
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        key = "vision_tower.vision_model." + key[len("vision_tower.") :]  # transformers 5 CLIPVisionModel names
    return key


def _vidlm_config(src_config: dict, layout: Layout, image_mean, image_std) -> VidlmConfig:
    common = {
        "vision_config": src_config["vision_config"],
        "text_config": src_config["text_config"],
        "vision_feature_layer": src_config.get("vision_feature_layer", -2),
        "image_mean": image_mean,
        "image_std": image_std,
    }
    if layout == "pllava":
        return VidlmConfig(
            **common,
            compressor={
                "kind": "pllava",
                "pooling_shape": tuple(src_config.get("pooling_shape", PLLAVA_POOLING_SHAPE)),
            },
            sampling={"mode": "uniform", "num_frames": src_config.get("num_frames", 16)},
            video_token="<image>",
            video_token_index=src_config.get("image_token_index", 32000),
        )
    if src_config.get("spatial_pool_mode", "average") != "average":
        raise ValueError(f"only average spatial pooling converts, got {src_config['spatial_pool_mode']!r}")
    return VidlmConfig(
        **common,
        compressor={"kind": "slowfast", "slow_stride": 1, "slow_pool": src_config.get("spatial_pool_stride", 2)},
        pool_before_projector=True,
        sampling={"mode": "uniform", "num_frames": 32},
        video_token="<video>",
        video_token_index=src_config.get("video_token_index", src_config.get("video_token_id", 32000)),
    )


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    layout: Layout | Literal["auto"] = "auto",
    lora_alpha: float = 32.0,
    lora_dir: str | Path | None = None,
) -> Path:
    """Convert a PLLaVA or llava-hf LLaVA-NeXT-Video checkpoint directory into a vidlm model directory.

    Args:
        src: the released checkpoint (``config.json`` + ``*.safetensors`` + tokenizer files).
        out: the vidlm directory to write.
        layout: ``auto`` reads it from ``config.json``.
        lora_alpha: alpha of the LoRA weights found (not stored by PLLaVA; it trains at 32).
        lora_dir: a separate peft adapter directory for the LLM (PLLaVA's ``lora_dir``).

    Returns:
        ``out``.

    Raises:
        FileNotFoundError: no weights.
        ValueError: unknown layout, unsupported pooling, or a weight with no place in the vidlm model.
    """
    from huggingface_hub import save_torch_state_dict

    from vidlm.models.video_llm import VidlmForConditionalGeneration

    src, out = Path(src), Path(out)
    layout = detect_layout(src) if layout == "auto" else layout
    src_config = json.loads((src / "config.json").read_text())
    pre = (
        json.loads((src / "preprocessor_config.json").read_text())
        if (src / "preprocessor_config.json").is_file()
        else {}
    )
    config = _vidlm_config(src_config, layout, pre.get("image_mean", CLIP_MEAN), pre.get("image_std", CLIP_STD))

    base: dict[str, torch.Tensor] = {}
    lora: dict[str, torch.Tensor] = {}
    sources = [(k, v, "") for k, v in _read_weights(src).items()]
    if lora_dir is not None:
        adapter = load_file(Path(lora_dir) / "adapter_model.safetensors")
        sources += [(k.replace("base_model.model.", "", 1), v, "language_model.") for k, v in adapter.items()]
    for key, tensor, prefix in sources:
        if (m := _LORA.match(key)) is not None:
            module = _rename(prefix + m["module"], layout)
            lora[f"base_model.model.{module}.lora_{m['ab']}.weight"] = tensor
            continue
        new = _rename(prefix + key, layout)
        if new is not None:
            base[new] = tensor

    with torch.device("meta"):
        expected = set(VidlmForConditionalGeneration(config).state_dict())
    unknown = sorted(set(base) - expected)
    if unknown:
        raise ValueError(f"{len(unknown)} weights have no place in the vidlm model, e.g. {unknown[:3]}")
    out.mkdir(parents=True, exist_ok=True)
    config.architectures = ["VidlmForConditionalGeneration"]
    config.save_pretrained(out)
    save_torch_state_dict(base, out, max_shard_size="5GB")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    if lora:
        r = next(v.shape[0] for k, v in lora.items() if k.endswith("lora_A.weight"))
        targets = sorted({k.split(".lora_")[0].rsplit(".", 1)[1] for k in lora})
        lora_config(LoraSettings(r=r, alpha=lora_alpha, target_modules=tuple(targets))).save_pretrained(
            out / ADAPTER_DIR
        )
        save_torch_state_dict(lora, out / ADAPTER_DIR, filename_pattern="adapter_model{suffix}.safetensors")
    return out
