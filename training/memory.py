"""The per-rank memory plan of a training config, from DeepSpeed's own estimators, before anything starts.

The model is built on the ``meta`` device (no memory, any size: a 72B plan costs nothing), with the same
:func:`~vidlm.models.lora.apply_trainable` the workers use, so the counts are those of the run. Then:

- trainable parameters carry the full model states (16-bit weights, gradients, fp32 master weights, Adam
  moments: 18 bytes each), estimated by ``estimate_zero3_model_states_mem_needs`` /
  ``estimate_zero2_model_states_mem_needs`` for the config's stage and offload settings;
- frozen parameters carry only their weights (2 bytes in bf16, 4 in fp32), partitioned across ranks under
  ZeRO-3 and replicated under ZeRO-2 (DeepSpeed's estimators assume every parameter trains, which
  over-counts a frozen 72B LLM by 9x).

Activations are not counted (they depend on sequence length and checkpointing); the plan is a floor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vidlm.models.lora import TrainableConfig

__all__ = ["MemoryPlan", "ParameterCounts", "count_parameters", "memory_plan"]

GB = 2**30


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of a model under a :class:`TrainableConfig` (LoRA weights included)."""

    total: int
    trainable: int
    largest_layer: int
    """Parameters of the largest module (its own, not its children's): what ZeRO-3 gathers at once."""


def count_parameters(model_config, trainable: TrainableConfig) -> ParameterCounts:
    """Count a model's parameters without allocating them (``meta`` device).

    Args:
        model_config: a :class:`~vidlm.models.video_llm.VidlmConfig`.
        trainable: what trains (LoRA adds its ``A`` and ``B`` matrices).
    """
    from vidlm.models.lora import apply_trainable
    from vidlm.models.video_llm import VidlmForConditionalGeneration

    with torch.device("meta"):
        model = apply_trainable(VidlmForConditionalGeneration(model_config), trainable)
    unique = {id(p): p for p in model.parameters()}.values()  # tied embeddings once
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return ParameterCounts(
        total=sum(p.numel() for p in unique),
        trainable=sum(p.numel() for p in unique if p.requires_grad),
        largest_layer=int(largest),
    )


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank of a training config (model states only)."""

    stage: int
    world_size: int
    counts: ParameterCounts
    device_bytes: int
    """Per device (GPU, or a CPU worker): trainable model states + frozen weights + the largest gathered layer."""
    host_bytes: int
    """Per node, for offloaded states (DeepSpeed's ``cpu_mem``)."""
    limit_bytes: int | None

    @property
    def fits(self) -> bool:
        return self.limit_bytes is None or self.device_bytes <= self.limit_bytes

    def rows(self) -> list[tuple[str, str]]:
        """``(name, value)`` lines to print."""
        c = self.counts
        return [
            ("ZeRO stage / ranks", f"{self.stage} / {self.world_size}"),
            ("parameters (trainable)", f"{c.total / 1e6:,.1f} M ({c.trainable / 1e6:,.2f} M)"),
            ("largest layer", f"{c.largest_layer / 1e6:,.1f} M"),
            ("per device (model states)", f"{self.device_bytes / GB:,.2f} GiB"),
            ("per node (offloaded states)", f"{self.host_bytes / GB:,.2f} GiB"),
            ("declared device memory", "-" if self.limit_bytes is None else f"{self.limit_bytes / GB:,.1f} GiB"),
        ]

    def refusal(self) -> str | None:
        """Why the config cannot fit the declared devices, or ``None``."""
        if self.fits:
            return None
        return (
            f"the model states need {self.device_bytes / GB:,.1f} GiB per device, more than the declared "
            f"scaling.device_memory_gb={self.limit_bytes / GB:,.1f} (ZeRO-{self.stage} on {self.world_size} ranks, "
            f"{self.counts.total / 1e9:,.2f} B parameters, {self.counts.trainable / 1e6:,.1f} M trainable): "
            "use more workers, ZeRO-3, CPU offload (zero3_offload.json) or LoRA"
        )


def memory_plan(config, model_config, ds_config: dict) -> MemoryPlan:
    """The per-rank memory of training ``model_config`` under ``config`` (a ``TrainConfig``) and ``ds_config``.

    Args:
        config: the training config (workers, GPUs, declared memory, what trains).
        model_config: the model's :class:`~vidlm.models.video_llm.VidlmConfig`.
        ds_config: the filled DeepSpeed config (stage, offload).
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    counts = count_parameters(model_config, config.trainable)
    zero = ds_config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    world = config.scaling.num_workers
    offload_optim = zero.get("offload_optimizer", {}).get("device", "none") == "cpu"
    offload_param = zero.get("offload_param", {}).get("device", "none") == "cpu"
    weight_bytes = 2 if config.bf16 else 4
    frozen = counts.total - counts.trainable
    if stage == 3:
        host, device, _ = estimate_zero3_model_states_mem_needs(
            counts.trainable,
            counts.largest_layer,
            num_gpus_per_node=world,
            num_nodes=1,
            cpu_offload=offload_optim,
            cpu_offload_params=offload_param,
            zero_init=True,
            additional_buffer_factor=1.0,
        )
        if not offload_param:
            device += frozen * weight_bytes // world
    else:
        host, device = estimate_zero2_model_states_mem_needs(
            counts.trainable,
            num_gpus_per_node=world,
            num_nodes=1,
            cpu_offload=offload_optim,
            additional_buffer_factor=1.0,
        )
        device += frozen * weight_bytes
    limit = int(config.scaling.device_memory_gb * GB) if config.scaling.device_memory_gb else None
    return MemoryPlan(stage, world, counts, int(device), int(host), limit)
