"""Vision tower: a CLIP image encoder applied frame by frame.

Per frame it gives the two things the papers use:

- the pooled, projected CLIP embedding ``(D,)`` -- TOPA feeds these global features (TOPA §3.2);
- the patch features ``(h*w, Dv)`` of one transformer layer, before the final norm -- LLaVA and PLLaVA
  feed the penultimate layer's patch tokens to their projector (LLaVA-1.5 §4, PLLaVA §3.1).

Both come from one forward pass (``open_clip``'s ``forward_intermediates``).

Two kinds of tower:

- :class:`VisionTower`, an ``open_clip`` model named by its architecture (``ViT-L-14-336``...) with weights
  from a local checkpoint file, for the feature job. With no checkpoint the weights are random, seeded by
  ``seed``: this is what the tests and the demo use (``vidlm-tiny``, shipped in ``open_clip_configs/``).
- :class:`HFVisionTower`, transformers' ``CLIPVisionModel`` / ``SiglipVisionModel``, the towers inside
  LLaVA-NeXT, PLLaVA and LLaVA-Video checkpoints, for the video LLM. Its parameters are named
  ``vision_model.*`` as in those checkpoints; CLIP's ``visual_projection`` is kept when the config has a
  ``projection_dim`` so the pooled embedding lies in CLIP's joint space (TOPA's modality projection needs it).

Nothing is ever fetched from a hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from vidlm.config import Section

__all__ = ["HFVisionTower", "TextTower", "VisionTower", "VisionTowerConfig", "image_size"]

_CONFIG_DIR = Path(__file__).parent / "open_clip_configs"


class VisionTowerConfig(Section):
    """Which CLIP encoder runs on the frames."""

    name: str = "vidlm-tiny"
    """open_clip architecture, e.g. ``ViT-L-14-336`` (PLLaVA), ``ViT-L-14`` (TOPA), or ``vidlm-tiny``."""
    checkpoint: str | None = None
    """Local weights file (open_clip ``.pt`` / ``.safetensors``); ``None``: random weights seeded by ``seed``."""
    feature_layer: int = -2
    """Transformer block whose patch tokens are the patch features; ``-2`` is the penultimate (LLaVA)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """``auto``: bf16 on GPU, fp32 on CPU."""
    seed: int = Field(0, ge=0)
    """Seed of the random weights when there is no checkpoint."""


def _register_configs() -> None:
    import open_clip

    open_clip.add_model_config(_CONFIG_DIR)


def _create_clip(config: VisionTowerConfig, device: str, part: str):
    """The open_clip model of ``config`` (random weights seeded by ``config.seed`` without a checkpoint).

    Raises:
        FileNotFoundError: ``config.checkpoint`` does not exist (the message names ``part``).
    """
    import open_clip

    _register_configs()
    if config.checkpoint is not None and not Path(config.checkpoint).is_file():
        raise FileNotFoundError(f"{part} tower checkpoint not found: {config.checkpoint}")
    torch.manual_seed(config.seed)
    return open_clip.create_model(config.name, pretrained=config.checkpoint, device=device)


def image_size(config: VisionTowerConfig) -> int:
    """Input side in pixels of the tower, from its architecture alone (no weights built).

    Raises:
        ValueError: ``config.name`` is not an open_clip architecture.
    """
    import open_clip

    _register_configs()
    arch = open_clip.get_model_config(config.name)
    if arch is None:
        raise ValueError(f"tower name {config.name!r} is not an open_clip architecture")
    size = arch["vision_cfg"]["image_size"]
    return int(size if isinstance(size, int) else size[0])


class VisionTower(torch.nn.Module):
    """A CLIP image encoder that turns uint8 frames into embeddings and patch features.

    Args:
        config: which architecture and weights.
        device: torch device string (``"cpu"``, ``"cuda"``).

    Raises:
        FileNotFoundError: ``config.checkpoint`` does not exist.
        RuntimeError: ``config.name`` is not an open_clip architecture (raised by open_clip).
    """

    def __init__(self, config: VisionTowerConfig, device: str = "cpu"):
        super().__init__()
        import open_clip

        model = _create_clip(config, device, "vision")
        pre = open_clip.get_model_preprocess_cfg(model)
        self.visual = model.visual.eval().requires_grad_(False)
        del model  # the text tower is not needed here
        self.config = config
        self.device = torch.device(device)
        self.dtype = {
            "auto": torch.bfloat16 if self.device.type == "cuda" else torch.float32,
            "fp32": torch.float32,
            "bf16": torch.bfloat16,
            "fp16": torch.float16,
        }[config.precision]
        self.visual.to(self.device, self.dtype)
        self.image_size = int(pre["size"][0])
        num_layers = len(self.visual.transformer.resblocks)
        self.feature_index = config.feature_layer % num_layers
        mean = torch.tensor(pre["mean"], device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(pre["std"], device=self.device).view(1, 3, 1, 1)
        # (x / 255 - mean) / std as one scale and one shift per channel
        self.register_buffer("scale", 1.0 / (255.0 * std))
        self.register_buffer("shift", -mean / std)

    @property
    def embed_dim(self) -> int:
        """D, the width of the projected embedding."""
        return int(self.visual.output_dim)

    @property
    def num_patches(self) -> int:
        """N = h*w patch tokens per frame."""
        return int(np.prod(self.visual.grid_size))

    @torch.inference_mode()
    def forward(
        self, frames: torch.Tensor | np.ndarray, with_patches: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode frames.

        Args:
            frames: ``(N, S, S, 3) uint8`` RGB, ``S`` = ``image_size`` (decode already resized them).
            with_patches: also return the patch features of ``feature_layer``.

        Returns:
            ``embeddings (N, D)`` and ``patch_features (N, h*w, Dv)`` (or ``None``), in the tower's dtype.

        Raises:
            ValueError: frames of another shape or dtype.
        """
        frames = torch.as_tensor(frames)
        s = self.image_size
        if frames.dtype != torch.uint8 or frames.ndim != 4 or tuple(frames.shape[1:]) != (s, s, 3):
            raise ValueError(f"expected frames (N, {s}, {s}, 3) uint8, got {tuple(frames.shape)} {frames.dtype}")
        # (N, S, S, 3) -> (N, 3, S, S), made contiguous while still uint8: elementwise work on the strided
        # view costs 4x as much (the tiny tower spent as long on it as on its transformer)
        x = frames.to(self.device).permute(0, 3, 1, 2).contiguous().float()
        x = x.mul_(self.scale).add_(self.shift).to(self.dtype)
        if not with_patches:
            return self.visual(x), None
        out = self.visual.forward_intermediates(x, indices=[self.feature_index], output_fmt="NLC")
        return out["image_features"], out["image_intermediates"][0]  # (N, D), (N, h*w, Dv)


class HFVisionTower(torch.nn.Module):
    """transformers CLIP or SigLIP vision encoder giving pooled embeddings and the patch-feature grid.

    Args:
        config: a ``CLIPVisionConfig`` or ``SiglipVisionConfig``.
        feature_layer: hidden-state index of the patch features (``-2``: penultimate, LLaVA; ``-1`` last).
        projection_dim: CLIP only: width of ``visual_projection`` for the pooled embedding; ``0``: none.

    Raises:
        ValueError: another kind of vision config.
    """

    def __init__(self, config, feature_layer: int = -2, projection_dim: int = 0):
        super().__init__()
        from transformers import CLIPVisionModel, SiglipVisionModel

        kinds = {"clip_vision_model": CLIPVisionModel, "siglip_vision_model": SiglipVisionModel}
        if config.model_type not in kinds:
            raise ValueError(f"vision tower must be one of {sorted(kinds)}, got {config.model_type!r}")
        self.has_cls = config.model_type == "clip_vision_model"  # CLIP prepends a CLS token; SigLIP has none
        self.vision_model = kinds[config.model_type](config)
        self.visual_projection = (
            torch.nn.Linear(config.hidden_size, projection_dim, bias=False) if self.has_cls and projection_dim else None
        )
        self.feature_layer = feature_layer
        self.grid = config.image_size // config.patch_size

    @property
    def embed_dim(self) -> int:
        """Width of the pooled embedding."""
        return self.visual_projection.out_features if self.visual_projection is not None else self.patch_dim

    @property
    def patch_dim(self) -> int:
        """Dv, width of the patch features."""
        return int(self.vision_model.config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode frames.

        Args:
            pixel_values: ``(N, 3, S, S)`` normalised frames (:func:`vidlm.models.processing.preprocess_frames`).

        Returns:
            ``pooled (N, D)`` and ``patch_features (N, h, w, Dv)``, in the tower's dtype.

        Raises:
            ValueError: ``pixel_values`` of another shape.
        """
        s = self.grid * self.vision_model.config.patch_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, s, s):
            raise ValueError(f"expected pixel_values (N, 3, {s}, {s}), got {tuple(pixel_values.shape)}")
        dtype = next(self.vision_model.parameters()).dtype
        out = self.vision_model(pixel_values.to(dtype), output_hidden_states=True)
        patches = out.hidden_states[self.feature_layer]  # (N, [1 +] h*w, Dv)
        if self.has_cls:
            patches = patches[:, 1:]  # LLaVA's "default" feature selection drops CLS
        pooled = out.pooler_output  # (N, Dv): CLIP post-LN CLS, SigLIP attention-pool head
        if self.visual_projection is not None:
            pooled = self.visual_projection(pooled)  # (N, Dv) -> (N, D), CLIP's joint space
        n = pixel_values.shape[0]
        return pooled, patches.reshape(n, self.grid, self.grid, -1)  # (N, h*w, Dv) -> (N, h, w, Dv)


class TextTower(torch.nn.Module):
    """The text encoder of the same CLIP as :class:`VisionTower`: texts -> unit-norm CLIP text features.

    TOPA represents a Tideo's textual frames by these features (TOPA §3.2) and keeps a memory of them for
    modality projection (TOPA eq. 2); with the same ``config`` they share the joint space of
    :class:`VisionTower`'s embeddings.

    Args:
        config: which architecture and weights (the vision tower's config).
        device: torch device string.

    Raises:
        FileNotFoundError: ``config.checkpoint`` does not exist.
    """

    def __init__(self, config: VisionTowerConfig, device: str = "cpu"):
        super().__init__()
        import open_clip

        self.model = _create_clip(config, device, "text").eval()
        self.model.visual = None  # only the text side is kept
        self.tokenizer = open_clip.get_tokenizer(config.name)
        self.device = torch.device(device)

    @property
    def embed_dim(self) -> int:
        """D, the width of the joint embedding."""
        return int(self.model.text_projection.shape[-1])

    @torch.inference_mode()
    def forward(self, texts: list[str]) -> torch.Tensor:
        """``N`` texts -> ``(N, D) float32`` L2-normalised CLIP text features (truncated at 77 tokens)."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        return self.model.encode_text(tokens, normalize=True).float()
