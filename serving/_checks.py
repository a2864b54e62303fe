"""Checks a chat request passes before it reaches a vLLM replica: every bad input becomes a 4xx that names it.

:class:`VideoRequestChecker` runs in the endpoint's ingress (:class:`serving.ingress.VideoIngress`), once per
request, on the request as Ray's / vLLM's ``ChatCompletionRequest`` parsed it -- what the replica will use.
It works by allowlist: request fields outside :data:`REQUEST_FIELDS`, message keys outside
:data:`MESSAGE_KEYS` and content parts of any shape but the ones below are refused, and the messages sent on are
rebuilt from what was checked, so the replica never sees a part the checker did not understand:

- text: a string, or ``{"type": "text", "text": STR}``;
- a video (user turns only): ``{"type": "video_url", "video_url": {"url": URL}}`` or vLLM's short forms
  ``{"video_url": URL}`` / ``{"type": "video_url", "video_url": URL}``, sent on as the first form with the
  canonical URL: a ``file://`` URL becomes the resolved path's URI, an ``http(s)`` one a ``data:`` URL of the
  bytes fetched here (the replica never fetches; :mod:`serving._fetch` holds the SSRF policy).

====================================================  ======  =============================================
problem                                                status  message names
====================================================  ======  =============================================
body larger than ``media.max_body_mb``                 413     the size and the limit
body not JSON / not a chat request                     400     the parse error / the field
a request field outside the allowlist                  400     the field(s) and where the list is
a content part of another shape, in another role       400     ``messages[i].content[j]`` and what is taken
a second video                                         400     what this model takes
``file://HOST/...``, query, NUL / control characters   400     the oddity
``file://`` path outside ``media.roots``               403     the path and the roots
``file://`` path that does not exist                   404     the path
``http(s)`` when ``media.allow_http`` is off           400     the setting
``http(s)`` to a non-public address (any hop)          403     the policy (``media.allow_hosts``)
``http(s)`` fetch too large / too slow / failing       413/400 the limit / the outcome
``data:`` URL not base64, or larger than the limit     400/413 the problem
a file that is not a decodable video                   422     the decoder's classification (``not_a_video``...)
a video over ``media.limits`` (pixels, s, frames, fps) 413     the header value and the limit
``media_io_kwargs`` option other than frames / fps     400     the option and the allowed ones
more frames than the model takes, fps over the limit   400     both numbers
visual + text tokens over the engine's context         400     both token counts and ``max_model_len``
====================================================  ======  =============================================

An unknown model is Ray Serve LLM's own 404. ``media_io_kwargs.video`` is sent on holding exactly
``num_frames`` and ``fps`` (``-1``: the model's own), which :class:`vidlm.models.vllm_model.VidlmVideoLoader` reads.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import unicodedata
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from serving._fetch import FetchError, VideoFetcher
from vidlm.clips import ClipError, ErrorType
from vidlm.decode import DecodeLimits, VideoInfo, probe
from vidlm.sampling import EmptyWindowError, SamplingConfig, request_sampling, sample_frame_indices

__all__ = [
    "FRAME_OPTIONS",
    "MESSAGE_KEYS",
    "REQUEST_FIELDS",
    "RequestError",
    "VideoRequestChecker",
    "canonical_messages",
    "check_fields",
    "parse_request",
]

FRAME_OPTIONS = ("num_frames", "fps")
"""The ``media_io_kwargs.video`` options a request may set."""

REQUEST_FIELDS = frozenset(
    {
        # OpenAI's chat completion fields
        "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "stream",
        "stream_options", "seed", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "logit_bias",
        "user", "response_format", "tools", "tool_choice", "parallel_tool_calls", "reasoning_effort",
        # vLLM's sampling extras
        "top_k", "min_p", "repetition_penalty", "length_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
        "bad_words", "allowed_token_ids", "skip_special_tokens", "spaces_between_special_tokens",
        "include_stop_str_in_output", "structured_outputs", "include_reasoning", "echo",
        "add_generation_prompt", "continue_final_message", "chat_template_kwargs", "cache_salt",
        # frame options, checked below
        "media_io_kwargs",
    }
)  # fmt: skip
"""Request fields the endpoint takes. Refused among vLLM's others: fields that carry or reshape media
(``mm_payload``, ``mm_processor_kwargs``, ``return_mm_kwargs``), a request's own ``chat_template``, engine
internals (``request_id``, ``priority``, ``kv_transfer_params``, ``ec_transfer_params``, ``vllm_xargs``,
``truncate_prompt_tokens``) and any field a newer Ray or vLLM adds."""

MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id", "reasoning", "reasoning_content"})
"""Keys a message may have."""

_TEXT_ROLES = ("system", "developer", "assistant", "tool")  # roles whose content parts are text only
MAX_URL_CHARS = 4096
"""Longest ``file://`` or ``http(s)`` URL taken."""


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


def check_fields(payload: dict[str, Any]) -> None:
    """Refuse a request body with a field outside :data:`REQUEST_FIELDS`, or a message content that is neither a
    string nor a list (pydantic would turn an object into an iterator of its keys).

    Raises:
        RequestError: 400, naming the fields or the message.
    """
    unknown = sorted(str(k) for k in payload if k not in REQUEST_FIELDS)
    if unknown:
        shown = ", ".join(repr(k[:40]) for k in unknown[:5])
        raise RequestError(
            400, f"request field(s) not taken by this endpoint: {shown} (README 'Security and safety')", unknown[0]
        )
    messages = payload.get("messages")
    for i, message in enumerate(messages if isinstance(messages, list) else []):
        content = message.get("content") if isinstance(message, dict) else None
        if content is not None and not isinstance(content, (str, list)):
            raise RequestError(400, f"messages[{i}].content must be a string or a list of content parts")


def parse_request(payload: dict[str, Any]):
    """The request body as the replica will use it: :func:`check_fields`, then Ray's ``ChatCompletionRequest``.

    Returns:
        ``ray.serve.llm.openai_api_models.ChatCompletionRequest``.

    Raises:
        RequestError: 400 naming the field (pydantic's and vLLM's validators' errors, whatever their type).
    """
    from pydantic import ValidationError
    from ray.serve.llm.openai_api_models import ChatCompletionRequest

    check_fields(payload)
    if not isinstance(payload.get("messages"), list):
        raise RequestError(400, "not a chat completion request: messages must be a list of messages", "messages")
    try:
        return ChatCompletionRequest.model_validate(payload)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])[:200]
        raise RequestError(400, f"not a chat completion request: {where}: {first['msg'][:300]}", where) from None
    except (ValueError, TypeError) as err:  # vLLM's "before" validators raise their own errors
        raise RequestError(400, f"not a chat completion request: {str(err)[:300]}") from None


def _video_url(part: dict, where: str) -> str:
    """The URL of a video part in one of the accepted shapes; raises on any other."""
    if set(part) - {"type", "video_url"} or part.get("type", "video_url") != "video_url":
        raise RequestError(400, f"{where}: a video part has exactly 'type' and 'video_url', got {sorted(part)}", where)
    value = part["video_url"]
    if isinstance(value, dict):
        if set(value) != {"url"}:
            raise RequestError(400, f"{where}.video_url: takes exactly 'url', got {sorted(value)}", where)
        value = value["url"]
    if not isinstance(value, str) or not value:
        raise RequestError(400, f"{where}.video_url: the url must be a non-empty string", where)
    return value


def canonical_messages(messages: list) -> tuple[list[dict], tuple[int, int] | None]:
    """The messages rebuilt from the shapes this endpoint takes, and where the video part is.

    Args:
        messages: ``ChatCompletionRequest.messages`` after validation (dicts; content a string, a list, or
            pydantic's one-shot iterator for anything else).

    Returns:
        ``(messages, (i, j))``: every content list holds only ``{"type": "text", ...}`` and
        ``{"type": "video_url", "video_url": {"url": ...}}`` parts; ``(i, j)`` locates the video (``None``: none).

    Raises:
        RequestError: 400 for any other shape, key, role or a second video.
    """
    out, video = [], None
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(400, f"{where}: a message is an object", where)
        extra = sorted(str(k) for k in message if k not in MESSAGE_KEYS)
        if extra:
            raise RequestError(400, f"{where}: unknown key(s) {extra}; a message takes {sorted(MESSAGE_KEYS)}", where)
        role, content = message.get("role"), message.get("content")
        if content is None or isinstance(content, str):
            out.append(dict(message))
            continue
        if not isinstance(content, list):
            # a list whose parts fit none of vLLM's part types stays pydantic's one-shot iterator, which
            # validates its items loosely as it is consumed; check_fields refused every non-list JSON value
            try:
                content = list(content)
            except (TypeError, ValueError):
                raise RequestError(400, f"{where}.content holds a part of no chat content type", where) from None
        parts = []
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            if isinstance(part, str):
                parts.append({"type": "text", "text": part})
            elif isinstance(part, dict) and part.get("type") == "text" and set(part) == {"type", "text"}:
                if not isinstance(part["text"], str):
                    raise RequestError(400, f"{at}.text must be a string", at)
                parts.append({"type": "text", "text": part["text"]})
            elif isinstance(part, dict) and "video_url" in part:
                if role != "user":
                    raise RequestError(400, f"{at}: a video goes in a user message, not {role!r}", at)
                if video is not None:
                    raise RequestError(400, "2 videos in one request; this model takes one video_url per request")
                video = (i, j)
                parts.append({"type": "video_url", "video_url": {"url": _video_url(part, at)}})
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                takes = "text" if role in _TEXT_ROLES else "text and one video_url"
                raise RequestError(400, f"{at}: {kind!r} parts are not taken; a {role} message takes {takes}", at)
        out.append({**message, "content": parts})
    return out, video


def _text_turns(messages: list[dict], video_token: str) -> list[dict[str, str]]:
    """Canonical messages as plain text turns, the video part as the placeholder (for counting text tokens)."""
    turns = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = "\n".join(video_token if p["type"] == "video_url" else p["text"] for p in content)
        turns.append({"role": str(message.get("role", "user")), "content": content or ""})
    return turns


class VideoRequestChecker:
    """Checks one chat request for one served model and rebuilds it for the replica.

    Args:
        tokenizer: the model's Hugging Face tokenizer (counts the text tokens with its chat template).
        model_config: the model's :class:`~vidlm.models.video_llm.VidlmConfig` (placeholder, frame sampling,
            ``num_visual_tokens``).
        max_model_len: the engine's context (tokens).
        media: the endpoint's :class:`serving.app.MediaConfig` (roots, http policy, sizes, decode limits).
    """

    def __init__(self, tokenizer, model_config, max_model_len: int, media):
        from serving.app import MiB

        self.tokenizer = tokenizer
        self.model_config = model_config
        self.max_model_len = max_model_len
        self.roots = [Path(r).resolve() for r in media.roots]
        self.allow_http = media.allow_http
        self.max_video_bytes = int(media.max_video_mb * MiB)
        self.limits: DecodeLimits = media.limits
        self.fetcher = VideoFetcher(self.max_video_bytes, media.fetch_timeout_s, media.allow_hosts, media.max_redirects)
        self.sampling: SamplingConfig = model_config.sampling_config
        self.max_frames = self.sampling.max_frames_per_clip()
        # No token is longer than this: a text over max_model_len x this many characters cannot fit.
        self.max_token_chars = max(len(t) for t in tokenizer.get_vocab()) + 1

    # -- the frame options -------------------------------------------------------------------------------
    def frame_options(self, media_io_kwargs: dict | None) -> tuple[int | None, float | None]:
        """``(num_frames, fps)`` asked for in ``media_io_kwargs.video`` (``None``: not asked).

        Raises:
            RequestError: 400 for another modality or option, a value that is not a positive number, more
                frames than the model takes or an fps over ``media.limits.max_fps``.
        """
        if media_io_kwargs is not None and not isinstance(media_io_kwargs, dict):
            raise RequestError(400, "media_io_kwargs must be an object", "media_io_kwargs")
        options = dict(media_io_kwargs or {})
        video = options.pop("video", None) or {}
        if options:
            raise RequestError(
                400, f"media_io_kwargs: only 'video' is accepted, got {sorted(options)}", "media_io_kwargs"
            )
        if not isinstance(video, dict):
            raise RequestError(400, "media_io_kwargs.video must be an object", "media_io_kwargs")
        unknown = sorted(str(k) for k in set(video) - set(FRAME_OPTIONS))
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
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps < 1e300):
            raise RequestError(400, f"media_io_kwargs.video.fps must be a number > 0, got {fps!r}")
        if num_frames is not None and num_frames > self.max_frames:
            raise RequestError(
                400,
                f"too many frames: {num_frames} asked, this model takes at most {self.max_frames} per video "
                "(the engine's encoder cache is sized for its own sampling)",
                "media_io_kwargs",
            )
        if fps is not None and fps > self.limits.max_fps:
            raise RequestError(400, f"media_io_kwargs.video.fps {fps:g} is over the limit {self.limits.max_fps:g}")
        return num_frames, (float(fps) if fps is not None else None)

    # -- the video ---------------------------------------------------------------------------------------
    def _local_path(self, url: str) -> Path:
        """The resolved file of a ``file://`` URL inside the roots."""
        if not self.roots:
            raise RequestError(403, "file:// videos are not served here (media.roots is empty)")
        parts = urlsplit(url)
        if parts.netloc:
            raise RequestError(400, f"a file:// URL names no host: file:///PATH, got host {parts.netloc[:40]!r}")
        if parts.query or parts.fragment or ";" in parts.path:
            raise RequestError(400, "a file:// URL has no query, fragment or parameters")
        raw = unquote(parts.path, errors="strict")
        if any(unicodedata.category(c) == "Cc" for c in raw):
            raise RequestError(400, "a file:// path holds a control character (NUL, newline...)")
        path = Path(raw)
        if not path.is_absolute():
            raise RequestError(400, f"a file:// path is absolute, got {raw[:80]!r}")
        resolved = path.resolve()
        if not any(resolved == root or root in resolved.parents for root in self.roots):
            roots = ", ".join(str(r) for r in self.roots)
            raise RequestError(403, f"{path} is outside the media roots ({roots})")
        if not resolved.is_file():
            raise RequestError(404, f"no such video file: {path}")
        return resolved

    def _data_bytes(self, url: str) -> bytes:
        header, sep, payload = url.partition(",")
        if not sep or not header.lower().startswith("data:video/") or not header.lower().endswith(";base64"):
            raise RequestError(400, "a data: video must be base64: data:video/mp4;base64,...")
        if len(payload) * 3 // 4 > self.max_video_bytes:
            raise RequestError(413, f"data: video is over the limit of {self.max_video_bytes} bytes")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as err:
            raise RequestError(400, f"data: video is not valid base64 ({err})") from None

    def _probe(self, source: Path | bytes, name: str) -> VideoInfo:
        try:
            info = probe(source)
            self.limits.check(info, name)
        except ClipError as err:
            status = 413 if err.error_type is ErrorType.TOO_LARGE else 422
            raise RequestError(status, f"{name} is not a decodable video ({err.error_type.value}: {err})") from None
        return info

    def _inspect(self, url: str, data: bytes | None) -> tuple[str, VideoInfo]:
        """The canonical URL sent to the replica and the video's header (blocking: file system, base64, PyAV)."""
        scheme = url.split(":", 1)[0].lower()
        if data is not None:
            return "data:video/mp4;base64," + base64.b64encode(data).decode(), self._probe(data, "the fetched video")
        if scheme == "file":
            path = self._local_path(url)
            return path.as_uri(), self._probe(path, str(path))
        return url, self._probe(self._data_bytes(url), "the data: video")

    async def check(self, messages: list, media_io_kwargs: Any) -> tuple[list[dict], dict[str, Any]]:
        """Check one chat request; the messages and frame options to send to the replica instead.

        Blocking work (file system, base64, PyAV, the tokenizer) runs in a worker thread, never on the event loop.

        Args:
            messages: the request's ``messages`` as ``ChatCompletionRequest`` validated them.
            media_io_kwargs: the request's ``media_io_kwargs``.

        Returns:
            ``(messages, media_io_kwargs)``: the rebuilt messages (:func:`canonical_messages`, the video's URL
            canonical) and ``{"video": {"num_frames": N or -1, "fps": F or -1}}``.

        Raises:
            RequestError: see the module docstring.
        """
        num_frames, fps = self.frame_options(media_io_kwargs)
        messages, where = canonical_messages(messages)
        if where is not None:
            part = messages[where[0]]["content"][where[1]]
            url = part["video_url"]["url"]
            scheme = url.split(":", 1)[0].lower()
            if scheme not in ("file", "data", "http", "https"):
                raise RequestError(400, f"video_url must be file://, data: or http(s)://, got {url[:40]!r}")
            if scheme != "data" and len(url) > MAX_URL_CHARS:
                raise RequestError(400, f"a video URL is at most {MAX_URL_CHARS} characters")
            data = None
            if scheme in ("http", "https"):
                if not self.allow_http:
                    raise RequestError(400, "http(s) videos are not fetched here (media.allow_http is false)")
                try:
                    data = await self.fetcher.fetch(url)
                except FetchError as err:
                    raise RequestError(err.status, f"{url[:200]}: {err.message}") from None
            canonical, info = await asyncio.to_thread(self._inspect, url, data)
            part["video_url"]["url"] = canonical
            try:
                sampling = request_sampling(self.sampling, num_frames, fps)
                frames = len(sample_frame_indices(sampling, info.num_frames, info.fps))
            except EmptyWindowError as err:
                raise RequestError(422, f"the video holds no frame to sample: {err}") from None
            text_tokens = await asyncio.to_thread(self._text_tokens, messages)
            _, overflow = self.model_config.context_overflow(frames, text_tokens, self.max_model_len)
            if overflow:
                raise RequestError(
                    400,
                    f"the video does not fit the context: {overflow}; "
                    "ask for fewer frames (media_io_kwargs.video.num_frames)",
                    "messages",
                )
        return messages, {"video": {"num_frames": num_frames or -1, "fps": fps or -1}}

    def _text_tokens(self, messages: list[dict]) -> int:
        """Tokens of the chat without the video (its placeholder not counted), as the chat template renders it."""
        mc = self.model_config
        turns = _text_turns(messages, mc.video_token)
        chars = sum(len(t["content"]) for t in turns)
        if chars > self.max_model_len * self.max_token_chars:
            raise RequestError(
                400, f"the text ({chars} characters) cannot fit max_model_len {self.max_model_len}", "messages"
            )
        ids = self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return len(ids) - list(ids).count(mc.video_token_index)
