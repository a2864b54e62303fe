"""Writers of inputs for trying vidlm without a corpus: real mp4s with known frames, and Panda-70M manifests.

``write_video`` encodes an H.264 mp4 with PyAV (no ffmpeg binary needed) and can stamp each frame with its own
index (frame ``i`` is a flat grey of level :func:`index_level` ``(i)``), so the decoded pixels tell which frames
were sampled. ``write_panda70m_manifest`` writes the manifest the jobs read, giving each video the same clip windows.
``write_atomic`` writes a file so that a reader or a kill never sees it half-written (the jobs' summaries, reports
and metrics).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import numpy as np

from vidlm.storage import is_remote, location

__all__ = ["index_level", "write_atomic", "write_figure", "write_frames", "write_panda70m_manifest", "write_video"]


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` all at once: into a temporary file beside it, flushed, then renamed over it.

    A reader sees the old file or the new one, never a part; a kill leaves at most a ``.NAME.*.tmp`` file. In object
    storage (``s3://``...: :mod:`vidlm.storage`) one upload is already all or nothing.

    Returns:
        The path written.
    """
    path = location(path)
    if is_remote(path):
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_figure(fig, path: str | os.PathLike) -> Path:
    """Lay out the matplotlib figure ``fig``, write it as a PNG to ``path`` (:func:`write_atomic`) and close it.

    Returns:
        The path written.
    """
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return write_atomic(path, buffer.getvalue())


def index_level(i: int) -> int:
    """Grey level (0..255) of frame ``i`` in an ``index`` pattern video; 8 levels apart, period 32."""
    return 4 + 8 * (i % 32)


def write_video(
    path: str | os.PathLike,
    seconds: float,
    fps: int = 25,
    width: int = 320,
    height: int = 240,
    pattern: Literal["index", "texture"] = "index",
    codec: str = "libx264",
    gop: int | None = None,
) -> Path:
    """Write an H.264 mp4 (or ``codec``) of ``round(seconds * fps)`` frames.

    Args:
        pattern: ``index``: flat frames of grey :func:`index_level` ``(i)``; ``texture``: moving noise, as
            costly to decode as camera footage.
        gop: keyframe interval in frames (the encoder's default when ``None``).

    Returns:
        The path written (by :func:`write_frames`).
    """
    n = round(seconds * fps)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(height + n, width, 3), dtype=np.uint8) if pattern == "texture" else None
    frames = (
        np.full((height, width, 3), index_level(i), np.uint8) if base is None else base[i : i + height]  # scrolls
        for i in range(n)
    )
    return write_frames(path, frames, fps, codec, gop)


def _mux(path: Path, frames: Iterable[np.ndarray], fps: int, codec: str, gop: int | None) -> Path:
    with av.open(str(path), "w") as out:
        stream = None
        for img in frames:
            if stream is None:
                stream = out.add_stream(codec, rate=Fraction(fps))
                stream.height, stream.width = img.shape[:2]
                stream.pix_fmt = "yuv420p"
                if gop:
                    stream.codec_context.gop_size = gop
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
                out.mux(packet)
        if stream is None:
            raise ValueError(f"no frames to write to {path}")
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_frames(
    path: str | os.PathLike, frames: Iterable[np.ndarray], fps: int = 25, codec: str = "libx264", gop: int | None = None
) -> Path:
    """Encode RGB frames into a video file (H.264 mp4 by default) with PyAV.

    Args:
        frames: ``(H, W, 3) uint8`` arrays, all of one size (even sides for ``yuv420p``).
        fps: frames per second.
        gop: keyframe interval in frames (the encoder's default when ``None``).

    Returns:
        The path written.

    Raises:
        ValueError: no frames.

    The calling thread's scheduling policy is restored afterwards: the SVT-AV1 encoder (``libsvtav1``) switches
    it to ``SCHED_FIFO`` 99, which every process forked later inherits (a Ray cluster, DeepSpeed workers); there,
    py-cpuinfo's busy-waiting parent starves its own child on a 2-core machine and DeepSpeed never starts.
    """
    policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
    try:
        return _mux(Path(path), frames, fps, codec, gop)
    finally:
        if os.sched_getscheduler(0) != policy:
            os.sched_setscheduler(0, policy, param)


def write_panda70m_manifest(
    path: str | os.PathLike,
    videos: dict[str, os.PathLike],
    windows: list[tuple[str, str]] = (("0:00:00.000", "0:00:02.000"), ("0:00:02.000", "0:00:04.000")),
    repeat: int = 1,
) -> Path:
    """A Panda-70M CSV (with a ``path`` column) giving each video the same clip windows; ``path`` and the videos may
    be object storage URIs, and a relative video path hangs from the manifest's folder.

    Clip ids are ``{video}_{i}``, and ``{video}-r{k}_{i}`` for the ``k``-th repeat; window ``i`` has the
    caption ``c{i+1}`` and matching score ``0.5 + 0.1 i``.

    Args:
        videos: ``videoID -> file``.
        windows: ``(start, end)`` timestamps ``H:MM:SS.mmm``.
        repeat: copies of every video under different ids.
    """
    stamps = "[" + ", ".join(f"['{a}', '{b}']" for a, b in windows) + "]"
    captions = "[" + ", ".join(f"'c{i + 1}'" for i in range(len(windows))) + "]"
    scores = "[" + ", ".join(f"{0.5 + 0.1 * i:.1f}" for i in range(len(windows))) + "]"
    lines = ["videoID,url,timestamp,caption,matching_score,path"]
    for r in range(repeat):
        for vid, p in videos.items():
            lines.append(f'{vid}{"" if r == 0 else f"-r{r}"},u,"{stamps}","{captions}","{scores}",{p}')
    path = location(path)
    path.write_text("\n".join(lines) + "\n")
    return path
