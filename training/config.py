"""``vidlm train``'s configuration: one YAML per recipe (``training/configs/*.yaml``) plus ``key=value`` overrides.

Three recipes share one trainer:

- ``topa``: TOPA text-only pre-alignment (TOPA §3): Tideos from ``vidlm textvid`` -- CLIP *text* features
  of textual frames -- with summary, open-ended QA and multiple-choice QA tasks mixed in every step; the
  LLM frozen, the projector and LoRA trained.
- ``video``: PLLaVA / LLaVA-Video instruction tuning on the patch features ``vidlm features`` writes
  (pooling or SlowFast in the model), LLaVA-style multi-turn conversations, loss on answers only.
- ``words``: caption-word pre-training of the vision tower and projector on a manifest's decoded clips, each
  classified into the words of its caption (:mod:`vidlm.models.caption_words`); the LLM frozen and not run. Its
  export is the model the ``video`` recipe then starts from (``model=OUT/export``).

The DeepSpeed JSON files are those of the LLaVA-NeXT / PLLaVA references (``training/configs/deepspeed``);
their ``"auto"`` values are filled from this config (:func:`training.trainer.fill_deepspeed_config`) by
transformers' ``HfTrainerDeepSpeedConfig``, as the Hugging Face Trainer does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from vidlm.clips import ManifestConfig
from vidlm.config import JobConfig, Section
from vidlm.models.lora import TrainableConfig

__all__ = ["TrainConfig", "TASKS"]

DEEPSPEED_DIR = Path(__file__).parent / "configs" / "deepspeed"
TASKS = ("summary", "qa", "mcq")
"""TOPA's tasks (TOPA §3.2): video summary, open-ended QA, multiple-choice QA."""


class DataConfig(Section):
    """Where the training rows come from and how they become token sequences."""

    train: str = ""
    """Parquet folder: ``vidlm textvid``'s Tideos (``topa``) or ``vidlm features``' output (``video``); or, for
    ``video``, a manifest file (any but ``.parquet``) whose clips are decoded as the model samples frames, in the
    training's ingest, so the vision tower can train (``trainable.vision_tower: full``); for ``words``, such a
    manifest only, its clips' ``caption`` the classes' words."""
    manifest: ManifestConfig = ManifestConfig()
    """How a manifest ``train`` is read (``video_root``, ``path_template``, ``sample``), as in the jobs."""
    max_length: int = Field(2048, gt=0)
    """Tokens per sequence (visual + text); longer sequences are cut on the right, after the visual tokens."""
    micro_batch_size: int = Field(1, gt=0)
    """Sequences per worker per forward pass (DeepSpeed ``train_micro_batch_size_per_gpu``)."""
    materialize: bool = False
    """Run the dataset's plan once, before the first step, into Ray's object store (Ray Data's ``materialize()``,
    spilled to disk past it), in the streamed order: the step count and every epoch read those blocks, so the
    workers do not train beside an ingest that reads (for a manifest, decodes) the clips again. For training sets
    that fit in the cluster's object store; ``False`` streams them through Ray Train's ingest."""
    shuffle_buffer: int = Field(0, ge=0)
    """Rows in each worker's local shuffle buffer (0: the dataset's order); seeded by ``seed`` and the epoch."""
    tasks: tuple[Literal["summary", "qa", "mcq"], ...] = TASKS
    """``topa``: tasks made from each Tideo (mixed within each step by the shuffle)."""
    memory: str | None = None
    """``topa``: TOPA's memory of CLIP text features (``vidlm textvid``'s ``OUT/memory.npy``, ``(K, D)``). The
    model trains with it and the checkpoint and ``OUT/export`` carry it, so every inference path projects image
    features onto it (TOPA eq. 2); ``None``: the model's own memory, if any."""
    caption_prompt: str = "Describe the video in detail."
    """``video``: the instruction of a clip that has a caption but no ``conversations``."""


class OptimConfig(Section):
    """AdamW with linear warm-up and cosine decay (DeepSpeed ``WarmupCosineLR``)."""

    lr: float = Field(2e-5, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps to stop after (``None``: ``epochs`` full passes)."""
    vision_tower_lr: float | None = Field(None, gt=0, allow_inf_nan=False)
    """Peak learning rate of the vision tower's parameters (LLaVA-NeXT's ``mm_vision_tower_lr``, e.g. 2e-6 against
    an ``lr`` of 1e-5), an AdamW parameter group on the same schedule; ``None``: ``lr``. Needs
    ``trainable.vision_tower: full``."""
    projector_lr: float | None = Field(None, gt=0, allow_inf_nan=False)
    """Peak learning rate of the projector and the visual position embedding (LLaVA-NeXT's ``mm_projector_lr``);
    ``None``: ``lr``. Needs ``trainable.projector: full``."""


class DeepSpeedSection(Section):
    """Which DeepSpeed config, and the precision that fills its ``"auto"``."""

    config: str = str(DEEPSPEED_DIR / "zero3.json")
    """A DeepSpeed JSON: ``zero2.json``, ``zero3.json``, ``zero3_offload.json`` (shipped) or your own."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """``auto``: bf16 on GPU, fp32 on CPU."""


class ScalingSection(Section):
    """Ray Train workers and the devices they declare."""

    num_workers: int = Field(2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How the workers' placement group lays them on nodes (Ray Train ``ScalingConfig.placement_strategy``): ``PACK``
    fills a node first; ``SPREAD`` puts them on different nodes where it can (a lost node then takes one worker)."""
    device_memory_gb: float | None = Field(None, gt=0)
    """Memory of one device (GPU, or a CPU worker's RAM); the memory plan refuses a config above it."""


class CheckpointSection(Section):
    """Checkpoints through ``ray.train.report`` and restarts after failures."""

    every_steps: int | None = Field(None, gt=0)
    """Optimizer steps between checkpoints (``None``: at the end of each epoch); the last step is always one."""
    num_to_keep: int = Field(2, gt=0)
    max_failures: int = Field(3, ge=-1)
    """Worker-group restarts from the latest checkpoint (Ray Train ``FailureConfig``; -1: no limit)."""
    storage_path: str | None = None
    """Where Ray Train keeps the checkpoints (``RunConfig.storage_path``): a folder every node reaches, or an object
    storage URI (``s3://bucket/prefix``, ``gs://...``; Ray Train uploads each rank's shard there and downloads it on a
    restart, on any node). ``None``: ``OUT`` (a shared file system on a cluster). Metrics, the export and the adapter
    stay in ``OUT``."""


class ExportSection(Section):
    """The consolidated checkpoint written at the end of a run (``OUT/export``)."""

    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """LoRA is merged into the exported weights at the training alpha, so ``from_pretrained`` and vLLM load a
    plain model; the adapter is also kept in ``OUT/adapter`` (``vidlm merge --alpha 4`` mixes it as PLLaVA §3.4)."""


class TrainConfig(JobConfig):
    """``vidlm train``: one YAML of this shape, plus ``key=value`` overrides."""

    recipe: Literal["topa", "video", "words"] = "topa"
    model: str = "tiny-topa"
    """The model to start from: a preset name (``tiny-topa``, ``tiny-video``...) or a model directory."""
    seed: int = 0
    trainable: TrainableConfig = TrainableConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    scaling: ScalingSection = ScalingSection()
    checkpoint: CheckpointSection = CheckpointSection()
    export: ExportSection = ExportSection()

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if not self.data.tasks:
            raise ValueError("data.tasks must name at least one of " + ", ".join(TASKS))
        if self.recipe == "words" and self.trainable.llm != "frozen":
            raise ValueError(f"recipe words runs no LLM: trainable.llm must be frozen, got {self.trainable.llm}")
        for part, lr in (("vision_tower", self.optim.vision_tower_lr), ("projector", self.optim.projector_lr)):
            if lr is not None and getattr(self.trainable, part) != "full":
                raise ValueError(
                    f"optim.{part}_lr={lr:g} needs trainable.{part}: full, got {getattr(self.trainable, part)}"
                )
        return self

    @property
    def bf16(self) -> bool:
        """Train in bf16 (DeepSpeed ``bf16.enabled``): ``precision: auto`` means on GPU only."""
        return self.deepspeed.precision == "bf16" or (self.deepspeed.precision == "auto" and self.scaling.use_gpu)
