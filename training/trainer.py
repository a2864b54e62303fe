"""``vidlm train``: Ray Train ``TorchTrainer`` workers, each running DeepSpeed (ZeRO-2, ZeRO-3, ZeRO-3 offload).

Driver (:func:`prepare_training`, :func:`run_training`)::

    resolve the model -> Ray Data plan (training.data) -> fill the DeepSpeed JSON's "auto" values
      -> memory plan (DeepSpeed's estimators; refuse what cannot fit) -> TorchTrainer.fit()

Worker (:func:`train_loop_per_worker`), everything it needs in ``train_loop_config``::

    HfDeepSpeedConfig (ZeRO-3: from_pretrained builds the model under deepspeed.zero.Init, each rank
    holding its partition) -> apply_trainable (peft LoRA, parts frozen / full) -> deepspeed.initialize
      -> resume from ray.train.get_checkpoint() (engine state, RNG states, data position: training.checkpoints)
      -> for each micro-batch of get_dataset_shard("train"): forward on features, backward, step
      -> every checkpoint.every_steps (or epoch), and the last step: engine.save_checkpoint (each rank its
         shard) + ray.train.report
      -> end: save_16bit_model (consolidated on rank 0) -> OUT/export (from_pretrained / vLLM) + OUT/adapter

Ray Train restarts the worker group from the latest checkpoint after a failure (``FailureConfig``); the
data order is deterministic (``preserve_order``, seeded local shuffle per epoch) and the batches consumed
before the checkpoint are skipped, so a restarted run reaches the same weights as an uninterrupted one.
Rank 0 adds one line per optimizer step to ``OUT/metrics.jsonl`` (the file rewritten, then renamed: never
torn; ``loss`` averaged over ranks and micro-batches, ``tokens``, ``step_time_s``, ``attempt``); a step redone
after a restart appears again with a higher ``attempt``, and readers keep the last line of each step
(:func:`read_metrics`).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from training.checkpoints import check_resume, load_checkpoint, resume_record, save_checkpoint, staging_dir
from training.config import TrainConfig
from training.memory import MemoryPlan, memory_plan
from training.progress import LOSS_CURVE, show_progress, write_loss_curve
from vidlm.jobs import Report
from vidlm.models.lora import ADAPTER_DIR
from vidlm.writers import write_atomic

__all__ = [
    "PreparedRun",
    "TrainSummary",
    "fill_deepspeed_config",
    "plan_training",
    "prepare_training",
    "read_metrics",
    "run_training",
    "train_loop_per_worker",
]

CONSOLIDATED = "consolidated.bin"
EXPORT_DIR, METRICS = "export", "metrics.jsonl"


class TrainingConfigError(ValueError):
    """A training config that cannot run: the memory plan does not fit, or a DeepSpeed value is left open."""


def fill_deepspeed_config(config: TrainConfig, hidden_size: int, total_steps: int, world_size: int) -> dict:
    """The DeepSpeed JSON of ``config.deepspeed.config`` with its ``"auto"`` values filled by transformers'
    ``HfTrainerDeepSpeedConfig`` -- the Hugging Face Trainer's own filling, from this config's values.

    Batch sizes, clipping, precision and the optimizer's hyper-parameters come from ``config``; ZeRO bucket sizes
    from the LLM's hidden size ``h`` (``h*h``, ``0.9*h*h``, ``10*h``). A JSON without an optimizer or a scheduler
    gets AdamW (torch's on CPU workers) and a linear warm-up + cosine schedule (``WarmupCosineLR`` over
    ``total_steps``, warm-up ``ceil(optim.warmup_ratio * total_steps)``, at least 1): the Trainer builds those in
    torch instead.

    Raises:
        FileNotFoundError: the JSON does not exist.
        TrainingConfigError: a value that contradicts this config, or an ``"auto"`` left that transformers does
            not fill.
    """
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    path = Path(config.deepspeed.config)
    if not path.is_file() and not path.is_absolute():  # a shipped config named from the repository root
        path = Path(__file__).resolve().parents[1] / path
    if not path.is_file():
        raise FileNotFoundError(f"deepspeed.config: no file {config.deepspeed.config}")
    ds = json.loads(path.read_text())
    o, d = config.optim, config.data
    ds.setdefault("fp16", {"enabled": "auto"})
    ds.setdefault("bf16", {"enabled": "auto"})
    adamw = dict.fromkeys(["lr", "betas", "eps", "weight_decay"], "auto")
    if not config.scaling.use_gpu:  # torch's AdamW: DeepSpeed's CPU kernel is a C++ op compiled at the first start
        adamw["torch_adam"] = True
    ds.setdefault("optimizer", {"type": "AdamW", "params": adamw})
    ds.setdefault(
        "scheduler",
        {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": "auto",
                "warmup_num_steps": "auto",
                "warmup_type": "linear",
                "cos_min_ratio": 0.0,
            },
        },
    )
    ds.setdefault("steps_per_print", 10**9)  # progress goes to metrics.jsonl, not DeepSpeed's log
    ds.setdefault("wall_clock_breakdown", False)
    args = SimpleNamespace(  # the TrainingArguments fields HfTrainerDeepSpeedConfig reads
        world_size=world_size,
        per_device_train_batch_size=d.micro_batch_size,
        gradient_accumulation_steps=o.gradient_accumulation_steps,
        max_grad_norm=o.grad_clip,
        learning_rate=o.lr,
        adam_beta1=o.betas[0],
        adam_beta2=o.betas[1],
        adam_epsilon=1e-8,
        weight_decay=o.weight_decay,
        save_on_each_node=False,
        fp16=False,
        fp16_full_eval=False,
        bf16=config.bf16,
        bf16_full_eval=False,
        get_warmup_steps=lambda steps: math.ceil(o.warmup_ratio * steps),
    )
    hf = HfTrainerDeepSpeedConfig(ds)  # registers itself globally (weakly): dropped below
    try:
        hf.trainer_config_process(args)
        hf.trainer_config_finalize(args, SimpleNamespace(config=SimpleNamespace(hidden_size=hidden_size)), total_steps)
    except ValueError as err:
        raise TrainingConfigError(f"{path}: {err}") from None
    filled = hf.config
    del hf
    left = [k for k, v in _flatten(filled) if v == "auto"]
    if left:
        raise TrainingConfigError(f"{path}: cannot fill 'auto' for {', '.join(left)}")
    return filled


def _flatten(node: Any, prefix: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _flatten(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), node


@dataclass
class PreparedRun:
    """What :func:`prepare_training` resolved: print ``plan`` before :func:`run_training`."""

    config: TrainConfig
    model_dir: str
    dataset: Any  # ray.data.Dataset
    total_steps: int
    ds_config: dict
    plan: MemoryPlan


def model_config_of(spec: str):
    """The :class:`~vidlm.models.video_llm.VidlmConfig` of a preset or model directory, without weights (a paper
    preset's plan needs none)."""
    from vidlm.models.presets import locate_model

    return locate_model(spec)[1]


def plan_training(config: TrainConfig) -> MemoryPlan:
    """The per-rank memory plan of ``config`` (any model size: nothing is allocated, no data is read).

    Raises:
        FileNotFoundError, ValueError: an unknown model or DeepSpeed file.
    """
    model_config = model_config_of(config.model)
    ds_config = fill_deepspeed_config(config, model_config.text_config.hidden_size, 1, config.scaling.num_workers)
    return memory_plan(config, model_config, ds_config)


def prepare_training(config: TrainConfig) -> PreparedRun:
    """Check the memory plan, then resolve the model, plan the data and fill DeepSpeed's config.

    Counting the optimizer steps of a run without ``optim.max_steps`` reads the data once (tokenisation
    included); give ``max_steps`` to skip that pass on large corpora. With ``data.materialize`` the plan runs once
    here, into the object store, and the count and the workers read its blocks.

    Raises:
        TrainingConfigError: the memory plan does not fit ``scaling.device_memory_gb`` (before anything starts).
        FileNotFoundError: no model weights, no data or no ``data.memory`` file.
        ValueError: data columns that do not fit the recipe, or a ``data.memory`` that does not fit the model.
    """
    from training.data import build_dataset, ordered_execution
    from vidlm.cluster import init_ray
    from vidlm.models.presets import resolve_model

    plan = plan_training(config)
    if plan.refusal():
        raise TrainingConfigError(plan.refusal())
    model_dir = str(resolve_model(config.model).resolve())
    if config.data.memory:  # refused here, before any worker starts
        from training.data import read_memory

        memory = read_memory(config.data.memory)
        mc = model_config_of(model_dir)
        if mc.compressor_config.kind != "global" or memory.shape[1] != mc.projector_config.vision_dim:
            raise ValueError(
                f"data.memory {memory.shape} does not fit {config.model}: a TOPA model's memory is "
                f"(K, {mc.projector_config.vision_dim})"
            )
    init_ray()
    dataset = build_dataset(config, model_dir)
    if config.data.materialize:
        with ordered_execution():
            dataset = dataset.materialize()
    o = config.optim
    if o.max_steps:
        total = o.max_steps
    else:
        per_step = config.data.micro_batch_size * config.scaling.num_workers * o.gradient_accumulation_steps
        total = max(1, dataset.count() // per_step) * o.epochs
    hidden = model_config_of(model_dir).text_config.hidden_size
    ds_config = fill_deepspeed_config(config, hidden, total, config.scaling.num_workers)
    return PreparedRun(config, model_dir, dataset, total, ds_config, plan)


@dataclass(frozen=True)
class TrainSummary:
    """The end of a run."""

    out: Path
    steps: int
    first_loss: float
    final_loss: float
    attempts: int
    """Worker-group starts (1 + restarts after failures)."""
    export: Path
    checkpoint: str | None
    metrics: dict


def read_metrics(out: str | os.PathLike, every_attempt: bool = False) -> list[dict]:
    """``OUT/metrics.jsonl``, one record per optimizer step (the last attempt's, when a step was redone), or with
    ``every_attempt`` every record in the order written."""
    path = Path(out) / METRICS
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    if every_attempt:
        return records
    by_step = {r["step"]: r for r in records}
    return [by_step[s] for s in sorted(by_step)]


def run_training(prepared: PreparedRun, out: str | os.PathLike) -> TrainSummary:
    """Train on the connected Ray cluster; rerunning with the same ``out`` resumes from its latest checkpoint.

    Returns:
        the summary; the exported model is ``OUT/export``.

    Raises:
        training.checkpoints.CheckpointMismatch: ``out`` holds a checkpoint of another world size or config.
        ray.train.TrainingFailedError: the workers failed more than ``checkpoint.max_failures`` times (e.g. a
            partial checkpoint: :class:`training.checkpoints.CheckpointError` names what is missing).
    """
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    config = prepared.config
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    record = resume_record(config, prepared.model_dir)
    check_resume(out, config.scaling.num_workers, record)
    ingest = ExecutionOptions(preserve_order=True)  # the same batches in the same order after a restart
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "model_dir": prepared.model_dir,
            "ds_config": prepared.ds_config,
            "total_steps": prepared.total_steps,
            "out": str(out),
            "resume_record": record,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.scaling.num_workers,
            use_gpu=config.scaling.use_gpu,
            resources_per_worker={"CPU": config.scaling.cpus_per_worker},
            placement_strategy=config.scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name="ray_train",
            storage_path=config.checkpoint.storage_path or str(out),
            failure_config=ray.train.FailureConfig(max_failures=config.checkpoint.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.checkpoint.num_to_keep),
        ),
        datasets={"train": prepared.dataset},
        dataset_config=ray.train.DataConfig(execution_options=ingest),
    )
    result = trainer.fit()
    records = read_metrics(out)
    write_loss_curve(read_metrics(out, every_attempt=True), out / LOSS_CURVE)
    return TrainSummary(
        out=out,
        steps=records[-1]["step"] if records else 0,
        first_loss=records[0]["loss"] if records else float("nan"),
        final_loss=records[-1]["loss"] if records else float("nan"),
        attempts=max((r["attempt"] for r in records), default=0),
        export=out / EXPORT_DIR,
        checkpoint=result.checkpoint.path if result.checkpoint else None,
        metrics=dict(result.metrics or {}),
    )


def _attach_memory(model, config: TrainConfig) -> None:
    """``data.memory`` into the model (TOPA eq. 2's memory, saved with the checkpoint and the export)."""
    if config.data.memory:
        from training.data import read_memory
        from vidlm.models.modality_projection import attach_modality_memory

        attach_modality_memory(model, read_memory(config.data.memory))


def _build_engine(config: TrainConfig, model_dir: str, ds_config: dict):
    """The DeepSpeed engine of a worker (ZeRO-3: the model is built partitioned by ``from_pretrained``)."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from training.data import manifest_word_weights
    from vidlm.models.lora import apply_trainable
    from vidlm.models.video_llm import VidlmForConditionalGeneration

    deepspeed.init_distributed()  # adopts the process group Ray Train started (gloo on CPU, NCCL on GPU)
    torch.manual_seed(config.seed)  # LoRA's random A matrices: the same on every rank and every restart
    hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841 - alive while from_pretrained runs: ZeRO-3 -> zero.Init
    dtype = torch.bfloat16 if config.bf16 else torch.float32
    model = VidlmForConditionalGeneration.from_pretrained(model_dir, dtype=dtype)
    _attach_memory(model, config)
    if config.recipe == "words" and model.visual_focus is not None:  # saved with the checkpoint and the export
        model.visual_focus.word_weights.copy_(manifest_word_weights(config, model_dir))
    model = apply_trainable(model, config.trainable)
    groups = parameter_groups(model, config.optim)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    return engine


def parameter_groups(model, optim) -> list[dict]:
    """The optimizer's parameter groups of a model after :func:`~vidlm.models.lora.apply_trainable`: the vision
    tower's trainable parameters with ``optim.vision_tower_lr``, the projector's and the visual position embedding's
    with ``optim.projector_lr`` (each where set), every other trainable parameter in a group of its own at
    ``optim.lr`` (LLaVA-NeXT's ``mm_vision_tower_lr`` / ``mm_projector_lr``). DeepSpeed's optimizer and its
    ``WarmupCosineLR`` keep each group's peak and scale all of them by the same schedule.

    Returns:
        ``[{"params": [...], "lr": float, "name": str}, ...]``: ``rest`` first (the ``lr`` of ``metrics.jsonl`` is
        the first group's), then ``vision_tower`` and ``projector``; groups without parameters are left out.
    """
    from vidlm.models.lora import connector_parts

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft wrapper (LoRA)
    parts = {
        "vision_tower": (["vision_tower"], optim.vision_tower_lr),
        "projector": (connector_parts(base), optim.projector_lr),
    }
    groups, taken = [], set()
    for name, (attributes, lr) in parts.items():
        if lr is None:
            continue
        params = []
        for attribute in attributes:
            part = getattr(base, attribute, None)
            if isinstance(part, torch.nn.Module):
                params += [p for p in part.parameters() if p.requires_grad and id(p) not in taken]
            elif isinstance(part, torch.nn.Parameter) and part.requires_grad and id(part) not in taken:
                params.append(part)
        taken |= {id(p) for p in params}
        groups.append({"params": params, "lr": lr, "name": name})
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    return [g for g in [{"params": rest, "lr": optim.lr, "name": "rest"}, *groups] if g["params"]]


def _parameter_stats(engine) -> dict:
    """Trainable parameters, and the fraction of all parameters this rank holds (ZeRO-3: about 1/world)."""
    total = held = trainable = 0
    for p in engine.module.parameters():
        full = int(getattr(p, "ds_numel", p.numel()))
        total += full
        held += int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else p.numel()
        trainable += full if p.requires_grad else 0
    return {"trainable_params": trainable, "total_params": total, "param_fraction_held": held / max(total, 1)}


def _mean_over_ranks(values: list[float], device) -> float:
    import torch.distributed as dist

    t = torch.tensor([sum(values), len(values)], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return float(t[0] / t[1])


def _sum_over_ranks(value: float, device) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return float(t[0])


def train_loop_per_worker(loop_config: dict) -> None:
    """One Ray Train worker: build the DeepSpeed engine, resume, train on its shard, checkpoint, export.

    ``loop_config``: ``config`` (the ``TrainConfig`` as JSON), ``model_dir``, ``ds_config``, ``total_steps``,
    ``out``, ``resume_record`` (:func:`training.checkpoints.resume_record`, taken by the driver, which reads the
    inputs' files).
    """
    import ray.train
    from transformers import AutoTokenizer

    from training.data import collate

    config = TrainConfig.model_validate(loop_config["config"])
    out, resume = Path(loop_config["out"]), loop_config["resume_record"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    if not config.scaling.use_gpu:
        torch.set_num_threads(max(1, int(config.scaling.cpus_per_worker)))
    world_size = ctx.get_world_size()
    engine = _build_engine(config, loop_config["model_dir"], loop_config["ds_config"])
    device = engine.device
    position = {"epoch": 0, "batch": 0, "step": 0, "attempt": 1}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resumed = load_checkpoint(engine, Path(folder), rank, world_size)
        position = {**resumed, "attempt": resumed["attempt"] + 1}
    stats = _parameter_stats(engine)
    metrics = (out / METRICS).read_text() if rank == 0 and (out / METRICS).is_file() else ""
    pad = AutoTokenizer.from_pretrained(loop_config["model_dir"]).pad_token_id or 0
    total_steps = loop_config["total_steps"]
    shard = ray.train.get_dataset_shard("train")
    step = position["step"]
    record: dict = {"step": step, **stats}  # what a run resumed at its last step reports
    window: list[float] = []
    tokens, started = 0, time.perf_counter()
    for epoch in range(position["epoch"], config.optim.epochs):
        if step >= total_steps:
            break
        batches = shard.iter_batches(
            batch_size=config.data.micro_batch_size,
            batch_format="numpy",
            drop_last=True,  # every rank runs the same number of steps
            local_shuffle_buffer_size=config.data.shuffle_buffer or None,
            local_shuffle_seed=config.seed + epoch if config.data.shuffle_buffer else None,
        )
        for i, batch in enumerate(batches):
            if epoch == position["epoch"] and i < position["batch"]:
                continue  # consumed before the checkpoint this run resumed from
            inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in collate(batch, pad).items()}
            if "frames" in inputs:  # decoded clips: the model's own preprocessing, as at inference
                inputs["pixel_values_videos"] = [engine.module.preprocess(f).to(device) for f in inputs.pop("frames")]
            else:
                inputs["video_features"] = [f.to(device) for f in inputs["video_features"]]
            if "caption_words" in inputs:  # the words recipe: the vision side alone
                inputs["caption_words"] = [w.to(device) for w in inputs["caption_words"]]
                inputs["caption_sentences"] = [[w.to(device) for w in s] for s in inputs["caption_sentences"]]
            loss = engine(**inputs, text_features=config.recipe == "topa").loss  # Tideos: CLIP text features
            engine.backward(loss)
            engine.step()
            window.append(float(loss.detach()))
            if "attention_mask" in inputs:
                tokens += int(inputs["attention_mask"].sum())
            else:
                tokens += sum(len(w) for w in inputs["caption_words"])
            if engine.global_steps == step:
                continue  # inside a gradient-accumulation window
            step = engine.global_steps
            record = {
                "step": step,
                "epoch": epoch,
                "loss": _mean_over_ranks(window, device),
                "lr": float(engine.get_lr()[0]),
                "tokens": int(_sum_over_ranks(tokens, device)),
                "step_time_s": time.perf_counter() - started,
                "attempt": position["attempt"],
                **stats,
            }
            window, tokens, started = [], 0, time.perf_counter()
            if rank == 0:
                metrics += json.dumps(record) + "\n"
                write_atomic(out / METRICS, metrics)
            every = config.checkpoint.every_steps
            if (every and step % every == 0) or step >= total_steps:  # the last step's too: a rerun only exports
                _checkpoint(engine, record, {**position, "epoch": epoch, "batch": i + 1, "step": step}, resume, out)
            if step >= total_steps:
                break
        else:
            if not config.checkpoint.every_steps:
                _checkpoint(engine, record, {**position, "epoch": epoch + 1, "batch": 0, "step": step}, resume, out)
    _export(engine, config, loop_config["model_dir"], out, rank)
    ray.train.report({**record, "exported": True} if step else {"exported": True, **stats})


def _checkpoint(engine, metrics: dict, position: dict, resume: dict, out: Path) -> None:
    """Every rank writes its ZeRO shard and RNG states to its own folder; Ray Train merges them into one checkpoint
    (:mod:`training.checkpoints`)."""
    import ray.train

    ctx = ray.train.get_context()
    with staging_dir(engine, out) as folder:
        save_checkpoint(engine, Path(folder), position, ctx.get_world_rank(), ctx.get_world_size(), resume, out)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _export(engine, config: TrainConfig, model_dir: str, out: Path, rank: int) -> None:
    """Gather the 16-bit weights on rank 0 and write ``OUT/export`` (and ``OUT/adapter`` for LoRA)."""
    import torch.distributed as dist

    staging = out / ".consolidated"
    engine.save_16bit_model(str(staging), CONSOLIDATED)  # every rank takes part; rank 0 writes
    if rank == 0:
        export_model(staging / CONSOLIDATED, model_dir, config, out)
    if dist.is_initialized():
        dist.barrier()


def export_model(state_dict_path: Path, model_dir: str, config: TrainConfig, out: Path) -> Path:
    """A consolidated training state dict -> ``OUT/export``, a model directory ``from_pretrained`` and vLLM load.

    The LoRA adapter (and ``modules_to_save``) is written to ``OUT/adapter`` first, then merged at the training
    alpha (``W0 + alpha/r * B @ A``) into the exported weights.

    Raises:
        RuntimeError: the state dict does not match the model (missing or unexpected keys).
    """
    from transformers import AutoTokenizer
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from vidlm.models.lora import apply_trainable
    from vidlm.models.video_llm import VidlmForConditionalGeneration

    unset_hf_deepspeed_config()  # a plain model on this rank, not ZeRO-3 partitions
    model = VidlmForConditionalGeneration.from_pretrained(model_dir)
    _attach_memory(model, config)
    model = apply_trainable(model, config.trainable)
    state = torch.load(state_dict_path, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {n for n in missing if n.endswith("lm_head.weight")} if model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"consolidated weights do not fit the model: missing {missing}, unexpected {unexpected}")
    if config.trainable.llm == "lora":
        model.save_pretrained(out / ADAPTER_DIR)
        model = model.merge_and_unload()
    export = out / EXPORT_DIR
    model.to(getattr(torch, config.export.dtype)).save_pretrained(export)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(export)
    state_dict_path.unlink()
    return export


def train_job(out: Path, config: TrainConfig, plan: bool = False, echo: Callable[[Any], None] = print) -> Report | None:
    """``vidlm train``: the memory plan (echoed first, also when it does not fit), then the run; ``plan``: the plan
    alone.

    Raises:
        TrainingConfigError: the plan does not fit ``scaling.device_memory_gb``.
        FileNotFoundError, ValueError: see :func:`prepare_training`.
    """
    memory = plan_training(config)
    echo(Report(f"memory plan: {config.model}, {config.recipe}", memory.rows()))
    if memory.refusal():
        raise TrainingConfigError("memory plan: " + memory.refusal())
    if plan:
        return None
    prepared = prepare_training(config)
    stop = threading.Event()
    bar = threading.Thread(target=show_progress, args=(lambda: read_metrics(out), prepared.total_steps, stop))
    bar.start()
    try:
        summary = run_training(prepared, out)
    finally:
        stop.set()
        bar.join()
    rows = [
        ("steps", str(summary.steps)),
        ("loss (first -> last)", f"{summary.first_loss:.4f} -> {summary.final_loss:.4f}"),
        ("attempts", str(summary.attempts)),
        ("metrics", str(summary.out / METRICS)),
        ("loss curve", str(summary.out / LOSS_CURVE)),
        ("export", str(summary.export)),
    ]
    return Report("vidlm train", rows)
