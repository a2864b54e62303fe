"""Checks a chat request passes before it reaches a vLLM replica: every bad input becomes a 4xx that names it.

:class:`VideoRequestChecker` runs in the endpoint's ingress (:class:`serving.ingress.VideoIngress`), once per
request, on the request's ``messages`` and ``media_io_kwargs``:

====================================================  ======  =============================================
problem                                                status  message names
====================================================  ======  =============================================
body larger than ``media.max_body_mb``                 413     the size and the limit
body not JSON / not a chat request                     400     the parse error / the field
a second video, an image or audio part                 400     what this model takes
``file://`` path outside ``media.roots``               403     the path and the roots
``file://`` path that does not exist                   404     the path
``http(s)`` when ``media.allow_http`` is off           400     the setting
``http(s)`` fetch too large / too slow / failing       413/400 the limit / the error
``data:`` URL not base64, or larger than the limit     400/413 the problem
a file that is not a decodable video                   422     the decoder's classification (``not_a_video``...)
``media_io_kwargs`` option other than frames / fps     400     the option and the allowed ones
more frames than the model takes                       400     both counts
visual + text tokens over the engine's context         400     both token counts and ``max_model_len``
====================================================  ======  =============================================

An unknown model is Ray Serve LLM's own 404. A request that passes is rewritten for the replica: an
``http(s)`` video becomes a ``data:`` URL of the bytes fetched here (the replica never fetches again, so the
limits hold), and ``media_io_kwargs.video`` holds exactly ``num_frames`` and ``fps`` (``-1``: the model's
own), which :class:`vidlm.models.vllm_model.VidlmVideoLoader` reads.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from vidlm.clips import ClipError
from vidlm.decode import VideoInfo, probe
from vidlm.sampling import EmptyWindowError, SamplingConfig, request_sampling, sample_frame_indices

__all__ = ["FRAME_OPTIONS", "RequestError", "VideoRequestChecker"]

FRAME_OPTIONS = ("num_frames", "fps")
"""The ``media_io_kwargs.video`` options a request may set."""


class RequestError(Exception):
    """A request the endpoint refuses: an HTTP status (4xx) and a message that names the problem."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        """The OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``."""
        kind = "invalid_request_error" if self.status != 404 else "not_found_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}


def _video_parts(messages: list[dict]) -> list[dict]:
    """The ``video_url`` content parts of a chat; raises on parts this model cannot take."""
    videos = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "video_url":
                videos.append(part)
            elif kind in ("image_url", "input_audio", "audio_url", "image_embeds", "image_pil"):
                raise RequestError(
                    400, f"messages[{i}]: {kind} parts are not supported; this model takes one video_url"
                )
    if len(videos) > 1:
        raise RequestError(400, f"{len(videos)} videos in one request; this model takes one video_url per request")
    return videos


def _text_turns(messages: list[dict], video_token: str) -> list[dict[str, str]]:
    """Messages as plain text turns, the video part as the placeholder (for counting text tokens)."""
    turns = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            pieces = []
            for part in content:
                if part.get("type") == "video_url":
                    pieces.append(video_token)
                elif part.get("type") == "text":
                    pieces.append(str(part.get("text", "")))
            content = "\n".join(pieces)
        turns.append({"role": str(message.get("role", "user")), "content": content or ""})
    return turns


class VideoRequestChecker:
    """Checks and rewrites the video of one chat request for one served model.

    Args:
        tokenizer: the model's Hugging Face tokenizer (counts the text tokens with its chat template).
        model_config: the model's :class:`~vidlm.models.video_llm.VidlmConfig` (placeholder, frame sampling,
            ``num_visual_tokens``).
        max_model_len: the engine's context (tokens).
        roots: directories ``file://`` videos must lie in (resolved; symlinks may not leave them).
        allow_http: fetch ``http(s)`` videos.
        max_video_bytes: largest video accepted by ``http(s)`` or ``data:`` (bytes).
        fetch_timeout_s: time limit of an ``http(s)`` fetch (seconds).
    """

    def __init__(
        self,
        tokenizer,
        model_config,
        max_model_len: int,
        roots: list[str],
        allow_http: bool,
        max_video_bytes: int,
        fetch_timeout_s: float,
    ):
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.max_model_len = max_model_len
        self.roots = [Path(r).resolve() for r in roots]
        self.allow_http = allow_http
        self.max_video_bytes = max_video_bytes
        self.fetch_timeout_s = fetch_timeout_s
        self.sampling: SamplingConfig = model_config.sampling_config
        self.max_frames = self.sampling.max_frames_per_clip()

    # -- the frame options -------------------------------------------------------------------------------
    def frame_options(self, media_io_kwargs: dict | None) -> tuple[int | None, float | None]:
        """``(num_frames, fps)`` asked for in ``media_io_kwargs.video`` (``None``: not asked).

        Raises:
            RequestError: 400 for another modality or option, a value that is not a positive number, or
                more frames than the model takes.
        """
        options = dict(media_io_kwargs or {})
        video = options.pop("video", None) or {}
        if options:
            raise RequestError(
                400, f"media_io_kwargs: only 'video' is accepted, got {sorted(options)}", "media_io_kwargs"
            )
        if not isinstance(video, dict):
            raise RequestError(400, "media_io_kwargs.video must be an object", "media_io_kwargs")
        unknown = sorted(set(video) - set(FRAME_OPTIONS))
        if unknown:
            raise RequestError(
                400,
                f"media_io_kwargs.video: unknown option(s) {unknown}; allowed: {list(FRAME_OPTIONS)}",
                "media_io_kwargs",
            )
        num_frames, fps = video.get("num_frames"), video.get("fps")
        if num_frames is not None and (
            isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1
        ):
            raise RequestError(400, f"media_io_kwargs.video.num_frames must be an integer >= 1, got {num_frames!r}")
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0):
            raise RequestError(400, f"media_io_kwargs.video.fps must be a number > 0, got {fps!r}")
        if num_frames is not None and num_frames > self.max_frames:
            raise RequestError(
                400,
                f"too many frames: {num_frames} asked, this model takes at most {self.max_frames} per video "
                "(the engine's encoder cache is sized for its own sampling)",
                "media_io_kwargs",
            )
        return num_frames, (float(fps) if fps is not None else None)

    # -- the video ---------------------------------------------------------------------------------------
    def _local_path(self, url: str) -> Path:
        if not self.roots:
            raise RequestError(403, "file:// videos are not served here (media.roots is empty)")
        path = Path(unquote(urlparse(url).path))
        resolved = path.resolve()
        if not any(resolved == root or root in resolved.parents for root in self.roots):
            roots = ", ".join(str(r) for r in self.roots)
            raise RequestError(403, f"{path} is outside the media roots ({roots})")
        if not resolved.is_file():
            raise RequestError(404, f"no such video file: {path}")
        return resolved

    def _data_bytes(self, url: str) -> bytes:
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise RequestError(400, "a data: video must be base64: data:video/mp4;base64,...")
        if len(payload) * 3 // 4 > self.max_video_bytes:
            raise RequestError(
                413, f"data: video is {len(payload) * 3 // 4} bytes; the limit is {self.max_video_bytes}"
            )
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as err:
            raise RequestError(400, f"data: video is not valid base64 ({err})") from None

    async def _fetch(self, url: str) -> bytes:
        if not self.allow_http:
            raise RequestError(400, "http(s) videos are not fetched here (media.allow_http is false)")
        from vllm.connections import global_http_connection

        try:
            fetch = global_http_connection.async_get_bytes(url, max_bytes=self.max_video_bytes)
            return await asyncio.wait_for(fetch, self.fetch_timeout_s)  # the whole fetch, vLLM's retries included
        except asyncio.TimeoutError:
            raise RequestError(400, f"fetching {url} took longer than {self.fetch_timeout_s:g} s") from None
        except Exception as err:  # aiohttp's and vLLM's fetch errors share no base class
            if "size" in type(err).__name__.lower():  # vLLM's *SizeExceededError
                raise RequestError(413, f"{url}: {err}") from None
            raise RequestError(400, f"could not fetch {url}: {type(err).__name__}: {err}") from None

    @staticmethod
    def _probe(source: Path | bytes, name: str) -> VideoInfo:
        try:
            return probe(source)
        except ClipError as err:
            raise RequestError(422, f"{name} is not a decodable video ({err.error_type.value}: {err})") from None

    async def check(self, messages: list[dict], media_io_kwargs: dict | None) -> dict[str, Any]:
        """Check one chat request; rewrite its video part in place for the replica.

        Args:
            messages: the request's ``messages`` (validated by vLLM's ``ChatCompletionRequest``).
            media_io_kwargs: the request's ``media_io_kwargs``.

        Returns:
            The ``media_io_kwargs`` to send: ``{"video": {"num_frames": N or -1, "fps": F or -1}}``.

        Raises:
            RequestError: see the module docstring.
        """
        num_frames, fps = self.frame_options(media_io_kwargs)
        videos = _video_parts(messages)
        if videos:
            part = videos[0]
            url = str((part.get("video_url") or {}).get("url", ""))
            scheme = url.split(":", 1)[0].lower()
            if scheme == "file":
                info = self._probe(self._local_path(url), url)
            elif scheme == "data":
                info = self._probe(self._data_bytes(url), "the data: video")
            elif scheme in ("http", "https"):
                data = await self._fetch(url)
                info = self._probe(data, url)
                part["video_url"] = {"url": "data:video/mp4;base64," + base64.b64encode(data).decode()}
            else:
                raise RequestError(400, f"video_url must be file://, data: or http(s)://, got {url[:40]!r}")
            try:
                sampling = request_sampling(self.sampling, num_frames, fps)
                frames = len(sample_frame_indices(sampling, info.num_frames, info.fps))
            except EmptyWindowError as err:
                raise RequestError(422, f"the video holds no frame to sample: {err}") from None
            _, overflow = self.model_config.context_overflow(frames, self._text_tokens(messages), self.max_model_len)
            if overflow:
                raise RequestError(
                    400,
                    f"the video does not fit the context: {overflow}; "
                    "ask for fewer frames (media_io_kwargs.video.num_frames)",
                    "messages",
                )
        return {"video": {"num_frames": num_frames or -1, "fps": fps or -1}}

    def _text_tokens(self, messages: list[dict]) -> int:
        """Tokens of the chat without the video (its placeholder not counted), as the chat template renders it."""
        mc = self.model_config
        ids = self.tokenizer.apply_chat_template(
            _text_turns(messages, mc.video_token), add_generation_prompt=True, tokenize=True
        )
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return len(ids) - list(ids).count(mc.video_token_index)
