"""``vidlm synth-captions``: LLaVA-Video's recurrent detailed captioning of long videos, on a vidlm video LLM.

``vidlm synth-captions MANIFEST --out DIR [--model PRESET|PATH] [k=v ...]``

LLaVA-Video §2.1 (and §3.2 of the full paper) annotates a video at three levels: a level-1 description of
every short window (10 s), written with the level-1 descriptions before it as history (so the story stays
consistent and nothing is repeated); a level-2 description of every longer window (30 s) from its level-1
descriptions and the previous level-2 description; a level-3 description of the whole video from the level-2
descriptions. Here, per video (a manifest row)::

    windows of ``window_s`` s   ->  level 1, window k  = LLM(frames of window k, the last ``history`` level-1 captions)
    windows of ``level2_window_s`` s -> level 2, window j = LLM(its level-1 captions, level-2 caption j-1; text only)
    the video                   ->  level 3 (``caption``) = LLM(every level-2 caption; text only)

Ray Data plan::

    read_parquet(OUT/clips)                  videos staged from the manifest (vidlm.clips)
      -> map_batches(decode_windows)         CPU tasks: the model's frame sampling in every window
      -> map_batches(RecurrentCaptioner)     actor pool, one vLLM engine per actor; videos run concurrently,
                                             each one's windows in order
      -> write_parquet(OUT/captions)         one row per video; checkpointed on clip_id (exactly once)

Output columns: ``clip_id, video_id, path, start_s, end_s``; level 1: ``window_start_s, window_end_s`` (lists,
seconds), ``window_captions``, ``window_prompt_tokens`` (lists); level 2: ``level2_start_s, level2_end_s,
level2_captions, level2_prompt_tokens`` (lists); level 3: ``caption`` (what ``vidlm synth-qa`` reads),
``caption_prompt_tokens``; ``output_tokens, model, error, error_type``.
"""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from pydantic import Field

from pipelines._common import (
    DecodeConfig,
    JobSummary,
    OutputConfig,
    arrow_table,
    clean_null,
    exactly_once,
    read_staged_clips,
    stage_clips,
    write_output,
    written_clip_ids,
)
from pipelines._output import owns_output
from pipelines.caption_clips import CaptionClips, engine_stage_args, sampling_params
from vidlm.clips import ClipError, ErrorType, ManifestConfig
from vidlm.cluster import check_cpu_budget, init_ray, num_gpus_in_cluster
from vidlm.config import JobConfig
from vidlm.engine import EngineStageConfig, GenerationConfig, engine_count
from vidlm.jobs import Report

__all__ = [
    "CAPTIONS_SCHEMA",
    "RecurrentCaptioner",
    "SynthCaptionsConfig",
    "LEVEL2_PROMPT",
    "decode_windows",
    "level2_groups",
    "run_synth_captions",
    "synth_captions_job",
]

WINDOW_PROMPT = (
    "You are describing a long video one part at a time. Here is what happened in the previous parts:\n"
    "{history}\n"
    "Now describe in detail this part of the video (from {start:.0f} s to {end:.0f} s): the scene, the people "
    "and objects, and what they do. Continue the story; do not repeat what was already described."
)
"""Level-1 prompt: ``{history}`` (earlier window captions, one per line), ``{start}`` / ``{end}`` (seconds)."""

LEVEL2_PROMPT = (
    "Here are detailed descriptions of consecutive short parts of one segment of a video (from {start:.0f} s to "
    "{end:.0f} s), in time order:\n{captions}\nThe segment before it was described as:\n{previous}\n"
    "Write one detailed description of this segment that continues the previous one: the scene, the people and "
    "objects, and what happens."
)
"""Level-2 prompt: ``{captions}`` (the segment's level-1 captions, numbered), ``{previous}`` (the previous level-2
caption), ``{start}`` / ``{end}`` (seconds)."""

VIDEO_SUMMARY_PROMPT = (
    "Here are detailed descriptions of consecutive parts of one video, in time order:\n{captions}\n"
    "Write one detailed description of the whole video: the setting, the main people and objects, and the "
    "course of events from beginning to end."
)
"""Level-3 prompt: ``{captions}`` (every level-2 caption, numbered)."""

NO_HISTORY = "(nothing yet: this is the beginning of the video)"
"""The history of the first level-1 window and the previous caption of the first level-2 window."""
MIN_WINDOW_S = 1.0
"""Seconds: a shorter remainder at the end of a video is captioned with the window before it."""

CAPTIONS_SCHEMA = pa.schema(
    [
        pa.field("clip_id", pa.string()),
        pa.field("video_id", pa.string()),
        pa.field("path", pa.string()),
        pa.field("start_s", pa.float64()),
        pa.field("end_s", pa.float64()),
        pa.field("window_start_s", pa.list_(pa.float64())),
        pa.field("window_end_s", pa.list_(pa.float64())),
        pa.field("window_captions", pa.list_(pa.string())),
        pa.field("window_prompt_tokens", pa.list_(pa.int64())),
        pa.field("level2_start_s", pa.list_(pa.float64())),
        pa.field("level2_end_s", pa.list_(pa.float64())),
        pa.field("level2_captions", pa.list_(pa.string())),
        pa.field("level2_prompt_tokens", pa.list_(pa.int64())),
        pa.field("caption", pa.string()),
        pa.field("caption_prompt_tokens", pa.int64()),
        pa.field("output_tokens", pa.int64()),
        pa.field("model", pa.string()),
        pa.field("error", pa.string()),
        pa.field("error_type", pa.string()),
    ]
)
"""The columns of ``OUT/captions``."""


LIST_COLUMNS = (
    "window_captions",
    "window_prompt_tokens",
    "level2_start_s",
    "level2_end_s",
    "level2_captions",
    "level2_prompt_tokens",
)


def _numbered(captions) -> str:
    return "\n".join(f"{k + 1}. {c}" for k, c in enumerate(captions))


class SynthCaptionsConfig(JobConfig):
    """``vidlm synth-captions``: one YAML of this shape, plus ``key=value`` overrides."""

    model: str = "smol"
    """A preset (``smol``, ``tiny``) or a vidlm model directory."""
    manifest: ManifestConfig = ManifestConfig()
    window_s: float = Field(10.0, gt=0)
    """Seconds per level-1 description (LLaVA-Video describes every 10 s)."""
    level2_window_s: float = Field(30.0, gt=0)
    """Seconds per level-2 description (LLaVA-Video: 30 s); each holds the level-1 windows that start in it."""
    max_windows: int = Field(64, gt=0)
    """Windows captioned per video at most (the first ``max_windows``)."""
    history: int = Field(3, ge=0)
    """Earlier window captions in each window's prompt."""
    window_prompt: str = WINDOW_PROMPT
    level2_prompt: str = LEVEL2_PROMPT
    summary_prompt: str = VIDEO_SUMMARY_PROMPT
    generation: GenerationConfig = GenerationConfig()
    engine: EngineStageConfig = EngineStageConfig(batch_size=4)
    """``batch_size`` counts videos here."""
    decode: DecodeConfig = DecodeConfig(batch_size=1)
    output: OutputConfig = OutputConfig()


def level2_groups(starts: list[float], start_s: float, level2_window_s: float) -> list[list[int]]:
    """Level-1 window indices per level-2 window: window ``k`` belongs to level-2 window
    ``floor((starts[k] - start_s) / level2_window_s)``; empty level-2 windows are skipped.

    Args:
        starts: level-1 window starts (seconds), ascending.
        start_s: the video's (clip's) start in seconds.
        level2_window_s: seconds per level-2 window.
    """
    groups: dict[int, list[int]] = {}
    for k, start in enumerate(starts):
        groups.setdefault(int((start - start_s + 1e-9) // level2_window_s), []).append(k)
    return [groups[j] for j in sorted(groups)]


def windows_of(start_s: float, end_s: float, window_s: float, max_windows: int) -> list[tuple[float, float]]:
    """``[start_s, end_s)`` cut into windows of ``window_s`` seconds, at most ``max_windows``.

    A remainder shorter than :data:`MIN_WINDOW_S` joins the window before it (a 4.004 s video in 4 s windows is
    one window, not a 4 ms second one that holds no frame).
    """
    count = max(1, math.floor((end_s - start_s) / window_s))
    if end_s - (start_s + count * window_s) >= MIN_WINDOW_S:
        count += 1
    windows = [(start_s + k * window_s, min(end_s, start_s + (k + 1) * window_s)) for k in range(count)]
    windows[-1] = (windows[-1][0], end_s)
    return windows[:max_windows]


def decode_windows(batch: dict[str, np.ndarray], *, config: SynthCaptionsConfig, sampling, size: int) -> dict:
    """Ray Data stage (CPU task): the sampled frames of every window of each video.

    Adds ``frames`` (all windows' frames, ``(sum T_k, size, size, 3) uint8``), ``window_num_frames (W,)``,
    ``window_start_s`` / ``window_end_s (W,)`` seconds. A video that fails gets ``error`` / ``error_type``.
    """
    from vidlm.decode import decode_clip, probe

    n = len(batch["clip_id"])
    frames, counts, starts, ends = [], [], [], []
    error, error_type = [clean_null(e) for e in batch["error"]], [clean_null(e) for e in batch["error_type"]]
    for i in range(n):
        parts: list[np.ndarray] = []
        windows: list[tuple[float, float]] = []
        if error_type[i] is None:
            try:
                start = clean_null(batch["start_s"][i]) or 0.0
                end = clean_null(batch["end_s"][i]) or probe(batch["path"][i]).duration_s
                windows = windows_of(start, end, config.window_s, config.max_windows)
                for k, (a, b) in enumerate(windows):
                    clip = decode_clip(
                        batch["path"][i],
                        sampling,
                        size,
                        a,
                        b,
                        clip_key=f"{batch['clip_id'][i]}/{k}",
                        limits=config.decode.limits,
                    )
                    parts.append(clip.frames)
            except ClipError as err:
                error[i], error_type[i] = str(err), err.error_type.value
                parts, windows = [], []
        frames.append(np.concatenate(parts) if parts else np.zeros((0, size, size, 3), np.uint8))
        counts.append(np.array([len(p) for p in parts], np.int64))
        starts.append(np.array([a for a, _ in windows], np.float64))
        ends.append(np.array([b for _, b in windows], np.float64))
    return {
        **batch,
        "frames": frames,
        "window_num_frames": counts,
        "window_start_s": starts,
        "window_end_s": ends,
        "error": np.array(error, dtype=object),
        "error_type": np.array(error_type, dtype=object),
    }


class RecurrentCaptioner(CaptionClips):
    """Ray Data stage (actor): level-1 captions window by window with history, level-2 captions of the longer
    windows from them, then the level-3 description of the video.

    The engine is the recaption job's (:class:`pipelines.caption_clips.CaptionClips`: one ``AsyncLLMEngine``, the
    model's prompt format, warm-up, shutdown). The videos of every batch in flight run concurrently, so the
    engine batches window ``k`` of one video with window ``j`` of another; within a video the windows wait
    for each other (window ``k`` needs the captions before it). A failed request fails its video
    (``generation_failed``); the others go on.
    """

    def __init__(self, model_dir: str, config: SynthCaptionsConfig):
        from transformers import AutoTokenizer

        first = config.window_prompt.format(history=NO_HISTORY, start=0.0, end=config.window_s)
        super().__init__(model_dir, {"window": first}, config.generation, config.engine, config.model, CAPTIONS_SCHEMA)
        self.synth = config
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)

    async def _request(self, ids: list[int], frames: np.ndarray | None, key: str, template: str):
        prompt = {"prompt_token_ids": ids}
        if frames is not None:
            prompt["multi_modal_data"] = {"video": frames}
        params = sampling_params(self.generation, key, template)
        final = None
        async for output in self.engine.generate(prompt, params, f"{key}/{template}/{time.monotonic_ns()}"):
            final = output
        return final

    async def _video(self, clip_id: str, frames: np.ndarray, counts: np.ndarray, starts, ends) -> dict:
        from vidlm.models.processing import video_prompt_ids

        mc = self.model_config
        captions, prompt_tokens, output_tokens = [], [], 0
        offsets = np.concatenate([[0], np.cumsum(counts)])
        for k in range(len(counts)):
            history = "\n".join(captions[-self.synth.history :]) if self.synth.history and captions else NO_HISTORY
            text = self.synth.window_prompt.format(history=history, start=starts[k], end=ends[k])
            ids = video_prompt_ids(self.tokenizer, text, mc.video_token, mc.video_token_index, mc.system_prompt)
            out = await self._request(ids, frames[offsets[k] : offsets[k + 1]], clip_id, f"w{k}")
            captions.append(out.outputs[0].text.strip())
            prompt_tokens.append(len(ids) - 1)
            output_tokens += len(out.outputs[0].token_ids)
        level2, level2_tokens, level2_starts, level2_ends = [], [], [], []
        for group in level2_groups(list(starts), float(starts[0]), self.synth.level2_window_s):
            a, b = float(starts[group[0]]), float(ends[group[-1]])
            text = self.synth.level2_prompt.format(
                captions=_numbered(captions[k] for k in group),
                previous=level2[-1] if level2 else NO_HISTORY,
                start=a,
                end=b,
            )
            out, n = await self._text_request(text, clip_id, f"l2-{len(level2)}")
            level2.append(out.outputs[0].text.strip())
            level2_tokens.append(n)
            level2_starts.append(a)
            level2_ends.append(b)
            output_tokens += len(out.outputs[0].token_ids)
        text = self.synth.summary_prompt.format(captions=_numbered(level2))
        out, summary_tokens = await self._text_request(text, clip_id, "summary")
        output_tokens += len(out.outputs[0].token_ids)
        return {
            "window_captions": captions,
            "window_prompt_tokens": prompt_tokens,
            "level2_start_s": level2_starts,
            "level2_end_s": level2_ends,
            "level2_captions": level2,
            "level2_prompt_tokens": level2_tokens,
            "caption": out.outputs[0].text.strip(),
            "caption_prompt_tokens": summary_tokens,
            "output_tokens": output_tokens,
        }

    async def _text_request(self, text: str, clip_id: str, template: str):
        """A text-only request in the model's chat format; ``(output, prompt tokens)``."""
        mc = self.model_config
        messages = [{"role": "user", "content": text}]
        if mc.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": mc.system_prompt})
        rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        return await self._request(ids, None, clip_id, template), len(ids)

    async def __call__(self, batch: dict):
        from vllm.v1.engine.exceptions import EngineDeadError

        await self._warm_up()
        n = len(batch["clip_id"])
        error = [clean_null(e) for e in batch["error"]]
        error_type = [clean_null(e) for e in batch["error_type"]]
        jobs = {
            i: asyncio.ensure_future(
                self._video(
                    batch["clip_id"][i],
                    batch["frames"][i],
                    batch["window_num_frames"][i],
                    batch["window_start_s"][i],
                    batch["window_end_s"][i],
                )
            )
            for i in range(n)
            if error_type[i] is None
        }
        results = dict(zip(jobs, await asyncio.gather(*jobs.values(), return_exceptions=True), strict=True))
        names = (*LIST_COLUMNS, "caption", "caption_prompt_tokens", "output_tokens")
        columns = {k: [None] * n for k in names}
        for i, result in results.items():
            if isinstance(result, EngineDeadError):
                raise result
            if isinstance(result, BaseException):
                error[i], error_type[i] = f"{type(result).__name__}: {result}", ErrorType.GENERATION_FAILED.value
                continue
            for key, value in result.items():
                columns[key][i] = value
        for key in LIST_COLUMNS:
            columns[key] = [v if v is not None else [] for v in columns[key]]
        failed = [i for i in range(n) if error_type[i] is not None]
        starts = [[] if i in failed else list(batch["window_start_s"][i]) for i in range(n)]
        ends = [[] if i in failed else list(batch["window_end_s"][i]) for i in range(n)]
        table = {
            **{k: batch[k] for k in ("clip_id", "video_id", "path", "start_s", "end_s")},
            **columns,
            "window_start_s": starts,
            "window_end_s": ends,
            "model": [self.model_name] * n,
            "error": error,
            "error_type": error_type,
        }
        yield arrow_table(table, CAPTIONS_SCHEMA)


@owns_output("synth-captions", "captions")
def run_synth_captions(manifest: str | Path, out: str | Path, config: SynthCaptionsConfig) -> JobSummary:
    """Recurrent detailed captions of every video of a manifest (LLaVA-Video §2.1), as parquet in ``OUT/captions``.

    Rerunning with the same ``out`` finishes a killed run; every video ends up in the output once.

    Raises:
        FileNotFoundError: the manifest or the model does not exist.
        ValueError: an unknown preset, or more CPUs asked for than the local cluster has.
    """
    from vidlm.models.presets import resolve_model
    from vidlm.models.video_llm import VidlmConfig

    out = Path(out).resolve()
    if not Path(manifest).exists():
        raise FileNotFoundError(f"manifest not found: {manifest}")
    model_dir = resolve_model(config.model)
    model_config = VidlmConfig.from_pretrained(model_dir)
    local = init_ray()
    gpus = num_gpus_in_cluster()
    engines = {"engine actors": engine_count(config.engine, gpus) * config.engine.num_cpus}
    check_cpu_budget({**engines, "one decode task": config.decode.num_cpus}, strict=local, out=out)
    stage_clips(manifest, config.manifest, out, min_files=4)
    captions = out / "captions"
    before = written_clip_ids(captions)
    started = time.perf_counter()
    with exactly_once(out):
        ds = read_staged_clips(out, config.decode.batch_size)
        ds = ds.map_batches(
            decode_windows,
            fn_kwargs={"config": config, "sampling": model_config.sampling_config, "size": model_config.image_size},
            batch_size=config.decode.batch_size,
            **config.decode.task_args(),
        )
        ds = ds.map_batches(
            RecurrentCaptioner,
            fn_constructor_kwargs={"model_dir": str(model_dir), "config": config},
            **engine_stage_args(config.engine, gpus),
        )
        write_output(ds, captions, config.output)
    return JobSummary.collect(captions, before, started, {"output tokens/s": "output_tokens"})


def synth_captions_job(manifest: Path, out: Path, config: SynthCaptionsConfig) -> Report:
    """``vidlm synth-captions``: :func:`run_synth_captions`, then its summary."""
    summary = run_synth_captions(manifest, out, config)
    lines = [f"captions: [bold]{summary.out}[/] (parquet; caption = the whole-video summary)"]
    return summary.report("vidlm synth-captions", unit="videos", lines=lines)
