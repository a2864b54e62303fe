"""The recaption job: clips -> decoded frames -> dense captions from a vidlm video LLM on vLLM, as sharded parquet.

``vidlm recaption MANIFEST --out DIR [--model PRESET|PATH] [--config pipelines/configs/recaption.yaml] [k=v ...]``

Ray Data plan::

    read_parquet(OUT/clips)                 clip rows staged from the manifest (vidlm.clips)
      -> map_batches(decode_for_captions)    CPU tasks: decode + sample frames as the model says, thumbnails
      -> map_batches(CaptionClips)           actor pool, one vLLM engine per actor (GPU actors on a cluster)
      -> write_parquet(OUT/captions)         one row per clip; checkpointed on clip_id (exactly once)
    then OUT/browser/index.html (caption browser) and OUT/caption_lengths.png (PLLaVA Fig. 2)

With ``--serve APP`` the engine stage is :class:`pipelines.serve_clips.ServeCaptionClips` instead: the clips' requests
go to the replicas of a running vidlm Serve app (one fleet for batch and online traffic).

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
that exactly-once resume checkpoints on. It also drops vLLM's ``finish_reason``.
:class:`pipelines.caption_clips.CaptionClips` keeps everything else to vLLM: it feeds vLLM's ``AsyncLLMEngine``
(its scheduler, continuous batching, KV and prefix caching) with every template of every clip of several
in-flight batches at once.
"""

from __future__ import annotations

import collections
import io
import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
from pydantic import Field, field_validator
from ray.data import DataContext
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipelines._common import (
    DecodeConfig,
    JobSummary,
    OutputConfig,
    decode_frames,
    exactly_once,
    read_staged_clips,
    stage_clips,
    write_output,
    written_clip_ids,
)
from pipelines._output import owns_output
from pipelines.caption_clips import CAPTION_STATS, PRIMARY_COLUMN, CaptionClips, engine_stage_args, stat_column
from pipelines.serve_clips import ServeCaptionClips, ServeClientConfig, find_served_model, serve_stage_args
from vidlm.clips import CLIP_SCHEMA, ManifestConfig
from vidlm.cluster import check_cpu_budget, init_ray, num_gpus_in_cluster
from vidlm.config import JobConfig, Section
from vidlm.decode import DecodeLimits
from vidlm.engine import EngineStageConfig, GenerationConfig, engine_count
from vidlm.jobs import Report
from vidlm.sampling import SamplingConfig
from vidlm.storage import is_remote, location
from vidlm.writers import write_atomic

__all__ = [
    "NAMED_PROMPTS",
    "PLLAVA_RECAPTION_PROMPT",
    "RecaptionConfig",
    "caption_columns",
    "decode_for_captions",
    "output_schema",
    "recaption_job",
    "run_recaption",
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
    per template (e.g. ``caption`` and ``caption_zh``). A template may place the model's placeholder itself
    (``<video>``; a converted PLLaVA: ``<image>``); otherwise the video comes first."""
    generation: GenerationConfig = GenerationConfig()
    """Sampling of the captions; greedy by default, so a rerun writes the same captions."""
    engine: EngineStageConfig = EngineStageConfig()
    """One engine per actor; ``batch_size`` counts clips. Unused with ``serve.app``."""
    serve: ServeClientConfig = ServeClientConfig()
    """``serve.app`` (``--serve APP``): caption through the replicas of a running Serve app instead (the app's model,
    not ``model``)."""
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
        fields += [pa.field(stat_column(name, stat), kind) for stat, kind in CAPTION_STATS.items()]
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
    batch: dict[str, np.ndarray],
    *,
    sampling: SamplingConfig,
    size: int,
    strategy: str,
    report: ReportConfig,
    limits: DecodeLimits | None = None,
) -> dict:
    """Ray Data stage (CPU task): :func:`pipelines._common.decode_frames` plus each clip's thumbnail strip.

    Adds ``frames (T, size, size, 3) uint8`` (the model's input side, so the engine only normalises),
    ``frame_times_s``, ``num_frames``, ``decoder`` and ``thumbnail`` (JPEG bytes or None).
    """
    out = decode_frames(batch, sampling=sampling, size=size, strategy=strategy, limits=limits)
    out["thumbnail"] = np.array(
        [thumbnail_strip(f, report.thumbnails, report.thumbnail_height) for f in out["frames"]], dtype=object
    )
    return out


LATENCY_WINDOW = 4096
"""Batches whose latencies :class:`RecaptionProgress` keeps (the latest), for the job's ``paced clips/s``."""


def _median_latency(latencies) -> float:
    """The median latency of a clip (:func:`statistics.median` over clips), from ``(seconds, clips)`` per batch: each
    batch's clips share its latency."""
    ordered = sorted(latencies)
    n = sum(c for _, c in ordered)

    def nth(index: int) -> float:  # the index-th clip's latency, clips in latency order
        seen = 0
        for seconds, clips in ordered:
            seen += clips
            if index < seen:
                return seconds
        return 0.0

    return (nth((n - 1) // 2) + nth(n // 2)) / 2 if n else 0.0


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
        # (seconds from submission to return, clips) of the latest batches: a bounded window, whatever the corpus
        self.latencies: collections.deque[tuple[float, int]] = collections.deque(maxlen=LATENCY_WINDOW)
        self.most_replicas = self.most_in_flight = self.resent = 0  # --serve only

    def engine_started(self, seconds: float) -> None:
        self.engine_start_s.append(seconds)

    def serve_capacity(self, replicas: int, in_flight: int) -> None:
        """``--serve``: the app's running replicas, and the batch requests the job keeps in flight with them."""
        self.most_replicas = max(self.most_replicas, replicas)
        self.most_in_flight = max(self.most_in_flight, in_flight)

    def request_resent(self) -> None:
        """``--serve``: a request was sent again after its replica died."""
        self.resent += 1

    def batch_done(self, clips: int, output_tokens: int, submitted: float, done: float) -> None:
        self.clips += clips
        self.output_tokens += output_tokens
        self.first_request = submitted if self.first_request is None else min(self.first_request, submitted)
        self.last_done = done if self.last_done is None else max(self.last_done, done)
        self.latencies.append((done - submitted, clips))

    def snapshot(self) -> dict:
        return dict(self.__dict__)


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


@owns_output("recaption", "captions")
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
        and, once an engine ran, its start-up seconds and the steady-state rates (engine start excluded): clips and
        output tokens/s from the first request on, and ``paced clips/s``, the pace of a run long enough to keep
        every engine's ``batch_size x max_concurrent_batches`` clips in flight: in-flight clips over their median
        latency (Little's law; what ``vidlm plan recaption --calibrate`` predicts with).

    Raises:
        FileNotFoundError: the manifest or the model directory does not exist.
        ValueError: an unknown preset, a ``sampling`` with more frames than the model's, or more CPUs asked
            for than the (local) cluster has.
    """
    from pipelines.report import write_report
    from vidlm.models.presets import resolve_model
    from vidlm.models.video_llm import VidlmConfig

    out = location(out)
    if not location(manifest).exists():
        raise FileNotFoundError(f"manifest not found: {manifest}")
    served = None
    if config.serve.app:
        local = init_ray(running=True)
        served = find_served_model(config.serve.app)
        config = config.model_copy(update={"model": served.model})
    model_dir = resolve_model(config.model)
    model_config = VidlmConfig.from_pretrained(model_dir)
    sampling = config.sampling or model_config.sampling_config
    most = model_config.sampling_config.max_frames_per_clip()
    if sampling.max_frames_per_clip() > most:
        raise ValueError(
            f"sampling gives up to {sampling.max_frames_per_clip()} frames per clip, but the engine sizes its "
            f"encoder cache for the model's {most} (its config.json sampling); use at most {most}"
        )
    if served is None:
        local = init_ray()
    gpus = num_gpus_in_cluster()
    if served is None:
        engines = engine_count(config.engine, gpus)
        stages = {"engine actors": engines * config.engine.num_cpus}
    else:
        stages = {"the serve client": config.serve.num_cpus}
    stages["one decode task"] = config.decode.num_cpus
    check_cpu_budget(stages, strict=local, out=out)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    n_clips = stage_clips(manifest, config.manifest, out, min_files=4 * cpus)
    captions_dir = out / "captions"
    before = written_clip_ids(captions_dir)
    progress = RecaptionProgress.options(  # on the driver's node: a lost worker node must not take the counts along
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    ).remote()
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
            ds = read_staged_clips(out, config.decode.batch_size)
            ds = ds.map_batches(
                decode_for_captions,
                fn_kwargs={
                    "sampling": sampling,
                    "size": model_config.image_size,
                    "strategy": config.decode.strategy,
                    "limits": config.decode.limits,
                    "report": config.report,
                },
                batch_size=config.decode.batch_size,
                **config.decode.task_args(),
            )
            if served is None:
                ds = ds.map_batches(
                    CaptionClips,
                    fn_constructor_kwargs={
                        "model_dir": config.model if is_remote(config.model) else str(model_dir),  # fetched per node
                        "prompts": config.prompt_texts(),
                        "generation": config.generation,
                        "engine": config.engine,
                        "model_name": config.model,
                        "schema": output_schema(config),
                        "progress": progress,
                    },
                    **engine_stage_args(config.engine, gpus),
                )
            else:
                ds = ds.map_batches(
                    ServeCaptionClips,
                    fn_constructor_kwargs={
                        "served": served,
                        "prompts": config.prompt_texts(),
                        "generation": config.generation,
                        "client": config.serve,
                        "schema": output_schema(config),
                        "progress": progress,
                    },
                    **serve_stage_args(served, config.serve, len(config.prompts)),
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
    if snap["engine_start_s"] and snap["clips"]:
        summary.rates["engine start-up s"] = max(snap["engine_start_s"])
        steady = max(snap["last_done"] - snap["first_request"], 1e-6)
        summary.rates["steady clips/s"] = snap["clips"] / steady
        summary.rates["steady output tokens/s"] = snap["output_tokens"] / steady
        if served is None:
            # Little's law: engines holding their full in-flight clips each return them at in-flight / latency
            in_flight = min(config.engine.batch_size * config.engine.max_concurrent_batches, snap["clips"] / engines)
            summary.rates["paced clips/s"] = engines * in_flight / max(_median_latency(snap["latencies"]), 1e-6)
    write_report(out, captions_dir, config)
    record = {"manifest_clips": n_clips, "model": config.model, **summary.to_dict()}
    if served is not None:
        record["serve"] = {
            "app": served.app,
            "model_id": served.model_id,
            "most_replicas": snap["most_replicas"],
            "most_in_flight": snap["most_in_flight"],
            "resent_requests": snap["resent"],
            "first_request": snap["first_request"],  # time.time() seconds: the window the batch used the app
            "last_done": snap["last_done"],
        }
    write_atomic(out / "summary.json", json.dumps(record, indent=2))
    return summary


def recaption_job(manifest: Path, out: Path, config: RecaptionConfig, serve: str | None = None) -> Report:
    """``vidlm recaption``: :func:`run_recaption` with its progress bar, then the summary and where the results are.

    ``serve`` (``--serve APP``) sets ``serve.app``.
    """
    if serve:
        config = config.model_copy(update={"serve": config.serve.model_copy(update={"app": serve})})
    summary = run_recaption(manifest, out, config, show_progress=True)
    report = json.loads((summary.out.parent / "report.json").read_text())
    lines = [
        f"captions: [bold]{summary.out}[/] (parquet)",
        f"browser:  [bold]{report['browser']}[/]",
        f"lengths:  [bold]{report['histogram']}[/]",
    ]
    return summary.report("vidlm recaption", lines=lines)
