"""Vision tower: the model's own CLIP / SigLIP encoder, applied frame by frame -- in the model and in the feature job.

Per frame it gives the two things the papers use:

- the pooled embedding ``(D,)`` -- CLIP's projected CLS embedding, which TOPA feeds (TOPA §3.2);
- the patch features ``(h*w, Dv)`` of one transformer layer -- LLaVA and PLLaVA feed the penultimate layer's
  patch tokens to their projector (LLaVA-1.5 §4, PLLaVA §3.1).

Both come from one forward pass of :class:`HFVisionTower`, transformers' ``CLIPVisionModel`` /
``SiglipVisionModel``: the towers inside LLaVA-NeXT, PLLaVA and LLaVA-Video checkpoints. The feature job runs the
same module with the same weights (:class:`FrameEncoder`, named by a preset or a model directory), so training on
the features it writes equals inference on frames by construction. TOPA's text features come from the text
tower of the same CLIP (:class:`TextTower`).

Nothing is ever fetched from a hub.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from vidlm.config import Section

__all__ = ["CLIP_TEXT_DIR", "FrameEncoder", "HFVisionTower", "TextTower", "TowerConfig", "tower_model_config"]

CLIP_TEXT_DIR = "clip_text"
"""Sub-folder of a TOPA model directory holding the text tower of its CLIP (``CLIPTextModelWithProjection`` and its
tokenizer), written by the builders of the ``tiny-topa`` preset, or by hand from a released CLIP."""


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
            ``pooled (N, D)`` (``None`` for a SigLIP tower without its head) and ``patch_features (N, h, w, Dv)``,
            in the tower's dtype.

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


class TowerConfig(Section):
    """Which model's vision tower encodes the frames of the feature job."""

    model: str = "tiny-video"
    """A preset or a vidlm model directory: its tower (architecture, weights, feature layer, input size and pixel
    statistics) is the one the model runs on frames. ``tiny-video`` / ``tiny-topa`` / ``smol`` and model
    directories bring their weights; a paper preset (``pllava-7b``, ``llava-video-7b``...) brings its architecture,
    with ``weights`` or seeded random weights."""
    weights: str | None = None
    """A paper preset's tower weights: a transformers ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` /
    ``SiglipVisionModel`` directory (e.g. a local copy of ``openai/clip-vit-large-patch14-336``)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """``auto``: bf16 on GPU, fp32 on CPU."""
    seed: int = Field(0, ge=0)
    """Seed of a paper preset's random weights when there are no ``weights``."""


def tower_model_config(config: TowerConfig):
    """The :class:`~vidlm.models.video_llm.VidlmConfig` whose tower ``config`` names (no weights read).

    Raises:
        ValueError: an unknown preset.
        FileNotFoundError: a directory without ``config.json``.
    """
    from vidlm.models.presets import locate_model

    return locate_model(config.model)[1]


def _tower_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """The ``vision_tower.*`` tensors of a model directory's safetensors, without reading the others."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({f for k, f in weight_map.items() if k.startswith("vision_tower.")})
    else:
        files = [p.name for p in sorted(model_dir.glob("*.safetensors"))]
    out = {}
    for name in files:
        with safe_open(str(model_dir / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                if key.startswith("vision_tower."):
                    out[key[len("vision_tower.") :]] = f.get_tensor(key)
    return out


def _load_hub_tower(tower: HFVisionTower, weights: str) -> None:
    """Load a transformers CLIP / SigLIP vision directory into ``tower`` (strict: every tensor of the tower)."""
    from safetensors.torch import load_file

    files = sorted(Path(weights).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"encode.tower.weights: no *.safetensors in {weights}")
    state = {}
    for f in files:
        state |= load_file(f)
    mine = {}
    for key, value in state.items():
        key = key.removeprefix("vision_model.") if not key.startswith("visual_projection.") else key
        mine["visual_projection.weight" if key == "visual_projection.weight" else f"vision_model.{key}"] = value
    missing, _ = tower.load_state_dict(mine, strict=False)
    if missing:
        raise ValueError(f"encode.tower.weights: {weights} lacks {len(missing)} tower tensors, e.g. {missing[:3]}")


class FrameEncoder(torch.nn.Module):
    """A model's vision tower as the feature job runs it: uint8 frames -> pooled embeddings and patch features.

    Frames are preprocessed by :func:`vidlm.models.processing.preprocess_frames` with the model's input size and
    pixel statistics, then encoded by the model's :class:`HFVisionTower` with the model's weights: exactly what
    :func:`vidlm.models.visual_tokens.encode_videos` does on frames.

    Args:
        config: which model's tower, and its precision.
        device: torch device string (``"cpu"``, ``"cuda"``).

    Raises:
        ValueError: an unknown preset, or ``weights`` that do not fit the tower.
        FileNotFoundError: a model directory or ``weights`` that do not exist.
    """

    def __init__(self, config: TowerConfig, device: str = "cpu"):
        super().__init__()
        from vidlm.models.presets import locate_model

        model_dir, mc = locate_model(config.model)
        torch.manual_seed(config.seed)
        self.tower = HFVisionTower(mc.vision_config, mc.vision_feature_layer, mc.projection_dim)
        if model_dir is not None:
            self.tower.load_state_dict(_tower_weights(Path(model_dir)))
        elif config.weights is not None:
            _load_hub_tower(self.tower, config.weights)
        self.model_config = mc
        self.device = torch.device(device)
        self.dtype = {
            "auto": torch.bfloat16 if self.device.type == "cuda" else torch.float32,
            "fp32": torch.float32,
            "bf16": torch.bfloat16,
            "fp16": torch.float16,
        }[config.precision]
        self.tower.to(self.device, self.dtype).eval().requires_grad_(False)

    @property
    def image_size(self) -> int:
        """S, the input side in pixels."""
        return self.model_config.image_size

    @property
    def embed_dim(self) -> int:
        """D, the width of the pooled embedding."""
        return self.tower.embed_dim

    @property
    def patch_dim(self) -> int:
        """Dv, the width of the patch features."""
        return self.tower.patch_dim

    @property
    def num_patches(self) -> int:
        """h*w patch tokens per frame."""
        return self.tower.grid**2

    @torch.inference_mode()
    def forward(
        self, frames: torch.Tensor | np.ndarray, with_patches: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode frames.

        Args:
            frames: ``(N, S, S, 3) uint8`` RGB, ``S`` = ``image_size`` (decode already resized them).
            with_patches: also return the patch features.

        Returns:
            ``embeddings (N, D)`` and ``patch_features (N, h*w, Dv)`` (or ``None``), in the tower's dtype.

        Raises:
            ValueError: frames of another shape or dtype.
        """
        from vidlm.models.processing import preprocess_frames

        frames = torch.as_tensor(frames)
        s = self.image_size
        if frames.dtype != torch.uint8 or frames.ndim != 4 or tuple(frames.shape[1:]) != (s, s, 3):
            raise ValueError(f"expected frames (N, {s}, {s}, 3) uint8, got {tuple(frames.shape)} {frames.dtype}")
        mc = self.model_config
        pixels = preprocess_frames(frames, s, mc.image_mean, mc.image_std).to(self.device)
        pooled, patches = self.tower(pixels)
        if pooled is None:
            pooled = patches.mean(dim=(1, 2))  # a SigLIP tower without its head: the mean patch feature
        return pooled, patches.flatten(1, 2) if with_patches else None  # (N, D), (N, h*w, Dv)


class TextTower(torch.nn.Module):
    """The text tower of a model's CLIP: texts -> unit-norm CLIP text features in the joint space of the model's
    pooled image embeddings (TOPA §3.2: a Tideo's textual frames; TOPA eq. 2's memory).

    Args:
        clip: a vidlm model directory or preset holding :data:`CLIP_TEXT_DIR` (``tiny-topa``), or a transformers
            CLIP directory (``CLIPModel`` or ``CLIPTextModelWithProjection``, with its tokenizer).
        device: torch device string.

    Raises:
        FileNotFoundError: no CLIP text tower there.
    """

    def __init__(self, clip: str, device: str = "cpu"):
        super().__init__()
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        from vidlm.models.presets import PRESETS, resolve_model

        path = resolve_model(clip) if clip in PRESETS else Path(clip)
        if (path / CLIP_TEXT_DIR / "config.json").is_file():
            path = path / CLIP_TEXT_DIR
        kind = (
            json.loads((path / "config.json").read_text()).get("model_type")
            if (path / "config.json").is_file()
            else None
        )
        if kind not in ("clip", "clip_text_model"):
            raise FileNotFoundError(f"no CLIP text tower in {clip} (a CLIP directory or a model with {CLIP_TEXT_DIR}/)")
        self.model = CLIPTextModelWithProjection.from_pretrained(path).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.max_length = int(self.model.config.max_position_embeddings)
        self.device = torch.device(device)

    @property
    def embed_dim(self) -> int:
        """D, the width of the joint embedding."""
        return int(self.model.config.projection_dim)

    @torch.inference_mode()
    def forward(self, texts: list[str]) -> torch.Tensor:
        """``N`` texts -> ``(N, D) float32`` L2-normalised CLIP text features (truncated at the tower's context).

        CLIP pools the hidden state of the end-of-text token: each text ends with one (the tower's
        ``eos_token_id``, appended where the tokenizer does not add it), padding repeats it as CLIP's does.
        """
        eos = int(self.model.config.eos_token_id)
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length - 1)["input_ids"]
        ids = [row if row and row[-1] == eos else [*row, eos] for row in ids]
        longest = max(len(row) for row in ids)
        input_ids = torch.tensor([row + [eos] * (longest - len(row)) for row in ids], device=self.device)
        mask = torch.tensor([[1] * len(row) + [0] * (longest - len(row)) for row in ids], device=self.device)
        features = self.model(input_ids=input_ids, attention_mask=mask).text_embeds.float()
        return features / features.norm(dim=-1, keepdim=True)
