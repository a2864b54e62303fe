"""Projectors: vision features -> the LLM's embedding width.

- ``mlp2x_gelu``: LLaVA-1.5's two-layer MLP with GELU (LLaVA-1.5 §3.1; PLLaVA and LLaVA-Video keep it),
  applied to every patch token: ``(..., Dv) -> (..., Dl)``.
- ``topa_linear``: TOPA's linear projection of one global CLIP feature per frame plus a learned
  temporal embedding per frame position (TOPA §3.2): ``(B, T, Dv) -> (B, T, Dl)``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from vidlm.config import Section

__all__ = ["MLPProjector", "ProjectorConfig", "TopaProjector", "build_projector"]


class ProjectorConfig(Section):
    """Which projector, and its widths."""

    kind: Literal["mlp2x_gelu", "topa_linear"] = "mlp2x_gelu"
    vision_dim: int = Field(1024, gt=0)
    """Dv: width of the vision features (patch features, or global embeddings for TOPA)."""
    llm_dim: int = Field(4096, gt=0)
    """Dl: the LLM's hidden size."""
    max_frames: int = Field(64, gt=0)
    """``topa_linear``: positions of the temporal embedding (TOPA uses 10 frames)."""


class MLPProjector(nn.Module):
    """LLaVA ``mlp2x_gelu``: ``Linear(Dv, Dl) -> GELU -> Linear(Dl, Dl)``, token-wise."""

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, llm_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., Dv) -> (..., Dl)``, in the layers' dtype."""
        return self.linear_2(self.act(self.linear_1(x)))


class TopaProjector(nn.Module):
    """TOPA: ``Linear(Dv, Dl)`` per frame feature plus a temporal embedding of the frame's position.

    The temporal embedding starts at ``N(0, 0.02)`` (the LLMs' own embedding init), not torch's ``N(0, 1)``:
    CLIP features are unit-norm, so ``Linear(Dv, Dl)`` of one has a norm near 0.6, and an ``N(0, 1)``
    position vector (norm ``sqrt(Dl)``) would drown what tells frames apart; measured on the tiny planted
    task, a LoRA run reached 100% instead of chance.
    """

    def __init__(self, vision_dim: int, llm_dim: int, max_frames: int):
        super().__init__()
        self.proj = nn.Linear(vision_dim, llm_dim)
        self.temporal_embedding = nn.Embedding(max_frames, llm_dim)
        nn.init.normal_(self.temporal_embedding.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, Dv) -> (B, T, Dl)``.

        Raises:
            ValueError: not 3-D, or ``T`` above ``max_frames``.
        """
        if x.ndim != 3 or x.shape[1] > self.temporal_embedding.num_embeddings:
            raise ValueError(
                f"expected (B, T, Dv) with T <= {self.temporal_embedding.num_embeddings}, got {tuple(x.shape)}"
            )
        positions = torch.arange(x.shape[1], device=x.device)
        return self.proj(x) + self.temporal_embedding(positions)  # (B, T, Dl) + (T, Dl)


def build_projector(config: ProjectorConfig) -> nn.Module:
    """The projector a config names."""
    if config.kind == "topa_linear":
        return TopaProjector(config.vision_dim, config.llm_dim, config.max_frames)
    return MLPProjector(config.vision_dim, config.llm_dim)
