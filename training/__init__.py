"""Training on Ray Train + DeepSpeed (``vidlm train``) and multiple-choice evaluation (``vidlm eval mc``).

This module declares the two jobs for the command line (:mod:`vidlm.jobs`; registered in ``pyproject.toml``).
"""

from pathlib import Path

from training.plan import TRAIN_MFU
from vidlm.jobs import Job, Param
from vidlm.plan import DEFAULT_GPU_TYPE, GPU_TYPES

TRAIN = Job(
    "train",
    "Train a video LLM with Ray Train + DeepSpeed (TOPA pre-alignment, video instruction tuning, or caption-word "
    "pre-training of the vision tower).",
    run="training.trainer:train_job",
    config="training.config:TrainConfig",
    params=(
        Param("out", Path, "run folder (checkpoints, metrics, export/); rerun to resume", flags=("--out", "-o")),
        Param("plan", bool, "print the memory plan and exit (any model size)", flags=("--plan",), default=False),
    ),
)
EVAL_MC = Job(
    "eval mc",
    "Multiple-choice video QA (EgoSchema / MVBench layout): option loss (TOPA) and generation accuracy.",
    run="training.eval:eval_mc_job",
    params=(
        Param(
            "benchmark",
            Path,
            "JSONL: question, options, answer, video|features",
            flags=("--benchmark", "-b"),
            must_exist=True,
        ),
        Param("model", str, "vidlm model directory (e.g. runs/topa/export) or preset", flags=("--model", "-m")),
        Param("generate", bool, "also score by greedy generation", flags=("--generate/--no-generate",), default=True),
        Param("limit", int | None, "first N questions only", flags=("--limit",), default=None),
        Param(
            "modality_projection",
            bool,
            "project image features onto the model's TOPA memory (eq. 2); off: the ablation",
            flags=("--modality-projection/--no-modality-projection",),
            default=True,
        ),
        Param(
            "option_text",
            bool,
            "also score each option's own words as the answer to the question asked alone",
            flags=("--option-text/--no-option-text",),
            default=False,
        ),
    ),
)
PLAN_TRAIN = Job(
    "plan train",
    "Plan a training run: ZeRO-3 memory per rank, step time at a stated MFU, hours and GPU hours.",
    run="training.plan:plan_train_job",
    config="training.config:TrainConfig",
    params=(
        Param(
            "samples",
            int | None,
            "training sequences per epoch (default: the rows of data.train)",
            flags=("--samples",),
            default=None,
        ),
        Param(
            "gpu_type",
            str,
            f"{', '.join(GPU_TYPES)} or cpu",
            flags=("--gpu-type",),
            default=DEFAULT_GPU_TYPE,
        ),
        Param(
            "tokens_per_sample",
            int | None,
            "mean tokens per sequence (default: data.max_length)",
            flags=("--tokens-per-sample",),
            default=None,
        ),
        Param("mfu", float, "model FLOPs utilisation", flags=("--mfu",), default=TRAIN_MFU),
        Param("as_json", bool, "print one JSON object instead of a table", flags=("--json",), default=False),
    ),
    model_option=True,
)
