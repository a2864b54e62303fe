"""The feature job: clips -> decoded frames -> the model's tower features, as sharded parquet.

``vidlm features MANIFEST --out DIR [--config pipelines/configs/features.yaml] [key=value ...]``

Ray Data plan::

    read_parquet(OUT/clips)                 clip rows staged from the manifest (vidlm.clips)
      -> map_batches(decode_frames)          CPU tasks: decode + sample + resize (vidlm.decode)
      -> map_batches(EncodeFrames)           actor pool, the model's vision tower per actor (GPU when there are GPUs)
      -> write_parquet(OUT/features)         one row per clip; checkpointed on clip_id (exactly once)

The tower is the model's own (``encode.tower.model``, a preset or a model directory:
:class:`vidlm.models.vision_tower.FrameEncoder`), with its input size, pixel statistics and feature layer, so
``vidlm train`` on these features computes the tokens the model computes from frames at inference.

Output columns: ``clip_id, video_id, path, start_s, end_s, frame_times_s (T,) float64,
embeddings (T, D)``, with ``encode.patch_features``: ``patch_features (T, N, Dv)`` (both in ``encode.dtype``,
float16 by default); ``num_frames, decoder, caption, matching_score, manifest_line, extra, error, error_type``.
A clip that fails anywhere is a row with ``error`` / ``error_type`` and no frames.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import ray
import torch
from pydantic import Field
from ray.data.extensions import ArrowVariableShapedTensorArray

from pipelines._common import DecodeConfig as CommonDecodeConfig
from pipelines._common import (
    JobSummary,
    OutputConfig,
    arrow_table,
    decode_frames,
    exactly_once,
    read_staged_clips,
    stage_clips,
    write_output,
    written_clip_ids,
)
from pipelines._output import owns_output
from vidlm import metrics
from vidlm.clips import CLIP_SCHEMA, ManifestConfig
from vidlm.cluster import (
    CHECKPOINT_FILTER_CPUS,
    READ_TASK_CPUS,
    Placement,
    check_cpu_budget,
    init_ray,
    num_gpus_in_cluster,
    resuming,
)
from vidlm.config import JobConfig, Section
from vidlm.jobs import Report
from vidlm.models.vision_tower import FrameEncoder, TowerConfig, tower_model_config
from vidlm.sampling import SamplingConfig
from vidlm.storage import location
from vidlm.writers import write_atomic

__all__ = ["EncodeFrames", "FeaturesConfig", "decode_frames", "features_job", "output_table", "run_features"]


class DecodeConfig(CommonDecodeConfig):
    """The CPU decode stage."""

    in_encode_actors: bool = False
    """Decode inside the encode actors instead (Ray Data fuses the stages; ``num_cpus`` / ``memory_gb``
    are then the actors'). For light towers on CPU, where encoding is nearly free and every core should
    decode; ``encode.num_actors`` then defaults to one actor per CPU, less one for Ray Data's own work."""


class EncodeConfig(Section):
    """The encode stage (an actor pool): the model's vision tower."""

    tower: TowerConfig = TowerConfig()
    batch_size: int = Field(8, gt=0)
    """Clips per actor call (Ray Data ``batch_size``)."""
    frames_per_forward: int = Field(64, gt=0)
    """Frames per forward pass of the tower (bounds activation memory)."""
    num_actors: int | None = Field(None, gt=0)
    """Actors in the pool; ``None``: one per GPU, or one on a CPU-only cluster."""
    num_cpus: float = Field(1.0, gt=0)
    """CPUs per actor (its torch threads)."""
    patch_features: bool = False
    """Also write the patch features of the model's ``vision_feature_layer`` (what LLaVA / PLLaVA projectors take)."""
    dtype: Literal["float16", "float32"] = "float16"
    """Stored dtype of the features (float16 halves the files; float32 keeps the tower's numbers exactly)."""
    placement: Placement = Placement()
    """Where the encode actors run (node labels, custom resources), e.g. ``label_selector: {vidlm/node-type: gpu}``.
    With ``decode.in_encode_actors`` the fused stage runs here."""


class FeaturesConfig(JobConfig):
    """``vidlm features``: one YAML of this shape, plus ``key=value`` overrides."""

    manifest: ManifestConfig = ManifestConfig()
    sampling: SamplingConfig = SamplingConfig()
    decode: DecodeConfig = DecodeConfig()
    encode: EncodeConfig = EncodeConfig()
    output: OutputConfig = OutputConfig()


class EncodeFrames:
    """Ray Data stage (actor): encode the decoded frames of a batch of clips with the model's tower.

    ``__init__`` builds the tower once per actor; ``__call__`` turns ``frames (T, S, S, 3) uint8`` into
    ``embeddings (T, D)`` (and ``patch_features (T, N, Dv)``) in ``encode.dtype``, and drops ``frames``.
    """

    def __init__(self, config: EncodeConfig):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(max(1, int(config.num_cpus)))
        self.config = config
        self.dtype = getattr(torch, config.dtype)
        self.tower = FrameEncoder(config.tower, device=device)

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        started = time.perf_counter()
        missing = {"clip_id", "frames", "num_frames"} - set(batch)
        if missing:
            raise KeyError(f"EncodeFrames needs columns {sorted(missing)}")
        frames = [f for f in batch.pop("frames") if len(f)]
        counts = [int(c) for c in batch["num_frames"]]
        embeddings, patches = [], []
        if frames:
            stacked = np.concatenate(frames)  # sum(T) x (S, S, 3)
            step = self.config.frames_per_forward
            for start in range(0, len(stacked), step):
                emb, pat = self.tower(stacked[start : start + step], with_patches=self.config.patch_features)
                embeddings.append(emb.to(self.dtype).cpu())
                if pat is not None:
                    patches.append(pat.to(self.dtype).cpu())
        splits = np.cumsum(counts)[:-1]
        empty = np.zeros((0, self.tower.embed_dim), self.config.dtype)
        emb_all = torch.cat(embeddings).numpy() if embeddings else empty
        columns = {"embeddings": np.split(emb_all, splits)}  # per clip (T, D)
        if self.config.patch_features:
            empty = np.zeros((0, self.tower.num_patches, self.tower.patch_dim), self.config.dtype)
            columns["patch_features"] = np.split(torch.cat(patches).numpy() if patches else empty, splits)
        table = output_table(batch, columns)
        metrics.stage_seconds("encode", time.perf_counter() - started)
        metrics.clips_done("features", table["error_type"].to_pylist())
        return table


OUTPUT_COLUMNS = pa.schema(
    [
        *CLIP_SCHEMA,
        pa.field("num_frames", pa.int64()),
        pa.field("decoder", pa.string()),
        pa.field("frame_times_s", pa.list_(pa.float64())),
    ]
)


def output_table(batch: dict[str, Any], tensors: dict[str, list[np.ndarray]]) -> pa.Table:
    """One block of job output with a fixed schema, whatever nulls or shapes the batch holds.

    Args:
        batch: numpy batch with the columns of :data:`OUTPUT_COLUMNS`.
        tensors: per-clip arrays (e.g. ``embeddings (T, D) float16``), stored as Ray variable-shaped
            tensor columns so clips of different ``T`` (and error rows, ``T = 0``) share one column.
    """
    table = arrow_table(batch, OUTPUT_COLUMNS)
    for name, arrays in tensors.items():
        table = table.append_column(name, ArrowVariableShapedTensorArray.from_numpy(list(arrays)))
    return table


def feature_row_bytes(config: FeaturesConfig) -> int:
    """An upper bound of one output row's bytes: the features of a clip with the most frames ``sampling`` gives
    (``T x (D + N x Dv)`` in ``encode.dtype``, patch features included when written), plus 64 KiB of other
    columns."""
    vision = tower_model_config(config.encode.tower).vision_config
    grid = vision.image_size // vision.patch_size
    width = int(getattr(vision, "projection_dim", None) or vision.hidden_size)
    if config.encode.patch_features:
        width += (grid * grid + 1) * vision.hidden_size  # + 1: a CLIP tower's CLS token
    return config.sampling.max_frames_per_clip() * width * np.dtype(config.encode.dtype).itemsize + 2**16


@owns_output("features", "features")
def run_features(manifest: str | Path, out: str | Path, config: FeaturesConfig) -> JobSummary:
    """Run the feature job on the connected Ray cluster (``ray.init`` first, or a local one starts).

    Args:
        manifest: a Panda-70M CSV, a video2dataset folder, a list of paths or a folder of videos.
        out: output folder; rerunning with the same folder continues where a killed run stopped.
        config: the job's config.

    Returns:
        Counts over the whole output, and this run's clips/s and frames/s.

    Raises:
        FileNotFoundError: the manifest does not exist.
        ValueError: an unknown preset in ``encode.tower.model``, or more CPUs asked for than the cluster has.
    """
    out = location(out)
    size = tower_model_config(config.encode.tower).image_size
    local = init_ray()
    gpus = num_gpus_in_cluster()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    fused = config.decode.in_encode_actors and not gpus
    if config.encode.num_actors:
        actors = config.encode.num_actors
    elif fused:  # every CPU left by a read task (and a resumed run's checkpoint filter) decodes
        spare = cpus - READ_TASK_CPUS - (CHECKPOINT_FILTER_CPUS if resuming(out) else 0)
        actors = max(1, int(spare // config.encode.num_cpus))
    else:
        actors = max(1, gpus)
    stages = {"encode actors": actors * config.encode.num_cpus}
    if fused:
        stages["one read task"] = READ_TASK_CPUS
    else:
        stages["one decode task"] = config.decode.num_cpus
    check_cpu_budget(stages, strict=local, out=out)
    n_clips = stage_clips(manifest, config.manifest, out, min_files=4 * cpus)
    features_dir = out / "features"
    before = written_clip_ids(features_dir)
    started = time.perf_counter()
    with exactly_once(out):
        ds = read_staged_clips(out, config.decode.batch_size)
        decode_resources = (
            {"num_cpus": config.encode.num_cpus, **config.encode.placement.ray_args()}  # the actors': Ray Data fuses
            if config.decode.in_encode_actors
            else config.decode.task_args()
        )
        ds = ds.map_batches(
            decode_frames,
            fn_kwargs={
                "sampling": config.sampling,
                "size": size,
                "strategy": config.decode.strategy,
                "limits": config.decode.limits,
            },
            batch_size=config.decode.batch_size,
            **decode_resources,
        )
        ds = ds.map_batches(
            EncodeFrames,
            fn_constructor_kwargs={"config": config.encode},
            batch_size=config.encode.batch_size,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=1 if gpus else 0,
            num_cpus=config.encode.num_cpus,
            **config.encode.placement.ray_args(),
        )
        write_output(ds, features_dir, config.output, row_bytes=feature_row_bytes(config))
    summary = JobSummary.collect(features_dir, before, started, {"frames/s": "num_frames"})
    write_atomic(out / "summary.json", json.dumps({"manifest_clips": n_clips, **summary.to_dict()}, indent=2))
    return summary


def features_job(manifest: Path, out: Path, config: FeaturesConfig) -> Report:
    """``vidlm features``: :func:`run_features`, then its summary."""
    summary = run_features(manifest, out, config)
    return summary.report("vidlm features", lines=[f"features: [bold]{summary.out}[/]"])
