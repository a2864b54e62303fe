"""Plans of corpus-scale runs from first principles: GPUs, hours, the CPUs that keep them fed, what limits first.

``vidlm plan recaption|features|train`` (:mod:`pipelines.plan`, :mod:`training.plan`) build on the arithmetic here.
Every figure comes from the model's config and a hardware datasheet, with the assumptions named in the plan:

- **Parameters** are counted on the ``meta`` device (no memory: a 72B plan costs nothing) per part: vision tower,
  projector, LLM. A linear layer of ``N`` weights costs ``2N`` FLOPs per token forward (a multiply and an add);
  attention over a context of ``c`` tokens ``4 d c`` per layer (``QK^T`` and ``AV``) [Kaplan et al. 2020, Table 1].
- **Prefill** of ``P`` prompt tokens is compute-bound: ``2 N P + 2 L d P^2`` FLOPs at :data:`PREFILL_MFU` of the
  accelerator's dense bf16 peak; the vision tower encodes each frame's ``n`` patch tokens, ``2 N_v n + 4 L_v d_v n^2``.
- **Generation** is memory-bound: each step of a batch of ``B`` sequences reads the LLM's weights once and every
  sequence's KV cache (``2 L h_kv d_head`` values per token), at :data:`BANDWIDTH_UTILISATION` of the datasheet
  bandwidth, or computes ``2 N B`` FLOPs, whichever is slower. ``B`` is what vLLM schedules at once: the job's
  in-flight clips, capped by vLLM's ``max_num_seqs`` default for the accelerator and by the KV cache that fits.
- **Decoding videos** costs :data:`DECODE_FRAMES_PER_CPU_S` sampled frames per CPU-second (seek plus decode of
  H.264 720p, the Panda-70M resolution, by PyAV); ``--calibrate`` measures it on the cluster instead.

None of this is measured here; ``--calibrate`` (in the plan jobs) replaces the rates with those of the real job on
the connected cluster.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BANDWIDTH_UTILISATION",
    "DECODE_FRAMES_PER_CPU_S",
    "DEFAULT_GPU_TYPE",
    "GPU_TYPES",
    "Hardware",
    "ModelCosts",
    "Plan",
    "PREFILL_MFU",
    "TOWER_START_S",
    "EngineModel",
    "cluster_hardware",
    "cluster_plan",
    "cpu_hardware",
    "dtype_bytes",
    "finish",
    "frames_per_clip",
    "hardware",
    "model_costs",
    "planned_dtype",
    "quiet_stdout",
    "require_positive",
]

GiB = 2**30

DEFAULT_GPU_TYPE = "h100"
"""``--gpu-type`` of a first-principles plan (a calibrated recaption or features plan: the connected cluster's)."""

PREFILL_MFU = 0.5
"""Share of the dense bf16 peak that prefill and vision encoding reach (large matmuls; vLLM's prefill on H100s runs
at 40-60 %)."""
BANDWIDTH_UTILISATION = 0.7
"""Share of the datasheet memory bandwidth that a generation step reaches."""
DECODE_FRAMES_PER_CPU_S = 30.0
"""Sampled frames one CPU decodes per second (PyAV, H.264 720p, a seek to each sampled frame's keyframe first)."""
ENGINE_START_S = 60.0
"""Engine start-up besides loading the weights: processes, profiling the KV cache, CUDA graphs."""
TOWER_START_S = 30.0
"""Start-up of the feature job's encode actors (the tower's weights are small)."""
LOAD_GB_PER_S = 2.0
"""Weights read per second at engine start (from a node's disk or a shared file system)."""
GPU_MEMORY_UTILISATION = 0.9
"""vLLM's default ``gpu_memory_utilization``: the share of a GPU its engine takes for weights and KV cache."""


@dataclass(frozen=True)
class Hardware:
    """One accelerator and the node that holds it.

    Args:
        name: the ``--gpu-type`` key.
        memory_gib: memory of one accelerator (GiB).
        peak_tflops: dense bf16 (fp16 where there is no bf16) tensor FLOP/s, in 10^12.
        bandwidth_gbs: memory bandwidth, 10^9 bytes per second.
        per_node: accelerators per node.
        cpus_per_node: CPUs of such a node (the cloud instance named in ``source``).
        max_num_seqs: vLLM's default ``max_num_seqs`` on it (``EngineArgs.get_batch_defaults``).
        bf16: it computes in bfloat16 (else float16).
        source: the datasheet and instance the numbers come from.
    """

    name: str
    memory_gib: float
    peak_tflops: float
    bandwidth_gbs: float
    per_node: int
    cpus_per_node: int
    max_num_seqs: int
    bf16: bool = True
    source: str = ""

    @property
    def is_gpu(self) -> bool:
        return self.name != "cpu"


GPU_TYPES: dict[str, Hardware] = {
    h.name: h
    for h in (
        Hardware("h100", 80, 989, 3350, 8, 192, 1024, source="NVIDIA H100 SXM5 datasheet; AWS p5.48xlarge"),
        Hardware("h200", 141, 989, 4800, 8, 192, 1024, source="NVIDIA H200 SXM datasheet; AWS p5en.48xlarge"),
        Hardware("a100-80gb", 80, 312, 2039, 8, 96, 256, source="NVIDIA A100 SXM4 80GB datasheet; AWS p4de.24xlarge"),
        Hardware("a100-40gb", 40, 312, 1555, 8, 96, 256, source="NVIDIA A100 SXM4 40GB datasheet; AWS p4d.24xlarge"),
        Hardware("l40s", 48, 362, 864, 8, 192, 256, source="NVIDIA L40S datasheet; AWS g6e.48xlarge"),
        Hardware("l4", 24, 121, 300, 8, 192, 256, source="NVIDIA L4 datasheet; AWS g6.48xlarge"),
        Hardware("a10g", 24, 70, 600, 8, 192, 256, source="NVIDIA A10G (AWS); g5.48xlarge"),
        Hardware("v100", 32, 125, 900, 8, 96, 256, bf16=False, source="NVIDIA V100 SXM2 datasheet; AWS p3dn.24xlarge"),
    )
}
"""Known accelerators by ``--gpu-type``; ``cpu`` (:func:`cpu_hardware`) is this machine's CPUs."""

CPU_GFLOPS_PER_CORE = {"avx512": 100.0, "avx2": 50.0}
"""Sustained matmul GFLOP/s of one core (16 / 8 fp32 lanes, two FMA units, ~2.5 GHz, at half of peak)."""
CPU_BANDWIDTH_GBS_PER_CORE = 8.0
"""Memory bandwidth one core draws (a server's channels shared by its cores)."""


def cpu_hardware() -> Hardware:
    """This machine's CPUs as one engine's hardware: rough, ``--calibrate`` measures them instead."""
    import psutil

    from vidlm.engine import cpu_flags

    cores = os.cpu_count() or 1
    per_core = CPU_GFLOPS_PER_CORE["avx512" if "avx512f" in cpu_flags() else "avx2"]
    return Hardware(
        "cpu",
        memory_gib=psutil.virtual_memory().total / GiB,
        peak_tflops=cores * per_core / 1000,
        bandwidth_gbs=cores * CPU_BANDWIDTH_GBS_PER_CORE,
        per_node=1,
        cpus_per_node=cores,
        max_num_seqs=256,
        source=f"this machine: {cores} cores, {per_core:.0f} GFLOP/s and {CPU_BANDWIDTH_GBS_PER_CORE:.0f} GB/s each",
    )


def hardware(name: str) -> Hardware:
    """The hardware of ``--gpu-type``.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name == "cpu":
        return cpu_hardware()
    if name not in GPU_TYPES:
        raise ValueError(f"unknown --gpu-type {name!r}; known: {', '.join([*GPU_TYPES, 'cpu'])}")
    return GPU_TYPES[name]


def dtype_bytes(dtype: str) -> int:
    """Bytes of one value: 2 for ``bfloat16`` / ``float16`` (and ``auto`` on a GPU), 4 for ``float32``."""
    return 4 if dtype in ("float32", "fp32") else 2


def frames_per_clip(sampling, seconds: float) -> int:
    """Frames :func:`vidlm.sampling.sample_frame_indices` returns for a clip of ``seconds`` (a 30 fps video).

    Args:
        sampling: a :class:`~vidlm.sampling.SamplingConfig`.
        seconds: the clip window's length.
    """
    if sampling.mode != "fps":
        return sampling.num_frames
    if sampling.force_sample:
        return sampling.max_frames
    return max(1, min(sampling.max_frames, math.ceil(seconds * sampling.fps)))


@dataclass(frozen=True)
class ModelCosts:
    """The sizes of a video LLM that its FLOPs and bytes follow from.

    Args:
        vision_params / projector_params / llm_params: parameters per part (the LLM's embeddings included).
        llm_matmul_params: weights of the LLM's linear layers (the LM head included): ``2x`` this is its FLOPs
            per token.
        layers / hidden / kv_heads / head_dim: the LLM's.
        vision_layers / vision_hidden: the tower's.
        patches_per_frame: tokens the tower sees per frame (patches, plus a class token where it has one).
    """

    vision_params: int
    projector_params: int
    llm_params: int
    llm_matmul_params: int
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    vision_layers: int
    vision_hidden: int
    patches_per_frame: int

    @property
    def total_params(self) -> int:
        return self.vision_params + self.projector_params + self.llm_params

    def kv_bytes_per_token(self, value_bytes: int) -> int:
        """KV cache bytes of one token: keys and values of every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * value_bytes

    def prefill_flops(self, tokens: int) -> float:
        """FLOPs of prefilling ``tokens`` prompt tokens (causal attention: each token sees half the prompt)."""
        return 2 * self.llm_matmul_params * tokens + 2 * self.layers * self.hidden * tokens**2

    def encode_flops(self, frames: int) -> float:
        """FLOPs of the vision tower and projector on ``frames`` frames."""
        n = self.patches_per_frame
        tower = 2 * self.vision_params * n + 4 * self.vision_layers * self.vision_hidden * n**2
        return frames * (tower + 2 * self.projector_params * n)


def model_costs(config) -> ModelCosts:
    """The :class:`ModelCosts` of a :class:`~vidlm.models.video_llm.VidlmConfig`, counted without weights."""
    import torch
    from torch import nn

    from vidlm.models.video_llm import VidlmForConditionalGeneration

    with torch.device("meta"):
        model = VidlmForConditionalGeneration(config)

    def count(module) -> int:
        return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values()) if module is not None else 0

    llm = model.language_model
    matmul = sum(m.weight.numel() for m in llm.modules() if isinstance(m, nn.Linear))
    text, vision = config.text_config, config.vision_config
    grid = vision.image_size // vision.patch_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return ModelCosts(
        vision_params=count(getattr(model, "vision_tower", None)),
        projector_params=count(getattr(model, "projector", None)),
        llm_params=count(llm),
        llm_matmul_params=int(matmul),
        layers=int(text.num_hidden_layers),
        hidden=int(text.hidden_size),
        kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=int(head_dim),
        vision_layers=int(vision.num_hidden_layers),
        vision_hidden=int(vision.hidden_size),
        patches_per_frame=grid * grid + (1 if vision.model_type.startswith("clip") else 0),
    )


@dataclass(frozen=True)
class EngineModel:
    """One vLLM engine (``tensor_parallel`` accelerators) running clips of one shape, from first principles.

    Args:
        costs: the model's sizes.
        hw: the accelerator.
        value_bytes: bytes per weight and KV value (the engine dtype's).
        tensor_parallel: accelerators per engine.
        frames: frames per clip.
        prompt_tokens: prompt tokens per request (visual + text).
        output_tokens: output tokens per request.
        requests_per_clip: prompt templates per clip.
        in_flight: requests the job keeps in one engine (clips in flight x templates).
    """

    costs: ModelCosts
    hw: Hardware
    value_bytes: int
    tensor_parallel: int
    frames: int
    prompt_tokens: int
    output_tokens: int
    requests_per_clip: int
    in_flight: int

    @property
    def weight_bytes(self) -> int:
        return self.costs.total_params * self.value_bytes

    @property
    def sequence_bytes(self) -> int:
        """KV cache of one request at its full length."""
        return (self.prompt_tokens + self.output_tokens) * self.costs.kv_bytes_per_token(self.value_bytes)

    @property
    def usable_bytes(self) -> float:
        """Memory the engine may fill: :data:`GPU_MEMORY_UTILISATION` of its GPUs (all of a CPU node's KV budget)."""
        share = GPU_MEMORY_UTILISATION if self.hw.is_gpu else 1.0
        return self.tensor_parallel * self.hw.memory_gib * GiB * share

    @property
    def batch(self) -> int:
        """Sequences vLLM runs at once: the job's in-flight requests, its ``max_num_seqs``, the KV that fits."""
        fits = int(max(self.usable_bytes - self.weight_bytes, 0) // max(self.sequence_bytes, 1))
        return max(0, min(self.in_flight, self.hw.max_num_seqs * self.tensor_parallel, fits))

    @property
    def memory_bytes(self) -> int:
        """Weights plus the KV cache of :attr:`batch` sequences."""
        return self.weight_bytes + self.batch * self.sequence_bytes

    @property
    def peak_flops(self) -> float:
        return self.tensor_parallel * self.hw.peak_tflops * 1e12

    def seconds_per_clip(self) -> dict[str, float]:
        """Engine seconds per clip by phase (``encode``, ``prefill``, ``decode-tokens``) at full load."""
        encode = self.costs.encode_flops(self.frames) / (self.peak_flops * PREFILL_MFU)
        prefill = (
            self.requests_per_clip * self.costs.prefill_flops(self.prompt_tokens) / (self.peak_flops * PREFILL_MFU)
        )
        b = max(self.batch, 1)
        context = self.prompt_tokens + self.output_tokens / 2
        step_bytes = self.costs.llm_params * self.value_bytes + b * context * self.costs.kv_bytes_per_token(
            self.value_bytes
        )
        bandwidth = self.tensor_parallel * self.hw.bandwidth_gbs * 1e9 * BANDWIDTH_UTILISATION
        step_flops = b * (2 * self.costs.llm_matmul_params + 4 * self.costs.layers * self.costs.hidden * context)
        step = max(step_bytes / bandwidth, step_flops / (self.peak_flops * PREFILL_MFU))
        tokens = self.requests_per_clip * self.output_tokens * step / b
        return {"encode": encode, "prefill": prefill, "decode-tokens": tokens}

    def startup_seconds(self) -> float:
        """Engine start: :data:`ENGINE_START_S` plus reading the weights at :data:`LOAD_GB_PER_S`."""
        return ENGINE_START_S + self.weight_bytes / (LOAD_GB_PER_S * 1e9)


def smallest_tensor_parallel(build, start: int, per_node: int, needed: int) -> EngineModel:
    """The engine with the fewest accelerators (``start``, then doubling up to a node) that holds ``needed``
    sequences besides its weights; at a node's worth, whatever it holds.

    Args:
        build: ``tensor_parallel -> EngineModel``.
    """
    tp = start
    while True:
        engine = build(tp)
        if engine.batch >= needed or tp * 2 > max(per_node, start):
            return engine
        tp *= 2


@dataclass
class Plan:
    """A plan: named values (``--json`` prints them as one object), the assumptions, and how to print them.

    Args:
        title: the table's title.
        values: name -> value (numbers, strings); the printed rows and the JSON object.
        units: name -> unit printed beside the value.
        assumptions: lines under the table, each an assumption the numbers rest on.
    """

    title: str
    values: dict[str, Any] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    assumptions: list[str] = field(default_factory=list)

    def add(self, name: str, value: Any, unit: str = "") -> None:
        self.values[name] = value
        if unit:
            self.units[name] = unit

    def to_json(self) -> dict[str, Any]:
        return {**self.values, "assumptions": list(self.assumptions)}

    def rows(self) -> list[tuple[str, str]]:
        """``(name, value unit)`` rows: floats with three significant digits, thousands separated."""

        def show(value: Any) -> str:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return str(value)
            if isinstance(value, int):
                return f"{value:,}"
            return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"

        return [(name, f"{show(v)} {self.units.get(name, '')}".strip()) for name, v in self.values.items()]


def quiet_stdout(as_json: bool):
    """With ``--json``, what libraries print while planning (DeepSpeed's, Ray's forwarded logs) goes to stderr, so
    stdout holds the one JSON object."""
    return contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()


def finish(plan: Plan, as_json: bool):
    """Print ``plan`` as one JSON object (``--json``, returns ``None``), or return its table
    (a :class:`vidlm.jobs.Report`)."""
    from vidlm.jobs import Report

    if as_json:
        print(json.dumps(plan.to_json()))
        return None
    return Report(plan.title, plan.rows(), lines=[f"[dim]{line}[/]" for line in plan.assumptions])


def planned_dtype(engine, hw: Hardware) -> tuple[str, str]:
    """The engine dtype on ``hw``: :func:`vidlm.engine.engine_dtype` on CPUs, bf16 / fp16 by the GPU's datasheet."""
    from vidlm.engine import engine_dtype

    if not hw.is_gpu or engine.dtype != "auto":
        return engine_dtype(engine, on_gpu=hw.is_gpu)
    return ("bfloat16", f"{hw.name} computes in bfloat16") if hw.bf16 else ("float16", f"{hw.name} has no bfloat16")


def cluster_plan(
    plan: Plan,
    corpus,
    hw: Hardware,
    tp: int,
    clip_s: float,
    startup_s: float,
    decode_per_cpu: float,
    engine_cpus: float,
    engines: int,
    deadline_h: float | None,
) -> bool:
    """Engines, GPUs, decode CPUs, bottleneck, wall time: the cluster half of the recaption and features plans,
    added to ``plan``.

    Args:
        corpus: the clips (``clips`` count).
        hw: the accelerator and its node.
        tp: accelerators per engine.
        clip_s: engine (or encode actor) seconds per clip at full load.
        startup_s: seconds before the first clip.
        decode_per_cpu: clips one CPU decodes per second.
        engine_cpus: CPUs each engine reserves.
        engines: engines when there is no deadline.
        deadline_h: hours to finish within (the engines follow), or ``None``.

    Returns:
        Whether decode is short of CPUs (the engines wait on it).
    """
    if deadline_h is not None:
        budget = deadline_h * 3600 - startup_s
        if budget <= 0:
            raise ValueError(f"--deadline-h {deadline_h:g}: the start-up alone takes {startup_s:.0f} s")
        engines = max(1, math.ceil(corpus.clips * clip_s / budget))
    demand = engines / clip_s  # clips/s the engines take
    decode_cpus = math.ceil(demand / decode_per_cpu)
    nodes = math.ceil(engines * tp / hw.per_node)
    spare = max(nodes * hw.cpus_per_node - engines * engine_cpus, 0)
    rate = min(demand, spare * decode_per_cpu)
    wall = startup_s + corpus.clips / max(rate, 1e-12)
    plan.add("engines", engines)
    plan.add("gpus" if hw.is_gpu else "engine_nodes", engines * tp)
    plan.add("nodes", nodes, f"of {hw.per_node} x {hw.name}, {hw.cpus_per_node} CPUs each")
    plan.add("decode_clips_per_cpu_s", decode_per_cpu, "clips/s")
    plan.add("decode_cpus", decode_cpus, "CPUs to keep the engines fed")
    plan.add("decode_cpus_on_engine_nodes", int(spare), "CPUs")
    plan.add("clips_per_s", rate, "clips/s")
    plan.add("startup_s", startup_s, "s")
    plan.add("predicted_wall_s", wall, "s")
    plan.add("wall_h", wall / 3600, "h")
    plan.add("gpu_hours" if hw.is_gpu else "engine_node_hours", engines * tp * wall / 3600, "h")
    if deadline_h is not None:
        plan.add("deadline_met", wall <= deadline_h * 3600)
    if rate < demand:
        plan.assumptions.append(
            f"decode is short of {decode_cpus - spare:,.0f} CPUs on the engine nodes: add CPU nodes "
            "(decode.placement) to reach the engines' rate"
        )
    return rate < demand


def require_positive(**options: float | None) -> None:
    """Checks command-line counts and durations (keyword names are the options with ``-`` as ``_``).

    Raises:
        ValueError: naming the first option given (not ``None``) that is not positive.
    """
    for name, value in options.items():
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")


def cluster_hardware() -> str:
    """The hardware key of the connected cluster: ``cpu`` without GPUs, else the GPU type Ray names if known."""
    import ray

    from vidlm.cluster import num_gpus_in_cluster

    if not num_gpus_in_cluster():
        return "cpu"
    for key in ray.cluster_resources():  # Ray's accelerator_type:H100 resources
        name = key.removeprefix("accelerator_type:").lower()
        if key.startswith("accelerator_type:") and name in GPU_TYPES:
            return name
    return DEFAULT_GPU_TYPE
