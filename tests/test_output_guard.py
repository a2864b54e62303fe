"""One job per output folder, one configuration per output, transient error rows retried (``pipelines/_output.py``),
and the files a job writes whole or not at all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines._common import JobSummary, OutputConfig, read_output_columns
from pipelines._output import (
    LOCK_FILE,
    RUN_FILE,
    FencedParquetDatasink,
    OutputInUse,
    OutputMismatch,
    owns_output,
    retry_transient,
)
from vidlm.config import JobConfig
from vidlm.engine import EngineStageConfig, GenerationConfig

REPO = Path(__file__).resolve().parents[1]


class DemoConfig(JobConfig):
    model: str = "not-a-preset"
    generation: GenerationConfig = GenerationConfig()
    engine: EngineStageConfig = EngineStageConfig()
    output: OutputConfig = OutputConfig()


@owns_output("demo", "rows")
def run_demo(source, out, config, seconds: float = 0.0, fail: bool = False):
    if fail:
        raise ValueError("refused before any row")
    (out / "rows").mkdir(exist_ok=True)
    rows = pa.table({"clip_id": [source], "max_tokens": [config.generation.max_tokens]})
    pq.write_table(rows, out / "rows" / "r.parquet")
    time.sleep(seconds)
    return out


def _max_tokens(out: Path) -> int:
    return pq.read_table(out / "rows" / "r.parquet").column("max_tokens")[0].as_py()


HOLDER = """
import sys, time
sys.path.insert(0, "tests")
from test_output_guard import DemoConfig, run_demo
print("holding", flush=True)
run_demo("src", sys.argv[1], DemoConfig(), seconds=600)
"""


def test_a_second_job_on_the_same_output_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        deadline = time.time() + 60
        while time.time() < deadline:  # the holder has the lock, and has written its rows (after the lock)
            try:
                _max_tokens(out)
                break
            except (OSError, pa.ArrowInvalid):
                time.sleep(0.1)
        with pytest.raises(OutputInUse, match=rf"in use by another vidlm job \(demo, pid {holder.pid} on "):
            run_demo("src", out, DemoConfig())
        assert _max_tokens(out) == 256  # the holder's output untouched
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # a crash: no clean-up runs
        holder.wait()
    assert (out / LOCK_FILE).exists()  # the file stays, the OS lock went with the process
    assert run_demo("src", out, DemoConfig()) == out.resolve()


def test_a_different_configuration_is_refused_naming_the_fields_unless_replaced(tmp_path):
    out = tmp_path / "out"
    run_demo("src", out, DemoConfig())
    # how the work is spread is not the output's configuration
    run_demo("src", out, DemoConfig(engine=EngineStageConfig(batch_size=3, num_engines=2)))
    with pytest.raises(OutputMismatch) as err:
        run_demo("src", out, DemoConfig(generation=GenerationConfig(max_tokens=8, temperature=0.5)))
    message = str(err.value)
    assert "generation.max_tokens: 256 -> 8" in message and "generation.temperature: 0.0 -> 0.5" in message
    assert _max_tokens(out) == 256
    run_demo("a-longer-manifest", out, DemoConfig())  # more input, same configuration: rows are added
    (out / "stale.txt").write_text("from the earlier output")
    run_demo("src", out, DemoConfig(generation=GenerationConfig(max_tokens=8), output=OutputConfig(replace=True)))
    assert not (out / "stale.txt").exists() and _max_tokens(out) == 8
    assert json.loads((out / RUN_FILE).read_text())["config"]["generation.max_tokens"] == 8


def test_a_model_retrained_in_the_same_folder_is_another_configuration(tmp_path):
    """The record holds the digest of the model's files, not only its ``config.json``: the same bytes rewritten
    (a rebuilt preset) resume, other weights of the same size and config are refused."""
    model, out = tmp_path / "model", tmp_path / "out"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(bytes(64))
    run_demo("src", out, DemoConfig(model=str(model)))
    (model / "model.safetensors").write_bytes(bytes(64))
    run_demo("src", out, DemoConfig(model=str(model)))
    (model / "model.safetensors").write_bytes(bytes(63) + b"\x01")
    with pytest.raises(OutputMismatch, match="model_sha256: '[0-9a-f]{64}' -> '[0-9a-f]{64}'"):
        run_demo("src", out, DemoConfig(model=str(model)))


def test_a_run_refused_before_any_row_pins_nothing_and_leaves_no_new_folder(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="refused before any row"):
        run_demo("src", out, DemoConfig(), fail=True)
    assert not out.exists()
    out.mkdir()
    with pytest.raises(ValueError):
        run_demo("src", out, DemoConfig(generation=GenerationConfig(max_tokens=8)), fail=True)
    assert out.exists()  # a folder the user made stays
    run_demo("src", out, DemoConfig())  # the failed run's configuration, recorded without rows, binds nothing
    assert _max_tokens(out) == 256


def _rows(ids: list[str], kinds: list[str | None]) -> pa.Table:
    return pa.table({"clip_id": ids, "caption": [None if k else "text" for k in kinds], "error_type": kinds})


def test_transient_rows_leave_the_output_and_the_checkpoint_and_permanent_ones_stay(tmp_path):
    results, checkpoint = tmp_path / "captions", tmp_path / "_checkpoint"
    results.mkdir()
    checkpoint.mkdir()
    pq.write_table(_rows(["a", "b", "c"], [None, "generation_failed", "not_a_video"]), results / "f1.parquet")
    pq.write_table(_rows(["d"], ["generation_failed"]), results / "f2.parquet")
    pq.write_table(_rows(["e"], [None]), results / "f3.parquet")
    (results / "f4.parquet").write_bytes(b"PAR1 half-written")  # a killed run's file: Ray's recovery deletes it
    for name, ids in {"k1": ["a", "b", "c"], "k2": ["d"], "k3": ["e"]}.items():
        pq.write_table(pa.table({"clip_id": ids}), checkpoint / f"{name}.parquet")

    assert retry_transient(results, checkpoint, "clip_id") == 2

    kept = sorted(read_output_columns(results, ["clip_id"], skip_unreadable=True).column("clip_id").to_pylist())
    assert kept == ["a", "c", "e"]
    ids = sorted(i for f in checkpoint.glob("*.parquet") for i in pq.read_table(f).column("clip_id").to_pylist())
    assert ids == ["a", "c", "e"] and not (checkpoint / "k2.parquet").exists()
    assert retry_transient(results, checkpoint, "clip_id") == 0


def test_the_summary_tells_transient_from_permanent_errors_and_reads_files_of_different_columns(tmp_path):
    pq.write_table(_rows(["a", "b"], [None, "generation_failed"]), tmp_path / "f1.parquet")
    pq.write_table(pa.table({"clip_id": ["c"], "error_type": ["not_a_video"]}), tmp_path / "f2.parquet")
    summary = JobSummary.collect(tmp_path, set(), time.perf_counter(), {"tokens/s": "output_tokens"})
    assert (summary.total, summary.ok) == (3, 1)
    labels = [label for label, _ in summary.report("t").rows]
    assert "failed: generation_failed (transient: a rerun retries)" in labels and "failed: not_a_video" in labels


def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path):
    from vidlm.writers import write_atomic

    path = write_atomic(tmp_path / "summary.json", '{"old": 1}')
    write_atomic(path, b'{"new": 2}')
    assert json.loads(path.read_text()) == {"new": 2} and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


class _TakenOverMidWrite(FencedParquetDatasink):
    """The next run takes the output over while this task writes its file."""

    def write_block_to_file(self, block, file) -> None:
        super().write_block_to_file(block, file)
        (Path(self.out) / RUN_FILE).write_text(json.dumps({"run_id": "next-run"}))


@pytest.mark.integration
def test_a_write_of_a_run_that_no_longer_owns_the_output_leaves_no_file(ray_cluster, tmp_path):
    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers get _TakenOverMidWrite
    rows = tmp_path / "rows"
    ds = ray.data.from_items([{"clip_id": str(i)} for i in range(6)])

    def own(run_id: str) -> None:
        (tmp_path / RUN_FILE).write_text(json.dumps({"run_id": run_id}))

    own("next-run")  # a leftover of run "old" after the next run started
    with pytest.raises(Exception, match="run old-run no longer owns"):
        ds.write_datasink(FencedParquetDatasink(str(rows), str(tmp_path), "old-run", 6))
    assert not list(rows.glob("*.parquet"))
    own("old-run")  # the next run starts while the file is being written: the file is deleted before any commit
    with pytest.raises(Exception, match="no longer owns"):
        ds.write_datasink(_TakenOverMidWrite(str(rows), str(tmp_path), "old-run", 6))
    assert not list(rows.glob("*.parquet"))
    own("old-run")
    ds.write_datasink(FencedParquetDatasink(str(rows), str(tmp_path), "old-run", 6))
    assert sorted(read_output_columns(rows, ["clip_id"]).column("clip_id").to_pylist()) == list("012345")
