"""One job per output folder, one configuration per output, and transient error rows retried by a rerun.

:func:`owns_output` wraps a job's ``run_*`` function. Before the job touches ``OUT``, it

1. takes ``OUT/.vidlm.lock`` (``filelock``: an OS lock, so the lock of a killed job is gone with its process --
   no stale lock is left behind to detect); a second job on the same ``OUT`` is refused with who holds it
   (:class:`OutputInUse`), before it can delete the first one's staged input or pending checkpoints. Object
   storage (``OUT`` an ``s3://`` or ``gs://`` URI) has no lock: there the fence below is what holds -- the later
   of two jobs owns ``OUT`` and the earlier one's writes fail (:class:`StaleRunError`) without a duplicate row;
2. when ``OUT`` holds rows, compares the configuration that decides them (:func:`output_record`: the job, every
   config field but how the work is spread -- batch sizes, CPUs, engine counts, file sizes, the report -- and the
   digest of the model's files, :func:`~vidlm.models.presets.model_digest`, so a model retrained in the same folder
   counts as another) with the one recorded in ``OUT/run.json``; a different one is refused with the fields that
   differ (:class:`OutputMismatch`), unless ``output.replace`` starts the output afresh;
3. deletes the rows whose ``error_type`` is transient (:data:`vidlm.clips.TRANSIENT_ERRORS`) from the output
   and their ids from Ray Data's checkpoint, so this run generates them again; permanent errors stay;
4. records a new run id in ``OUT/run.json``. Output files are written by :class:`FencedParquetDatasink`, which
   checks before writing a file and again after it (before Ray Data commits it) that its run still owns ``OUT``;
   a leftover worker of a killed run finds another run id, writes nothing or deletes what it wrote, and fails.
   A run that follows a killed one waits :data:`FENCE_GRACE_S` after taking ``OUT`` over, before Ray Data's
   recovery reads the checkpoint, so a leftover past its second check has committed by then.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from filelock import FileLock, Timeout
from ray.data.datasource import BlockBasedFileDatasink, FilenameProvider

from vidlm.clips import TRANSIENT_ERRORS
from vidlm.config import ConfigError, config_differences, flat_fields
from vidlm.storage import is_remote, location, makedirs, remove
from vidlm.writers import write_atomic

__all__ = [
    "LOCK_FILE",
    "RUN_FILE",
    "FencedParquetDatasink",
    "OutputInUse",
    "OutputMismatch",
    "StaleRunError",
    "current_run_id",
    "output_record",
    "owns_output",
    "retry_transient",
]

LOCK_FILE, OWNER_FILE, RUN_FILE = ".vidlm.lock", ".vidlm.owner", "run.json"

OPERATIONAL = frozenset(
    {
        "batch_size",
        "num_cpus",
        "memory_gb",
        "num_engines",
        "max_concurrent_batches",
        "num_actors",
        "in_encode_actors",
        "write_num_cpus",
        "min_rows_per_file",
        "replace",
        "placement",
        "max_retries",
    }
)
"""Config fields (by name, at any depth, with what is under them) that spread the work without changing a row."""
OPERATIONAL_SECTIONS = ("output", "report")


FENCE_GRACE_S = 2.0
"""Seconds a run that follows a killed one waits after recording its run id (see the module docstring)."""


class OutputInUse(RuntimeError):
    """Another job holds the output folder."""


class OutputMismatch(ConfigError):
    """The output folder holds the output of a different configuration."""


def _model_hash(model: str) -> str | None:
    """:func:`~vidlm.models.presets.model_digest` of the model's directory, ``None`` for a paper preset (no
    weights) or a path that is not a model."""
    from vidlm.models.presets import model_digest, resolve_model

    try:
        return model_digest(resolve_model(model))
    except (ValueError, FileNotFoundError):
        return None


def output_record(job: str, config) -> dict[str, Any]:
    """What decides how a job writes a row: ``{"job", "model_sha256", "<dotted config field>": value...}``.

    The input is not part of it: a rerun on a longer manifest adds the new clips' rows to the same output.

    Args:
        job: the job's name.
        config: its :class:`~vidlm.config.JobConfig`.
    """
    record = {"job": job, **flat_fields(config, OPERATIONAL, OPERATIONAL_SECTIONS)}
    if isinstance(getattr(config, "model", None), str):
        record["model_sha256"] = _model_hash(config.model)
    return record


def retry_transient(results: Path, checkpoint: Path, id_column: str) -> int:
    """Delete the transient error rows of ``results`` and their ids from the checkpoint ``checkpoint``.

    Each file is rewritten whole, then renamed over the old one, so a kill leaves either version.

    Returns:
        The rows deleted (the next run of the job generates them again).
    """
    transient = pa.array(sorted(e.value for e in TRANSIENT_ERRORS))
    retried: set = set()
    for path in sorted(results.glob("*.parquet")) if results.is_dir() else []:
        try:
            table = pq.read_table(str(path))
        except (pa.ArrowInvalid, OSError):
            continue  # a file a killed run left half-written: Ray's recovery deletes it
        if "error_type" not in table.column_names:
            continue
        failed = pc.fill_null(pc.is_in(table["error_type"].cast(pa.string()), transient), False)
        if not pc.any(failed).as_py():
            continue
        retried.update(table.filter(failed)[id_column].to_pylist())
        _replace_table(path, table.filter(pc.invert(failed)))
    if retried:
        ids = pa.array(sorted(retried))
        for path in sorted(checkpoint.glob("*.parquet")) if checkpoint.is_dir() else []:
            table = pq.read_table(str(path))
            if id_column in table.column_names:
                keep = pc.invert(pc.is_in(table[id_column], ids))
                if not pc.all(keep).as_py():
                    _replace_table(path, table.filter(keep))
    return len(retried)


def _replace_table(path: Path, table: pa.Table) -> None:
    if table.num_rows == 0:
        path.unlink()
        return
    if is_remote(path):  # one upload is all or nothing
        pq.write_table(table, str(path))
        return
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _clear(out: Path) -> None:
    """Delete everything a job wrote in ``out`` (not the lock)."""
    for child in out.iterdir():
        if child.name not in (LOCK_FILE, OWNER_FILE):
            remove(child)


class StaleRunError(RuntimeError):
    """A write of a run that no longer owns its output folder (another run has started on it)."""


def current_run_id(out: str | Path) -> str | None:
    """The run id recorded in ``OUT/run.json`` (``None``: no run recorded)."""
    try:
        return json.loads((location(out) / RUN_FILE).read_text()).get("run_id")
    except (OSError, ValueError):
        return None


class FencedParquetDatasink(BlockBasedFileDatasink):
    """Ray Data datasink of a job's parquet: one file per write task (at least ``min_rows_per_file`` rows when the
    dataset has them), written only while run ``run_id`` owns the output (``out/run.json``).

    Raises (in the write task):
        StaleRunError: another run owns the output; nothing of this task's is left in ``path``.
    """

    def __init__(self, path: str, out: str, run_id: str, min_rows_per_file: int):
        provider = FilenameProvider(dataset_uuid=run_id[:8], file_format="parquet")
        super().__init__(path, min_rows_per_file=min_rows_per_file, filename_provider=provider)
        self.out, self.run_id = out, run_id
        self._opened: list[str] = []

    def _check_owner(self, written: list[str]) -> None:
        owner = current_run_id(self.out)
        if owner != self.run_id:
            for path in written:
                self.filesystem.delete_file(path)
            raise StaleRunError(f"run {self.run_id} no longer owns {self.out} (run {owner} does): nothing written")

    def open_output_stream(self, path: str):
        self._opened.append(path)
        return super().open_output_stream(path)

    def write_block_to_file(self, block, file) -> None:
        pq.write_table(block.to_arrow(), file)

    def write_block(self, block, block_index: int, ctx) -> None:
        self._check_owner([])
        self._opened = []
        super().write_block(block, block_index, ctx)
        self._check_owner(self._opened)  # before Ray Data's commit, which follows this call


class _NoLock:
    """The lock of an output in object storage: none (the run fence holds there; see the module docstring)."""

    def acquire(self, timeout: float) -> None:
        pass

    def release(self) -> None:
        pass


def owns_output(job: str, results: str, id_column: str = "clip_id") -> Callable:
    """Decorator of a job's ``run_*(source, out, config, ...)``: the lock, the recorded config, the retries.

    Args:
        job: the job's name (recorded in ``OUT/run.json``).
        results: the output sub-folder of its rows (``captions``, ``features``...).
        id_column: the rows' id (Ray Data's checkpoint column).

    The wrapped function raises, before touching ``OUT``:
        OutputInUse: another job holds ``OUT``.
        OutputMismatch: ``OUT`` holds the output of another configuration (``output.replace=true`` replaces it).
    """

    def wrap(run: Callable) -> Callable:
        @functools.wraps(run)
        def wrapped(source, out, config, *args, **kwargs):
            out = location(out)
            created = not out.exists()
            makedirs(out)
            lock = _NoLock() if is_remote(out) else FileLock(out / LOCK_FILE)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                owner = (out / OWNER_FILE).read_text().strip() if (out / OWNER_FILE).is_file() else "unknown"
                raise OutputInUse(
                    f"{out} is in use by another vidlm job ({owner}); wait for it, or give this one another --out"
                ) from None
            try:
                (out / OWNER_FILE).write_text(f"{job}, pid {os.getpid()} on {socket.gethostname()}\n")
                record = output_record(job, config)
                previous = json.loads((out / RUN_FILE).read_text()) if (out / RUN_FILE).is_file() else None
                rows = any((out / results).glob("*.parquet")) if (out / results).is_dir() else False
                if previous is not None and previous.get("config") != record and rows:
                    if not config.output.replace:
                        changed = config_differences(previous.get("config") or {}, record)
                        raise OutputMismatch(
                            f"{out} holds the output of another configuration; "
                            f"differences (recorded -> now): {'; '.join(changed)}. "
                            "Give another --out, or output.replace=true to delete that output and start afresh"
                        )
                    _clear(out)
                retried = retry_transient(out / results, out / "_checkpoint", id_column)
                this_run = {
                    "run_id": uuid.uuid4().hex,
                    "input": str(source),
                    "config": record,
                    "started": time.time(),
                    "retried_transient_rows": retried,
                    "finished": False,
                }
                write_atomic(out / RUN_FILE, json.dumps(this_run, indent=2))
                if previous is not None and not previous.get("finished"):
                    time.sleep(FENCE_GRACE_S)  # a killed run's leftover writes end or fail (module docstring)
                try:
                    result = run(source, out, config, *args, **kwargs)
                except BaseException:
                    if created and not any((out / results).glob("*.parquet")):
                        remove(out)  # a run refused before any row leaves no folder
                    raise
                write_atomic(out / RUN_FILE, json.dumps({**this_run, "finished": True}, indent=2))
                return result
            finally:
                (out / OWNER_FILE).unlink(missing_ok=True)
                lock.release()

        return wrapped

    return wrap
