"""Token compressors: how the projected patch features of T frames become the LLM's visual tokens.

Each compressor is a small module whose shape arithmetic lives in one method, ``num_tokens(T, h, w)``;
:func:`num_visual_tokens` is the one place that says how many tokens a video becomes, and it calls
that method, so the model, the recaption job's context check and the capacity planner agree.

- ``nframe``: no pooling, every patch of every frame (the baseline of PLLaVA Table 1, "n-frame").
- ``pllava``: PLLaVA adaptive structure pooling (PLLaVA §3.3, eq. 2): 3-D adaptive average pooling of
  ``(T, h, w)`` to ``(T', h', w')``; default ``(16, 12, 12)`` from 16 frames of a 24x24 grid (2304
  tokens). A video with fewer than ``T'`` frames is padded by repeating frames, as the reference does.
- ``mean``: Video-ChatGPT's spatial and temporal means (Video-ChatGPT §3): ``h*w`` temporal-mean tokens
  followed by ``T`` spatial-mean tokens.

Input everywhere: ``(B, T, h, w, D)`` features after the projector; output ``(B, N, D)``, same dtype.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from vidlm.config import Section

__all__ = [
    "AdaptiveStructurePooling",
    "CompressorConfig",
    "NFrame",
    "SpatialTemporalMean",
    "build_compressor",
    "num_visual_tokens",
]


class CompressorConfig(Section):
    """Which compressor, with its numbers."""

    kind: Literal["nframe", "pllava", "mean"] = "pllava"
    pooling_shape: tuple[int, int, int] = (16, 12, 12)
    """``pllava``: output ``(T', h', w')`` of the 3-D adaptive average pooling (PLLaVA default)."""
    grid: tuple[int, int] = Field((24, 24))
    """``(h, w)`` patch grid of the vision tower (24x24 for CLIP ViT-L/14-336)."""

    @model_validator(mode="after")
    def _positive(self) -> CompressorConfig:
        if min(self.pooling_shape) < 1 or min(self.grid) < 1:
            raise ValueError("pooling_shape and grid must be positive")
        return self


def _check(x: torch.Tensor) -> tuple[int, int, int, int, int]:
    if x.ndim != 5:
        raise ValueError(f"expected features (B, T, h, w, D), got shape {tuple(x.shape)}")
    return tuple(x.shape)  # type: ignore[return-value]


class NFrame(nn.Module):
    """No compression: ``(B, T, h, w, D) -> (B, T*h*w, D)``."""

    @staticmethod
    def num_tokens(t: int, h: int, w: int) -> int:
        return t * h * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h, w, d = _check(x)
        return x.reshape(b, t * h * w, d)  # (B, T, h, w, D) -> (B, T*h*w, D)


class AdaptiveStructurePooling(nn.Module):
    """PLLaVA adaptive structure pooling (PLLaVA §3.3, eq. 2).

    ``(B, T, h, w, D) -> (B, T'*h'*w', D)`` by ``adaptive_avg_pool3d`` over ``(T, h, w)``. With ``T < T'``
    the frames are first repeated (frame ``floor(i*T/T')`` at position ``i``) to ``T'``.

    Args:
        pooling_shape: ``(T', h', w')``.
    """

    def __init__(self, pooling_shape: tuple[int, int, int] = (16, 12, 12)):
        super().__init__()
        self.pooling_shape = tuple(pooling_shape)

    def num_tokens(self, t: int, h: int, w: int) -> int:
        tp, hp, wp = self.pooling_shape
        return tp * hp * wp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h, w, d = _check(x)
        tp = self.pooling_shape[0]
        if t < tp:  # pad by repetition, in time order
            idx = torch.div(torch.arange(tp, device=x.device) * t, tp, rounding_mode="floor")
            x = x[:, idx]  # (B, T, h, w, D) -> (B, T', h, w, D)
        y = x.permute(0, 4, 1, 2, 3)  # (B, T, h, w, D) -> (B, D, T, h, w)
        y = F.adaptive_avg_pool3d(y, self.pooling_shape)  # PLLaVA eq. 2 -> (B, D, T', h', w')
        return y.flatten(2).transpose(1, 2)  # (B, D, T'*h'*w') -> (B, T'*h'*w', D)


class SpatialTemporalMean(nn.Module):
    """Video-ChatGPT pooling: ``(B, T, h, w, D) -> (B, h*w + T, D)``.

    The first ``h*w`` tokens average each patch over time, the last ``T`` average each frame over space.
    """

    @staticmethod
    def num_tokens(t: int, h: int, w: int) -> int:
        return h * w + t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h, w, d = _check(x)
        temporal = x.mean(dim=1).reshape(b, h * w, d)  # (B, T, h, w, D) -> (B, h*w, D)
        spatial = x.mean(dim=(2, 3))  # (B, T, h, w, D) -> (B, T, D)
        return torch.cat([temporal, spatial], dim=1)


def build_compressor(config: CompressorConfig) -> nn.Module:
    """The compressor module a config names."""
    if config.kind == "pllava":
        return AdaptiveStructurePooling(config.pooling_shape)
    return {"nframe": NFrame, "mean": SpatialTemporalMean}[config.kind]()


def num_visual_tokens(config: CompressorConfig, num_frames: int) -> int:
    """How many LLM tokens a video of ``num_frames`` frames becomes under ``config``.

    Raises:
        ValueError: ``num_frames < 1``.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    h, w = config.grid
    return build_compressor(config).num_tokens(num_frames, h, w)
