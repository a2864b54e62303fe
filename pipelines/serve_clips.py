"""The engine stage of ``vidlm recaption --serve APP``: captions from the replicas of a running vidlm Serve app.

One fleet for batch and online traffic: the job decodes and samples frames in its CPU stage as always, then
:class:`ServeCaptionClips` sends each clip's requests to the app's ``LLMServer`` deployment through a Ray Serve
deployment handle (the frames travel in Ray's object store, not over HTTP; the replica does not decode them
again: :func:`vidlm.models.vllm_model.frames_data_url`). Each request is an OpenAI ``ChatCompletionRequest``, the
endpoint's own method, so the prompt is rendered by the replica's chat template exactly as online requests are.

Online requests keep their latency by two means, both in :class:`ServeClientConfig`: batch requests carry a vLLM
``priority`` after online ones (the app's ``scheduling_policy: priority``), and the job keeps at most
``batch_share`` of each running replica's ``max_ongoing_requests`` in flight, so Serve's queue in front of the
replicas stays free for online traffic. The replicas are recounted every ``poll_s``: when autoscaling adds
replicas under the batch's load, the job sends more.

A replica lost mid-request (a killed actor, a lost node) fails the request with a Ray actor error; the request is
sent again, and Serve routes it to a live replica. Anything else the replica answers (an OpenAI error) is the
clip's ``generation_failed`` row, as with the job's own engines.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from typing import Any

import pyarrow as pa
from pydantic import Field

from pipelines.caption_clips import CaptionClips, Generated, sampling_params
from vidlm.config import Section
from vidlm.engine import GenerationConfig

__all__ = ["ServeCaptionClips", "ServeClientConfig", "ServedModel", "find_served_model", "serve_stage_args"]

log = logging.getLogger(__name__)

LLM_DEPLOYMENT_PREFIX = "LLMServer:"
"""Ray Serve LLM names an app's engine deployments ``LLMServer:<model id>``."""


class ServeClientConfig(Section):
    """``vidlm recaption --serve APP``: caption through a running Serve app instead of engines of the job's own."""

    app: str | None = None
    """The Serve application (``vidlm serve`` / ``vidlm deploy``'s ``name``); ``None``: the job starts its own engines
    (the ``engine`` section)."""
    priority: int = Field(1, ge=1)
    """vLLM priority of the batch's requests: online requests have 0, and lower goes first. An app started with
    ``scheduling_policy: fcfs`` gets 0 (vLLM refuses priorities there)."""
    batch_share: float = Field(0.5, gt=0, le=1)
    """Share of each running replica's ``max_ongoing_requests`` the batch holds in flight (at least one request);
    the rest is left to online requests."""
    poll_s: float = Field(2.0, gt=0)
    """Seconds between counts of the running replicas, which set the batch's in-flight requests."""
    batch_size: int = Field(4, gt=0)
    """Clips per call of the client stage (Ray Data ``batch_size``)."""
    max_attempts: int = Field(5, ge=1)
    """Times a request is sent when the replica holding it dies, each time to a live replica."""
    num_cpus: float = Field(0.5, gt=0)
    """CPUs of the client actor (it encodes frames and awaits answers)."""


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """What a running vidlm Serve app serves, read from its ``LLMServer`` deployment (``LLMServer.llm_config``)."""

    app: str
    deployment: str
    """The engine deployment's name, ``LLMServer:<model id>``."""
    model_id: str
    """The name clients send as ``model``."""
    model: str
    """Where the replicas load the model: a vidlm model directory, or an ``s3://`` / ``gs://`` URI."""
    max_model_len: int | None
    """The engine's context in tokens; ``None``: the LLM's own."""
    max_ongoing_requests: int
    """Requests one replica holds at once."""
    max_replicas: int
    priority_scheduling: bool
    """The engines order waiting requests by priority (``scheduling_policy: priority``)."""


def find_served_model(app: str) -> ServedModel:
    """Read what the running Serve application ``app`` serves (Ray must be connected).

    Raises:
        ValueError: no running application of that name, or it has no single ``LLMServer`` deployment.
    """
    from ray import serve

    applications = serve.status().applications
    if app not in applications:
        running = sorted(applications) or "none"
        raise ValueError(f"no Serve application {app!r} on this cluster (running: {running}); start it: vidlm serve")
    engines = [d for d in applications[app].deployments if d.startswith(LLM_DEPLOYMENT_PREFIX)]
    if len(engines) != 1:
        raise ValueError(f"Serve application {app!r} has {len(engines)} {LLM_DEPLOYMENT_PREFIX} deployments, not 1")
    llm = serve.get_deployment_handle(engines[0], app).llm_config.remote().result()
    source = llm.model_loading_config.model_source
    model = getattr(source, "bucket_uri", source)
    deployment = llm.deployment_config
    autoscaling = deployment.get("autoscaling_config") or {}
    return ServedModel(
        app=app,
        deployment=engines[0],
        model_id=llm.model_id,
        model=str(model),
        max_model_len=llm.engine_kwargs.get("max_model_len"),
        max_ongoing_requests=int(deployment.get("max_ongoing_requests", 1)),
        max_replicas=int(autoscaling.get("max_replicas", deployment.get("num_replicas", 1))),
        priority_scheduling=llm.engine_kwargs.get("scheduling_policy") == "priority",
    )


def running_replicas(served: ServedModel) -> int:
    """Replicas of the app's engine deployment that are ``RUNNING`` now (``serve.status()``)."""
    from ray import serve

    app = serve.status().applications.get(served.app)
    deployment = app.deployments.get(served.deployment) if app else None
    return int(deployment.replica_states.get("RUNNING", 0)) if deployment else 0


def batch_in_flight(served: ServedModel, client: ServeClientConfig, replicas: int) -> int:
    """Requests the batch keeps in flight with ``replicas`` running: ``batch_share`` of their
    ``max_ongoing_requests``, at least 1."""
    return max(1, math.floor(client.batch_share * served.max_ongoing_requests * replicas))


def serve_stage_args(served: ServedModel, client: ServeClientConfig, templates: int) -> dict[str, Any]:
    """Ray Data ``map_batches`` arguments of the client stage: one actor holding enough batches to fill
    :func:`batch_in_flight` at ``max_replicas``, and one more batch waiting."""
    import ray

    most = batch_in_flight(served, client, served.max_replicas)
    batches = math.ceil(most / (client.batch_size * templates)) + 1
    return {
        "batch_size": client.batch_size,
        "compute": ray.data.ActorPoolStrategy(size=1, max_tasks_in_flight_per_actor=batches),
        "max_concurrency": batches,
        "num_cpus": client.num_cpus,
    }


class InFlight:
    """At most :attr:`limit` requests at once, the limit changed while requests wait (``async with``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._changed = asyncio.Condition()

    async def __aenter__(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.used < self.limit)
            self.used += 1

    async def __aexit__(self, *exc) -> None:
        async with self._changed:
            self.used -= 1
            self._changed.notify_all()

    async def set_limit(self, limit: int) -> None:
        async with self._changed:
            self.limit = limit
            self._changed.notify_all()


class ReplicaError(RuntimeError):
    """The replica answered a request with an OpenAI error (the clip's ``generation_failed`` row)."""


class ServeCaptionClips(CaptionClips):
    """Ray Data stage (actor): :class:`CaptionClips` whose requests go to a running Serve app's replicas.

    Same inputs, prompts, context check, output columns and error rows as the job's own engine; per clip and
    template one ``ChatCompletionRequest`` (system turn when the model has one; the user turn a ``video_url`` of
    the clip's ``frames (T, S, S, 3) uint8`` and the template's text) through the deployment handle.

    Args:
        served: the app (:func:`find_served_model`).
        prompts: output column -> prompt text.
        generation: sampling of every request (``max_tokens``, ``temperature``...; the seed as the job's engine).
        client: in-flight share, priority, retries.
        schema: the output schema.
        progress: as :class:`CaptionClips`'s (``engine_started`` gets the seconds to connect).
    """

    def __init__(
        self,
        served: ServedModel,
        prompts: dict[str, str],
        generation: GenerationConfig,
        client: ServeClientConfig,
        schema: pa.Schema,
        progress=None,
    ):
        from ray import serve

        from vidlm.models.presets import resolve_model

        started = time.perf_counter()
        self.served = served
        self.client = client
        self.generation = generation
        self.model_name = served.model_id
        self.schema = schema
        self.progress = progress
        self._load_prompts(str(resolve_model(served.model)), prompts)
        self.texts = prompts
        self.max_model_len = served.max_model_len or int(self.model_config.text_config.max_position_embeddings)
        self.handle = serve.get_deployment_handle(served.deployment, served.app).options(stream=True)
        self.priority = client.priority if served.priority_scheduling else 0
        self.replicas = running_replicas(served)
        self.in_flight = InFlight(batch_in_flight(served, client, max(1, self.replicas)))
        self.startup_s = time.perf_counter() - started
        self._warm = asyncio.Lock()
        self._warmed = False

    async def _warm_up(self) -> None:
        """The replicas are warm already: start following their count, and report the seconds to connect."""
        async with self._warm:
            if self._warmed:
                return
            self._follower = asyncio.ensure_future(self._follow_replicas())
            self._warmed = True
            if self.progress is not None:
                await self.progress.engine_started.remote(self.startup_s)
                await self.progress.serve_capacity.remote(self.replicas, self.in_flight.limit)

    async def _follow_replicas(self) -> None:
        while True:
            await asyncio.sleep(self.client.poll_s)
            try:
                replicas = await asyncio.to_thread(running_replicas, self.served)
            except Exception as err:  # the controller is restarting: keep the last limit
                log.warning("counting the replicas of %s failed: %s", self.served.app, err)
                continue
            limit = batch_in_flight(self.served, self.client, max(1, replicas))
            if limit != self.in_flight.limit:
                log.info("%s: %d replicas running, %d batch requests in flight", self.served.app, replicas, limit)
                await self.in_flight.set_limit(limit)
            if replicas != self.replicas and self.progress is not None:
                await self.progress.serve_capacity.remote(replicas, limit)
            self.replicas = replicas

    async def __call__(self, batch: dict[str, Any]):
        """:meth:`CaptionClips.__call__` with each clip's frames as a ``video_url`` (:func:`frames_data_url`), encoded
        once for all its templates."""
        from vidlm.models.vllm_model import frames_data_url

        batch["frames"] = [frames_data_url(frames) for frames in batch["frames"]]
        async for table in super().__call__(batch):
            yield table

    def request(self, clip_id: str, template: str, video_url: str):
        """The ``ChatCompletionRequest`` of one caption of the clip whose frames ``video_url`` carries."""
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        params = sampling_params(self.generation, clip_id, template)
        system = self.model_config.system_prompt
        video = {"type": "video_url", "video_url": {"url": video_url}}
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": [video, {"type": "text", "text": self.texts[template]}]})
        return ChatCompletionRequest(
            model=self.served.model_id,
            messages=messages,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            repetition_penalty=params.repetition_penalty,
            ignore_eos=params.ignore_eos,
            seed=params.seed,
            priority=self.priority,
        )

    async def _generate(self, clip_id: str, template: str, video_url: str) -> Generated:
        from ray.exceptions import RayActorError

        request = self.request(clip_id, template, video_url)
        for attempt in range(1, self.client.max_attempts + 1):
            try:
                async with self.in_flight:
                    response = await self.handle.chat.remote(request).__anext__()
                break
            except RayActorError as err:
                if attempt == self.client.max_attempts:
                    raise
                name = type(err).__name__
                log.warning("%s/%s: replica lost (%s); sending again (%d)", clip_id, template, name, attempt)
                if self.progress is not None:
                    await self.progress.request_resent.remote()
                await asyncio.sleep(min(self.client.poll_s * attempt, 30.0))
        error = getattr(response, "error", None)
        if error is not None:
            raise ReplicaError(f"{getattr(error, 'code', '')} {getattr(error, 'message', error)}".strip())
        choice, usage = response.choices[0], response.usage
        text = choice.message.content or ""
        return Generated(text, usage.prompt_tokens, usage.completion_tokens, choice.finish_reason)

    def _fatal(self, error: BaseException) -> bool:
        """A replica lost ``max_attempts`` times over fails the task, not the clip."""
        from ray.exceptions import RayActorError

        return isinstance(error, RayActorError)

    def __del__(self):
        follower = getattr(self, "_follower", None)
        if follower is not None:
            follower.cancel()
