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
import math
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray
from pydantic import Field
from ray.data import DataContext
from ray.data.checkpoint import CheckpointConfig

from vidlm import metrics
from vidlm.clips import TRANSIENT_ERRORS, ClipError, ManifestConfig, clips_table
from vidlm.cluster import Placement, retried_tasks
from vidlm.config import Section
from vidlm.decode import DecodeLimits, DecodeStrategy, decode_clip
from vidlm.jobs import Report
from vidlm.sampling import SamplingConfig
from vidlm.storage import arrow_files, location, makedirs

__all__ = [
    "DecodeConfig",
    "JobSummary",
    "OutputConfig",
    "arrow_table",
    "clean_null",
    "decode_frames",
    "exactly_once",
    "read_output_columns",
    "read_staged_clips",
    "rows_per_file",
    "stage_clips",
    "write_output",
    "write_staged",
    "written_clip_ids",
]


CLIP_ID = "clip_id"
"""The id column of the clip jobs (features, recaption): what exactly-once resume checkpoints on."""


class OutputConfig(Section):
    """How a job writes its parquet."""

    min_rows_per_file: int = Field(64, gt=0)
    """Rows gathered before a file is written (fewer files; at most about this many clips redone after a kill)."""
    write_num_cpus: float = Field(0.25, gt=0)
    """CPUs reserved per write task: small, so writes run beside decode and encode instead of after them."""
    replace: bool = False
    """A rerun on an output folder that holds another configuration's output deletes it and starts afresh
    (otherwise it is refused, naming the fields that differ; see ``pipelines/_output.py``)."""


class DecodeConfig(Section):
    """The CPU decode stage."""

    strategy: DecodeStrategy = "auto"
    """``auto`` (per clip, see vidlm.decode), ``seek``, ``sequential`` or ``pyav``."""
    batch_size: int = Field(2, gt=0)
    """Clips one decode task handles (Ray Data ``batch_size``)."""
    num_cpus: float = Field(1.0, gt=0)
    """CPUs reserved per decode task."""
    memory_gb: float = Field(0.5, gt=0)
    """Memory reserved per decode task (Ray ``memory``). Being a resource the model actors do not ask
    for, it also keeps Ray Data from fusing decode into them, so the stages overlap."""
    limits: DecodeLimits = DecodeLimits()
    """The largest video decoded (pixels per frame, seconds, frames, fps); a larger one is a ``too_large`` row."""
    placement: Placement = Placement()
    """Where decode tasks run (node labels, custom resources), e.g. ``label_selector: {vidlm/node-type: cpu}``."""
    max_retries: int = Field(8, ge=-1)
    """Times Ray runs a decode task again when its worker or node died (a lost node, a decoder that crashed the
    process); then the job fails, naming the task, instead of retrying a video that kills every worker forever
    (-1: Ray Data's default, forever). A decode that raises is an error row, never a retry."""

    def task_args(self) -> dict[str, Any]:
        """``map_batches`` keyword arguments of the decode tasks: CPUs, memory (bytes), retries and placement."""
        return {
            "num_cpus": self.num_cpus,
            "memory": int(self.memory_gb * 2**30),
            "max_retries": self.max_retries,
            **self.placement.ray_args(),
        }


def clean_null(value: Any) -> Any:
    """Ray's numpy batches carry nulls as None or NaN; arrow wants None."""
    return None if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)) else value


def decode_frames(
    batch: dict[str, np.ndarray],
    *,
    sampling: SamplingConfig,
    size: int,
    strategy: str,
    limits: DecodeLimits | None = None,
) -> dict:
    """Ray Data stage (CPU task): decode the sampled frames of each clip in the batch (``limits``: see
    :class:`vidlm.decode.DecodeLimits`; ``None``: its defaults).

    Input columns: those of :data:`vidlm.clips.CLIP_SCHEMA`. Adds ``frames (T, size, size, 3) uint8``,
    ``frame_times_s (T,) float64``, ``num_frames``, ``decoder``; clamps ``start_s`` / ``end_s`` to the
    video. A clip that fails gets ``error`` / ``error_type`` and ``T = 0``.
    """
    started = time.perf_counter()
    n = len(batch["clip_id"])
    frames, times, decoders = [], [], []
    start_s, end_s = list(batch["start_s"]), list(batch["end_s"])
    error, error_type = [clean_null(e) for e in batch["error"]], [clean_null(e) for e in batch["error_type"]]
    for i in range(n):
        clip = None
        if error_type[i] is None:
            try:
                clip = decode_clip(
                    batch["path"][i],
                    sampling,
                    size,
                    clean_null(start_s[i]),
                    clean_null(end_s[i]),
                    strategy=strategy,
                    clip_key=batch["clip_id"][i],
                    limits=limits,
                )
            except ClipError as err:
                error[i], error_type[i] = str(err), err.error_type.value
        if clip is None:
            frames.append(np.zeros((0, size, size, 3), np.uint8))
            times.append(np.zeros((0,), np.float64))
            decoders.append(None)
        else:
            frames.append(clip.frames)
            times.append(clip.frame_times_s)
            decoders.append(clip.backend)
            start_s[i], end_s[i] = clip.start_s, clip.end_s
    metrics.stage_seconds("decode", time.perf_counter() - started)
    return {
        **batch,
        "start_s": np.asarray(start_s, np.float64),
        "end_s": np.asarray(end_s, np.float64),
        "frames": frames,
        "frame_times_s": times,
        "num_frames": np.array([len(t) for t in times], np.int64),
        "decoder": np.array(decoders, dtype=object),
        "error": np.array(error, dtype=object),
        "error_type": np.array(error_type, dtype=object),
    }


def stage_clips(manifest: str | Path, cfg: ManifestConfig, out: Path, min_files: int) -> int:
    """Expand the manifest into clip rows and write them to ``out/clips`` as ``min_files``+ files.

    Several files give Ray Data several read tasks (one file is one block). The expansion is
    deterministic, so a rerun writes the same clips.

    Returns:
        The number of clips (error rows included).
    """
    table = clips_table(manifest, cfg)
    write_staged(table, out / "clips", min_files)
    return table.num_rows


def write_staged(table: pa.Table, folder: Path, min_files: int) -> None:
    """Replace the parquet files of ``folder`` with ``table`` split into ``min_files``+ files (rows in order).

    A job's input rows (clips, generation requests) staged this way are read by ``read_parquet``, which Ray
    Data's checkpoint filter needs, and several files give several read tasks. Files are named
    ``<folder name>-NNNNN.parquet``.
    """
    makedirs(folder)
    for old in folder.glob("*.parquet"):
        old.unlink()
    per_file = max(1, math.ceil(table.num_rows / max(1, min_files)))
    for i, start in enumerate(range(0, max(table.num_rows, 1), per_file)):
        pq.write_table(table.slice(start, per_file), str(folder / f"{folder.name}-{i:05d}.parquet"))


def read_staged_clips(out: Path, clips_per_block: int) -> ray.data.Dataset:
    """The clip rows :func:`stage_clips` wrote to ``out/clips``, ``clips_per_block`` rows per block.

    Ray Data coalesces small files into one read block; splitting it lets decode run in parallel tasks.
    """
    return ray.data.read_parquet(str(out / "clips")).repartition(target_num_rows_per_block=clips_per_block)


OBJECT_STORE_SHARE_PER_FILE = 1 / 32
"""The most of the cluster's object store that the rows of one output file may hold while the write gathers them.
Ray Data budgets half the object store across a job's operators; a write that waits for more bytes than its share
holds the upstream stage back, which then never produces the rows the write waits for (a stall, no error)."""


def rows_per_file(config: OutputConfig, row_bytes: int | None) -> int:
    """Rows gathered per output file: ``config.min_rows_per_file``, fewer when that many rows of ``row_bytes``
    bytes (an upper bound of one row's size; ``None``: small rows) would hold more than
    :data:`OBJECT_STORE_SHARE_PER_FILE` of the connected cluster's object store, or more than one Ray Data block
    (``DataContext.target_max_block_size``, 128 MiB by default). At least 1."""
    if not row_bytes:
        return config.min_rows_per_file
    store = ray.cluster_resources().get("object_store_memory", 0)
    limit = min(store * OBJECT_STORE_SHARE_PER_FILE, DataContext.get_current().target_max_block_size or math.inf)
    return max(1, min(config.min_rows_per_file, int(limit // row_bytes)))


def write_output(ds: ray.data.Dataset, folder: Path, config: OutputConfig, row_bytes: int | None = None) -> None:
    """Write a job's dataset as parquet into ``folder`` (``OUT/<results>``) with the write CPUs of ``config`` and
    :func:`rows_per_file` rows per file (``row_bytes``: an upper bound of one row's bytes), fenced by the run that
    owns ``OUT`` (:class:`pipelines._output.FencedParquetDatasink`)."""
    from pipelines._output import FencedParquetDatasink, current_run_id

    out = folder.parent
    run_id = current_run_id(out)
    if run_id is None:
        raise RuntimeError(f"{out} has no run recorded: write_output runs inside a job wrapped by owns_output")
    sink = FencedParquetDatasink(str(folder), str(out), run_id, rows_per_file(config, row_bytes))
    ds.write_datasink(sink, ray_remote_args={"num_cpus": config.write_num_cpus})


def arrow_table(columns: dict[str, Any], schema: pa.Schema) -> pa.Table:
    """One block of job output with a fixed schema, whatever nulls a batch holds.

    Args:
        columns: ``name -> per-row values`` for every field of ``schema`` (a numpy batch or lists): nulls as
            None or NaN (:func:`clean_null`); list fields as per-row arrays (e.g. ``frame_times_s (T,)``).
    """
    arrays = []
    for f in schema:
        values = columns[f.name]
        if pa.types.is_list(f.type):
            arrays.append(pa.array([np.asarray(v).tolist() for v in values], f.type))
        else:
            arrays.append(pa.array([clean_null(v) for v in values], f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


PENDING_SUFFIX = ".pending.parquet"
"""Ray Data's name of a checkpoint file before its commit (``ray.data.checkpoint.checkpoint_writer``)."""


def finish_interrupted_commits(checkpoint: Path) -> list[Path]:
    """Delete each pending checkpoint file of ``checkpoint`` whose committed twin exists; the deleted paths.

    Ray Data commits a checkpoint by moving ``X.pending.parquet`` to ``X.parquet`` after the data file is written.
    In object storage a move is a copy then a delete: a run killed between the two leaves both, and the next run's
    recovery, seeing the pending file, deletes the data file while the committed checkpoint still marks its rows
    written -- rows lost. Ray Data's own commit treats a committed file as committed (it only deletes the pending
    one); this does the same before the recovery runs.
    """
    if not checkpoint.exists():
        return []
    done = []
    for pending in checkpoint.glob(f"*{PENDING_SUFFIX}"):
        if (checkpoint / (pending.name.removesuffix(PENDING_SUFFIX) + ".parquet")).exists():
            pending.unlink()
            done.append(pending)
    return done


@contextlib.contextmanager
def exactly_once(out: Path, id_column: str = CLIP_ID) -> Iterator[None]:
    """Run the Ray Data job inside with checkpointing on ``id_column`` under ``out/_checkpoint`` (commits a killed
    run left half done are finished first: :func:`finish_interrupted_commits`)."""
    checkpoint = location(out) / "_checkpoint"
    finish_interrupted_commits(checkpoint)
    ctx = DataContext.get_current()
    previous = ctx.checkpoint_config
    ctx.checkpoint_config = CheckpointConfig(
        id_column=id_column,
        checkpoint_path=str(checkpoint),
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
    # the files of one output may differ in columns (a column a file lacks reads as nulls)
    schema = pa.unify_schemas([pq.read_schema(str(f)) for f in files])
    for name in columns:
        if name not in schema.names:
            schema = schema.append(pa.field(name, pa.int64()))
    filesystem, paths = arrow_files(files)
    return pads.dataset(paths, schema=schema, format="parquet", filesystem=filesystem).to_table(columns=columns)


def written_clip_ids(folder: Path, id_column: str = CLIP_ID) -> set[str]:
    """Row ids in the readable parquet files of ``folder`` (what a run finds before it starts)."""
    return set(read_output_columns(folder, [id_column], skip_unreadable=True).column(id_column).to_pylist())


def _readable(path: Path) -> bool:
    try:
        pq.read_metadata(str(path))
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
    retried_tasks: int | None = None  # tasks Ray ran again (a node lost...); None: no state API to ask

    def to_dict(self) -> dict:
        """JSON-ready fields (``out`` as a string)."""
        return {**asdict(self), "out": str(self.out)}

    def report(self, title: str, unit: str = "clips", lines: list[str] | None = None) -> Report:
        """The table the command line prints: output, counts by outcome, this run's rows and rates.

        Args:
            title: the table's title.
            unit: what a row of the output is (``clips``, ``videos``, ``requests``...).
            lines: printed after the table.
        """
        rows = [("output", str(self.out)), (f"{unit} in output", str(self.total)), ("ok", f"[green]{self.ok}[/]")]
        transient = {e.value for e in TRANSIENT_ERRORS}
        rows += [
            (f"failed: {kind}" + (" (transient: a rerun retries)" if kind in transient else ""), f"[red]{count}[/]")
            for kind, count in sorted(self.failed.items())
        ]
        rows.append(("written by this run", f"{self.new_clips} in {self.seconds:.1f} s"))
        if self.retried_tasks is not None:
            rows.append(("tasks retried (lost nodes or workers)", str(self.retried_tasks)))
        rows += [(name, f"{value:.2f}") for name, value in self.rates.items()]
        return Report(title, rows, lines=list(lines or []))

    @classmethod
    def collect(
        cls,
        out_dir: Path,
        before_ids: set[str],
        started: float,
        sum_columns: dict[str, str | list[str]],
        id_column: str = CLIP_ID,
    ) -> JobSummary:
        """Summarise ``out_dir`` after a run that started at ``started`` (``time.perf_counter``).

        ``retried_tasks`` comes from Ray's state API (:func:`vidlm.cluster.retried_tasks`) for this driver's job.

        Args:
            before_ids: row ids present before the run (to count this run's rows).
            sum_columns: ``{"frames/s": "num_frames"}``: rates of column sums over this run's clips
                (a list of columns: their sum, e.g. output tokens over several prompt templates).
        """
        seconds = time.perf_counter() - started
        columns = {name: [cols] if isinstance(cols, str) else list(cols) for name, cols in sum_columns.items()}
        wanted = list(dict.fromkeys(c for cols in columns.values() for c in cols))
        table = read_output_columns(out_dir, [id_column, "error_type", *wanted])
        ids = table.column(id_column).to_pylist()
        new_mask = [i not in before_ids for i in ids]
        errors = Counter(e for e in table.column("error_type").to_pylist() if e)
        new = sum(new_mask)
        rates = {f"{id_column.removesuffix('_id')}s/s": new / seconds if seconds > 0 else 0.0}
        for name, cols in columns.items():
            total = 0
            for col in cols:
                values = table.column(col).to_pylist() if table.num_rows else []
                total += sum(v or 0 for v, m in zip(values, new_mask, strict=True) if m)
            rates[name] = total / seconds if seconds > 0 else 0.0
        retried = retried_tasks() if ray.is_initialized() else None
        return cls(out_dir, len(ids), len(ids) - sum(errors.values()), dict(errors), new, seconds, rates, retried)
