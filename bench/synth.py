"""Benchmark of ``vidlm textvid``: ``python bench/synth.py`` (or ``make bench``).

One table, every number measured in this run on the same requests: ``--num`` Tideo prompts (the shipped seed
topics), the same model (SmolLM2-135M-Instruct by default), the same sampling (per-record seeds, JSON-schema
structured outputs, ``--max-tokens``):

- **bare vLLM**: ``vllm.LLM`` built here, then one ``LLM.chat`` call with every request -- the engine alone;
  its rate is given over the ``chat`` call only (ceiling) and over construction + call (from nothing);
- **job**: ``run_textvid`` -- Ray Data staging, ``ray.data.llm``'s chat-template and engine stages, parsing,
  CLIP text encoding of the frames, parquet, deduplication and the memory; from nothing (engine start-up in).

Records/s counts every request's record (error rows included: they cost the same tokens); tokens/s is output
tokens. Ratios are against bare vLLM from nothing, the like-for-like comparison of a whole job.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipelines.structured_llm import structured_sampling_params
from pipelines.textvid import TextVidConfig, run_textvid, textvid_requests, tideo_messages, tideo_schema
from vidlm.config import load_config
from vidlm.engine import cpu_engine_env, on_cpu, vllm_engine_kwargs
from vidlm.models.presets import resolve_model

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "runs" / "bench-synth"
console = Console(width=140)


def bench_bare(config: TextVidConfig, num: int) -> dict:
    """Bare vLLM on the job's prompts: seconds to build the engine, seconds of the one ``chat`` call, tokens."""
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    os.environ.update(cpu_engine_env(config.engine))
    started = time.perf_counter()
    llm = LLM(
        **vllm_engine_kwargs(resolve_model(config.model, llm_only=True), config.engine, seed=config.generation.seed)
    )
    built = time.perf_counter()
    schema = json.dumps(tideo_schema(config.shape))
    rows = textvid_requests(num, config)
    messages = [tideo_messages(r["family"], r["topic"], config.shape) for r in rows]
    params = []
    for r in rows:
        kw = structured_sampling_params(config.generation, r["seed"], not on_cpu(), schema)
        kw["structured_outputs"] = StructuredOutputsParams(**kw["structured_outputs"])
        params.append(SamplingParams(**kw))
    outputs = llm.chat(messages, params, use_tqdm=False)
    done = time.perf_counter()
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    valid = sum(_is_json(o.outputs[0].text) for o in outputs)
    del llm
    gc.collect()
    return {"startup": built - started, "generate": done - built, "tokens": tokens, "records": num, "valid": valid}


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def bench_job(config: TextVidConfig, num: int) -> dict:
    import ray

    out = WORK / "job"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    summary = run_textvid(num, out, config)
    wall = time.perf_counter() - started
    ray.shutdown()
    tokens = summary.job.rates["output tokens/s"] * summary.job.seconds
    return {"wall": wall, "tokens": tokens, "records": summary.job.total, "valid": summary.job.ok, "kept": summary.kept}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=32, help="Tideo requests (every path)")
    parser.add_argument("--max-tokens", type=int, default=768)
    parser.add_argument("--model", default="smol")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    config = load_config(TextVidConfig, None, [f"model={args.model}", f"generation.max_tokens={args.max_tokens}"])

    console.print(f"bare vLLM: {args.num} Tideo prompts ...")
    bare = bench_bare(config, args.num)
    console.print(f"job: vidlm textvid --num {args.num} ...")
    job = bench_job(config, args.num)

    from_nothing = bare["startup"] + bare["generate"]
    rows = [
        ("bare vLLM LLM.chat (ceiling: the call only)", bare["generate"], bare["tokens"], bare["valid"]),
        ("bare vLLM from nothing (engine construction + call)", from_nothing, bare["tokens"], bare["valid"]),
        ("job: vidlm textvid (ray.data.llm, encode, dedup, memory)", job["wall"], job["tokens"], job["valid"]),
    ]
    table = Table(
        title=f"textvid on {os.cpu_count()} cores: {args.num} requests, <= {args.max_tokens} tokens each, {args.model}"
    )
    for name in ("path", "seconds", "records/s", "output tokens/s", "valid JSON", "x bare from nothing"):
        table.add_column(name, justify="left" if name == "path" else "right")
    for label, seconds, tokens, valid in rows:
        table.add_row(
            label,
            f"{seconds:.1f}",
            f"{args.num / seconds:.3f}",
            f"{tokens / seconds:.1f}",
            f"{valid}/{args.num}",
            f"{(args.num / seconds) / (args.num / from_nothing):.2f}",
        )
    console.print(table)
    console.print(f"bare engine start-up {bare['startup']:.1f} s; job kept {job['kept']} Tideos after deduplication")


if __name__ == "__main__":
    main()
