"""The endpoint's ingress: Ray Serve LLM's ``OpenAiIngress`` with a chat route that checks videos first.

Ray's ingress methods this class calls (``_get_model_id``, ``_process_llm_request``) are not public API;
``tests/test_serve_parts.py`` pins them so a Ray upgrade that changes them fails loudly.
"""

from __future__ import annotations

import json

from ray.serve.llm.ingress import OpenAiIngress
from starlette.requests import Request

from serving.app import MiB, ServeConfig

__all__ = ["VideoIngress"]


class VideoIngress(OpenAiIngress):
    """Ray Serve LLM's ``OpenAiIngress`` whose ``/v1/chat/completions`` checks videos before any replica.

    Args:
        llm_deployments, model_cards, lora_paths: what ``build_openai_app`` binds (Ray's).
        serve_configs: ``model_id -> (ServeConfig as a dict, model directory)``, for the checks.
    """

    def __init__(self, llm_deployments, model_cards, *, lora_paths=None, serve_configs=None, **kwargs):
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths, **kwargs)
        from transformers import AutoTokenizer

        from serving._checks import VideoRequestChecker
        from vidlm.models.video_llm import VidlmConfig

        self.checkers: dict[str, VideoRequestChecker] = {}
        self.max_body_bytes = 0
        for model_id, (data, model_dir) in (serve_configs or {}).items():
            config = ServeConfig.model_validate(data)
            model_config = VidlmConfig.from_pretrained(model_dir)
            max_len = config.engine.max_model_len or model_config.text_config.max_position_embeddings
            media = config.media
            self.checkers[model_id] = VideoRequestChecker(
                AutoTokenizer.from_pretrained(model_dir),
                model_config,
                max_model_len=max_len,
                roots=media.roots,
                allow_http=media.allow_http,
                max_video_bytes=int(media.max_video_mb * MiB),
                fetch_timeout_s=media.fetch_timeout_s,
            )
            self.max_body_bytes = max(self.max_body_bytes, int(media.max_body_mb * MiB))

    async def _read_json(self, request: Request) -> dict:
        from serving._checks import RequestError

        declared = request.headers.get("content-length")
        limit = self.max_body_bytes
        if declared and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"request body is {int(declared)} bytes; the limit is {limit} (media.max_body_mb)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"request body is over {limit} bytes (media.max_body_mb)")
            chunks.append(chunk)
        try:
            payload = json.loads(b"".join(chunks))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RequestError(400, f"malformed JSON body: {err}") from None
        if not isinstance(payload, dict):
            raise RequestError(400, f"the body must be a JSON object, got {type(payload).__name__}")
        return payload

    async def chat(self, request: Request):
        """``POST /v1/chat/completions``: the checks, then Ray Serve LLM's own chat (streaming or not)."""
        from fastapi import HTTPException
        from pydantic import ValidationError
        from ray.serve.llm.openai_api_models import ChatCompletionRequest
        from starlette.responses import JSONResponse

        from serving._checks import RequestError

        try:
            payload = await self._read_json(request)
            try:
                body = ChatCompletionRequest.model_validate(payload)
            except ValidationError as err:
                first = err.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise RequestError(400, f"not a chat completion request: {where}: {first['msg']}", where) from None
            try:
                model_id = await self._get_model_id(body.model)
            except HTTPException as err:
                raise RequestError(err.status_code, str(err.detail), "model") from None
            checker = self.checkers.get(model_id.split(":", 1)[0])
            if checker is not None:
                body.media_io_kwargs = await checker.check(body.messages, body.media_io_kwargs)
        except RequestError as err:
            return JSONResponse(status_code=err.status, content=err.body())
        return await self._process_llm_request(body, call_method="chat", raw_request=request)
