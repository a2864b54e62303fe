"""What a training checkpoint holds besides DeepSpeed's state, and the checks a resume runs.

Each Ray Train checkpoint folder (every rank writes its own, Ray Train merges them) holds:

- ``zero/``: DeepSpeed's engine state (each rank its ZeRO shard), client state ``{"position": ...}`` (epoch,
  batch, step, attempt);
- ``rng/rank{R}.pt``: the RNG states of rank ``R`` (torch CPU and CUDA, numpy, python), so dropout (LoRA's
  included) continues after a restart exactly as in an uninterrupted run;
- ``vidlm_checkpoint.json`` (rank 0): ``{"world_size", "step", "config"}``, what a resume must keep
  (:func:`resume_record`): the config's fields and the digests of the files the run reads -- the model's, and
  ``data.train``'s and ``data.memory``'s (:func:`~vidlm.storage.files_digest`).

Rank 0 also keeps ``OUT/checkpoint.json`` (the same record), which :func:`check_resume` compares with a new
run's before any worker starts: a rerun with another world size, another training config, or other files at the
same paths (a corpus regenerated, a base model retrained) stops with what differs, rather than resuming a model
trained on other data. A checkpoint that does not load (a partial folder, a missing rank) stops the worker with
a :class:`CheckpointError` naming what is missing.

Each rank stages its shard in ``OUT/.staging`` -- on the checkpoint storage's file system, not the local temporary
directory -- after checking that the file system has room for it (:func:`staging_dir`).
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vidlm.config import ConfigError, config_differences, flat_fields
from vidlm.models.presets import model_digest
from vidlm.storage import files_digest
from vidlm.writers import write_atomic

__all__ = [
    "CheckpointError",
    "CheckpointMismatch",
    "check_resume",
    "load_checkpoint",
    "resume_fields",
    "resume_record",
    "save_checkpoint",
    "staging_dir",
]

TAG = "zero"  # DeepSpeed checkpoint tag inside each Ray checkpoint directory
META = "vidlm_checkpoint.json"
OUT_META = "checkpoint.json"
STAGING = ".staging"
RESUME_FREE_SECTIONS = ("checkpoint", "export", "scaling")
"""Config sections a resumed run may change (how often it checkpoints, how it exports, its resources)."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from: unreadable, partial, or missing a rank's part."""


class CheckpointMismatch(ConfigError):
    """A rerun whose world size or training config differs from the checkpoint's."""


def resume_fields(config) -> dict[str, Any]:
    """The fields of a :class:`~training.config.TrainConfig` a resumed run must keep (``flat_fields`` form)."""
    return flat_fields(config, skip_sections=RESUME_FREE_SECTIONS)


def resume_record(config, model_dir: str | Path) -> dict[str, Any]:
    """What a resumed run must keep: :func:`resume_fields`, and ``"<input>_sha256"`` digests of the files it reads
    (``model``: the directory ``model_dir``; ``data.train``: :func:`~training.data.train_files`; ``data.memory``).

    Raises:
        FileNotFoundError: ``data.train`` or ``data.memory`` is missing.
    """
    from training.data import train_files

    files = train_files(config)
    train = Path(config.data.train)
    record = {
        **resume_fields(config),
        "model_sha256": model_digest(Path(model_dir)),
        "data.train_sha256": files_digest(files, train if train.is_dir() else train.parent),
    }
    if config.data.memory:
        memory = Path(config.data.memory)
        record["data.memory_sha256"] = files_digest([memory], memory.parent)
    return record


def check_resume(out: Path, world_size: int, record: dict[str, Any]) -> None:
    """Before the workers start: refuse to resume ``OUT``'s checkpoint with another world size, or another
    :func:`resume_record` ``record``.

    Raises:
        CheckpointMismatch: naming the world sizes, each config field that differs, and the inputs whose files
            changed.
    """
    path = out / OUT_META
    if not path.is_file():
        return
    try:
        meta = json.loads(path.read_text())
        world, recorded = int(meta["world_size"]), dict(meta["config"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointMismatch(f"{path} is unreadable ({err}); give another --out, or delete {out}") from None
    if world != world_size:
        raise CheckpointMismatch(
            f"{out} holds a checkpoint of {world} workers (ZeRO shards per rank); this run has "
            f"scaling.num_workers={world_size}: set it to {world}, or give another --out"
        )
    digests = {key for key in set(recorded) | set(record) if key.endswith("_sha256")}
    changed = config_differences(
        {k: v for k, v in recorded.items() if k not in digests}, {k: v for k, v in record.items() if k not in digests}
    )
    changed += [
        f"{key.removesuffix('_sha256')}: "
        + (
            "its files changed since the checkpoint"
            if key in recorded
            else "the checkpoint records no digest of its files"
        )
        for key in sorted(digests)
        if recorded.get(key) != record.get(key)
    ]
    if changed:
        raise CheckpointMismatch(
            f"{out} holds a checkpoint of another training config; differences (checkpoint -> now): "
            f"{'; '.join(changed)}. Give another --out to train afresh"
        )


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _state_bytes(engine) -> int:
    """Bytes this rank's checkpoint holds about: its parameter partition, and fp32 master + Adam moments for
    the trainable part (12 bytes per element)."""
    total = 0
    for p in engine.module.parameters():
        held = p.ds_tensor if hasattr(p, "ds_tensor") else p
        total += held.numel() * held.element_size() + (held.numel() * 12 if p.requires_grad else 0)
    return total


def staging_dir(engine, out: Path) -> tempfile.TemporaryDirectory:
    """A temporary folder in ``OUT/.staging`` for this rank's shard, once the file system has room for it.

    Raises:
        OSError: less free space than the shard needs (its estimate and the free bytes in the message).
    """
    root = out / STAGING
    root.mkdir(parents=True, exist_ok=True)
    needed, free = int(_state_bytes(engine) * 1.2) + 2**26, shutil.disk_usage(root).free
    if free < needed:
        raise OSError(
            f"no room to stage a checkpoint shard in {root}: it needs about {needed / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB are free"
        )
    return tempfile.TemporaryDirectory(dir=root)


def save_checkpoint(
    engine, folder: Path, position: dict, rank: int, world_size: int, record: dict[str, Any], out: Path
) -> None:
    """Write this rank's part of a checkpoint into ``folder``: DeepSpeed's state, its RNG states, and (rank 0)
    the run's :func:`resume_record` ``record``, which :func:`check_resume` and :func:`load_checkpoint` read."""
    engine.save_checkpoint(str(folder), tag=TAG, client_state={"position": position})
    (folder / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), folder / "rng" / f"rank{rank}.pt")
    if rank == 0:
        meta = json.dumps({"world_size": world_size, "step": position["step"], "config": record})
        (folder / META).write_text(meta)
        write_atomic(out / OUT_META, meta)


def load_checkpoint(engine, folder: Path, rank: int, world_size: int) -> dict:
    """Restore DeepSpeed's state and this rank's RNG states from ``folder``; the data position to resume from.

    Raises:
        CheckpointError: the folder lacks the record, the rank's RNG states or DeepSpeed's state, was written by
            another number of workers, or DeepSpeed cannot read it.
    """
    meta_path, rng_path = folder / META, folder / "rng" / f"rank{rank}.pt"
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {folder} is partial: it has no {META}")
    meta = json.loads(meta_path.read_text())
    if meta.get("world_size") != world_size:
        raise CheckpointError(
            f"checkpoint {folder} was written by {meta.get('world_size')} workers; this group has {world_size}"
        )
    if not rng_path.is_file():
        raise CheckpointError(f"checkpoint {folder} is partial: rank {rank}'s RNG states ({rng_path.name}) are missing")
    try:
        load_path, client = engine.load_checkpoint(str(folder), tag=TAG)
    except (OSError, RuntimeError, ValueError, KeyError, EOFError) as err:
        raise CheckpointError(f"checkpoint {folder} is unreadable: {type(err).__name__}: {err}") from err
    if load_path is None or not isinstance(client, dict) or "position" not in client:
        raise CheckpointError(f"checkpoint {folder} is partial: DeepSpeed found no engine state under {TAG}/")
    _set_rng_state(torch.load(rng_path, weights_only=False))
    return client["position"]
