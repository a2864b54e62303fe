"""Token compressors: how the projected patch features of T frames become the LLM's visual tokens.

Each compressor is a small module whose shape arithmetic lives in one method, ``num_tokens(T, h, w)``;
:func:`num_visual_tokens` is the one place that says how many tokens a video becomes, and it calls
that method, so the model, the recaption job's context check and the capacity planner agree.

- ``nframe``: no pooling, every patch of every frame (the baseline of PLLaVA Table 1, "n-frame").
- ``pllava``: PLLaVA adaptive structure pooling (PLLaVA §3.3, eq. 2): 3-D adaptive average pooling of
  ``(T, h, w)`` to ``(T', h', w')`` (the paper's shape: 16 frames of a 24x24 grid to 2304 tokens,
  :data:`vidlm.models.presets.PLLAVA_POOLING_SHAPE`). A video with fewer than ``T'`` frames is padded by
  repeating frames, as the reference does.
- ``slowfast``: LLaVA-Video SlowFast frame tokens ``V = (T, M, s, p)`` (LLaVA-Video §3.2): every s-th frame
  (frames ``s-1, 2s-1, ...``, so ``floor(T/s)`` of them) is *slow* and pooled ``p x p``; the others are *fast*
  and pooled ``2p x 2p``; tokens stay in time order. The token count is the paper's
  ``floor(T/s)*floor(M/p^2) + (T-floor(T/s))*floor(M/(4p^2))`` exactly: a ``k x k`` pooling of an
  ``h x w`` grid whose sides ``k`` does not divide (27x27 SigLIP-384 patches) cannot give ``floor(M/k^2)``
  tokens by striding (ceil gives 196, floor 169, the formula 182), so each frame is adaptive-average-pooled
  to the ``(h', w')`` with ``h'*w' = floor(M/k^2)`` whose aspect is nearest the grid's (13x14 for 182).
  Where ``k`` divides both sides this *is* the plain ``k x k`` average pooling (24x24 -> 12x12, as
  LLaVA-NeXT-Video's ``AvgPool2d(2)``).
- ``mean``: Video-ChatGPT's spatial and temporal means (Video-ChatGPT §3): ``h*w`` temporal-mean tokens
  followed by ``T`` spatial-mean tokens.
- ``global``: one token per frame, the frame's pooled CLIP embedding (TOPA §3.2); input ``(B, T, 1, 1, D)``.

Input everywhere: ``(B, T, h, w, D)`` features after the projector; output ``(B, N, D)``, same dtype.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from vidlm.config import Section

__all__ = [
    "AdaptiveStructurePooling",
    "CompressorConfig",
    "GlobalFrames",
    "NFrame",
    "SlowFast",
    "SpatialTemporalMean",
    "pooled_grid",
    "build_compressor",
    "num_visual_tokens",
]


class CompressorConfig(Section):
    """Which compressor, with its numbers."""

    kind: Literal["nframe", "pllava", "slowfast", "mean", "global"] = "pllava"
    pooling_shape: tuple[int, int, int] | None = None
    """``pllava`` (required there): output ``(T', h', w')`` of the 3-D adaptive average pooling; the paper's shape
    is :data:`vidlm.models.presets.PLLAVA_POOLING_SHAPE`."""
    slow_stride: int = Field(1, ge=1)
    """``slowfast``: s, every s-th frame is slow (LLaVA-Video: 1 for 7B's 64x182 tokens, 3 for the fast mode)."""
    slow_pool: int = Field(2, ge=1)
    """``slowfast``: p, the slow frames' pooling side; fast frames pool 2p (LLaVA-Video: 2)."""
    grid: tuple[int, int] = Field((24, 24))
    """``(h, w)`` patch grid of the vision tower (24x24 for CLIP ViT-L/14-336)."""

    @model_validator(mode="after")
    def _positive(self) -> CompressorConfig:
        if self.kind == "pllava" and self.pooling_shape is None:
            raise ValueError("compressor.kind 'pllava' needs pooling_shape (T', h', w')")
        if min(self.pooling_shape or (1,)) < 1 or min(self.grid) < 1:
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

    def __init__(self, pooling_shape: tuple[int, int, int]):
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


def pooled_grid(h: int, w: int, k: int) -> tuple[int, int]:
    """The ``(h', w')`` grid a ``k x k`` pooling of an ``h x w`` patch grid gives: ``h'*w' = floor(h*w/k^2)``.

    ``(h/k, w/k)`` when ``k`` divides both sides; otherwise the factor pair of ``floor(h*w/k^2)`` whose
    aspect ``h'/w'`` is nearest ``h/w`` (ties: fewer rows), so the count is LLaVA-Video's formula exactly.

    Raises:
        ValueError: ``k*k > h*w`` (nothing would be left).
    """
    n = (h * w) // (k * k)  # LLaVA-Video SlowFast #tokens per frame
    if n < 1:
        raise ValueError(f"pooling {k}x{k} leaves no token of a {h}x{w} grid")
    if h % k == 0 and w % k == 0:
        return h // k, w // k
    pairs = [(a, n // a) for a in range(1, n + 1) if n % a == 0]
    return min(pairs, key=lambda hw: (round(abs(math.log(hw[0] / hw[1]) - math.log(h / w)), 9), hw[0]))


class SlowFast(nn.Module):
    """LLaVA-Video SlowFast frame tokens ``V = (T, M, s, p)`` (LLaVA-Video §3.2).

    ``(B, T, h, w, D) -> (B, N, D)`` with ``N = floor(T/s)*floor(M/p^2) + (T-floor(T/s))*floor(M/(4p^2))``,
    ``M = h*w``. Frame ``i`` is slow when ``(i+1) % s == 0``; each frame's tokens follow the previous frame's.

    Args:
        slow_stride: s.
        slow_pool: p.
    """

    def __init__(self, slow_stride: int = 1, slow_pool: int = 2):
        super().__init__()
        self.slow_stride, self.slow_pool = slow_stride, slow_pool

    def num_tokens(self, t: int, h: int, w: int) -> int:
        m, s, p = h * w, self.slow_stride, self.slow_pool
        return (t // s) * (m // p**2) + (t - t // s) * (m // (4 * p**2))  # LLaVA-Video SlowFast #tokens

    def is_slow(self, t: int) -> torch.Tensor:
        """``(T,) bool``: which frames are slow."""
        return (torch.arange(t) + 1) % self.slow_stride == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h, w, d = _check(x)
        frames = x.permute(0, 1, 4, 2, 3).reshape(b * t, d, h, w)  # (B, T, h, w, D) -> (B*T, D, h, w)
        slow_hw = pooled_grid(h, w, self.slow_pool)
        fast_hw = pooled_grid(h, w, 2 * self.slow_pool)
        slow = F.adaptive_avg_pool2d(frames, slow_hw).reshape(b, t, d, -1)  # (B, T, D, h's*w's)
        fast = F.adaptive_avg_pool2d(frames, fast_hw).reshape(b, t, d, -1)  # (B, T, D, h'f*w'f)
        per_frame = [(slow if is_slow else fast)[:, i] for i, is_slow in enumerate(self.is_slow(t).tolist())]
        return torch.cat(per_frame, dim=2).transpose(1, 2)  # (B, D, N) -> (B, N, D), frames in time order


class GlobalFrames(nn.Module):
    """TOPA: one token per frame, its pooled embedding: ``(B, T, 1, 1, D) -> (B, T, D)``."""

    @staticmethod
    def num_tokens(t: int, h: int, w: int) -> int:
        return t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h, w, d = _check(x)
        if (h, w) != (1, 1):
            raise ValueError(f"global compressor expects (B, T, 1, 1, D), got {tuple(x.shape)}")
        return x.reshape(b, t, d)


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
    if config.kind == "slowfast":
        return SlowFast(config.slow_stride, config.slow_pool)
    return {"nframe": NFrame, "mean": SpatialTemporalMean, "global": GlobalFrames}[config.kind]()


def num_visual_tokens(config: CompressorConfig, num_frames: int) -> int:
    """How many LLM tokens a video of ``num_frames`` frames becomes under ``config``.

    Raises:
        ValueError: ``num_frames < 1``.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    h, w = (1, 1) if config.kind == "global" else config.grid
    return build_compressor(config).num_tokens(num_frames, h, w)
