"""Token compressors: how the projected patch features of T frames become the LLM's visual tokens.

Each compressor is a small module whose shape arithmetic lives in one method, ``num_tokens(T, h, w)``;
:func:`num_visual_tokens` is the one place that says how many tokens a video becomes, and it calls
that method, so the model, the recaption job's context check and the capacity planner agree.

- ``nframe``: no pooling, every patch of every frame (the baseline of PLLaVA Table 1, "n-frame").
- ``pllava``: PLLaVA adaptive structure pooling (PLLaVA §3.3, eq. 2): 3-D adaptive average pooling of
  ``(T, h, w)`` to ``(T', h', w')`` (the paper's shape: 16 frames of a 24x24 grid to 2304 tokens,
  :data:`vidlm.models.presets.PLLAVA_POOLING_SHAPE`). A video with fewer than ``T'`` frames is padded by
  repeating frames exactly as the reference does.
- ``slowfast``: LLaVA-Video SlowFast frame tokens ``V = (T, M, s, p)`` (LLaVA-Video §3.2): every s-th frame
  (frames ``s-1, 2s-1, ...``, so ``floor(T/s)`` of them) is *slow* and pooled ``p x p``; the others are *fast*
  and pooled ``2p x 2p``; tokens stay in time order. Pooling is LLaVA-NeXT's ``get_2dPool``
  (``llava/model/llava_arch.py``): ``average`` is ``avg_pool2d(k)`` (the paper's, "Pytorch function pooling
  avg_pool2d()"), ``max`` is ``max_pool2d(k)``, both ``floor(h/k) x floor(w/k)``; ``bilinear`` interpolates to
  ``ceil(h/k) x ceil(w/k)`` (what the LLaVA-Video releases' ``config.json`` selects). SigLIP-384's 27 x 27 grid at
  p = 2 gives 13 x 13 = 169 tokens per slow frame and 6 x 6 = 36 per fast frame (``average``), 14 x 14 = 196
  (``bilinear``). The paper's ``#tokens`` formula with ``floor(M/p^2)`` (182) is its shorthand; the count here
  comes from the pooled grid (:func:`pooled_grid`). Optionally LLaVA-NeXT's learned ``image_newline`` token is
  placed after each row of a frame's grid (``grid``), after each frame (``frame``) or once after the video
  (``one_token``), as the releases' ``mm_newline_position`` says.
- ``mean``: Video-ChatGPT's spatial and temporal means (Video-ChatGPT §3): ``h*w`` temporal-mean tokens
  followed by ``T`` spatial-mean tokens.
- ``global``: one token per frame, the frame's pooled CLIP embedding (TOPA §3.2); input ``(B, T, 1, 1, D)``.
- ``none``: no patch tokens: the clip reaches the LLM only through the tokens the model appends after the
  compressor's (its summary, region summaries and focus token, :func:`appended_tokens`).

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
    "NoPatchTokens",
    "REGION_ORDERS",
    "RegionSummaries",
    "SlowFast",
    "SpatialTemporalMean",
    "VisualMotion",
    "VisualPositionEmbedding",
    "appearance_order",
    "check_region_order",
    "pool_2d",
    "pooled_grid",
    "spatial_soft_argmax",
    "appended_tokens",
    "build_compressor",
    "num_visual_tokens",
]


PoolMode = Literal["average", "bilinear", "max"]
NewlinePosition = Literal["none", "grid", "frame", "one_token"]


class CompressorConfig(Section):
    """Which compressor, with its numbers."""

    kind: Literal["nframe", "pllava", "slowfast", "mean", "global", "none"] = "pllava"
    pooling_shape: tuple[int, int, int] | None = None
    """``pllava`` (required there): output ``(T', h', w')`` of the 3-D adaptive average pooling; the paper's shape
    is :data:`vidlm.models.presets.PLLAVA_POOLING_SHAPE`."""
    slow_stride: int = Field(1, ge=1)
    """``slowfast``: s, every s-th frame is slow (1: every frame, the simple representation; Table 5's SlowFast: 3)."""
    slow_pool: int = Field(2, ge=1)
    """``slowfast``: p, the slow frames' pooling side; fast frames pool 2p (LLaVA-Video: 2)."""
    pool_mode: PoolMode = "average"
    """``slowfast``: ``average`` (``avg_pool2d``, the paper's), ``bilinear`` or ``max`` (LLaVA-NeXT's
    ``mm_spatial_pool_mode``)."""
    newline: NewlinePosition = "none"
    """``slowfast``: where LLaVA-NeXT's learned ``image_newline`` token goes (``mm_newline_position``)."""
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


class NoPatchTokens(nn.Module):
    """No patch tokens: ``(B, T, h, w, D) -> (B, 0, D)``; the model's appended tokens are the clip's only ones."""

    @staticmethod
    def num_tokens(t: int, h: int, w: int) -> int:
        return 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, _, _, d = _check(x)
        return x.new_zeros(b, 0, d)


class AdaptiveStructurePooling(nn.Module):
    """PLLaVA adaptive structure pooling (PLLaVA §3.3, eq. 2).

    ``(B, T, h, w, D) -> (B, T'*h'*w', D)`` by ``adaptive_avg_pool3d`` over ``(T, h, w)``. A video with
    ``T < T'`` frames is first padded as the reference does (``PllavaMultiModalProjector``:
    ``repeat_interleave(int(T'/T) + 1)[:T']``, each frame repeated ``m = int(T'/T) + 1`` times and the tail cut),
    so frame ``floor(i/m)`` sits at position ``i``. The reference then asserts ``T % T' == 0``; here any
    ``T >= T'`` is pooled adaptively (uniform frame sampling gives ``T'`` frames, where the two agree).

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
        if t < tp:  # PLLaVA's padding, in time order
            x = x.repeat_interleave(tp // t + 1, dim=1)[:, :tp]  # (B, T, h, w, D) -> (B, T', h, w, D)
        y = x.permute(0, 4, 1, 2, 3)  # (B, T, h, w, D) -> (B, D, T, h, w)
        y = F.adaptive_avg_pool3d(y, self.pooling_shape)  # PLLaVA eq. 2 -> (B, D, T', h', w')
        return y.flatten(2).transpose(1, 2)  # (B, D, T'*h'*w') -> (B, T'*h'*w', D)


def pooled_grid(h: int, w: int, k: int, mode: PoolMode = "average") -> tuple[int, int]:
    """The ``(h', w')`` grid LLaVA-NeXT's ``get_2dPool`` leaves of an ``h x w`` patch grid with stride ``k``.

    ``average`` / ``max`` (``avg_pool2d(k)`` / ``max_pool2d(k)``): ``(floor(h/k), floor(w/k))``; ``bilinear``
    (``interpolate`` to ``ceil(h/k) x ceil(w/k)``). LLaVA-Video Table 4: ``M/p^2 = 169`` for SigLIP's 27 x 27 at
    p = 2, i.e. 13 x 13.

    Raises:
        ValueError: nothing would be left (``k > h`` or ``k > w`` with floor pooling).
    """
    hw = (math.ceil(h / k), math.ceil(w / k)) if mode == "bilinear" else (h // k, w // k)
    if min(hw) < 1:
        raise ValueError(f"pooling {k}x{k} leaves no token of a {h}x{w} grid")
    return hw


def pool_2d(frames: torch.Tensor, k: int, mode: PoolMode) -> torch.Tensor:
    """LLaVA-NeXT ``get_2dPool``: ``(N, D, h, w) -> (N, D, h', w')`` with ``(h', w') = pooled_grid(h, w, k, mode)``."""
    if mode == "average":
        return F.avg_pool2d(frames, k)
    if mode == "max":
        return F.max_pool2d(frames, k)
    return F.interpolate(frames, size=pooled_grid(*frames.shape[-2:], k, mode), mode="bilinear")


class SlowFast(nn.Module):
    """LLaVA-Video SlowFast frame tokens ``V = (T, M, s, p)`` (LLaVA-Video §3.2).

    ``(B, T, h, w, D) -> (B, N, D)``: frame ``i`` is slow when ``(i+1) % s == 0`` and pooled ``p x p``, else
    pooled ``2p x 2p`` (:func:`pool_2d`); each frame's tokens (row-major) follow the previous frame's.
    ``N = sum_i h'_i * w'_i`` plus the newline tokens (:meth:`num_tokens`).

    Args:
        slow_stride: s.
        slow_pool: p.
        pool_mode: ``average`` (the paper's ``avg_pool2d``), ``bilinear`` or ``max`` (LLaVA-NeXT's
            ``mm_spatial_pool_mode``).
        newline: where the learned ``image_newline`` ``(D,)`` goes (LLaVA-NeXT's ``mm_newline_position``):
            ``grid`` after each row of every frame, ``frame`` after every frame, ``one_token`` once at the end,
            ``none`` nowhere.
        dim: D, the width of the newline parameter (needed unless ``newline == "none"``).

    Raises:
        ValueError: a newline without ``dim``.
    """

    def __init__(
        self,
        slow_stride: int = 1,
        slow_pool: int = 2,
        pool_mode: PoolMode = "average",
        newline: NewlinePosition = "none",
        dim: int | None = None,
    ):
        super().__init__()
        self.slow_stride, self.slow_pool, self.pool_mode, self.newline = slow_stride, slow_pool, pool_mode, newline
        if newline != "none":
            if not dim:
                raise ValueError(f"newline={newline!r} needs the token width dim")
            self.image_newline = nn.Parameter(torch.randn(dim) / math.sqrt(dim))  # LLaVA-NeXT's init
        else:
            self.image_newline = None

    def frame_grid(self, slow: bool, h: int, w: int) -> tuple[int, int]:
        """``(h', w')`` of a slow or a fast frame."""
        return pooled_grid(h, w, self.slow_pool * (1 if slow else 2), self.pool_mode)

    def num_tokens(self, t: int, h: int, w: int) -> int:
        """Tokens of ``t`` frames of an ``h x w`` grid: the pooled grids' cells plus the newline tokens."""
        total = 0
        for slow in self.is_slow(t).tolist():
            gh, gw = self.frame_grid(slow, h, w)
            total += gh * gw + {"grid": gh, "frame": 1}.get(self.newline, 0)
        return total + (self.newline == "one_token")

    def is_slow(self, t: int) -> torch.Tensor:
        """``(T,) bool``: which frames are slow."""
        return (torch.arange(t) + 1) % self.slow_stride == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h, w, d = _check(x)
        frames = x.permute(0, 1, 4, 2, 3).reshape(b * t, d, h, w)  # (B, T, h, w, D) -> (B*T, D, h, w)
        pooled = {
            slow: pool_2d(frames, self.slow_pool * (1 if slow else 2), self.pool_mode).reshape(b, t, d, *hw)
            for slow, hw in ((True, self.frame_grid(True, h, w)), (False, self.frame_grid(False, h, w)))
        }  # slow / fast: (B, T, D, h', w')
        newline = None if self.image_newline is None else self.image_newline.to(x.dtype).view(1, d, 1)
        per_frame = []
        for i, slow in enumerate(self.is_slow(t).tolist()):
            grid = pooled[slow][:, i]  # (B, D, h', w')
            if self.newline == "grid":  # LLaVA-NeXT add_token_per_grid: a newline after each row
                rows = newline[..., None].expand(b, d, grid.shape[2], 1)
                grid = torch.cat([grid, rows], dim=3)  # (B, D, h', w'+1)
            tokens = grid.flatten(2)  # (B, D, h'*w' [+h'])
            if self.newline == "frame":  # add_token_per_frame
                tokens = torch.cat([tokens, newline.expand(b, d, 1)], dim=2)
            per_frame.append(tokens)
        if self.newline == "one_token":
            per_frame.append(newline.expand(b, d, 1))
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


class VisualPositionEmbedding(nn.Module):
    """A learned embedding per patch of the tower's grid, added to every frame's patch features at the compressor's
    input (:attr:`~vidlm.models.video_llm.VidlmConfig.visual_position_embedding`).

    Args:
        grid: ``(h, w)``, the tower's patch grid.
        dim: D, the compressor's input width.
        std: the initial weights' standard deviation (0.02: CLIP's and BERT's position embeddings).

    Shapes:
        ``(B, T, h, w, D) -> (B, T, h, w, D)``, in the input's dtype; ``weight (h, w, D)``.
    """

    def __init__(self, grid: tuple[int, int], dim: int, std: float = 0.02):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(*grid, dim) * std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check(x)
        return x + self.weight.to(x.dtype)


def spatial_soft_argmax(x: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Each feature channel's expected patch position under its softmax over the patch grid at scale
    ``exp(log_scale)`` (the spatial softmax of Levine et al. 2016, "End-to-End Training of Deep Visuomotor Policies").

    Args:
        x: ``(T, h, w, D)`` float, patch features.
        log_scale: ``(1,)``, the softmax's log scale.

    Returns:
        ``(T, 2, D)`` float32: each channel's expected x and y per frame, in grid units (-1 to 1 across the grid).
    """
    _, h, w, _ = x.shape
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    where = torch.stack([xs.flatten(), ys.flatten()], dim=-1).to(x.device)  # (h*w, 2): x, y of each patch
    weights = torch.softmax(x.float().flatten(1, 2) * log_scale.float().exp(), dim=1)  # (T, h*w, D)
    return torch.einsum("tnd,nk->tkd", weights, where)  # (T, 2, D)


class VisualMotion(nn.Module):
    """A clip's motion: where its patch features went between its first and last frames, one ``Dl`` vector that the
    clip's summary adds (:attr:`~vidlm.models.video_llm.VidlmConfig.visual_motion`).

    Each feature channel's spatial soft-argmax per frame -- its softmax over the patch grid, at a learned scale, and
    the expected patch position under it (the spatial softmax of Levine et al. 2016, "End-to-End Training of Deep
    Visuomotor Policies": each feature map's expected 2-D position, at a learned temperature) -- gives where that
    channel fires; the displacement from the first frame to the last, ``(2, Dv)`` in grid units (x and y from -1 to
    1), goes through a linear layer. A channel that fires on a moving object moves with it, one that fires
    everywhere stays in the middle: the vector says which way an object went, which no maximum or mean over the
    frames can.

    Args:
        grid: ``(h, w)``, the tower's patch grid.
        dim: Dv, the patch features' width.
        out_dim: Dl, the LLM's width.

    Shapes:
        ``(T, h, w, Dv) -> (Dl,)``, in the linear layer's dtype; ``log_scale (1,)`` (the softmax's scale is
        ``exp(log_scale)``, 1 at first), ``linear (2 Dv -> Dl)``.

    Raises:
        ValueError: features of another shape.
    """

    def __init__(self, grid: tuple[int, int], dim: int, out_dim: int):
        super().__init__()
        self.grid, self.dim = tuple(grid), dim
        self.log_scale = nn.Parameter(torch.zeros(1))  # (1,): DeepSpeed broadcasts no 0-dim parameter
        self.linear = nn.Linear(2 * dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.grid
        if x.ndim != 4 or tuple(x.shape[1:]) != (h, w, self.dim):
            raise ValueError(f"expected patch features (T, {h}, {w}, {self.dim}), got {tuple(x.shape)}")
        positions = spatial_soft_argmax(x, self.log_scale)  # (T, 2, Dv): each channel's expected x, y
        moved = (positions[-1] - positions[0]).flatten()  # (2 Dv,)
        return self.linear(moved.to(self.linear.weight.dtype))  # (Dl,)


REGION_ORDERS = ("grid", "appearance")
"""The orders of :class:`RegionSummaries`' tokens (``VidlmConfig.visual_region_order``): row-major, or the order the
regions' objects appear in (:func:`appearance_order`)."""


def check_region_order(order: object) -> None:
    """Raises ValueError naming ``visual_region_order`` and :data:`REGION_ORDERS`: ``order`` is none of them."""
    if not isinstance(order, str) or order not in REGION_ORDERS:
        known = ", ".join(repr(o) for o in REGION_ORDERS)
        raise ValueError(f"visual_region_order must be one of {known}, got {order!r}")


class RegionSummaries(nn.Module):
    """A clip's region summaries: one ``Dl`` token per region of an ``R x R`` split of the patch grid
    (:attr:`~vidlm.models.video_llm.VidlmConfig.visual_region_tokens`), each the clip's summary
    (:func:`~vidlm.models.caption_words.clip_summaries`) of that region alone -- the projector of the maximum of its
    patch features over the clip's frames and patches -- plus the region's motion through a linear layer. Where
    several objects share a clip, each is alone in its region more often than not, so a region's token holds one
    object's colour, shape and motion together, which one maximum over the whole grid mixes.

    The regions are adaptive pooling's bins (rows ``floor(i h / R)`` to ``ceil((i + 1) h / R)``; neighbours share a
    row or column when ``R`` does not divide ``h``), in row-major order. A region's motion: each feature channel's
    spatial soft-argmax in the region per frame (:class:`VisualMotion`'s, at a learned scale), and its velocity -- the
    least-squares slope of that position against time (the frames spread from 0 to 1), each frame weighted by how
    strongly the channel fires in the region (the sigmoid of its maximum there, at a learned scale and bias per
    channel), so an object that appears late is timed from the frames it is in -- with the channel's weighted mean
    time (when it is there): ``(3, Dv)``, through the linear layer.

    The tokens come in the regions' row-major order (``order="grid"``), or in the order their objects appear
    (``"appearance"``, :func:`appearance_order`), so that the k-th sentence of a caption that tells the objects in
    that order reads the k-th token.

    Args:
        grid: ``(h, w)``, the tower's patch grid, ``h, w >= regions``.
        regions: ``R``, regions per side.
        dim: Dv, the patch features' width.
        out_dim: Dl, the LLM's width.
        order: one of :data:`REGION_ORDERS`.

    Shapes:
        ``(T, h, w, Dv)`` float and the projector ``Dv -> Dl`` -> ``(R * R, Dl)``, in the projector's dtype;
        ``log_scale (1,)``, ``presence_scale (Dv,)`` (ones at first), ``presence_bias (Dv,)`` (zeros),
        ``linear (3 Dv -> Dl)``.

    Raises:
        ValueError: features of another shape (``forward``); a grid smaller than ``R`` or an ``order`` not in
            :data:`REGION_ORDERS` (``__init__``).
    """

    def __init__(self, grid: tuple[int, int], regions: int, dim: int, out_dim: int, *, order: str):
        super().__init__()
        h, w = grid
        if not 1 <= regions <= min(h, w):
            raise ValueError(f"visual_region_tokens: {regions} regions a side do not fit a {h} x {w} patch grid")
        check_region_order(order)
        self.grid, self.regions, self.dim, self.order = (h, w), regions, dim, order
        self.log_scale = nn.Parameter(torch.zeros(1))  # (1,): DeepSpeed broadcasts no 0-dim parameter
        self.presence_scale = nn.Parameter(torch.ones(dim))
        self.presence_bias = nn.Parameter(torch.zeros(dim))
        self.linear = nn.Linear(3 * dim, out_dim)

    def bins(self, size: int) -> list[tuple[int, int]]:
        """Adaptive pooling's ``R`` bins ``(start, end)`` of ``size`` rows or columns."""
        return [(i * size // self.regions, -(-(i + 1) * size // self.regions)) for i in range(self.regions)]

    def measure(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each region's maximum and motion, and the tokens' order: ``(T, h, w, Dv) -> (R * R, Dv), (R * R, 3 Dv)``
        float32 and ``(R * R,)`` int64 (row-major region indices; :func:`appearance_order`'s for ``"appearance"``).
        The motion is each channel's velocity in x (``[:Dv]``), in y (``[Dv:2 Dv]``; grid units, -1 to 1 across the
        region, per clip) and its mean time (``[2 Dv:]``, 0 the first frame, 1 the last)."""
        h, w = self.grid
        if x.ndim != 4 or tuple(x.shape[1:]) != (h, w, self.dim):
            raise ValueError(f"expected patch features (T, {h}, {w}, {self.dim}), got {tuple(x.shape)}")
        x = x.float()
        time = torch.linspace(0, 1, x.shape[0], device=x.device)[:, None]  # (T, 1)
        maxima, motions, peaks = [], [], []
        for top, bottom in self.bins(h):
            for left, right in self.bins(w):
                region = x[:, top:bottom, left:right]  # (T, hr, wr, Dv)
                positions = spatial_soft_argmax(region, self.log_scale)  # (T, 2, Dv), in the region's own units
                peak = region.flatten(1, 2).max(dim=1).values  # (T, Dv)
                presence = torch.sigmoid(peak * self.presence_scale.float() + self.presence_bias.float())
                presence = presence / (presence.sum(0, keepdim=True) + 1e-6)  # (T, Dv), sums to 1 over time
                when = (presence * time).sum(0)  # (Dv,)
                spread = time - when  # (T, Dv)
                centre = (presence[:, None] * positions).sum(0)  # (2, Dv)
                slope = (presence * spread)[:, None] * (positions - centre)  # (T, 2, Dv)
                velocity = slope.sum(0) / ((presence * spread * spread).sum(0) + 1e-3)  # (2, Dv)
                peaks.append(peak)
                maxima.append(peak.max(dim=0).values)
                motions.append(torch.cat([velocity.flatten(), when]))  # (3 Dv,)
        if self.order == "appearance":
            order = appearance_order(torch.stack(peaks))
        else:
            order = torch.arange(len(peaks), device=x.device)
        return torch.stack(maxima), torch.stack(motions), order

    def forward(self, x: torch.Tensor, projector: nn.Module) -> torch.Tensor:
        maxima, motions, order = self.measure(x)
        summaries = projector(maxima.to(next(projector.parameters()).dtype))  # (R*R, Dl)
        tokens = summaries + self.linear(motions.to(self.linear.weight.dtype)).to(summaries.dtype)
        return tokens[order]


def appearance_order(peaks: torch.Tensor) -> torch.Tensor:
    """The regions in the order their objects appear, then the regions that hold none, in row-major order.

    A region's activity in a frame is how far its maximum patch features lie from the frame's background: the
    Euclidean distance of its ``(Dv,)`` maximum from the median of all regions' maxima in that frame (per channel; the
    lower middle value for an even count; most regions of a clip hold no object). A region holds an object where its
    highest activity over the frames is at least half the clip's highest; those regions come first, in the order of
    their activity-weighted mean time (0 the first frame, 1 the last; an object that appears later is active in later
    frames only), ties in row-major order. No region active (all alike): row-major order.

    Args:
        peaks: ``(N, T, Dv)`` float, each of ``N`` regions' maximum patch features per frame.

    Returns:
        ``(N,)`` int64, a permutation of the region indices.
    """
    activity = (peaks - peaks.median(dim=0).values).norm(dim=-1)  # (N, T)
    strength = activity.max(dim=1).values  # (N,)
    time = torch.linspace(0, 1, peaks.shape[1], device=peaks.device)
    when = (activity * time).sum(dim=1) / activity.sum(dim=1).clamp_min(1e-12)  # (N,)
    key = torch.where(strength >= 0.5 * strength.max(), when, torch.full_like(when, 2.0))  # inactive: after all
    return torch.sort(key, stable=True).indices


class QuestionFocus(nn.Module):
    """A clip's focus token: its region summaries weighed by their match to the question's words, so that the LLM
    reads the object a question names from one token instead of finding it among the regions
    (:attr:`~vidlm.models.video_llm.VidlmConfig.visual_focus_token`; docs/tutorial-findings.md, "The lookup in the
    connector").

    For question token ids ``q`` (``Q``) with input embeddings ``e`` and region tokens ``r`` (``R * R``): the cosines
    ``c = norm(e) norm(r)^T`` ``(Q, R * R)``, less each word's mean over the regions (a word as like every region
    weighs nothing); each word's row times its weight ``word_weights[q]``; summed over the words and divided by the
    temperature ``tau``; the softmax over the regions weighs the region tokens: ``softmax(sum_j w_j c_j / tau) r``.
    The weights are the words' inverse document frequencies over the training captions' sentences
    (:func:`~vidlm.models.caption_words.word_weights`, set by the ``words`` recipe): a word no caption holds, as the
    chat template's and most of a question's, weighs 0. No question word weighed (or all weights 0): the regions'
    mean. Nothing is learnt.

    Args:
        vocab_size: V, the LLM's vocabulary (ids from ``V`` on weigh 0).
        temperature: ``tau`` of the softmax over the regions.

    Shapes:
        ``word_weights (V,) float32`` (a buffer, saved with the weights; zeros at first); ``forward``: regions
        ``(R * R, Dl)``, question ids ``(Q,) int64`` and their embeddings ``(Q, Dl)`` -> ``(Dl,)`` in the regions'
        dtype.
    """

    def __init__(self, vocab_size: int, temperature: float):
        super().__init__()
        self.temperature = temperature
        self.register_buffer("word_weights", torch.zeros(vocab_size))

    def forward(self, regions: torch.Tensor, ids: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        known = ids < self.word_weights.shape[0]
        weights = torch.zeros(ids.shape, device=regions.device)
        weights[known] = self.word_weights[ids[known]].float()  # (Q,)
        cosines = F.normalize(words.float(), dim=-1) @ F.normalize(regions.float(), dim=-1).T  # (Q, R*R)
        cosines = cosines - cosines.mean(dim=1, keepdim=True)
        scores = (weights[:, None] * cosines).sum(dim=0) / self.temperature  # (R*R,)
        return torch.softmax(scores, dim=0).to(regions.dtype) @ regions  # (Dl,)


def build_compressor(config: CompressorConfig, dim: int | None = None) -> nn.Module:
    """The compressor module a config names; ``dim``: the token width D (for SlowFast's newline parameter)."""
    if config.kind == "pllava":
        return AdaptiveStructurePooling(config.pooling_shape)
    if config.kind == "slowfast":
        return SlowFast(config.slow_stride, config.slow_pool, config.pool_mode, config.newline, dim)
    return {"nframe": NFrame, "mean": SpatialTemporalMean, "global": GlobalFrames, "none": NoPatchTokens}[config.kind]()


def appended_tokens(summary_token: bool, region_tokens: int, focus_token: bool = False) -> int:
    """Tokens a model appends per clip after its compressor's: one summary token (``VidlmConfig.visual_summary_token``),
    ``R * R`` region summaries (``VidlmConfig.visual_region_tokens``, ``R``) and one focus token
    (``VidlmConfig.visual_focus_token``)."""
    return int(summary_token) + region_tokens**2 + int(focus_token)


def num_visual_tokens(config: CompressorConfig, num_frames: int, summary_tokens: int = 0) -> int:
    """How many LLM tokens a video of ``num_frames`` frames becomes under ``config``, plus ``summary_tokens`` the
    model appends per clip (:func:`appended_tokens`).

    Raises:
        ValueError: ``num_frames < 1``.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    h, w = (1, 1) if config.kind == "global" else config.grid
    return build_compressor(config, dim=1).num_tokens(num_frames, h, w) + summary_tokens  # never reads the width
