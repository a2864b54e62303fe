"""Bring released checkpoints into the vidlm format (``vidlm convert SRC OUT``).

Three layouts are read (``vidlm convert --layout``):

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
- **LLaVA-Video** as lmms-lab releases it (``LLaVA-Video-7B-Qwen2``, ``LLaVA-Video-72B-Qwen2``: LLaVA-NeXT's
  ``LlavaQwenForCausalLM``, ``llava/model/language_model/llava_qwen.py``): the Qwen2 LLM at the top level
  (``model.embed_tokens``, ``model.layers.*``, ``model.norm``, ``lm_head``), the SigLIP tower under
  ``model.vision_tower.vision_tower.*`` (its last encoder layer deleted, as LLaVA-NeXT's ``SigLipVisionTower``
  does, so the patch features are the kept layers' output before the post-layernorm), the projector as
  ``model.mm_projector.{0,2}`` and the learned ``model.image_newline``. The ``mm_*`` fields of ``config.json``
  give the video path of ``llava/model/llava_arch.py``: ``mm_spatial_pool_mode`` (average / bilinear / max) and
  ``mm_spatial_pool_stride`` for ``get_2dPool`` after the projector, ``mm_newline_position`` (grid / frame /
  one_token / no_token) for the newline placement. The tower's own configuration comes from
  ``mm_vision_tower``: a local directory (its ``config.json`` and ``preprocessor_config.json``) or SigLIP
  so400m-patch14-384's, which the releases name. The prompt placeholder ``<video>`` is added to the tokenizer
  (LLaVA splices ``<image>`` at run time instead; the LLM never sees a token for it).

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

__all__ = ["LAYOUTS", "convert_checkpoint", "detect_layout"]

Layout = Literal["pllava", "llava-next-video", "llava-video"]
LAYOUTS: tuple[str, ...] = ("pllava", "llava-next-video", "llava-video")
"""Layouts ``vidlm convert`` reads."""

SIGLIP_SO400M = {
    "model_type": "siglip_vision_model",
    "hidden_size": 1152,
    "image_size": 384,
    "intermediate_size": 4304,
    "num_attention_heads": 16,
    "num_hidden_layers": 27,
    "patch_size": 14,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu_pytorch_tanh",
}
"""``google/siglip-so400m-patch14-384``, the tower every LLaVA-Video release names (``mm_vision_tower``)."""
NEWLINE_POSITIONS = {"grid": "grid", "frame": "frame", "one_token": "one_token", "no_token": "none"}
"""LLaVA-NeXT ``mm_newline_position`` -> :class:`~vidlm.models.compressors.CompressorConfig` ``newline``."""
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
        ValueError: none of :data:`LAYOUTS`.
    """
    config = json.loads((src / "config.json").read_text())
    archs = config.get("architectures") or []
    if "PllavaForConditionalGeneration" in archs or "pooling_shape" in config:
        return "pllava"
    if config.get("model_type") == "llava_next_video" or "LlavaNextVideoForConditionalGeneration" in archs:
        return "llava-next-video"
    if "LlavaQwenForCausalLM" in archs or config.get("model_type") == "llava_qwen":
        return "llava-video"
    raise ValueError(f"{src}: not a checkpoint of a known layout ({', '.join(LAYOUTS)}; architectures={archs})")


def _read_weights(src: Path) -> dict[str, torch.Tensor]:
    files = sorted(p for p in src.glob("*.safetensors") if not p.name.startswith("adapter_"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {src}")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(f))
    return weights


_LLAVA_VIDEO_NAMES = (
    ("model.vision_tower.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.mm_projector.0.", "projector.linear_1."),
    ("model.mm_projector.2.", "projector.linear_2."),
    ("model.image_newline", "compressor.image_newline"),
    ("model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)


def _rename(key: str, layout: Layout) -> str | None:
    """A source key -> vidlm key (``None``: dropped)."""
    if layout == "llava-video":
        for old, new in _LLAVA_VIDEO_NAMES:
            if key.startswith(old):
                return new + key[len(old) :]
        return key
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
            origin=(
                f"PLLaVA release: config.json pooling_shape={list(src_config.get('pooling_shape', []))}, "
                f"num_frames={src_config.get('num_frames', 16)}, image_token_index (<image>)="
                f"{src_config.get('image_token_index', 32000)}"
            ),
        )
    pool_mode = src_config.get("spatial_pool_mode", "average")
    if pool_mode not in ("average", "max"):
        raise ValueError(f"config.json spatial_pool_mode={pool_mode!r}: vidlm converts 'average', 'max'")
    return VidlmConfig(
        **common,
        compressor={
            "kind": "slowfast",
            "slow_stride": 1,
            "slow_pool": src_config.get("spatial_pool_stride", 2),
            "pool_mode": pool_mode,  # LlavaNextVideoPooler: AvgPool2d / MaxPool2d(stride)
        },
        pool_before_projector=True,
        sampling={"mode": "uniform", "num_frames": 32},
        origin=(
            f"llava-hf LLaVA-NeXT-Video release: config.json spatial_pool_mode={pool_mode}, "
            f"spatial_pool_stride={src_config.get('spatial_pool_stride', 2)}"
        ),
        video_token="<video>",
        video_token_index=src_config.get("video_token_index", src_config.get("video_token_id", 32000)),
    )


def _llava_video_config(src: Path, src_config: dict, weights: dict[str, torch.Tensor]) -> VidlmConfig:
    """The vidlm configuration of an lmms-lab LLaVA-Video release (its ``config.json`` and weights).

    Raises:
        ValueError: a field this path does not reproduce (named), or a tower that is not SigLIP.
    """
    from transformers import Qwen2Config

    from vidlm.models.presets import SIGLIP_MEAN, SIGLIP_STD

    def field(name: str, allowed: tuple, default):
        value = src_config.get(name, default)
        if value not in allowed:
            raise ValueError(f"config.json {name}={value!r}: vidlm converts {', '.join(map(repr, allowed))}")
        return value

    field("mm_projector_type", ("mlp2x_gelu",), "mlp2x_gelu")
    field("mm_vision_select_feature", ("patch",), "patch")
    field("add_faster_video", (False,), False)
    pool_mode = field("mm_spatial_pool_mode", ("average", "bilinear", "max"), "bilinear")
    newline = field("mm_newline_position", tuple(NEWLINE_POSITIONS), "grid")
    if newline != "no_token" and "model.image_newline" not in weights:
        raise ValueError(f"mm_newline_position={newline!r} but the weights have no model.image_newline")
    if "unpad" not in src_config.get("mm_patch_merge_type", "spatial_unpad") and newline == "one_token":
        newline = "no_token"  # LLaVA-NeXT appends the one token only with an unpad merge type

    tower_name = str(src_config.get("mm_vision_tower", ""))
    pre: dict = {}
    if (Path(tower_name) / "config.json").is_file():  # a local tower, as LLaVA-NeXT's from_pretrained reads it
        vision = json.loads((Path(tower_name) / "config.json").read_text())
        vision = vision.get("vision_config", vision) | {"model_type": "siglip_vision_model"}
        if (Path(tower_name) / "preprocessor_config.json").is_file():
            pre = json.loads((Path(tower_name) / "preprocessor_config.json").read_text())
    elif "siglip-so400m-patch14-384" in tower_name:
        vision = dict(SIGLIP_SO400M)
    else:
        raise ValueError(f"config.json mm_vision_tower={tower_name!r}: give a local SigLIP directory or so400m-384")
    if "siglip" not in tower_name.lower() and vision.get("model_type") != "siglip_vision_model":
        raise ValueError(f"config.json mm_vision_tower={tower_name!r}: only SigLIP towers convert")
    prefix = "model.vision_tower.vision_tower.vision_model.encoder.layers."
    kept = {int(k[len(prefix) :].split(".")[0]) for k in weights if k.startswith(prefix)}
    vision |= {"num_hidden_layers": len(kept), "vision_use_head": False}  # SigLipVisionTower drops the last layer

    known = Qwen2Config().to_dict()
    text = {k: v for k, v in src_config.items() if k in known and k not in ("architectures", "model_type")}
    return VidlmConfig(
        vision_config=vision,
        text_config={"model_type": "qwen2", **text},
        vision_feature_layer=-1,  # the truncated tower's last layer, before post_layernorm
        compressor={
            "kind": "slowfast",
            "slow_stride": 1,
            "slow_pool": int(src_config.get("mm_spatial_pool_stride", 2)),
            "pool_mode": pool_mode,
            "newline": NEWLINE_POSITIONS[newline],
        },
        sampling={"mode": "fps", "fps": 1.0, "max_frames": 64, "force_sample": True},  # LLaVA-Video's 64 frames
        video_token="<video>",
        image_mean=pre.get("image_mean", SIGLIP_MEAN),
        image_std=pre.get("image_std", SIGLIP_STD),
        tie_word_embeddings=bool(src_config.get("tie_word_embeddings", False)),
        origin=(
            f"lmms-lab LLaVA-Video release ({src.name}): config.json mm_spatial_pool_mode={pool_mode}, "
            f"mm_spatial_pool_stride={src_config.get('mm_spatial_pool_stride', 2)}, mm_newline_position={newline}"
        ),
    )


def _add_placeholder(src: Path, out: Path, config: VidlmConfig) -> None:
    """Save ``src``'s tokenizer with ``config.video_token`` added, and set ``config.video_token_index``.

    Raises:
        ValueError: the new id has no embedding row (the LLM's ``vocab_size`` is the tokenizer's length).
    """
    from transformers import AutoTokenizer

    from vidlm.models._builders import add_video_token

    tokenizer = AutoTokenizer.from_pretrained(src)
    config.video_token_index = add_video_token(tokenizer, config.video_token)
    if config.video_token_index >= config.text_config.vocab_size:
        raise ValueError(
            f"the placeholder {config.video_token!r} would be id {config.video_token_index}, past the LLM's "
            f"{config.text_config.vocab_size} embedding rows"
        )
    tokenizer.save_pretrained(out)


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    layout: Layout | Literal["auto"] = "auto",
    lora_alpha: float = 32.0,
    lora_dir: str | Path | None = None,
) -> Path:
    """Convert a released checkpoint directory (one of :data:`LAYOUTS`) into a vidlm model directory.

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
        ValueError: unknown layout, unsupported pooling, a weight with no place in the vidlm model, or (LLaVA-Video)
            a weight of the vidlm model the release lacks.
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
    weights = _read_weights(src)
    if layout == "llava-video":
        config = _llava_video_config(src, src_config, weights)
    else:
        config = _vidlm_config(src_config, layout, pre.get("image_mean", CLIP_MEAN), pre.get("image_std", CLIP_STD))

    base: dict[str, torch.Tensor] = {}
    lora: dict[str, torch.Tensor] = {}
    sources = [(k, v, "") for k, v in weights.items()]
    if lora_dir is not None:
        adapter = load_file(Path(lora_dir) / "adapter_model.safetensors")
        sources += [(k.replace("base_model.model.", "", 1), v, "language_model.") for k, v in adapter.items()]
    for key, tensor, prefix in sources:
        if (m := _LORA.match(key)) is not None:
            module = _rename(prefix + m["module"], layout)
            lora[f"base_model.model.{module}.lora_{m['ab']}.weight"] = tensor
            continue
        new = _rename(prefix + key, layout)
        if new == "compressor.image_newline" and config.compressor_config.newline == "none":
            continue  # trained (LLaVA-NeXT creates it for images) but not on the video path
        if new is not None:
            base[new] = tensor

    with torch.device("meta"):
        expected = set(VidlmForConditionalGeneration(config).state_dict())
    unknown = sorted(set(base) - expected)
    if unknown:
        raise ValueError(f"{len(unknown)} weights have no place in the vidlm model, e.g. {unknown[:3]}")
    tied = {"language_model.lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(expected - set(base) - tied)
    if layout == "llava-video" and missing:
        raise ValueError(f"{len(missing)} weights of the vidlm model are not in {src}, e.g. {missing[:3]}")
    out.mkdir(parents=True, exist_ok=True)
    if layout == "llava-video":
        _add_placeholder(src, out, config)
    else:
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy(src / name, out / name)
    config.architectures = ["VidlmForConditionalGeneration"]
    config.save_pretrained(out)
    save_torch_state_dict(base, out, max_shard_size="5GB")
    if lora:
        r = next(v.shape[0] for k, v in lora.items() if k.endswith("lora_A.weight"))
        targets = sorted({k.split(".lora_")[0].rsplit(".", 1)[1] for k in lora})
        lora_config(LoraSettings(r=r, alpha=lora_alpha, target_modules=tuple(targets))).save_pretrained(
            out / ADAPTER_DIR
        )
        save_torch_state_dict(lora, out / ADAPTER_DIR, filename_pattern="adapter_model{suffix}.safetensors")
    return out
