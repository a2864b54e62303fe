"""Decode the sampled frames of one clip window, resized to the encoder's input inside the decoder.

``decode_clip`` is the one function every job uses (features, recaption, serving, eval), so the
frames a model is trained on and the frames it is served are produced the same way:

1. ``probe`` reads the container header with PyAV and classifies bad files (missing, empty, not a
   video, truncated, audio only, unknown codec) into :class:`~vidlm.clips.ClipError`; then
   :class:`DecodeLimits` refuses, before any frame is decoded, a video whose header claims more pixels per
   frame, seconds or frames than the limits (a decode bomb: a 2-second 8192 x 8192 H.264 file is a few KB
   and 96 MiB per decoded frame), as ``too_large``.
2. frame indices come from :func:`vidlm.sampling.sample_frame_indices`.
3. frames are decoded by one of three strategies: decord seeking to each index (``seek``), decord
   reading the window front to back and converting only the sampled frames (``sequential``), or
   PyAV jumping to the last keyframe before each sampled frame only when one lies ahead and decoding
   forward from there (``pyav``). When the chosen decoder fails on a file the other library is tried
   (:data:`FALLBACKS`). The scaler of the decoder itself (libswscale) resizes each frame so its short
   side is ``size``; a centre crop makes it ``size x size`` (CLIP's resize + centre-crop), so
   full-resolution frames never leave this function.

A video in object storage (``s3://``, ``gs://``: :mod:`vidlm.storage`) is never copied: PyAV reads it through a
seekable file that fetches ranges of :data:`vidlm.storage.VIDEO_BLOCK_BYTES` (the header, then the keyframes before
the sampled frames). decord needs a local file, so remote videos decode with PyAV only. A storage failure while
reading (a timeout, a 5xx, a refused connection) is a ``read_failed`` row, which a rerun retries.

``auto`` is the fastest strategy measured by ``bench/features.py`` (16 frames, short/long videos,
360p/4K); on the machines measured so far that is ``pyav`` in every case, with decord as its fallback.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from pydantic import Field

from vidlm.clips import ClipError, ErrorType
from vidlm.config import Section
from vidlm.sampling import EmptyWindowError, SamplingConfig, sample_frame_indices
from vidlm.storage import is_remote, location, open_video

__all__ = [
    "DECORD_MIN_SIDE",
    "FALLBACKS",
    "DecodeLimits",
    "DecodeStrategy",
    "DecodedClip",
    "VideoInfo",
    "decode_clip",
    "probe",
]

DecodeStrategy = Literal["auto", "seek", "sequential", "pyav"]

DECORD_MIN_SIDE = 100
"""decord 0.6 scales to some small sizes (e.g. 48x32) with a wrong row stride -- an error from ``get_batch``,
silently garbled frames from ``next()``. Below this output side, frames come from PyAV."""

FALLBACKS: dict[str, tuple[str, ...]] = {
    "auto": ("pyav", "seek"),
    "pyav": ("pyav", "seek"),
    "seek": ("seek", "pyav"),
    "sequential": ("sequential", "pyav"),
}
"""Decoders tried in order for each strategy. ``auto`` is PyAV: in ``bench/features.py`` it was the
fastest, or within noise of it, for 16 frames from short and long videos at 360p and 4K."""


def _decord_errors() -> tuple[type[BaseException], ...]:
    import decord

    return (decord.DECORDError, StopIteration)  # what decord raises on bad data; a bug in vidlm is not caught


# Signatures of container formats; a file that starts like one but does not open is truncated.
_MP4_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"wide")  # ISO-BMFF: bytes 4..8
_MAGIC = (b"\x1a\x45\xdf\xa3", b"RIFF", b"FLV", b"\x00\x00\x01\xba", b"OggS")  # mkv/webm, avi, flv, mpeg-ps, ogg


@dataclass(frozen=True)
class VideoInfo:
    """Header facts about a video file (from PyAV, no frame decoded)."""

    num_frames: int  # frames in the video stream (estimated from duration x fps if not indexed)
    fps: float  # average frame rate, frames per second
    width: int  # pixels
    height: int  # pixels
    codec: str  # decoder name, e.g. "h264"

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.fps


class DecodeLimits(Section):
    """The largest video a job or the endpoint decodes, checked on the header before any frame is decoded.

    The defaults let through 8K (7680 x 4320) video of up to 4 hours at up to 240 fps; the endpoint's config
    usually sets smaller ones (``media.limits``).
    """

    max_pixels: int = Field(7680 * 4320, gt=0)
    """Largest ``width x height`` of a frame, pixels."""
    max_duration_s: float = Field(4 * 3600.0, gt=0)
    """Longest video, seconds (header frame count / frame rate)."""
    max_frames: int = Field(4 * 3600 * 60, gt=0)
    """Most frames the header may claim."""
    max_fps: float = Field(240.0, gt=0)
    """Highest frame rate the header may claim, frames per second."""

    def check(self, info: VideoInfo, name: str) -> None:
        """Refuse ``info`` over a limit.

        Raises:
            ClipError: ``too_large``, naming the header value and the limit.
        """
        problems = []
        if info.width * info.height > self.max_pixels:
            problems.append(f"{info.width} x {info.height} pixels > max_pixels {self.max_pixels}")
        if info.fps > self.max_fps:
            problems.append(f"{info.fps:g} fps > max_fps {self.max_fps:g}")
        if info.num_frames > self.max_frames:
            problems.append(f"{info.num_frames} frames > max_frames {self.max_frames}")
        elif info.duration_s > self.max_duration_s:
            problems.append(f"{info.duration_s:.1f} s > max_duration_s {self.max_duration_s:g}")
        if problems:
            raise ClipError(ErrorType.TOO_LARGE, f"video over the decode limits ({'; '.join(problems)}): {name}")


@dataclass(frozen=True)
class DecodedClip:
    """The frames of one clip window."""

    frames: np.ndarray  # (T, size, size, 3) uint8, RGB
    frame_times_s: np.ndarray  # (T,) float64, seconds from the start of the video
    start_s: float  # window start after clamping, seconds
    end_s: float  # window end after clamping, seconds
    info: VideoInfo
    backend: str  # "decord-seek", "decord-sequential" or "pyav"


def _looks_like_container(head: bytes) -> bool:
    return head[4:8] in _MP4_BOXES or head.startswith(_MAGIC)


def probe(source: str | os.PathLike | bytes) -> VideoInfo:
    """Read a video's header and classify files that cannot be decoded.

    Args:
        source: a video file (a local path or an object storage URI), or the bytes of one (an upload, a ``data:``
            URL).

    Raises:
        ClipError: ``missing_file``, ``empty_file``, ``not_a_video``, ``truncated``,
            ``no_video_stream``, ``unknown_codec``, or ``read_failed`` (the storage failed a read).
    """
    if isinstance(source, bytes):
        name, head, size = f"<{len(source)} bytes>", source[:12], len(source)
    else:
        try:
            p = location(source)
        except ValueError as err:  # a URI scheme vidlm does not read (see vidlm.storage.OBJECT_STORES)
            raise ClipError(ErrorType.MISSING_FILE, str(err)) from None
        name = str(p)
        try:
            st = p.stat()
            if stat.S_ISDIR(st.st_mode):
                raise FileNotFoundError(name)
            size = st.st_size
            with p.open("rb") as f:
                head = f.read(12)
        except FileNotFoundError:
            raise ClipError(ErrorType.MISSING_FILE, f"no such file: {name}") from None
        except Exception as err:  # OSError; object storage clients raise their own (botocore's...)
            raise _read_failed(err, name) from None
    if size == 0:
        raise ClipError(ErrorType.EMPTY_FILE, f"file is empty (0 bytes): {name}")
    with contextlib.ExitStack() as stack:
        try:
            container = stack.enter_context(_open_container(io.BytesIO(source) if isinstance(source, bytes) else name))
        except av.FFmpegError as err:
            if _looks_like_container(head):
                raise ClipError(
                    ErrorType.TRUNCATED, f"container header present but unreadable ({err}): {name}"
                ) from None
            raise ClipError(ErrorType.NOT_A_VIDEO, f"not a video container ({err}): {name}") from None
        except Exception as err:
            raise _read_failed(err, name) from None
        return _header(container, name)


def _read_failed(err: Exception, name: str) -> ClipError:
    """The ``read_failed`` error of a video whose storage failed a read; a local file's own error is re-raised."""
    if not is_remote(name) and not isinstance(err, OSError):
        raise err
    return ClipError(ErrorType.READ_FAILED, f"reading the video failed ({type(err).__name__}: {err}): {name}")


@contextlib.contextmanager
def _open_container(source: str | io.BytesIO) -> Iterator[av.container.InputContainer]:
    """PyAV's container of a local file, bytes, or a remote video read in ranges (:func:`vidlm.storage.open_video`)."""
    if isinstance(source, str) and is_remote(source):
        with open_video(source) as f, av.open(f) as container:
            yield container
    else:
        with av.open(source) as container:
            yield container


def _header(container: av.container.InputContainer, name: str) -> VideoInfo:
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise ClipError(ErrorType.NO_VIDEO_STREAM, f"no video stream (streams: {', '.join(kinds)}): {name}")
    stream = container.streams.video[0]
    ctx = stream.codec_context  # None when the demuxer maps the stream to no known codec
    if ctx is None or not ctx.width:
        raise ClipError(ErrorType.UNKNOWN_CODEC, f"video stream #{stream.index} has a codec no decoder knows: {name}")
    fps = float(stream.average_rate or stream.guessed_rate or 0)
    if fps <= 0:
        raise ClipError(ErrorType.CORRUPT_STREAM, f"video stream reports no frame rate: {name}")
    num_frames = stream.frames
    if not num_frames:
        duration = stream.duration * stream.time_base if stream.duration else (container.duration or 0) / 1e6
        num_frames = int(round(float(duration) * fps))
    return VideoInfo(int(num_frames), fps, ctx.width, ctx.height, ctx.codec.name)


def _scaled_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) with the short side equal to ``size`` and the aspect ratio kept."""
    scale = size / min(width, height)
    return max(size, round(width * scale)), max(size, round(height * scale))


def _centre_crop(frames: np.ndarray, size: int) -> np.ndarray:
    # (T, h, w, 3) -> (T, size, size, 3)
    h, w = frames.shape[1:3]
    top, left = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(frames[:, top : top + size, left : left + size])


def _decode_decord(
    path: str, indices: np.ndarray, scaled: tuple[int, int], sequential: bool, threads: int
) -> np.ndarray:
    import decord  # imported here: decord is optional at import time of vidlm

    vr = decord.VideoReader(path, ctx=decord.cpu(0), width=scaled[0], height=scaled[1], num_threads=threads)
    indices = np.minimum(indices, len(vr) - 1)  # container frame counts can be off by one at the end
    if not sequential:
        return vr.get_batch(indices.tolist()).asnumpy()
    unique = np.unique(indices)
    vr.seek_accurate(int(unique[0]))
    frames, pos = {}, int(unique[0])
    for i in unique.tolist():
        if i > pos:
            vr.skip_frames(i - pos)  # decoded, never converted or copied
        frames[i] = vr.next().asnumpy()
        pos = i + 1
    return np.stack([frames[int(i)] for i in indices])


def _decode_pyav(path: str, indices: np.ndarray, info: VideoInfo, scaled: tuple[int, int], threads: int) -> np.ndarray:
    """Decode forward from keyframe to keyframe; seek only when a keyframe lies before the next wanted frame."""
    unique = np.unique(indices).tolist()
    frames: dict[int, np.ndarray] = {}
    with _open_container(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame and slice threads; with thread_count 1 FFmpeg starts none
        stream.codec_context.thread_count = threads
        tb = float(stream.time_base)
        start_time = stream.start_time * tb if stream.start_time is not None else 0.0
        keyframes = [round((e.timestamp * tb - start_time) * info.fps) for e in stream.index_entries if e.is_keyframe]
        pos, image = -1, None  # index and pixels of the last decoded frame
        decoder = None
        scaler = VideoReformatter()  # one libswscale context per clip (frame.to_ndarray builds one per frame)
        for target in unique:
            if pos >= target and image is not None:  # frames missing in the stream: the next one stands in
                frames[target] = image
                continue
            if decoder is None or any(pos < k <= target for k in keyframes):
                # a keyframe lies between here and the target: jump to the last one at or before it
                container.seek(int((target / info.fps + start_time) / tb), stream=stream, backward=True)
                decoder = container.decode(stream)
            for frame in decoder:
                if frame.pts is None:
                    continue
                pos = int(round((frame.pts * tb - start_time) * info.fps))
                if pos >= target:  # the first frame at or after a wanted index stands for it
                    image = scaler.reformat(
                        frame, width=scaled[0], height=scaled[1], format="rgb24", threads=threads
                    ).to_ndarray()
                    frames[target] = image
                    break
            else:
                break  # the stream ended before the target
    if not frames:
        raise ClipError(ErrorType.CORRUPT_STREAM, f"no frame could be decoded in the window: {path}")
    last = max(frames)  # the stream ended early: clamp the window to what exists
    return np.stack([frames.get(int(i), frames[last]) for i in indices])


def _clip_rng(config: SamplingConfig, clip_key: str) -> np.random.Generator:
    return np.random.default_rng([config.seed, zlib.crc32(clip_key.encode())])


def decode_clip(
    path: str | os.PathLike,
    sampling: SamplingConfig,
    size: int,
    start_s: float | None = None,
    end_s: float | None = None,
    strategy: DecodeStrategy = "auto",
    clip_key: str = "",
    threads: int = 1,
    limits: DecodeLimits | None = None,
) -> DecodedClip:
    """Decode the sampled frames of the window ``[start_s, end_s)`` of one video.

    Args:
        path: video file: a local path or an object storage URI (read in ranges, decoded with PyAV).
        sampling: which frames (see :mod:`vidlm.sampling`).
        size: output side in pixels (the encoder's input size, e.g. 224 or 336).
        start_s, end_s: window in seconds; ``None`` for the start / end of the video. Clamped.
        strategy: ``seek``, ``sequential``, ``pyav``, or ``auto`` (see module docstring).
        clip_key: makes ``random`` sampling reproducible per clip (seeded by ``sampling.seed`` and this).
        threads: FFmpeg threads of the decoder (and PyAV's scaler); ``0``: one per core it finds. ``1``
            where one process decodes per core, as Ray's decode tasks and actors do: there FFmpeg's
            threads only compete for the same cores (frame threads decode ahead of the frame a window
            ends on; the scaler starts and joins a pool per frame). On 2 cores, 2 decode processes,
            16 frames at 224 px from the real mp4s: 12-14 clips/s with ``0``, 15-19 with ``1``. ``0``
            suits a lone decoder with idle cores (a plain loop).
        limits: the largest video decoded (checked on the header first); ``None``: the defaults of
            :class:`DecodeLimits`.

    Returns:
        A :class:`DecodedClip` with ``frames`` ``(T, size, size, 3) uint8``.

    Raises:
        ClipError: with the ``error_type`` of the failure (see :class:`~vidlm.clips.ErrorType`).
    """
    info = probe(path)
    (limits or DecodeLimits()).check(info, str(path))
    try:
        indices = sample_frame_indices(
            sampling, info.num_frames, info.fps, start_s, end_s, _clip_rng(sampling, clip_key)
        )
    except EmptyWindowError as err:
        raise ClipError(ErrorType.EMPTY_WINDOW, f"{err}: {path}") from None
    scaled = _scaled_size(info.width, info.height, size)
    frames, backend, failure = None, "", ""
    for attempt in FALLBACKS[strategy]:
        if attempt != "pyav" and (min(scaled) < DECORD_MIN_SIDE or is_remote(path)):
            continue
        try:
            if attempt == "pyav":
                frames = _decode_pyav(str(path), indices, info, scaled, threads)
            else:
                frames = _decode_decord(str(path), indices, scaled, attempt == "sequential", threads)
        except (av.FFmpegError, ClipError, *_decord_errors()) as err:
            failure = f"{attempt}: {err}"
            continue
        except Exception as err:  # the storage failed a read (OSError, or the object storage client's own)
            raise _read_failed(err, str(path)) from None
        backend = attempt if attempt == "pyav" else f"decord-{attempt}"
        break
    if frames is None:
        raise ClipError(ErrorType.CORRUPT_STREAM, f"decoding failed ({failure}): {path}")
    frames = _centre_crop(frames, size)
    times = indices / info.fps
    window_start = max(0.0, start_s or 0.0)
    window_end = info.duration_s if end_s is None else min(end_s, info.duration_s)
    return DecodedClip(frames, times.astype(np.float64), window_start, window_end, info, backend)
