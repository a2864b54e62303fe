"""The endpoint's ingress: Ray Serve LLM's ``OpenAiIngress`` with a chat route that checks videos first.

Ray's ingress methods this class calls (``_get_model_id``, ``_process_llm_request``) are not public API;
``tests/test_serve_parts.py`` pins them so a Ray upgrade that changes them fails loudly.
"""

from __future__ import annotations

import asyncio
import json
import math

from ray.serve.llm.ingress import OpenAiIngress
from starlette.requests import Request

from serving.app import IngressConfig, MiB, ServeConfig
from vidlm import metrics

__all__ = ["VideoIngress"]


class VideoIngress(OpenAiIngress):
    """Ray Serve LLM's ``OpenAiIngress`` whose ``/v1/chat/completions`` checks videos before any replica.

    A request is read and checked only while it holds one of ``ingress.max_concurrent_checks`` slots (see
    :class:`serving.app.IngressConfig`); JSON parsing, validation, base64, probing and tokenizing run in
    worker threads, so the event loop keeps answering.

    Args:
        llm_deployments, model_cards, lora_paths: what ``build_openai_app`` binds (Ray's).
        serve_configs: ``model_id -> (ServeConfig as a dict, model directory or object storage URI)``, for the
            checks.
    """

    def __init__(self, llm_deployments, model_cards, *, lora_paths=None, serve_configs=None, **kwargs):
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths, **kwargs)
        from transformers import AutoTokenizer

        from serving._checks import VideoRequestChecker
        from vidlm.models.presets import resolve_model
        from vidlm.models.video_llm import VidlmConfig

        self.checkers: dict[str, VideoRequestChecker] = {}
        self.max_body_bytes = 0
        ingress = IngressConfig()
        for model_id, (data, model_spec) in (serve_configs or {}).items():
            config = ServeConfig.model_validate(data)
            model_dir = resolve_model(model_spec)  # a URI: copied once to this node
            model_config = VidlmConfig.from_pretrained(model_dir)
            max_len = config.engine.max_model_len or model_config.text_config.max_position_embeddings
            self.checkers[model_id] = VideoRequestChecker(
                AutoTokenizer.from_pretrained(model_dir), model_config, max_len, config.media
            )
            self.max_body_bytes = max(self.max_body_bytes, int(config.media.max_body_mb * MiB))
            ingress = config.ingress
        self.ingress = ingress
        self.check_slots = asyncio.Semaphore(ingress.max_concurrent_checks)

    async def _body_chunks(self, request: Request):
        """The request body's chunks as they arrive, refused with a 413 past ``media.max_body_mb``."""
        from serving._checks import RequestError

        declared = request.headers.get("content-length")
        limit = self.max_body_bytes
        if declared and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"request body is {int(declared)} bytes; the limit is {limit} (media.max_body_mb)")
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"request body is over {limit} bytes (media.max_body_mb)")
            yield chunk

    async def _read_json(self, request: Request) -> dict:
        from serving._checks import RequestError

        chunks = [chunk async for chunk in self._body_chunks(request)]
        try:
            payload = await asyncio.to_thread(json.loads, b"".join(chunks))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise RequestError(400, f"malformed JSON body: {err}") from None
        if not isinstance(payload, dict):
            raise RequestError(400, f"the body must be a JSON object, got {type(payload).__name__}")
        return payload

    async def _discard_body(self, request: Request, limit: int) -> None:
        """Read what is left of a refused request's body, keeping nothing, up to ``limit`` bytes (a lingering
        close, as web servers do): answering while the client still uploads closes the connection under the
        upload, and the client sees a reset instead of the answer."""
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return

    async def _checked(self, request: Request):
        """The request as the replica gets it: parsed by Ray's ``ChatCompletionRequest``, then checked."""
        from fastapi import HTTPException

        from serving._checks import RequestError, parse_request

        body = await asyncio.to_thread(parse_request, await self._read_json(request))
        try:
            model_id = await self._get_model_id(body.model)
        except HTTPException as err:
            raise RequestError(err.status_code, str(err.detail), "model") from None
        checker = self.checkers.get(model_id.split(":", 1)[0])
        if checker is not None:
            body.messages, body.media_io_kwargs = await checker.check(body.messages, body.media_io_kwargs)
        return body

    async def chat(self, request: Request):
        """``POST /v1/chat/completions``: the checks, then Ray Serve LLM's own chat (streaming or not)."""
        from starlette.responses import JSONResponse

        from serving._checks import RequestError

        try:
            await asyncio.wait_for(self.check_slots.acquire(), self.ingress.check_wait_s)
        except asyncio.TimeoutError:
            await self._discard_body(request, self.max_body_bytes)
            retry = str(math.ceil(self.ingress.retry_after_s))  # Serve's own rounding of its Retry-After
            error = RequestError(503, "the endpoint is busy checking other requests; retry later")
            metrics.request_done(503)
            return JSONResponse(status_code=503, content=error.body(), headers={"Retry-After": retry})
        try:
            body = await self._checked(request)
        except RequestError as err:
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_body_bytes:  # refused unread: the upload goes on
                await self._discard_body(request, 2 * self.max_body_bytes)
            metrics.request_done(err.status)
            return JSONResponse(status_code=err.status, content=err.body())
        finally:
            self.check_slots.release()
        response = await self._process_llm_request(body, call_method="chat", raw_request=request)
        metrics.request_done(getattr(response, "status_code", 200))
        return response
