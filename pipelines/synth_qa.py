"""``vidlm synth-qa``: LLaVA-Video's QA generation (LLaVA-Video §2.2, Table 1) by an LLM on vLLM (``ray.data.llm``).

``vidlm synth-qa CAPTIONS --out DIR [k=v ...]``: question-answer pairs of the 16 question types from detailed
captions (``vidlm recaption`` output), each pair open-ended and multiple-choice, its type recorded.

Ray Data plan (:mod:`pipelines.structured_llm`)::

    read_parquet(OUT/requests) -> ray.data.llm vLLM processor -> map_batches(parse_batch: parse_qa)
      -> write_parquet(OUT/qa)                checkpointed on qa_id (exactly once)
"""

from __future__ import annotations

import json
import random
import zlib
from functools import partial
from pathlib import Path

import pyarrow as pa
from pydantic import Field, field_validator

from pipelines._common import JobSummary, OutputConfig
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
from vidlm.config import JobConfig
from vidlm.engine import EngineStageConfig, GenerationConfig
from vidlm.jobs import Report
from vidlm.models.presets import resolve_model

__all__ = [
    "QA_ROW_SCHEMA",
    "QA_TYPES",
    "SynthQAConfig",
    "parse_qa",
    "qa_requests",
    "read_captions",
    "run_synth_qa",
    "synth_qa_job",
]

QA_TYPES = {
    "Temporal": "Designed to assess reasoning about temporal relationships between actions/events. Questions involve "
    "previous, present, or next actions.",
    "Spatial": "Tests ability to perceive spatial relationships between observed instances in a video scene.",
    "Causal": "Focuses on explaining actions/events, determining intentions of actions or causes for subsequent "
    "events.",
    "Description-Scene": "Assesses ability to describe the major scene of the video, like where it takes place and the "
    "overall environment.",
    "Description-Human": "Involves describing actions or attributes of people, such as their activities and "
    "appearances.",
    "Description-Object": "Assesses ability to describe attributes of objects, like their appearance and function.",
    "Count": "Tests ability to count instances of objects, people, actions, and to distinguish between old and new "
    "elements in a scene.",
    "Binary": "Involves yes or no questions related to the video content.",
    "Fine Grained Action Understanding": "Creates questions challenging comprehension of subtle actions.",
    "Plot Understanding": "Challenges ability to interpret the plot in the video.",
    "Non-Existent Actions with Existent Scene Depictions": "Assesses reasoning with introduced non-existent "
    "activities without changing physical details.",
    "Time Order Understanding": "Challenges recognition of temporal sequence of activities in videos.",
    "Object Direction": "Emphasizes perception of object movement direction.",
    "Camera Direction": "Focuses on the direction of camera movement.",
    "Speed": "Delves into discerning variations in speed, including absolute and relative speeds.",
    "Attribute Change": "Centers on how attributes of objects or the entire video change over time, like size, shape, "
    "color, and more.",
}
"""The 16 question types of LLaVA-Video's QA data -> their descriptions, as Table 1 of LLaVA-Video gives them."""


QA_SYSTEM_PROMPT = (
    "You write question-answer pairs about a video from its detailed description. Every question must be "
    "answerable from the description alone. Reply with JSON only."
)


QA_ROW_SCHEMA = pa.schema(
    [
        pa.field("qa_id", pa.string()),
        pa.field("source_id", pa.string()),
        pa.field("qa_type", pa.string()),
        pa.field("question", pa.string()),
        pa.field("options", pa.list_(pa.string())),
        pa.field("answer", pa.string()),
        pa.field("answer_open_ended", pa.string()),
        *STATS_FIELDS,
    ]
)
"""Columns :func:`parse_qa` writes (``vidlm synth-qa`` output)."""


class SynthQAConfig(JobConfig):
    """``vidlm synth-qa``: one YAML of this shape, plus ``key=value`` overrides."""

    model: str = "smol"
    """A preset whose LLM writes (``smol``) or a Hugging Face causal LM directory."""
    id_column: str = "clip_id"
    """The captions' id column."""
    caption_column: str = "caption"
    """The captions' text column (``vidlm recaption`` writes ``caption``)."""
    max_caption_chars: int = Field(4000, gt=0)
    """Longer captions are cut here (the prompt must fit the engine's context)."""
    types: list[str] = list(QA_TYPES)
    """Question types drawn from (LLaVA-Video Table 1)."""
    per_caption: int | None = Field(None, gt=0)
    """QA pairs per caption, each of a different type drawn (seeded per caption) from ``types``; ``None``: one for
    each type, as LLaVA-Video asks ("Generate 1 question-answer pair for each dimension", Table 2)."""
    shape: QAShape = QAShape()
    generation: GenerationConfig = GenerationConfig(max_tokens=512, temperature=0.7, top_p=0.95)
    """Sampling of the QA pairs; on GPU engines each pair samples with seed ``seed + crc32(qa_id)``."""
    engine: EngineStageConfig = EngineStageConfig(max_concurrent_batches=8)
    """The ``ray.data.llm`` engine stage; ``batch_size`` counts requests."""
    output: OutputConfig = OutputConfig()

    @field_validator("types")
    @classmethod
    def _known_types(cls, types: list[str]) -> list[str]:
        unknown = [t for t in types if t not in QA_TYPES]
        if unknown or not types:
            raise ValueError(f"unknown question types {unknown}; known: {list(QA_TYPES)}")
        return types


def parse_qa(row: dict, schema: dict, max_tokens: int) -> dict:
    """An engine output row -> a QA row or an error row (never raises); :data:`QA_ROW_SCHEMA`."""
    record, error, error_type = parse_json(row, schema, max_tokens)
    qa = clean_qa(record) if record is not None else None
    return {
        "qa_id": row["qa_id"],
        "source_id": row["source_id"],
        "qa_type": row["qa_type"],
        "question": qa["question"] if qa else None,
        "options": qa["options"] if qa else [],
        "answer": qa["answer"] if qa else None,
        "answer_open_ended": qa["answer_open_ended"] if qa else None,
        **record_stats(row, error, error_type),
    }


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
    """One request per (caption, question type): every type of ``config.types``, or ``per_caption`` of them drawn
    per caption, seeded by its id.

    Rows: ``qa_id`` (``source_id/type``), ``source_id, qa_type, caption, seed``.
    """
    rows = []
    for c in sorted(captions, key=lambda c: c["source_id"]):
        key = zlib.crc32(c["source_id"].encode())
        types = list(config.types)
        if config.per_caption is not None and config.per_caption < len(types):
            types = random.Random(key + config.generation.seed).sample(types, config.per_caption)
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
        f"Question type: {qa_type}. {QA_TYPES[qa_type]}\n"
        "Write one question of this type about the video, a short open-ended answer, five options for a "
        "multiple-choice version with exactly one correct option, and the letter of the correct option."
    )
    return [{"role": "system", "content": QA_SYSTEM_PROMPT}, {"role": "user", "content": user}]


def _qa_request(row: dict, config: SynthQAConfig, schema_json: str, on_gpu: bool) -> dict:
    return {
        **row,
        "messages": qa_messages(row["caption"], row["qa_type"]),
        "sampling_params": structured_sampling_params(config.generation, int(row["seed"]), on_gpu, schema_json),
    }


@owns_output("synth-qa", "qa", "qa_id")
def run_synth_qa(captions: str | Path, out: str | Path, config: SynthQAConfig) -> JobSummary:
    """QA pairs of LLaVA-Video's 16 types from captions, with an LLM on vLLM (``ray.data.llm``).

    Writes ``OUT/qa``: one row per (caption, type) (:func:`parse_qa`'s columns; error rows included).
    Rerunning with the same ``out`` finishes a killed run without duplicates.

    Raises:
        FileNotFoundError: no captions or no model.
        ValueError: missing columns, or no usable caption.
    """
    out = Path(out).resolve()
    model_dir = resolve_model(config.model, llm_only=True)
    rows = read_captions(captions, config)
    if not rows:
        raise ValueError(f"{captions}: no caption to ask about (all empty or error rows)")
    schema = qa_schema(config.shape)
    return generate_records(
        out,
        qa_requests(rows, config),
        model_dir,
        config.engine,
        config.generation,
        partial(_qa_request, config=config, schema_json=json.dumps(schema)),
        partial(parse_qa, schema=schema, max_tokens=config.generation.max_tokens),
        QA_ROW_SCHEMA,
        "qa_id",
        out / "qa",
        config.output,
    )


def synth_qa_job(captions: Path, out: Path, config: SynthQAConfig) -> Report:
    """``vidlm synth-qa``: :func:`run_synth_qa`, then its summary."""
    return run_synth_qa(captions, out, config).report("vidlm synth-qa", unit="QA pairs")
