"""The CLIP vision tower: shapes, dtypes, the patch features come from the configured layer."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch

from vidlm.models.vision_tower import VisionTower, VisionTowerConfig, image_size


@pytest.fixture(scope="module")
def tower():
    return VisionTower(VisionTowerConfig(name="vidlm-tiny", seed=0))


def test_shapes_and_dtypes(tower):
    frames = np.random.default_rng(0).integers(0, 256, (5, 224, 224, 3), dtype=np.uint8)
    emb, patches = tower(frames)
    assert emb.shape == (5, 64) and emb.dtype == torch.float32
    assert patches.shape == (5, 49, 64)  # 224 / 32 = 7 -> 7x7 patches, width 64
    assert tower.num_patches == 49 and tower.embed_dim == 64 and image_size(tower.config) == 224
    emb_only, none = tower(frames, with_patches=False)
    assert none is None and torch.allclose(emb_only, emb, atol=1e-5)


def test_patch_features_are_the_penultimate_block_output(tower):
    frames = np.random.default_rng(1).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    _, patches = tower(frames)
    visual = tower.visual
    # CLIP's normalisation written out from open_clip's constants (the tower folds it into a scale and shift)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    x = torch.as_tensor(frames).permute(0, 3, 1, 2).float() / 255.0
    x = (x - mean) / std
    x = visual._embeds(x)  # (B, 1 + N, W): class token + patches, positional embedding, ln_pre
    blocks = visual.transformer.resblocks
    for block in blocks[: len(blocks) - 1]:  # feature_layer = -2: stop after block L-2 (0-based)
        x = block(x)
    assert torch.allclose(patches, x[:, 1:], atol=1e-5)


def test_seeded_random_weights_are_reproducible():
    a = VisionTower(VisionTowerConfig(seed=5))
    b = VisionTower(VisionTowerConfig(seed=5))
    c = VisionTower(VisionTowerConfig(seed=6))
    frames = np.full((1, 224, 224, 3), 128, np.uint8)
    assert torch.equal(a(frames)[0], b(frames)[0]) and not torch.equal(a(frames)[0], c(frames)[0])


def test_wrong_frame_shape_is_a_value_error(tower):
    with pytest.raises(ValueError, match=r"expected frames \(N, 224, 224, 3\) uint8"):
        tower(np.zeros((1, 112, 112, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        tower(np.zeros((1, 224, 224, 3), np.float32))


def test_unknown_architecture_and_missing_checkpoint():
    with pytest.raises(ValueError, match="not an open_clip architecture"):
        image_size(VisionTowerConfig(name="ViT-Nope"))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        VisionTower(VisionTowerConfig(checkpoint="/nonexistent/weights.pt"))
