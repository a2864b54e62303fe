"""What trains, LoRA through peft, and PLLaVA's post-training LoRA-alpha mixing.

- :class:`TrainableConfig` says what trains per part (``vision_tower: frozen``, ``projector: full``, ``llm: lora``, and
  with ``llm: full`` whether its input embeddings do); :func:`apply_trainable` sets ``requires_grad`` and wraps the
  LLM's target projections with peft LoRA (only modules under ``language_model``).
- Post-training optimisation (PLLaVA §3.4): a LoRA adapter trained at ``alpha = 32`` is loaded at a
  smaller alpha (4 in the paper) and merged, ``W = W0 + (alpha / r) * B @ A``, trading some of the
  fine-tuned behaviour for the base LLM's language ability. :func:`merge_lora` does it with peft's
  ``merge_and_unload`` and writes a plain checkpoint (``vidlm merge --alpha 4``).

An adapter is a peft directory (``adapter_config.json`` + ``adapter_model.safetensors``) whose module
names are those of :class:`~vidlm.models.video_llm.VidlmForConditionalGeneration`; by convention it lives
in ``adapter/`` inside the model directory it was trained from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from vidlm.config import Section

__all__ = ["LoraSettings", "TrainableConfig", "apply_trainable", "lora_config", "merge_lora"]

ADAPTER_DIR = "adapter"


class LoraSettings(Section):
    """LoRA hyper-parameters (PLLaVA §4.1: r=128, alpha=32 on q_proj and v_proj)."""

    r: int = Field(128, gt=0)
    alpha: float = Field(32.0, gt=0)
    """Scale numerator: the update is ``(alpha / r) * B @ A``."""
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    """Names of the LLM's linear layers that get adapters."""


class TrainableConfig(Section):
    """What trains: each part ``frozen`` or ``full``; the LLM may also be ``lora``."""

    vision_tower: Literal["frozen", "full"] = "frozen"
    projector: Literal["frozen", "full"] = "full"
    llm: Literal["frozen", "full", "lora"] = "lora"
    freeze_input_embeddings: bool = False
    """With ``llm: full``, the LLM's input embeddings (``embed_tokens``; with tied embeddings, its LM head too) stay
    frozen: the question words a focus token weighs the regions by (``VidlmConfig.visual_focus_token``) then stay the
    vectors the ``words`` recipe aligned the regions with, and the optimizer holds ``V x D`` fewer weights."""
    lora: LoraSettings = LoraSettings()

    @model_validator(mode="after")
    def _embeddings_of_a_full_llm(self) -> TrainableConfig:
        if self.freeze_input_embeddings and self.llm != "full":
            raise ValueError(f"freeze_input_embeddings needs llm: full (with llm: {self.llm} they do not train)")
        return self


def lora_config(settings: LoraSettings, modules_to_save: tuple[str, ...] = ()):
    """The peft ``LoraConfig`` for ``settings``, restricted to modules under ``language_model``.

    ``modules_to_save`` (e.g. ``("projector",)``) train fully and are saved in the adapter with the LoRA
    weights, so an adapter directory holds everything a LoRA run changed.
    """
    from peft import LoraConfig

    names = "|".join(settings.target_modules)
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=rf"language_model\..*\.({names})",  # peft: a string is a full-match regex
        bias="none",
        modules_to_save=list(modules_to_save) or None,
    )


def connector_parts(model) -> list[str]:
    """The attributes of a :class:`VidlmForConditionalGeneration` between its tower and its LLM that
    ``trainable.projector`` sets: ``projector``, and ``visual_position_embedding``, ``visual_motion`` and
    ``visual_regions`` where the model has them."""
    optional = ("visual_position_embedding", "visual_motion", "visual_regions")
    return ["projector"] + [name for name in optional if getattr(model, name) is not None]


def apply_trainable(model, config: TrainableConfig):
    """Set what trains on a :class:`VidlmForConditionalGeneration`: the projector's setting holds for the
    ``visual_position_embedding``, ``visual_motion`` and ``visual_regions`` too (the connector between the tower and
    the LLM).

    Returns:
        the model itself, or a peft ``PeftModel`` wrapping it when ``config.llm == "lora"``.
    """
    model.requires_grad_(False)
    model.vision_tower.requires_grad_(config.vision_tower == "full")
    connector = connector_parts(model)
    for part in connector:
        getattr(model, part).requires_grad_(config.projector == "full")
    model.language_model.requires_grad_(config.llm == "full")
    if config.freeze_input_embeddings:
        model.language_model.get_input_embeddings().requires_grad_(False)
    if config.llm != "lora":
        return model
    from peft import get_peft_model

    full = ("vision_tower",) * (config.vision_tower == "full") + tuple(connector) * (config.projector == "full")
    return get_peft_model(model, lora_config(config.lora, modules_to_save=full))  # the rest is frozen


def merge_lora(model_dir: str | Path, out_dir: str | Path, alpha: float | None = None, adapter_dir=None) -> Path:
    """Merge a LoRA adapter into its base model at a chosen alpha and save a plain checkpoint.

    Args:
        model_dir: the base model directory.
        out_dir: where the merged model (and the tokenizer) are written.
        alpha: LoRA alpha to merge with (PLLaVA infers at 4); ``None``: the adapter's own.
        adapter_dir: the peft adapter; ``None``: ``model_dir/adapter``.

    Returns:
        ``out_dir``.

    Raises:
        FileNotFoundError: no adapter.
        ValueError: ``alpha <= 0``.
    """
    from peft import LoraConfig, PeftModel
    from transformers import AutoTokenizer

    from vidlm.models.video_llm import VidlmForConditionalGeneration

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    adapter_dir = Path(adapter_dir) if adapter_dir is not None else model_dir / ADAPTER_DIR
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no LoRA adapter at {adapter_dir} (adapter_config.json missing)")
    if alpha is not None and alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    config = LoraConfig.from_pretrained(adapter_dir)
    if alpha is not None:
        config.lora_alpha = alpha  # PLLaVA §3.4: the scale is alpha / r
    base = VidlmForConditionalGeneration.from_pretrained(model_dir)
    merged = PeftModel.from_pretrained(base, adapter_dir, config=config).merge_and_unload()
    merged.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)  # with its chat template
    return out_dir
