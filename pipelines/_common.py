"""Wiring shared by the Ray Data jobs: staging clips, exactly-once resume, and the run summary.

Exactly once: each job reads its clips from parquet (``OUT/clips``), writes parquet (``OUT/<name>``)
and runs with Ray Data's checkpointing (``CheckpointConfig(id_column="clip_id")``). Ray records the
clip ids of every written file with a two-phase commit, deletes files whose commit never happened,
and on the next run filters the clips already written out of the read. So a run killed at any point
and rerun with the same ``--out`` ends with every clip once. The checkpoint is kept after success,
so a rerun of a finished job writes nothing.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray
from pydantic import Field
from ray.data import DataContext
from ray.data.checkpoint import CheckpointConfig

from vidlm.clips import ManifestConfig, clips_table
from vidlm.config import Section

logger = logging.getLogger(__name__)

__all__ = [
    "JobSummary",
    "OutputConfig",
    "check_cpu_budget",
    "exactly_once",
    "init_ray",
    "num_gpus_in_cluster",
    "read_output_columns",
    "resuming",
    "stage_clips",
]


class OutputConfig(Section):
    """How a job writes its parquet."""

    min_rows_per_file: int = Field(64, gt=0)
    """Rows gathered before a file is written (fewer files; at most this many clips redone after a kill)."""
    max_rows_per_file: int = Field(1000, gt=0)
    """Upper bound of rows per parquet file."""
    write_num_cpus: float = Field(0.25, gt=0)
    """CPUs reserved per write task: small, so writes run beside decode and encode instead of after them."""


def stage_clips(manifest: str | Path, cfg: ManifestConfig, out: Path, min_files: int) -> int:
    """Expand the manifest into clip rows and write them to ``out/clips`` as ``min_files``+ files.

    Several files give Ray Data several read tasks (one file is one block). The expansion is
    deterministic, so a rerun writes the same clips.

    Returns:
        The number of clips (error rows included).
    """
    table = clips_table(manifest, cfg)
    folder = out / "clips"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.parquet"):
        old.unlink()
    per_file = max(1, math.ceil(table.num_rows / max(1, min_files)))
    for i, start in enumerate(range(0, max(table.num_rows, 1), per_file)):
        pq.write_table(table.slice(start, per_file), folder / f"clips-{i:05d}.parquet")
    return table.num_rows


@contextlib.contextmanager
def exactly_once(out: Path) -> Iterator[None]:
    """Run the Ray Data job inside with checkpointing on ``clip_id`` under ``out/_checkpoint``."""
    ctx = DataContext.get_current()
    previous = ctx.checkpoint_config
    ctx.checkpoint_config = CheckpointConfig(
        id_column="clip_id",
        checkpoint_path=str((out / "_checkpoint").resolve()),
        delete_checkpoint_on_success=False,
    )
    try:
        yield
    finally:
        ctx.checkpoint_config = previous


def read_output_columns(folder: Path, columns: list[str], skip_unreadable: bool = False) -> pa.Table:
    """Read some plain columns of every parquet file a job wrote (empty table if none).

    Args:
        skip_unreadable: skip files that do not open -- a run killed mid-write leaves them, and the
            next run's checkpoint recovery deletes them.

    Raises:
        pyarrow.ArrowInvalid: an unreadable file when ``skip_unreadable`` is false.
    """
    files = sorted(folder.glob("*.parquet")) if folder.exists() else []
    if skip_unreadable:
        files = [f for f in files if _readable(f)]
    if not files:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    return pads.dataset([str(f) for f in files], format="parquet").to_table(columns=columns)


def _readable(path: Path) -> bool:
    try:
        pq.read_metadata(path)
    except (pa.ArrowInvalid, OSError):
        return False
    return True


@dataclass
class JobSummary:
    """What a job run did. Counts are over the whole output folder; rates over this run only."""

    out: Path
    total: int = 0
    ok: int = 0
    failed: dict[str, int] = field(default_factory=dict)  # error_type -> clips
    new_clips: int = 0  # clips written by this run
    seconds: float = 0.0  # wall time of this run
    rates: dict[str, float] = field(default_factory=dict)  # e.g. {"clips/s": 3.1, "frames/s": 50.0}

    def to_dict(self) -> dict:
        """JSON-ready fields (``out`` as a string)."""
        return {**asdict(self), "out": str(self.out)}

    @classmethod
    def collect(cls, out_dir: Path, before_ids: set[str], started: float, sum_columns: dict[str, str]) -> JobSummary:
        """Summarise ``out_dir`` after a run that started at ``started`` (``time.perf_counter``).

        Args:
            before_ids: clip ids present before the run (to count this run's clips).
            sum_columns: ``{"frames/s": "num_frames"}``: rates of column sums over this run's clips.
        """
        seconds = time.perf_counter() - started
        table = read_output_columns(out_dir, ["clip_id", "error_type", *sum_columns.values()])
        ids = table.column("clip_id").to_pylist()
        new_mask = [i not in before_ids for i in ids]
        errors = Counter(e for e in table.column("error_type").to_pylist() if e)
        new = sum(new_mask)
        rates = {"clips/s": new / seconds if seconds > 0 else 0.0}
        for name, col in sum_columns.items():
            values = table.column(col).to_pylist()
            rates[name] = sum(v or 0 for v, m in zip(values, new_mask, strict=True) if m) / seconds
        return cls(out_dir, len(ids), len(ids) - sum(errors.values()), dict(errors), new, seconds, rates)


CHECKPOINT_FILTER_CPUS = 1.0
"""CPUs that Ray Data's checkpoint-filter actor reserves on a resumed run (its default for actors)."""


READ_TASK_CPUS = 1.0
"""CPUs a Ray Data read task reserves (its default for tasks)."""


def resuming(out: Path) -> bool:
    """Whether ``out`` holds a checkpoint of an earlier run (so Ray Data will start its checkpoint filter)."""
    return any((out / "_checkpoint").glob("*"))


def init_ray() -> bool:
    """Connect to the cluster in ``RAY_ADDRESS``, or start a local one.

    Returns:
        True when the cluster is local to this process (started here, or by the caller's ``ray.init``
        without an address), False for a remote cluster, which may still autoscale.

    A local cluster gets one logical CPU more than the machine has: on a resumed run, Ray Data's
    checkpoint filter holds an actor with one CPU reserved that does almost no work, and on a
    2-core laptop that reservation plus one encode actor would leave no CPU for decoding.
    """
    remote = bool(os.environ.get("RAY_ADDRESS"))
    if ray.is_initialized():
        return not remote
    if remote:
        ray.init()
    else:
        ray.init(num_cpus=(os.cpu_count() or 1) + int(CHECKPOINT_FILTER_CPUS))
    return not remote


def check_cpu_budget(stages: dict[str, float], strict: bool, out: Path) -> None:
    """Refuse a plan whose stages cannot all hold their CPUs at once (Ray would wait forever).

    Args:
        stages: CPUs each stage holds at the same time, e.g. ``{"encode actors": 2, "one decode task": 1}``.
        strict: raise (a fixed local cluster); otherwise only warn (a remote cluster may autoscale).
        out: the job's output folder: a resumed run (a checkpoint under it) also holds the filter's CPU.

    Raises:
        ValueError: ``strict`` and the cluster has fewer CPUs than the stages plus the checkpoint filter need.
    """
    have = ray.cluster_resources().get("CPU", 0)
    need = dict(stages)
    if resuming(out):
        need["Ray Data checkpoint filter (resumed run)"] = CHECKPOINT_FILTER_CPUS
    if sum(need.values()) > have:
        parts = ", ".join(f"{k} {v:g}" for k, v in need.items())
        message = (
            f"the cluster has {have:g} CPUs but this job holds {sum(need.values()):g} at once ({parts}); "
            "lower encode.num_actors / encode.num_cpus / decode.num_cpus, or add CPUs"
        )
        if strict:
            raise ValueError(message)
        logger.warning("%s (continuing: the cluster may scale up)", message)


def num_gpus_in_cluster() -> int:
    """GPUs the connected Ray cluster has (0 on a laptop or CPU cluster)."""
    return int(ray.cluster_resources().get("GPU", 0))
