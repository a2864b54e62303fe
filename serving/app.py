"""The video endpoint: an autoscaled OpenAI-compatible Ray Serve app hosting a vidlm model on vLLM.

``vidlm serve --config serving/configs/cpu.yaml [key=value ...]`` (local Ray, or the cluster in ``RAY_ADDRESS``);
``vidlm deploy --config ... --address http://HEAD:8265`` pushes the same config to a running cluster, and
``cluster/kuberay-rayservice.yaml`` declares it on KubeRay. All three go through :func:`build_app`.

Built on ``ray.serve.llm``: :func:`build_app` turns a :class:`ServeConfig` into one ``LLMConfig`` (the vLLM
engine with the vidlm plugin, its placement bundle, autoscaling and LoRA settings) and calls
``build_openai_app``. Ray Serve LLM runs the replicas (vLLM's OpenAI server inside each: chat template,
streaming, ``/v1/models``), routing, autoscaling and LoRA multiplexing. What is ours:

- :class:`serving.ingress.VideoIngress`, the ``ingress_cls`` of ``build_openai_app``: Ray's ``OpenAiIngress`` with its
  ``/v1/chat/completions`` route replaced by one that reads the body itself (so an oversized body is refused
  before it is read, and malformed JSON gets an OpenAI error, not a 500) and runs
  :class:`serving._checks.VideoRequestChecker` before the request reaches a replica. Every other route is
  Ray's.
- Videos in requests are decoded by vidlm's vLLM video loader (:class:`vidlm.models.vllm_model.VidlmVideoLoader`),
  the frame sampling and decoder of the recaption job: a clip served and a clip recaptioned show the model
  the same frames.

Requests: ``video_url`` content parts (``file://`` inside ``media.roots``, ``data:video/...;base64,``,
``http(s)://`` within ``media.max_video_mb`` and ``media.fetch_timeout_s``); frame options as vLLM's own
``media_io_kwargs={"video": {"num_frames": N, "fps": F}}`` (``extra_body`` of the ``openai`` client).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from vidlm.config import JobConfig, Section
from vidlm.decode import DecodeLimits
from vidlm.engine import VllmEngineConfig, cpu_engine_env, engine_on_gpu, vllm_engine_kwargs
from vidlm.storage import is_remote

__all__ = [
    "AutoscalingConfig",
    "IngressConfig",
    "LoraServeConfig",
    "MediaConfig",
    "ServeConfig",
    "app_builder",
    "build_app",
    "deploy",
    "deploy_job",
    "serve_config",
    "serve_endpoint",
    "serve_job",
]

MiB = 2**20
"""Bytes in a MiB (the ``media`` limits are in MiB)."""

FEW_MALLOC_ARENAS = {"MALLOC_ARENA_MAX": "2"}
"""Environment of the ingress and the engine replicas, which handle request bodies and videos of megabytes in
worker threads: glibc otherwise grows one arena per thread, the freed buffers fragmented across them (a soak
measured the replica growing ~13 MiB a minute without it, flat with it)."""


class MediaConfig(Section):
    """Where request videos may come from, and how big they may be."""

    roots: list[str] = []
    """Directories ``file://`` videos must lie in (after resolving symlinks; ``pkg://PACKAGE/SUB`` names a
    folder inside an installed package); empty: no ``file://``."""
    allow_http: bool = True
    """Fetch ``http(s)://`` videos (in the ingress, under the SSRF policy of ``serving/_fetch.py``: public
    addresses only, on every redirect hop, with the two limits below)."""
    allow_hosts: list[str] = []
    """Hosts the fetch policy opens besides public addresses: names (``videos.internal``) or networks
    (``10.1.0.0/16``, ``127.0.0.1``)."""
    max_redirects: int = Field(3, ge=0)
    """Redirects an ``http(s)`` fetch follows, each hop checked again."""
    max_video_mb: float = Field(64.0, gt=0)
    """Largest ``http(s)`` or ``data:`` video, MiB."""
    fetch_timeout_s: float = Field(10.0, gt=0)
    """Time limit of one ``http(s)`` fetch, seconds."""
    max_body_mb: float = Field(96.0, gt=0)
    """Largest request body, MiB (a ``data:`` video is 4/3 of its bytes in base64)."""
    limits: DecodeLimits = DecodeLimits()
    """The largest video decoded (frame pixels, seconds, frames, fps; checked on the header in the ingress and
    again in the replica's loader)."""

    @model_validator(mode="after")
    def _hosts_parse(self) -> MediaConfig:
        from serving._fetch import VideoFetcher

        VideoFetcher(1, 1.0, self.allow_hosts)  # raises on an entry that is neither a name nor a network
        return self

    @model_validator(mode="after")
    def _body_holds_a_video(self) -> MediaConfig:
        if self.max_body_mb < self.max_video_mb * 4 / 3:
            raise ValueError(
                f"max_body_mb {self.max_body_mb:g} cannot carry a data: video of max_video_mb {self.max_video_mb:g} "
                f"(base64 needs {self.max_video_mb * 4 / 3:.4g})"
            )
        return self


class AutoscalingConfig(Section):
    """Ray Serve autoscaling of the engine replicas (``deployment_config.autoscaling_config``)."""

    min_replicas: int = Field(1, ge=0)
    """0 allows scale to zero (the first request then waits for an engine to start)."""
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    """Replicas at deploy time; ``None``: ``min_replicas`` (at least 1)."""
    target_ongoing_requests: float = Field(8.0, gt=0)
    """Requests per replica the autoscaler aims at (queued + running)."""
    upscale_delay_s: float = Field(30.0, ge=0)
    """Seconds the load must stay above target before adding replicas."""
    downscale_delay_s: float = Field(600.0, ge=0)
    """Seconds the load must stay below target before removing replicas."""

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"initial_replicas {self.initial_replicas} outside [min_replicas, max_replicas]")
        return self


class IngressConfig(Section):
    """Backpressure at the endpoint's ingress: bounded work, and 503 + ``Retry-After`` beyond it.

    A request's body is parsed, decoded, probed and tokenized only while it holds one of
    ``max_concurrent_checks`` slots; one that waits ``check_wait_s`` for a slot gets 503. Requests over
    ``max_ongoing_requests`` (checks plus answers being streamed) wait in Ray Serve's proxy, at most
    ``max_queued_requests`` of them; beyond, Serve answers 503 (``BackpressureConfig``). Ray Serve hands the
    ingress a request's whole body when the request starts, so its memory grows with
    ``max_ongoing_requests x media.max_body_mb`` (a few copies of each body): size the two together.
    """

    max_ongoing_requests: int = Field(256, gt=0)
    """Requests the ingress replica holds at once (Serve's ``max_ongoing_requests``)."""
    max_queued_requests: int = Field(64, ge=-1)
    """Requests waiting for the ingress in Serve's proxy (``-1``: no limit)."""
    max_concurrent_checks: int = Field(4, gt=0)
    """Requests whose body is read and checked at once."""
    check_wait_s: float = Field(10.0, gt=0)
    """Seconds a request waits for a check slot before its 503."""
    retry_after_s: float = Field(1.0, ge=0)
    """The ``Retry-After`` of a 503, seconds."""


class LoraServeConfig(Section):
    """LoRA adapters served by name (Ray Serve LLM multiplexing): ``model="<model_id>:<adapter>"``."""

    dynamic_lora_loading_path: str
    """Cloud folder (``s3://``, ``gs://``, ``abfss://``, ``azure://``: Ray Serve LLM 2.60 downloads adapters from
    cloud storage only) holding one sub-folder per adapter, each a peft directory (``vidlm train`` output)."""
    max_num_adapters_per_replica: int = Field(4, gt=0)
    max_lora_rank: int = Field(64, gt=0)


class ServeConfig(JobConfig):
    """``vidlm serve`` / ``vidlm deploy``: one YAML of this shape, plus ``key=value`` overrides."""

    model: str = "smol"
    """A preset (``smol``, ``tiny``) or a vidlm model directory (``vidlm convert`` output), reachable from
    every node that runs a replica or the ingress, or one in object storage (``s3://``, ``gs://``): each replica's
    node downloads it (Ray Serve LLM's ``model_source.bucket_uri``), the ingress once into its node's cache."""
    model_id: str | None = None
    """The name clients send as ``model``; ``None``: the preset name, or the directory's name."""
    name: str = "vidlm"
    """The Serve application's name."""
    route_prefix: str = "/"
    host: str = "127.0.0.1"
    """Where ``vidlm serve`` binds Serve's HTTP proxy on a local cluster (``0.0.0.0`` to expose it)."""
    port: int = Field(8000, gt=0, lt=65536)
    engine: VllmEngineConfig = VllmEngineConfig()
    media: MediaConfig = MediaConfig()
    ingress: IngressConfig = IngressConfig()
    autoscaling: AutoscalingConfig = AutoscalingConfig()
    max_ongoing_requests: int = Field(32, gt=0)
    """Requests one replica holds at once; more wait in Serve's queue (and count as load)."""
    cpu_threads_bind: str | None = Field(None, pattern=r"^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$")
    """CPU replicas: the cores each binds its engine's threads to (vLLM's ``VLLM_CPU_OMP_THREADS_BIND``, e.g. ``0-15``
    where one replica owns a 16-core node; measured on 2 cores: 1.14x the output tokens/s of unbound threads);
    ``None``: unbound threads, as many as the replica's CPUs, for replicas that share nodes."""
    scheduling_policy: Literal["priority", "fcfs"] = "priority"
    """vLLM's order of waiting requests: ``priority`` serves online requests (priority 0) before the batch requests
    of ``vidlm recaption --serve`` (``serve.priority``, higher); ``fcfs``: arrival order for all."""
    lora: LoraServeConfig | None = None

    def served_model_id(self) -> str:
        """The ``model`` name clients call."""
        return self.model_id or Path(self.model).name


def _common_root(roots: list[str]) -> str:
    """The one directory vLLM's ``allowed_local_media_path`` can take: the deepest parent of every root."""
    if not roots:
        return ""
    return os.path.commonpath([str(Path(r).resolve()) for r in roots])


def llm_config(config: ServeConfig, model_dir: Path, gpus: int) -> Any:
    """The ``ray.serve.llm.LLMConfig`` of the endpoint.

    Args:
        config: the endpoint's config.
        model_dir: the resolved vidlm model directory.
        gpus: GPUs in the cluster (decides ``engine.accelerator: auto``).
    """
    from ray.serve.llm import LLMConfig

    from vidlm.models.video_llm import VidlmConfig
    from vidlm.models.vllm_model import VIDEO_LOADER

    model_config = VidlmConfig.from_pretrained(model_dir)
    engine = config.engine
    on_gpu = engine_on_gpu(engine, gpus)
    kwargs = vllm_engine_kwargs(model_dir, engine, on_gpu=on_gpu)
    kwargs.pop("model")  # Ray Serve LLM passes model_source
    kwargs["media_io_kwargs"] = {
        "video": {
            "video_backend": VIDEO_LOADER,
            "sampling": model_config.sampling_config.model_dump(),
            "size": model_config.image_size,
            "limits": config.media.limits.model_dump(),
        }
    }
    kwargs["limit_mm_per_prompt"] = {"video": 1}
    kwargs["scheduling_policy"] = config.scheduling_policy
    # Per-request frame options reach the loader; VideoIngress lets through only num_frames and fps, checked.
    kwargs["trust_request_mm_kwargs"] = True
    if config.media.roots:
        kwargs["allowed_local_media_path"] = _common_root(config.media.roots)
    if config.lora is not None:
        kwargs.update(enable_lora=True, max_lora_rank=config.lora.max_lora_rank)
    # CPU replicas share nodes: each runs as many threads as the CPUs its bundle reserves, unless bound.
    threads = max(1, round(engine.num_cpus))
    env = {} if on_gpu else cpu_engine_env(engine, threads=threads, bind=config.cpu_threads_bind)
    env.update(FEW_MALLOC_ARENAS)  # the replica decodes request videos in vLLM's media threads
    autoscaling = config.autoscaling.model_dump(exclude_none=True)
    if "initial_replicas" not in autoscaling:
        autoscaling["initial_replicas"] = max(1, config.autoscaling.min_replicas)
    bundle = {"CPU": engine.num_cpus}
    return LLMConfig(
        model_loading_config={
            "model_id": config.served_model_id(),
            "model_source": {"bucket_uri": config.model} if is_remote(config.model) else str(model_dir),
        },
        engine_kwargs=kwargs,
        placement_group_config=None if on_gpu else {"bundles": [bundle], "strategy": "PACK"},
        deployment_config={
            "autoscaling_config": autoscaling,
            "max_ongoing_requests": config.max_ongoing_requests,
            # On CPU the engine's bundle holds the replica's CPUs; Ray's default adds one more for the replica
            # actor itself (merged into that bundle), which would double what a replica reserves.
            **({} if on_gpu else {"ray_actor_options": {"num_cpus": 0}}),
        },
        runtime_env={"env_vars": env} if env else None,
        lora_config=config.lora.model_dump(exclude={"max_lora_rank"}) if config.lora else None,
    )


def build_app(config: ServeConfig, gpus: int | None = None):
    """The Serve application of the endpoint (``serve.run(build_app(cfg))``).

    Args:
        config: the endpoint's config.
        gpus: GPUs in the cluster; ``None``: asked from the connected Ray cluster (0 when none is).

    Returns:
        ``ray.serve.Application``: Ray Serve LLM's OpenAI app with :class:`VideoIngress` as its ingress.

    Raises:
        FileNotFoundError: the model directory or a media root does not exist.
        ValueError: an unknown preset.
    """
    import ray
    from ray.serve.llm import LLMServingArgs, build_openai_app

    from serving.ingress import VideoIngress
    from vidlm.clips import resolve_root
    from vidlm.models.presets import resolve_model

    roots = [str(resolve_root(root, Path.cwd()).resolve()) for root in config.media.roots]
    for given, root in zip(config.media.roots, roots, strict=True):
        if not Path(root).is_dir():
            raise FileNotFoundError(f"media.roots: {given} is not a directory")
    config = config.model_copy(update={"media": config.media.model_copy(update={"roots": roots})})
    if gpus is None:
        gpus = int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0
    model_dir = resolve_model(config.model)
    llm = llm_config(config, model_dir, gpus)
    spec = config.model if is_remote(config.model) else str(model_dir)  # as the ingress's node finds the model
    args = LLMServingArgs(
        llm_configs=[llm],
        ingress_cls_config={
            "ingress_cls": VideoIngress,
            "ingress_extra_kwargs": {"serve_configs": {llm.model_id: (config.model_dump(), spec)}},
        },
        ingress_deployment_config={
            # The ingress only routes: on a CPU machine, a CPU held by it is one no engine can use. Its checks run
            # in worker threads on request bodies of megabytes.
            "ray_actor_options": {"num_cpus": 0, "runtime_env": {"env_vars": FEW_MALLOC_ARENAS}},
            "max_ongoing_requests": config.ingress.max_ongoing_requests,
            "max_queued_requests": config.ingress.max_queued_requests,
            "backpressure_config": {"status_code": 503, "retry_after_s": config.ingress.retry_after_s},
        },
    )
    return build_openai_app(args)


def app_builder(args: dict[str, Any]):
    """Serve's ``import_path`` entry (``serving.app:app_builder``): ``args`` is a :class:`ServeConfig` mapping.

    What ``vidlm deploy`` and the KubeRay ``RayService`` give Serve; raises ``ConfigError`` on a bad field.
    """
    from vidlm.config import validate_config

    return build_app(validate_config(ServeConfig, dict(args)))


IMPORT_PATH = "serving.app:app_builder"
"""What Serve imports on the cluster (``vidlm deploy``, the KubeRay ``RayService``)."""


def serve_config(config: ServeConfig, working_dir: str | None = None) -> dict[str, Any]:
    """Ray Serve's declarative config of the endpoint: what ``serve deploy`` and a ``RayService`` take.

    Args:
        config: the endpoint's config; travels as the application's ``args`` (see :func:`app_builder`).
        working_dir: a ``runtime_env`` working dir for the application (e.g. a zip URL of this repository);
            ``None``: the cluster image carries vidlm.

    Returns:
        ``{"http_options": ..., "applications": [{"name", "route_prefix", "import_path", "args", ...}]}``.
    """
    application: dict[str, Any] = {
        "name": config.name,
        "route_prefix": config.route_prefix,
        "import_path": IMPORT_PATH,
        "args": config.model_dump(mode="json"),
    }
    if working_dir:
        application["runtime_env"] = {"working_dir": working_dir}
    return {"http_options": {"host": "0.0.0.0", "port": config.port}, "applications": [application]}


def deploy(config: ServeConfig, address: str, working_dir: str | None = None) -> dict[str, Any]:
    """Push the endpoint to a running Ray cluster through its dashboard (what ``serve deploy`` does).

    Args:
        config: the endpoint's config.
        address: the cluster's dashboard, ``http://HEAD:8265``.
        working_dir: see :func:`serve_config`.

    Returns:
        The Serve config sent. Deployment continues on the cluster; ``serve status`` follows it.

    Raises:
        ConnectionError / RuntimeError: the dashboard is unreachable or refused the config (Ray's errors).
    """
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    sent = serve_config(config, working_dir)
    ServeSubmissionClient(address).deploy_applications(sent)
    return sent


def serve_endpoint(config: ServeConfig) -> str:
    """Start the endpoint on the connected Ray cluster (a local one when ``RAY_ADDRESS`` is unset).

    Returns once every replica is healthy (the engines started); the app keeps running until
    ``serve.shutdown()`` or the end of the Ray session.

    Returns:
        The base URL of the OpenAI API, e.g. ``http://127.0.0.1:8000/v1``.
    """
    from ray import serve

    from vidlm.cluster import init_ray

    init_ray()
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config), name=config.name, route_prefix=config.route_prefix)
    prefix = config.route_prefix.rstrip("/")
    return f"http://{config.host if config.host != '0.0.0.0' else '127.0.0.1'}:{config.port}{prefix}/v1"


def serve_job(config: ServeConfig, echo: Callable[[Any], None] = print) -> None:
    """``vidlm serve``: start the endpoint (:func:`serve_endpoint`), say where, and keep it up until Ctrl-C."""
    import time

    url = serve_endpoint(config)
    echo(f"[green]serving[/] model [bold]{config.served_model_id()}[/] at [bold]{url}[/] (Ctrl-C stops)")
    roots = ", ".join(config.media.roots) or "none: data: and http(s) videos only"
    echo(f"  video_url parts: file:// under {roots}; README 'The video endpoint' has a client example")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()


def deploy_job(
    config: ServeConfig,
    address: str | None,
    working_dir: str | None = None,
    dry_run: bool = False,
    echo: Callable[[Any], None] = print,
) -> None:
    """``vidlm deploy``: push the endpoint to the cluster at ``address`` (:func:`deploy`), or print its Serve config.

    Raises:
        ValueError: no ``address`` (and not ``dry_run``).
        ConnectionError, RuntimeError: the dashboard is unreachable or refused the config.
    """
    from rich.json import JSON

    from vidlm.submit import use_token_auth_if_available

    if dry_run:
        echo(JSON(json.dumps(serve_config(config, working_dir))))
        return
    if not address:
        raise ValueError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    use_token_auth_if_available()  # before Ray is imported, as for `vidlm submit`
    try:
        deploy(config, address, working_dir)
    except (ConnectionError, RuntimeError) as err:
        raise RuntimeError(f"{address}: {err}") from None
    echo(f"deployed [bold]{config.name}[/] to {address}; follow it with: serve status --address {address}")
