"""Frame sampling inside a clip window: which frame indices a model sees.

Four modes, each from a reference implementation:

- ``uniform``: the centre of each of ``num_frames`` equal segments (PLLaVA evaluation,
  ``get_index`` in ``tasks/eval/*``).
- ``random``: one random point inside each segment (PLLaVA / VideoChat2 training).
- ``fps``: one frame every ``1/fps`` seconds; past ``max_frames`` (LLaVA-Video ``frames_upbound``),
  or always when ``force_sample`` is set, ``max_frames`` frames evenly spaced over the window
  (``np.linspace``), as LLaVA-Video's ``load_video`` does.
- ``fixed``: ``num_frames`` evenly spaced frames including both ends of the window (TOPA, 10 frames).

The arithmetic is pure: frame counts in, int64 indices out, and allocates only the ``T`` indices returned,
whatever a header or a request claims (a billion frames, 1e5 fps). Timestamps are ``index / video_fps`` in
seconds. A window is clamped to ``[0, duration)``; a window with no frame inside raises
:class:`EmptyWindowError`, which the pipelines turn into an error row.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field

from vidlm.config import Section

__all__ = ["EmptyWindowError", "SamplingConfig", "request_sampling", "sample_frame_indices", "window_frame_range"]

SamplingMode = Literal["uniform", "random", "fps", "fixed"]


class SamplingConfig(Section):
    """How frames are picked inside a clip window."""

    mode: SamplingMode = "uniform"
    """One of ``uniform`` (PLLaVA eval), ``random`` (PLLaVA train), ``fps`` (LLaVA-Video), ``fixed`` (TOPA)."""
    num_frames: int = Field(16, gt=0)
    """Frames per clip for ``uniform``, ``random`` and ``fixed`` (PLLaVA: 16; TOPA: 10)."""
    fps: float = Field(1.0, gt=0)
    """Frames per second for ``fps`` mode."""
    max_frames: int = Field(64, gt=0)
    """Frame cap for ``fps`` mode (LLaVA-Video ``frames_upbound``); above it, evenly spaced frames."""
    force_sample: bool = False
    """``fps`` mode: always take ``max_frames`` evenly spaced frames (LLaVA-Video ``force_sample``)."""
    seed: int = 0
    """Seed of ``random`` mode; combined with the clip id so each clip draws its own points."""

    def max_frames_per_clip(self) -> int:
        """The largest number of frames this config can return for one clip."""
        return self.max_frames if self.mode == "fps" else self.num_frames


class EmptyWindowError(ValueError):
    """The clip window holds no frame of the video (it starts past the end, or is empty)."""


def window_frame_range(
    num_video_frames: int, video_fps: float, start_s: float | None, end_s: float | None
) -> tuple[int, int]:
    """First and last frame index (inclusive) whose timestamps lie in ``[start_s, end_s)``.

    Args:
        num_video_frames: frames in the video (>= 0).
        video_fps: frames per second (> 0).
        start_s: window start in seconds; ``None`` means 0.
        end_s: window end in seconds; ``None`` means the end of the video. Clamped to the duration.

    Raises:
        EmptyWindowError: no frame lies inside the clamped window.
    """
    if video_fps <= 0 or not math.isfinite(video_fps):
        raise EmptyWindowError(f"video reports fps={video_fps}; cannot place the window in frames")
    start = max(0.0, start_s or 0.0)
    first = math.ceil(start * video_fps - 1e-6)
    last = num_video_frames - 1 if end_s is None else min(num_video_frames - 1, math.ceil(end_s * video_fps - 1e-6) - 1)
    if num_video_frames <= 0 or first > last:
        duration = num_video_frames / video_fps
        raise EmptyWindowError(
            f"window [{start_s}, {end_s}) s holds no frame: video has {num_video_frames} frames "
            f"({duration:.3f} s at {video_fps:.3f} fps)"
        )
    return first, last


def sample_frame_indices(
    config: SamplingConfig,
    num_video_frames: int,
    video_fps: float,
    start_s: float | None = None,
    end_s: float | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Frame indices to decode for one clip window.

    Args:
        config: the sampling mode and its numbers.
        num_video_frames: frames in the whole video.
        video_fps: the video's average frame rate (frames per second).
        start_s, end_s: the clip window in seconds (``None``: start / end of the video).
        rng: generator for ``random`` mode (a fresh one seeded with ``config.seed`` if omitted).

    Returns:
        ``(T,) int64`` indices, non-decreasing, all inside the window. ``T`` is ``num_frames`` for
        ``uniform`` / ``random`` / ``fixed`` (indices repeat when the window has fewer frames) and
        ``min(ceil(window / step), max_frames)`` for ``fps``.

    Raises:
        EmptyWindowError: the window holds no frame.
    """
    first, last = window_frame_range(num_video_frames, video_fps, start_s, end_s)
    n = last - first + 1  # frames inside the window
    t = config.num_frames
    if config.mode in ("uniform", "random"):
        seg = n / t  # segment length in frames
        if config.mode == "uniform":
            offsets = np.floor(seg * (np.arange(t) + 0.5))  # segment centres
        else:
            rng = rng if rng is not None else np.random.default_rng(config.seed)
            offsets = np.floor(seg * np.arange(t) + rng.uniform(0.0, seg, size=t))
        idx = first + np.clip(offsets, 0, n - 1)
    elif config.mode == "fixed":
        idx = np.round(np.linspace(first, last, t))
    else:  # fps
        ratio = video_fps / config.fps  # LLaVA-Video's step: round(avg_fps / fps), at most the window
        step = n if not math.isfinite(ratio) or ratio > n else max(1, round(ratio))
        count = (last - first) // step + 1  # frames of np.arange(first, last + 1, step), counted first
        if config.force_sample or count > config.max_frames:
            idx = np.linspace(first, last, config.max_frames).astype(np.int64)
        else:
            idx = np.arange(first, last + 1, step)
    return np.asarray(idx, dtype=np.int64)


def request_sampling(model: SamplingConfig, num_frames: int | None = None, fps: float | None = None) -> SamplingConfig:
    """The frame sampling of one endpoint request: the model's own, or the ``num_frames`` / ``fps`` it asks for.

    Serving is deterministic, so the model's ``random`` (training) mode serves as ``uniform`` (PLLaVA
    evaluates with segment centres). The endpoint checks the frame counts against the model's cap before
    calling this.

    Args:
        model: the model's sampling (its ``config.json``), what it was trained on.
        num_frames: frames asked for (frames); alone: ``uniform`` with that many (``fixed`` stays ``fixed``).
        fps: frames per second asked for; alone: ``fps`` mode capped at the model's most frames; with
            ``num_frames``: ``fps`` mode capped at ``num_frames`` (LLaVA-Video ``frames_upbound``).

    Returns:
        The :class:`SamplingConfig` that :func:`sample_frame_indices` and the decoder use.
    """
    mode = "uniform" if model.mode == "random" else model.mode
    if num_frames is None and fps is None:
        return model.model_copy(update={"mode": mode})
    if fps is None:
        return model.model_copy(
            update={"mode": mode if mode in ("uniform", "fixed") else "uniform", "num_frames": num_frames}
        )
    cap = num_frames if num_frames is not None else model.max_frames_per_clip()
    return model.model_copy(update={"mode": "fps", "fps": fps, "max_frames": cap, "force_sample": False})
