"""``vidlm plan recaption`` and ``vidlm plan features``: how many GPUs for how long, and the CPUs to feed them.

``vidlm plan recaption MANIFEST [--clips N] [--gpu-type h100] [--deadline-h 72] [--calibrate] [--json]``

The corpus is a manifest (its clips and their windows are read; whole-video rows have their headers read) or
statistics alone (``--clips N --mean-clip-s S``); with both, the manifest gives the clip lengths and ``--clips`` the
corpus size. The first-principles plan (:mod:`vidlm.plan`) needs no cluster. ``--calibrate`` runs on the connected
Ray cluster instead:

1. a decode probe: one decode task (``decode.num_cpus`` CPUs) decodes ``--sample`` clips of the manifest as the job
   does, after one clip of warm-up -> clips per CPU-second;
2. the real job on the same sample (``manifest.sample``, an output of its own under ``--probe-out``) -> the pace of
   its engines (``paced clips/s``: each engine's in-flight clips over their median latency, Little's law, which is
   what a long run keeps), its start-up (the probe's wall time less its clips at that pace), the prompt and output
   tokens per request, and prompt and output tokens/s at that pace;

and predicts the full job's wall time on this cluster: start-up + clips / pace. The default sample is two waves of
what one engine keeps in flight (``2 x engine.batch_size x max_concurrent_batches`` clips, at most
:data:`MAX_SAMPLE`), so the probe's clips wait as long as the full job's.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from vidlm.clips import ManifestConfig, clips_table
from vidlm.jobs import Report
from vidlm.plan import (
    BANDWIDTH_UTILISATION,
    DECODE_FRAMES_PER_CPU_S,
    DEFAULT_GPU_TYPE,
    PREFILL_MFU,
    TOWER_START_S,
    EngineModel,
    Plan,
    cluster_hardware,
    cluster_plan,
    dtype_bytes,
    finish,
    frames_per_clip,
    hardware,
    model_costs,
    planned_dtype,
    quiet_stdout,
    require_positive,
    smallest_tensor_parallel,
)

__all__ = [
    "Corpus",
    "calibrate_features",
    "calibrate_recaption",
    "corpus",
    "plan_features",
    "plan_features_job",
    "plan_recaption",
    "plan_recaption_job",
]

PROBED_VIDEOS = 16
"""Whole-video rows whose headers are read for their length (evenly spaced through the manifest)."""
TEXT_CHARS_PER_TOKEN = 4
"""Characters per token of an English prompt (BPE tokenizers of Llama, Qwen2); the chat template adds
:data:`CHAT_TEMPLATE_TOKENS`."""
CHAT_TEMPLATE_TOKENS = 16
MAX_SAMPLE = 128
"""The most clips ``--calibrate`` samples by default."""


@dataclass(frozen=True)
class Corpus:
    """Clips to plan for: how many, how long, and where a calibration samples them.

    Args:
        clips: clips of the corpus.
        mean_clip_s: mean clip window (seconds).
        source: where the numbers come from (printed).
        manifest: the manifest, if one was read (``--calibrate`` samples it).
        manifest_clips: clips of that manifest.
    """

    clips: int
    mean_clip_s: float
    source: str
    manifest: str | None = None
    manifest_clips: int = 0

    def sample(self, cfg: ManifestConfig, clips: int) -> pa.Table:
        """``clips`` clip rows evenly spaced through the manifest (``manifest.sample``), error rows left out.

        Raises:
            ValueError: fewer than 2 rows without an error.
        """
        table = clips_table(self.manifest, cfg.model_copy(update={"sample": clips}))
        table = table.filter(pc.is_null(table["error_type"]))
        if table.num_rows < 2:
            raise ValueError(f"--calibrate: the sample of {clips} clips has fewer than 2 clips without an error row")
        return table


def corpus(manifest: str | None, cfg: ManifestConfig, clips: int | None, mean_clip_s: float | None) -> Corpus:
    """The corpus of a plan (see the module).

    Raises:
        ValueError: neither a manifest nor both ``clips`` and ``mean_clip_s``; a manifest without one decodable clip
            length; a count or length that is not positive.
    """
    from vidlm.clips import ClipError
    from vidlm.decode import probe

    require_positive(clips=clips, mean_clip_s=mean_clip_s)
    if manifest is None:
        if clips is None or mean_clip_s is None:
            raise ValueError("give a MANIFEST, or the corpus as --clips N --mean-clip-s SECONDS")
        return Corpus(clips, mean_clip_s, f"{clips:,} clips of {mean_clip_s:g} s (given)")
    table = clips_table(manifest, cfg.model_copy(update={"sample": None})).to_pylist()
    rows = [r for r in table if not r["error_type"]]
    if not rows:
        raise ValueError(f"{manifest}: no clip without an error row to plan for")
    lengths = [r["end_s"] - (r["start_s"] or 0.0) for r in rows if r["end_s"] is not None]
    whole = [r for r in rows if r["end_s"] is None]
    if whole and mean_clip_s is None:
        picks = [whole[round(i * (len(whole) - 1) / max(PROBED_VIDEOS - 1, 1))] for i in range(PROBED_VIDEOS)]
        for row in {r["path"]: r for r in picks}.values():
            try:
                info = probe(row["path"])
            except ClipError:
                continue
            lengths.append(max(info.num_frames / info.fps - (row["start_s"] or 0.0), 0.0))
    if mean_clip_s is None:
        if not lengths:
            raise ValueError(f"{manifest}: no clip length could be read; give --mean-clip-s")
        mean_clip_s = sum(lengths) / len(lengths)
    n = clips or len(rows)
    source = f"{n:,} clips" + (" (given)" if clips else "") + f" of {mean_clip_s:.3g} s mean, from {manifest}"
    return Corpus(n, mean_clip_s, source, manifest, len(table))


def _text_tokens(prompt: str) -> int:
    return math.ceil(len(prompt) / TEXT_CHARS_PER_TOKEN) + CHAT_TEMPLATE_TOKENS


def _sample_size(in_flight: int, manifest_clips: int, sample: int | None) -> int:
    """``--sample``, or two waves of ``in_flight`` clips (at most :data:`MAX_SAMPLE`), within the manifest."""
    if sample is not None:
        if sample < 2:
            raise ValueError(f"--sample must be at least 2 clips, got {sample}")
        return min(sample, manifest_clips)
    return max(2, min(manifest_clips, 2 * in_flight, MAX_SAMPLE))


def _decode_probe(rows: pa.Table, config, sampling, size: int) -> float:
    """Clips one decode task decodes per second per CPU, on the cluster, after one clip of warm-up (see the module).

    Args:
        rows: clip rows (:meth:`Corpus.sample`).
    """
    import ray

    from pipelines._common import decode_frames

    kwargs = {"sampling": sampling, "size": size, "strategy": config.decode.strategy, "limits": config.decode.limits}

    def run(rows: pa.Table) -> float:
        decode_frames(rows.slice(0, 1).to_pydict(), **kwargs)  # imports, codec set-up
        started = time.perf_counter()
        for i in range(1, rows.num_rows):
            decode_frames(rows.slice(i, 1).to_pydict(), **kwargs)
        return (rows.num_rows - 1) / max(time.perf_counter() - started, 1e-9)

    args = config.decode.task_args()
    args.pop("memory", None)
    return ray.get(ray.remote(run).options(**args).remote(rows)) / config.decode.num_cpus


@contextlib.contextmanager
def _probe(run, corpus: Corpus, config, sample: int, probe_out: str | None):
    """Run the job ``run(manifest, out, config)`` on ``sample`` clips of the manifest; yields ``(summary, wall_s)``.

    The output goes to ``probe_out``, or to a temporary folder removed when the block ends.
    """
    out = probe_out or tempfile.mkdtemp(prefix="vidlm-plan-probe-")
    probe = config.model_copy(update={"manifest": config.manifest.model_copy(update={"sample": sample})})
    try:
        started = time.perf_counter()
        summary = run(corpus.manifest, out, probe)
        yield summary, time.perf_counter() - started
    finally:
        if not probe_out:
            shutil.rmtree(out, ignore_errors=True)


def plan_recaption(
    config,
    corpus: Corpus,
    gpu_type: str = DEFAULT_GPU_TYPE,
    gpus: int | None = None,
    deadline_h: float | None = None,
    output_tokens: int | None = None,
    calibration: dict[str, float] | None = None,
) -> Plan:
    """The plan of ``vidlm recaption`` on ``corpus`` (see the module and :mod:`vidlm.plan`).

    Args:
        config: a :class:`~pipelines.recaption.RecaptionConfig`.
        gpu_type: a key of :data:`vidlm.plan.GPU_TYPES`, or ``cpu``.
        gpus: GPUs to plan on (without a deadline); ``None``: one node's worth.
        deadline_h: hours the job must end within: the plan gives the GPUs.
        output_tokens: mean output tokens per caption; ``None``: ``generation.max_tokens`` (an upper bound).
        calibration: rates measured on the cluster (:func:`calibrate_recaption`); they replace the first
            principles.

    Raises:
        ValueError: an unknown GPU type or model; a model that does not fit one node; a deadline shorter than the
            start-up; fewer GPUs than one engine's tensor parallel size.
    """
    from vidlm.models.presets import locate_model

    hw = hardware(gpu_type)
    model_config = locate_model(config.model)[1]
    sampling = config.sampling or model_config.sampling_config
    frames = frames_per_clip(sampling, corpus.mean_clip_s)
    visual = model_config.num_visual_tokens(frames)
    prompts = config.prompt_texts()
    text = sum(_text_tokens(p) for p in prompts.values()) / len(prompts)
    prompt_tokens = visual + round(text)
    out_tokens = output_tokens or config.generation.max_tokens
    if calibration:
        prompt_tokens = round(calibration["prompt_tokens"])
        out_tokens = max(1, round(calibration["output_tokens"]))
    dtype, why = planned_dtype(config.engine, hw)
    costs = model_costs(model_config)
    in_flight = config.engine.batch_size * config.engine.max_concurrent_batches * len(prompts)

    def build(tp: int) -> EngineModel:
        return EngineModel(
            costs, hw, dtype_bytes(dtype), tp, frames, prompt_tokens, out_tokens, len(prompts), in_flight
        )

    needed = min(in_flight, config.engine.batch_size * len(prompts))
    engine = smallest_tensor_parallel(build, config.engine.tensor_parallel_size, hw.per_node, needed)
    if engine.batch < 1:
        raise ValueError(
            f"{config.model} does not fit one node of {hw.per_node} {hw.name}: {engine.weight_bytes / 2**30:,.0f} GiB "
            f"of weights and one {engine.sequence_bytes / 2**30:,.1f} GiB sequence of KV cache"
        )
    phases = engine.seconds_per_clip()
    plan = Plan(f"vidlm plan recaption: {config.model} on {'this cluster (calibrated)' if calibration else hw.name}")
    plan.add("model", config.model)
    plan.add("hardware", hw.name)
    plan.add("dtype", dtype)
    plan.add("clips", corpus.clips)
    plan.add("mean_clip_s", corpus.mean_clip_s, "s")
    plan.add("frames_per_clip", frames)
    plan.add("visual_tokens_per_clip", visual)
    plan.add("prompt_tokens", prompt_tokens, "per request")
    plan.add("output_tokens", out_tokens, "per request")
    plan.add("requests_per_clip", len(prompts))
    plan.add("tensor_parallel", engine.tensor_parallel)
    plan.add("engine_weights_gib", engine.weight_bytes / 2**30, "GiB")
    plan.add("engine_kv_cache_gib", engine.batch * engine.sequence_bytes / 2**30, "GiB")
    plan.add("engine_memory_gib", engine.memory_bytes / 2**30, f"GiB of {engine.usable_bytes / 2**30:,.0f} usable")
    plan.add("engine_batch", engine.batch, "sequences at once")
    for phase, seconds in phases.items():
        plan.add(f"{phase.replace('-', '_')}_s_per_clip", seconds, "engine s")
    first_principles = max(phases, key=phases.get)
    clip_s = sum(phases.values())
    startup = engine.startup_seconds()
    decode_per_cpu = DECODE_FRAMES_PER_CPU_S / frames
    if calibration:
        clip_s = calibration["engines"] / calibration["clips_per_s"]
        startup = calibration["startup_s"]
        decode_per_cpu = calibration["decode_clips_per_cpu_s"]
        for kind in ("prompt", "output"):
            per_engine = calibration[f"{kind}_tokens_per_s"] / calibration["engines"]
            plan.add(f"engine_{kind}_tokens_per_s", per_engine, "tokens/s, measured")
    plan.add("engine_clips_per_s", 1 / clip_s, "clips/s, measured" if calibration else "clips/s")
    if calibration and gpus is None and deadline_h is None:
        engines = int(calibration["engines"])
    elif gpus is not None:
        if gpus < engine.tensor_parallel:
            raise ValueError(f"--gpus {gpus}: one engine needs {engine.tensor_parallel} ({config.model} on {hw.name})")
        engines = gpus // engine.tensor_parallel
    else:
        engines = config.engine.num_engines or max(1, hw.per_node // engine.tensor_parallel)
    starved = cluster_plan(
        plan,
        corpus,
        hw,
        engine.tensor_parallel,
        clip_s,
        startup,
        decode_per_cpu,
        config.engine.num_cpus,
        engines,
        deadline_h,
    )
    plan.add("bottleneck", "decode" if starved else first_principles)
    plan.add("calibrated", bool(calibration))
    plan.assumptions += [
        f"corpus: {corpus.source}",
        f"dtype {dtype}: {why}",
        f"hardware: {hw.source}",
    ]
    if calibration:
        plan.assumptions += [
            f"calibrated on this cluster: {calibration['sample']} clips through the real job "
            f"({calibration['engines']:.0f} engine(s)): start-up, clips/s and tokens per clip measured; "
            f"decode measured by one task; the bottleneck among the engine's phases from first principles",
        ]
    else:
        plan.assumptions += [
            f"prefill and vision at {PREFILL_MFU:.0%} of the dense peak; generation at "
            f"{BANDWIDTH_UTILISATION:.0%} of the memory bandwidth",
            f"text prompt: {TEXT_CHARS_PER_TOKEN} characters per token + {CHAT_TEMPLATE_TOKENS} template tokens; "
            f"output: {out_tokens} tokens per caption"
            + ("" if output_tokens else " (generation.max_tokens, an upper bound: --output-tokens for the mean)"),
            f"decode: {DECODE_FRAMES_PER_CPU_S:g} sampled frames per CPU-second (PyAV, 720p H.264); "
            f"start-up: {startup:.0f} s (engine start + weights at the load rate)",
        ]
    return plan


def calibrate_recaption(config, corpus: Corpus, sample: int | None, probe_out: str | None) -> dict[str, float]:
    """Rates of the recaption job measured on the connected Ray cluster (see the module).

    Returns:
        ``sample, engines, startup_s, clips_per_s`` (steady, all engines), ``prompt_tokens, output_tokens`` (mean per
        request), ``prompt_tokens_per_s, output_tokens_per_s`` (steady), ``decode_clips_per_cpu_s``,
        ``probe_wall_s``.

    Raises:
        ValueError: no manifest to sample, or a sample without two good clips.
    """
    from pipelines._common import read_output_columns
    from pipelines.caption_clips import stat_column
    from pipelines.recaption import run_recaption
    from vidlm.cluster import init_ray, num_gpus_in_cluster
    from vidlm.engine import engine_count
    from vidlm.models.presets import locate_model

    if corpus.manifest is None:
        raise ValueError("--calibrate samples the manifest: give MANIFEST (--clips may still set the corpus size)")
    engine = config.engine
    n = _sample_size(engine.batch_size * engine.max_concurrent_batches, corpus.manifest_clips, sample)
    model_config = locate_model(config.model)[1]
    init_ray()
    sampling = config.sampling or model_config.sampling_config
    decode = _decode_probe(corpus.sample(config.manifest, n), config, sampling, model_config.image_size)
    with _probe(run_recaption, corpus, config, n, probe_out) as (summary, wall):
        if not summary.new_clips or "steady clips/s" not in summary.rates:
            raise ValueError("--calibrate: the probe's engines captioned no clip (see the probe's output)")
        columns = [stat_column(name, s) for name in config.prompts for s in ("prompt_tokens", "output_tokens")]
        table = read_output_columns(summary.out, ["error_type", *columns])
        table = table.filter(pc.is_null(table["error_type"]))
        requests = max(table.num_rows * len(config.prompts), 1)
        prompt = sum(pc.sum(table[stat_column(n_, "prompt_tokens")]).as_py() or 0 for n_ in config.prompts)
        output = sum(pc.sum(table[stat_column(n_, "output_tokens")]).as_py() or 0 for n_ in config.prompts)
    clips_per_s = summary.rates.get("paced clips/s", summary.rates["steady clips/s"])
    templates = len(config.prompts)
    return {
        "sample": n,
        "engines": engine_count(config.engine, num_gpus_in_cluster()),
        "startup_s": max(wall - summary.new_clips / clips_per_s, 0.0),
        "clips_per_s": clips_per_s,
        "prompt_tokens": prompt / requests,
        "output_tokens": output / requests,
        "prompt_tokens_per_s": clips_per_s * templates * prompt / requests,
        "output_tokens_per_s": clips_per_s * templates * output / requests,
        "decode_clips_per_cpu_s": decode,
        "probe_wall_s": wall,
    }


def plan_recaption_job(
    config,
    manifest: str | None = None,
    clips: int | None = None,
    mean_clip_s: float | None = None,
    gpu_type: str | None = None,
    gpus: int | None = None,
    deadline_h: float | None = None,
    output_tokens: int | None = None,
    calibrate: bool = False,
    sample: int | None = None,
    probe_out: str | None = None,
    as_json: bool = False,
) -> Report | None:
    """``vidlm plan recaption``: :func:`plan_recaption` (after :func:`calibrate_recaption` with ``--calibrate``)."""
    return _plan_job(
        calibrate_recaption if calibrate else None,
        plan_recaption,
        config,
        corpus(manifest, config.manifest, clips, mean_clip_s),
        sample,
        probe_out,
        as_json,
        gpu_type=gpu_type,
        gpus=gpus,
        deadline_h=deadline_h,
        output_tokens=output_tokens,
    )


def _plan_job(
    calibrate_with, plan_with, config, data: Corpus, sample, probe_out, as_json: bool, gpu_type: str | None, **kwargs
) -> Report | None:
    """The body of the plan jobs: the calibration (``calibrate_with``, or ``None``), the plan, printed (``--json``)
    or returned as a table."""
    require_positive(**kwargs)
    with quiet_stdout(as_json):
        calibration = calibrate_with(config, data, sample, probe_out) if calibrate_with else None
        gpu_type = gpu_type or (cluster_hardware() if calibration else DEFAULT_GPU_TYPE)
        plan = plan_with(config, data, gpu_type, calibration=calibration, **kwargs)
    return finish(plan, as_json)


def plan_features(
    config,
    corpus: Corpus,
    gpu_type: str = DEFAULT_GPU_TYPE,
    gpus: int | None = None,
    deadline_h: float | None = None,
    calibration: dict[str, float] | None = None,
) -> Plan:
    """The plan of ``vidlm features`` on ``corpus``: encode actors (one per GPU), decode CPUs, output bytes.

    Args:
        config: a :class:`~pipelines.features.FeaturesConfig`.
        calibration: rates measured on the cluster (:func:`calibrate_features`).

    Raises:
        ValueError: an unknown GPU type or tower model; a deadline shorter than the start-up.
    """
    from vidlm.models.vision_tower import tower_model_config

    hw = hardware(gpu_type)
    model_config = tower_model_config(config.encode.tower)
    costs = model_costs(model_config)
    frames = frames_per_clip(config.sampling, corpus.mean_clip_s)
    encode_s = costs.encode_flops(frames) / (hw.peak_tflops * 1e12 * PREFILL_MFU)
    value = 2 if config.encode.dtype == "float16" else 4
    embed_dim = model_config.projection_dim or model_config.vision_config.hidden_size
    clip_bytes = frames * embed_dim * value
    if config.encode.patch_features:
        vision = model_config.vision_config
        clip_bytes += frames * (vision.image_size // vision.patch_size) ** 2 * vision.hidden_size * value
    plan = Plan(
        f"vidlm plan features: {config.encode.tower.model} on {'this cluster (calibrated)' if calibration else hw.name}"
    )
    plan.add("tower", config.encode.tower.model)
    plan.add("hardware", hw.name)
    plan.add("clips", corpus.clips)
    plan.add("mean_clip_s", corpus.mean_clip_s, "s")
    plan.add("frames_per_clip", frames)
    plan.add("patch_tokens_per_frame", costs.patches_per_frame)
    plan.add("output_bytes_per_clip", int(clip_bytes), "bytes")
    plan.add("output_tib", corpus.clips * clip_bytes / 2**40, "TiB")
    startup = TOWER_START_S
    decode_per_cpu = DECODE_FRAMES_PER_CPU_S / frames
    if calibration:
        encode_s = 1 / calibration["encode_clips_per_s"]
        startup, decode_per_cpu = calibration["startup_s"], calibration["decode_clips_per_cpu_s"]
    plan.add("encode_s_per_clip", encode_s, "s, measured" if calibration else "GPU s")
    engines = int(calibration["engines"]) if calibration and gpus is None else (gpus or hw.per_node)
    starved = cluster_plan(
        plan, corpus, hw, 1, encode_s, startup, decode_per_cpu, config.encode.num_cpus, engines, deadline_h
    )
    plan.add("bottleneck", "decode" if starved else "encode")
    plan.add("calibrated", bool(calibration))
    plan.assumptions += [f"corpus: {corpus.source}", f"hardware: {hw.source}"]
    if calibration:
        plan.assumptions.append(f"calibrated on this cluster: {calibration['sample']} clips through the real job")
    else:
        plan.assumptions.append(
            f"encode at {PREFILL_MFU:.0%} of the dense peak; decode: {DECODE_FRAMES_PER_CPU_S:g} sampled frames "
            f"per CPU-second; start-up {startup:.0f} s"
        )
    return plan


def _encode_probe(rows: pa.Table, config, size: int, gpus: int) -> float:
    """Clips one encode actor encodes per second (after one batch of warm-up), on the cluster: the job's
    :class:`~pipelines.features.EncodeFrames` with the actor's resources, on the clips ``rows`` decoded in the same
    task beforehand (untimed)."""
    import ray

    from pipelines._common import decode_frames
    from pipelines.features import EncodeFrames

    kwargs = {"sampling": config.sampling, "size": size, "strategy": config.decode.strategy}
    batch = config.encode.batch_size

    def run(rows: pa.Table) -> float:
        decoded = decode_frames(rows.to_pydict(), **kwargs, limits=config.decode.limits)
        encoder = EncodeFrames(config.encode)
        chunks = [{k: list(v[i : i + batch]) for k, v in decoded.items()} for i in range(0, rows.num_rows, batch)]
        encoder(dict(chunks[0]))  # warm-up
        timed = chunks[1:] or chunks
        started = time.perf_counter()
        for chunk in timed:
            encoder(dict(chunk))
        return sum(len(c["clip_id"]) for c in timed) / max(time.perf_counter() - started, 1e-9)

    args = {"num_cpus": config.encode.num_cpus, "num_gpus": 1 if gpus else 0, **config.encode.placement.ray_args()}
    return ray.get(ray.remote(run).options(**args).remote(rows))


def calibrate_features(config, corpus: Corpus, sample: int | None, probe_out: str | None) -> dict[str, float]:
    """Rates of the feature job measured on the connected cluster (see the module): the decode probe, an encode probe
    (one actor's clips/s), then the job on the sample for its start-up.

    Returns:
        ``sample, engines`` (encode actors), ``startup_s, clips_per_s`` (all encode actors, fed as this cluster feeds
        them), ``encode_clips_per_s`` (one actor), ``decode_clips_per_cpu_s``, ``probe_wall_s``.

    Raises:
        ValueError: no manifest to sample, or a sample without two good clips.
    """
    import ray

    from pipelines.features import run_features
    from vidlm.cluster import init_ray, num_gpus_in_cluster
    from vidlm.models.vision_tower import tower_model_config

    if corpus.manifest is None:
        raise ValueError("--calibrate samples the manifest: give MANIFEST (--clips may still set the corpus size)")
    n = _sample_size(config.encode.batch_size, corpus.manifest_clips, sample)
    init_ray()
    gpus = num_gpus_in_cluster()
    size = tower_model_config(config.encode.tower).image_size
    rows = corpus.sample(config.manifest, n)
    decode = _decode_probe(rows, config, config.sampling, size)
    encode = _encode_probe(rows, config, size, gpus)
    actors = config.encode.num_actors or max(1, gpus)
    spare = max(ray.cluster_resources().get("CPU", 1) - actors * config.encode.num_cpus, 1)
    clips_per_s = min(actors * encode, spare * decode)
    with _probe(run_features, corpus, config, n, probe_out) as (summary, wall):
        written = summary.new_clips
    return {
        "sample": n,
        "engines": actors,
        "startup_s": max(wall - written / clips_per_s, 0.0),
        "clips_per_s": clips_per_s,
        "encode_clips_per_s": encode,
        "decode_clips_per_cpu_s": decode,
        "probe_wall_s": wall,
    }


def plan_features_job(
    config,
    manifest: str | None = None,
    clips: int | None = None,
    mean_clip_s: float | None = None,
    gpu_type: str | None = None,
    gpus: int | None = None,
    deadline_h: float | None = None,
    calibrate: bool = False,
    sample: int | None = None,
    probe_out: str | None = None,
    as_json: bool = False,
) -> Report | None:
    """``vidlm plan features``: :func:`plan_features` (after :func:`calibrate_features` with ``--calibrate``)."""
    return _plan_job(
        calibrate_features if calibrate else None,
        plan_features,
        config,
        corpus(manifest, config.manifest, clips, mean_clip_s),
        sample,
        probe_out,
        as_json,
        gpu_type=gpu_type,
        gpus=gpus,
        deadline_h=deadline_h,
    )
