"""``vidlm plan train``: a training config's memory per rank (ZeRO-3) and its step time at a stated MFU.

``vidlm plan train --config training/configs/llava_video_72b.yaml --samples 1334000 --gpu-type h100``

Memory is :func:`training.memory.memory_plan` (DeepSpeed's estimators, the model on the ``meta`` device). Time:
a training token costs the forward ``F = 2 N + 4 L d c`` FLOPs (``N`` the LLM's matmul weights, ``c`` the attended
context, half the sequence), the backward ``F`` more for the activation gradients and ``F`` more where the LLM's
weights train (full fine-tuning: ``6 N`` per token; a frozen LLM under LoRA: ``4 N``) [Kaplan et al. 2020; Chinchilla
App. F]. The video recipe trains on ``vidlm features``' patch features, so the vision tower costs nothing per step.
Sequences are assumed to fill ``data.max_length`` (``--tokens-per-sample`` for the mean), with no activation
recomputation.
"""

from __future__ import annotations

import math

from vidlm.jobs import Report
from vidlm.plan import DEFAULT_GPU_TYPE, GiB, Plan, finish, hardware, model_costs, quiet_stdout, require_positive

__all__ = ["TRAIN_MFU", "plan_train", "plan_train_job"]

TRAIN_MFU = 0.4
"""Model FLOPs utilisation of ZeRO-3 training on H100s (Llama-class models at long context reach 35-45 %)."""


def plan_train(
    config,
    samples: int,
    gpu_type: str = DEFAULT_GPU_TYPE,
    tokens_per_sample: int | None = None,
    mfu: float = TRAIN_MFU,
) -> Plan:
    """The plan of ``vidlm train`` with ``config`` on ``samples`` training sequences (see the module).

    Args:
        config: a :class:`~training.config.TrainConfig` (``scaling.num_workers`` ranks, one GPU each).
        samples: training sequences per epoch.
        gpu_type: a key of :data:`vidlm.plan.GPU_TYPES`, or ``cpu``.
        tokens_per_sample: mean tokens per sequence; ``None``: ``data.max_length``.
        mfu: model FLOPs utilisation, in (0, 1].

    Raises:
        ValueError: an unknown GPU type or model; a non-positive count or an MFU outside (0, 1].
    """
    from training.trainer import model_config_of, plan_training

    require_positive(samples=samples, tokens_per_sample=tokens_per_sample)
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu must be in (0, 1], got {mfu}")
    hw = hardware(gpu_type)
    memory = plan_training(config)
    costs = model_costs(model_config_of(config.model))
    tokens = tokens_per_sample or config.data.max_length
    ranks = config.scaling.num_workers
    per_step = ranks * config.data.micro_batch_size * config.optim.gradient_accumulation_steps
    forward = 2 * costs.llm_matmul_params + 4 * costs.layers * costs.hidden * tokens / 2
    llm_trains = config.trainable.llm == "full"
    flops_per_token = forward * (3 if llm_trains else 2)
    step_flops = per_step * tokens * flops_per_token
    step_s = step_flops / (ranks * hw.peak_tflops * 1e12 * mfu)
    steps = math.ceil(samples / per_step) * config.optim.epochs
    if config.optim.max_steps:
        steps = min(steps, config.optim.max_steps)
    total_s = steps * step_s
    plan = Plan(f"vidlm plan train: {config.model} on {ranks} x {hw.name}")
    plan.add("model", config.model)
    plan.add("hardware", hw.name)
    plan.add("ranks", ranks)
    plan.add("zero_stage", memory.stage)
    plan.add("parameters_b", memory.counts.total / 1e9, "B")
    plan.add("trainable_parameters_m", memory.counts.trainable / 1e6, "M")
    plan.add("model_states_per_rank_gib", memory.device_bytes / GiB, f"GiB of {hw.memory_gib:g}")
    plan.add("offloaded_states_per_node_gib", memory.host_bytes / GiB, "GiB")
    plan.add("fits", memory.device_bytes <= hw.memory_gib * GiB)
    plan.add("tokens_per_sample", tokens)
    plan.add("samples_per_step", per_step)
    plan.add("flops_per_token", flops_per_token, "FLOPs")
    plan.add("step_s", step_s, f"s at {mfu:.0%} MFU")
    plan.add("steps", steps)
    plan.add("train_h", total_s / 3600, "h")
    plan.add("gpu_hours", ranks * total_s / 3600, "h")
    plan.assumptions += [
        f"{samples:,} samples x {config.optim.epochs} epoch(s), {tokens:,} tokens each"
        + ("" if tokens_per_sample else " (data.max_length: sequences assumed full)"),
        f"{'6' if llm_trains else '4'} N FLOPs per token "
        f"({'the LLM trains' if llm_trains else 'the LLM is frozen or LoRA'}), "
        f"N = {costs.llm_matmul_params / 1e9:,.2f} B matmul weights; attention over half the sequence; "
        "no activation recomputation",
        f"{mfu:.0%} MFU of {hw.peak_tflops:g} TFLOP/s dense bf16 per GPU ({hw.source})",
        "memory: model states only (DeepSpeed's estimators); activations come on top",
    ]
    return plan


def plan_train_job(
    config,
    samples: int | None = None,
    gpu_type: str = DEFAULT_GPU_TYPE,
    tokens_per_sample: int | None = None,
    mfu: float = TRAIN_MFU,
    as_json: bool = False,
) -> Report | None:
    """``vidlm plan train``: :func:`plan_train`, with ``--samples`` or the rows of ``data.train``."""
    if samples is None:
        if not config.data.train:
            raise ValueError("give --samples N (training sequences), or data.train=FOLDER to count its rows")
        import pyarrow.dataset as pads

        samples = pads.dataset(config.data.train, format="parquet").count_rows()
    with quiet_stdout(as_json):
        plan = plan_train(config, samples, gpu_type, tokens_per_sample, mfu)
    return finish(plan, as_json)
